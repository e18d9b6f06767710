//! The `fusion` pass: groups graph nodes into kernels.
//!
//! A kernel is one main operation (a convolution, a dense layer, a pool, ...) followed by an
//! epilogue of elementwise operations applied while its result is still in VMEM: bias, batch
//! norm with moving statistics, a residual add, ReLU or ReLU6. A node joins the epilogue when it
//! is the only consumer of the value so far, so every fused intermediate is never written to
//! HBM. Reshapes (and dropout at inference) become views: no instructions, the same bytes.

use std::collections::BTreeMap;
use std::fmt;

use super::training::Update;
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId, Op};

/// An elementwise step applied in a kernel's epilogue.
#[derive(Clone, Debug, PartialEq)]
pub enum Epilogue {
    /// Adds a `[C]` parameter.
    Bias(NodeId),
    /// Batch norm with moving statistics; the node's inputs give the parameters.
    BatchNorm(NodeId),
    /// Batch norm with the batch's statistics (training): a pass over the kernel's input
    /// computes them first, so it is only ever the first step of a pointwise kernel.
    BatchNormTrain(NodeId),
    /// Adds a tensor of the kernel's output shape.
    Residual(NodeId),
    /// Multiplies by a tensor of the kernel's output shape (`Mul`). A kernel has at most one
    /// such tensor operand (this or `Residual`).
    Product(NodeId),
    /// `ReluGrad` / `Relu6Grad` of the value so far (a gradient) by the activation `y`: the
    /// mask applied where the gradient is made, so it is not written and read back. Only in
    /// a convolution input gradient's epilogue.
    Mask {
        y: NodeId,
        relu6: bool,
    },
    Relu,
    Relu6,
}

/// What a kernel computes before its epilogue.
#[derive(Clone, Debug, PartialEq)]
pub enum Main {
    Conv(NodeId),
    Dense(NodeId),
    MaxPool(NodeId),
    AvgPool(NodeId),
    GlobalAvgPool(NodeId),
    Softmax(NodeId),
    Concat(NodeId),
    /// A slice along one axis (a concatenation's gradient).
    Slice(NodeId),
    /// Only an epilogue, applied to an existing tensor.
    Pointwise {
        input: NodeId,
    },
    /// The same bytes under another shape (reshape, flatten, dropout at inference).
    View(NodeId),
    // ---- training ----
    /// Softmax cross-entropy: the mean loss, from logits and one-hot labels.
    Loss(NodeId),
    /// The loss's gradient with respect to the logits.
    LossGrad(NodeId),
    /// `DenseBackpropInput` (`dy · Wᵀ`) or `DenseBackpropKernel` (`xᵀ · dy`).
    MatMulT(NodeId),
    /// `BiasAddGrad`: sums over every row.
    ColumnSums(NodeId),
    /// `SoftmaxGrad`: `y · (dy − Σ dy·y)` per row.
    SoftmaxGrad(NodeId),
    /// `ReluGrad` or `Relu6Grad`: `dy` where the activation was in its active range.
    Mask(NodeId),
    /// `MaxPoolGrad`, `AvgPoolGrad` or `GlobalAvgPoolGrad` on the VPU.
    PoolGrad(NodeId),
    /// `Conv2dBackpropInput`: a stride-1 convolution of the (zero-dilated) gradient with the
    /// flipped, transposed kernel.
    ConvGradInput(NodeId),
    /// `Conv2dBackpropFilter`: per tap, `dyᵀ · x_tap` accumulated over blocks of pixels.
    ConvGradFilter(NodeId),
    /// A batch norm's gradients with batch statistics in one kernel: a pass of sums, then the
    /// input gradient; the gamma and beta gradients come from the sums.
    BatchNormGrad(BatchNormGrad),
    /// `BatchNormGradGamma`: one pass of sums.
    BatchNormGradGamma(NodeId),
    /// Dropout in a training step (forward, or the same mask on the gradient): the mask drawn
    /// on the VPU from the step number.
    Dropout(NodeId),
    /// The optimizer's update of one parameter (in place) and its slots.
    Update(Update),
    /// The optimizer's shared state after the step (Adam's powers).
    Advance(Vec<NodeId>),
}

/// The nodes of one batch norm's gradient kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormGrad {
    /// The `BatchNormGradInput` node (the kernel's output).
    pub input: NodeId,
    /// `BatchNormGradGamma` on the same `x` and `dy`.
    pub gamma: Option<NodeId>,
    /// `BiasAddGrad` of the same `dy` (beta's gradient).
    pub beta: Option<NodeId>,
    /// A `ReluGrad` / `Relu6Grad` that makes `dy` and feeds only this kernel: applied to each
    /// block as it loads, so the masked gradient never goes to HBM.
    pub mask: Option<NodeId>,
}

/// A group of nodes computed by one block of instructions.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub main: Main,
    pub epilogue: Vec<Epilogue>,
    /// Every graph node the kernel computes, in order.
    pub nodes: Vec<NodeId>,
    /// The node whose value the kernel writes to HBM.
    pub output: NodeId,
    /// Further nodes it writes (a fused batch-norm gradient's gamma and beta gradients).
    pub also: Vec<NodeId>,
    /// A convolution whose output feeds this batch norm (batch statistics): its epilogue also
    /// sums the output per channel, so the batch norm skips its own pass of sums.
    pub stats_for: Option<NodeId>,
}

impl Kernel {
    /// The tensors (graph nodes) the kernel reads, excluding parameters.
    pub fn inputs(&self, graph: &Graph) -> Vec<NodeId> {
        let mut out = Vec::new();
        match &self.main {
            Main::Conv(n)
            | Main::Dense(n)
            | Main::MaxPool(n)
            | Main::AvgPool(n)
            | Main::GlobalAvgPool(n)
            | Main::Softmax(n)
            | Main::Dropout(n)
            | Main::Slice(n)
            | Main::View(n) => out.push(graph.node(*n).inputs[0]),
            Main::Concat(n)
            | Main::MatMulT(n)
            | Main::SoftmaxGrad(n)
            | Main::Mask(n)
            | Main::PoolGrad(n)
            | Main::ConvGradInput(n)
            | Main::ConvGradFilter(n)
            | Main::BatchNormGradGamma(n) => out.extend(graph.node(*n).inputs.iter().copied()),
            Main::BatchNormGrad(g) => {
                let ins = &graph.node(g.input).inputs;
                out.extend(ins[..4].iter().copied());
                match g.mask {
                    Some(m) => out.extend(graph.node(m).inputs.iter().copied()),
                    None => out.push(ins[4]),
                }
            }
            Main::Pointwise { input } => out.push(*input),
            // The labels are read as their one-hot input, a leaf.
            Main::Loss(n) | Main::LossGrad(n) | Main::ColumnSums(n) => out.push(graph.node(*n).inputs[0]),
            Main::Update(u) => out.push(u.grad),
            Main::Advance(_) => {}
        }
        for e in &self.epilogue {
            if let Epilogue::Residual(r) | Epilogue::Product(r) | Epilogue::Mask { y: r, .. } = e {
                out.push(*r);
            }
        }
        out
    }

    /// Whether the kernel writes a new tensor (views alias one, updates write in place).
    pub fn allocates(&self) -> bool {
        !matches!(self.main, Main::View(_) | Main::Update(_) | Main::Advance(_))
    }

    /// A short description of the kernel's ops (`Conv2d+BatchNorm+Relu`).
    pub fn ops(&self, graph: &Graph) -> String {
        self.nodes.iter().map(|&n| graph.node(n).op.kind()).collect::<Vec<_>>().join("+")
    }
}

impl fmt::Display for Main {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

fn unsupported(graph: &Graph, id: NodeId, why: &str) -> Error {
    let n = graph.node(id);
    Error::Node { node: n.name.clone(), op: n.op.kind(), reason: format!("the lowering cannot place this op: {why}") }
}

/// Groups the graph's nodes (those the outputs need) into kernels, in an order where every
/// kernel's inputs are produced by earlier kernels.
pub fn fuse(graph: &Graph, training: bool) -> Result<Vec<Kernel>> {
    let needed = graph.ancestors(graph.outputs());
    let mut fused = vec![false; graph.len()];
    let is_output = |id: NodeId| graph.outputs().contains(&id);
    let mut kernels = Vec::new();
    let mut bn_grads = group_batch_norm_grads(graph, &needed, &mut fused);
    for (id, node) in graph.nodes() {
        if !needed[id.index()] || fused[id.index()] || node.op.is_leaf() {
            continue;
        }
        let main = match &node.op {
            Op::Conv2d(_) => Main::Conv(id),
            Op::Dense => Main::Dense(id),
            Op::MaxPool(_) => Main::MaxPool(id),
            Op::AvgPool(_) => Main::AvgPool(id),
            Op::GlobalAvgPool => Main::GlobalAvgPool(id),
            Op::Softmax => Main::Softmax(id),
            Op::Concat(_) => Main::Concat(id),
            Op::Slice(_) => Main::Slice(id),
            Op::Flatten | Op::Reshape(_) => Main::View(id),
            Op::Dropout(d) if !training || d.rate == 0.0 => Main::View(id),
            Op::Dropout(_) => Main::Dropout(id),
            Op::BiasAdd | Op::BatchNorm(_) | Op::Relu | Op::Relu6 | Op::Add | Op::Mul => {
                Main::Pointwise { input: node.inputs[0] }
            }
            Op::SoftmaxCrossEntropy(_) => Main::Loss(id),
            Op::SoftmaxCrossEntropyGrad(_) => Main::LossGrad(id),
            Op::DenseBackpropInput | Op::DenseBackpropKernel => Main::MatMulT(id),
            Op::BiasAddGrad => Main::ColumnSums(id),
            Op::ReluGrad | Op::Relu6Grad => Main::Mask(id),
            Op::SoftmaxGrad => Main::SoftmaxGrad(id),
            Op::MaxPoolGrad(_) | Op::AvgPoolGrad(_) | Op::GlobalAvgPoolGrad(_) => Main::PoolGrad(id),
            Op::Conv2dBackpropInput(_) => Main::ConvGradInput(id),
            Op::Conv2dBackpropFilter(_) => Main::ConvGradFilter(id),
            // Outside a training step the reference normalises with the moving statistics;
            // the lowered batch-norm gradients use the batch's.
            Op::BatchNormGradInput(_) | Op::BatchNormGradGamma(_) if !training => {
                return Err(unsupported(
                    graph,
                    id,
                    "batch-norm gradients with moving statistics (a graph compiled without --train) are not lowered; compile the training step (--train), where they use the batch's statistics",
                ));
            }
            Op::BatchNormGradInput(_) => Main::BatchNormGrad(bn_grads.remove(&id).expect("grouped above")),
            Op::BatchNormGradGamma(_) => Main::BatchNormGradGamma(id),
            // Every op of the IR has a kernel above; a new op must get one before it compiles.
            other => return Err(unsupported(graph, id, &format!("{} is not lowered yet", other.kind()))),
        };
        let mut kernel = Kernel {
            name: node.name.clone(),
            main: main.clone(),
            epilogue: Vec::new(),
            nodes: vec![id],
            output: id,
            also: Vec::new(),
            stats_for: None,
        };
        if let Main::BatchNormGrad(g) = &main {
            kernel.nodes = g.mask.into_iter().chain([id]).chain(g.gamma).chain(g.beta).collect();
            kernel.also = g.gamma.into_iter().chain(g.beta).collect();
        }
        fused[id.index()] = true;
        // A pointwise kernel's first node is itself an epilogue step on its input.
        let mut cur = id;
        if let Main::Pointwise { input } = main {
            let step = match epilogue_step(graph, id, input) {
                Some(Epilogue::BatchNorm(n)) if training => Epilogue::BatchNormTrain(n),
                Some(step) => step,
                None => {
                    return Err(unsupported(
                        graph,
                        id,
                        "an elementwise op with operands it cannot take (a bias or batch-norm parameter that is computed rather than a Parameter, or both operands the same tensor)",
                    ));
                }
            };
            kernel.epilogue.push(step);
        }
        // A convolution's input gradient takes the residual add that sums it with the other
        // branch's gradient and the activation mask after it; forward kernels take any
        // epilogue but masks.
        let only_adds = matches!(main, Main::ConvGradInput(_));
        if only_adds || matches!(main, Main::Conv(_) | Main::Dense(_) | Main::Pointwise { .. }) {
            // Grow the epilogue along single-consumer chains.
            loop {
                let consumers: Vec<NodeId> = graph.consumers(cur).into_iter().filter(|c| needed[c.index()]).collect();
                if is_output(cur) || consumers.len() != 1 {
                    break;
                }
                let next = consumers[0];
                if fused[next.index()] || (training && matches!(graph.node(next).op, Op::BatchNorm(_))) {
                    break;
                }
                let Some(step) = epilogue_step(graph, next, cur) else { break };
                let is_mask = matches!(step, Epilogue::Mask { .. });
                let allowed = if only_adds { is_mask || matches!(step, Epilogue::Residual(_)) } else { !is_mask };
                if !allowed {
                    break;
                }
                if kernel.epilogue.iter().any(|s| matches!(s, Epilogue::Mask { .. })) {
                    break;
                }
                let operand = |s: &Epilogue| matches!(s, Epilogue::Residual(_) | Epilogue::Product(_));
                if operand(&step) && kernel.epilogue.iter().any(operand) {
                    break;
                }
                kernel.epilogue.push(step);
                kernel.nodes.push(next);
                fused[next.index()] = true;
                cur = next;
            }
        }
        kernel.output = cur;
        kernels.push(kernel);
    }
    // Order by output: a fused residual add may follow the kernel that makes its other operand.
    kernels.sort_by_key(|k| k.output.index());
    // A batch norm with batch statistics right after a convolution takes its sums from the
    // convolution's epilogue, where the output is on chip anyway.
    let producer: BTreeMap<NodeId, usize> = kernels.iter().enumerate().map(|(i, k)| (k.output, i)).collect();
    for j in 0..kernels.len() {
        let (Main::Pointwise { input }, Some(&Epilogue::BatchNormTrain(bn))) =
            (&kernels[j].main, kernels[j].epilogue.first())
        else {
            continue;
        };
        if let Some(&i) = producer.get(input)
            && matches!(kernels[i].main, Main::Conv(_))
            && kernels[i].epilogue.is_empty()
        {
            kernels[i].stats_for = Some(bn);
        }
    }
    Ok(kernels)
}

/// Each batch norm's input gradient with the nodes that read the same `x` and `dy` (gamma's
/// and beta's gradients) and the activation gradient making `dy`, marked fused: one kernel
/// reads `x` and `dy` twice, where separate kernels would read them five times.
fn group_batch_norm_grads(graph: &Graph, needed: &[bool], fused: &mut [bool]) -> BTreeMap<NodeId, BatchNormGrad> {
    let consumers =
        |n: NodeId| -> Vec<NodeId> { graph.consumers(n).into_iter().filter(|c| needed[c.index()]).collect() };
    let mut groups = BTreeMap::new();
    for (id, node) in graph.nodes() {
        if !needed[id.index()] || !matches!(node.op, Op::BatchNormGradInput(_)) {
            continue;
        }
        let (x, dy) = (node.inputs[0], node.inputs[4]);
        let Op::BatchNormGradInput(attrs) = &node.op else { unreachable!("matched above") };
        let of_dy = consumers(dy);
        // Members come after the input gradient (the kernel runs at its place in node order).
        let find = |member: &dyn Fn(&crate::graph::Node) -> bool| {
            of_dy.iter().copied().find(|&c| c > id && !fused[c.index()] && member(graph.node(c)))
        };
        let gamma = find(&|n| {
            matches!(&n.op, Op::BatchNormGradGamma(a) if a == attrs) && n.inputs[0] == x && n.inputs[3] == dy
        });
        let beta = find(&|n| matches!(n.op, Op::BiasAddGrad));
        let members: Vec<NodeId> = [Some(id), gamma, beta].into_iter().flatten().collect();
        // Whatever reads a member's result must come after the whole group.
        let last = *members.iter().max().expect("the input gradient");
        if members.iter().any(|&m| consumers(m).iter().any(|&c| c < last)) {
            groups.insert(id, BatchNormGrad { input: id, gamma: None, beta: None, mask: None });
            continue;
        }
        let mask = (matches!(graph.node(dy).op, Op::ReluGrad | Op::Relu6Grad)
            && !graph.outputs().contains(&dy)
            && !fused[dy.index()]
            && of_dy.iter().all(|c| members.contains(c)))
        .then_some(dy);
        for n in [gamma, beta, mask].into_iter().flatten() {
            fused[n.index()] = true;
        }
        groups.insert(id, BatchNormGrad { input: id, gamma, beta, mask });
    }
    groups
}

/// `next` as an epilogue step applied to the running value `cur`, if it can be one.
fn epilogue_step(graph: &Graph, next: NodeId, cur: NodeId) -> Option<Epilogue> {
    let node = graph.node(next);
    let is_param = |id: NodeId| matches!(graph.node(id).op, Op::Parameter(_));
    match &node.op {
        Op::BiasAdd if node.inputs[0] == cur && is_param(node.inputs[1]) => Some(Epilogue::Bias(node.inputs[1])),
        Op::BatchNorm(_) if node.inputs[0] == cur && node.inputs[1..].iter().all(|&p| is_param(p)) => {
            Some(Epilogue::BatchNorm(next))
        }
        Op::Relu if node.inputs[0] == cur => Some(Epilogue::Relu),
        Op::ReluGrad | Op::Relu6Grad if node.inputs[1] == cur && node.inputs[0] != cur => {
            Some(Epilogue::Mask { y: node.inputs[0], relu6: matches!(node.op, Op::Relu6Grad) })
        }
        Op::Relu6 if node.inputs[0] == cur => Some(Epilogue::Relu6),
        Op::Add | Op::Mul => {
            let (a, b) = (node.inputs[0], node.inputs[1]);
            let other = if a == cur && b != cur {
                b
            } else if b == cur && a != cur {
                a
            } else {
                return None;
            };
            Some(if matches!(node.op, Op::Add) { Epilogue::Residual(other) } else { Epilogue::Product(other) })
        }
        _ => None,
    }
}

//! The `fusion` pass: groups graph nodes into kernels.
//!
//! A kernel is one main operation (a convolution, a dense layer, a pool, ...) followed by an
//! epilogue of elementwise operations applied while its result is still in VMEM: bias, batch
//! norm with moving statistics, a residual add, ReLU or ReLU6. A node joins the epilogue when it
//! is the only consumer of the value so far, so every fused intermediate is never written to
//! HBM. Reshapes (and dropout at inference) become views: no instructions, the same bytes.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId, Op};
use crate::lower::kernel::{BatchNormGrad, Epilogue, Kernel, Main};
use crate::lower::training::Step;

/// The pass: the graph's kernels, then (for a training step) one update kernel per parameter
/// (or per bucket of a sharded update) and one that advances the optimizer's shared state.
pub(crate) fn run(graph: &Graph, step: &Step, training: bool) -> Result<Vec<Kernel>> {
    let mut kernels = fuse(graph, training)?;
    for u in &step.updates {
        kernels.push(Kernel {
            name: format!("update/{}", graph.node(u.param).name),
            main: Main::Update(u.clone()),
            epilogue: Vec::new(),
            nodes: vec![u.param],
            output: u.param,
            also: Vec::new(),
            stats_for: None,
        });
    }
    for (b, s) in step.sharded.iter().enumerate() {
        kernels.push(Kernel {
            name: format!("update/shard {b}"),
            main: Main::ShardedUpdate(s.clone()),
            epilogue: Vec::new(),
            nodes: s.params.iter().copied().chain(s.state().copied()).collect(),
            output: s.param_shard,
            also: Vec::new(),
            stats_for: None,
        });
    }
    if let Some(&first) = step.state.first() {
        kernels.push(Kernel {
            name: "update/optimizer state".to_string(),
            main: Main::Advance(step.state.clone()),
            epilogue: Vec::new(),
            nodes: step.state.clone(),
            output: first,
            also: Vec::new(),
            stats_for: None,
        });
    }
    Ok(kernels)
}

/// One line per kernel: its name, ops and nodes.
pub(crate) fn dump(graph: &Graph, kernels: &[Kernel]) -> String {
    let mut s = format!("{} kernels\n", kernels.len());
    for (i, k) in kernels.iter().enumerate() {
        let names: Vec<&str> = k.nodes.iter().map(|&n| graph.node(n).name.as_str()).collect();
        s += &format!("{i:>4}  {:<28} {:<40} [{}]\n", k.name, k.ops(graph), names.join(", "));
    }
    s
}

fn unsupported(graph: &Graph, id: NodeId, why: &str) -> Error {
    let n = graph.node(id);
    Error::Node { node: n.name.clone(), op: n.op.kind(), reason: format!("the lowering cannot place this op: {why}") }
}

/// Groups the graph's nodes (those the outputs need) into kernels, in an order where every
/// kernel's inputs are produced by earlier kernels.
fn fuse(graph: &Graph, training: bool) -> Result<Vec<Kernel>> {
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
            // Every other op of the IR has a kernel above; a new op must get one to compile.
            Op::Input(_) | Op::Parameter(_) => unreachable!("leaves are skipped above"),
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
            let step = match epilogue_step(graph, id, input, true) {
                Some(Epilogue::BatchNorm(n)) if training => Epilogue::BatchNormTrain(n),
                Some(step) => step,
                None => {
                    return Err(unsupported(
                        graph,
                        id,
                        "an elementwise op with operands it cannot take (a bias or batch-norm parameter that is computed rather than a Parameter)",
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
                let Some(step) = epilogue_step(graph, next, cur, false) else { break };
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

/// `next` as an epilogue step applied to the running value `cur`, if it can be one;
/// `cur_in_hbm` when `cur` is the kernel's input rather than a value fused so far.
fn epilogue_step(graph: &Graph, next: NodeId, cur: NodeId, cur_in_hbm: bool) -> Option<Epilogue> {
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
            let other = if a == cur {
                b
            } else if b == cur {
                a
            } else {
                return None;
            };
            // `cur + cur` reads its second operand from HBM: only a kernel's input is there,
            // never a value fused so far (that one ends this kernel and starts the next).
            if other == cur && !cur_in_hbm {
                return None;
            }
            Some(if matches!(node.op, Op::Add) { Epilogue::Residual(other) } else { Epilogue::Product(other) })
        }
        // The elementwise ops above, with operands they cannot take as an epilogue step.
        Op::BiasAdd | Op::BatchNorm(_) | Op::Relu | Op::Relu6 | Op::ReluGrad | Op::Relu6Grad => None,
        // Ops that are not elementwise on the value so far.
        Op::Input(_)
        | Op::Parameter(_)
        | Op::Conv2d(_)
        | Op::MaxPool(_)
        | Op::AvgPool(_)
        | Op::GlobalAvgPool
        | Op::Dense
        | Op::Dropout(_)
        | Op::Flatten
        | Op::Reshape(_)
        | Op::Concat(_)
        | Op::Softmax
        | Op::SoftmaxCrossEntropy(_)
        | Op::Conv2dBackpropInput(_)
        | Op::Conv2dBackpropFilter(_)
        | Op::MaxPoolGrad(_)
        | Op::AvgPoolGrad(_)
        | Op::GlobalAvgPoolGrad(_)
        | Op::DenseBackpropInput
        | Op::DenseBackpropKernel
        | Op::BiasAddGrad
        | Op::BatchNormGradInput(_)
        | Op::BatchNormGradGamma(_)
        | Op::SoftmaxGrad
        | Op::SoftmaxCrossEntropyGrad(_)
        | Op::Slice(_) => None,
    }
}

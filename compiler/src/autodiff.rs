//! Reverse-mode automatic differentiation as a graph transformation.
//!
//! [`differentiate`] returns a new graph: the forward graph plus backward nodes (Conv2dBackpropInput,
//! BatchNormGradInput, ...) that compute the gradient of a root with respect to chosen nodes.
//! Because gradients are ordinary graph nodes, every backend — the CPU reference now, the
//! lowering to the simulated TPU later — runs training with the ops it already knows, and the
//! backward pass can be inspected, saved and compiled like the forward one.
//!
//! Naming: the total gradient of node `n` is `grad/n` when several consumers contribute to it
//! (their contributions are `bwd/<consumer>/<operand>`), otherwise it is that one contribution.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::graph::*;

/// A graph extended with backward nodes.
#[derive(Clone, Debug)]
pub struct Gradients {
    pub graph: Graph,
    /// The differentiated node (for a classifier, the loss).
    pub root: NodeId,
    /// For a non-scalar root: the Input that carries the upstream gradient (named `<root>/upstream`).
    pub upstream: Option<NodeId>,
    /// Gradient node of each requested node, by the requested node's name.
    pub grads: BTreeMap<String, NodeId>,
    /// Requested nodes the root does not depend on: their gradient is zero.
    pub unconnected: Vec<String>,
}

/// The operand names used in contribution node names.
fn operand_name(op: &Op, slot: usize) -> String {
    let names: &[&str] = match op {
        Op::Conv2d(_) | Op::Dense => &["input", "kernel", "bias"],
        Op::BiasAdd => &["input", "bias"],
        Op::BatchNorm(_) => &["input", "gamma", "beta"],
        Op::SoftmaxCrossEntropy(_) => &["logits"],
        Op::Input(_)
        | Op::Parameter(_)
        | Op::MaxPool(_)
        | Op::AvgPool(_)
        | Op::GlobalAvgPool
        | Op::Add
        | Op::Mul
        | Op::Relu
        | Op::Relu6
        | Op::Dropout(_)
        | Op::Flatten
        | Op::Reshape(_)
        | Op::Concat(_)
        | Op::Softmax
        | Op::Conv2dBackpropInput(_)
        | Op::Conv2dBackpropFilter(_)
        | Op::MaxPoolGrad(_)
        | Op::AvgPoolGrad(_)
        | Op::GlobalAvgPoolGrad(_)
        | Op::DenseBackpropInput
        | Op::DenseBackpropKernel
        | Op::BiasAddGrad
        | Op::ReluGrad
        | Op::Relu6Grad
        | Op::BatchNormGradInput(_)
        | Op::BatchNormGradGamma(_)
        | Op::SoftmaxGrad
        | Op::SoftmaxCrossEntropyGrad(_)
        | Op::Slice(_) => &[],
    };
    names.get(slot).map_or_else(|| format!("input{slot}"), |s| s.to_string())
}

struct Builder<'a> {
    forward: &'a Graph,
    graph: Graph,
    /// Gradient contributions to each node's output.
    contributions: Vec<Vec<NodeId>>,
}

impl Builder<'_> {
    fn err(&self, node: NodeId, reason: String) -> Error {
        let n = self.forward.node(node);
        Error::Node { node: n.name.clone(), op: n.op.kind(), reason }
    }

    /// Adds a backward node computing the gradient for operand `slot` of `consumer`.
    fn emit(&mut self, consumer: NodeId, slot: usize, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let c = self.forward.node(consumer);
        let name = format!("bwd/{}/{}", c.name, operand_name(&c.op, slot));
        self.graph.add(name, op, inputs)
    }

    /// The total gradient of `id`'s output, summing its contributions in consumer order.
    fn total(&mut self, id: NodeId) -> Result<Option<NodeId>> {
        let parts = std::mem::take(&mut self.contributions[id.index()]);
        let Some((&first, rest)) = parts.split_first() else {
            return Ok(None);
        };
        if rest.is_empty() {
            return Ok(Some(first));
        }
        let name = format!("grad/{}", self.forward.node(id).name);
        let mut acc = first;
        for (i, &p) in rest.iter().enumerate() {
            let n = if i + 1 == rest.len() { name.clone() } else { format!("{name}/partial{}", i + 1) };
            acc = self.graph.add(n, Op::Add, &[acc, p])?;
        }
        Ok(Some(acc))
    }

    /// Adds the backward nodes of forward node `id` given its output gradient `dy`.
    fn backward(&mut self, id: NodeId, dy: NodeId, relevant: &[bool]) -> Result<()> {
        let node = self.forward.node(id).clone();
        let ins = node.inputs.clone();
        let wants = |slot: usize| ins.get(slot).is_some_and(|i| relevant[i.index()]);
        let forward = self.forward;
        let shape_of = |i: NodeId| forward.node(i).shape.dims.clone();
        let push = |b: &mut Self, slot: usize, g: NodeId| b.contributions[ins[slot].index()].push(g);
        // The gradient of an activation computed from its output `y` and `dy`.
        let from_output = |b: &mut Self, op: Op| -> Result<()> {
            if wants(0) {
                let g = b.emit(id, 0, op, &[id, dy])?;
                push(b, 0, g);
            }
            Ok(())
        };
        match &node.op {
            Op::Input(_) | Op::Parameter(_) => {}
            Op::Conv2d(conv) => {
                if wants(0) {
                    let d = shape_of(ins[0]);
                    let op = Op::Conv2dBackpropInput(ConvBackpropInput {
                        conv: conv.clone(),
                        input_shape: [d[0], d[1], d[2]],
                    });
                    let g = self.emit(id, 0, op, &[dy, ins[1]])?;
                    push(self, 0, g);
                }
                if wants(1) {
                    let k = shape_of(ins[1]);
                    let op = Op::Conv2dBackpropFilter(ConvBackpropFilter {
                        conv: conv.clone(),
                        kernel_shape: [k[0], k[1], k[2], k[3]],
                    });
                    let g = self.emit(id, 1, op, &[ins[0], dy])?;
                    push(self, 1, g);
                }
                if wants(2) {
                    let g = self.emit(id, 2, Op::BiasAddGrad, &[dy])?;
                    push(self, 2, g);
                }
            }
            Op::Dense => {
                if wants(0) {
                    let g = self.emit(id, 0, Op::DenseBackpropInput, &[dy, ins[1]])?;
                    push(self, 0, g);
                }
                if wants(1) {
                    let g = self.emit(id, 1, Op::DenseBackpropKernel, &[ins[0], dy])?;
                    push(self, 1, g);
                }
                if wants(2) {
                    let g = self.emit(id, 2, Op::BiasAddGrad, &[dy])?;
                    push(self, 2, g);
                }
            }
            Op::MaxPool(p) => {
                if wants(0) {
                    let g = self.emit(id, 0, Op::MaxPoolGrad(p.clone()), &[ins[0], dy])?;
                    push(self, 0, g);
                }
            }
            Op::AvgPool(p) => {
                if wants(0) {
                    let d = shape_of(ins[0]);
                    let op = Op::AvgPoolGrad(PoolGrad { pool: p.clone(), input_shape: [d[0], d[1], d[2]] });
                    let g = self.emit(id, 0, op, &[dy])?;
                    push(self, 0, g);
                }
            }
            Op::GlobalAvgPool => {
                if wants(0) {
                    let d = shape_of(ins[0]);
                    let g =
                        self.emit(id, 0, Op::GlobalAvgPoolGrad(GlobalPoolGrad { input_hw: [d[0], d[1]] }), &[dy])?;
                    push(self, 0, g);
                }
            }
            Op::BiasAdd => {
                if wants(0) {
                    push(self, 0, dy);
                }
                if wants(1) {
                    let g = self.emit(id, 1, Op::BiasAddGrad, &[dy])?;
                    push(self, 1, g);
                }
            }
            Op::Add => {
                for slot in 0..2 {
                    if wants(slot) {
                        push(self, slot, dy);
                    }
                }
            }
            Op::Mul => {
                for slot in 0..2 {
                    if wants(slot) {
                        let g = self.emit(id, slot, Op::Mul, &[dy, ins[1 - slot]])?;
                        push(self, slot, g);
                    }
                }
            }
            // The output decides the mask as the input would (y = clamp(x)), and the output is
            // kept for the next layer anyway: the input can die early.
            Op::Relu => from_output(self, Op::ReluGrad)?,
            Op::Relu6 => from_output(self, Op::Relu6Grad)?,
            Op::BatchNorm(bn) => {
                if wants(0) {
                    let g =
                        self.emit(id, 0, Op::BatchNormGradInput(bn.clone()), &[ins[0], ins[1], ins[3], ins[4], dy])?;
                    push(self, 0, g);
                }
                if wants(1) {
                    let g = self.emit(id, 1, Op::BatchNormGradGamma(bn.clone()), &[ins[0], ins[3], ins[4], dy])?;
                    push(self, 1, g);
                }
                if wants(2) {
                    let g = self.emit(id, 2, Op::BiasAddGrad, &[dy])?;
                    push(self, 2, g);
                }
            }
            Op::Dropout(d) => {
                // The same mask (a function of seed, step and element) scales the gradient.
                if wants(0) {
                    let g = self.emit(id, 0, Op::Dropout(d.clone()), &[dy])?;
                    push(self, 0, g);
                }
            }
            Op::Flatten | Op::Reshape(_) => {
                if wants(0) {
                    let shape = shape_of(ins[0]).iter().map(|&d| d as i64).collect();
                    let g = self.emit(id, 0, Op::Reshape(Reshape { shape }), &[dy])?;
                    push(self, 0, g);
                }
            }
            Op::Concat(c) => {
                let rank = node.shape.rank();
                let axis = per_example_axis(c.axis, rank).map_err(|e| self.err(id, e))?;
                let mut start = 0;
                for (slot, &input) in ins.iter().enumerate() {
                    let len = shape_of(input)[axis];
                    if wants(slot) {
                        let g = self.emit(id, slot, Op::Slice(Slice { axis: c.axis, start, len }), &[dy])?;
                        push(self, slot, g);
                    }
                    start += len;
                }
            }
            Op::Softmax => from_output(self, Op::SoftmaxGrad)?,
            Op::SoftmaxCrossEntropy(_) => {
                return Err(self.err(
                    id,
                    "a cross-entropy can only be differentiated as the root (the loss itself), not inside another computation"
                        .into(),
                ));
            }
            Op::Conv2dBackpropInput(_)
            | Op::Conv2dBackpropFilter(_)
            | Op::MaxPoolGrad(_)
            | Op::AvgPoolGrad(_)
            | Op::GlobalAvgPoolGrad(_)
            | Op::DenseBackpropInput
            | Op::DenseBackpropKernel
            | Op::BiasAddGrad
            | Op::ReluGrad
            | Op::Relu6Grad
            | Op::BatchNormGradInput(_)
            | Op::BatchNormGradGamma(_)
            | Op::SoftmaxGrad
            | Op::SoftmaxCrossEntropyGrad(_)
            | Op::Slice(_) => {
                let kind = node.op.kind();
                return Err(self.err(id, format!("differentiating a gradient op ({kind}) is not supported")));
            }
        }
        Ok(())
    }
}

/// Differentiates `root` with respect to each node of `wrt`.
///
/// If the root is a SoftmaxCrossEntropy (a scalar loss), the upstream gradient is 1. Otherwise the
/// new graph gets an Input `<root>/upstream` of the root's shape: the result is then the
/// vector-Jacobian product with that input.
pub fn differentiate(graph: &Graph, root: NodeId, wrt: &[NodeId]) -> Result<Gradients> {
    let mut b = Builder { forward: graph, graph: graph.clone(), contributions: vec![Vec::new(); graph.len()] };

    // Nodes on a path from some wrt node to the root.
    let ancestors = graph.ancestors(&[root]);
    let mut depends = vec![false; graph.len()];
    for &w in wrt {
        depends[w.index()] = true;
    }
    for (id, node) in graph.nodes() {
        if node.inputs.iter().any(|i| depends[i.index()]) {
            depends[id.index()] = true;
        }
    }
    let relevant: Vec<bool> = ancestors.iter().zip(&depends).map(|(a, d)| *a && *d).collect();

    let root_node = graph.node(root);
    let mut upstream = None;
    if relevant[root.index()] {
        match &root_node.op {
            Op::SoftmaxCrossEntropy(sce) => {
                let ins = root_node.inputs.clone();
                if relevant[ins[0].index()] {
                    let g = b.emit(root, 0, Op::SoftmaxCrossEntropyGrad(sce.clone()), &ins)?;
                    b.contributions[ins[0].index()].push(g);
                }
            }
            Op::Input(_)
            | Op::Parameter(_)
            | Op::Conv2d(_)
            | Op::MaxPool(_)
            | Op::AvgPool(_)
            | Op::GlobalAvgPool
            | Op::Dense
            | Op::BiasAdd
            | Op::Add
            | Op::Mul
            | Op::Relu
            | Op::Relu6
            | Op::BatchNorm(_)
            | Op::Dropout(_)
            | Op::Flatten
            | Op::Reshape(_)
            | Op::Concat(_)
            | Op::Softmax
            | Op::Conv2dBackpropInput(_)
            | Op::Conv2dBackpropFilter(_)
            | Op::MaxPoolGrad(_)
            | Op::AvgPoolGrad(_)
            | Op::GlobalAvgPoolGrad(_)
            | Op::DenseBackpropInput
            | Op::DenseBackpropKernel
            | Op::BiasAddGrad
            | Op::ReluGrad
            | Op::Relu6Grad
            | Op::BatchNormGradInput(_)
            | Op::BatchNormGradGamma(_)
            | Op::SoftmaxGrad
            | Op::SoftmaxCrossEntropyGrad(_)
            | Op::Slice(_) => {
                if !root_node.shape.batched {
                    return Err(
                        b.err(root, "can only differentiate a loss (SoftmaxCrossEntropy) or a batched value".into())
                    );
                }
                let input = Op::Input(Input { shape: root_node.shape.dims.clone(), dtype: DType::F32 });
                let u = b.graph.add(format!("{}/upstream", root_node.name), input, &[])?;
                upstream = Some(u);
                b.contributions[root.index()].push(u);
            }
        }
    }

    let mut grads = BTreeMap::new();
    let mut wanted = vec![false; graph.len()];
    for &w in wrt {
        wanted[w.index()] = true;
    }
    let order: Vec<NodeId> = graph.node_ids().collect();
    for &id in order.iter().rev() {
        if !relevant[id.index()] || (id == root && matches!(root_node.op, Op::SoftmaxCrossEntropy(_))) {
            continue;
        }
        let Some(dy) = b.total(id)? else { continue };
        if wanted[id.index()] {
            grads.insert(graph.node(id).name.clone(), dy);
        }
        b.backward(id, dy, &relevant)?;
    }
    let unconnected = wrt.iter().map(|&w| graph.node(w).name.clone()).filter(|n| !grads.contains_key(n)).collect();
    Ok(Gradients { graph: b.graph, root, upstream, grads, unconnected })
}

/// A classifier's training graph: its loss (added if absent, see
/// [`Graph::with_classifier_loss`]) differentiated with respect to every trainable parameter
/// and every f32 Input. The loss and the gradients are the graph's outputs.
pub fn training_graph(graph: &Graph, label_smoothing: f32) -> Result<Gradients> {
    let (g, loss) = graph.with_classifier_loss(label_smoothing)?;
    let mut wrt = g.trainable_parameters();
    wrt.extend(g.inputs().into_iter().filter(|&i| matches!(&g.node(i).op, Op::Input(inp) if inp.dtype == DType::F32)));
    let mut grads = differentiate(&g, loss, &wrt)?;
    let mut outputs = vec![loss];
    outputs.extend(grads.grads.values().copied());
    grads.graph.set_outputs(outputs);
    Ok(grads)
}

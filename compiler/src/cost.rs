//! Operation counts per node: FLOPs (a multiply-add counts 2) and parameter counts.
//!
//! These are the *algorithmic* counts of the IR, independent of any machine; the lowering's cost
//! model (tiles, padding, cycles) builds on them. Conventions: convolutions and dense layers
//! count 2 per multiply-add plus 1 per bias element; elementwise ops 1 per element; batch norm
//! 2 per element (scale and shift; the statistics of training mode add 3 more); pooling 1 per
//! window tap; softmax and cross-entropy 5 per logit; reshapes, concatenation and slicing 0.

use crate::graph::{Graph, NodeId, Op, Shape};

/// FLOPs of node `id` for a batch of `batch` examples.
pub fn flops(graph: &Graph, id: NodeId, batch: usize) -> u64 {
    // Counted in u128 and saturated, so a huge batch cannot wrap around.
    flops_wide(graph, id, batch).min(u64::MAX as u128) as u64
}

fn flops_wide(graph: &Graph, id: NodeId, batch: usize) -> u128 {
    let node = graph.node(id);
    let elems = |s: &Shape| s.numel() as u128 * if s.batched { batch as u128 } else { 1 };
    let shape_of = |slot: usize| &graph.node(node.inputs[slot]).shape;
    let out = elems(&node.shape);
    let macs_conv = |kernel: &[usize], out_elems: u128| out_elems * (kernel[0] * kernel[1] * kernel[2]) as u128;
    match &node.op {
        Op::Input(_) | Op::Parameter(_) => 0,
        Op::Conv2d(_) => {
            let bias = if node.inputs.len() > 2 { out } else { 0 };
            2 * macs_conv(&shape_of(1).dims, out) + bias
        }
        Op::Dense => {
            let k = &shape_of(1).dims;
            let bias = if node.inputs.len() > 2 { out } else { 0 };
            2 * out * k[0] as u128 + bias
        }
        Op::MaxPool(p) | Op::AvgPool(p) => out * (p.window[0] * p.window[1]) as u128,
        Op::GlobalAvgPool | Op::BiasAddGrad => elems(shape_of(0)),
        Op::BiasAdd | Op::Add | Op::Mul | Op::Relu | Op::Relu6 | Op::Dropout(_) => out,
        Op::ReluGrad | Op::Relu6Grad => out,
        Op::BatchNorm(_) => 2 * out,
        Op::BatchNormGradInput(_) => 7 * out,
        Op::BatchNormGradGamma(_) => 4 * elems(shape_of(0)),
        Op::Flatten | Op::Reshape(_) | Op::Concat(_) | Op::Slice(_) => 0,
        Op::Softmax | Op::SoftmaxGrad => 5 * out,
        Op::SoftmaxCrossEntropy(_) | Op::SoftmaxCrossEntropyGrad(_) => 5 * elems(shape_of(0)),
        Op::Conv2dBackpropInput(_) => 2 * macs_conv(&shape_of(1).dims, elems(shape_of(0))),
        Op::Conv2dBackpropFilter(b) => 2 * macs_conv(&b.kernel_shape, elems(shape_of(1))),
        Op::MaxPoolGrad(p) => elems(shape_of(1)) * (p.window[0] * p.window[1]) as u128,
        Op::AvgPoolGrad(p) => elems(shape_of(0)) * (p.pool.window[0] * p.pool.window[1]) as u128,
        Op::GlobalAvgPoolGrad(_) => out,
        Op::DenseBackpropInput => 2 * out * shape_of(1).dims[1] as u128,
        Op::DenseBackpropKernel => 2 * elems(shape_of(0)) * shape_of(1).dims.last().copied().unwrap_or(1) as u128,
    }
}

/// FLOPs of the whole graph (every node) for one example.
pub fn flops_per_example(graph: &Graph) -> u64 {
    graph.node_ids().fold(0u64, |acc, id| acc.saturating_add(flops(graph, id, 1)))
}

/// Trainable parameter values a layer owns (the Parameter nodes among its inputs).
pub fn layer_params(graph: &Graph, id: NodeId) -> usize {
    graph
        .node(id)
        .inputs
        .iter()
        .map(|&i| graph.node(i))
        .filter(|n| matches!(&n.op, Op::Parameter(p) if p.trainable))
        .map(|n| n.shape.numel())
        .sum()
}

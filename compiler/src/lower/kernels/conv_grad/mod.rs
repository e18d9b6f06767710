//! The two gradients of a convolution, as matmuls on the MXU: the input gradient
//! ([`input`], a transposed convolution through the forward kernel, by stride phase for
//! strided layers) and the filter gradient ([`filter`], `dyᵀ · x` per tap or over an im2col
//! matrix; depthwise on the VPU).

use crate::graph::{Graph, NodeId};

mod filter;
mod input;

pub(crate) use filter::filter;
pub(crate) use input::input;

/// The HBM scratch of an input gradient (`Conv2dBackpropInput` node `node`): the flipped,
/// transposed kernel (each stride phase's taps together).
pub(crate) fn input_scratch_bytes(graph: &Graph, node: NodeId) -> u64 {
    let w = &graph.node(graph.node(node).inputs[1]).shape.dims;
    w.iter().product::<usize>() as u64 * 4
}

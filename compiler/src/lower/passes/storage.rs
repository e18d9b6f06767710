//! The `storage` pass: the element type each tensor has in HBM. With bf16 activations (as a
//! TPU trains), every tensor a kernel writes that carries the batch — activations, the values
//! kept for the backward pass, activation gradients — is stored in bf16: rounded to nearest
//! even as it is stored, widened to f32 as it is loaded into VMEM, where all arithmetic stays
//! f32 (the MXU rounds its inputs to bf16 anyway). Inputs, parameters, optimizer state,
//! batch-norm statistics, the loss and weight gradients stay f32, and so does a tensor the
//! host reads back (a graph output, or the tensor a graph output is a view of).

use systolic_simulator::isa::DType;

use crate::graph::{Graph, NodeId};

/// Each node's element type in HBM (its owner's; f32 for nodes that own nothing).
pub(crate) fn dtypes(graph: &Graph, owner: &[Option<NodeId>], activations: DType) -> Vec<DType> {
    let mut read_back = vec![false; graph.len()];
    for &out in graph.outputs() {
        if let Some(o) = owner[out.index()] {
            read_back[o.index()] = true;
        }
    }
    let own: Vec<DType> = graph
        .nodes()
        .map(|(id, node)| {
            let activation = node.shape.batched && !node.op.is_leaf() && !read_back[id.index()];
            if activation { activations } else { DType::F32 }
        })
        .collect();
    graph.node_ids().map(|id| owner[id.index()].map_or(DType::F32, |o| own[o.index()])).collect()
}

/// The tensors stored in bf16, with their bytes, and the totals.
pub(crate) fn dump(
    graph: &Graph,
    owner: &[Option<NodeId>],
    dtypes: &[DType],
    bytes_f32: &dyn Fn(NodeId) -> u64,
) -> String {
    let (mut s, mut bf16, mut f32) = (String::new(), 0u64, 0u64);
    for id in graph.node_ids().filter(|&id| owner[id.index()] == Some(id)) {
        let bytes = bytes_f32(id);
        match dtypes[id.index()] {
            DType::Bf16 => {
                bf16 += bytes / 2;
                s += &format!("  bf16 {:>12} B  {}\n", bytes / 2, graph.node(id).name);
            }
            DType::F32 => f32 += bytes,
        }
    }
    format!("{} B in bf16 ({} B saved), {} B in f32\n{s}", bf16, bf16, f32)
}

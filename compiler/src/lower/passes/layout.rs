//! The `layout` pass: which tensor owns the HBM bytes of each node. Every materialised tensor
//! owns its own; views (reshapes, inference dropout) share their source's; labels are read as
//! their one-hot encoding, so the integer labels own nothing.

use std::collections::BTreeMap;

use crate::graph::{Graph, NodeId};
use crate::lower::kernel::{Kernel, Storage, rows_cols};

/// The owner of each node's bytes (None: not materialised).
pub(crate) fn owners(graph: &Graph, kernels: &[Kernel], one_hot: &BTreeMap<NodeId, NodeId>) -> Vec<Option<NodeId>> {
    let mut owner: Vec<Option<NodeId>> = vec![None; graph.len()];
    for (id, node) in graph.nodes() {
        if node.op.is_leaf() && !one_hot.contains_key(&id) {
            owner[id.index()] = Some(id);
        }
    }
    for k in kernels {
        let own = match k.main.storage() {
            Storage::New => k.output,
            Storage::View => owner[graph.node(k.output).inputs[0].index()].expect("views follow their source"),
            Storage::InPlace => continue,
        };
        owner[k.output.index()] = Some(own);
        for &a in &k.also {
            owner[a.index()] = Some(a);
        }
    }
    owner
}

/// Each kernel output's shape and 2-D layout, and what it is a view of.
pub(crate) fn dump(
    graph: &Graph,
    kernels: &[Kernel],
    owner: &[Option<NodeId>],
    shape_of: &dyn Fn(NodeId) -> Vec<usize>,
) -> String {
    let mut s = String::new();
    for k in kernels {
        for out in std::iter::once(k.output).chain(k.also.iter().copied()) {
            let o = owner[out.index()].expect("placed");
            let shape = shape_of(out);
            let (r, c) = rows_cols(&shape);
            let alias = if o == out { String::new() } else { format!("  (view of {})", graph.node(o).name) };
            s += &format!("{:<28} {:?} as {r} x {c} f32{alias}\n", graph.node(out).name, shape);
        }
    }
    s
}

//! What a reference run holds at its peak, from the graph's shapes, the batch and the
//! liveness [`super::run`] keeps — each computed value freed after its last use, fetched
//! values kept to the end — plus the workspace of the kernels that allocate one (gradient
//! partials summed in order, im2col panels per thread). Checked before anything is allocated,
//! so a batch that cannot fit is an error with the figure instead of an abort.

use systolic_simulator::host::{self, MemoryError, Need, format_bytes, largest_fitting};

use super::conv::{ConvGeom, images_per_partial};
use super::gemm::{TN_CHUNK_ROWS, row_block};
use crate::graph::{Graph, NodeId, Op};

/// A run's memory, in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Footprint {
    /// The bound leaves the run reads (inputs, parameters): the caller's tensors.
    pub bound: u64,
    /// Computed values and kernel workspace at the peak.
    pub peak: u64,
    /// The node evaluated at the peak.
    pub at: Option<NodeId>,
    /// The computed values live at the peak (the node's output among them), largest first,
    /// and the workspace of the node evaluated then (as `None`).
    pub live: Vec<(Option<NodeId>, u64)>,
}

fn bytes(graph: &Graph, id: NodeId, batch: usize) -> u64 {
    let elements = graph.node(id).shape.concrete(batch).iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
    elements.saturating_mul(4)
}

fn dims4(graph: &Graph, id: NodeId, batch: usize) -> [usize; 4] {
    let d = graph.node(id).shape.concrete(batch);
    [d[0], d[1], d[2], d[3]]
}

/// Bytes a node's kernel allocates beside its output while it runs.
fn workspace(graph: &Graph, id: NodeId, batch: usize) -> u64 {
    let node = graph.node(id);
    let threads = rayon::current_num_threads() as u64;
    // im2col panels: one block of rows per thread (none for depthwise and 1x1 convolutions).
    let panels = |g: &ConvGeom| {
        if g.is_depthwise() || g.is_pointwise() { 0 } else { threads * (row_block(g.depth()) * g.depth()) as u64 }
    };
    // Partial products summed in order: one per chunk of rows, each `len` floats.
    let partials = |rows: u64, chunk: u64, len: u64| rows.div_ceil(chunk).saturating_mul(len);
    let floats: u64 = match &node.op {
        Op::Conv2d(c) => {
            panels(&ConvGeom::new(c, dims4(graph, node.inputs[0], batch), dims4(graph, node.inputs[1], 1)))
        }
        Op::Conv2dBackpropInput(b) => {
            let [h, w, c] = b.input_shape;
            panels(&ConvGeom::new(&b.conv, [batch, h, w, c], dims4(graph, node.inputs[1], 1)))
        }
        Op::Conv2dBackpropFilter(b) => {
            let g = ConvGeom::new(&b.conv, dims4(graph, node.inputs[0], batch), b.kernel_shape);
            let len = (g.depth() * g.co) as u64;
            if g.is_pointwise() {
                let rows = (batch as u64).saturating_mul(g.out_pixels_per_image() as u64);
                partials(rows, TN_CHUNK_ROWS as u64, len)
            } else {
                partials(batch as u64, images_per_partial(batch) as u64, len).saturating_add(panels(&g))
            }
        }
        Op::DenseBackpropKernel => {
            let x = graph.node(node.inputs[0]).shape.concrete(batch);
            let din = *x.last().unwrap_or(&1);
            let rows = x.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64)) / din.max(1) as u64;
            let dout = *graph.node(node.inputs[1]).shape.dims.last().unwrap_or(&1);
            partials(rows, TN_CHUNK_ROWS as u64, (din * dout) as u64)
        }
        _ => 0,
    };
    floats.saturating_mul(4)
}

/// The footprint of fetching `fetch` at `batch`.
pub fn footprint(graph: &Graph, fetch: &[NodeId], batch: usize) -> Footprint {
    let needed = graph.ancestors(fetch);
    let mut fetched = vec![false; graph.len()];
    fetch.iter().for_each(|f| fetched[f.index()] = true);
    let mut last_use = vec![0usize; graph.len()];
    let mut bound = 0u64;
    for (id, node) in graph.nodes() {
        if !needed[id.index()] {
            continue;
        }
        if node.op.is_leaf() {
            bound = bound.saturating_add(bytes(graph, id, batch));
        }
        for &i in &node.inputs {
            last_use[i.index()] = id.index();
        }
    }
    let dies_at = |i: NodeId, id: NodeId| last_use[i.index()] == id.index() && !fetched[i.index()];
    let mut live = 0u64;
    let (mut peak, mut at) = (0u64, None);
    for (id, node) in graph.nodes() {
        if !needed[id.index()] || node.op.is_leaf() {
            continue;
        }
        let now = live.saturating_add(bytes(graph, id, batch)).saturating_add(workspace(graph, id, batch));
        if now > peak {
            (peak, at) = (now, Some(id));
        }
        live = live.saturating_add(bytes(graph, id, batch));
        for &i in &node.inputs {
            if dies_at(i, id) && !graph.node(i).op.is_leaf() {
                live = live.saturating_sub(bytes(graph, i, batch));
            }
        }
    }
    // The values live at the peak: computed before it and used at or after it (or fetched).
    let mut values = Vec::new();
    if let Some(at) = at {
        for (id, node) in graph.nodes() {
            if id.index() > at.index() {
                break;
            }
            let alive = fetched[id.index()] || last_use[id.index()] >= at.index();
            if needed[id.index()] && !node.op.is_leaf() && (alive || id == at) {
                values.push((Some(id), bytes(graph, id, batch)));
            }
        }
        values.push((None, workspace(graph, at, batch)));
        values.retain(|v| v.1 > 0);
        values.sort_by_key(|v| std::cmp::Reverse(v.1));
    }
    Footprint { bound, peak, at, live: values }
}

/// Whether the bound leaves are still to be allocated (a command that has not made its inputs
/// and parameters yet) or already are (then the host's available memory counts them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaves {
    ToAllocate,
    Allocated,
}

/// What a reference run needs at `batch`, as a [`Need`] naming its largest values.
pub fn need(graph: &Graph, fetch: &[NodeId], batch: usize, leaves: Leaves) -> Need {
    let f = footprint(graph, fetch, batch);
    let mut parts: Vec<(String, u64)> = f
        .live
        .iter()
        .take(3)
        .map(|&(id, b)| match id {
            Some(id) => (format!("'{}'", graph.node(id).name), b),
            None => (format!("workspace of '{}'", f.at.map_or("", |a| graph.node(a).name.as_str())), b),
        })
        .collect();
    let mut bytes = f.peak;
    if leaves == Leaves::ToAllocate {
        bytes = bytes.saturating_add(f.bound);
        parts.push(("inputs and parameters".into(), f.bound));
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    }
    let at = f.at.map(|a| format!(" (at node '{}')", graph.node(a).name)).unwrap_or_default();
    Need {
        what: format!("the CPU reference running '{}' at batch {batch}{at}", graph.name()),
        bytes,
        parts,
        lower: String::new(),
    }
}

/// Checks a reference run at `batch` against the host's memory budget; the error says the
/// largest batch that fits (or that the parameters alone do not).
pub fn check(graph: &Graph, fetch: &[NodeId], batch: usize, leaves: Leaves) -> Result<(), MemoryError> {
    let Err(mut e) = host::check(need(graph, fetch, batch, leaves)) else {
        return Ok(());
    };
    let limit = e.budget.bytes;
    let fits = |b: u64| need(graph, fetch, b as usize, leaves).bytes <= limit;
    e.need.lower = match largest_fitting(batch.saturating_sub(1) as u64, fits) {
        Some(b) => format!("lower the batch to at most {b}"),
        None => {
            let one = need(graph, fetch, 1, leaves);
            format!(
                "even a batch of 1 needs {}: the model is too large for this host's memory",
                format_bytes(one.bytes)
            )
        }
    };
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{RunOptions, run};
    use systolic_simulator::host::Budget;

    fn mlp() -> Graph {
        let mut g = Graph::new("mlp");
        let x = g.input("x", &[100]).unwrap();
        let h = g.dense("fc1", x, 50).unwrap();
        let h = g.relu("relu", h).unwrap();
        let y = g.dense("fc2", h, 10).unwrap();
        g.set_outputs(vec![y]);
        g
    }

    #[test]
    fn the_peak_follows_liveness() {
        let g = mlp();
        let f = footprint(&g, g.outputs(), 8);
        // Leaves: x (8x100) + fc1 kernel/bias (100x50 + 50) + fc2 (50x10 + 10), f32.
        assert_eq!(f.bound, 4 * (800 + 5050 + 510));
        // fc1's output (8x50) lives while relu makes its own: 2 x 400 floats; fc2's output
        // (8x10) is made while relu's is live: 480 floats.
        assert_eq!(f.peak, 4 * 800);
        assert_eq!(g.node(f.at.unwrap()).name, "relu");
        let f16 = footprint(&g, g.outputs(), 16);
        assert_eq!(f16.peak, 2 * f.peak, "values grow with the batch");
    }

    #[test]
    fn a_batch_over_the_budget_is_refused_with_the_batch_that_fits() {
        let g = mlp();
        let need8 = need(&g, g.outputs(), 8, Leaves::ToAllocate);
        assert_eq!(need8.bytes, 4 * (800 + 5050 + 510) + 4 * 800);
        let budget = Budget { bytes: need8.bytes, source: "test".into() };
        assert!(host::check_against(need8, budget.clone()).is_ok());
        let e = host::check_against(need(&g, g.outputs(), 9, Leaves::ToAllocate), budget).unwrap_err();
        assert!(e.to_string().contains("the CPU reference running 'mlp' at batch 9 (at node 'relu') needs"), "{e}");
        assert!(e.to_string().contains("'fc1'") && e.to_string().contains("inputs and parameters"), "{e}");
    }

    #[test]
    fn a_huge_batch_saturates_instead_of_overflowing() {
        let g = mlp();
        let f = footprint(&g, g.outputs(), usize::MAX / 2);
        assert_eq!(f.peak, u64::MAX);
    }

    #[test]
    fn the_estimate_covers_what_a_run_fetches() {
        // A fetched intermediate stays live to the end; a run of the graph agrees on values.
        let g = mlp();
        let fc1 = g.expect("fc1").unwrap();
        let fetch = [fc1, g.outputs()[0]];
        let f = footprint(&g, &fetch, 4);
        assert!(f.live.iter().any(|v| v.0 == Some(fc1)), "{f:?}");
        let mut bindings = g.init_parameters(1);
        bindings.insert("x".into(), crate::tensors::Tensor::zeros(vec![4, 100]));
        assert!(run(&g, &bindings, &fetch, RunOptions::default()).is_ok());
    }
}

//! The `collectives` pass: a data-parallel training step's gradient all-reduce. Gradients
//! join buckets in the order the backward pass finishes them; a bucket closes when it holds
//! [`crate::lower::Options::bucket_bytes`], and its all-reduce is issued right after the kernel
//! that made its last gradient — on the ICI, while the backward pass goes on — and the first
//! update that reads one of its gradients waits for it.

use systolic_simulator::isa::{Operation, Tile};

use crate::graph::{Graph, NodeId};
use crate::lower::kernel::{Kernel, Main, Place, Storage};
use crate::lower::options::Options;

/// One bucket's all-reduce: issued after kernel `after`, awaited by kernel `needed_by`
/// (indices into the kernels; `fragment_after` and `fragment_needed_by` the same as indices
/// into the tiled fragments, which views do not have).
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    pub after: usize,
    pub needed_by: usize,
    pub fragment_after: usize,
    pub fragment_needed_by: usize,
    pub gradients: Vec<NodeId>,
    pub op: Operation,
}

/// The buckets of a training step over `opts.replicas` replicas (none for one replica).
pub(crate) fn buckets(
    kernels: &[Kernel],
    owner: &[Option<NodeId>],
    places: &[Option<Place>],
    opts: &Options,
) -> Vec<Bucket> {
    if opts.replicas < 2 {
        return Vec::new();
    }
    // Views emit no fragment: the fragment of kernel k is the number of non-views before it.
    let mut fragment_of = Vec::with_capacity(kernels.len());
    let mut count = 0;
    for k in kernels {
        fragment_of.push(count);
        count += usize::from(k.main.storage() != Storage::View);
    }
    // The last fragment at or before kernel k.
    let fragment_at =
        |k: usize| if kernels[k].main.storage() == Storage::View { fragment_of[k] - 1 } else { fragment_of[k] };
    let tile = |g: NodeId| -> Tile { places[g.index()].as_ref().expect("gradients are placed").tile };
    // The kernel that finishes gradient `grad`.
    let made = |grad: NodeId| {
        let own = owner[grad.index()].unwrap_or(grad);
        kernels
            .iter()
            .rposition(|p| p.output == own || p.also.contains(&own) || p.nodes.contains(&grad))
            .expect("every gradient is made by a kernel")
    };
    // A sharded update's buckets are its kernels': each reduce-scatters its gradients to the
    // replica's gradient shard.
    let sharded: Vec<Bucket> = kernels
        .iter()
        .enumerate()
        .filter_map(|(k, kernel)| {
            let Main::ShardedUpdate(s) = &kernel.main else { return None };
            let after = s.grads.iter().map(|&g| made(g)).max().expect("a bucket holds a gradient");
            let op = Operation::Collective {
                kind: systolic_simulator::isa::CollectiveKind::ReduceScatter,
                reduction: opts.gradient_reduction,
                tiles: s.grads.iter().map(|&g| tile(g)).collect(),
                shard: Some(tile(s.grad_shard)),
                replicas: opts.replicas as u32,
            };
            Some(Bucket {
                after,
                needed_by: k,
                fragment_after: fragment_at(after),
                fragment_needed_by: fragment_of[k],
                gradients: s.grads.clone(),
                op,
            })
        })
        .collect();
    if !sharded.is_empty() {
        return sharded;
    }
    // Each update's gradient, the kernel that finishes it, and the update kernel.
    let mut grads: Vec<(usize, usize, NodeId)> = Vec::new();
    for (k, kernel) in kernels.iter().enumerate() {
        let Main::Update(u) = &kernel.main else { continue };
        grads.push((made(u.grad), k, u.grad));
    }
    grads.sort_by_key(|&(made, update, _)| (made, update));
    let mut out = Vec::new();
    let mut open: Vec<(usize, usize, NodeId)> = Vec::new();
    let mut bytes = 0;
    for (i, &(made, update, g)) in grads.iter().enumerate() {
        open.push((made, update, g));
        bytes += tile(g).bytes();
        // Close when full, or at the last gradient; never between two gradients one kernel makes.
        let next_made = grads.get(i + 1).map(|n| n.0);
        if (bytes >= opts.bucket_bytes && next_made != Some(made)) || next_made.is_none() {
            let op = Operation::Collective {
                kind: systolic_simulator::isa::CollectiveKind::AllReduce,
                reduction: opts.gradient_reduction,
                tiles: open.iter().map(|&(_, _, g)| tile(g)).collect(),
                shard: None,
                replicas: opts.replicas as u32,
            };
            let needed_by = open.iter().map(|&(_, u, _)| u).min().expect("a bucket holds a gradient");
            out.push(Bucket {
                after: made,
                needed_by,
                fragment_after: fragment_at(made),
                fragment_needed_by: fragment_of[needed_by],
                gradients: open.iter().map(|&(_, _, g)| g).collect(),
                op,
            });
            open.clear();
            bytes = 0;
        }
    }
    out
}

/// One line per bucket: when it is issued, its gradients and bytes.
pub(crate) fn dump(graph: &Graph, kernels: &[Kernel], buckets: &[Bucket]) -> String {
    let mut s = format!("{} gradient all-reduce buckets\n", buckets.len());
    for (i, b) in buckets.iter().enumerate() {
        let Operation::Collective { tiles, replicas, reduction, .. } = &b.op else { continue };
        let bytes: u64 = tiles.iter().map(|t| t.bytes()).sum();
        let names: Vec<&str> = b.gradients.iter().map(|&g| graph.node(g).name.as_str()).collect();
        s += &format!(
            "{i:>3}  {:>12} bytes over {replicas} replicas ({reduction:?}), after {}, before {}: [{}]\n",
            bytes,
            kernels[b.after].name,
            kernels[b.needed_by].name,
            names.join(", ")
        );
    }
    s
}

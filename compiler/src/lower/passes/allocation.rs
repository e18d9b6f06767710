//! The `allocation` pass: HBM addresses by liveness.
//!
//! Inputs and parameters live for the whole program. An activation lives from the kernel that
//! writes it to the last kernel that reads it (through views); graph outputs live to the end.
//! Addresses are assigned first-fit in kernel order, a kernel's output before its inputs are
//! released, so a kernel never overwrites what it reads. The peak is checked against the core's
//! HBM with the numbers a user needs to act on.

use std::collections::BTreeMap;

use systolic_simulator::Machine;
use systolic_simulator::isa::DType;

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::lower::kernel::Kernel;

const ALIGN: u64 = 512;

/// What the allocation needs of each tensor: who owns its bytes (`layout`), its shape and its
/// element type in HBM (`storage`).
#[derive(Clone, Copy)]
pub(crate) struct Tensors<'a> {
    pub owner: &'a [Option<NodeId>],
    pub shape_of: &'a dyn Fn(NodeId) -> Vec<usize>,
    pub dtype_of: &'a dyn Fn(NodeId) -> DType,
    /// How activations are stored (for the advice when they do not fit).
    pub activations: DType,
}

/// HBM addresses of every storage owner (leaves and non-view kernel outputs), and the peak.
pub(crate) struct Plan {
    pub offsets: Vec<Option<u64>>,
    /// Per kernel: HBM scratch for intermediates that are not graph tensors (an input
    /// gradient's flipped kernel), live only during the kernel.
    pub scratch: Vec<Option<u64>>,
    /// Per kernel with `stats_for`: where its per-channel sums go (`3 × C`: the shift, Σ, Σ²),
    /// kept with the persistent tensors (a few KiB each).
    pub stats: Vec<Option<u64>>,
    pub peak: u64,
    pub dump: String,
}

/// First-fit allocation over a growing region.
#[derive(Default)]
struct Heap {
    /// Free blocks: offset -> size.
    free: BTreeMap<u64, u64>,
    top: u64,
}

impl Heap {
    fn alloc(&mut self, size: u64) -> u64 {
        let size = size.div_ceil(ALIGN) * ALIGN;
        if let Some((&at, &len)) = self.free.iter().find(|&(_, &len)| len >= size) {
            self.free.remove(&at);
            if len > size {
                self.free.insert(at + size, len - size);
            }
            return at;
        }
        let at = self.top;
        self.top += size;
        at
    }

    fn release(&mut self, at: u64, size: u64) {
        let size = size.div_ceil(ALIGN) * ALIGN;
        let (mut start, mut len) = (at, size);
        if let Some((&prev, &plen)) = self.free.range(..at).next_back()
            && prev + plen == at
        {
            self.free.remove(&prev);
            start = prev;
            len += plen;
        }
        if let Some(&next_len) = self.free.get(&(at + size)) {
            self.free.remove(&(at + size));
            len += next_len;
        }
        if start + len == self.top {
            self.top = start;
        } else {
            self.free.insert(start, len);
        }
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

pub(crate) fn plan(
    graph: &Graph,
    kernels: &[Kernel],
    tensors: &Tensors,
    machine: &Machine,
    extra_leaves: &[NodeId],
    scratch_bytes: &dyn Fn(&Kernel) -> u64,
) -> Result<Plan> {
    let Tensors { owner, shape_of, dtype_of, .. } = *tensors;
    let bytes = |id: NodeId| shape_of(id).iter().product::<usize>().max(1) as u64 * dtype_of(id).size();
    let mut needed = graph.ancestors(graph.outputs());
    for &leaf in extra_leaves {
        needed[leaf.index()] = true;
    }
    let mut offsets: Vec<Option<u64>> = vec![None; graph.len()];
    let mut heap = Heap::default();
    let mut dump = String::from("persistent (inputs and parameters):\n");
    let mut persistent = 0u64;
    for (id, node) in graph.nodes() {
        if node.op.is_leaf() && needed[id.index()] && owner[id.index()] == Some(id) {
            let at = heap.alloc(bytes(id));
            offsets[id.index()] = Some(at);
            persistent += bytes(id);
            dump += &format!("  {:#012x} {:>12} B  {}\n", at, bytes(id), node.name);
        }
    }
    let mut stats = vec![None; kernels.len()];
    for (k, kernel) in kernels.iter().enumerate().filter(|(_, k)| k.stats_for.is_some()) {
        let channels = *shape_of(kernel.output).last().expect("a convolution output has channels") as u64;
        let at = heap.alloc(3 * channels * 4);
        stats[k] = Some(at);
        persistent += 3 * channels * 4;
        dump += &format!("  {:#012x} {:>12} B  (channel sums of {})\n", at, 3 * channels * 4, kernel.name);
    }
    // Last kernel reading each storage owner.
    let mut last_use = vec![0usize; graph.len()];
    for (k, kernel) in kernels.iter().enumerate() {
        for input in kernel.inputs(graph) {
            if let Some(o) = owner[input.index()] {
                last_use[o.index()] = last_use[o.index()].max(k);
            }
        }
    }
    for &out in graph.outputs() {
        if let Some(o) = owner[out.index()] {
            last_use[o.index()] = usize::MAX;
        }
    }
    dump += "activations (address, bytes, name, live kernels):\n";
    let mut peak = heap.top;
    let mut scratch = vec![None; kernels.len()];
    let mut live_activations = 0u64;
    let mut peak_activations = 0u64;
    for (k, kernel) in kernels.iter().enumerate() {
        let outs = std::iter::once(kernel.output).chain(kernel.also.iter().copied());
        for out in outs.filter(|&o| kernel.allocates() && owner[o.index()] == Some(o)) {
            let at = heap.alloc(bytes(out));
            offsets[out.index()] = Some(at);
            live_activations += bytes(out);
            peak_activations = peak_activations.max(live_activations);
            peak = peak.max(heap.top);
            let until =
                if last_use[out.index()] == usize::MAX { "end".to_string() } else { last_use[out.index()].to_string() };
            dump += &format!("  {:#012x} {:>12} B  {:<28} {k}..={until}\n", at, bytes(out), graph.node(out).name);
            if last_use[out.index()] < k {
                // Never read: release at once (kept for the kernel itself).
                last_use[out.index()] = k;
            }
        }
        let need = scratch_bytes(kernel);
        if need > 0 {
            let at = heap.alloc(need);
            scratch[k] = Some(at);
            peak = peak.max(heap.top);
            dump += &format!("  {:#012x} {:>12} B  (scratch of {}) {k}\n", at, need, kernel.name);
            heap.release(at, need);
        }
        // Release what dies here.
        for (id, node) in graph.nodes() {
            if owner[id.index()] == Some(id)
                && !node.op.is_leaf()
                && last_use[id.index()] == k
                && let Some(at) = offsets[id.index()]
            {
                heap.release(at, bytes(id));
                live_activations -= bytes(id);
            }
        }
    }
    let capacity = machine.core.hbm.bytes;
    if peak > capacity {
        return Err(Error::Graph {
            graph: graph.name().to_string(),
            reason: format!(
                "needs {} of HBM per core ({} of inputs and parameters, {} of live activations at the peak); \
                 {} cores have {}: lower the batch{} or add cores",
                gib(peak),
                gib(persistent),
                gib(peak_activations),
                machine.name,
                gib(capacity),
                if tensors.activations == DType::F32 { ", store activations in bf16 (--activations bf16)" } else { "" }
            ),
        });
    }
    dump += &format!("peak {} B ({}) of {} per core\n", peak, gib(peak), gib(capacity));
    Ok(Plan { offsets, scratch, stats, peak, dump })
}

//! The emitter layer: one kernel's instruction buffer, the waits and dependencies between its
//! instructions, its VMEM, and the accounting behind the compiler's cost estimate and report.
//!
//! Every kernel streams its data through VMEM in blocks, with three of each block buffer so the
//! next block's DMA and the previous block's store overlap this block's MXU and VPU work.
//! Dependencies name exactly what must finish first (the DMA filling a buffer, the matmuls
//! reading it before it is refilled); a barrier opens and closes each kernel.

mod vmem;

use std::collections::BTreeMap;

use systolic_simulator::Machine;
use systolic_simulator::config::MxuTiming;
use systolic_simulator::isa::*;
use systolic_simulator::mxu::{passes, scalesim_cycles};
use systolic_simulator::timing::{dma_bytes, vpu_cycles};

pub(crate) use vmem::{BUFFERS, TARGET_ROWS, Vmem, WEIGHT_BUDGET};

use crate::cost;
use crate::error::Error;
use crate::graph::{Graph, NodeId};
use crate::lower::kernel::{Kernel, KernelReport, Place};
use crate::lower::options::Options;
use crate::optimizer::Optimizer;

/// Per-kernel accounting for the report.
#[derive(Default)]
struct Account {
    mxu_passes: u64,
    padded_macs: u64,
    /// Multiply-adds of the PEs the passes' operands occupy (`Σ m · k · n` per pass).
    mapped_macs: u64,
    /// Passes per weight tile: the bf16 products of the precision.
    products: u64,
    /// Streamed rows per MXU (the MXU estimate).
    mxu_stream: BTreeMap<u8, u64>,
    hbm_bytes: u64,
    dma_bytes: u64,
    vpu_cycles: u64,
}

/// What the training step adds to the kernels' view of the graph.
#[derive(Default)]
pub(crate) struct Extras {
    /// Integer labels -> the one-hot input read instead.
    pub one_hot: BTreeMap<NodeId, NodeId>,
    pub optimizer: Option<Optimizer>,
    /// The shared state (Adam's powers, the dropout step).
    pub state: Vec<NodeId>,
    pub dropout_step: Option<NodeId>,
    /// Batch norms whose per-channel sums a convolution's epilogue wrote: where (HBM).
    pub stats: BTreeMap<NodeId, u64>,
}

/// What every kernel's emission reads: the graph, the target, where each tensor lives, and what
/// the training step adds.
pub(crate) struct Context<'a> {
    pub graph: &'a Graph,
    pub opts: &'a Options,
    pub places: &'a [Option<Place>],
    pub extras: &'a Extras,
}

/// What a kernel says of itself once emitted; the dispatcher adds the accounting.
pub(crate) struct Emitted {
    /// How the kernel was lowered (conv strategy, block sizes, unit).
    pub strategy: String,
    /// The matmul shape after padding to the array (or the shape of the VPU work).
    pub padded: String,
    /// Multiply-adds the graph asks for (0 for VPU-only kernels).
    pub useful_macs: u64,
}

impl Emitted {
    pub(crate) fn new(strategy: impl Into<String>, padded: impl Into<String>, useful_macs: u64) -> Emitted {
        Emitted { strategy: strategy.into(), padded: padded.into(), useful_macs }
    }
}

/// One kernel's instructions, numbered from its opening barrier (instruction 0) to its
/// closing one (the last), and its report; the scheduling pass joins fragments into a program.
pub(crate) struct Fragment {
    pub program: Program,
    pub report: KernelReport,
}

/// Emits one kernel: an instruction buffer that opens with a barrier, tracks the last
/// instruction on each unit (the closing barrier waits for them) and accounts for the work.
pub(crate) struct Emitter<'a> {
    pub extras: &'a Extras,
    /// The kernel's HBM scratch (see `allocation::Plan::scratch`).
    pub scratch: Option<u64>,
    /// Where the kernel writes per-channel sums for a batch norm (`allocation::Plan::stats`).
    pub stats_out: Option<u64>,
    pub m: &'a Machine,
    pub opts: &'a Options,
    pub graph: &'a Graph,
    places: &'a [Option<Place>],
    program: Program,
    start: u32,
    last_on_unit: BTreeMap<Unit, u32>,
    account: Account,
}

impl<'a> Emitter<'a> {
    /// An emitter for one kernel, its opening barrier pushed.
    pub(crate) fn new(cx: &Context<'a>, name: &str, scratch: Option<u64>, stats_out: Option<u64>) -> Emitter<'a> {
        let mut program = Program::new(name);
        let start = program.push(Operation::Barrier, &[]);
        Emitter {
            extras: cx.extras,
            scratch,
            stats_out,
            m: &cx.opts.machine,
            opts: cx.opts,
            graph: cx.graph,
            places: cx.places,
            program,
            start,
            last_on_unit: BTreeMap::new(),
            account: Account::default(),
        }
    }

    pub(crate) fn place(&self, id: NodeId) -> &'a Place {
        self.places[id.index()].as_ref().expect("every tensor a kernel touches is placed")
    }

    /// The kernel's VMEM, all of it free.
    pub(crate) fn vmem(&self) -> Vmem {
        Vmem::new(self.m.core.vmem_bytes)
    }

    /// Makes the rest of the kernel wait for `ids` (work that prepares its operands).
    pub(crate) fn wait_for(&mut self, ids: &[u32]) {
        if ids.is_empty() {
            return;
        }
        self.start = self.program.push(Operation::Barrier, ids);
    }

    /// Makes the rest of the kernel wait for everything emitted so far: a kernel that runs
    /// in parts reusing the same VMEM (the stride phases of an input gradient) fences between
    /// them.
    pub(crate) fn fence(&mut self) {
        let ids: Vec<u32> = self.last_on_unit.values().copied().collect();
        self.wait_for(&ids);
    }

    /// `first`, or a barrier on it and `also` (instructions the next user must wait for too).
    pub(crate) fn after_all(&mut self, first: u32, also: &[u32]) -> u32 {
        if also.is_empty() {
            return first;
        }
        let mut deps = also.to_vec();
        deps.push(first);
        self.push(Operation::Barrier, &deps)
    }

    /// Appends an instruction; with no dependencies it waits for the kernel's start.
    pub(crate) fn push(&mut self, op: Operation, deps: &[u32]) -> u32 {
        let mut deps: Vec<u32> = deps.to_vec();
        deps.sort_unstable();
        deps.dedup();
        if deps.is_empty() {
            deps.push(self.start);
        }
        // Engines are numbered by role (0 in, 1 weights, 2 out); fold them onto the core's.
        let op = match op {
            Operation::Dma { engine, src, dst, repeat } => {
                Operation::Dma { engine: engine % self.m.core.dma.engines as u8, src, dst, repeat }
            }
            other => other,
        };
        self.count(&op);
        let unit = op.unit();
        let id = self.program.push(op, &deps);
        self.last_on_unit.insert(unit, id);
        id
    }

    fn count(&mut self, op: &Operation) {
        let core = &self.m.core;
        match op {
            Operation::Dma { src, dst, repeat, .. } => {
                let bytes = dma_bytes(src, dst, *repeat);
                self.account.hbm_bytes += bytes.port;
                self.account.dma_bytes += bytes.moved;
            }
            Operation::MatMul { mxu, lhs, rhs, precision, .. } => {
                let (m, k, n) = (lhs.rows as usize, lhs.cols as usize, rhs.cols as usize);
                let ps = passes(m, k, n, core.mxu.rows, core.mxu.cols, *precision);
                self.account.mxu_passes += ps.len() as u64;
                self.account.padded_macs += (ps.len() * m * core.mxu.rows * core.mxu.cols) as u64;
                self.account.mapped_macs += ps.iter().map(|p| (p.m * p.k * p.n) as u64).sum::<u64>();
                self.account.products = precision.passes().len() as u64;
                *self.account.mxu_stream.entry(*mxu).or_default() += match core.mxu.timing {
                    // Passes pipeline: each costs its stream or its weight load, whichever is longer.
                    MxuTiming::Pipelined => ps.iter().map(|p| p.m.max(p.k) as u64).sum::<u64>(),
                    // Folds do not overlap: each loads, streams and drains in full.
                    MxuTiming::Scalesim => scalesim_cycles(m, k, n, core.mxu.rows, core.mxu.cols, *precision) + 1,
                };
            }
            // The timing engine's own vector-unit cost.
            op if op.unit() == Unit::Vpu => self.account.vpu_cycles += vpu_cycles(self.m, op),
            _ => {}
        }
    }

    /// Closes the kernel with a barrier on the last instruction of every unit and reports it:
    /// the accounting, the kernel's own words (`emitted`) and its instructions (after the
    /// opening barrier, through the closing one).
    pub(crate) fn finish(mut self, kernel: &Kernel, emitted: Emitted) -> Fragment {
        let mut deps: Vec<u32> = self.last_on_unit.values().copied().collect();
        deps.sort_unstable();
        if deps.is_empty() {
            deps.push(self.start);
        }
        self.program.push(Operation::Barrier, &deps);
        let a = &self.account;
        let batch = self.opts.batch;
        let flops = kernel.nodes.iter().map(|&n| cost::flops(self.graph, n, batch)).sum();
        let mxu_cycles = a.mxu_stream.values().copied().max().unwrap_or(0);
        let dma_cycles = (a.dma_bytes as f64 / self.m.core.hbm.bytes_per_cycle).ceil() as u64;
        let estimate = mxu_cycles.max(dma_cycles).max(a.vpu_cycles) + self.m.core.dma.latency_cycles;
        let useful_macs = emitted.useful_macs;
        let report = KernelReport {
            name: kernel.name.clone(),
            ops: kernel.ops(self.graph),
            strategy: emitted.strategy,
            padded: emitted.padded,
            mxu_passes: a.mxu_passes,
            flops,
            useful_macs,
            padded_macs: a.padded_macs,
            // Both per bf16 product, so neither depends on the precision.
            padding_waste: if a.mapped_macs > 0 {
                1.0 - (useful_macs * a.products.max(1)) as f64 / a.mapped_macs as f64
            } else {
                0.0
            },
            array_fill: if a.padded_macs > 0 { a.mapped_macs as f64 / a.padded_macs as f64 } else { 0.0 },
            mxu_cycles,
            hbm_bytes: a.hbm_bytes,
            dma_cycles,
            vpu_cycles: a.vpu_cycles,
            estimate_cycles: estimate,
            instructions: 1..self.program.len(),
        };
        Fragment { program: self.program, report }
    }

    pub(crate) fn unsupported(&self, node: NodeId, why: String) -> Error {
        let n = self.graph.node(node);
        Error::Node {
            node: n.name.clone(),
            op: n.op.kind(),
            reason: format!("the lowering cannot place this op: {why}"),
        }
    }

    /// The kernel cannot be placed: even its smallest blocks overflow VMEM.
    pub(crate) fn vmem_error(&self, kernel: &Kernel, what: &str) -> Error {
        let ops = kernel.ops(self.graph);
        Error::Node {
            node: kernel.name.clone(),
            op: self.graph.node(kernel.nodes.first().copied().unwrap_or(kernel.output)).op.kind(),
            reason: format!(
                "the lowering cannot place this kernel ({ops}): its {what} do not fit the core's {} bytes of \
                 VMEM (core.vmem_bytes) even in the smallest blocks; use a machine with more VMEM",
                self.m.core.vmem_bytes
            ),
        }
    }
}

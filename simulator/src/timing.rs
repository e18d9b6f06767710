//! The cycle-level timing engine (see `docs/timing.md`).
//!
//! Event-driven list scheduling: every unit (each DMA engine, each MXU, the VPU, the scalar
//! unit, the host link) runs its own instructions in program order, concurrently with the
//! others; an instruction starts when its unit is free and its dependencies have finished.
//! Among the instructions that could start, the earliest goes first, so shared resources — the
//! HBM port all DMA engines use — are granted in time order.
//!
//! Costs come from mechanisms:
//! - DMA: `latency + bytes / bytes_per_cycle`; the data phase holds the HBM port when either side
//!   is HBM, so concurrent transfers share its bandwidth.
//! - MXU: weight load, fill, stream and drain of every pass ([`crate::mxu::Timeline`], in the
//!   machine's `core.mxu.timing` model); a matmul that reads what an earlier one on the same MXU
//!   still writes waits for it (interlock).
//! - VPU: tiles occupy `ceil(rows / sublanes) · ceil(cols / lanes)` vector registers; each
//!   register-wide operation takes `1 / alus` cycles.
//! - Host link: bytes over the chip's PCIe bandwidth, shared by its cores.
//! - ICI: collectives pause the core's run ([`CoreTiming`]); the slice times them on its
//!   network ([`crate::pod::slice`]) and the core goes on from their end.

use std::collections::VecDeque;

use serde::Serialize;

use crate::config::Machine;
use crate::error::{Error, Result};
use crate::isa::*;
use crate::mxu::{Timeline, pass_iter};

/// Busy time of one unit.
#[derive(Clone, Debug, Serialize)]
pub struct UnitReport {
    pub unit: String,
    pub instructions: u64,
    pub busy_cycles: u64,
    pub utilization: f64,
}

/// The result of a timed run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub cycles: u64,
    pub seconds: f64,
    pub instructions: u64,
    pub units: Vec<UnitReport>,
    /// Multiply-accumulates the matmuls asked for (their `m·k·n`, once per matmul).
    pub useful_macs: u64,
    /// Useful MACs over what every MXU could have done in `cycles`.
    pub mxu_utilization: f64,
    pub hbm_bytes: u64,
    pub hbm_bytes_per_second: f64,
    /// Achieved over peak HBM bandwidth.
    pub hbm_utilization: f64,
}

/// When one instruction ran (for traces).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Span {
    pub instr: u32,
    pub unit: Unit,
    pub start: u64,
    pub end: u64,
}

/// A timed run: the report, each instruction's finish cycle, and optionally every span.
#[derive(Clone, Debug)]
pub struct Timing {
    pub report: Report,
    pub finish: Vec<u64>,
    pub spans: Vec<Span>,
}

/// Vector registers a tile occupies: rows fill sublanes, columns fill lanes.
fn vregs(machine: &Machine, t: &Tile) -> u64 {
    let v = &machine.core.vpu;
    (t.rows as u64).div_ceil(v.sublanes as u64) * (t.cols as u64).div_ceil(v.lanes as u64)
}

/// What a DMA moves (the compiler's estimate counts the same).
pub struct DmaBytes {
    /// Bytes crossing the HBM port: read, written, or both for an HBM-to-HBM copy, each side in
    /// its own element type (a converting DMA moves bf16 on the HBM side).
    pub port: u64,
    /// Bytes the transfer's duration follows: the port's, or for a VMEM-to-VMEM copy its own
    /// (moved at the same rate; assumption: no public figure).
    pub moved: u64,
}

/// The bytes of a DMA from `src` to `dst`, repeated as `repeat` says.
pub fn dma_bytes(src: &Tile, dst: &Tile, repeat: Option<Repeat>) -> DmaBytes {
    let count = repeat.map_or(1, |r| r.count as u64);
    let side = |t: &Tile| if t.space == Space::Hbm { t.bytes() * count } else { 0 };
    let port = side(src) + side(dst);
    DmaBytes { port, moved: if port > 0 { port } else { src.bytes().max(dst.bytes()) * count } }
}

/// Cycles of a vector-unit instruction (the compiler's estimate uses the same model).
pub fn vpu_cycles(machine: &Machine, op: &Operation) -> u64 {
    let alus = machine.core.vpu.alus as u64;
    let ops = |n: u64| n.div_ceil(alus).max(1);
    match op {
        Operation::Unary { dst, .. } | Operation::Binary { dst, .. } | Operation::Fill { dst, .. } => {
            ops(vregs(machine, dst))
        }
        // A multiply and an add per register.
        Operation::MulAdd { acc, .. } => ops(2 * vregs(machine, acc)),
        Operation::Reduce { axis, src, .. } => {
            // Combine registers elementwise, then reduce across sublanes or lanes (log steps).
            let across = match axis {
                Axis::Rows => machine.core.vpu.sublanes,
                Axis::Cols => machine.core.vpu.lanes,
            };
            ops(vregs(machine, src)) + (across as u64).next_power_of_two().trailing_zeros() as u64
        }
        Operation::Pool { shape, dst, .. } => ops(vregs(machine, dst) * (shape.window[0] * shape.window[1]) as u64),
        // Zero the result, then per window tap: a compare and select (max) or a scaled add
        // (average) of a register of dy into the result.
        Operation::PoolGrad { shape, dy, dst, x, .. } => {
            let per_tap = if x.is_some() { 2 } else { 1 };
            ops(vregs(machine, dst) + per_tap * vregs(machine, dy) * (shape.window[0] * shape.window[1]) as u64)
        }
        // One register through the transpose unit per cycle.
        Operation::Transpose { src, .. } => vregs(machine, src).max(1),
        // The counter hash in 32-bit lane operations (see `rng::DROPOUT_LANE_OPS`).
        Operation::Dropout { dst, .. } => ops(vregs(machine, dst) * crate::rng::DROPOUT_LANE_OPS),
        _ => 1,
    }
}

#[derive(Clone)]
struct Engine<'a> {
    machine: &'a Machine,
    program: &'a Program,
    finish: Vec<u64>,
    unit_free: Vec<u64>,
    busy: Vec<u64>,
    count: Vec<u64>,
    timelines: Vec<Timeline>,
    /// Matmuls per MXU that may still be writing: (out tile, end) for the interlock.
    recent: Vec<VecDeque<(Tile, u64)>>,
    hbm_free: u64,
    hbm_bytes: u64,
    useful_macs: u64,
    spans: Option<Vec<Span>>,
}

impl Engine<'_> {
    fn ready(&self, i: usize) -> Option<u64> {
        let mut t = 0;
        for &d in &self.program.instrs[i].deps {
            let f = self.finish[d as usize];
            if f == u64::MAX {
                return None;
            }
            t = t.max(f);
        }
        Some(t)
    }

    /// Runs instruction `i` on unit slot `u` no earlier than `at`; returns (start, end).
    fn run(&mut self, i: usize, u: usize, at: u64) -> Result<(u64, u64)> {
        let m = self.machine;
        let op = &self.program.instrs[i].op;
        let (start, end) = match *op {
            Operation::Dma { src, dst, repeat, .. } => {
                let DmaBytes { port: port_bytes, moved } = dma_bytes(&src, &dst, repeat);
                let data_ready = at + m.core.dma.latency_cycles;
                let data_start = if port_bytes > 0 { data_ready.max(self.hbm_free) } else { data_ready };
                let end = data_start + (moved as f64 / m.core.hbm.bytes_per_cycle).ceil() as u64;
                if port_bytes > 0 {
                    self.hbm_free = end;
                    self.hbm_bytes += port_bytes;
                }
                (at, end)
            }
            Operation::MatMul { mxu, lhs, rhs, out, precision, .. } => {
                let x = mxu as usize;
                // Interlock: wait for earlier matmuls on this MXU whose results this one reads.
                // Entries retired before the next weight load can begin can never delay anything.
                let horizon = self.timelines[x].next_load(0);
                self.recent[x].retain(|&(_, end)| end > horizon);
                let mut ready = at;
                for &(t, end) in &self.recent[x] {
                    if crate::isa::overlaps(&t, &lhs) || crate::isa::overlaps(&t, &rhs) {
                        ready = ready.max(end);
                    }
                }
                let (mm, kk, nn) = (lhs.rows as usize, lhs.cols as usize, rhs.cols as usize);
                let ps = pass_iter(mm, kk, nn, m.core.mxu.rows, m.core.mxu.cols, precision);
                let first = self.timelines[x].next_load(ready);
                let end = self.timelines[x].schedule_all(ps, ready);
                self.useful_macs += (mm * kk * nn) as u64;
                self.recent[x].push_back((out, end));
                (first, end)
            }
            Operation::Unary { .. }
            | Operation::Binary { .. }
            | Operation::MulAdd { .. }
            | Operation::Fill { .. }
            | Operation::Reduce { .. }
            | Operation::Pool { .. }
            | Operation::PoolGrad { .. }
            | Operation::Transpose { .. }
            | Operation::Dropout { .. } => (at, at + vpu_cycles(m, op)),
            Operation::Barrier => (at, at + 1),
            // Timed by whoever runs the core ([`CoreTiming::advance`] pauses before them).
            Operation::Collective { .. } => unreachable!("collectives are completed, not run"),
            Operation::Infeed { dst: t } | Operation::Outfeed { src: t } => {
                let per_core = m.host.pcie_bytes_per_second / m.chip.cores as f64;
                let cycles = (t.bytes() as f64 / per_core * m.core.clock_hz).ceil() as u64;
                (at, at + cycles)
            }
        };
        if !matches!(op, Operation::MatMul { .. }) {
            self.busy[u] += end - start;
        }
        self.unit_free[u] = if matches!(op, Operation::MatMul { .. }) { start } else { end };
        self.count[u] += 1;
        Ok((start, end))
    }
}

/// Simulates a program's timing on one core of `machine` (validating it first).
pub fn simulate(machine: &Machine, program: &Program, keep_spans: bool) -> Result<Timing> {
    program.validate(machine)?;
    simulate_unchecked(machine, program, keep_spans)
}

/// As [`simulate`], for programs already validated. A collective over more than one replica
/// is an error here: only a slice ([`crate::pod::slice`]) has the other replicas.
pub fn simulate_unchecked(machine: &Machine, program: &Program, keep_spans: bool) -> Result<Timing> {
    let mut core = CoreTiming::new(machine, program, keep_spans)?;
    while let Some((i, at)) = core.advance()? {
        if let Operation::Collective { kind, replicas, .. } = &program.instrs[i].op
            && *replicas > 1
        {
            return Err(Error::Program {
                index: i,
                op: program.instrs[i].op.name(),
                reason: format!(
                    "{} over {replicas} replicas needs the other replicas: simulate the slice (systolic simulate --machine with more cores)",
                    kind.name()
                ),
            });
        }
        core.complete(at);
    }
    Ok(core.finish())
}

/// One core's timing run that pauses at every collective, so that a slice can time the
/// collective over all its members before the core goes on ([`crate::pod::slice`]).
#[derive(Clone)]
pub struct CoreTiming<'a> {
    e: Engine<'a>,
    unit_list: Vec<Unit>,
    queues: Vec<Vec<u32>>,
    heads: Vec<usize>,
    /// When each unit's next instruction has all its inputs (finish times never change once
    /// known, so this is computed once per instruction).
    head_ready: Vec<Option<u64>>,
    scheduled: usize,
    /// The collective waiting for its end: (instruction, unit slot, cycle it may start).
    pending: Option<(usize, usize, u64)>,
}

impl<'a> CoreTiming<'a> {
    /// A run of `program` (already validated) on one core of `machine`.
    pub fn new(machine: &'a Machine, program: &'a Program, keep_spans: bool) -> Result<CoreTiming<'a>> {
        let n = program.instrs.len();
        // Units in a fixed order: DMA engines, MXUs, VPU, scalar, ICI, host.
        let mut unit_list: Vec<Unit> = (0..machine.core.dma.engines as u8).map(Unit::Dma).collect();
        unit_list.extend((0..machine.core.mxu.count as u8).map(Unit::Mxu));
        unit_list.extend([Unit::Vpu, Unit::Scalar, Unit::Ici, Unit::Host]);
        let (engines, mxus) = (machine.core.dma.engines, machine.core.mxu.count);
        let slot = |unit: Unit| match unit {
            Unit::Dma(e) => ((e as usize) < engines).then_some(e as usize),
            Unit::Mxu(x) => ((x as usize) < mxus).then_some(engines + x as usize),
            Unit::Vpu => Some(engines + mxus),
            Unit::Scalar => Some(engines + mxus + 1),
            Unit::Ici => Some(engines + mxus + 2),
            Unit::Host => Some(engines + mxus + 3),
        };
        let mut queues: Vec<Vec<u32>> = vec![Vec::new(); unit_list.len()];
        for (i, instr) in program.instrs.iter().enumerate() {
            let u = slot(instr.op.unit()).ok_or_else(|| Error::Program {
                index: i,
                op: instr.op.name(),
                reason: format!("unit {} does not exist on {}", instr.op.unit(), machine.name),
            })?;
            queues[u].push(i as u32);
        }
        let e = Engine {
            machine,
            program,
            finish: vec![u64::MAX; n],
            unit_free: vec![0; unit_list.len()],
            busy: vec![0; unit_list.len()],
            count: vec![0; unit_list.len()],
            timelines: (0..machine.core.mxu.count).map(|_| Timeline::for_mxu(&machine.core.mxu)).collect(),
            recent: vec![VecDeque::new(); machine.core.mxu.count],
            hbm_free: 0,
            hbm_bytes: 0,
            useful_macs: 0,
            spans: keep_spans.then(|| Vec::with_capacity(n)),
        };
        let units = unit_list.len();
        Ok(CoreTiming {
            e,
            unit_list,
            queues,
            heads: vec![0; units],
            head_ready: vec![None; units],
            scheduled: 0,
            pending: None,
        })
    }

    /// Schedules instructions until the next one to start is a collective — returned as
    /// (instruction, the cycle it may start), to be ended with [`CoreTiming::complete`] — or
    /// until the program is done (`None`).
    pub fn advance(&mut self) -> Result<Option<(usize, u64)>> {
        assert!(self.pending.is_none(), "complete the pending collective first");
        let n = self.e.program.instrs.len();
        while self.scheduled < n {
            // The unit whose next instruction can start earliest (ties: earlier instruction).
            let mut best: Option<(u64, u32, usize)> = None;
            for (u, queue) in self.queues.iter().enumerate() {
                let Some(&i) = queue.get(self.heads[u]) else { continue };
                if self.head_ready[u].is_none() {
                    self.head_ready[u] = self.e.ready(i as usize);
                }
                let Some(ready) = self.head_ready[u] else { continue };
                let at = ready.max(self.e.unit_free[u]);
                if best.is_none_or(|(t, j, _)| (at, i) < (t, j)) {
                    best = Some((at, i, u));
                }
            }
            let (at, i, u) = best.expect("a validated program always has a runnable instruction");
            if matches!(self.e.program.instrs[i as usize].op, Operation::Collective { .. }) {
                self.pending = Some((i as usize, u, at));
                return Ok(Some((i as usize, at)));
            }
            let (start, end) = self.e.run(i as usize, u, at)?;
            self.retire(i as usize, u, start, end);
        }
        Ok(None)
    }

    /// Ends the pending collective at cycle `end` (at least the cycle it could start).
    pub fn complete(&mut self, end: u64) {
        let (i, u, at) = self.pending.take().expect("a collective is pending");
        let end = end.max(at);
        self.e.busy[u] += end - at;
        self.e.unit_free[u] = end;
        self.e.count[u] += 1;
        self.retire(i, u, at, end);
    }

    fn retire(&mut self, i: usize, u: usize, start: u64, end: u64) {
        self.e.finish[i] = end;
        self.heads[u] += 1;
        self.head_ready[u] = None;
        self.scheduled += 1;
        if let Some(spans) = self.e.spans.as_mut() {
            spans.push(Span { instr: i as u32, unit: self.unit_list[u], start, end });
        }
    }

    /// The report of the finished run.
    pub fn finish(self) -> Timing {
        let CoreTiming { mut e, unit_list, .. } = self;
        let machine = e.machine;
        let n = e.program.instrs.len();
        let engines = machine.core.dma.engines;
        let cycles = e.finish.iter().copied().max().unwrap_or(0);
        for (x, t) in e.timelines.iter().enumerate() {
            e.busy[engines + x] = t.busy;
        }
        let seconds = cycles as f64 / machine.core.clock_hz;
        let units = unit_list
            .iter()
            .enumerate()
            .filter(|&(u, _)| e.count[u] > 0)
            .map(|(u, unit)| UnitReport {
                unit: unit.to_string(),
                instructions: e.count[u],
                busy_cycles: e.busy[u],
                utilization: if cycles == 0 { 0.0 } else { e.busy[u] as f64 / cycles as f64 },
            })
            .collect();
        let peak_macs = cycles as f64 * machine.macs_per_cycle() as f64;
        let hbm_bytes_per_second = if seconds > 0.0 { e.hbm_bytes as f64 / seconds } else { 0.0 };
        let report = Report {
            cycles,
            seconds,
            instructions: n as u64,
            units,
            useful_macs: e.useful_macs,
            mxu_utilization: if peak_macs > 0.0 { e.useful_macs as f64 / peak_macs } else { 0.0 },
            hbm_bytes: e.hbm_bytes,
            hbm_bytes_per_second,
            hbm_utilization: hbm_bytes_per_second / machine.hbm_bytes_per_second(),
        };
        Timing { report, finish: e.finish, spans: e.spans.unwrap_or_default() }
    }
}

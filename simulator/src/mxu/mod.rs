//! The matrix unit (MXU): a weight-stationary systolic array of `rows × cols` bf16 MACs.
//!
//! A matmul runs as a sequence of **passes** ([`Pass`]): load one weight tile (at most
//! `rows × cols`: one K-chunk by one column block, one precision part), then stream `m` LHS rows
//! through it, adding the chunk sums to the f32 accumulator. Three models share this vocabulary:
//!
//! - [`kernel`]: the fast bit-exact product (the numerics contract, vectorised);
//! - [`Timeline`]: the fast cycle model, closed-form per pass;
//! - [`pe_array`]: every processing element, every cycle — the oracle both must match, in bits
//!   and in cycles.
//!
//! ## The timing mechanism (see `docs/timing.md`)
//!
//! Weights are written into a weight bank one array row per cycle, rows in order. LHS row `m`
//! of a pass enters array row `i` at cycle `start + m + i` (the input skew) and moves one column
//! per cycle; partial sums move down one row per cycle through all `rows` rows and are added to
//! the accumulator one cycle after leaving the bottom. Hence, for pass `t`:
//!
//! - `load_t ≥ load_{t-1} + k_{t-1}` — one weight-load port, one row per cycle;
//! - `load_t ≥ start_u + m_u + n_u - 1` — the bank's previous user `u` (pass `t-2` with two
//!   banks, `t-1` with one) must have finished reading row `r` before row `r` is rewritten at
//!   `load_t + r`;
//! - `start_t ≥ load_t + 1` — row `i` is written at `load_t + i`, before the first LHS row
//!   reaches it at `start_t + i`;
//! - `start_t ≥ start_{t-1} + m_{t-1}` — one LHS row enters per cycle;
//! - the pass ends (its last sum accumulated) at `start_t + m_t + rows + n_t - 1`.
//!
//! With double buffering the next tile's load hides under the current stream once `m ≥ k`
//! and `2m ≥ m + n`; with one bank, tile `t+1` cannot start until tile `t` has left the columns
//! it uses, so nothing overlaps but the load with the drain.
//!
//! ## SCALE-Sim's timing (`core.mxu.timing = scalesim`)
//!
//! SCALE-Sim's weight-stationary model (scale-sim-v2, `scalesim/compute/systolic_compute_ws.py`,
//! `systolic_compute_ws.create_{ifmap,filter,ofmap}_demand_mat`) runs the same passes (its
//! *folds*) one after another with nothing overlapped: all `rows` weight rows are pushed in
//! (one per cycle, padding rows included), then the LHS rows stream, then the outputs drain
//! through the whole `rows × cols` array (padding columns included), and only then does the
//! next fold's load begin. Its outputs are written in the cycle the bottom PE computes them,
//! and it reports the index of the cycle of the last write, counted from 0 at the first
//! weight-load cycle (`scalesim/memory/double_buffered_scratchpad_mem.py`,
//! `double_buffered_scratchpad.service_memory_requests`). Hence, for pass `t`:
//!
//! - `load_t ≥ end_{t-1} + 1` — the array is empty;
//! - `start_t = load_t + rows` — every weight row is in place;
//! - `end_t = start_t + m_t + rows + cols - 3` — the last output leaves PE `(rows-1, cols-1)`.
//!
//! A fold takes `2·rows + cols + m - 2` cycles, and a matmul of `F` passes from an idle MXU
//! `F · (2·rows + cols + m - 2) - 1` ([`scalesim_cycles`]), SCALE-Sim's total for the GEMM.

pub mod kernel;
pub mod pe_array;

use serde::Serialize;

use crate::config::{Machine, Mxu, MxuTiming};
use crate::numerics::Precision;

/// One weight tile streamed by LHS rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pass {
    /// LHS rows streamed.
    pub m: usize,
    /// Weight rows (the K-chunk), at most the array's rows.
    pub k: usize,
    /// Weight columns, at most the array's columns.
    pub n: usize,
}

/// The passes of an `m × k × n` matmul on a `rows × cols` array: column blocks outer, K-chunks
/// in order, precision passes innermost (the order the accumulator sees them).
pub fn passes(m: usize, k: usize, n: usize, rows: usize, cols: usize, precision: Precision) -> Vec<Pass> {
    pass_iter(m, k, n, rows, cols, precision).collect()
}

/// As [`passes`], without collecting them (the timing engine's hot path).
pub fn pass_iter(
    m: usize,
    k: usize,
    n: usize,
    rows: usize,
    cols: usize,
    precision: Precision,
) -> impl Iterator<Item = Pass> {
    let per_chunk = precision.passes().len();
    (0..n).step_by(cols.max(1)).flat_map(move |n0| {
        (0..k)
            .step_by(rows.max(1))
            .flat_map(move |k0| std::iter::repeat_n(Pass { m, k: rows.min(k - k0), n: cols.min(n - n0) }, per_chunk))
    })
}

/// When one pass ran: its weight load, its stream, and its end (exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PassTiming {
    pub load: u64,
    pub start: u64,
    pub end: u64,
}

/// The fast MXU cycle model: the recurrence of the module docs, pass by pass. It keeps the
/// state of the last two passes, so consecutive matmuls on one MXU pipeline into each other
/// (or, with SCALE-Sim's timing, follow each other).
#[derive(Clone, Debug)]
pub struct Timeline {
    rows: u64,
    cols: u64,
    double_buffered: bool,
    timing: MxuTiming,
    /// (start, m, n) of the last two passes, most recent last.
    recent: [Option<(u64, u64, u64)>; 2],
    /// When the weight-load port is next free.
    load_port_free: u64,
    /// When the LHS input port is next free.
    input_free: u64,
    /// Cycles the array was streaming, loading or draining (union of [load, end) intervals).
    pub busy: u64,
    busy_until: u64,
    /// When the last scheduled pass retired.
    retired: u64,
    /// Multiply-accumulates performed by all passes (padding excluded, every precision pass counted).
    pub pass_macs: u64,
}

impl Timeline {
    /// Systolic's pipelined timing on an array of `rows` rows (its columns do not matter there).
    pub fn new(rows: usize, double_buffered: bool) -> Timeline {
        Timeline::with_timing(rows, 0, double_buffered, MxuTiming::Pipelined)
    }

    /// One MXU of a machine, in the timing model it names (`core.mxu.timing`).
    pub fn for_mxu(mxu: &Mxu) -> Timeline {
        Timeline::with_timing(mxu.rows, mxu.cols, mxu.weight_double_buffering, mxu.timing)
    }

    /// A `rows × cols` array in the given timing model. SCALE-Sim's timing has no weight banks,
    /// so `double_buffered` matters only to the pipelined model.
    pub fn with_timing(rows: usize, cols: usize, double_buffered: bool, timing: MxuTiming) -> Timeline {
        Timeline {
            rows: rows as u64,
            cols: cols as u64,
            double_buffered,
            timing,
            recent: [None, None],
            load_port_free: 0,
            input_free: 0,
            busy: 0,
            busy_until: 0,
            retired: 0,
            pass_macs: 0,
        }
    }

    /// Schedules a pass whose operands are ready at cycle `ready`.
    pub fn schedule(&mut self, pass: Pass, ready: u64) -> PassTiming {
        if self.timing == MxuTiming::Scalesim {
            return self.schedule_scalesim(pass, ready);
        }
        let (m, k, n) = (pass.m as u64, pass.k as u64, pass.n as u64);
        let load = self.next_load(ready);
        let start = (load + 1).max(self.input_free);
        // Passes retire in order: the accumulator's write port takes results in issue order, so
        // a narrow pass after a wide one is done only when the wide one is.
        let end = (start + m + self.rows + n - 1).max(self.retired);
        self.retired = end;
        self.load_port_free = load + k;
        self.input_free = start + m;
        self.recent = [self.recent[1], Some((start, m, n))];
        self.busy += end.saturating_sub(load.max(self.busy_until));
        self.busy_until = self.busy_until.max(end);
        self.pass_macs += m * k * n;
        PassTiming { load, start, end }
    }

    /// SCALE-Sim's fold (module docs): the whole array loaded, streamed and drained once the
    /// previous fold is out. `end` is SCALE-Sim's count, the cycle of the fold's last write; the
    /// array is free for the next fold the cycle after.
    fn schedule_scalesim(&mut self, pass: Pass, ready: u64) -> PassTiming {
        let (m, k, n) = (pass.m as u64, pass.k as u64, pass.n as u64);
        let load = self.next_load(ready);
        let start = load + self.rows;
        let end = start + m + self.rows + self.cols - 3;
        self.retired = end;
        self.load_port_free = end + 1;
        self.input_free = end + 1;
        self.busy += end.saturating_sub(load.max(self.busy_until));
        self.busy_until = self.busy_until.max(end);
        self.pass_macs += m * k * n;
        PassTiming { load, start, end }
    }

    /// When the next pass's weight load could begin, for operands ready at `ready`: the load
    /// port must be free and the bank's previous user must have finished reading it (with
    /// SCALE-Sim's timing: the previous fold must have written its last output).
    pub fn next_load(&self, ready: u64) -> u64 {
        if self.timing == MxuTiming::Scalesim {
            return ready.max(self.load_port_free);
        }
        let previous_user = if self.double_buffered { self.recent[0] } else { self.recent[1] };
        let bank_free = previous_user.map_or(0, |(s, pm, pn)| s + pm + pn - 1);
        ready.max(self.load_port_free).max(bank_free)
    }

    /// Schedules every pass of a matmul; returns the cycle the last one ends.
    pub fn schedule_all(&mut self, passes: impl IntoIterator<Item = Pass>, ready: u64) -> u64 {
        passes.into_iter().map(|p| self.schedule(p, ready).end).max().unwrap_or(ready)
    }
}

/// SCALE-Sim's weight-stationary cycle count for an `m × k × n` matmul on one idle
/// `rows × cols` array: `F · (2·rows + cols + m − 2) − 1` for its `F` passes
/// (`⌈k / rows⌉ · ⌈n / cols⌉` folds, times the precision's bf16 passes); 0 for an empty matmul.
/// What [`Timeline`] and [`pe_array`] give with `core.mxu.timing = scalesim`, and SCALE-Sim's
/// "Total Cycles" for the GEMM (`M, N, K` in its topology file; `ArrayHeight = rows`,
/// `ArrayWidth = cols`, dataflow `ws`) when its memories never stall.
pub fn scalesim_cycles(m: usize, k: usize, n: usize, rows: usize, cols: usize, precision: Precision) -> u64 {
    let folds = (k.div_ceil(rows.max(1)) * n.div_ceil(cols.max(1)) * precision.passes().len()) as u64;
    if folds == 0 {
        return 0;
    }
    folds * (2 * rows.max(1) + cols.max(1) + m - 2) as u64 - 1
}

/// MXU cycles of one `m × k × n` matmul alone on one of `machine`'s MXUs: every pass scheduled
/// from an idle MXU with operands ready at cycle 0, in the machine's timing model
/// (`core.mxu.timing`), so the last pass's end. What the timing engine charges such a matmul
/// when nothing else runs on that MXU. There, consecutive matmuls on one MXU pipeline into each
/// other, so the sum of their `matmul_cycles` bounds their time in the pipelined model; with
/// SCALE-Sim's timing they follow each other exactly, one cycle apart (the sum plus one cycle
/// per matmul after the first).
pub fn matmul_cycles(machine: &Machine, m: usize, k: usize, n: usize, precision: Precision) -> u64 {
    let mxu = &machine.core.mxu;
    Timeline::for_mxu(mxu).schedule_all(pass_iter(m, k, n, mxu.rows, mxu.cols, precision), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_full_tile_takes_fill_stream_and_drain() {
        let mut t = Timeline::new(128, true);
        let p = t.schedule(Pass { m: 128, k: 128, n: 128 }, 0);
        assert_eq!(p, PassTiming { load: 0, start: 1, end: 1 + 128 + 128 + 128 - 1 });
    }

    #[test]
    fn double_buffering_hides_the_load_under_the_stream() {
        let run = |double: bool, m: usize| {
            let mut t = Timeline::new(128, double);
            let ps = passes(m, 1024, 1024, 128, 128, Precision::Default);
            let end = t.schedule_all(ps, 0);
            (m * 1024 * 1024) as f64 / (end as f64 * 128.0 * 128.0)
        };
        assert!(run(true, 128) > 0.95, "{}", run(true, 128));
        assert!((run(false, 128) - 0.5).abs() < 0.02, "{}", run(false, 128));
        assert!(run(true, 8) < 0.07, "weights load one row per cycle: {}", run(true, 8));
    }

    #[test]
    fn passes_cover_the_product_in_accumulation_order() {
        let ps = passes(5, 300, 200, 128, 128, Precision::High);
        assert_eq!(ps.len(), 2 * 3 * 3);
        assert_eq!(ps[0], Pass { m: 5, k: 128, n: 128 });
        assert_eq!(ps[8], Pass { m: 5, k: 44, n: 128 });
        assert_eq!(ps[17], Pass { m: 5, k: 44, n: 72 });
        let macs: usize = ps.iter().map(|p| p.m * p.k * p.n).sum();
        assert_eq!(macs, 3 * 5 * 300 * 200);
    }
}

//! The PE-level model of the systolic array: every processing element, every cycle.
//!
//! It is the oracle. Nothing in it is a formula for time: the weight-load port writes a row
//! when the row is free, the controller injects an LHS row when the port and the weights allow,
//! values move one PE per cycle, and the run ends when the last partial sum has been added to
//! the accumulator. The fast models ([`super::kernel`], [`super::Timeline`]) must reproduce its
//! bits and its cycle count exactly.
//!
//! Each PE `(i, j)` has two weight registers (banks; one with double buffering off), an input
//! register passed right and a partial-sum register passed down. Row `i` of the array holds
//! weight row `i` of the tile (a k index); column `j` an output column.
//!
//! With SCALE-Sim's timing (`core.mxu.timing = scalesim`, see [`super`]) the same array runs
//! SCALE-Sim's rules instead: one bank; the load port writes all `rows` rows of a pass (padding
//! rows too) and only once the previous pass has left the array; the first LHS row enters once
//! the last weight row is in place; inputs and partial sums travel through every column
//! (padding columns compute nothing); a result is written from the bottom row in the cycle it is
//! computed; a pass ends at (and the run counts to) the cycle of its last write, counted from 0.

use super::{Pass, PassTiming};
use crate::config::{Mxu, MxuTiming};
use crate::error::{Error, Result};

/// One pass with its data: `weights` is `k × n` and `lhs` is `m × k`, row-major, already
/// rounded to bf16 (the MXU's input formatter does that); results go to accumulator columns
/// `out_col .. out_col + n`, rows `0 .. m`.
#[derive(Clone, Debug)]
pub struct PassData {
    pub pass: Pass,
    pub weights: Vec<f32>,
    pub lhs: Vec<f32>,
    pub out_col: usize,
}

/// What a run produced: its cycles and when each pass loaded, started and ended.
#[derive(Clone, Debug, PartialEq)]
pub struct PeRun {
    pub cycles: u64,
    pub timings: Vec<PassTiming>,
}

const EMPTY: u32 = u32::MAX;

/// An LHS value travelling right (or nothing: `pass == EMPTY`).
#[derive(Clone, Copy)]
struct Token {
    pass: u32,
    m: u32,
    /// The LHS value for this row (`has_value` is false in rows beyond the pass's k).
    x: f32,
    has_value: bool,
}

const NO_TOKEN: Token = Token { pass: EMPTY, m: 0, x: 0.0, has_value: false };

/// A partial sum travelling down.
#[derive(Clone, Copy)]
struct Psum {
    pass: u32,
    m: u32,
    value: f32,
}

const NO_PSUM: Psum = Psum { pass: EMPTY, m: 0, value: 0.0 };

/// Runs `passes` in order on a `rows × cols` array (pipelined timing) and adds their results
/// into `acc` (`acc_cols` columns per row). Returns the cycle count and per-pass timings.
pub fn run(
    rows: usize,
    cols: usize,
    double_buffered: bool,
    passes: &[PassData],
    acc: &mut [f32],
    acc_cols: usize,
) -> Result<PeRun> {
    simulate(rows, cols, double_buffered, MxuTiming::Pipelined, passes, acc, acc_cols)
}

/// As [`run`], on one MXU of a machine: its array, its weight banks and its timing model.
pub fn run_on(mxu: &Mxu, passes: &[PassData], acc: &mut [f32], acc_cols: usize) -> Result<PeRun> {
    simulate(mxu.rows, mxu.cols, mxu.weight_double_buffering, mxu.timing, passes, acc, acc_cols)
}

fn simulate(
    rows: usize,
    cols: usize,
    double_buffered: bool,
    timing: MxuTiming,
    passes: &[PassData],
    acc: &mut [f32],
    acc_cols: usize,
) -> Result<PeRun> {
    let scalesim = timing == MxuTiming::Scalesim;
    let fail = |reason: String| Error::Data(format!("PE-level array: {reason}"));
    for (t, p) in passes.iter().enumerate() {
        let Pass { m, k, n } = p.pass;
        if k == 0 || n == 0 || m == 0 || k > rows || n > cols {
            return Err(fail(format!("pass {t} is {m}x{k}x{n}, which does not fit a {rows}x{cols} array")));
        }
        if p.weights.len() != k * n || p.lhs.len() != m * k {
            return Err(fail(format!(
                "pass {t} has {} weights and {} LHS values for {m}x{k}x{n}",
                p.weights.len(),
                p.lhs.len()
            )));
        }
        if (m - 1) * acc_cols + p.out_col + n > acc.len() || p.out_col + n > acc_cols {
            return Err(fail(format!(
                "pass {t} writes outside the {}x{acc_cols} accumulator",
                acc.len() / acc_cols.max(1)
            )));
        }
    }
    let banks = if double_buffered && !scalesim { 2 } else { 1 };
    let bank_of = |t: usize| t % banks;
    // Weight registers, per bank, row-major over the array.
    let mut weights = vec![vec![0f32; rows * cols]; banks];
    // Which pass occupies each bank row, whether its last LHS row has passed, and when written.
    let mut occupant = vec![vec![EMPTY; rows]; banks];
    let mut released = vec![vec![true; rows]; banks];
    let mut written_at = vec![vec![0u64; rows]; banks];

    let mut x = vec![NO_TOKEN; rows * cols];
    let mut x_next = x.clone();
    let mut ps = vec![NO_PSUM; rows * cols];
    let mut ps_next = ps.clone();
    // Row-0 injections of the last `rows` cycles: (cycle, pass, m); row i reads the one of cycle c - i.
    let mut injected: Vec<Option<(u64, u32, u32)>> = vec![None; rows];
    // Results leaving the bottom row this cycle, accumulated next cycle: (pass, m, column, value).
    let mut outgoing: Vec<(u32, u32, usize, f32)> = Vec::with_capacity(cols);
    let mut landing: Vec<(u32, u32, usize, f32)> = Vec::with_capacity(cols);

    let mut timings = vec![PassTiming { load: 0, start: 0, end: 0 }; passes.len()];
    let (mut load_pass, mut load_row) = (0usize, 0usize);
    let (mut stream_pass, mut stream_m) = (0usize, 0usize);
    let mut in_flight = 0usize;
    // SCALE-Sim's timing: passes whose last input has left the bottom-right PE.
    let mut drained = 0usize;
    let mut last_activity = 0u64;
    let mut cycle = 0u64;
    let limit = 64 + passes.iter().map(|p| (p.pass.m + 2 * rows + cols + p.pass.k) as u64 * 4).sum::<u64>();

    loop {
        // 1. Accumulate what left the array last cycle (one cycle for the add).
        for &(t, m, j, v) in &landing {
            let p = &passes[t as usize];
            let at = m as usize * acc_cols + p.out_col + j;
            acc[at] += v;
            last_activity = cycle;
            timings[t as usize].end = timings[t as usize].end.max(cycle + 1);
        }
        landing.clear();

        // 2. The weight-load port writes one row of the current pass, if the row is free (with
        //    SCALE-Sim's timing: if the array is empty; every row is written, padding included).
        if load_pass < passes.len() {
            let p = &passes[load_pass];
            let b = bank_of(load_pass);
            let free = if scalesim { drained == load_pass } else { released[b][load_row] };
            if free {
                if load_row == 0 {
                    timings[load_pass].load = cycle;
                }
                if load_row < p.pass.k {
                    let dst = &mut weights[b][load_row * cols..load_row * cols + p.pass.n];
                    dst.copy_from_slice(&p.weights[load_row * p.pass.n..(load_row + 1) * p.pass.n]);
                }
                occupant[b][load_row] = load_pass as u32;
                released[b][load_row] = false;
                written_at[b][load_row] = cycle;
                last_activity = last_activity.max(cycle);
                load_row += 1;
                if load_row == if scalesim { rows } else { p.pass.k } {
                    load_pass += 1;
                    load_row = 0;
                }
            }
        }

        // 3. The controller injects the next LHS row into array row 0 (the skew delays row i by i).
        let slot = (cycle % rows as u64) as usize;
        injected[slot] = None;
        if stream_pass < passes.len() {
            let b = bank_of(stream_pass);
            // The first LHS row needs weight row 0 in place (with SCALE-Sim's timing: every row).
            let r = if scalesim { rows - 1 } else { 0 };
            let ready =
                stream_m > 0 || (occupant[b][r] == stream_pass as u32 && written_at[b][r] < cycle && !released[b][r]);
            if ready {
                if stream_m == 0 {
                    timings[stream_pass].start = cycle;
                }
                injected[slot] = Some((cycle, stream_pass as u32, stream_m as u32));
                in_flight += 1;
                stream_m += 1;
                if stream_m == passes[stream_pass].pass.m {
                    stream_pass += 1;
                    stream_m = 0;
                }
            }
        }

        // 4. Every PE computes from last cycle's registers.
        for i in 0..rows {
            // The LHS value entering row i this cycle was injected at cycle - i.
            let entering = if cycle >= i as u64 {
                match injected[((cycle - i as u64) % rows as u64) as usize] {
                    Some((c, t, m)) if c == cycle - i as u64 => {
                        let p = &passes[t as usize];
                        let has_value = i < p.pass.k;
                        let value = if has_value { p.lhs[m as usize * p.pass.k + i] } else { 0.0 };
                        Token { pass: t, m, x: value, has_value }
                    }
                    _ => NO_TOKEN,
                }
            } else {
                NO_TOKEN
            };
            for j in 0..cols {
                let token = if j == 0 { entering } else { x[i * cols + j - 1] };
                let here = i * cols + j;
                // Columns beyond the pass's n: inputs stop there, or (SCALE-Sim) pass through idle.
                if token.pass == EMPTY || (!scalesim && j >= passes[token.pass as usize].pass.n) {
                    x_next[here] = NO_TOKEN;
                    ps_next[here] = NO_PSUM;
                    continue;
                }
                let p = &passes[token.pass as usize];
                let used = j < p.pass.n;
                let psum_in = if i == 0 {
                    0.0
                } else {
                    let above = ps[here - cols];
                    if above.pass != token.pass || above.m != token.m {
                        return Err(fail(format!("PE ({i}, {j}) at cycle {cycle}: partial sum and input out of step")));
                    }
                    above.value
                };
                let value = if token.has_value && used {
                    let b = bank_of(token.pass as usize);
                    if occupant[b][i] != token.pass {
                        return Err(fail(format!(
                            "PE ({i}, {j}) at cycle {cycle}: pass {} reads weights of pass {} (hazard)",
                            token.pass, occupant[b][i]
                        )));
                    }
                    token.x.mul_add(weights[b][here], psum_in)
                } else {
                    psum_in
                };
                x_next[here] = token;
                ps_next[here] = Psum { pass: token.pass, m: token.m, value };
                if i == rows - 1 {
                    if !scalesim {
                        outgoing.push((token.pass, token.m, j, value));
                    } else {
                        // Written in the cycle it is computed; padding columns write nothing.
                        if used {
                            acc[token.m as usize * acc_cols + p.out_col + j] += value;
                        }
                        timings[token.pass as usize].end = timings[token.pass as usize].end.max(cycle);
                    }
                }
                let last_col = if scalesim { cols - 1 } else { p.pass.n - 1 };
                if token.m as usize == p.pass.m - 1 && j == last_col {
                    // The pass's last LHS row has read row i: the bank row may be rewritten.
                    let b = bank_of(token.pass as usize);
                    if occupant[b][i] == token.pass {
                        released[b][i] = true;
                    }
                    if i == rows - 1 {
                        in_flight -= p.pass.m;
                        drained += 1;
                    }
                }
                last_activity = last_activity.max(cycle);
            }
        }
        std::mem::swap(&mut x, &mut x_next);
        std::mem::swap(&mut ps, &mut ps_next);
        std::mem::swap(&mut landing, &mut outgoing);

        let done = load_pass == passes.len() && stream_pass == passes.len() && in_flight == 0 && landing.is_empty();
        cycle += 1;
        if done {
            break;
        }
        if cycle > limit {
            return Err(fail(format!("no progress after {cycle} cycles (deadlock)")));
        }
    }
    // Passes retire in issue order (see `super::Timeline`).
    for t in 1..timings.len() {
        timings[t].end = timings[t].end.max(timings[t - 1].end);
    }
    // SCALE-Sim counts to the cycle of the last write; Systolic counts cycles.
    let cycles = if passes.is_empty() {
        0
    } else if scalesim {
        last_activity
    } else {
        last_activity + 1
    };
    Ok(PeRun { cycles, timings })
}

/// Runs an `m × k × n` matmul (row-major `a`, `b`) on the PE-level array (pipelined timing),
/// adding into `acc` (`m × n`), with passes in the order of [`super::passes`].
#[allow(clippy::too_many_arguments)] // the array's shape, the operands' shape and the mode
pub fn matmul(
    a: &[f32],
    b: &[f32],
    shape: (usize, usize, usize),
    rows: usize,
    cols: usize,
    double_buffered: bool,
    precision: crate::numerics::Precision,
    acc: &mut [f32],
) -> Result<PeRun> {
    let mxu = Mxu { count: 1, rows, cols, weight_double_buffering: double_buffered, timing: MxuTiming::Pipelined };
    matmul_on(&mxu, a, b, shape, precision, acc)
}

/// Bytes [`matmul_on`] holds for an `m × k × n` product: every pass's weights and left-hand
/// rows, rounded, before the array runs (each `cols`-wide block of N repeats A), and the
/// array's own state (for the host's memory check).
pub fn matmul_bytes(mxu: &Mxu, (m, k, n): (usize, usize, usize), precision: crate::numerics::Precision) -> u64 {
    let splits = precision.passes().len() as u64;
    let blocks = n.div_ceil(mxu.cols.max(1)) as u64;
    let per_pass_data = (k as u64 * n as u64) + blocks * m as u64 * k as u64;
    let array = 4 * (mxu.rows * mxu.cols) as u64 * 3 + k.div_ceil(mxu.rows.max(1)) as u64 * blocks * splits * 24;
    4 * splits * per_pass_data + array
}

/// As [`matmul`], on one MXU of a machine: its array, its weight banks and its timing model.
pub fn matmul_on(
    mxu: &Mxu,
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    precision: crate::numerics::Precision,
    acc: &mut [f32],
) -> Result<PeRun> {
    use crate::numerics::split;
    let (rows, cols) = (mxu.rows, mxu.cols);
    if a.len() != m * k || b.len() != k * n || acc.len() != m * n {
        return Err(Error::Data(format!("PE-level matmul: operands do not match {m}x{k}x{n}")));
    }
    let mut data = Vec::new();
    for n0 in (0..n).step_by(cols) {
        let nc = cols.min(n - n0);
        for k0 in (0..k).step_by(rows) {
            let kc = rows.min(k - k0);
            for &(pa, pb) in precision.passes() {
                let weights = (0..kc).flat_map(|r| (0..nc).map(move |c| split(b[(k0 + r) * n + n0 + c], pb))).collect();
                let lhs = (0..m).flat_map(|i| (0..kc).map(move |r| split(a[i * k + k0 + r], pa))).collect();
                data.push(PassData { pass: Pass { m, k: kc, n: nc }, weights, lhs, out_col: n0 });
            }
        }
    }
    run_on(mxu, &data, acc, n)
}

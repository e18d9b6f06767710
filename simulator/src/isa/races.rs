//! Data races: two instructions that touch overlapping bytes, at least one writing, with
//! neither ordered before the other.
//!
//! Ordering ("happens before") is program order on the same unit (units run in order; the MXU
//! interlocks on its own results) plus declared dependencies, transitively. It is tracked with
//! one vector clock per instruction, and races are found FastTrack-style: each access is checked
//! against the last writes and the reads since, of overlapping bytes.
//!
//! A program splits at cuts — instructions ordered after every earlier one, with every unit's
//! next instruction ordered after them (the barriers between a step's kernels) — into pieces
//! no access can race across. The pieces are checked in parallel; the first error in program
//! order is the one reported, so the result does not depend on the thread count.

use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;

use super::coverage::Uncovered;
use super::*;
use crate::error::{Error, Result};

/// Instructions per piece checked on one thread, at least (pieces end at the next cut).
const PIECE_INSTRUCTIONS: usize = 16_384;

/// Floor division for signed values.
fn floor_div(a: i64, b: i64) -> i64 {
    a.div_euclid(b)
}

/// Whether the byte interval `[s, e)` meets any row of `t`.
fn interval_meets_tile(s: i64, e: i64, t: &Tile) -> bool {
    let size = t.dtype.size() as i64;
    let (t0, st, wt, rt) = (t.offset as i64, t.stride as i64 * size, t.cols as i64 * size, t.rows as i64);
    if st == 0 {
        // Every row reads the same bytes (a broadcast view).
        return t0 < e && t0 + wt > s;
    }
    // Rows j with t0 + j·st < e and t0 + j·st + wt > s.
    let j_min = (floor_div(s - wt - t0, st) + 1).max(0);
    let j_max = (floor_div(e - t0 - 1, st)).min(rt - 1);
    j_min <= j_max
}

/// Whether two tiles share any byte.
pub(crate) fn overlap(a: &Tile, b: &Tile) -> bool {
    if a.space != b.space {
        return false;
    }
    let ((a0, a1), (b0, b1)) = (a.span(), b.span());
    if a1 <= b0 || b1 <= a0 {
        return false;
    }
    // Rows that touch or overlap cover their whole span.
    let contiguous = |t: &Tile| t.rows == 1 || t.stride <= t.cols;
    if contiguous(a) {
        return interval_meets_tile(a0 as i64, a1 as i64, b);
    }
    if contiguous(b) {
        return interval_meets_tile(b0 as i64, b1 as i64, a);
    }
    let (sa, sb) = (a.stride as i64 * a.dtype.size() as i64, b.stride as i64 * b.dtype.size() as i64);
    if sa == sb {
        // Row i of a meets row j of b iff -wa < d + (i - j)·s < wb with d = a0 - b0.
        let (wa, wb) = (a.cols as i64 * a.dtype.size() as i64, b.cols as i64 * b.dtype.size() as i64);
        let d = a0 as i64 - b0 as i64;
        let t_min = (floor_div(-wa - d, sa) + 1).max(-(b.rows as i64 - 1));
        let t_max = floor_div(wb - 1 - d, sa).min(a.rows as i64 - 1);
        return t_min <= t_max;
    }
    // Different strides: test each row of the shorter tile.
    let (short, long) = if a.rows <= b.rows { (a, b) } else { (b, a) };
    (0..short.rows).any(|r| {
        let row = short.rows(r as usize, 1);
        let (s, e) = row.span();
        interval_meets_tile(s as i64, e as i64, long)
    })
}

/// Whether `w` certainly covers every byte of `t` (so later checks against `t` are redundant).
fn covers(w: &Tile, t: &Tile) -> bool {
    if w.space != t.space {
        return false;
    }
    let ((w0, w1), (t0, t1)) = (w.span(), t.span());
    if w.rows == 1 || w.stride == w.cols {
        return w0 <= t0 && t1 <= w1;
    }
    if w.stride as u64 * w.dtype.size() != t.stride as u64 * t.dtype.size() || t0 < w0 {
        return false;
    }
    let s = w.stride as u64 * w.dtype.size();
    let (row, col) = ((t0 - w0) / s, (t0 - w0) % s);
    col + t.cols as u64 * t.dtype.size() <= w.cols as u64 * w.dtype.size() && row + t.rows as u64 <= w.rows as u64
}

/// Accesses since a full barrier, indexed so that a query visits few accesses that cannot
/// conflict: by space, by kind (a read need only look at writes), and by span-length class
/// (spans in `[2^c, 2^(c+1))` can reach back at most `2^(c+1)` bytes from a query's start).
#[derive(Default)]
struct Epoch {
    barrier: Option<usize>,
    /// One group per space, kind and class, at [`Epoch::slot`] (created on first use).
    groups: Vec<Group>,
    /// Per space and kind (`slot / 64`), a bit for each class that has a group in use.
    present: [u64; 4],
    /// Every access the epoch has held (the groups index the active ones).
    accesses: Vec<Access>,
    /// The bytes of an access that later writes have partly overwritten (`Access::uncovered`
    /// points here): most accesses are never partly overwritten, so they carry no set.
    uncovered: Vec<Uncovered>,
}

/// The active accesses of one space, kind and length class, by span start.
#[derive(Default)]
struct Group {
    /// The union of the spans ever added: a query outside it skips the group.
    bounds: (u64, u64),
    /// (span start, index into the epoch's `accesses`), sorted. A sorted vector rather than a
    /// tree: accesses mostly arrive in address order (DMAs streaming a tensor) or are few
    /// (VMEM rings, rewritten and forgotten), so inserts land at the end of short arrays.
    by_start: Vec<(u64, u32)>,
}

/// The length class of a span: `floor(log2(len))`.
fn class_of(len: u64) -> u8 {
    63 - len.max(1).leading_zeros() as u8
}

/// Accesses an epoch holds before a full barrier may start the next one: fewer, larger epochs
/// mean fewer indexes to query per access.
const MIN_EPOCH_ACCESSES: usize = 256;

/// Instructions not yet ordered before a barrier that an epoch may still start at, carrying
/// their accesses.
const MAX_CARRIED: usize = 8;

/// `Access::uncovered` of an access no write has touched yet: all its bytes.
const WHOLE: u32 = u32::MAX;

impl Epoch {
    /// An empty epoch starting at `barrier`, reusing a drained epoch's buffers.
    fn recycled(barrier: usize, mut old: Epoch) -> Epoch {
        old.accesses.clear();
        old.uncovered.clear();
        for g in &mut old.groups {
            g.by_start.clear();
        }
        Epoch { barrier: Some(barrier), present: [0; 4], ..old }
    }

    /// Adds the accesses of the instructions not ordered before an instruction with `clock`,
    /// of the `counters` each unit has run.
    fn carry(&mut self, program: &Program, on_unit: &[Vec<u32>], clock: &[u32], counters: &[u32]) {
        for (v, unit) in on_unit.iter().enumerate() {
            for &j in &unit[(clock[v] as usize).min(counters[v] as usize)..counters[v] as usize] {
                let op = &program.instrs[j as usize].op;
                op.reads().into_iter().for_each(|t| self.add(t, j, false));
                op.writes().into_iter().for_each(|t| self.add(t, j, true));
            }
        }
    }

    /// The group of accesses in `space`, reading or writing, of length class `class`.
    fn slot(space: Space, write: bool, class: u8) -> usize {
        ((space == Space::Vmem) as usize * 2 + write as usize) * 64 + class as usize
    }

    /// Indexes an access of instruction `instr`.
    fn add(&mut self, tile: Tile, instr: u32, write: bool) {
        let (start, end) = tile.span();
        let class = class_of(end - start);
        let slot = Epoch::slot(tile.space, write, class);
        if self.groups.is_empty() {
            self.groups.resize_with(4 * 64, Group::default);
        }
        let g = &mut self.groups[slot];
        if self.present[slot / 64] & (1 << class) == 0 {
            self.present[slot / 64] |= 1 << class;
            g.bounds = (start, end);
        }
        g.bounds = (g.bounds.0.min(start), g.bounds.1.max(end));
        let key = (start, self.accesses.len() as u32);
        self.accesses.push(Access { tile, instr, write, uncovered: WHOLE });
        // Keys are sorted by start only (equal starts in any order).
        if g.by_start.last().is_none_or(|k| k.0 <= start) {
            g.by_start.push(key);
        } else {
            let at = g.by_start.partition_point(|k| k.0 <= start);
            g.by_start.insert(at, key);
        }
    }
}

#[derive(Clone, Copy)]
struct Access {
    tile: Tile,
    instr: u32,
    write: bool,
    /// Index into the epoch's `uncovered` of the bytes no later write (ordered after this
    /// access) has overwritten yet, or [`WHOLE`]; once none are left, the access can be
    /// forgotten.
    uncovered: u32,
}

/// Removes the bytes `write` overwrites from access `a`; whether none are left.
fn overwrite(a: &mut Access, sets: &mut Vec<Uncovered>, write: &Tile) -> bool {
    if a.uncovered == WHOLE {
        a.uncovered = sets.len() as u32;
        sets.push(Uncovered::of(&a.tile));
    }
    let set = &mut sets[a.uncovered as usize];
    set.subtract(write);
    set.is_empty()
}

/// Vector clocks: for instruction `i`, the number of instructions of each unit ordered before
/// it or equal to it (program order on a unit plus declared dependencies, transitively).
struct Clocks {
    n_units: usize,
    /// `n_units` counts per instruction.
    counts: Vec<u32>,
    /// Each instruction's position on its unit, from 1.
    seq: Vec<u32>,
    unit: Vec<usize>,
    /// The first instruction with a dependency that does not point backwards, if any: the
    /// clocks stop there.
    bad_dep: Option<(usize, u32)>,
}

impl Clocks {
    fn len(&self) -> usize {
        self.unit.len()
    }

    fn of(program: &Program, units: &HashMap<Unit, usize>) -> Clocks {
        let n = program.instrs.len();
        let n_units = units.len();
        let mut c = Clocks {
            n_units,
            counts: Vec::with_capacity(n * n_units),
            seq: Vec::with_capacity(n),
            unit: Vec::with_capacity(n),
            bad_dep: None,
        };
        let mut last_on_unit: Vec<Option<usize>> = vec![None; n_units];
        let mut counters = vec![0u32; n_units];
        let mut clock = vec![0u32; n_units];
        for (i, instr) in program.instrs.iter().enumerate() {
            let u = units[&instr.op.unit()];
            clock.fill(0);
            let mut join = |other: usize| {
                for (k, &o) in clock.iter_mut().zip(&c.counts[other * n_units..(other + 1) * n_units]) {
                    *k = (*k).max(o);
                }
            };
            if let Some(&d) = instr.deps.iter().find(|&&d| d as usize >= i) {
                c.bad_dep = Some((i, d));
                break;
            }
            instr.deps.iter().for_each(|&d| join(d as usize));
            if let Some(prev) = last_on_unit[u] {
                join(prev);
            }
            counters[u] += 1;
            clock[u] = counters[u];
            c.counts.extend_from_slice(&clock);
            c.seq.push(counters[u]);
            c.unit.push(u);
            last_on_unit[u] = Some(i);
        }
        c
    }

    fn of_instr(&self, i: usize) -> &[u32] {
        &self.counts[i * self.n_units..(i + 1) * self.n_units]
    }

    /// Whether instruction `j` happens before (or is) an instruction whose clock is `clock`.
    fn before(&self, j: usize, clock: &[u32]) -> bool {
        clock[self.unit[j]] >= self.seq[j]
    }

    /// Each unit's instructions in program order (an instruction's sequence number on its
    /// unit, minus one, is its position).
    fn on_unit(&self) -> Vec<Vec<u32>> {
        let mut on_unit = vec![Vec::new(); self.n_units];
        for (i, &u) in self.unit.iter().enumerate() {
            on_unit[u].push(i as u32);
        }
        on_unit
    }

    /// The program (up to `end`) in pieces of at least `min` instructions that begin at cuts:
    /// instructions ordered after all but a few earlier ones (a bucket's all-reduce running
    /// beside the backward pass), whose accesses the piece carries, with every unit's next
    /// instruction ordered after them.
    fn pieces(&self, on_unit: &[Vec<u32>], end: usize, min: usize) -> Vec<Range<usize>> {
        let mut counters = vec![0u32; self.n_units];
        let mut pieces = Vec::new();
        let mut start = 0;
        for i in 0..end.min(self.len()) {
            let clock = self.of_instr(i);
            let pending: u32 = counters.iter().zip(clock).map(|(c, k)| c.saturating_sub(*k)).sum();
            let cut = i >= start + min
                && pending as usize <= MAX_CARRIED
                && (0..self.n_units).all(|v| {
                    on_unit[v]
                        .get(counters[v] as usize + (v == self.unit[i]) as usize)
                        .is_none_or(|&r| self.before(i, self.of_instr(r as usize)))
                });
            if cut {
                pieces.push(start..i);
                start = i;
            }
            counters[self.unit[i]] += 1;
        }
        pieces.push(start..end);
        pieces
    }
}

/// Checks `program` for races and, at each instruction before its accesses, `check_op`
/// (the instruction's own shapes and operands): the first error in program order.
pub(super) fn check(program: &Program, check_op: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    check_in_pieces(program, check_op, PIECE_INSTRUCTIONS)
}

/// [`check`] with pieces of at least `min` instructions (tests split small programs).
pub(super) fn check_in_pieces(
    program: &Program,
    check_op: impl Fn(usize) -> Result<()> + Sync,
    min: usize,
) -> Result<()> {
    let mut units: HashMap<Unit, usize> = HashMap::new();
    for instr in &program.instrs {
        let next = units.len();
        units.entry(instr.op.unit()).or_insert(next);
    }
    let clocks = Clocks::of(program, &units);
    let end = clocks.bad_dep.map_or(program.instrs.len(), |(i, _)| i + 1);
    let on_unit = clocks.on_unit();
    let pieces = clocks.pieces(&on_unit, end, min.max(1));
    let piece = Piece { program, clocks: &clocks, on_unit: &on_unit, check_op: &check_op };
    pieces.into_par_iter().map(|range| piece.check(range)).collect::<Vec<_>>().into_iter().collect()
}

/// What checking one piece needs.
struct Piece<'a, F> {
    program: &'a Program,
    clocks: &'a Clocks,
    on_unit: &'a [Vec<u32>],
    check_op: &'a F,
}

impl<F: Fn(usize) -> Result<()>> Piece<'_, F> {
    /// Checks the instructions of `range`, which begins at a cut (or the program's start).
    fn check(&self, range: Range<usize>) -> Result<()> {
        let Piece { program, clocks, on_unit, check_op } = *self;
        let n_units = clocks.n_units;
        // Instructions of each unit before the piece.
        let mut counters: Vec<u32> =
            on_unit.iter().map(|unit| unit.partition_point(|&j| (j as usize) < range.start) as u32).collect();
        // Each unit's next instruction: every later one of the unit is or follows it.
        let mut upcoming: Vec<Option<u32>> =
            (0..n_units).map(|v| on_unit[v].get(counters[v] as usize).copied()).collect();
        // Active accesses, in epochs: an epoch starts at a barrier (an instruction ordered after
        // all but a few earlier ones, whose accesses it carries), so an instruction ordered
        // after that barrier need not look at older epochs. Accesses overwritten by later
        // writes leave the index (`coverage`).
        let mut epochs: Vec<Epoch> = vec![Epoch::default()];
        if range.start > 0 {
            epochs[0].carry(program, on_unit, clocks.of_instr(range.start), &counters);
        }
        let mut spare: Vec<Epoch> = Vec::new();
        let mut covered: Vec<(u64, u32)> = Vec::new();
        // The newest epoch whose barrier an instruction with this clock is ordered after.
        let newest_after = |epochs: &[Epoch], clock: &[u32]| {
            epochs.iter().rposition(|e| e.barrier.is_none_or(|b| clocks.before(b, clock))).unwrap_or(0)
        };

        for i in range {
            let op = &program.instrs[i].op;
            let fail = |reason: String| Error::Program { index: i, op: op.name(), reason };
            check_op(i)?;
            if let Some((bad, d)) = clocks.bad_dep
                && bad == i
            {
                return Err(fail(format!(
                    "depends on instruction {d}, which is not earlier; dependencies must point to earlier instructions"
                )));
            }
            let u = clocks.unit[i];
            let clock = clocks.of_instr(i);
            counters[u] += 1;
            upcoming[u] = on_unit[u].get(counters[u] as usize).copied();
            let ordered_before_me = |j: u32| clocks.before(j as usize, clock);

            let accesses = op.reads().into_iter().map(|t| (t, false)).chain(op.writes().into_iter().map(|t| (t, true)));
            let first = newest_after(&epochs, clock);
            for (tile, write) in accesses {
                let (start, end) = tile.span();
                for epoch in &mut epochs[first..] {
                    // A read conflicts only with writes; a write with both.
                    let bases = [Epoch::slot(tile.space, true, 0), Epoch::slot(tile.space, false, 0)];
                    let kinds = if write { &bases[..] } else { &bases[..1] };
                    let (slab, sets) = (&mut epoch.accesses, &mut epoch.uncovered);
                    for &base in kinds {
                        let mut classes = epoch.present[base / 64];
                        while classes != 0 {
                            let class = classes.trailing_zeros() as u8;
                            classes &= classes - 1;
                            let group = &mut epoch.groups[base + class as usize];
                            if !(group.bounds.0 < end && start < group.bounds.1) {
                                continue;
                            }
                            // A span of this class starts at most 2^(class+1) bytes before it ends.
                            let from = start.saturating_sub(2u64 << class);
                            let lo = group.by_start.partition_point(|k| k.0 < from);
                            let hi = lo + group.by_start[lo..].partition_point(|k| k.0 < end);
                            covered.clear();
                            for &key in &group.by_start[lo..hi] {
                                let a = &mut slab[key.1 as usize];
                                if a.instr as usize == i || !overlap(&a.tile, &tile) {
                                    continue;
                                }
                                if !ordered_before_me(a.instr) {
                                    let other = program.instrs[a.instr as usize].op.name();
                                    let mine = if write { "writes" } else { "reads" };
                                    let theirs = if a.write { "writes" } else { "reads" };
                                    return Err(fail(format!(
                                        "{mine} {tile}, which instruction {} ({other}) {theirs} at {}, and neither waits \
                                         for the other: add {} to this instruction's deps",
                                        a.instr, a.tile, a.instr
                                    )));
                                }
                                if write && (covers(&tile, &a.tile) || overwrite(a, sets, &tile)) {
                                    covered.push(key);
                                }
                            }
                            // Writes that cover an older access (ordered before them) supersede it.
                            if !covered.is_empty() {
                                let keys = &mut group.by_start;
                                let mut kept = lo;
                                for r in lo..hi {
                                    if !covered.contains(&keys[r]) {
                                        keys[kept] = keys[r];
                                        kept += 1;
                                    }
                                }
                                keys.drain(kept..hi);
                            }
                        }
                    }
                }
                epochs.last_mut().expect("there is always an epoch").add(tile, i as u32, write);
            }
            // A barrier ordered after all but a few earlier instructions (a gradient bucket's
            // all-reduce still running beside the backward pass) starts an epoch too: those
            // few instructions' accesses are carried into it.
            let large = epochs.last().is_some_and(|e| e.accesses.len() >= MIN_EPOCH_ACCESSES);
            let pending: u32 = counters.iter().zip(clock).map(|(c, k)| c - k).sum();
            if large && pending as usize <= MAX_CARRIED {
                let mut epoch = Epoch::recycled(i, spare.pop().unwrap_or_default());
                epoch.carry(program, on_unit, clock, &counters);
                epochs.push(epoch);
                // Epochs older than the newest barrier every unit's next instruction is
                // ordered after can never be queried again.
                let live = upcoming
                    .iter()
                    .flatten()
                    .map(|&r| newest_after(&epochs, clocks.of_instr(r as usize)))
                    .min()
                    .unwrap_or(epochs.len() - 1);
                spare.extend(epochs.drain(..live));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::testing::{bytes, numbers};

    #[test]
    fn overlap_and_cover_match_brute_force() {
        let mut next = numbers(12345);
        for _ in 0..20_000 {
            let mut tile = || {
                let dtype = if next(2) == 0 { DType::F32 } else { DType::Bf16 };
                let cols = 1 + next(6) as u32;
                // Read views may have overlapping rows (stride < cols), even repeat one row.
                let stride = (cols + next(5) as u32).saturating_sub(2);
                Tile {
                    space: Space::Vmem,
                    offset: next(40) * dtype.size(),
                    rows: 1 + next(5) as u32,
                    cols,
                    stride,
                    dtype,
                }
            };
            let (a, b) = (tile(), tile());
            let (ba, bb) = (bytes(&a), bytes(&b));
            assert_eq!(overlap(&a, &b), !ba.is_disjoint(&bb), "{a:?} {b:?}");
            if a.stride >= a.cols && covers(&a, &b) {
                assert!(bb.is_subset(&ba), "covers claims {a:?} covers {b:?}");
            }
        }
    }
}

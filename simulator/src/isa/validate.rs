//! Program validation: every tile in bounds and aligned, shapes that fit each op, units that
//! exist, dependencies that point backwards, and no data races — two instructions that touch
//! overlapping bytes, at least one writing, with neither ordered before the other.
//!
//! Ordering ("happens before") is program order on the same unit (units run in order; the MXU
//! interlocks on its own results) plus declared dependencies, transitively. It is tracked with
//! one vector clock per instruction, and races are found FastTrack-style: each access is checked
//! against the last writes and the reads since, of overlapping bytes.

use std::collections::{BTreeSet, HashMap};

use super::coverage::Uncovered;
use super::*;
use crate::config::Machine;
use crate::error::{Error, Result};

struct Checker<'a> {
    machine: &'a Machine,
    index: usize,
    op: &'static str,
}

impl Checker<'_> {
    fn fail(&self, reason: String) -> Error {
        Error::Program { index: self.index, op: self.op, reason }
    }

    fn tile(&self, what: &str, t: &Tile) -> Result<()> {
        if t.rows == 0 || t.cols == 0 {
            return Err(self.fail(format!("{what} {t} is empty")));
        }
        if t.stride < t.cols && what == "written operand" {
            return Err(
                self.fail(format!("{what} {t} has a row stride {} shorter than its {} columns", t.stride, t.cols))
            );
        }
        if !t.offset.is_multiple_of(t.dtype.size()) {
            return Err(self.fail(format!(
                "{what} {t} starts at byte {}, not a multiple of its element size {}",
                t.offset,
                t.dtype.size()
            )));
        }
        let (capacity, field) = match t.space {
            Space::Hbm => (self.machine.core.hbm.bytes, "core.hbm.bytes"),
            Space::Vmem => (self.machine.core.vmem_bytes, "core.vmem_bytes"),
        };
        let (_, end) = t.span();
        if end > capacity {
            let space = if t.space == Space::Hbm { "HBM" } else { "VMEM" };
            return Err(self.fail(format!(
                "{what} {t} ends at byte {end} but {space} holds {capacity} bytes ({field}): the buffer does not fit"
            )));
        }
        Ok(())
    }

    fn in_vmem(&self, what: &str, t: &Tile) -> Result<()> {
        if t.space != Space::Vmem {
            return Err(self.fail(format!("{what} {t} must be in VMEM (the MXU and VPU read and write only VMEM)")));
        }
        Ok(())
    }

    fn disjoint(&self, what: &str, a: &Tile, b: &Tile) -> Result<()> {
        if overlap(a, b) {
            return Err(self.fail(format!("{what}: {a} and {b} overlap")));
        }
        Ok(())
    }

    /// In-place elementwise ops may write exactly their input; any other overlap is an error.
    fn disjoint_or_same(&self, dst: &Tile, src: &Tile) -> Result<()> {
        if dst != src && overlap(dst, src) {
            return Err(self.fail(format!(
                "the destination {dst} partly overlaps the source {src} (only exact in-place is allowed)"
            )));
        }
        Ok(())
    }

    /// `b` has `a`'s shape, or is one row (broadcast over rows) or one column (over columns).
    fn broadcastable(&self, a: &Tile, b: &Tile) -> Result<()> {
        if a.same_shape(b) || (b.rows == 1 && b.cols == a.cols) || (b.cols == 1 && b.rows == a.rows) {
            return Ok(());
        }
        Err(self.fail(format!(
            "b {b} must have a's shape {}x{}, or be one row of {} or one column of {} to broadcast",
            a.rows, a.cols, a.cols, a.rows
        )))
    }

    fn same_shape(&self, what: &str, a: &Tile, b: &Tile) -> Result<()> {
        if !a.same_shape(b) {
            return Err(self.fail(format!("{what}: {a} and {b} have different shapes")));
        }
        Ok(())
    }

    /// `input` holds `n` images of `h × w` pixels as rows, `output` their pooled windows.
    fn pool_geometry(&self, shape: &PoolShape, input: &Tile, output: &Tile) -> Result<()> {
        let s = shape;
        if s.window.contains(&0) || s.strides.contains(&0) || s.h == 0 || s.w == 0 || s.n == 0 {
            return Err(self.fail(format!("pool geometry {s:?} has a zero size")));
        }
        let fits = |size: u32, win: u32, stride: u32, pad: u32, out: u32| {
            out >= 1 && (out - 1) * stride < size + pad && pad < win
        };
        if !fits(s.h, s.window[0], s.strides[0], s.pad[0], s.out_h)
            || !fits(s.w, s.window[1], s.strides[1], s.pad[1], s.out_w)
        {
            return Err(self
                .fail(format!("pool output {}x{} does not fit a {}x{} image with {s:?}", s.out_h, s.out_w, s.h, s.w)));
        }
        if input.rows != s.n * s.h * s.w || output.rows != s.n * s.out_h * s.out_w || input.cols != output.cols {
            return Err(self.fail(format!(
                "input {input} must be {}x{c} and output {output} {}x{c} for {} images of {}x{} pooled to {}x{}",
                s.n * s.h * s.w,
                s.n * s.out_h * s.out_w,
                s.n,
                s.h,
                s.w,
                s.out_h,
                s.out_w,
                c = input.cols
            )));
        }
        Ok(())
    }

    fn op(&self, op: &Operation) -> Result<()> {
        // A read view may have overlapping rows (a sliding window: stride < cols); a written
        // tile may not, or two rows would write the same bytes.
        for t in op.reads().iter() {
            self.tile("operand", t)?;
        }
        for t in op.writes().iter() {
            self.tile("written operand", t)?;
        }
        match op {
            Operation::Dma { engine, src, dst, repeat } => {
                if let Some(r) = repeat
                    && r.count == 0
                {
                    return Err(self.fail("a repeated DMA needs a count of at least 1".into()));
                }
                if *engine as usize >= self.machine.core.dma.engines {
                    return Err(self.fail(format!(
                        "DMA engine {engine} does not exist (the core has {}, core.dma.engines)",
                        self.machine.core.dma.engines
                    )));
                }
                // A DMA between element types converts: bf16 widens to f32 exactly, f32 narrows
                // to bf16 rounding to nearest even.
                self.same_shape("source and destination", src, dst)?;
                for (s, d) in op.reads().iter().zip(op.writes().iter()) {
                    self.disjoint("source and destination", s, d)?;
                }
                Ok(())
            }
            Operation::MatMul { mxu, lhs, rhs, out, .. } => {
                if *mxu as usize >= self.machine.core.mxu.count {
                    return Err(self.fail(format!(
                        "MXU {mxu} does not exist (the core has {}, core.mxu.count)",
                        self.machine.core.mxu.count
                    )));
                }
                for (what, t) in [("lhs", lhs), ("rhs", rhs), ("out", out)] {
                    self.in_vmem(what, t)?;
                }
                if lhs.cols != rhs.rows || out.rows != lhs.rows || out.cols != rhs.cols {
                    return Err(self.fail(format!(
                        "shapes do not multiply: {}x{} times {}x{} into {}x{}",
                        lhs.rows, lhs.cols, rhs.rows, rhs.cols, out.rows, out.cols
                    )));
                }
                if out.dtype != DType::F32 {
                    return Err(self.fail(format!("out {out} must be f32 (the MXU accumulates in f32)")));
                }
                self.disjoint("out and lhs", out, lhs)?;
                self.disjoint("out and rhs", out, rhs)
            }
            Operation::Unary { src, dst, .. } => {
                self.in_vmem("src", src)?;
                self.in_vmem("dst", dst)?;
                self.same_shape("src and dst", src, dst)?;
                self.disjoint_or_same(dst, src)
            }
            Operation::Binary { a, b, dst, .. } => {
                for (what, t) in [("a", a), ("b", b), ("dst", dst)] {
                    self.in_vmem(what, t)?;
                }
                self.same_shape("a and dst", a, dst)?;
                self.broadcastable(a, b)?;
                self.disjoint_or_same(dst, a)?;
                self.disjoint_or_same(dst, b)
            }
            Operation::MulAdd { a, b, acc } => {
                for (what, t) in [("a", a), ("b", b), ("acc", acc)] {
                    self.in_vmem(what, t)?;
                }
                self.same_shape("a and acc", a, acc)?;
                self.broadcastable(a, b)?;
                self.disjoint("acc and a", acc, a)?;
                self.disjoint("acc and b", acc, b)
            }
            Operation::Fill { dst, value } => {
                self.in_vmem("dst", dst)?;
                if value.is_nan() {
                    return Err(self.fail("fill value is NaN".into()));
                }
                Ok(())
            }
            Operation::Reduce { axis, src, dst, .. } => {
                self.in_vmem("src", src)?;
                self.in_vmem("dst", dst)?;
                let want = match axis {
                    Axis::Rows => (1, src.cols),
                    Axis::Cols => (src.rows, 1),
                };
                if (dst.rows, dst.cols) != want {
                    return Err(
                        self.fail(format!("dst {dst} must be {}x{} to reduce {src} over {axis:?}", want.0, want.1))
                    );
                }
                self.disjoint("src and dst", src, dst)
            }
            Operation::Pool { shape, src, dst, .. } => {
                self.in_vmem("src", src)?;
                self.in_vmem("dst", dst)?;
                self.pool_geometry(shape, src, dst)?;
                self.disjoint("src and dst", src, dst)
            }
            Operation::PoolGrad { op, shape, x, dy, dst } => {
                self.in_vmem("dy", dy)?;
                self.in_vmem("dst", dst)?;
                self.pool_geometry(shape, dst, dy)?;
                self.disjoint("dy and dst", dy, dst)?;
                match (op, x) {
                    (PoolOp::Max, None) => {
                        Err(self.fail("a max-pool gradient needs x, the forward input, to find each maximum".into()))
                    }
                    (_, Some(x)) => {
                        self.in_vmem("x", x)?;
                        self.same_shape("x and dst", x, dst)?;
                        self.disjoint("x and dst", x, dst)
                    }
                    (PoolOp::Avg, None) => Ok(()),
                }
            }
            Operation::Transpose { src, dst } => {
                self.in_vmem("src", src)?;
                self.in_vmem("dst", dst)?;
                if dst.rows != src.cols || dst.cols != src.rows {
                    return Err(
                        self.fail(format!("dst {dst} must be {}x{}, the transpose of {src}", src.cols, src.rows))
                    );
                }
                self.disjoint("src and dst", src, dst)
            }
            Operation::Dropout { rate, step, src, dst, .. } => {
                for (what, t) in [("src", src), ("dst", dst), ("step", step)] {
                    self.in_vmem(what, t)?;
                }
                self.same_shape("src and dst", src, dst)?;
                if (step.rows, step.cols) != (1, 1) {
                    return Err(self.fail(format!("step {step} must be one value (1x1)")));
                }
                if !(0.0..1.0).contains(rate) {
                    return Err(self.fail(format!("dropout rate {rate} must be in [0, 1)")));
                }
                self.disjoint_or_same(dst, src)?;
                self.disjoint("dst and step", dst, step)
            }
            Operation::Barrier => Ok(()),
            Operation::Collective { kind, reduction, tiles, replicas } => {
                if *replicas == 0 {
                    return Err(self.fail(format!("{} needs a group of at least one replica", kind.name())));
                }
                if tiles.is_empty() {
                    return Err(self.fail(format!("{} needs at least one tile", kind.name())));
                }
                if !kind.reduces() && *reduction != Reduction::Sum {
                    return Err(self.fail(format!(
                        "{} moves values without combining them: give the reduction Sum, not {reduction:?}",
                        kind.name()
                    )));
                }
                for (i, &t) in tiles.iter().enumerate() {
                    if t.space != Space::Hbm || t.dtype != DType::F32 {
                        return Err(self.fail(format!("tile {t} must be f32 in HBM (collectives move HBM tensors)")));
                    }
                    for &u in &tiles[..i] {
                        self.disjoint("the tiles of a collective", &t, &u)?;
                    }
                }
                Ok(())
            }
            Operation::Infeed { dst: t } | Operation::Outfeed { src: t } => {
                if t.space != Space::Hbm {
                    return Err(self.fail(format!("{t} must be in HBM (the host link reaches HBM)")));
                }
                Ok(())
            }
        }
    }
}

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
    groups: Vec<Group>,
    /// Every access the epoch has held (the groups index the active ones).
    accesses: Vec<Access>,
}

/// The active accesses of one space, kind and length class, by span start.
struct Group {
    space: Space,
    write: bool,
    class: u8,
    /// The union of the spans ever added: a query outside it skips the group.
    bounds: (u64, u64),
    /// (span start, index into the epoch's `accesses`).
    by_start: BTreeSet<(u64, u32)>,
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

impl Epoch {
    /// Indexes an access of instruction `instr`.
    fn add(&mut self, tile: Tile, instr: u32, write: bool) {
        let (start, end) = tile.span();
        let class = class_of(end - start);
        let key = (start, self.accesses.len() as u32);
        self.accesses.push(Access { tile, instr, write, uncovered: Uncovered::of(&tile) });
        match self.groups.iter_mut().find(|g| g.space == tile.space && g.write == write && g.class == class) {
            Some(g) => {
                g.by_start.insert(key);
                g.bounds = (g.bounds.0.min(start), g.bounds.1.max(end));
            }
            None => self.groups.push(Group {
                space: tile.space,
                write,
                class,
                bounds: (start, end),
                by_start: BTreeSet::from([key]),
            }),
        }
    }
}

#[derive(Clone, Copy)]
struct Access {
    tile: Tile,
    instr: u32,
    write: bool,
    /// The bytes no later write (ordered after this access) has overwritten yet; once empty,
    /// the access can be forgotten.
    uncovered: Uncovered,
}

impl Program {
    /// Checks the program against a machine; the error names the instruction and what to change.
    pub fn validate(&self, machine: &Machine) -> Result<()> {
        // Unit indices for the vector clocks.
        let mut units: HashMap<Unit, usize> = HashMap::new();
        for instr in &self.instrs {
            let next = units.len();
            units.entry(instr.op.unit()).or_insert(next);
        }
        let n_units = units.len();
        let mut clocks: Vec<u32> = Vec::with_capacity(self.instrs.len() * n_units);
        let mut seq_of: Vec<u32> = Vec::with_capacity(self.instrs.len());
        let mut unit_of: Vec<usize> = Vec::with_capacity(self.instrs.len());
        let mut last_on_unit: Vec<Option<usize>> = vec![None; n_units];
        let mut counters = vec![0u32; n_units];
        // Active accesses, in epochs: an epoch starts at a full barrier (an instruction ordered
        // after every earlier one), so an instruction ordered after that barrier need not look
        // at older epochs. Accesses overwritten by later writes leave the index (`coverage`).
        let mut epochs: Vec<Epoch> = vec![Epoch::default()];
        let mut covered: Vec<(u64, u32)> = Vec::new();
        // Each unit's instructions in order (its sequence number minus one is the index).
        let mut on_unit: Vec<Vec<u32>> = vec![Vec::new(); n_units];

        for (i, instr) in self.instrs.iter().enumerate() {
            let checker = Checker { machine, index: i, op: instr.op.name() };
            checker.op(&instr.op)?;
            let u = units[&instr.op.unit()];
            let mut clock = vec![0u32; n_units];
            let join = |other: usize, clock: &mut Vec<u32>| {
                for (c, &o) in clock.iter_mut().zip(&clocks[other * n_units..(other + 1) * n_units]) {
                    *c = (*c).max(o);
                }
            };
            for &d in &instr.deps {
                if d as usize >= i {
                    return Err(checker.fail(format!(
                        "depends on instruction {d}, which is not earlier; dependencies must point to earlier instructions"
                    )));
                }
                join(d as usize, &mut clock);
            }
            if let Some(prev) = last_on_unit[u] {
                join(prev, &mut clock);
            }
            counters[u] += 1;
            clock[u] = counters[u];
            clocks.extend_from_slice(&clock);
            seq_of.push(counters[u]);
            unit_of.push(u);
            last_on_unit[u] = Some(i);
            let ordered_before_me = |j: u32| clock[unit_of[j as usize]] >= seq_of[j as usize];

            let accesses = instr
                .op
                .reads()
                .into_iter()
                .map(|t| (t, false))
                .chain(instr.op.writes().into_iter().map(|t| (t, true)));
            // The newest epoch whose barrier this instruction is ordered after.
            let first = epochs.iter().rposition(|e| e.barrier.is_none_or(|b| ordered_before_me(b as u32))).unwrap_or(0);
            for (tile, write) in accesses {
                let (start, end) = tile.span();
                for epoch in &mut epochs[first..] {
                    // A read conflicts only with writes; a write with both.
                    let relevant = |g: &&mut Group| {
                        g.space == tile.space && (write || g.write) && g.bounds.0 < end && start < g.bounds.1
                    };
                    let slab = &mut epoch.accesses;
                    for group in epoch.groups.iter_mut().filter(relevant) {
                        let from = start.saturating_sub(2u64 << group.class);
                        covered.clear();
                        for &key in group.by_start.range((from, 0)..(end, 0)) {
                            let a = &mut slab[key.1 as usize];
                            if a.instr as usize == i || !overlap(&a.tile, &tile) {
                                continue;
                            }
                            if !ordered_before_me(a.instr) {
                                let other = &self.instrs[a.instr as usize].op;
                                let (mine, theirs) =
                                    (if write { "writes" } else { "reads" }, if a.write { "writes" } else { "reads" });
                                return Err(checker.fail(format!(
                                    "{mine} {tile}, which instruction {} ({}) {theirs} at {}, and neither waits for the other: \
                                     add {} to this instruction's deps",
                                    a.instr,
                                    other.name(),
                                    a.tile,
                                    a.instr
                                )));
                            }
                            if write {
                                a.uncovered.subtract(&tile);
                                if a.uncovered.is_empty() || covers(&tile, &a.tile) {
                                    covered.push(key);
                                }
                            }
                        }
                        // Writes that cover an older access (ordered before them) supersede it.
                        for key in &covered {
                            group.by_start.remove(key);
                        }
                    }
                }
                epochs.last_mut().expect("there is always an epoch").add(tile, i as u32, write);
            }
            on_unit[u].push(i as u32);
            // A barrier ordered after all but a few earlier instructions (a gradient bucket's
            // all-reduce still running beside the backward pass) starts an epoch too: those
            // few instructions' accesses are carried into it.
            let large = epochs.last().is_some_and(|e| e.accesses.len() >= MIN_EPOCH_ACCESSES);
            let pending: u32 = counters.iter().zip(&clock).map(|(c, k)| c - k).sum();
            if large && pending as usize <= MAX_CARRIED {
                let mut epoch = Epoch { barrier: Some(i), ..Epoch::default() };
                for (v, unit) in on_unit.iter().enumerate() {
                    for &j in &unit[clock[v] as usize..counters[v] as usize] {
                        let op = &self.instrs[j as usize].op;
                        op.reads().into_iter().for_each(|t| epoch.add(t, j, false));
                        op.writes().into_iter().for_each(|t| epoch.add(t, j, true));
                    }
                }
                epochs.push(epoch);
                // Every later instruction follows its unit's last one: epochs older than the
                // newest barrier all those are ordered after can never be queried again (a
                // unit yet to run anything could start unordered: then all stay).
                let live = (0..n_units)
                    .map(|v| {
                        let Some(l) = last_on_unit[v] else { return 0 };
                        let c = &clocks[l * n_units..(l + 1) * n_units];
                        epochs.iter().rposition(|e| e.barrier.is_none_or(|b| c[unit_of[b]] >= seq_of[b])).unwrap_or(0)
                    })
                    .min()
                    .unwrap_or(0);
                epochs.drain(..live);
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

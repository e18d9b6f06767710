//! Program validation: every tile in bounds and aligned, shapes that fit each op, units that
//! exist, dependencies that point backwards, and no data races (`races`).

use super::races::{self, overlap};
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
            Operation::Collective { kind, reduction, tiles, shard, replicas } => {
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
                for (i, &t) in tiles.iter().chain(shard).enumerate() {
                    if t.space != Space::Hbm || t.dtype != DType::F32 {
                        return Err(self.fail(format!("tile {t} must be f32 in HBM (collectives move HBM tensors)")));
                    }
                    for &u in &tiles[..i.min(tiles.len())] {
                        self.disjoint("the tiles of a collective", &t, &u)?;
                    }
                }
                let takes_shard = matches!(kind, CollectiveKind::ReduceScatter | CollectiveKind::AllGather);
                match shard {
                    None if *kind == CollectiveKind::Shard => {
                        Err(self.fail("shard needs a shard tile to copy this replica's shard to".into()))
                    }
                    Some(_) if !takes_shard && *kind != CollectiveKind::Shard => Err(self.fail(format!(
                        "{} works in place: give no shard tile (only reduce-scatter, all-gather and shard take one)",
                        kind.name()
                    ))),
                    Some(s) => {
                        let elements: u64 = tiles.iter().map(|t| t.elements()).sum();
                        let longest = elements.div_ceil(u64::from(*replicas).max(1));
                        if s.elements() < longest {
                            return Err(self.fail(format!(
                                "shard tile {s} holds {} elements but the longest of {replicas} shards of {elements} has {longest}",
                                s.elements()
                            )));
                        }
                        Ok(())
                    }
                    None => Ok(()),
                }
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

impl Program {
    /// Checks the program against a machine; the error names the instruction and what to change.
    pub fn validate(&self, machine: &Machine) -> Result<()> {
        races::check(self, |i| self.check_instruction(machine, i))
    }

    /// [`Program::validate`] with the race check split into pieces of at least
    /// `min_piece` instructions, checked in parallel (any split fails at the same instruction;
    /// the earlier instruction the message names may differ).
    #[doc(hidden)]
    pub fn validate_in_pieces(&self, machine: &Machine, min_piece: usize) -> Result<()> {
        races::check_in_pieces(self, |i| self.check_instruction(machine, i), min_piece)
    }

    fn check_instruction(&self, machine: &Machine, i: usize) -> Result<()> {
        let op = &self.instrs[i].op;
        Checker { machine, index: i, op: op.name() }.op(op)
    }
}

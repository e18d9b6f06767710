//! The functional engine: runs a validated program on real data.
//!
//! Memories hold bytes (f32 or bf16 elements, little-endian) and grow on demand up to their
//! capacity, so an 8 GiB HBM costs only what a program touches. Instructions execute in
//! program order: validation has proved the program race-free, so any order its dependencies
//! allow gives these same values. The MXU follows the numerics contract bit for bit
//! ([`crate::mxu::kernel`]); the VPU computes in f32.

use crate::config::Machine;
use crate::error::{Error, Result};
use crate::isa::*;
use crate::mxu::kernel::{Matrix, matmul};
use crate::numerics::bf16_bits;

/// One memory space's bytes.
#[derive(Clone, Debug, Default)]
struct Memory {
    bytes: Vec<u8>,
}

impl Memory {
    fn ensure(&mut self, end: u64) {
        if self.bytes.len() < end as usize {
            self.bytes.resize(end as usize, 0);
        }
    }

    /// Byte offset of row `r` of `t`.
    fn row_start(t: &Tile, r: usize) -> usize {
        t.offset as usize + r * t.stride as usize * t.dtype.size() as usize
    }

    fn read(&self, t: &Tile) -> Vec<f32> {
        let (cols, size) = (t.cols as usize, t.dtype.size() as usize);
        let mut out = Vec::with_capacity(t.elements() as usize);
        for r in 0..t.rows as usize {
            let start = Self::row_start(t, r);
            // Bytes never written read as zero (memory grows on demand).
            let have = self.bytes.len().saturating_sub(start).min(cols * size) / size;
            let row = &self.bytes[start.min(self.bytes.len())..][..have * size];
            match t.dtype {
                DType::F32 => out.extend(row.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                DType::Bf16 => out.extend(
                    row.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
                ),
            }
            out.resize(out.len() + cols - have, 0.0);
        }
        out
    }

    fn write(&mut self, t: &Tile, values: &[f32]) {
        self.ensure(t.span().1);
        let (cols, size) = (t.cols as usize, t.dtype.size() as usize);
        for (r, row_values) in values.chunks_exact(cols).enumerate().take(t.rows as usize) {
            let start = Self::row_start(t, r);
            let row = &mut self.bytes[start..start + cols * size];
            match t.dtype {
                DType::F32 => {
                    row.chunks_exact_mut(4).zip(row_values).for_each(|(b, v)| b.copy_from_slice(&v.to_le_bytes()))
                }
                DType::Bf16 => row
                    .chunks_exact_mut(2)
                    .zip(row_values)
                    .for_each(|(b, &v)| b.copy_from_slice(&bf16_bits(v).to_le_bytes())),
            }
        }
    }
}

/// A DMA between tiles of one type whose bytes exist and do not overlap: row by row, bytes
/// as they are (what `read` then `write` would give, without decoding). `None` when the fast
/// path does not apply.
fn copy_bytes(src_mem: &[u8], dst_mem: &mut Memory, src: &Tile, dst: &Tile) -> Option<()> {
    if src.dtype != dst.dtype || src.span().1 as usize > src_mem.len() {
        return None;
    }
    dst_mem.ensure(dst.span().1);
    let len = src.cols as usize * src.dtype.size() as usize;
    for r in 0..src.rows as usize {
        let (from, to) = (Memory::row_start(src, r), Memory::row_start(dst, r));
        dst_mem.bytes[to..to + len].copy_from_slice(&src_mem[from..from + len]);
    }
    Some(())
}

/// How far a run reaches into each memory, (HBM, VMEM) bytes: the end of the furthest tile the
/// program or the host touches. The engine's memories grow to exactly this
/// ([`Functional::reserve`]), so it is what a run holds on the host.
pub fn footprint<'a>(program: &Program, host_tiles: impl IntoIterator<Item = &'a Tile>) -> (u64, u64) {
    let mut end = [0u64; 2];
    let mut touch = |t: &Tile| {
        let i = usize::from(t.space == Space::Vmem);
        end[i] = end[i].max(t.span().1);
    };
    for instr in &program.instrs {
        instr.op.reads().iter().chain(&instr.op.writes()).for_each(&mut touch);
    }
    host_tiles.into_iter().for_each(touch);
    (end[0], end[1])
}

/// Host time per instruction kind: (kind, instructions run, seconds).
pub type Profile = Vec<(&'static str, u64, f64)>;

/// A core's memories and the machine they belong to.
pub struct Functional {
    machine: Machine,
    hbm: Memory,
    vmem: Memory,
    /// Per instruction kind: how many ran and the host seconds they took (when profiling).
    profile: Option<std::collections::BTreeMap<&'static str, (u64, f64)>>,
}

impl Functional {
    pub fn new(machine: &Machine) -> Functional {
        Functional { machine: machine.clone(), hbm: Memory::default(), vmem: Memory::default(), profile: None }
    }

    /// Times every instruction from now on, by kind ([`Self::profile`]).
    pub fn enable_profile(&mut self) {
        self.profile.get_or_insert_default();
    }

    /// Per instruction kind (`dma`, `matmul`, ...): how many ran and the host seconds they took.
    pub fn profile(&self) -> Profile {
        self.profile.iter().flatten().map(|(&kind, &(n, secs))| (kind, n, secs)).collect()
    }

    /// Sizes the memories for a run whose [`footprint`] is given, once, so they never grow
    /// (and never hold the spare capacity of a growing vector).
    pub fn reserve(&mut self, (hbm, vmem): (u64, u64)) {
        for (memory, end) in [(&mut self.hbm, hbm), (&mut self.vmem, vmem)] {
            let extra = (end as usize).saturating_sub(memory.bytes.len());
            memory.bytes.reserve_exact(extra);
        }
    }

    fn memory(&mut self, space: Space) -> &mut Memory {
        match space {
            Space::Hbm => &mut self.hbm,
            Space::Vmem => &mut self.vmem,
        }
    }

    fn check(&self, t: &Tile, values: Option<usize>) -> Result<()> {
        let capacity = match t.space {
            Space::Hbm => self.machine.core.hbm.bytes,
            Space::Vmem => self.machine.core.vmem_bytes,
        };
        if t.rows == 0 || t.cols == 0 || t.stride < t.cols || t.span().1 > capacity {
            return Err(Error::Data(format!("tile {t} is empty, malformed or beyond the memory's {capacity} bytes")));
        }
        if let Some(n) = values
            && n as u64 != t.elements()
        {
            return Err(Error::Data(format!("{n} values given for tile {t} of {} elements", t.elements())));
        }
        Ok(())
    }

    /// Stores row-major `values` into a tile (rounded to bf16 for bf16 tiles).
    pub fn write(&mut self, t: Tile, values: &[f32]) -> Result<()> {
        self.check(&t, Some(values.len()))?;
        self.memory(t.space).write(&t, values);
        Ok(())
    }

    /// Reads a tile as row-major f32 values.
    pub fn read(&mut self, t: Tile) -> Result<Vec<f32>> {
        self.check(&t, None)?;
        Ok(self.memory(t.space).read(&t))
    }

    /// Validates and runs a program. A collective over more than one replica is an error
    /// here: only a slice ([`crate::pod::slice`]) has the other replicas.
    pub fn run(&mut self, program: &Program) -> Result<()> {
        program.validate(&self.machine)?;
        match self.run_until_collective(program, 0)? {
            None => Ok(()),
            Some(i) => {
                let Operation::Collective { kind, replicas, .. } = &program.instrs[i].op else {
                    unreachable!("runs pause only at collectives")
                };
                Err(Error::Program {
                    index: i,
                    op: program.instrs[i].op.name(),
                    reason: format!(
                        "{} over {replicas} replicas needs the other replicas: run the slice (pod::slice)",
                        kind.name()
                    ),
                })
            }
        }
    }

    /// Runs a validated program from instruction `from` up to the next collective over more
    /// than one replica, whose index it returns (the slice executes it, then resumes after
    /// it), or to the end (`None`).
    pub fn run_until_collective(&mut self, program: &Program, from: usize) -> Result<Option<usize>> {
        let total = program.instrs.len() as u64;
        for (i, instr) in program.instrs.iter().enumerate().skip(from) {
            if let Operation::Collective { replicas, .. } = instr.op
                && replicas > 1
            {
                return Ok(Some(i));
            }
            if i % 1024 == 0 {
                crate::progress::report("functional engine (instructions)", i as u64, total);
            }
            let start = self.profile.is_some().then(std::time::Instant::now);
            self.execute(&instr.op).map_err(|reason| Error::Program { index: i, op: instr.op.name(), reason })?;
            if let (Some(start), Some(profile)) = (start, &mut self.profile) {
                let entry = profile.entry(instr.op.name()).or_default();
                entry.0 += 1;
                entry.1 += start.elapsed().as_secs_f64();
            }
        }
        crate::progress::report("functional engine (instructions)", total, total);
        Ok(None)
    }

    fn execute(&mut self, op: &Operation) -> std::result::Result<(), String> {
        match *op {
            Operation::Dma { src, dst, repeat, .. } => {
                let (count, src_step, dst_step) =
                    repeat.map_or((1, 0, 0), |r| (r.count as u64, r.src_step, r.dst_step));
                for i in 0..count {
                    let s = Tile { offset: src.offset + i * src_step, ..src };
                    let d = Tile { offset: dst.offset + i * dst_step, ..dst };
                    let copied = match (s.space, d.space) {
                        (Space::Hbm, Space::Vmem) => copy_bytes(&self.hbm.bytes, &mut self.vmem, &s, &d),
                        (Space::Vmem, Space::Hbm) => copy_bytes(&self.vmem.bytes, &mut self.hbm, &s, &d),
                        // Within one memory the regions may overlap: decode, then store.
                        _ => None,
                    };
                    if copied.is_none() {
                        let v = self.memory(s.space).read(&s);
                        self.memory(d.space).write(&d, &v);
                    }
                }
            }
            Operation::MatMul { lhs, rhs, out, accumulate, precision, .. } => {
                let a = self.vmem.read(&lhs);
                let b = self.vmem.read(&rhs);
                let mut c = if accumulate { self.vmem.read(&out) } else { vec![0.0; out.elements() as usize] };
                let (m, k, n) = (lhs.rows as usize, lhs.cols as usize, rhs.cols as usize);
                matmul(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut c, n, self.machine.core.mxu.rows, precision);
                self.vmem.write(&out, &c);
            }
            Operation::Unary { op, src, dst } => {
                let mut v = self.vmem.read(&src);
                unary_slice(op, &mut v);
                self.vmem.write(&dst, &v);
            }
            Operation::Binary { op, a, b, dst } => {
                let (mut av, bv) = (self.vmem.read(&a), self.vmem.read(&b));
                binary_slice(op, &mut av, &bv, a.cols as usize, Broadcast::of(&a, &b));
                self.vmem.write(&dst, &av);
            }
            Operation::MulAdd { a, b, acc } => {
                let (av, bv, mut cv) = (self.vmem.read(&a), self.vmem.read(&b), self.vmem.read(&acc));
                let (mode, cols) = (Broadcast::of(&a, &b), a.cols as usize);
                for (i, c) in cv.iter_mut().enumerate() {
                    *c = av[i].mul_add(bv[mode.index(i, cols)], *c);
                }
                self.vmem.write(&acc, &cv);
            }
            Operation::Fill { dst, value } => {
                self.vmem.write(&dst, &vec![value; dst.elements() as usize]);
            }
            Operation::Reduce { op, axis, src, dst } => {
                let v = self.vmem.read(&src);
                let (rows, cols) = (src.rows as usize, src.cols as usize);
                let init = match op {
                    ReduceOp::Sum => 0.0,
                    ReduceOp::Max => f32::NEG_INFINITY,
                };
                let combine = |acc: f32, x: f32| match op {
                    ReduceOp::Sum => acc + x,
                    ReduceOp::Max => acc.max(x),
                };
                let out: Vec<f32> = match axis {
                    Axis::Rows => {
                        (0..cols).map(|c| (0..rows).fold(init, |acc, r| combine(acc, v[r * cols + c]))).collect()
                    }
                    Axis::Cols => (0..rows)
                        .map(|r| v[r * cols..(r + 1) * cols].iter().fold(init, |acc, &x| combine(acc, x)))
                        .collect(),
                };
                self.vmem.write(&dst, &out);
            }
            Operation::Pool { op, shape, src, dst } => {
                let v = self.vmem.read(&src);
                let out = pool(op, &shape, &v, src.cols as usize);
                self.vmem.write(&dst, &out);
            }
            Operation::PoolGrad { op, shape, x, dy, dst } => {
                let d = self.vmem.read(&dy);
                let xv = x.map(|x| self.vmem.read(&x));
                let out = pool_grad(op, &shape, xv.as_deref(), &d, dst.cols as usize);
                self.vmem.write(&dst, &out);
            }
            Operation::Transpose { src, dst } => {
                let v = self.vmem.read(&src);
                let (rows, cols) = (src.rows as usize, src.cols as usize);
                let t: Vec<f32> =
                    (0..cols).flat_map(|c| (0..rows).map(move |r| (r, c))).map(|(r, c)| v[r * cols + c]).collect();
                self.vmem.write(&dst, &t);
            }
            Operation::Dropout { seed, rate, step, counter, src, dst } => {
                let s = self.vmem.read(&step)[0];
                if !(s >= 0.0 && s.fract() == 0.0 && s < (1u32 << 24) as f32) {
                    return Err(format!(
                        "the step {s} must be a whole number below 2^24 (an f32 counts every step exactly up to there)"
                    ));
                }
                let key = crate::rng::derive(seed, s as u64);
                let cols = src.cols as u64;
                let v: Vec<f32> = self
                    .vmem
                    .read(&src)
                    .into_iter()
                    .enumerate()
                    .map(|(i, x)| {
                        let (r, c) = (i as u64 / cols, i as u64 % cols);
                        x * crate::rng::dropout_scale(rate, key, counter + r * cols + c)
                    })
                    .collect();
                self.vmem.write(&dst, &v);
            }
            Operation::Barrier => {}
            // A group of one: nothing to exchange, but a shard tile takes (or gives) the whole
            // operand. Larger groups pause the run ([`Functional::run_until_collective`]) and
            // the slice executes them.
            Operation::Collective { kind, ref tiles, shard: Some(s), .. } => {
                let mut whole = self.hbm.read(&s);
                let mut at = 0;
                for t in tiles {
                    let n = t.elements() as usize;
                    if kind == CollectiveKind::AllGather {
                        self.hbm.write(t, &whole[at..at + n]);
                    } else {
                        whole[at..at + n].copy_from_slice(&self.hbm.read(t));
                    }
                    at += n;
                }
                if kind != CollectiveKind::AllGather {
                    self.hbm.write(&s, &whole);
                }
            }
            Operation::Collective { shard: None, .. } => {}
            Operation::Infeed { .. } | Operation::Outfeed { .. } => {
                return Err("infeed and outfeed exchange data with a host; run them through the pod simulator".into());
            }
        }
        Ok(())
    }
}

/// Elements per parallel piece of a VPU operation: smaller tiles run on one thread.
const VPU_PIECE: usize = 1 << 15;

/// Applies `f` to every element, in pieces of whole rows on every thread for large tiles
/// (elementwise, so the bits do not depend on the split).
#[inline(always)]
fn each(v: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    use rayon::prelude::*;
    if v.len() > VPU_PIECE {
        v.par_chunks_mut(VPU_PIECE).for_each(|piece| piece.iter_mut().for_each(|x| *x = f(*x)));
    } else {
        v.iter_mut().for_each(|x| *x = f(*x));
    }
}

/// [`unary`] over a slice: one loop per operation, so each loop's body is one operation and
/// vectorises (the `match` resolved outside it).
fn unary_slice(op: UnaryOp, v: &mut [f32]) {
    match op {
        UnaryOp::Copy => {}
        UnaryOp::Relu => each(v, |x| unary(UnaryOp::Relu, x)),
        UnaryOp::Relu6 => each(v, |x| unary(UnaryOp::Relu6, x)),
        UnaryOp::Neg => each(v, |x| unary(UnaryOp::Neg, x)),
        UnaryOp::Exp => each(v, |x| unary(UnaryOp::Exp, x)),
        UnaryOp::Log => each(v, |x| unary(UnaryOp::Log, x)),
        UnaryOp::Sqrt => each(v, |x| unary(UnaryOp::Sqrt, x)),
        UnaryOp::Rsqrt => each(v, |x| unary(UnaryOp::Rsqrt, x)),
        UnaryOp::Square => each(v, |x| unary(UnaryOp::Square, x)),
        UnaryOp::Reciprocal => each(v, |x| unary(UnaryOp::Reciprocal, x)),
        UnaryOp::Cos => each(v, |x| unary(UnaryOp::Cos, x)),
        UnaryOp::Scale(c) => each(v, |x| unary(UnaryOp::Scale(c), x)),
        UnaryOp::AddScalar(c) => each(v, |x| unary(UnaryOp::AddScalar(c), x)),
    }
}

/// How a `Binary` operand `b` pairs with `a`'s elements.
#[derive(Clone, Copy)]
enum Broadcast {
    /// The same shape: element by element.
    Same,
    /// One row, used by every row of `a`.
    Row,
    /// One column: row `r` of `a` uses `b[r]`.
    Column,
}

impl Broadcast {
    /// The element of `b` that element `i` of `a` (rows of `cols`) pairs with.
    fn index(self, i: usize, cols: usize) -> usize {
        match self {
            Broadcast::Same => i,
            Broadcast::Row => i % cols,
            Broadcast::Column => i / cols,
        }
    }

    fn of(a: &Tile, b: &Tile) -> Broadcast {
        if b.rows == 1 && a.rows > 1 {
            Broadcast::Row
        } else if b.cols == 1 && a.cols > 1 {
            Broadcast::Column
        } else {
            Broadcast::Same
        }
    }
}

/// `a = f(a, b)` over rows of `cols`, `b` paired as `mode` says; large tiles in pieces of
/// whole rows on every thread.
#[inline(always)]
fn each_pair(a: &mut [f32], b: &[f32], cols: usize, mode: Broadcast, f: impl Fn(f32, f32) -> f32 + Sync) {
    use rayon::prelude::*;
    let rows_per_piece = (VPU_PIECE / cols.max(1)).max(1);
    let piece = |(p, chunk): (usize, &mut [f32])| {
        let first_row = p * rows_per_piece;
        match mode {
            Broadcast::Same => {
                let bs = &b[first_row * cols..][..chunk.len()];
                chunk.iter_mut().zip(bs).for_each(|(x, &y)| *x = f(*x, y));
            }
            Broadcast::Row => {
                chunk.chunks_exact_mut(cols).for_each(|row| row.iter_mut().zip(b).for_each(|(x, &y)| *x = f(*x, y)))
            }
            Broadcast::Column => chunk
                .chunks_exact_mut(cols)
                .zip(&b[first_row..])
                .for_each(|(row, &y)| row.iter_mut().for_each(|x| *x = f(*x, y))),
        }
    };
    if a.len() > VPU_PIECE && cols > 0 {
        a.par_chunks_mut(rows_per_piece * cols).enumerate().for_each(piece);
    } else {
        piece((0, a));
    }
}

/// [`binary`] over tiles (see [`unary_slice`]).
fn binary_slice(op: BinaryOp, a: &mut [f32], b: &[f32], cols: usize, mode: Broadcast) {
    match op {
        BinaryOp::Add => each_pair(a, b, cols, mode, |x, y| binary(BinaryOp::Add, x, y)),
        BinaryOp::Sub => each_pair(a, b, cols, mode, |x, y| binary(BinaryOp::Sub, x, y)),
        BinaryOp::Mul => each_pair(a, b, cols, mode, |x, y| binary(BinaryOp::Mul, x, y)),
        BinaryOp::Div => each_pair(a, b, cols, mode, |x, y| binary(BinaryOp::Div, x, y)),
        BinaryOp::Max => each_pair(a, b, cols, mode, |x, y| binary(BinaryOp::Max, x, y)),
        BinaryOp::Min => each_pair(a, b, cols, mode, |x, y| binary(BinaryOp::Min, x, y)),
        BinaryOp::MaskPositive => each_pair(a, b, cols, mode, |x, y| binary(BinaryOp::MaskPositive, x, y)),
        BinaryOp::MaskRelu6 => each_pair(a, b, cols, mode, |x, y| binary(BinaryOp::MaskRelu6, x, y)),
    }
}

/// One element of a `Unary` instruction: the compiler's optimizer reference evaluates its
/// scalar programs with this, so both give the same bits.
#[inline(always)]
pub fn unary(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Copy => x,
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Relu6 => x.clamp(0.0, 6.0),
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Square => x * x,
        UnaryOp::Reciprocal => 1.0 / x,
        UnaryOp::Cos => x.cos(),
        UnaryOp::Scale(c) => x * c,
        UnaryOp::AddScalar(c) => x + c,
    }
}

/// One element of a `Binary` instruction (see [`unary`]).
#[inline(always)]
pub fn binary(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::MaskPositive => {
            if a > 0.0 {
                b
            } else {
                0.0
            }
        }
        BinaryOp::MaskRelu6 => {
            if a > 0.0 && a < 6.0 {
                b
            } else {
                0.0
            }
        }
    }
}

/// The in-image taps of window (oh, ow): rows and columns.
fn window_taps(s: &PoolShape, oh: i64, ow: i64) -> (std::ops::Range<i64>, std::ops::Range<i64>) {
    let (h, w) = (s.h as i64, s.w as i64);
    let (h0, w0) = (oh * s.strides[0] as i64 - s.pad[0] as i64, ow * s.strides[1] as i64 - s.pad[1] as i64);
    (h0.max(0)..(h0 + s.window[0] as i64).min(h), w0.max(0)..(w0 + s.window[1] as i64).min(w))
}

/// The pooling gradient (see [`Operation::PoolGrad`]): windows in order, channels independent.
fn pool_grad(op: PoolOp, s: &PoolShape, x: Option<&[f32]>, dy: &[f32], c: usize) -> Vec<f32> {
    let (h, w) = (s.h as i64, s.w as i64);
    let img = (h * w) as usize * c;
    let mut dx = vec![0f32; s.n as usize * img];
    for n in 0..s.n as usize {
        for oh in 0..s.out_h as i64 {
            for ow in 0..s.out_w as i64 {
                let (rows, cols) = window_taps(s, oh, ow);
                let at = |ih: i64, iw: i64, ch: usize| n * img + (ih * w + iw) as usize * c + ch;
                let d = &dy[((n as i64 * s.out_h as i64 + oh) * s.out_w as i64 + ow) as usize * c..][..c];
                match (op, x) {
                    (PoolOp::Max, Some(x)) => {
                        for (ch, &dv) in d.iter().enumerate() {
                            // The first maximum in window order takes the gradient.
                            let mut best: Option<(f32, usize)> = None;
                            for ih in rows.clone() {
                                for iw in cols.clone() {
                                    let i = at(ih, iw, ch);
                                    if best.is_none_or(|(b, _)| x[i] > b) {
                                        best = Some((x[i], i));
                                    }
                                }
                            }
                            if let Some((_, i)) = best {
                                dx[i] += dv;
                            }
                        }
                    }
                    _ => {
                        let count = (rows.end - rows.start) as f32 * (cols.end - cols.start) as f32;
                        for ih in rows.clone() {
                            for iw in cols.clone() {
                                for (ch, &dv) in d.iter().enumerate() {
                                    dx[at(ih, iw, ch)] += dv / count;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}

/// Pooling over `n` NHWC images stored as `n·h·w × c` rows.
fn pool(op: PoolOp, s: &PoolShape, v: &[f32], c: usize) -> Vec<f32> {
    let (h, w) = (s.h as i64, s.w as i64);
    let mut out = Vec::with_capacity((s.n * s.out_h * s.out_w) as usize * c);
    for img in 0..s.n as i64 {
        for oh in 0..s.out_h as i64 {
            for ow in 0..s.out_w as i64 {
                for ch in 0..c {
                    let (mut acc, mut count) = (if op == PoolOp::Max { f32::NEG_INFINITY } else { 0.0 }, 0u32);
                    for i in 0..s.window[0] as i64 {
                        for j in 0..s.window[1] as i64 {
                            let ih = oh * s.strides[0] as i64 + i - s.pad[0] as i64;
                            let iw = ow * s.strides[1] as i64 + j - s.pad[1] as i64;
                            if ih < 0 || iw < 0 || ih >= h || iw >= w {
                                continue;
                            }
                            let x = v[((img * h + ih) * w + iw) as usize * c + ch];
                            match op {
                                PoolOp::Max => acc = if x > acc { x } else { acc },
                                PoolOp::Avg => acc += x,
                            }
                            count += 1;
                        }
                    }
                    out.push(if op == PoolOp::Avg { acc / count.max(1) as f32 } else { acc });
                }
            }
        }
    }
    out
}

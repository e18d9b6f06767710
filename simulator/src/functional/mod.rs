//! The functional engine: runs a validated program on real data.
//!
//! Memories hold bytes (f32 or bf16 elements, little-endian) and grow on demand up to their
//! capacity, so an 8 GiB HBM costs only what a program touches. Instructions execute in
//! program order: validation has proved the program race-free, so any order its dependencies
//! allow gives these same values. The MXU follows the numerics contract bit for bit
//! ([`crate::mxu::kernel`]); the VPU computes in f32.

mod memory;
mod vpu;

use memory::{Memory, Source, elements, f32s, f32s_mut, transfer};
use vpu::{Broadcast, Rows, binary_rows, copy_rows, pool, pool_grad, unary_rows};
pub use vpu::{binary, unary};

use crate::config::Machine;
use crate::error::{Error, Result};
use crate::isa::*;
use crate::mxu::kernel::{Matrix, matmul, matmul_into};

/// `t` moved to byte 0: its place within a view that starts where it starts.
fn at_zero(t: &Tile) -> Tile {
    Tile { offset: 0, ..*t }
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
    /// Whether instructions work on views of the memories' bytes where they apply (always,
    /// but in the tests that hold the views to the decoded copies bit for bit).
    views: bool,
}

impl Functional {
    pub fn new(machine: &Machine) -> Functional {
        Functional {
            machine: machine.clone(),
            hbm: Memory::default(),
            vmem: Memory::default(),
            profile: None,
            views: true,
        }
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

    /// A DMA between tiles whose bytes exist, without a decoded copy ([`transfer`]); false
    /// when the caller must read and write instead (bytes not yet written, overlapping spans).
    fn dma_in_place(&mut self, s: &Tile, d: &Tile) -> bool {
        match (s.space, d.space) {
            (Space::Hbm, Space::Vmem) => {
                self.vmem.ensure(d.span().1);
                transfer(&self.hbm.bytes, &mut self.vmem.bytes, s, d)
            }
            (Space::Vmem, Space::Hbm) => {
                self.hbm.ensure(d.span().1);
                transfer(&self.vmem.bytes, &mut self.hbm.bytes, s, d)
            }
            _ => match self.memory(s.space).views(d, [s]) {
                Some((region, [Source::Apart(from)])) => transfer(from, region, &at_zero(s), &at_zero(d)),
                _ => false,
            },
        }
    }

    /// A DMA through a copy of the source: its bytes as they are between tiles of one type
    /// (a DMA moves bytes; decoding and encoding a bf16 NaN would quiet it), decoded and
    /// encoded between types. Also right when the source and destination spans overlap.
    fn dma_copying(&mut self, s: &Tile, d: &Tile) {
        if s.dtype == d.dtype {
            let source = self.memory(s.space);
            source.ensure(s.span().1);
            let bytes = source.bytes[memory::span(s)].to_vec();
            let destination = self.memory(d.space);
            destination.ensure(d.span().1);
            transfer(&bytes, &mut destination.bytes, &at_zero(s), d);
        } else {
            let v = self.memory(s.space).read(s);
            self.memory(d.space).write(d, &v);
        }
    }

    /// A `Unary` instruction through decoded copies (tiles the views do not cover).
    fn unary_copying(&mut self, op: UnaryOp, src: &Tile, dst: &Tile) {
        let mut v = self.vmem.read(src);
        unary_rows(op, &mut v, Rows::packed(src));
        self.vmem.write(dst, &v);
    }

    /// A `Binary` instruction through decoded copies (tiles the views do not cover).
    fn binary_copying(&mut self, op: BinaryOp, a: &Tile, b: &Tile, dst: &Tile) {
        let (mut av, bv) = (self.vmem.read(a), self.vmem.read(b));
        binary_rows(op, &mut av, Rows::packed(a), &bv, b.cols as usize, Broadcast::of(a, b));
        self.vmem.write(dst, &av);
    }

    fn execute(&mut self, op: &Operation) -> std::result::Result<(), String> {
        match *op {
            Operation::Dma { src, dst, repeat, .. } => {
                let (count, src_step, dst_step) =
                    repeat.map_or((1, 0, 0), |r| (r.count as u64, r.src_step, r.dst_step));
                for i in 0..count {
                    let s = Tile { offset: src.offset + i * src_step, ..src };
                    let d = Tile { offset: dst.offset + i * dst_step, ..dst };
                    if !(self.views && self.dma_in_place(&s, &d)) {
                        self.dma_copying(&s, &d);
                    }
                }
            }
            Operation::MatMul { lhs, rhs, out, accumulate, precision, .. } => {
                let chunk = self.machine.core.mxu.rows;
                let at = |t: &Tile, bytes| Matrix {
                    data: elements(t.dtype, bytes),
                    rows: t.rows as usize,
                    cols: t.cols as usize,
                    stride: t.stride as usize,
                };
                // Where they lie: the kernel decodes each operand as it packs it and
                // accumulates into `out`'s rows; validation keeps `out` apart from both.
                if self.views
                    && let Some((region, [Source::Apart(l), Source::Apart(r)])) = self.vmem.views(&out, [&lhs, &rhs])
                    && let Some(c) = f32s_mut(&out, region)
                {
                    let (rows, cols, ldc) = (out.rows as usize, out.cols as usize, out.stride as usize);
                    let (a, b, c) = (at(&lhs, l), at(&rhs, r), &mut c[..(rows - 1) * ldc + cols]);
                    match accumulate {
                        true => matmul(a, b, c, ldc, chunk, precision),
                        false => matmul_into(a, b, c, ldc, chunk, precision),
                    }
                    return Ok(());
                }
                let a = self.vmem.read(&lhs);
                let b = self.vmem.read(&rhs);
                let mut c = if accumulate { self.vmem.read(&out) } else { vec![0.0; out.elements() as usize] };
                let (m, k, n) = (lhs.rows as usize, lhs.cols as usize, rhs.cols as usize);
                matmul(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut c, n, chunk, precision);
                self.vmem.write(&out, &c);
            }
            Operation::Unary { op, src, dst } => {
                let rows = Rows::of(&dst);
                if self.views
                    && let Some((region, [source])) = self.vmem.views(&dst, [&src])
                    && let (Some(v), Some(values)) = (f32s_mut(&dst, region), source.f32s(&src))
                {
                    if let Some(values) = values {
                        copy_rows(v, rows, values, src.stride as usize);
                    }
                    unary_rows(op, v, rows);
                } else {
                    self.unary_copying(op, &src, &dst);
                }
            }
            Operation::Binary { op, a, b, dst } => {
                let rows = Rows::of(&dst);
                if self.views
                    && let Some((region, [source, Source::Apart(bs)])) = self.vmem.views(&dst, [&a, &b])
                    && let (Some(v), Some(values), Some(bv)) = (f32s_mut(&dst, region), source.f32s(&a), f32s(&b, bs))
                {
                    if let Some(values) = values {
                        copy_rows(v, rows, values, a.stride as usize);
                    }
                    binary_rows(op, v, rows, bv, b.stride as usize, Broadcast::of(&a, &b));
                } else {
                    self.binary_copying(op, &a, &b, &dst);
                }
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
                if self.views
                    && let Some((region, [])) = self.vmem.views(&dst, [])
                    && let Some(v) = f32s_mut(&dst, region)
                {
                    v.chunks_mut(dst.stride as usize).for_each(|row| row[..dst.cols as usize].fill(value));
                } else {
                    self.vmem.write(&dst, &vec![value; dst.elements() as usize]);
                }
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

#[cfg(test)]
mod tests;

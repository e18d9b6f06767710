//! The instruction set: per-core programs as data (see `docs/isa.md`).
//!
//! A [`Program`] is a list of instructions for one TensorCore. Each instruction runs on one
//! [`Unit`] — a DMA engine, an MXU, the vector unit (VPU), the scalar unit, the ICI or the host
//! link — and names the instructions it waits for (`deps`, always earlier ones). Units run their
//! own instructions in program order and in parallel with each other; dependencies are the only
//! other ordering, so DMA, MXU and VPU work overlap unless a dependency says otherwise. Operands
//! are [`Tile`]s: 2-D strided views of HBM or VMEM.
//!
//! Programs serialise with serde, print as a readable listing (`Display`), and are checked by
//! [`Program::validate`] before anything runs.

mod coverage;
mod races;
mod validate;

/// Helpers for the brute-force tests of `validate` and `coverage`.
#[cfg(test)]
mod testing {
    use std::collections::HashSet;

    use super::Tile;

    /// Every byte address a tile touches.
    pub fn bytes(t: &Tile) -> HashSet<u64> {
        let size = t.dtype.size();
        (0..t.rows as u64)
            .flat_map(|r| (0..t.cols as u64 * size).map(move |c| t.offset + r * t.stride as u64 * size + c))
            .collect()
    }

    /// A seeded generator of numbers below `n` (a 64-bit LCG).
    pub fn numbers(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        }
    }
}

/// Whether two tiles share any byte (exact for strided tiles).
pub fn overlaps(a: &Tile, b: &Tile) -> bool {
    races::overlap(a, b)
}

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::numerics::Precision;

/// A memory space of one core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Space {
    /// High-bandwidth memory: large, off-chip, reached through DMA.
    Hbm,
    /// Vector memory: the on-core scratchpad the MXU and VPU read and write.
    Vmem,
}

/// Element types in memory. Compute is f32 (VPU) or bf16-in/f32-accumulate (MXU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// A 2-D strided tile: `rows × cols` elements of `dtype`, the first at byte `offset` of
/// `space`, consecutive rows `stride` elements apart (`stride ≥ cols`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tile {
    pub space: Space,
    pub offset: u64,
    pub rows: u32,
    pub cols: u32,
    pub stride: u32,
    pub dtype: DType,
}

impl Tile {
    /// A contiguous row-major `rows × cols` tile.
    pub fn new(space: Space, offset: u64, rows: usize, cols: usize, dtype: DType) -> Tile {
        Tile { space, offset, rows: rows as u32, cols: cols as u32, stride: cols as u32, dtype }
    }

    /// Columns `c0 .. c0 + cols` of this tile (same rows and stride).
    pub fn columns(&self, c0: usize, cols: usize) -> Tile {
        Tile { offset: self.offset + c0 as u64 * self.dtype.size(), cols: cols as u32, ..*self }
    }

    /// Rows `r0 .. r0 + rows` of this tile.
    pub fn rows(&self, r0: usize, rows: usize) -> Tile {
        Tile { offset: self.offset + r0 as u64 * self.stride as u64 * self.dtype.size(), rows: rows as u32, ..*self }
    }

    pub fn elements(&self) -> u64 {
        self.rows as u64 * self.cols as u64
    }

    /// Bytes of data (not counting the gaps between strided rows).
    pub fn bytes(&self) -> u64 {
        self.elements() * self.dtype.size()
    }

    /// The byte range from the first element to just past the last one. The end saturates at
    /// `u64::MAX`, past every memory, so the validator refuses a tile at the top of the address
    /// space instead of overflowing.
    pub fn span(&self) -> (u64, u64) {
        let size = self.dtype.size();
        let last = (self.rows.max(1) as u64 - 1) * self.stride as u64 + self.cols as u64;
        (self.offset, self.offset.saturating_add(last.saturating_mul(size)))
    }

    pub fn same_shape(&self, other: &Tile) -> bool {
        self.rows == other.rows && self.cols == other.cols
    }
}

impl fmt::Display for Tile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let space = match self.space {
            Space::Hbm => "hbm",
            Space::Vmem => "vmem",
        };
        let dtype = match self.dtype {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        };
        write!(f, "{space}@{:#x}[{}x{}", self.offset, self.rows, self.cols)?;
        if self.stride != self.cols {
            write!(f, " /{}", self.stride)?;
        }
        write!(f, " {dtype}]")
    }
}

/// Elementwise operations with one operand.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum UnaryOp {
    Copy,
    Relu,
    Relu6,
    Neg,
    Exp,
    Log,
    Sqrt,
    /// 1 / sqrt(x).
    Rsqrt,
    Square,
    Reciprocal,
    /// cos(x), x in radians (a learning rate's cosine decay; costed as any unary op).
    Cos,
    /// x * c.
    Scale(f32),
    /// x + c.
    AddScalar(f32),
}

/// Elementwise operations with two operands; the second may be one row broadcast over rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    /// `b` where `a > 0`, else 0 (the ReLU gradient).
    MaskPositive,
    /// `b` where `0 < a < 6`, else 0 (the ReLU6 gradient).
    MaskRelu6,
}

/// Which collective a [`Operation::Collective`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CollectiveKind {
    /// Every member ends with the reduction of all members' operands.
    AllReduce,
    /// Member `r` ends with shard `r` of the reduction (the rest of its operand unchanged).
    ReduceScatter,
    /// Every member ends with every member's own shard, each in its place.
    AllGather,
    /// Every member ends with the first member's operand.
    Broadcast,
    /// Member `r` copies shard `r` of its own operand into its `shard` tile: no traffic (XLA's
    /// dynamic slice at the replica id), how a sharded weight update takes each replica's
    /// part of the replicated parameters.
    Shard,
}

impl CollectiveKind {
    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::AllReduce => "all_reduce",
            CollectiveKind::ReduceScatter => "reduce_scatter",
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::Broadcast => "broadcast",
            CollectiveKind::Shard => "shard",
        }
    }

    /// Whether the collective combines values (and so takes a [`Reduction`] that matters).
    pub fn reduces(self) -> bool {
        matches!(self, CollectiveKind::AllReduce | CollectiveKind::ReduceScatter)
    }
}

/// How a collective combines the members' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reduction {
    Sum,
    /// The sum divided by the group's size (TensorFlow's `CrossShardOptimizer` default).
    Mean,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// Which axis a reduction removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Axis {
    /// Sum over rows: `rows × cols -> 1 × cols`.
    Rows,
    /// Sum over columns: `rows × cols -> rows × 1`.
    Cols,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolOp {
    Max,
    /// Average over the window taps inside the image.
    Avg,
}

/// A DMA repeated `count` times, each time `src_step` and `dst_step` bytes further: a third
/// dimension for copies such as "each output row of a band", where one 2-D tile is not enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repeat {
    pub count: u32,
    pub src_step: u64,
    pub dst_step: u64,
}

/// Pooling geometry: the source holds `n` images of `h × w` pixels as rows (NHWC flattened to
/// `n·h·w × c`), the destination `n · out_h · out_w × c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolShape {
    pub n: u32,
    pub h: u32,
    pub w: u32,
    pub window: [u32; 2],
    pub strides: [u32; 2],
    /// Padding before the first row and column (padding never wins a max or counts in an average).
    pub pad: [u32; 2],
    pub out_h: u32,
    pub out_w: u32,
}

/// What an instruction does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Operation {
    /// Copy a tile between (or within) memory spaces on DMA engine `engine`, optionally
    /// repeated with steps (a 3-D copy).
    Dma {
        engine: u8,
        src: Tile,
        dst: Tile,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        repeat: Option<Repeat>,
    },
    /// `out (+)= lhs · rhs` on MXU `mxu`: weights (`rhs`) loaded tile by tile, `lhs` rows
    /// streamed, f32 sums accumulated into `out`. Inputs are rounded (or split) to bf16.
    MatMul { mxu: u8, lhs: Tile, rhs: Tile, out: Tile, accumulate: bool, precision: Precision },
    /// `dst = op(src)` on the VPU.
    Unary { op: UnaryOp, src: Tile, dst: Tile },
    /// `dst = a op b` on the VPU; `b` has `a`'s shape, or is one row broadcast over rows, or one
    /// column broadcast over columns.
    Binary { op: BinaryOp, a: Tile, b: Tile, dst: Tile },
    /// `acc += a · b` elementwise on the VPU (one fused multiply-add per element); `b` may be
    /// broadcast as in `Binary`.
    MulAdd { a: Tile, b: Tile, acc: Tile },
    /// Sets every element of `dst` to `value` on the VPU.
    Fill { dst: Tile, value: f32 },
    /// `dst = reduce(src)` along an axis on the VPU.
    Reduce { op: ReduceOp, axis: Axis, src: Tile, dst: Tile },
    /// Pooling windows over images on the VPU.
    Pool { op: PoolOp, shape: PoolShape, src: Tile, dst: Tile },
    /// The pooling gradient on the VPU: `dst` (shaped like the forward input) is zeroed, then
    /// each window of `dy`, in order, adds its value to the first maximum of `x` in the window
    /// (`Max`, which needs `x`, the forward input) or its value over the window's in-image taps
    /// to every such tap (`Avg`).
    PoolGrad { op: PoolOp, shape: PoolShape, x: Option<Tile>, dy: Tile, dst: Tile },
    /// `dst = srcᵀ` on the VPU's transpose unit.
    Transpose { src: Tile, dst: Tile },
    /// Inverted dropout on the VPU: element `(r, c)` of `dst` is `src[r][c]` times
    /// [`crate::rng::dropout_scale`]`(rate, derive(seed, step), counter + r·cols + c)`, where
    /// `step` (a 1×1 tile) holds the training step as an integer-valued f32, so one program
    /// draws a new mask every step and the same one as the CPU reference.
    Dropout { seed: u64, rate: f32, step: Tile, counter: u64, src: Tile, dst: Tile },
    /// Waits for its dependencies (a join point); costs one scalar cycle.
    Barrier,
    /// A collective over the replicas of this core's group, in place on `tiles` (HBM). The
    /// slice's replicas (its cores, numbered chip by chip) form groups of `replicas`
    /// consecutive cores; `replicas: 1` is a no-op. The tiles' elements, concatenated in
    /// order, are the operand; reduce-scatter and all-gather cut it into `replicas` shards as
    /// even as can be (the first ones one element longer), the member at position `r` of the
    /// group owning shard `r`. With a `shard` tile (at least the longest shard's elements,
    /// the same address on every member), a reduce-scatter leaves the tiles as they are and
    /// writes member `r`'s shard to the start of `shard`, an all-gather takes member `r`'s
    /// shard from there, and `Shard` copies it there. Executed by the pod simulator
    /// (`crate::pod`).
    Collective { kind: CollectiveKind, reduction: Reduction, tiles: Vec<Tile>, shard: Option<Tile>, replicas: u32 },
    /// Receives host data into `dst` (HBM) over PCIe.
    Infeed { dst: Tile },
    /// Sends `src` (HBM) to the host over PCIe.
    Outfeed { src: Tile },
}

/// The unit that executes an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Unit {
    Dma(u8),
    Mxu(u8),
    Vpu,
    Scalar,
    Ici,
    Host,
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unit::Dma(i) => write!(f, "dma{i}"),
            Unit::Mxu(i) => write!(f, "mxu{i}"),
            Unit::Vpu => f.write_str("vpu"),
            Unit::Scalar => f.write_str("scalar"),
            Unit::Ici => f.write_str("ici"),
            Unit::Host => f.write_str("host"),
        }
    }
}

impl Operation {
    pub fn unit(&self) -> Unit {
        match self {
            Operation::Dma { engine, .. } => Unit::Dma(*engine),
            Operation::MatMul { mxu, .. } => Unit::Mxu(*mxu),
            Operation::Unary { .. }
            | Operation::Binary { .. }
            | Operation::MulAdd { .. }
            | Operation::Fill { .. }
            | Operation::Reduce { .. }
            | Operation::Pool { .. }
            | Operation::PoolGrad { .. }
            | Operation::Transpose { .. }
            | Operation::Dropout { .. } => Unit::Vpu,
            Operation::Barrier => Unit::Scalar,
            Operation::Collective { .. } => Unit::Ici,
            Operation::Infeed { .. } | Operation::Outfeed { .. } => Unit::Host,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Operation::Dma { .. } => "dma",
            Operation::MatMul { .. } => "matmul",
            Operation::Unary { .. } => "unary",
            Operation::Binary { .. } => "binary",
            Operation::MulAdd { .. } => "mul_add",
            Operation::Fill { .. } => "fill",
            Operation::Reduce { .. } => "reduce",
            Operation::Pool { .. } => "pool",
            Operation::PoolGrad { .. } => "pool_grad",
            Operation::Transpose { .. } => "transpose",
            Operation::Dropout { .. } => "dropout",
            Operation::Barrier => "barrier",
            Operation::Collective { kind, .. } => kind.name(),
            Operation::Infeed { .. } => "infeed",
            Operation::Outfeed { .. } => "outfeed",
        }
    }

    /// The tiles the instruction reads.
    pub fn reads(&self) -> Vec<Tile> {
        match *self {
            Operation::Dma { src, repeat, .. } => repeated(src, repeat.map(|r| (r.count, r.src_step))),
            Operation::MatMul { lhs, rhs, out, accumulate, .. } => {
                if accumulate {
                    vec![lhs, rhs, out]
                } else {
                    vec![lhs, rhs]
                }
            }
            Operation::Unary { src, .. }
            | Operation::Reduce { src, .. }
            | Operation::Pool { src, .. }
            | Operation::Transpose { src, .. } => {
                vec![src]
            }
            Operation::Binary { a, b, .. } => vec![a, b],
            Operation::Dropout { src, step, .. } => vec![src, step],
            Operation::PoolGrad { x, dy, .. } => x.into_iter().chain([dy]).collect(),
            Operation::MulAdd { a, b, acc } => vec![a, b, acc],
            Operation::Barrier | Operation::Infeed { .. } | Operation::Fill { .. } => vec![],
            Operation::Collective { kind: CollectiveKind::AllGather, shard: Some(s), .. } => vec![s],
            Operation::Collective { ref tiles, .. } => tiles.clone(),
            Operation::Outfeed { src } => vec![src],
        }
    }

    /// The tiles the instruction writes.
    pub fn writes(&self) -> Vec<Tile> {
        match *self {
            Operation::Dma { dst, repeat, .. } => repeated(dst, repeat.map(|r| (r.count, r.dst_step))),
            Operation::MulAdd { acc, .. } => vec![acc],
            Operation::Fill { dst, .. }
            | Operation::Unary { dst, .. }
            | Operation::Binary { dst, .. }
            | Operation::Reduce { dst, .. }
            | Operation::Pool { dst, .. }
            | Operation::PoolGrad { dst, .. }
            | Operation::Transpose { dst, .. }
            | Operation::Dropout { dst, .. }
            | Operation::Infeed { dst } => vec![dst],
            Operation::MatMul { out, .. } => vec![out],
            Operation::Collective { kind: CollectiveKind::AllGather, ref tiles, .. } => tiles.clone(),
            Operation::Collective { shard: Some(s), .. } => vec![s],
            Operation::Collective { ref tiles, .. } => tiles.clone(),
            Operation::Barrier | Operation::Outfeed { .. } => vec![],
        }
    }
}

/// `tile` and its repetitions `step` bytes apart (offsets saturate, as [`Tile::span`] does).
fn repeated(tile: Tile, repeat: Option<(u32, u64)>) -> Vec<Tile> {
    match repeat {
        None => vec![tile],
        Some((count, step)) => (0..count.max(1) as u64)
            .map(|i| Tile { offset: tile.offset.saturating_add(i.saturating_mul(step)), ..tile })
            .collect(),
    }
}

impl Operation {
    /// A plain 2-D DMA.
    pub fn dma(engine: u8, src: Tile, dst: Tile) -> Operation {
        Operation::Dma { engine, src, dst, repeat: None }
    }
}

/// One instruction and the (earlier) instructions it waits for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instr {
    pub op: Operation,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deps: Vec<u32>,
}

/// A program for one core.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    pub instrs: Vec<Instr>,
}

impl Program {
    pub fn new(name: impl Into<String>) -> Program {
        Program { name: name.into(), instrs: Vec::new() }
    }

    /// Appends an instruction; returns its index for later dependencies.
    pub fn push(&mut self, op: Operation, deps: &[u32]) -> u32 {
        self.instrs.push(Instr { op, deps: deps.to_vec() });
        (self.instrs.len() - 1) as u32
    }

    pub fn len(&self) -> usize {
        self.instrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instrs.is_empty()
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::Dma { src, dst, repeat, .. } => {
                write!(f, "dma        {src} -> {dst}")?;
                if let Some(r) = repeat {
                    write!(f, " x{} (steps {:#x}, {:#x})", r.count, r.src_step, r.dst_step)?;
                }
                Ok(())
            }
            Operation::MulAdd { a, b, acc } => write!(f, "mul_add    {acc} += {a} * {b}"),
            Operation::Fill { dst, value } => write!(f, "fill       {dst} = {value}"),
            Operation::MatMul { lhs, rhs, out, accumulate, precision, .. } => {
                let op = if *accumulate { "+=" } else { "=" };
                write!(f, "matmul.{:<7} {out} {op} {lhs} x {rhs}", precision.name())
            }
            Operation::Unary { op, src, dst } => write!(f, "{:<10} {dst} = {src}", format!("{op:?}").to_lowercase()),
            Operation::Binary { op, a, b, dst } => {
                write!(f, "{:<10} {dst} = {a}, {b}", format!("{op:?}").to_lowercase())
            }
            Operation::Reduce { op, axis, src, dst } => {
                write!(
                    f,
                    "reduce.{}  {dst} = {src} over {}",
                    format!("{op:?}").to_lowercase(),
                    format!("{axis:?}").to_lowercase()
                )
            }
            Operation::PoolGrad { op, shape, x, dy, dst } => write!(
                f,
                "pool_grad.{}   {dst} = d({}) window {}x{} stride {}x{} from {dy}",
                format!("{op:?}").to_lowercase(),
                x.map_or("window mean".to_string(), |x| format!("max of {x}")),
                shape.window[0],
                shape.window[1],
                shape.strides[0],
                shape.strides[1]
            ),
            Operation::Pool { op, shape, src, dst } => write!(
                f,
                "pool.{}   {dst} = {src} window {}x{} stride {}x{}",
                format!("{op:?}").to_lowercase(),
                shape.window[0],
                shape.window[1],
                shape.strides[0],
                shape.strides[1]
            ),
            Operation::Transpose { src, dst } => write!(f, "transpose  {dst} = {src}ᵀ"),
            Operation::Dropout { seed, rate, step, counter, src, dst } => {
                write!(f, "dropout    {dst} = {src} rate {rate} seed {seed} step {step} from element {counter}")
            }
            Operation::Barrier => write!(f, "barrier"),
            Operation::Collective { kind, reduction, tiles, shard, replicas } => {
                let tiles: Vec<String> = tiles.iter().map(|t| t.to_string()).collect();
                let reduction = if kind.reduces() {
                    format!(".{}", format!("{reduction:?}").to_lowercase())
                } else {
                    String::new()
                };
                let shard = shard.map_or(String::new(), |s| format!(" shard {s}"));
                write!(f, "{}{reduction} [{}]{shard} over {replicas} replicas", kind.name(), tiles.join(", "))
            }
            Operation::Infeed { dst } => write!(f, "infeed     {dst}"),
            Operation::Outfeed { src } => write!(f, "outfeed    {src}"),
        }
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "program {} ({} instructions)", self.name, self.instrs.len())?;
        for (i, instr) in self.instrs.iter().enumerate() {
            write!(f, "{i:>6}  {:<7} {}", instr.op.unit().to_string(), instr.op)?;
            if !instr.deps.is_empty() {
                let deps: Vec<String> = instr.deps.iter().map(|d| d.to_string()).collect();
                write!(f, "  after {}", deps.join(" "))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

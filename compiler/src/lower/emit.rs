//! The `tiling` and `scheduling` passes: kernels to instructions.
//!
//! Every kernel streams its data through VMEM in blocks, with three of each block buffer so the
//! next block's DMA and the previous block's store overlap this block's MXU and VPU work.
//! Dependencies name exactly what must finish first (the DMA filling a buffer, the matmuls
//! reading it before it is refilled); a barrier closes each kernel and opens the next, so
//! buffers (VMEM and HBM) can be reused.
//!
//! Convolutions run as **shifted matmuls**: the input band is staged in VMEM with its zero
//! padding, and each kernel tap (i, j) is one matmul whose left operand is the staging buffer
//! read with a row stride of `stride × channels`, starting `(i·dh·Wp + j·dw)` pixels in. The
//! output rows then run over the padded width (`Wp` per output row), so the `Wp − OW` extra
//! columns (and, for whole-image blocks, the extra rows) are computed and dropped: reported as
//! padding waste. When the channels are few (the 3-channel first layer), the taps are folded
//! into K instead (**im2col**): the VPU copies each tap's view into the columns of one matrix
//! and a single matmul of depth `taps × channels` replaces `taps` shallow ones. Depthwise
//! convolutions have one input channel per output channel — a matmul of depth 1 — so they run
//! on the **VPU** as one multiply-add per tap.

use std::collections::BTreeMap;

use systolic_simulator::Machine;
use systolic_simulator::isa::*;
use systolic_simulator::mxu::passes;
use systolic_simulator::timing::vpu_cycles;

use super::{Epilogue, Kernel, KernelReport, Main, Options, Place, backward, batch_norm, conv_grad};
use crate::cost;
use crate::error::{Error, Result};
use crate::graph::{Conv2d, Graph, NodeId, Op as GOp, Padding, Pool as PoolAttrs, Window2d};
use crate::optimizer::Optimizer;

/// Rows of a block's matmul (the streamed LHS rows) the tiling aims for.
pub(super) const TARGET_ROWS: usize = 2048;
/// Copies of each block buffer: while one block computes, the next is loading and the one
/// before is storing, so DMA latency stays off the critical path.
pub(super) const BUFFERS: usize = 3;
/// VMEM set aside for one of a kernel's two weight buffers (2.5 MiB).
const WEIGHT_BUDGET: u64 = 5 << 19;

/// A bump allocator over one kernel's VMEM.
pub(super) struct Vmem {
    next: u64,
    capacity: u64,
}

impl Vmem {
    /// `BUFFERS` tiles of `rows × cols`: a ring, so block i+1 loads while block i computes.
    pub(super) fn ring(&mut self, rows: usize, cols: usize) -> Option<Vec<Tile>> {
        (0..BUFFERS).map(|_| self.alloc(rows, cols)).collect()
    }

    /// Bytes not yet allocated.
    pub(super) fn remaining(&self) -> u64 {
        self.capacity.saturating_sub(self.next)
    }

    pub(super) fn alloc(&mut self, rows: usize, cols: usize) -> Option<Tile> {
        let at = self.next.div_ceil(512) * 512;
        let end = at + (rows * cols * 4) as u64;
        if end > self.capacity {
            return None;
        }
        self.next = end;
        Some(Tile::new(Space::Vmem, at, rows, cols, DType::F32))
    }
}

/// Per-kernel accounting for the report.
#[derive(Default)]
struct Account {
    mxu_passes: u64,
    padded_macs: u64,
    /// Streamed rows per MXU (the MXU estimate).
    mxu_stream: BTreeMap<u8, u64>,
    hbm_bytes: u64,
    dma_bytes: u64,
    vpu_cycles: u64,
}

/// What the training step adds to the kernels' view of the graph.
#[derive(Default)]
pub(super) struct Extras {
    /// Integer labels -> the one-hot input read instead.
    pub one_hot: BTreeMap<NodeId, NodeId>,
    pub optimizer: Option<Optimizer>,
    /// The shared state (Adam's powers, the dropout step).
    pub state: Vec<NodeId>,
    pub dropout_step: Option<NodeId>,
    /// Batch norms whose per-channel sums a convolution's epilogue wrote: where (HBM).
    pub stats: BTreeMap<NodeId, u64>,
}

pub(super) struct Emitter<'a> {
    pub extras: &'a Extras,
    /// The current kernel's HBM scratch (see `memory::Plan::scratch`).
    pub scratch: Option<u64>,
    /// Where the current kernel writes per-channel sums for a batch norm (`memory::Plan::stats`).
    pub stats_out: Option<u64>,
    pub m: &'a Machine,
    pub opts: &'a Options,
    pub graph: &'a Graph,
    places: &'a [Option<Place>],
    pub program: Program,
    start: u32,
    prev_end: Option<u32>,
    last_on_unit: BTreeMap<Unit, u32>,
    account: Account,
}

impl<'a> Emitter<'a> {
    pub(super) fn place(&self, id: NodeId) -> &'a Place {
        self.places[id.index()].as_ref().expect("every tensor a kernel touches is placed")
    }

    pub(super) fn vmem(&self) -> Vmem {
        Vmem { next: 0, capacity: self.m.core.vmem_bytes }
    }

    fn begin(&mut self) {
        let deps: Vec<u32> = self.prev_end.into_iter().collect();
        self.start = self.program.push(Op::Barrier, &deps);
        self.last_on_unit.clear();
        self.account = Account::default();
    }

    /// Makes the rest of the kernel wait for `ids` (work that prepares its operands).
    pub(super) fn wait_for(&mut self, ids: &[u32]) {
        if ids.is_empty() {
            return;
        }
        self.start = self.program.push(Op::Barrier, ids);
    }

    fn end(&mut self) -> u32 {
        let mut deps: Vec<u32> = self.last_on_unit.values().copied().collect();
        deps.sort_unstable();
        if deps.is_empty() {
            deps.push(self.start);
        }
        let id = self.program.push(Op::Barrier, &deps);
        self.prev_end = Some(id);
        id
    }

    /// Appends an instruction; with no dependencies it waits for the kernel's start.
    pub(super) fn push(&mut self, op: Op, deps: &[u32]) -> u32 {
        let mut deps: Vec<u32> = deps.to_vec();
        deps.sort_unstable();
        deps.dedup();
        if deps.is_empty() {
            deps.push(self.start);
        }
        // Engines are numbered by role (0 in, 1 weights, 2 out); fold them onto the core's.
        let op = match op {
            Op::Dma { engine, src, dst, repeat } => {
                Op::Dma { engine: engine % self.m.core.dma.engines as u8, src, dst, repeat }
            }
            other => other,
        };
        self.count(&op);
        let unit = op.unit();
        let id = self.program.push(op, &deps);
        self.last_on_unit.insert(unit, id);
        id
    }

    fn count(&mut self, op: &Op) {
        let core = &self.m.core;
        match op {
            Op::Dma { src, dst, repeat, .. } => {
                let bytes = src.bytes() * repeat.map_or(1, |r| r.count as u64);
                let hbm = (src.space == Space::Hbm) as u64 + (dst.space == Space::Hbm) as u64;
                self.account.hbm_bytes += bytes * hbm;
                self.account.dma_bytes += bytes * hbm.max(1);
            }
            Op::MatMul { mxu, lhs, rhs, precision, .. } => {
                let (m, k, n) = (lhs.rows as usize, lhs.cols as usize, rhs.cols as usize);
                let ps = passes(m, k, n, core.mxu.rows, core.mxu.cols, *precision);
                self.account.mxu_passes += ps.len() as u64;
                self.account.padded_macs += (ps.len() * m * core.mxu.rows * core.mxu.cols) as u64;
                *self.account.mxu_stream.entry(*mxu).or_default() +=
                    ps.iter().map(|p| p.m.max(p.k) as u64).sum::<u64>();
            }
            // The timing engine's own vector-unit cost.
            op if op.unit() == Unit::Vpu => self.account.vpu_cycles += vpu_cycles(self.m, op),
            _ => {}
        }
    }

    /// The report of the kernel just emitted.
    pub(super) fn report(
        &self,
        graph: &Graph,
        kernel: &Kernel,
        strategy: String,
        padded: String,
        useful_macs: u64,
        range: std::ops::Range<usize>,
    ) -> KernelReport {
        let a = &self.account;
        let batch = self.opts.batch;
        let flops = kernel.nodes.iter().map(|&n| cost::flops(graph, n, batch)).sum();
        let mxu_cycles = a.mxu_stream.values().copied().max().unwrap_or(0);
        let dma_cycles = (a.dma_bytes as f64 / self.m.core.hbm.bytes_per_cycle).ceil() as u64;
        let estimate = mxu_cycles.max(dma_cycles).max(a.vpu_cycles) + self.m.core.dma.latency_cycles;
        KernelReport {
            name: kernel.name.clone(),
            ops: kernel.ops(graph),
            strategy,
            padded,
            mxu_passes: a.mxu_passes,
            flops,
            useful_macs,
            padded_macs: a.padded_macs,
            padding_waste: if a.padded_macs > 0 { 1.0 - useful_macs as f64 / a.padded_macs as f64 } else { 0.0 },
            mxu_cycles,
            hbm_bytes: a.hbm_bytes,
            dma_cycles,
            vpu_cycles: a.vpu_cycles,
            estimate_cycles: estimate,
            instructions: range,
        }
    }

    pub(super) fn unsupported(&self, node: NodeId, why: String) -> Error {
        let n = self.graph.node(node);
        Error::Node {
            node: n.name.clone(),
            op: n.op.kind(),
            reason: format!("the lowering cannot place this op: {why}"),
        }
    }

    /// The kernel cannot be placed: even its smallest blocks overflow VMEM.
    pub(super) fn vmem_error(&self, kernel: &Kernel, what: &str) -> Error {
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

/// Per-channel vectors an epilogue needs, prepared in VMEM once per kernel.
pub(super) struct Channels {
    bias: Option<Tile>,
    /// Batch norm as `x · scale + shift`.
    bn: Option<(Tile, Tile)>,
    ready: Option<u32>,
}

/// Loads biases and folds batch-norm statistics into scale and shift (`1 × C` tiles).
pub(super) fn prepare_channels(e: &mut Emitter, kernel: &Kernel, c: usize, vmem: &mut Vmem) -> Result<Channels> {
    let mut ch = Channels { bias: None, bn: None, ready: None };
    let mut last = Vec::new();
    for step in &kernel.epilogue {
        match *step {
            Epilogue::Bias(p) => {
                let t = vmem.alloc(1, c).ok_or_else(|| e.vmem_error(kernel, "channel vectors"))?;
                last.push(e.push(Op::dma(0, e.place(p).tile, t), &[]));
                ch.bias = Some(t);
            }
            Epilogue::BatchNormTrain(bn) => {
                let (scale, shift, ready) = batch_norm::train_channels(e, kernel, bn, vmem)?;
                last.push(ready);
                ch.bn = Some((scale, shift));
            }
            Epilogue::BatchNorm(bn) => {
                let node = e.graph.node(bn);
                let GOp::BatchNorm(attrs) = &node.op else { unreachable!("a BatchNorm epilogue step") };
                let mut load = |e: &mut Emitter, p: NodeId| -> Result<(Tile, u32)> {
                    let t = vmem.alloc(1, c).ok_or_else(|| e.vmem_error(kernel, "channel vectors"))?;
                    Ok((t, e.push(Op::dma(1, e.place(p).tile, t), &[])))
                };
                let (gamma, d0) = load(e, node.inputs[1])?;
                let (beta, d1) = load(e, node.inputs[2])?;
                let (mean, d2) = load(e, node.inputs[3])?;
                let (var, d3) = load(e, node.inputs[4])?;
                // scale = gamma / sqrt(var + eps); shift = beta - mean * scale.
                let a = e.push(Op::Unary { op: UnaryOp::AddScalar(attrs.epsilon), src: var, dst: var }, &[d3]);
                let b = e.push(Op::Unary { op: UnaryOp::Rsqrt, src: var, dst: var }, &[a]);
                let s = e.push(Op::Binary { op: BinaryOp::Mul, a: gamma, b: var, dst: gamma }, &[b, d0]);
                let m = e.push(Op::Binary { op: BinaryOp::Mul, a: mean, b: gamma, dst: mean }, &[s, d2]);
                last.push(e.push(Op::Binary { op: BinaryOp::Sub, a: beta, b: mean, dst: beta }, &[m, d1]));
                ch.bn = Some((gamma, beta));
            }
            _ => {}
        }
    }
    if !last.is_empty() {
        ch.ready = Some(e.push(Op::Barrier, &last));
    }
    Ok(ch)
}

/// Applies a kernel's epilogue to `acc` (rows × nb, channels c0..c0+nb) in place.
/// Tensor operands of an epilogue, loaded in the accumulator's layout: each tile with the
/// instruction after which it holds the rows.
#[derive(Clone, Copy, Default)]
pub(super) struct Operands {
    /// The residual add's or product's tensor.
    pub residual: Option<(Tile, u32)>,
    /// The activation a fused mask step reads.
    pub mask: Option<(Tile, u32)>,
}

pub(super) fn apply_epilogue(
    e: &mut Emitter,
    kernel: &Kernel,
    ch: &Channels,
    acc: Tile,
    c0: usize,
    operands: Operands,
    mut after: Vec<u32>,
) -> u32 {
    if let Some(r) = ch.ready {
        after.push(r);
    }
    let nb = acc.cols as usize;
    let mut last = None;
    for step in &kernel.epilogue {
        let deps: Vec<u32> = match last {
            Some(l) => vec![l],
            None => after.clone(),
        };
        let op = match *step {
            Epilogue::Bias(_) => {
                Op::Binary { op: BinaryOp::Add, a: acc, b: ch.bias.expect("prepared").columns(c0, nb), dst: acc }
            }
            Epilogue::BatchNorm(_) | Epilogue::BatchNormTrain(_) => {
                let (scale, shift) = ch.bn.expect("prepared");
                let m = e.push(Op::Binary { op: BinaryOp::Mul, a: acc, b: scale.columns(c0, nb), dst: acc }, &deps);
                last = Some(e.push(Op::Binary { op: BinaryOp::Add, a: acc, b: shift.columns(c0, nb), dst: acc }, &[m]));
                continue;
            }
            Epilogue::Mask { relu6, .. } => {
                let (y, loaded) = operands.mask.expect("a mask step has its activation");
                let mut d = deps.clone();
                d.push(loaded);
                let op = if relu6 { BinaryOp::MaskRelu6 } else { BinaryOp::MaskPositive };
                last = Some(e.push(Op::Binary { op, a: y, b: acc, dst: acc }, &d));
                continue;
            }
            Epilogue::Residual(_) | Epilogue::Product(_) => {
                let (res, loaded) = operands.residual.expect("a tensor operand step has its tile");
                let mut d = deps.clone();
                d.push(loaded);
                let op = if matches!(step, Epilogue::Residual(_)) { BinaryOp::Add } else { BinaryOp::Mul };
                last = Some(e.push(Op::Binary { op, a: acc, b: res, dst: acc }, &d));
                continue;
            }
            Epilogue::Relu => Op::Unary { op: UnaryOp::Relu, src: acc, dst: acc },
            Epilogue::Relu6 => Op::Unary { op: UnaryOp::Relu6, src: acc, dst: acc },
        };
        last = Some(e.push(op, &deps));
    }
    match last {
        Some(l) => l,
        None => e.push(Op::Barrier, &after),
    }
}

/// The activation a kernel's fused mask step reads.
pub(super) fn mask_of(kernel: &Kernel) -> Option<NodeId> {
    kernel.epilogue.iter().find_map(|s| if let Epilogue::Mask { y, .. } = s { Some(*y) } else { None })
}

/// The tensor operand of a kernel's epilogue (a residual add's or a product's), loaded in the
/// output's layout beside the accumulator.
pub(super) fn residual_of(kernel: &Kernel) -> Option<NodeId> {
    kernel.epilogue.iter().find_map(|s| match s {
        Epilogue::Residual(r) | Epilogue::Product(r) => Some(*r),
        _ => None,
    })
}

/// Splits `rows` into at most `parts` near-equal ranges (for MXUs working side by side).
pub(super) fn split_rows(rows: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.clamp(1, rows.max(1));
    let per = rows.div_ceil(parts);
    (0..rows).step_by(per).map(|r| (r, per.min(rows - r))).collect()
}

/// How many MXUs a block of `rows` streamed rows should use: each needs a weight tile's worth.
pub(super) fn mxus_for(m: &Machine, rows: usize) -> usize {
    m.core.mxu.count.min(rows.div_ceil(m.core.mxu.rows)).max(1)
}

// ---------------------------------------------------------------------------------------------
// Convolutions

#[derive(Clone, Copy, Debug, PartialEq)]
enum ConvStrategy {
    Shifted,
    Im2col,
    Depthwise,
}

/// A convolution's geometry. `h` and `w` are the rows and columns the windows slide over: the
/// stored input's, or with input dilation `xs > 1` (the gradient of a strided convolution) the
/// virtual input with `xs − 1` zeros between stored pixels; `xh × xw` is what is stored.
pub(super) struct ConvGeom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub co: usize,
    pub groups: usize,
    /// Strides along rows and columns.
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
    pub hp: usize,
    /// Staged pixels per padded row: the padded width, rounded up so that `sw` divides
    /// `sh · wp` (then the output rows stream at one stride, see `wv`).
    pub wp: usize,
    /// Streamed (virtual) output rows per output image row: `sh · wp / sw` (= `wp` for equal
    /// strides). Output `(oh, ow)` is streamed row `oh · wv + ow`, and reads staged pixel
    /// `(oh · wv + ow) · sw = oh · sh · wp + ow · sw`, so one row stride serves every tap.
    pub wv: usize,
    /// Input dilation along rows and columns (zeros between stored pixels plus one).
    pub xsh: usize,
    pub xsw: usize,
    pub xh: usize,
    pub xw: usize,
    /// The window of the `oh × ow` output that the output tensor holds: rows `crop[0]..` and
    /// columns `crop[1]..` of `out_hw` (all of it but for a transposed convolution whose
    /// forward padding exceeded its kernel's reach).
    pub crop: [usize; 2],
    pub out_hw: [usize; 2],
}

impl ConvGeom {
    /// The geometry of a convolution of `x` `[n, h, w, c]` with a `[kh, kw, c/groups, co]`
    /// kernel.
    pub(super) fn new(attrs: &Conv2d, x: &[usize], kernel: &[usize]) -> ConvGeom {
        let [n, h, w, c] = [x[0], x[1], x[2], x[3]];
        let [kh, kw, _, co] = [kernel[0], kernel[1], kernel[2], kernel[3]];
        let [sh, sw] = attrs.strides;
        let win = attrs.window([h, w], [kh, kw]).expect("checked when the node was added");
        let mut wp = w + win.pad_left + win.pad_right;
        while !(sh * wp).is_multiple_of(sw) {
            wp += 1;
        }
        ConvGeom {
            n,
            h,
            w,
            c,
            kh,
            kw,
            co,
            groups: attrs.groups,
            sh,
            sw,
            dh: attrs.dilation[0],
            dw: attrs.dilation[1],
            pt: win.pad_top,
            pl: win.pad_left,
            oh: win.out_h,
            ow: win.out_w,
            hp: h + win.pad_top + win.pad_bottom,
            wp,
            wv: sh * wp / sw,
            xsh: 1,
            xsw: 1,
            xh: h,
            xw: w,
            crop: [0, 0],
            out_hw: [win.out_h, win.out_w],
        }
    }

    /// The geometry over `x` dilated by `[xsh, xsw]` (zeros between stored pixels), for the
    /// transposed convolution of a strided one.
    pub(super) fn dilated(attrs: &Conv2d, x: &[usize], kernel: &[usize], [xsh, xsw]: [usize; 2]) -> ConvGeom {
        let virt = [x[0], (x[1] - 1) * xsh + 1, (x[2] - 1) * xsw + 1, x[3]];
        let g = ConvGeom::new(attrs, &virt, kernel);
        ConvGeom { xsh, xsw, xh: x[1], xw: x[2], ..g }
    }

    /// Rows per image slot and per block, and the blocks themselves, for a block size of
    /// about `target` streamed rows: whole images when one fits, else bands of output rows.
    pub(super) fn blocks(&self, target: usize) -> PixelBlocks {
        let per_image = self.hv() * self.wv;
        if per_image <= target {
            let imgs = (target / per_image).clamp(1, self.n);
            let blocks = (0..self.n)
                .step_by(imgs)
                .map(|n0| Block { n0, images: imgs.min(self.n - n0), oh0: 0, bh: self.oh })
                .collect();
            PixelBlocks {
                blocks,
                m_rows: imgs * per_image,
                stage_rows: imgs * self.sh * self.hv() + self.halo(),
                whole: true,
            }
        } else {
            let bh = (target / self.wv).clamp(1, self.oh);
            let blocks = (0..self.n)
                .flat_map(|n0| {
                    (0..self.oh).step_by(bh).map(move |oh0| Block { n0, images: 1, oh0, bh: bh.min(self.oh - oh0) })
                })
                .collect();
            PixelBlocks { blocks, m_rows: bh * self.wv, stage_rows: self.sh * bh + self.halo(), whole: false }
        }
    }

    /// Streamed rows of block `b`.
    pub(super) fn block_rows(&self, b: &Block, whole: bool) -> usize {
        if whole { b.images * self.hv() * self.wv } else { b.bh * self.wv }
    }

    /// The staged pixels tap (i, j) reads for `rows` output rows: channels `ch0..ch0+chs` of
    /// `stage`, one pixel every `sw`.
    pub(super) fn tap_view(&self, stage: Tile, i: usize, j: usize, ch0: usize, chs: usize, rows: usize) -> Tile {
        Tile {
            space: Space::Vmem,
            offset: stage.offset + (((i * self.dh * self.wp + j * self.dw) * self.c + ch0) * 4) as u64,
            rows: rows as u32,
            cols: chs as u32,
            stride: (self.sw * self.c) as u32,
            dtype: DType::F32,
        }
    }

    /// Whether band `b`'s valid outputs read padding rows (which an earlier band of the same
    /// buffer may have filled with data), or stored rows land where another band left zeros.
    pub(super) fn band_needs_fill(&self, b: &Block) -> bool {
        self.xsh > 1
            || self.xsw > 1
            || b.oh0 * self.sh < self.pt
            || (b.oh0 + b.bh - 1) * self.sh + (self.kh - 1) * self.dh >= self.pt + self.h
    }

    fn cog(&self) -> usize {
        self.co / self.groups
    }
    /// One input and one output channel per group (kernel `[kh, kw, cg = 1, co]`): the VPU's.
    /// A depth multiplier above 1 is a grouped convolution on the MXU with K = 1.
    pub(super) fn depthwise(&self, cg: usize) -> bool {
        self.groups > 1 && cg == 1 && self.cog() == 1
    }
    /// Whether folding the taps into K (im2col) needs fewer `array_rows`-deep passes than one
    /// shallow matmul per tap (the 3-channel first layer).
    pub(super) fn im2col_pays(&self, cg: usize, array_rows: usize) -> bool {
        self.groups == 1
            && self.taps() > 1
            && (self.taps() * cg).div_ceil(array_rows) < self.taps() * cg.div_ceil(array_rows)
    }
    pub(super) fn taps(&self) -> usize {
        self.kh * self.kw
    }
    /// Output rows per image slot: the slot holds `sh · hv ≥ hp` padded rows.
    pub(super) fn hv(&self) -> usize {
        self.hp.div_ceil(self.sh)
    }
    /// Padded rows past the last streamed row that taps can reach.
    pub(super) fn halo(&self) -> usize {
        (self.kh - 1) * self.dh + 2
    }
}

/// How a convolution's output rows are cut into blocks (see [`ConvGeom::blocks`]).
pub(super) struct PixelBlocks {
    pub blocks: Vec<Block>,
    /// Streamed rows of a full block (rows over the padded width).
    pub m_rows: usize,
    /// Padded input rows a block stages.
    pub stage_rows: usize,
    pub whole: bool,
}

/// A block of output rows: `images` whole images from `n0`, or one band of image `n0`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Block {
    pub n0: usize,
    pub images: usize,
    pub oh0: usize,
    pub bh: usize,
}

/// What a convolution kernel computes: `y = conv(x, w)` (+ the kernel's epilogue), operands
/// given by place so the gradient kernels can convolve tensors that are not graph nodes.
pub(super) struct ConvSpec<'p> {
    pub x: &'p Place,
    pub w: &'p Place,
    pub y: &'p Place,
    pub attrs: Conv2d,
    pub bias: Option<NodeId>,
    /// Zeros between the stored pixels of `x` plus one, along rows and columns (`[1, 1]`:
    /// none); see [`ConvGeom::dilated`].
    pub input_dilation: [usize; 2],
    /// `y` holds rows `top..top+h` and columns `left..left+w` of the convolution's output
    /// (`[top, left, h, w]`); None: all of it.
    pub out_window: Option<[usize; 4]>,
}

fn conv(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let n = e.graph.node(node);
    let GOp::Conv2d(attrs) = &n.op else { unreachable!("a Conv main") };
    let spec = ConvSpec {
        x: e.place(n.inputs[0]),
        w: e.place(n.inputs[1]),
        y: e.place(kernel.output),
        attrs: attrs.clone(),
        bias: n.inputs.get(2).copied(),
        input_dilation: [1, 1],
        out_window: None,
    };
    conv_with(e, kernel, &spec)
}

/// Emits the convolution `spec` for `kernel`.
pub(super) fn conv_with(e: &mut Emitter, kernel: &Kernel, spec: &ConvSpec) -> Result<KernelReport> {
    let first = e.program.len();
    let graph = e.graph;
    let (x, w, y, attrs) = (spec.x, spec.w, spec.y, &spec.attrs);
    let c = x.shape[3];
    let cg = w.shape[2];
    let mut g = ConvGeom::dilated(attrs, &x.shape, &w.shape, spec.input_dilation);
    if let Some([top, left, h, w]) = spec.out_window {
        (g.crop, g.out_hw) = ([top, left], [h, w]);
    }
    let co = g.co;
    // The bias input is the first epilogue step.
    let mut kernel = kernel.clone();
    if let Some(b) = spec.bias {
        kernel.epilogue.insert(0, Epilogue::Bias(b));
    }
    let depthwise = g.depthwise(cg);
    let rows = e.m.core.mxu.rows;
    let strategy = if depthwise {
        ConvStrategy::Depthwise
    } else if g.im2col_pays(cg, rows) {
        ConvStrategy::Im2col
    } else {
        ConvStrategy::Shifted
    };

    // Output channel blocks: one group each for grouped convolutions, else as wide as the
    // weight budget allows (whole array widths).
    let cols = e.m.core.mxu.cols;
    let nb = if depthwise {
        co.min(512)
    } else if g.groups > 1 {
        g.cog()
    } else {
        // Equal blocks of whole array widths within the weight budget.
        let per_col = (g.taps() * cg * 4) as u64;
        let fit = ((WEIGHT_BUDGET / per_col) as usize / cols * cols).clamp(cols.min(co), 4 * cols);
        let blocks = co.div_ceil(fit);
        co.min(co.div_ceil(blocks).div_ceil(cols) * cols)
    };

    // Blocks of output rows sized to TARGET_ROWS and to VMEM.
    let per_image = g.hv() * g.wv;
    let mut target = TARGET_ROWS;
    let PixelBlocks { blocks, m_rows, stage_rows, whole } = loop {
        let pb = g.blocks(target);
        let (m_rows, stage_rows) = (pb.m_rows, pb.stage_rows);
        let stage = (stage_rows * g.wp * c * 4) as u64;
        let acc = (m_rows * nb * 4) as u64;
        let operands = residual_of(&kernel).is_some() as u64 + mask_of(&kernel).is_some() as u64;
        let res = operands * acc;
        let cols_buf = if strategy == ConvStrategy::Im2col { (m_rows * g.taps() * c * 4) as u64 } else { 0 };
        let weights = (g.taps() * cg * nb * 4) as u64;
        // Channel sums for a batch norm: one block-sized work buffer and `1 × C` vectors.
        let sums = if e.stats_out.is_some() { acc + (4 * co * 4) as u64 } else { 0 };
        let need =
            BUFFERS as u64 * (stage + acc + res + cols_buf) + 2 * weights + sums + (8 * co * 4) as u64 + 16 * 512;
        if need <= e.m.core.vmem_bytes {
            break pb;
        }
        if target <= g.wv {
            return Err(e.vmem_error(&kernel, "staging, accumulator and weight buffers"));
        }
        target /= 2;
    };

    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(&kernel, "buffers");
    // Two weight buffers: the next channel block's weights load while this one computes.
    let weight_bufs: Vec<Tile> =
        (0..2).map(|_| vmem.alloc(g.taps() * cg, nb)).collect::<Option<_>>().ok_or_else(|| oom(e))?;
    let stage: Vec<Tile> =
        (0..BUFFERS).map(|_| vmem.alloc(stage_rows * g.wp, c)).collect::<Option<_>>().ok_or_else(|| oom(e))?;
    let acc: Vec<Tile> = (0..BUFFERS).map(|_| vmem.alloc(m_rows, nb)).collect::<Option<_>>().ok_or_else(|| oom(e))?;
    let res: Vec<Tile> = if residual_of(&kernel).is_some() {
        (0..BUFFERS).map(|_| vmem.alloc(m_rows, nb)).collect::<Option<_>>().ok_or_else(|| oom(e))?
    } else {
        Vec::new()
    };
    let masks: Vec<Tile> =
        if mask_of(&kernel).is_some() { vmem.ring(m_rows, nb).ok_or_else(|| oom(e))? } else { Vec::new() };
    let im2col: Vec<Tile> = if strategy == ConvStrategy::Im2col {
        (0..BUFFERS).map(|_| vmem.alloc(m_rows, g.taps() * c)).collect::<Option<_>>().ok_or_else(|| oom(e))?
    } else {
        Vec::new()
    };
    let ch = prepare_channels(e, &kernel, co, &mut vmem)?;
    let mut sums = match e.stats_out {
        Some(at) => Some(ChannelSums::new(e, &kernel, at, m_rows, nb, co, &mut vmem)?),
        None => None,
    };

    // Per buffer parity: who last read staging, acc and res.
    let mut stage_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut stage_filled = [false; BUFFERS];
    let mut acc_free: Vec<Option<u32>> = vec![None; BUFFERS];
    let mut res_free: Vec<Option<u32>> = vec![None; BUFFERS];
    let mut mask_free: Vec<Option<u32>> = vec![None; BUFFERS];
    let mut weight_readers: Vec<Vec<u32>> = vec![Vec::new(); 2];
    let mut weight_no = 0usize;
    let precision = e.opts.precision;
    let mut useful_macs = 0u64;
    // Loop order: channel blocks outside (each channel block's weights load once, the input is
    // staged once per channel block) or pixel blocks outside (each block is staged once and
    // every channel block's weights stream past it) — whichever moves fewer HBM bytes.
    let (n_c, n_p) = (co.div_ceil(nb), blocks.len());
    let (w_bytes, x_bytes) = (w.tile.bytes(), x.tile.bytes());
    let pixel_outer = n_c > 1 && n_p > 1 && n_p as u64 * w_bytes + x_bytes < w_bytes + n_c as u64 * x_bytes;
    let work: Vec<(usize, Block)> = if pixel_outer {
        blocks.iter().flat_map(|b| (0..co).step_by(nb).map(move |c0| (c0, *b))).collect()
    } else {
        (0..co).step_by(nb).flat_map(|c0| blocks.iter().map(move |b| (c0, *b))).collect()
    };
    // Work items share a staged block in pixel-outer order: `unit` numbers the stagings.
    let unit = |wi: usize| if pixel_outer { wi / n_c } else { wi };
    let units = if pixel_outer { n_p } else { work.len() };
    let unit_block = |u: usize| if pixel_outer { blocks[u] } else { work[u].1 };
    let mut cols_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut staged_ids: Vec<u32> = Vec::with_capacity(units);
    let mut copies_done: Vec<Option<u32>> = Vec::new();
    let mut wload = 0;
    let mut current_c0 = usize::MAX;
    for (wi, &(c0, blk)) in work.iter().enumerate() {
        let blk = &blk;
        let p = wi % BUFFERS;
        let nbw = nb.min(co - c0);
        if c0 != current_c0 {
            weight_no += 1;
        }
        let wp_ = weight_no % 2;
        let wdst = Tile { cols: nbw as u32, stride: nbw as u32, ..weight_bufs[wp_] };
        if c0 != current_c0 {
            // Weights of this channel block (all taps), once, into the buffer the block two
            // back used.
            wload = e.push(Op::dma(1, w.tile.columns(c0, nbw), wdst), &weight_readers[wp_]);
            weight_readers[wp_].clear();
            current_c0 = c0;
        }
        let group = if g.groups > 1 && !depthwise { c0 / g.cog() } else { 0 };
        let m_blk = g.block_rows(blk, whole);
        // Stage inputs ahead: the blocks up to BUFFERS - 1 later load while this one computes.
        while staged_ids.len() < units && staged_ids.len() < unit(wi) + BUFFERS {
            let si = staged_ids.len();
            let sp = si % BUFFERS;
            let sb = &unit_block(si);
            let readers = std::mem::take(&mut stage_readers[sp]);
            let id = stage_block(e, &g, x.tile, sb, whole, stage[sp], &mut stage_filled[sp], &readers);
            staged_ids.push(id);
        }
        let sp = unit(wi) % BUFFERS;
        let staged = staged_ids[unit(wi)];
        // Compute into acc[p].
        let accp = Tile { rows: m_blk as u32, cols: nbw as u32, stride: nbw as u32, ..acc[p] };
        let mut compute_deps = vec![staged, wload];
        compute_deps.extend(acc_free[p]);
        let tap_view = |i, j, ch0, chs, rows| g.tap_view(stage[sp], i, j, ch0, chs, rows);
        let mut readers = Vec::new();
        let mut producers = Vec::new();
        match strategy {
            ConvStrategy::Shifted => {
                let split = split_rows(m_blk, mxus_for(e.m, m_blk));
                let mut last_per_mxu = vec![None; split.len()];
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let tap = i * g.kw + j;
                        let rhs = Tile { rows: cg as u32, ..wdst }.rows(0, cg);
                        let rhs = Tile { offset: wdst.offset + (tap * cg * nbw * 4) as u64, ..rhs };
                        for (x_i, &(r0, rn)) in split.iter().enumerate() {
                            let lhs = tap_view(i, j, group * cg, cg, m_blk).rows(r0, rn);
                            let out = accp.rows(r0, rn);
                            // Taps accumulate on one MXU in program order (units run in
                            // order), so the chain needs no dependency and the passes pipeline.
                            let deps = compute_deps.clone();
                            let id = e.push(
                                Op::MatMul { mxu: x_i as u8, lhs, rhs, out, accumulate: tap > 0, precision },
                                &deps,
                            );
                            last_per_mxu[x_i] = Some(id);
                        }
                    }
                }
                readers.extend(last_per_mxu.iter().flatten());
                producers.extend(last_per_mxu.iter().flatten());
            }
            ConvStrategy::Im2col => {
                let cols_t = Tile { rows: m_blk as u32, ..im2col[p] };
                // This block's copies were issued after the previous block's matmuls (so the
                // VPU fills the columns while the MXU works); the first block issues its own.
                let copied = match copies_done.get(wi).copied().flatten() {
                    Some(c) => c,
                    None => {
                        let after = after_all(e, staged, &cols_readers[p]);
                        im2col_copies(e, &g, stage[sp], cols_t, after, m_blk)
                    }
                };
                readers.push(copied);
                let split = split_rows(m_blk, mxus_for(e.m, m_blk));
                let rhs = Tile { rows: (g.taps() * c) as u32, ..wdst };
                for (x_i, &(r0, rn)) in split.iter().enumerate() {
                    let mut deps = vec![copied, wload];
                    deps.extend(acc_free[p]);
                    let id = e.push(
                        Op::MatMul {
                            mxu: x_i as u8,
                            lhs: cols_t.rows(r0, rn),
                            rhs,
                            out: accp.rows(r0, rn),
                            accumulate: false,
                            precision,
                        },
                        &deps,
                    );
                    producers.push(id);
                }
                // The next use of these im2col columns must wait for these matmuls.
                readers.extend(producers.iter().copied());
                cols_readers[p] = producers.clone();
                // The next block's copies, now, ahead of this block's epilogue on the VPU.
                if wi + 1 < work.len() {
                    let nb_ = &work[wi + 1].1;
                    let np = (wi + 1) % BUFFERS;
                    let nm = g.block_rows(nb_, whole);
                    let next_cols = Tile { rows: nm as u32, ..im2col[np] };
                    let next_stage = stage[unit(wi + 1) % BUFFERS];
                    let after = after_all(e, staged_ids[unit(wi + 1)], &cols_readers[np]);
                    copies_done.resize(wi + 2, None);
                    copies_done[wi + 1] = Some(im2col_copies(e, &g, next_stage, next_cols, after, nm));
                }
            }
            ConvStrategy::Depthwise => {
                let mut last = None;
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let tap = i * g.kw + j;
                        let a = tap_view(i, j, c0, nbw, m_blk);
                        let wrow = Tile { offset: wdst.offset + (tap * nbw * 4) as u64, rows: 1, ..wdst };
                        let deps: Vec<u32> = match last {
                            Some(l) => vec![l],
                            None => compute_deps.clone(),
                        };
                        let op = if tap == 0 {
                            Op::Binary { op: BinaryOp::Mul, a, b: wrow, dst: accp }
                        } else {
                            Op::MulAdd { a, b: wrow, acc: accp }
                        };
                        last = Some(e.push(op, &deps));
                    }
                }
                readers.extend(last);
                producers.extend(last);
            }
        }
        stage_readers[sp].extend(readers.iter().copied());
        weight_readers[wp_].extend(producers.iter().copied());
        // Residual rows, in the accumulator's layout.
        let residual = match residual_of(&kernel) {
            Some(r) => {
                let rp = e.place(r);
                let resp = Tile { rows: m_blk as u32, cols: nbw as u32, stride: nbw as u32, ..res[p] };
                let deps: Vec<u32> = res_free[p].into_iter().collect();
                let loaded = out_rows(e, &g, blk, whole, per_image, rp.tile, resp, c0, nbw, true, &deps);
                Some((resp, loaded))
            }
            None => None,
        };
        // The activation a fused mask reads, likewise.
        let mask = mask_of(&kernel).map(|y| {
            let mp = Tile { rows: m_blk as u32, cols: nbw as u32, stride: nbw as u32, ..masks[p] };
            let deps: Vec<u32> = mask_free[p].into_iter().collect();
            (mp, out_rows(e, &g, blk, whole, per_image, e.place(y).tile, mp, c0, nbw, true, &deps))
        });
        let done = apply_epilogue(e, &kernel, &ch, accp, c0, Operands { residual, mask }, producers.clone());
        if residual.is_some() {
            res_free[p] = Some(done);
        }
        if mask.is_some() {
            mask_free[p] = Some(done);
        }
        let stored = out_rows(e, &g, blk, whole, per_image, y.tile, accp, c0, nbw, false, &[done]);
        acc_free[p] = Some(match sums.as_mut() {
            Some(s) => {
                let read = s.add_block(e, &g, blk, whole, accp, c0, done);
                after_all(e, stored, &[read])
            }
            None => stored,
        });
        useful_macs += (blk.images * blk.bh * g.ow * nbw * g.taps() * cg) as u64;
    }
    if let Some(s) = sums {
        s.store(e);
    }
    let range = first..e.program.len() + 1;
    let name = match strategy {
        ConvStrategy::Shifted => "shifted matmuls (one per tap)",
        ConvStrategy::Im2col => "im2col on the VPU, one matmul per block",
        ConvStrategy::Depthwise => "depthwise on the VPU (one multiply-add per tap)",
    };
    let blocks_desc = if whole {
        format!("{} images per block", m_rows / per_image)
    } else {
        format!("bands of {} rows", m_rows / g.wv)
    };
    let order = if pixel_outer { "; pixel blocks outside (fewer HBM bytes)" } else { "" };
    let strategy_text = format!("{name}; {blocks_desc}; {} channels per block{order}", nb);
    let k_depth = if strategy == ConvStrategy::Im2col { g.taps() * c } else { cg };
    let padded = format!(
        "M {m_rows} (of which {} useful) x K {k_depth}{} x N {nb}{}",
        (blocks.first().map_or(0, |b| b.images * b.bh * g.ow)),
        if strategy == ConvStrategy::Shifted && g.taps() > 1 { format!(" x {} taps", g.taps()) } else { String::new() },
        if depthwise { " (VPU)".to_string() } else { String::new() }
    );
    Ok(e.report(graph, &kernel, strategy_text, padded, useful_macs, range))
}

/// DMAs the input rows block `sb` reads into `stage` (zero padding already in place): whole
/// images one slot each (`sh·hv` padded rows of `wp` pixels), or one band of padded rows. A
/// band that reads no input row (padding only) was zero-filled: it only waits for `deps`.
fn stage_input(e: &mut Emitter, g: &ConvGeom, x: Tile, sb: &Block, whole: bool, stage: Tile, deps: &[u32]) -> u32 {
    let c = g.c;
    let hv = g.hv();
    let row_bytes = (g.w * c * 4) as u64;
    let slot_elems = (g.sh * hv * g.wp * c) as u64;
    if g.xsh > 1 || g.xsw > 1 {
        return stage_dilated(e, g, x, sb, whole, stage, deps);
    }
    if whole {
        // Whole images, one slot each.
        let src = Tile {
            space: Space::Hbm,
            offset: x.offset + (sb.n0 * g.h) as u64 * row_bytes,
            rows: g.h as u32,
            cols: (g.w * c) as u32,
            stride: (g.w * c) as u32,
            dtype: DType::F32,
        };
        let dst = Tile {
            space: Space::Vmem,
            offset: stage.offset + ((g.pt * g.wp + g.pl) * c * 4) as u64,
            rows: g.h as u32,
            cols: (g.w * c) as u32,
            stride: (g.wp * c) as u32,
            dtype: DType::F32,
        };
        let repeat = (sb.images > 1).then(|| Repeat {
            count: sb.images as u32,
            src_step: g.h as u64 * row_bytes,
            dst_step: slot_elems * 4,
        });
        e.push(Op::Dma { engine: 0, src, dst, repeat }, deps)
    } else {
        // A band: padded rows oh0·s .. from image n0.
        let first_padded = sb.oh0 * g.sh;
        let h_lo = first_padded.saturating_sub(g.pt);
        let h_hi = (first_padded + g.sh * sb.bh + g.halo()).saturating_sub(g.pt).min(g.h);
        if h_hi <= h_lo {
            return e.push(Op::Barrier, deps);
        }
        let q_lo = h_lo + g.pt - first_padded;
        let src = Tile {
            space: Space::Hbm,
            offset: x.offset + ((sb.n0 * g.h + h_lo) as u64) * row_bytes,
            rows: (h_hi - h_lo) as u32,
            cols: (g.w * c) as u32,
            stride: (g.w * c) as u32,
            dtype: DType::F32,
        };
        let dst = Tile {
            space: Space::Vmem,
            offset: stage.offset + ((q_lo * g.wp + g.pl) * c * 4) as u64,
            rows: (h_hi - h_lo) as u32,
            cols: (g.w * c) as u32,
            stride: (g.wp * c) as u32,
            dtype: DType::F32,
        };
        e.push(Op::dma(0, src, dst), deps)
    }
}

/// Stages block `sb` into `stage` after its previous `readers`: zero padding first — once per
/// buffer (`filled`), and again before a band whose valid outputs read padding rows that an
/// earlier band filled with data — then [`stage_input`].
#[allow(clippy::too_many_arguments)]
pub(super) fn stage_block(
    e: &mut Emitter,
    g: &ConvGeom,
    x: Tile,
    sb: &Block,
    whole: bool,
    stage: Tile,
    filled: &mut bool,
    readers: &[u32],
) -> u32 {
    if !*filled || (!whole && g.band_needs_fill(sb)) {
        *filled = true;
        let f = e.push(Op::Fill { dst: stage, value: 0.0 }, readers);
        stage_input(e, g, x, sb, whole, stage, &[f])
    } else {
        stage_input(e, g, x, sb, whole, stage, readers)
    }
}

/// [`stage_input`] for a dilated input: stored pixels land `xs` apart in each staged row, and
/// stored rows `xs` padded rows apart (one DMA per image, repeated over its stored rows).
fn stage_dilated(e: &mut Emitter, g: &ConvGeom, x: Tile, sb: &Block, whole: bool, stage: Tile, deps: &[u32]) -> u32 {
    let c = g.c;
    let slot_elems = g.sh * g.hv() * g.wp * c;
    let row_bytes = (g.xw * c * 4) as u64;
    // Stored rows r0..r1 of image n to padded row q of the slot at `slot`.
    let copy = |e: &mut Emitter, n: usize, r0: usize, r1: usize, q: usize, slot: usize, engine: usize| {
        let src = Tile {
            space: Space::Hbm,
            offset: x.offset + (n * g.xh + r0) as u64 * row_bytes,
            rows: g.xw as u32,
            cols: c as u32,
            stride: c as u32,
            dtype: DType::F32,
        };
        let dst = Tile {
            space: Space::Vmem,
            offset: stage.offset + ((slot + (q * g.wp + g.pl) * c) * 4) as u64,
            rows: g.xw as u32,
            cols: c as u32,
            stride: (g.xsw * c) as u32,
            dtype: DType::F32,
        };
        let repeat = Repeat { count: (r1 - r0) as u32, src_step: row_bytes, dst_step: (g.xsh * g.wp * c * 4) as u64 };
        let engine = (engine % e.m.core.dma.engines.max(1)) as u8;
        e.push(Op::Dma { engine, src, dst, repeat: Some(repeat) }, deps)
    };
    let ids: Vec<u32> = if whole {
        (0..sb.images).map(|img| copy(e, sb.n0 + img, 0, g.xh, g.pt, img * slot_elems, img)).collect()
    } else {
        // Virtual rows h_lo..h_hi of the band; the stored ones are the multiples of xs.
        let first_padded = sb.oh0 * g.sh;
        let h_lo = first_padded.saturating_sub(g.pt);
        let h_hi = (first_padded + g.sh * sb.bh + g.halo()).saturating_sub(g.pt).min(g.h);
        let (r0, r1) = (h_lo.div_ceil(g.xsh), h_hi.div_ceil(g.xsh));
        if r1 > r0 { vec![copy(e, sb.n0, r0, r1, r0 * g.xsh + g.pt - first_padded, 0, 0)] } else { Vec::new() }
    };
    match ids.as_slice() {
        [one] => *one,
        _ => e.push(Op::Barrier, if ids.is_empty() { deps } else { &ids }),
    }
}

/// Per-channel sums of a convolution's output for the batch norm after it (batch statistics):
/// `Σ(x − K)` and `Σ(x − K)²` over the valid output pixels, with `K` the first pixel (the
/// shift `batch_norm` uses), accumulated block by block on the VPU while the MXU works, then
/// written to HBM as `[K; Σ; Σ²]` rows.
struct ChannelSums {
    at: u64,
    work: Tile,
    shift: Tile,
    sum: Tile,
    sum_sq: Tile,
    part: Tile,
    /// The last instruction of the chain (the VPU runs it in order; the dependency keeps the
    /// shared vectors ordered for the validator).
    last: Option<u32>,
    /// Channel blocks whose shift is set (from their first block).
    shifted: Vec<bool>,
    nb: usize,
}

impl ChannelSums {
    fn new(
        e: &Emitter,
        kernel: &Kernel,
        at: u64,
        m_rows: usize,
        nb: usize,
        co: usize,
        vmem: &mut Vmem,
    ) -> Result<Self> {
        let oom = |e: &Emitter| e.vmem_error(kernel, "channel-sum buffers");
        let work = vmem.alloc(m_rows, nb).ok_or_else(|| oom(e))?;
        let mut vec = || vmem.alloc(1, co);
        let (shift, sum, sum_sq, part) = (vec(), vec(), vec(), vec());
        let [shift, sum, sum_sq, part] = [shift, sum, sum_sq, part].map(|t| t.ok_or_else(|| oom(e)));
        Ok(ChannelSums {
            at,
            work,
            shift: shift?,
            sum: sum?,
            sum_sq: sum_sq?,
            part: part?,
            last: None,
            shifted: vec![false; co.div_ceil(nb)],
            nb,
        })
    }

    /// Adds the valid pixels of `acc` (block `blk`, channels `c0..`) after `ready`; returns the
    /// instruction after which `acc` is no longer read.
    #[allow(clippy::too_many_arguments)]
    fn add_block(
        &mut self,
        e: &mut Emitter,
        g: &ConvGeom,
        blk: &Block,
        whole: bool,
        acc: Tile,
        c0: usize,
        ready: u32,
    ) -> u32 {
        let (m, nbw) = (acc.rows as usize, acc.cols as usize);
        let cols = |t: Tile| t.columns(c0, nbw);
        let mut deps = vec![ready];
        deps.extend(self.last);
        let first = !self.shifted[c0 / self.nb];
        if first {
            // The block's first streamed row is output pixel (n0, 0, 0): the shift.
            self.shifted[c0 / self.nb] = true;
            let s = e.push(Op::Unary { op: UnaryOp::Copy, src: acc.rows(0, 1), dst: cols(self.shift) }, &deps);
            deps = vec![s];
        }
        let work = Tile { rows: m as u32, cols: nbw as u32, stride: nbw as u32, ..self.work };
        let sub = e.push(Op::Binary { op: BinaryOp::Sub, a: acc, b: cols(self.shift), dst: work }, &deps);
        // Zero what is not an output pixel: the columns past OW of every streamed row, and in
        // whole-image blocks the rows past OH of every image slot.
        let mut last = sub;
        if g.wv > g.ow {
            let t = Tile {
                offset: work.offset + (g.ow * nbw * 4) as u64,
                rows: (m / g.wv) as u32,
                cols: ((g.wv - g.ow) * nbw) as u32,
                stride: (g.wv * nbw) as u32,
                ..work
            };
            last = e.push(Op::Fill { dst: t, value: 0.0 }, &[last]);
        }
        if whole && g.hv() > g.oh {
            let t = Tile {
                offset: work.offset + (g.oh * g.wv * nbw * 4) as u64,
                rows: blk.images as u32,
                cols: ((g.hv() - g.oh) * g.wv * nbw) as u32,
                stride: (g.hv() * g.wv * nbw) as u32,
                ..work
            };
            last = e.push(Op::Fill { dst: t, value: 0.0 }, &[last]);
        }
        let part = cols(self.part);
        let r = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: work, dst: part }, &[last]);
        let a = if first {
            e.push(Op::Unary { op: UnaryOp::Copy, src: part, dst: cols(self.sum) }, &[r])
        } else {
            e.push(Op::Binary { op: BinaryOp::Add, a: cols(self.sum), b: part, dst: cols(self.sum) }, &[r])
        };
        let sq = e.push(Op::Binary { op: BinaryOp::Mul, a: work, b: work, dst: work }, &[a]);
        let r = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: work, dst: part }, &[sq]);
        let b = if first {
            e.push(Op::Unary { op: UnaryOp::Copy, src: part, dst: cols(self.sum_sq) }, &[r])
        } else {
            e.push(Op::Binary { op: BinaryOp::Add, a: cols(self.sum_sq), b: part, dst: cols(self.sum_sq) }, &[r])
        };
        self.last = Some(b);
        sub
    }

    /// Writes `[K; Σ; Σ²]` to HBM.
    fn store(self, e: &mut Emitter) {
        let c = self.sum.cols as usize;
        let after: Vec<u32> = self.last.into_iter().collect();
        for (row, t) in [self.shift, self.sum, self.sum_sq].into_iter().enumerate() {
            let dst = Tile::new(Space::Hbm, self.at + (row * c * 4) as u64, 1, c, DType::F32);
            e.push(Op::dma(2, t, dst), &after);
        }
    }
}

/// `first`, or a barrier on it and `also` (instructions the next user must wait for too).
fn after_all(e: &mut Emitter, first: u32, also: &[u32]) -> u32 {
    if also.is_empty() {
        return first;
    }
    let mut deps = also.to_vec();
    deps.push(first);
    e.push(Op::Barrier, &deps)
}

/// The im2col copies of one block: each kernel row's taps into their columns of `cols`
/// (one copy per kernel row when the taps of a row are consecutive, else one per tap).
/// Returns the last copy.
pub(super) fn im2col_copies(e: &mut Emitter, g: &ConvGeom, stage: Tile, cols: Tile, staged: u32, m_blk: usize) -> u32 {
    let c = stage.cols as usize;
    let (per_copy, taps_per_copy) = if g.dw == 1 { (g.kw * c, g.kw) } else { (c, 1) };
    let mut last = staged;
    for i in 0..g.kh {
        for j in (0..g.kw).step_by(taps_per_copy) {
            let tap = i * g.kw + j;
            let src = Tile {
                space: Space::Vmem,
                offset: stage.offset + (((i * g.dh * g.wp + j * g.dw) * c) * 4) as u64,
                rows: m_blk as u32,
                cols: per_copy as u32,
                stride: (g.sw * c) as u32,
                dtype: DType::F32,
            };
            last = e.push(Op::Unary { op: UnaryOp::Copy, src, dst: cols.columns(tap * c, per_copy) }, &[staged]);
        }
    }
    last
}

/// Moves the valid output rows of a block between HBM (compact NHWC rows) and an accumulator
/// laid out over the padded width; `load` reads HBM into VMEM (residuals), else writes back.
#[allow(clippy::too_many_arguments)]
pub(super) fn out_rows(
    e: &mut Emitter,
    g: &ConvGeom,
    blk: &Block,
    whole: bool,
    per_image: usize,
    hbm: Tile,
    vmem: Tile,
    c0: usize,
    nb: usize,
    load: bool,
    deps: &[u32],
) -> u32 {
    // The tensor holds the output window `crop .. crop + out_hw` (usually all of it).
    let ([top, left], [oh, ow]) = (g.crop, g.out_hw);
    // VMEM rows are `pitch` elements apart (the block's channel width, or wider when a
    // narrower last block keeps the layout of the full-width ones).
    let pitch = vmem.stride as usize;
    let (h_step, v_step) = ((ow * g.co * 4) as u64, (g.wv * pitch * 4) as u64);
    // When image slots hold exactly the output rows (hv = OH), rows of successive images are
    // evenly spaced on both sides: one DMA moves the whole block. Otherwise one per image,
    // spread over the DMA engines so their start-up latencies overlap.
    let cropped = g.crop != [0, 0] || g.out_hw != [g.oh, g.ow];
    let merged = whole && g.hv() == g.oh && !cropped;
    // The block's rows that fall in the window.
    let (r_lo, r_hi) = (blk.oh0.max(top), (blk.oh0 + blk.bh).min(top + oh));
    if r_hi <= r_lo {
        return e.push(Op::Barrier, deps);
    }
    let (copies, rows_each) = if merged { (1, blk.images * blk.bh) } else { (blk.images, r_hi - r_lo) };
    let engines = e.m.core.dma.engines.max(1);
    let mut ids = Vec::with_capacity(copies);
    for img in 0..copies {
        let n = blk.n0 + img;
        let v_row0 = if whole { img * per_image } else { 0 } + (r_lo - blk.oh0) * g.wv + left;
        let h = Tile {
            space: Space::Hbm,
            offset: hbm.offset + (((n * oh + r_lo - top) * ow * g.co + c0) * 4) as u64,
            rows: ow as u32,
            cols: nb as u32,
            stride: g.co as u32,
            dtype: DType::F32,
        };
        let v = Tile {
            offset: vmem.offset + (v_row0 * pitch * 4) as u64,
            rows: ow as u32,
            cols: nb as u32,
            stride: pitch as u32,
            ..vmem
        };
        let (src, dst, src_step, dst_step) = if load { (h, v, h_step, v_step) } else { (v, h, v_step, h_step) };
        let repeat = (rows_each > 1).then_some(Repeat { count: rows_each as u32, src_step, dst_step });
        let engine = ((if load { 1 } else { 2 }) + img) % engines;
        ids.push(e.push(Op::Dma { engine: engine as u8, src, dst, repeat }, deps));
    }
    if ids.len() == 1 { ids[0] } else { e.push(Op::Barrier, &ids) }
}

// ---------------------------------------------------------------------------------------------
// Dense layers

fn dense(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let n = e.graph.node(node);
    let mut kernel = kernel.clone();
    if n.inputs.len() > 2 {
        kernel.epilogue.insert(0, Epilogue::Bias(n.inputs[2]));
    }
    let lhs = Operand { tile: e.place(n.inputs[0]).tile, transposed: false };
    let rhs = Operand { tile: e.place(n.inputs[1]).tile, transposed: false };
    matmul_kernel(e, &kernel, lhs, rhs, e.place(kernel.output).tile)
}

/// A matmul operand as stored in HBM; `transposed` means the kernel uses its transpose (each
/// block is loaded as stored and turned on the VPU's transpose unit).
#[derive(Clone, Copy)]
pub(super) struct Operand {
    pub tile: Tile,
    pub transposed: bool,
}

impl Operand {
    /// Rows and columns of the operand as the matmul sees it.
    fn logical(&self) -> (usize, usize) {
        let (r, c) = (self.tile.rows as usize, self.tile.cols as usize);
        if self.transposed { (c, r) } else { (r, c) }
    }

    /// The stored block holding logical rows `r0..r0+rn` and columns `c0..c0+cn`.
    fn block(&self, r0: usize, rn: usize, c0: usize, cn: usize) -> Tile {
        if self.transposed { self.tile.rows(c0, cn).columns(r0, rn) } else { self.tile.rows(r0, rn).columns(c0, cn) }
    }
}

/// Loads a logical `rn × cn` block of `op` into `dst` (through `stage` when transposed);
/// returns the instruction after which `dst` holds it.
#[allow(clippy::too_many_arguments)] // the block, its buffers and what each must wait for
fn load_block(
    e: &mut Emitter,
    op: Operand,
    (r0, rn, c0, cn): (usize, usize, usize, usize),
    engine: u8,
    dst: Tile,
    stage: Option<Tile>,
    dst_free: &[u32],
    stage_free: &[u32],
) -> u32 {
    let src = op.block(r0, rn, c0, cn);
    match stage {
        Some(stage) if op.transposed => {
            let st = Tile { rows: cn as u32, cols: rn as u32, stride: rn as u32, ..stage };
            let load = e.push(Op::dma(engine, src, st), stage_free);
            let mut deps = dst_free.to_vec();
            deps.push(load);
            e.push(Op::Transpose { src: st, dst }, &deps)
        }
        _ => e.push(Op::dma(engine, src, dst), dst_free),
    }
}

/// `out = lhs · rhs` (then the kernel's epilogue), weights stationary: for each block of rows
/// and each block of output columns, K blocks accumulate on the MXUs, rows split across them.
pub(super) fn matmul_kernel(
    e: &mut Emitter,
    kernel: &Kernel,
    lhs: Operand,
    rhs: Operand,
    out: Tile,
) -> Result<KernelReport> {
    let first = e.program.len();
    let graph = e.graph;
    let (rows, fin) = lhs.logical();
    let (k_rhs, fout) = rhs.logical();
    debug_assert_eq!(fin, k_rhs, "matmul operands agree on K");
    let cols = e.m.core.mxu.cols;
    let array_rows = e.m.core.mxu.rows;
    let (mut nb, mut mb) = (fout.min(4 * cols), rows.min(TARGET_ROWS));
    // K blocks: weights kb x nb and inputs mb x kb within budget.
    let kb_budget = (WEIGHT_BUDGET / 4) as usize / nb.max(mb);
    let mut kb = fin.min((kb_budget / array_rows).max(1) * array_rows);
    // Every ring (inputs, weights, accumulators, residuals, transpose staging) within VMEM:
    // fewer rows per block first, then fewer output columns, then a shallower K block.
    let extra_rows = residual_of(kernel).is_some() as usize;
    let need = |nb: usize, mb: usize, kb: usize| {
        let staged = if lhs.transposed { kb * mb } else { 0 } + if rhs.transposed { nb * kb } else { 0 };
        (BUFFERS * 4 * (mb * kb + kb * nb + (1 + extra_rows) * mb * nb + staged) + 8 * fout * 4) as u64
    };
    while need(nb, mb, kb) > e.m.core.vmem_bytes - 16 * 512 {
        if mb > array_rows {
            mb = (mb / 2).max(array_rows);
        } else if nb > cols {
            nb = (nb / 2).max(cols);
        } else if kb > array_rows {
            kb = (kb / 2).max(array_rows);
        } else {
            break;
        }
    }
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "input, weight and accumulator blocks");
    let mut bufs = |n: usize, r: usize, c: usize, e: &Emitter| -> Result<Vec<Tile>> {
        (0..n).map(|_| vmem.alloc(r, c)).collect::<Option<_>>().ok_or_else(|| oom(e))
    };
    let xb = bufs(BUFFERS, mb, kb, e)?;
    let wb = bufs(BUFFERS, kb, nb, e)?;
    let acc = bufs(BUFFERS, mb, nb, e)?;
    let res = bufs(if residual_of(kernel).is_some() { BUFFERS } else { 0 }, mb, nb, e)?;
    let xs_stage = bufs(if lhs.transposed { BUFFERS } else { 0 }, kb, mb, e)?;
    let ws_stage = bufs(if rhs.transposed { BUFFERS } else { 0 }, nb, kb, e)?;
    let ch = prepare_channels(e, kernel, fout, &mut vmem)?;
    let precision = e.opts.precision;
    let mut buf_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut x_stage_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut w_stage_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut acc_free: Vec<Option<u32>> = vec![None; BUFFERS];
    let mut res_free: Vec<Option<u32>> = vec![None; BUFFERS];
    let (mut step, mut block) = (0usize, 0usize);
    for r0 in (0..rows).step_by(mb) {
        let rn = mb.min(rows - r0);
        for c0 in (0..fout).step_by(nb) {
            let cn = nb.min(fout - c0);
            let ap = block % BUFFERS;
            block += 1;
            let accp = Tile { rows: rn as u32, cols: cn as u32, stride: cn as u32, ..acc[ap] };
            let split = split_rows(rn, mxus_for(e.m, rn));
            let mut last_per_mxu: Vec<Option<u32>> = vec![None; split.len()];
            for k0 in (0..fin).step_by(kb) {
                let kn = kb.min(fin - k0);
                let p = step % BUFFERS;
                step += 1;
                let xd = Tile { rows: rn as u32, cols: kn as u32, stride: kn as u32, ..xb[p] };
                let wd = Tile { rows: kn as u32, cols: cn as u32, stride: cn as u32, ..wb[p] };
                let xst = xs_stage.get(p).copied();
                let wst = ws_stage.get(p).copied();
                let dx = load_block(e, lhs, (r0, rn, k0, kn), 0, xd, xst, &buf_readers[p], &x_stage_readers[p]);
                let dw = load_block(e, rhs, (k0, kn, c0, cn), 1, wd, wst, &buf_readers[p], &w_stage_readers[p]);
                if lhs.transposed {
                    x_stage_readers[p] = vec![dx];
                }
                if rhs.transposed {
                    w_stage_readers[p] = vec![dw];
                }
                let mut readers = Vec::new();
                for (x_i, &(s0, sn)) in split.iter().enumerate() {
                    // K blocks accumulate on one MXU in program order: no dependency needed.
                    let mut deps = vec![dx, dw];
                    if k0 == 0 {
                        deps.extend(acc_free[ap]);
                    }
                    let id = e.push(
                        Op::MatMul {
                            mxu: x_i as u8,
                            lhs: xd.rows(s0, sn),
                            rhs: wd,
                            out: accp.rows(s0, sn),
                            accumulate: k0 > 0,
                            precision,
                        },
                        &deps,
                    );
                    last_per_mxu[x_i] = Some(id);
                    readers.push(id);
                }
                buf_readers[p] = readers;
            }
            let producers: Vec<u32> = last_per_mxu.iter().flatten().copied().collect();
            let residual = match residual_of(kernel) {
                Some(r) => {
                    let resp = Tile { rows: rn as u32, cols: cn as u32, stride: cn as u32, ..res[ap] };
                    let deps: Vec<u32> = res_free[ap].into_iter().collect();
                    let loaded = e.push(Op::dma(1, e.place(r).tile.rows(r0, rn).columns(c0, cn), resp), &deps);
                    Some((resp, loaded))
                }
                None => None,
            };
            let done = apply_epilogue(e, kernel, &ch, accp, c0, Operands { residual, mask: None }, producers);
            if residual.is_some() {
                res_free[ap] = Some(done);
            }
            acc_free[ap] = Some(e.push(Op::dma(2, accp, out.rows(r0, rn).columns(c0, cn)), &[done]));
        }
    }
    let range = first..e.program.len() + 1;
    let useful = (rows * fin * fout) as u64;
    let turned = match (lhs.transposed, rhs.transposed) {
        (false, false) => "",
        (true, false) => "; input blocks transposed on the VPU",
        (false, true) => "; weight blocks transposed on the VPU",
        (true, true) => "; both operands transposed on the VPU",
    };
    Ok(e.report(
        graph,
        kernel,
        format!("row blocks of {mb}, {nb} outputs and {kb} inputs per block{turned}"),
        format!("M {rows} x K {fin} x N {fout}"),
        useful,
        range,
    ))
}

// ---------------------------------------------------------------------------------------------
// Pooling, global pooling, pointwise kernels, softmax, concatenation

/// Images per block so that `images × bytes_per_image` (in and out, twice) fits in VMEM.
/// The VPU's pooling geometry for `n` images of `hw` pixels.
pub(super) fn pool_shape(n: usize, [h, w]: [usize; 2], attrs: &PoolAttrs, win: &Window2d) -> PoolShape {
    let u = |v: usize| v as u32;
    PoolShape {
        n: u(n),
        h: u(h),
        w: u(w),
        window: attrs.window.map(u),
        strides: attrs.strides.map(u),
        pad: [u(win.pad_top), u(win.pad_left)],
        out_h: u(win.out_h),
        out_w: u(win.out_w),
    }
}

/// Blocks for image-wise VPU work (pooling and its gradient): whole images, and as many
/// channels of them as keep `BUFFERS` blocks within half of VMEM — all channels unless one
/// image is too big (the 224x224 first pools of VGG). Returns (images, channels) per block.
pub(super) fn image_channel_blocks(e: &Emitter, n: usize, c: usize, bytes_per_pixel_channel: usize) -> (usize, usize) {
    let budget = (e.m.core.vmem_bytes / 2 / BUFFERS as u64) as usize;
    let fit = (budget / bytes_per_pixel_channel.max(1)).clamp(1, c);
    let cb = c.div_ceil(c.div_ceil(fit));
    ((budget / (bytes_per_pixel_channel * cb).max(1)).clamp(1, n), cb)
}

fn pool(e: &mut Emitter, kernel: &Kernel, node: NodeId, attrs: &PoolAttrs, max: bool) -> Result<KernelReport> {
    let first = e.program.len();
    let graph = e.graph;
    let x = e.place(graph.node(node).inputs[0]);
    let y = e.place(kernel.output);
    let [n, h, w, c] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let win = attrs.resolve([h, w]).expect("checked when the node was added");
    let (in_px, out_px) = (h * w, win.out_h * win.out_w);
    let (imgs, cb) = image_channel_blocks(e, n, c, (in_px + out_px) * 4);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "image buffers");
    let src = vmem.ring(imgs * in_px, cb).ok_or_else(|| oom(e))?;
    let dst = vmem.ring(imgs * out_px, cb).ok_or_else(|| oom(e))?;
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let blocks = (0..n).step_by(imgs).flat_map(|n0| (0..c).step_by(cb).map(move |c0| (n0, c0)));
    for (b, (n0, c0)) in blocks.enumerate() {
        let k = imgs.min(n - n0);
        let cn = cb.min(c - c0);
        let p = b % BUFFERS;
        let s = Tile::new(Space::Vmem, src[p].offset, k * in_px, cn, DType::F32);
        let d = Tile::new(Space::Vmem, dst[p].offset, k * out_px, cn, DType::F32);
        let load = e.push(Op::dma(0, x.tile.rows(n0 * in_px, k * in_px).columns(c0, cn), s), &free[p]);
        let shape = pool_shape(k, [h, w], attrs, &win);
        let op = if max { PoolOp::Max } else { PoolOp::Avg };
        let pooled = e.push(Op::Pool { op, shape, src: s, dst: d }, &[load]);
        let store = e.push(Op::dma(2, d, y.tile.rows(n0 * out_px, k * out_px).columns(c0, cn)), &[pooled]);
        free[p] = vec![pooled, store];
    }
    let range = first..e.program.len() + 1;
    let pad = matches!(attrs.padding, Padding::Same | Padding::Explicit { .. });
    Ok(e.report(
        graph,
        kernel,
        format!(
            "{imgs} images of {cb} channels per block on the VPU{}",
            if pad { ", padding excluded from windows" } else { "" }
        ),
        format!("{}x{} windows over {h}x{w}x{c}", attrs.window[0], attrs.window[1]),
        0,
        range,
    ))
}

fn global_avg_pool(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let graph = e.graph;
    let x = e.place(graph.node(node).inputs[0]);
    let y = e.place(kernel.output);
    let [n, h, w, c] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let px = h * w;
    let (imgs, cb) = image_channel_blocks(e, n, c, (px + 1) * 4);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "image buffers");
    let src = vmem.ring(imgs * px, cb).ok_or_else(|| oom(e))?;
    let dst = vmem.ring(imgs, cb).ok_or_else(|| oom(e))?;
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let blocks = (0..n).step_by(imgs).flat_map(|n0| (0..c).step_by(cb).map(move |c0| (n0, c0)));
    for (b, (n0, c0)) in blocks.enumerate() {
        let (k, cn) = (imgs.min(n - n0), cb.min(c - c0));
        let p = b % BUFFERS;
        let s = Tile::new(Space::Vmem, src[p].offset, k * px, cn, DType::F32);
        let d = Tile::new(Space::Vmem, dst[p].offset, k, cn, DType::F32);
        let load = e.push(Op::dma(0, x.tile.rows(n0 * px, k * px).columns(c0, cn), s), &free[p]);
        let mut last = load;
        for i in 0..k {
            last = e.push(
                Op::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: s.rows(i * px, px), dst: d.rows(i, 1) },
                &[last],
            );
        }
        let mean = e.push(Op::Unary { op: UnaryOp::Scale(1.0 / px as f32), src: d, dst: d }, &[last]);
        let store = e.push(Op::dma(2, d, y.tile.rows(n0, k).columns(c0, cn)), &[mean]);
        free[p] = vec![mean, store];
    }
    let range = first..e.program.len() + 1;
    Ok(e.report(
        graph,
        kernel,
        format!("{imgs} images of {cb} channels per block, row sums on the VPU"),
        format!("{h}x{w}x{c} to {c}"),
        0,
        range,
    ))
}

fn pointwise(e: &mut Emitter, kernel: &Kernel, input: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let graph = e.graph;
    let x = e.place(input);
    let y = e.place(kernel.output);
    let (rows, c) = (x.tile.rows as usize, x.tile.cols as usize);
    let rb = ((e.m.core.vmem_bytes / 16) as usize / (c * 4)).clamp(1, rows);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let buf: Vec<Tile> = (0..BUFFERS).map(|_| vmem.alloc(rb, c)).collect::<Option<_>>().ok_or_else(|| oom(e))?;
    let res: Vec<Tile> = if residual_of(kernel).is_some() {
        (0..BUFFERS).map(|_| vmem.alloc(rb, c)).collect::<Option<_>>().ok_or_else(|| oom(e))?
    } else {
        Vec::new()
    };
    let ch = prepare_channels(e, kernel, c, &mut vmem)?;
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let p = b % BUFFERS;
        let t = Tile { rows: rn as u32, ..buf[p] };
        let load = e.push(Op::dma(0, x.tile.rows(r0, rn), t), &free[p]);
        let residual = match residual_of(kernel) {
            Some(r) => {
                let rt = Tile { rows: rn as u32, ..res[p] };
                Some((rt, e.push(Op::dma(1, e.place(r).tile.rows(r0, rn), rt), &free[p])))
            }
            None => None,
        };
        let done = apply_epilogue(e, kernel, &ch, t, 0, Operands { residual, mask: None }, vec![load]);
        let store = e.push(Op::dma(2, t, y.tile.rows(r0, rn)), &[done]);
        free[p] = vec![done, store];
    }
    let range = first..e.program.len() + 1;
    Ok(e.report(graph, kernel, format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0, range))
}

fn softmax(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let graph = e.graph;
    let x = e.place(graph.node(node).inputs[0]);
    let y = e.place(kernel.output);
    let (rows, c) = (x.tile.rows as usize, x.tile.cols as usize);
    let rb = ((e.m.core.vmem_bytes / 16) as usize / (c * 4 + 8)).clamp(1, rows);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let buf = vmem.alloc(rb, c).ok_or_else(|| oom(e))?;
    let col = vmem.alloc(rb, 1).ok_or_else(|| oom(e))?;
    let mut free = Vec::new();
    for r0 in (0..rows).step_by(rb) {
        let rn = rb.min(rows - r0);
        let (t, s) = (Tile { rows: rn as u32, ..buf }, Tile { rows: rn as u32, ..col });
        let load = e.push(Op::dma(0, x.tile.rows(r0, rn), t), &free);
        let mx = e.push(Op::Reduce { op: ReduceOp::Max, axis: Axis::Cols, src: t, dst: s }, &[load]);
        let sub = e.push(Op::Binary { op: BinaryOp::Sub, a: t, b: s, dst: t }, &[mx]);
        let ex = e.push(Op::Unary { op: UnaryOp::Exp, src: t, dst: t }, &[sub]);
        let sum = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: t, dst: s }, &[ex]);
        let div = e.push(Op::Binary { op: BinaryOp::Div, a: t, b: s, dst: t }, &[sum]);
        let store = e.push(Op::dma(2, t, y.tile.rows(r0, rn)), &[div]);
        free = vec![div, store];
    }
    let range = first..e.program.len() + 1;
    Ok(e.report(graph, kernel, format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0, range))
}

/// The indices `a0..a0+len` along `axis` of the tensor at `p`, for every index of the axes
/// before it: `outer` rows of `len · inner` contiguous elements, `dim · inner` apart. Concat
/// and slice along any axis are one strided DMA each way.
fn axis_block(p: &Place, axis: usize, a0: usize, len: usize) -> Tile {
    let outer: usize = p.shape[..axis].iter().product();
    let inner: usize = p.shape[axis + 1..].iter().product();
    Tile {
        space: p.tile.space,
        offset: p.tile.offset + (a0 * inner * 4) as u64,
        rows: outer as u32,
        cols: (len * inner) as u32,
        stride: (p.shape[axis] * inner) as u32,
        dtype: DType::F32,
    }
}

/// The axis of the concrete (batched) shape a per-example `axis` attribute names.
fn batched_axis(e: &Emitter, node: NodeId, axis: i64, rank: usize) -> Result<usize> {
    crate::graph::per_example_axis(axis, rank).map(|a| a + 1).map_err(|why| e.unsupported(node, why))
}

fn concat(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let graph = e.graph;
    let n = graph.node(node);
    let GOp::Concat(attrs) = &n.op else { unreachable!("a Concat main") };
    let y = e.place(kernel.output);
    let axis = batched_axis(e, node, attrs.axis, y.shape.len())?;
    let mut a0 = 0;
    for (i, &input) in n.inputs.iter().enumerate() {
        let x = e.place(input);
        let len = x.shape[axis];
        e.push(Op::dma(i as u8, axis_block(x, axis, 0, len), axis_block(y, axis, a0, len)), &[]);
        a0 += len;
    }
    let range = first..e.program.len() + 1;
    let what = format!("{} inputs along axis {axis}", n.inputs.len());
    Ok(e.report(graph, kernel, "strided DMA into slices of the output".into(), what, 0, range))
}

/// `Slice` (the gradient of a concatenation): one strided DMA.
fn slice(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let n = e.graph.node(node);
    let GOp::Slice(attrs) = &n.op else { unreachable!("a Slice main") };
    let (x, y) = (e.place(n.inputs[0]), e.place(kernel.output));
    let axis = batched_axis(e, node, attrs.axis, x.shape.len())?;
    e.push(Op::dma(0, axis_block(x, axis, attrs.start, attrs.len), axis_block(y, axis, 0, attrs.len)), &[]);
    let range = first..e.program.len() + 1;
    let what = format!("{} of {} along axis {axis}", attrs.len, x.shape[axis]);
    Ok(e.report(e.graph, kernel, "strided DMA of a slice".into(), what, 0, range))
}

/// Tiles and schedules every kernel; returns the program, the reports and the tiling dump.
pub(super) fn emit(
    graph: &Graph,
    kernels: &[Kernel],
    places: &[Option<Place>],
    (scratch, stats): (&[Option<u64>], &[Option<u64>]),
    opts: &Options,
    extras: &Extras,
) -> Result<(Program, Vec<KernelReport>, String)> {
    let mut e = Emitter {
        extras,
        scratch: None,
        stats_out: None,
        m: &opts.machine,
        opts,
        graph,
        places,
        program: Program::new(graph.name()),
        start: 0,
        prev_end: None,
        last_on_unit: BTreeMap::new(),
        account: Account::default(),
    };
    let mut reports = Vec::new();
    let mut dump = String::new();
    for (k, kernel) in kernels.iter().enumerate() {
        if let Main::View(_) = kernel.main {
            continue;
        }
        e.scratch = scratch[k];
        e.stats_out = stats[k];
        e.begin();
        let report = match &kernel.main {
            Main::Conv(n) => conv(&mut e, kernel, *n)?,
            Main::Dense(n) => dense(&mut e, kernel, *n)?,
            Main::MaxPool(n) | Main::AvgPool(n) => {
                let (attrs, max) = match &graph.node(*n).op {
                    GOp::MaxPool(p) => (p.clone(), true),
                    GOp::AvgPool(p) => (p.clone(), false),
                    _ => unreachable!("a pool main"),
                };
                pool(&mut e, kernel, *n, &attrs, max)?
            }
            Main::GlobalAvgPool(n) => global_avg_pool(&mut e, kernel, *n)?,
            Main::Softmax(n) => softmax(&mut e, kernel, *n)?,
            Main::Concat(n) => concat(&mut e, kernel, *n)?,
            Main::Slice(n) => slice(&mut e, kernel, *n)?,
            Main::Pointwise { input } => pointwise(&mut e, kernel, *input)?,
            Main::Loss(n) => backward::loss(&mut e, kernel, *n)?,
            Main::LossGrad(n) => backward::loss_grad(&mut e, kernel, *n)?,
            Main::MatMulT(n) => backward::dense_grad(&mut e, kernel, *n)?,
            Main::ColumnSums(n) => backward::column_sums(&mut e, kernel, *n)?,
            Main::Mask(n) => backward::mask(&mut e, kernel, *n)?,
            Main::SoftmaxGrad(n) => backward::softmax_grad(&mut e, kernel, *n)?,
            Main::PoolGrad(n) => backward::pool_grad(&mut e, kernel, *n)?,
            Main::Dropout(n) => backward::dropout(&mut e, kernel, *n)?,
            Main::ConvGradInput(n) => conv_grad::conv_grad_input(&mut e, kernel, *n)?,
            Main::ConvGradFilter(n) => conv_grad::conv_grad_filter(&mut e, kernel, *n)?,
            Main::BatchNormGrad(g) => batch_norm::grad(&mut e, kernel, g)?,
            Main::BatchNormGradGamma(n) => batch_norm::grad_gamma(&mut e, kernel, *n)?,
            Main::Update(u) => backward::update(&mut e, kernel, u)?,
            Main::Advance(state) => backward::advance(&mut e, kernel, state)?,
            Main::View(_) => unreachable!("skipped above"),
        };
        e.end();
        dump += &format!("{:<28} {:<44} {}\n", report.name, report.strategy, report.padded);
        reports.push(report);
    }
    Ok((e.program, reports, dump))
}

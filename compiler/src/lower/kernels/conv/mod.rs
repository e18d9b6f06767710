//! Convolutions forward: the driver every strategy shares. Output channels are cut into blocks
//! (one group each for grouped convolutions, else whole array widths within the weight
//! budget), output rows into blocks of whole images or bands sized to `TARGET_ROWS` and VMEM;
//! the two loops nest whichever way keeps the DMAs shorter. Per block the driver stages the
//! input (`BUFFERS` ahead), hands the block to its strategy — [`shifted`] matmuls, [`phases`]
//! for strided convolutions, [`im2col`] or [`depthwise`] on the VPU (both read a strided
//! input by phase too) — then applies the epilogue, stores the rows and, for a batch norm
//! that follows, sums them per channel.

use systolic_simulator::isa::*;
use systolic_simulator::numerics::Precision;

use crate::error::Result;
use crate::graph::{Conv2d, NodeId, Op};
use crate::lower::blocks::channel_sums::ChannelSums;
use crate::lower::blocks::conv_layout::{Block, ConvLayout, PixelBlocks, Scatter};
use crate::lower::blocks::epilogue::{Operands, apply_epilogue, mask_of, prepare_channels, residual_of};
use crate::lower::blocks::staging::{out_rows, stage_block};
use crate::lower::emitter::{BUFFERS, Emitted, Emitter, TARGET_ROWS, WEIGHT_BUDGET};
use crate::lower::kernel::{Epilogue, Kernel, Place};
use crate::lower::kernels::conv::work::{BlockWork, Computed, NextBlock};

mod depthwise;
mod gathered;
mod im2col;
mod phases;
mod shifted;
mod work;

/// How each block of output rows is computed (one module each).
enum Strategy {
    Shifted,
    Gathered,
    Phases,
    Im2col(Option<im2col::Im2col>),
    Depthwise,
}

impl Strategy {
    /// Depthwise on the VPU; the gathered im2col matrix on small maps, where the padded
    /// width and height would be much of the streamed rows; im2col where folding the taps
    /// into K needs fewer passes; by phase where a stride above 1 would stream wasted rows;
    /// else shifted matmuls.
    fn choose(g: &ConvLayout, cg: usize, m: &systolic_simulator::Machine, traffic: Traffic) -> Strategy {
        let array_rows = m.core.mxu.rows;
        if g.depthwise(cg) {
            Strategy::Depthwise
        } else if g.gather_pays(cg, array_rows, BUFFERS, m.core.vmem_bytes) && gathering_is_faster(g, cg, m, traffic) {
            Strategy::Gathered
        } else if g.im2col_pays(cg, array_rows) {
            Strategy::Im2col(None)
        } else if phases::pays(g) {
            Strategy::Phases
        } else {
            Strategy::Shifted
        }
    }

    /// Whether the strategy reads the input staged by phase: matmuls by phase, and im2col
    /// and depthwise convolutions wherever phases pay.
    fn phased(&self, g: &ConvLayout) -> bool {
        match self {
            Strategy::Phases => true,
            Strategy::Im2col(_) | Strategy::Depthwise => phases::pays(g),
            Strategy::Shifted | Strategy::Gathered => false,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Strategy::Shifted => "shifted matmuls (one per tap)",
            Strategy::Gathered => "im2col gathered by the staging DMAs, one matmul per block",
            Strategy::Phases => "shifted matmuls over stride phases (one per tap)",
            Strategy::Im2col(_) => "im2col on the VPU, one matmul per block",
            Strategy::Depthwise => "depthwise on the VPU (one multiply-add per tap)",
        }
    }

    /// VMEM of the strategy's own buffers, per buffer of the ring.
    fn bytes_per_buffer(&self, g: &ConvLayout, m_rows: usize) -> u64 {
        match self {
            Strategy::Im2col(_) => im2col::Im2col::bytes_per_buffer(m_rows, g.taps(), g.c),
            Strategy::Shifted | Strategy::Gathered | Strategy::Phases | Strategy::Depthwise => 0,
        }
    }

    fn compute(&mut self, e: &mut Emitter, w: &BlockWork) -> Computed {
        match self {
            Strategy::Shifted => shifted::compute(e, w),
            Strategy::Gathered => gathered::compute(e, w),
            Strategy::Phases => phases::compute(e, w),
            Strategy::Im2col(state) => state.as_mut().expect("buffers allocated").compute(e, w),
            Strategy::Depthwise => depthwise::compute(e, w),
        }
    }
}

/// The HBM bytes of a convolution's tensors (input, weights, output), its channel block
/// width and precision: what gathering the input once per tap and channel block costs.
#[derive(Clone, Copy)]
struct Traffic {
    x: u64,
    w: u64,
    y: u64,
    nb: usize,
    precision: Precision,
}

/// Cycles a kernel's transfers take, as the timing engine runs them: the data phases share
/// the HBM port, and each transfer holds one of the engines for its start-up latency and its
/// data — the slower of the two.
fn dma_time(m: &systolic_simulator::Machine, bytes: u64, transfers: u64) -> f64 {
    let engines = m.core.dma.engines.max(1) as f64;
    let port = bytes as f64 / m.core.hbm.bytes_per_cycle;
    port.max(((transfers * m.core.dma.latency_cycles) as f64 + port) / engines)
}

/// HBM bytes and transfers of the two loop orders (channel blocks outside, pixel blocks
/// outside) for `n_c` channel blocks and `n_p` pixel blocks of `stage_dmas` staging transfers
/// each; `x` is the input as staged (a gathered input: once per tap).
fn loop_orders(t: Traffic, x: u64, n_c: u64, n_p: u64, stage_dmas: u64) -> [(u64, u64); 2] {
    let stores = n_c * n_p;
    [
        (t.w + n_c * x + t.y, n_c + n_c * n_p * stage_dmas + stores),
        (n_p * t.w + x + t.y, 2 * n_c * n_p + n_p * stage_dmas),
    ]
}

/// Whether the gathered layout's step is shorter, each side the slower of its MXU passes and
/// its DMAs: gathering streams only output rows, but reads the input once per tap and channel
/// block in one transfer per image and tap, which can leave a small map DMA-bound.
fn gathering_is_faster(g: &ConvLayout, cg: usize, m: &systolic_simulator::Machine, t: Traffic) -> bool {
    let (rows, mxus) = (m.core.mxu.rows, m.core.mxu.count.max(1));
    // Each pass is repeated for every bf16 product the precision needs.
    let products = t.precision.passes().len();
    let folded = (g.taps() * cg).div_ceil(rows);
    // Rows per image otherwise: by phase, packed side by side, or one image a slot.
    let streamed = if g.phases_pay() {
        g.hv() * g.wp.div_ceil(g.sw)
    } else if g.packing_pays() {
        g.oh * g.pitch()
    } else {
        g.hv() * g.wv
    };
    let padded = (g.taps() * cg.div_ceil(rows)).min(folded) * streamed;
    let col_tiles = g.co.div_ceil(m.core.mxu.cols);
    let mxu = |row_passes: usize| (g.n * row_passes * col_tiles * products).div_ceil(mxus) as f64;
    // Blocks of whole images, enough of them for one array's depth of rows.
    let per_image = g.oh * g.ow;
    let images = rows.div_ceil(per_image).min(g.n).max(1);
    let (n_c, n_p) = (g.co.div_ceil(t.nb.max(1)) as u64, g.n.div_ceil(images) as u64);
    let now = mxu(padded).max(dma_time(m, t.x + t.w + t.y, 2 * n_c * n_p));
    let dma = loop_orders(t, t.x * g.taps() as u64, n_c, n_p, (images * g.taps()) as u64)
        .map(|(bytes, transfers)| dma_time(m, bytes, transfers));
    let gathered = mxu(folded * per_image).max(dma[0].min(dma[1]));
    // Estimates both: the gathered layout must win by a margin.
    gathered < 0.95 * now
}

/// What a convolution kernel computes: `y = conv(x, w)` (+ the kernel's epilogue), operands
/// given by place so the gradient kernels can convolve tensors that are not graph nodes.
pub(crate) struct ConvSpec<'p> {
    pub x: &'p Place,
    pub w: &'p Place,
    pub y: &'p Place,
    pub attrs: Conv2d,
    pub bias: Option<NodeId>,
    /// `y` holds rows `top..top+h` and columns `left..left+w` of the convolution's output
    /// (`[top, left, h, w]`); None: all of it.
    pub out_window: Option<[usize; 4]>,
    /// The window is one stride phase of a larger `y` (see [`Scatter`]); None: `y` is it.
    pub scatter: Option<Scatter>,
}

pub(crate) fn conv(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let Op::Conv2d(attrs) = &n.op else { unreachable!("a Conv main") };
    let spec = ConvSpec {
        x: e.place(n.inputs[0]),
        w: e.place(n.inputs[1]),
        y: e.place(kernel.output),
        attrs: attrs.clone(),
        bias: n.inputs.get(2).copied(),
        out_window: None,
        scatter: None,
    };
    conv_with(e, kernel, &spec)
}

/// Emits the convolution `spec` for `kernel`.
pub(crate) fn conv_with(e: &mut Emitter, kernel: &Kernel, spec: &ConvSpec) -> Result<Emitted> {
    let (x, w, y, attrs) = (spec.x, spec.w, spec.y, &spec.attrs);
    let c = x.shape[3];
    let cg = w.shape[2];
    let mut g = ConvLayout::new(attrs, &x.shape, &w.shape);
    if let Some([top, left, h, w]) = spec.out_window {
        (g.crop, g.out_hw) = ([top, left], [h, w]);
    }
    g.scatter = spec.scatter;
    let co = g.co;
    let depthwise = g.depthwise(cg);
    // The bias input is the first epilogue step.
    let mut kernel = kernel.clone();
    if let Some(b) = spec.bias {
        kernel.epilogue.insert(0, Epilogue::Bias(b));
    }
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

    let traffic = Traffic { x: x.tile.bytes(), w: w.tile.bytes(), y: y.tile.bytes(), nb, precision: e.opts.precision };
    let mut strategy = Strategy::choose(&g, cg, e.m, traffic);
    if strategy.phased(&g) {
        g = g.phased();
    }
    if matches!(strategy, Strategy::Gathered) {
        g = g.gathered();
    }

    // Blocks of output rows sized to TARGET_ROWS and to VMEM.
    let operands = residual_of(&kernel).is_some() as u64 + mask_of(&kernel).is_some() as u64;
    let fits = |g: &ConvLayout, pb: &PixelBlocks| {
        let (m_rows, stage_rows) = (pb.m_rows, pb.stage_rows);
        let stage = (g.stage_pixels(stage_rows) * c * 4) as u64;
        let acc = (m_rows * nb * 4) as u64;
        let res = operands * acc;
        let cols_buf = strategy.bytes_per_buffer(g, m_rows);
        let weights = (g.taps() * cg * nb * 4) as u64;
        // Channel sums for a batch norm: one block-sized work buffer and `1 × C` vectors.
        let sums = if e.stats_out.is_some() { acc + (4 * co * 4) as u64 } else { 0 };
        let need =
            BUFFERS as u64 * (stage + acc + res + cols_buf) + 2 * weights + sums + (8 * co * 4) as u64 + 16 * 512;
        need <= e.m.core.vmem_bytes
    };
    // Shifted matmuls on small maps (over the padded width or by phase): images side by side,
    // as many as fit and divide the batch (every block full, so the channel sums see only the
    // block's images).
    if matches!(strategy, Strategy::Shifted | Strategy::Phases) && g.groups == 1 && g.packing_pays() {
        let row = g.oh * g.pitch();
        let fitting = (1..=g.n).rev().filter(|&k| g.n.is_multiple_of(k) && k * row <= TARGET_ROWS).find(|&k| {
            let gk = g.clone().packed(k);
            fits(&gk, &gk.blocks(TARGET_ROWS))
        });
        if let Some(k) = fitting {
            g = g.packed(k);
        }
    }
    let per_image = g.hv() * g.wv;
    let mut target = TARGET_ROWS;
    let mut pb = loop {
        let pb = g.blocks(target);
        if fits(&g, &pb) {
            break pb;
        }
        if target <= g.wv {
            return Err(e.vmem_error(&kernel, "staging, accumulator and weight buffers"));
        }
        target /= 2;
    };
    // A block shorter than the array leaves each weight load longer than the rows streamed
    // past it: then the largest block between this size and the one that did not fit.
    if pb.m_rows < e.m.core.mxu.rows
        && target < TARGET_ROWS
        && g.packed == 0
        && let Some(t) = (target + g.wv..2 * target).step_by(g.wv).rev().find(|&t| fits(&g, &g.blocks(t)))
    {
        pb = g.blocks(t);
    }
    let PixelBlocks { blocks, m_rows, stage_rows, whole } = pb;

    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(&kernel, "buffers");
    // Two weight buffers: the next channel block's weights load while this one computes.
    let weight_bufs: Vec<Tile> =
        (0..2).map(|_| vmem.alloc(g.taps() * cg, nb)).collect::<Option<_>>().ok_or_else(|| oom(e))?;
    let stage: Vec<Tile> =
        (0..BUFFERS).map(|_| vmem.alloc(g.stage_pixels(stage_rows), c)).collect::<Option<_>>().ok_or_else(|| oom(e))?;
    let acc: Vec<Tile> = (0..BUFFERS).map(|_| vmem.alloc(m_rows, nb)).collect::<Option<_>>().ok_or_else(|| oom(e))?;
    let res: Vec<Tile> = if residual_of(&kernel).is_some() {
        (0..BUFFERS).map(|_| vmem.alloc(m_rows, nb)).collect::<Option<_>>().ok_or_else(|| oom(e))?
    } else {
        Vec::new()
    };
    let masks: Vec<Tile> =
        if mask_of(&kernel).is_some() { vmem.ring(m_rows, nb).ok_or_else(|| oom(e))? } else { Vec::new() };
    if let Strategy::Im2col(state) = &mut strategy {
        *state = Some(im2col::Im2col::new(&mut vmem, m_rows, g.taps(), c).ok_or_else(|| oom(e))?);
    }
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
    // every channel block's weights stream past it) — whichever keeps the DMAs shorter
    // (`dma_time`: bytes over bandwidth against transfers' start-up latency over the engines).
    let (n_c, n_p) = (co.div_ceil(nb), blocks.len());
    // Staging transfers per pixel block: one per image and tap for a gathered input (read
    // once per tap), one per read phase, else one.
    let stage_dmas = if g.gathered {
        (if whole { m_rows / per_image } else { 1 }) * g.taps()
    } else if g.phases {
        g.sh * g.sw
    } else {
        1
    };
    let staged_x = x.tile.bytes() * if g.gathered { g.taps() as u64 } else { 1 };
    let [outside, inside] = loop_orders(traffic, staged_x, n_c as u64, n_p as u64, stage_dmas as u64)
        .map(|(bytes, transfers)| dma_time(e.m, bytes, transfers));
    let pixel_outer = n_c > 1 && n_p > 1 && inside < outside;
    let work: Vec<(usize, Block)> = if pixel_outer {
        blocks.iter().flat_map(|b| (0..co).step_by(nb).map(move |c0| (c0, *b))).collect()
    } else {
        (0..co).step_by(nb).flat_map(|c0| blocks.iter().map(move |b| (c0, *b))).collect()
    };
    // Work items share a staged block in pixel-outer order: `unit` numbers the stagings.
    let unit = |wi: usize| if pixel_outer { wi / n_c } else { wi };
    let units = if pixel_outer { n_p } else { work.len() };
    let unit_block = |u: usize| if pixel_outer { blocks[u] } else { work[u].1 };
    let mut staged_ids: Vec<u32> = Vec::with_capacity(units);
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
            wload = if matches!(strategy, Strategy::Im2col(_)) && g.phases {
                im2col::Im2col::load_phased_weights(e, &g, w.tile.columns(c0, nbw), wdst, cg, &weight_readers[wp_])
            } else {
                e.push(Operation::dma(1, w.tile.columns(c0, nbw), wdst), &weight_readers[wp_])
            };
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
        let next = (wi + 1 < work.len()).then(|| NextBlock {
            stage: stage[unit(wi + 1) % BUFFERS],
            staged: staged_ids[unit(wi + 1)],
            m_blk: g.block_rows(&work[wi + 1].1, whole),
        });
        let block = BlockWork {
            g: &g,
            wi,
            stage: stage[sp],
            staged,
            weights: wdst,
            wload,
            acc: accp,
            acc_free: acc_free[p],
            deps: compute_deps,
            m_blk,
            c0,
            nbw,
            group,
            cg,
            precision,
            next,
        };
        let Computed { readers, producers } = strategy.compute(e, &block);
        stage_readers[sp].extend(readers.iter().copied());
        weight_readers[wp_].extend(producers.iter().copied());
        // Residual rows, in the accumulator's layout.
        let residual = match residual_of(&kernel) {
            Some(r) => {
                let rp = e.place(r);
                let resp = Tile { rows: m_blk as u32, cols: nbw as u32, stride: nbw as u32, ..res[p] };
                let deps: Vec<u32> = res_free[p].into_iter().collect();
                let loaded = out_rows(e, &g, blk, whole, rp.tile, resp, c0, nbw, true, &deps);
                Some((resp, loaded))
            }
            None => None,
        };
        // The activation a fused mask reads, likewise.
        let mask = mask_of(&kernel).map(|y| {
            let mp = Tile { rows: m_blk as u32, cols: nbw as u32, stride: nbw as u32, ..masks[p] };
            let deps: Vec<u32> = mask_free[p].into_iter().collect();
            (mp, out_rows(e, &g, blk, whole, e.place(y).tile, mp, c0, nbw, true, &deps))
        });
        let done = apply_epilogue(e, &kernel, &ch, accp, c0, Operands { residual, mask }, producers.clone());
        if residual.is_some() {
            res_free[p] = Some(done);
        }
        if mask.is_some() {
            mask_free[p] = Some(done);
        }
        let stored = out_rows(e, &g, blk, whole, y.tile, accp, c0, nbw, false, &[done]);
        acc_free[p] = Some(match sums.as_mut() {
            Some(s) => {
                let read = s.add_block(e, &g, blk, whole, accp, c0, done);
                e.after_all(stored, &[read])
            }
            None => stored,
        });
        useful_macs += (blk.images * blk.bh * g.ow * nbw * g.taps() * cg) as u64;
    }
    if let Some(s) = sums {
        s.store(e);
    }
    let name = match (&strategy, g.phases) {
        (Strategy::Depthwise, true) => "depthwise on the VPU over stride phases (one multiply-add per tap)",
        (Strategy::Im2col(_), true) => "im2col on the VPU over stride phases, one matmul per block",
        _ => strategy.name(),
    };
    let blocks_desc = if g.packed > 0 {
        format!("{} images side by side per block", g.packed)
    } else if whole {
        format!("{} images per block", m_rows / per_image)
    } else {
        format!("bands of {} rows", m_rows / g.wv)
    };
    let order = if pixel_outer { "; pixel blocks outside (shorter DMAs)" } else { "" };
    let strategy_text = format!("{name}; {blocks_desc}; {} channels per block{order}", nb);
    let k_depth = if let Strategy::Im2col(_) | Strategy::Gathered = strategy { g.taps() * c } else { cg };
    let padded = format!(
        "M {m_rows} (of which {} useful) x K {k_depth}{} x N {nb}{}",
        (blocks.first().map_or(0, |b| b.images * b.bh * g.ow)),
        if matches!(strategy, Strategy::Shifted | Strategy::Phases) && g.taps() > 1 {
            format!(" x {} taps", g.taps())
        } else {
            String::new()
        },
        if depthwise { " (VPU)".to_string() } else { String::new() }
    );
    Ok(Emitted::new(strategy_text, padded, useful_macs))
}

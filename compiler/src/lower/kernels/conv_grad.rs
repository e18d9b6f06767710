//! The two gradients of a convolution, as matmuls on the MXU.
//!
//! **Input gradient** (`Conv2dBackpropInput`): the transposed convolution. `dx` is the
//! stride-1 convolution of `dy` — dilated by the forward stride (`s − 1` zeros between pixels,
//! placed by the staging DMA, never stored in HBM) and padded by `(k − 1)·d − pad` — with the
//! kernel flipped in space and transposed per tap (`[kh, kw, cout, cin]`). The flip and
//! transpose run once per step on the VPU's transpose unit into an HBM scratch buffer; the
//! convolution itself is the forward kernel ([`conv_with`]). For strided layers the
//! zeros are streamed through the MXU and reported as padding waste.
//!
//! **Filter gradient** (`Conv2dBackpropFilter`): per tap `dWᵀ_tap = dyᵀ · x_tap`, summed over
//! blocks of output pixels. `dy` is loaded in the forward kernel's padded-width layout (zeros
//! at the dropped columns, so those pixels add nothing) and transposed once per block; each
//! tap's view of the staged input is the stationary operand, so a block's `K` is its pixel
//! count and the streamed rows are the output channels. The per-tap accumulators stay in VMEM
//! for the whole kernel and are transposed back to HWIO at the end. When the input channels are
//! few (the 3-channel first layer) the taps are folded into one im2col matrix, as forward.
//! Depthwise filters run on the VPU: per tap a product with `dy` and a column sum.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{Conv2d, Graph, NodeId, Op, Padding};
use crate::lower::blocks::conv_layout::{ConvLayout, PixelBlocks};
use crate::lower::blocks::staging::{im2col_copies, out_rows, stage_block};
use crate::lower::emitter::{BUFFERS, Emitted, Emitter, TARGET_ROWS};
use crate::lower::kernel::{Kernel, Place};
use crate::lower::kernels::conv::{ConvSpec, conv_with};

/// The HBM scratch of an input gradient (`Conv2dBackpropInput` node `node`): the flipped,
/// transposed kernel.
pub(crate) fn input_scratch_bytes(graph: &Graph, node: NodeId) -> u64 {
    let w = &graph.node(graph.node(node).inputs[1]).shape.dims;
    w.iter().product::<usize>() as u64 * 4
}

/// The forward MACs of a convolution, which each of its gradients repeats.
fn conv_macs(g: &ConvLayout, cg: usize) -> u64 {
    (g.n * g.oh * g.ow * g.taps() * cg * g.co) as u64
}

pub(crate) fn input(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let Op::Conv2dBackpropInput(b) = &n.op else { unreachable!("a ConvGradInput main") };
    let (dy, w, dx) = (e.place(n.inputs[0]), e.place(n.inputs[1]), e.place(kernel.output));
    let g = ConvLayout::new(&b.conv, &dx.shape, &w.shape);
    let (cg, groups) = (w.shape[2], g.groups);
    let cog = g.co / groups;
    let depthwise = g.depthwise(cg);
    // Padding of the transposed convolution: the taps that reach past the dilated dy.
    let (reach_h, reach_w) = ((g.kh - 1) * g.dh, (g.kw - 1) * g.dw);
    let (dil_h, dil_w) = ((g.oh - 1) * g.sh + 1, (g.ow - 1) * g.sw + 1);
    // Where the forward padding exceeds the kernel's reach these are negative: pad by 0
    // instead, compute the larger output and keep the window that is `dx` (`out_window`).
    let signed = |a: usize, b: usize| a as i64 - b as i64;
    let pads = [signed(reach_h, g.pt), signed(g.h + g.pt, dil_h), signed(reach_w, g.pl), signed(g.w + g.pl, dil_w)];
    let [top, bottom, left, right] = pads.map(|p| p.max(0) as usize);
    let [crop_t, crop_l] = [(-pads[0]).max(0) as usize, (-pads[2]).max(0) as usize];
    let attrs = Conv2d {
        strides: [1, 1],
        padding: Padding::Explicit { top, bottom, left, right },
        dilation: b.conv.dilation,
        groups,
    };

    // The flipped kernel [kh, kw, cog, cin] into scratch: tap t goes to taps-1-t, and each
    // group's [cg x cog] block is transposed.
    let scratch = e.scratch.expect("the allocation pass gives every input gradient its scratch");
    let taps = g.taps();
    let flipped =
        Place { shape: vec![g.kh, g.kw, cog, g.c], tile: Tile::new(Space::Hbm, scratch, taps * cog, g.c, DType::F32) };
    let mut done = Vec::new();
    if depthwise {
        for t in 0..taps {
            done.push(e.push(Operation::dma(t as u8, w.tile.rows(t, 1), flipped.tile.rows(taps - 1 - t, 1)), &[]));
        }
    } else {
        let budget = (e.m.core.vmem_bytes / (2 * BUFFERS as u64)) as usize;
        let rb = (budget / (cog * 4)).clamp(1, cg);
        let mut vmem = e.vmem();
        let oom = |e: &Emitter| e.vmem_error(kernel, "kernel transpose buffers");
        let loads = vmem.ring(rb, cog).ok_or_else(|| oom(e))?;
        let turned = vmem.ring(cog, rb).ok_or_else(|| oom(e))?;
        let mut load_free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
        let mut turned_free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
        let mut step = 0;
        for t in 0..taps {
            for gi in 0..groups {
                for r0 in (0..cg).step_by(rb) {
                    let rn = rb.min(cg - r0);
                    let p = step % BUFFERS;
                    step += 1;
                    let a = Tile { rows: rn as u32, ..loads[p] };
                    let bt = Tile { cols: rn as u32, stride: rn as u32, ..turned[p] };
                    let src = w.tile.rows(t * cg + r0, rn).columns(gi * cog, cog);
                    let l = e.push(Operation::dma(0, src, a), &load_free[p]);
                    let mut deps = turned_free[p].clone();
                    deps.push(l);
                    let tr = e.push(Operation::Transpose { src: a, dst: bt }, &deps);
                    let dst = flipped.tile.rows((taps - 1 - t) * cog, cog).columns(gi * cg + r0, rn);
                    let st = e.push(Operation::dma(2, bt, dst), &[tr]);
                    load_free[p] = vec![tr];
                    turned_free[p] = vec![st];
                    done.push(st);
                }
            }
        }
    }
    e.wait_for(&done);

    let out_window = Some([crop_t, crop_l, g.h, g.w]);
    let spec = ConvSpec { x: dy, w: &flipped, y: dx, attrs, bias: None, input_dilation: [g.sh, g.sw], out_window };
    let mut report = conv_with(e, kernel, &spec)?;
    // The useful work is the gradient's, not the padded transposed convolution's.
    report.useful_macs = conv_macs(&g, cg);
    report.strategy = if g.sh > 1 || g.sw > 1 {
        format!("transposed conv, dy dilated by {}x{} in staging: {}", g.sh, g.sw, report.strategy)
    } else {
        format!("transposed conv: {}", report.strategy)
    };
    Ok(report)
}

/// Work for one MXU in a filter-gradient block: accumulator columns `k0..k0+kn` from the
/// tap `tap` (shifted) or from the im2col matrix (`tap` None).
#[derive(Clone, Copy)]
struct Job {
    tap: Option<(usize, usize)>,
    /// Columns of the tap's channels (shifted) or of the im2col matrix.
    col0: usize,
    k0: usize,
    kn: usize,
}

/// Splits the accumulator's `kdim` columns into MXU jobs, dealt round-robin to the MXUs: a
/// tap each, or each tap's channels cut into `parts` array-wide chunks, with `parts` the
/// fewest that give every MXU the same number of jobs (9 taps on 2 MXUs would leave one idle
/// a ninth of the time; 18 half-taps do not).
fn filter_jobs(g: &ConvLayout, cg: usize, im2col: bool, mxus: usize, cols: usize) -> Vec<Job> {
    let chunks = |width: usize, parts: usize| -> Vec<(usize, usize)> {
        let parts = parts.min(width.div_ceil(cols)).max(1);
        let per = width.div_ceil(parts).div_ceil(cols) * cols;
        (0..width).step_by(per).map(|c0| (c0, per.min(width - c0))).collect()
    };
    if im2col {
        return chunks(g.taps() * cg, mxus).into_iter().map(|(k0, kn)| Job { tap: None, col0: k0, k0, kn }).collect();
    }
    let most = cg.div_ceil(cols);
    let parts = (1..=most).find(|&p| (g.taps() * chunks(cg, p).len()).is_multiple_of(mxus)).unwrap_or(most);
    let mut jobs = Vec::new();
    for i in 0..g.kh {
        for j in 0..g.kw {
            let tap = i * g.kw + j;
            jobs.extend(chunks(cg, parts).into_iter().map(|(c0, cn)| Job {
                tap: Some((i, j)),
                col0: c0,
                k0: tap * cg + c0,
                kn: cn,
            }));
        }
    }
    jobs
}

pub(crate) fn filter(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let Op::Conv2dBackpropFilter(b) = &n.op else { unreachable!("a ConvGradFilter main") };
    let (x, dy, dw) = (e.place(n.inputs[0]), e.place(n.inputs[1]), e.place(kernel.output));
    let g = ConvLayout::new(&b.conv, &x.shape, &b.kernel_shape);
    let (c, co, groups, taps) = (g.c, g.co, g.groups, g.taps());
    let cg = b.kernel_shape[2];
    let cog = co / groups;
    let depthwise = g.depthwise(cg);
    let (rows, cols) = (e.m.core.mxu.rows, e.m.core.mxu.cols);
    let im2col = g.im2col_pays(cg, rows);
    // Accumulator columns per output channel: every tap's input channels.
    let kdim = taps * cg;
    let vmem_bytes = e.m.core.vmem_bytes as usize;
    // Output-channel blocks: a group each when grouped; else as many channels as keep the
    // accumulators within 3/8 of VMEM, in whole array widths when possible.
    let nb = if depthwise {
        co.min(512)
    } else if groups > 1 {
        cog
    } else {
        let fit = (vmem_bytes * 3 / 8 / (kdim * 4)).clamp(1, 4 * cols);
        let fit = if fit >= cols { fit / cols * cols } else { fit };
        let blocks = co.div_ceil(fit);
        let per = co.div_ceil(blocks);
        if per >= cols { co.min(per.div_ceil(cols) * cols) } else { per }
    };
    // Accumulator chunks transposed back to HWIO at the end.
    let kc = kdim.min(512);
    let acc_bytes = if depthwise { taps * nb * 4 } else { nb * kdim * 4 + 2 * kc * nb * 4 };

    let mut target = TARGET_ROWS;
    let PixelBlocks { blocks, m_rows, stage_rows, whole } = loop {
        let pb = g.blocks(target);
        let stage = pb.stage_rows * g.wp * c * 4;
        let dyb = pb.m_rows * nb * 4;
        // Transposed dy (MXU) or the per-tap product (VPU).
        let second = dyb;
        let cols_buf = if im2col { pb.m_rows * kdim * 4 } else { 0 };
        let need = BUFFERS * (stage + dyb + second + cols_buf) + acc_bytes + 16 * 512;
        if need <= vmem_bytes {
            break pb;
        }
        if target <= g.wv {
            return Err(e.vmem_error(kernel, "staging, gradient and accumulator buffers"));
        }
        target /= 2;
    };

    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "buffers");
    let stage = vmem.ring(stage_rows * g.wp, c).ok_or_else(|| oom(e))?;
    let dyb = vmem.ring(m_rows, nb).ok_or_else(|| oom(e))?;
    // dyᵀ for the MXU, or the VPU's per-tap product.
    let second = if depthwise { vmem.ring(m_rows, nb) } else { vmem.ring(nb, m_rows) }.ok_or_else(|| oom(e))?;
    let im2col_bufs = if im2col { vmem.ring(m_rows, kdim).ok_or_else(|| oom(e))? } else { Vec::new() };
    // Accumulators: per tap a row of channel sums (VPU), or dWᵀ as [nb × taps·cg] (MXU); the
    // VPU's per-tap column sum goes through `part`.
    let (acc, part) = if depthwise {
        (vmem.alloc(taps, nb).ok_or_else(|| oom(e))?, Some(vmem.alloc(1, nb).ok_or_else(|| oom(e))?))
    } else {
        (vmem.alloc(nb, kdim).ok_or_else(|| oom(e))?, None)
    };
    let outs: Vec<Tile> = if depthwise {
        Vec::new()
    } else {
        (0..2).map(|_| vmem.alloc(kc, nb)).collect::<Option<_>>().ok_or_else(|| oom(e))?
    };

    let mxus = e.m.core.mxu.count.max(1);
    let jobs = filter_jobs(&g, cg, im2col, mxus, cols);
    let precision = e.opts.precision;
    let per_image = g.hv() * g.wv;
    let mut stage_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut stage_filled = [false; BUFFERS];
    let mut dy_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut dy_filled = [false; BUFFERS];
    let mut second_readers: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut acc_free: Vec<u32> = Vec::new();
    let mut out_free: Vec<Vec<u32>> = vec![Vec::new(); 2];
    let mut wi = 0usize;
    for c0 in (0..co).step_by(nb) {
        let nbw = nb.min(co - c0);
        let gi = if groups > 1 && !depthwise { c0 / cog } else { 0 };
        let acc_t = if depthwise {
            Tile { cols: nbw as u32, stride: nbw as u32, ..acc }
        } else {
            Tile { rows: nbw as u32, ..acc }
        };
        // Per job (or per tap on the VPU): the last write into its accumulator columns.
        let mut last_write: Vec<Option<u32>> = vec![None; jobs.len().max(taps)];
        let mut last_mxu: Vec<Option<usize>> = vec![None; jobs.len()];
        let mut block_no = 0usize;
        let mut vpu_last: Option<u32> = None;
        for blk in &blocks {
            let p = wi % BUFFERS;
            wi += 1;
            let m_blk = g.block_rows(blk, whole);
            let staged = stage_block(e, &g, x.tile, blk, whole, stage[p], &mut stage_filled[p], &stage_readers[p]);
            // dy rows in the padded-width layout, zeros at the dropped columns. Rows stay `nb`
            // apart in every block, so a narrower last block finds zeros where the wider ones
            // left them (the buffer is zeroed once, at full width).
            let dyt = Tile { rows: m_blk as u32, cols: nbw as u32, stride: nb as u32, ..dyb[p] };
            let mut dy_deps = dy_readers[p].clone();
            if !dy_filled[p] {
                dy_deps = vec![e.push(Operation::Fill { dst: dyb[p], value: 0.0 }, &dy_deps)];
                dy_filled[p] = true;
            }
            let loaded = out_rows(e, &g, blk, whole, per_image, dy.tile, dyt, c0, nbw, true, &dy_deps);
            let mut readers = Vec::new();
            if depthwise {
                let prod = Tile { rows: m_blk as u32, cols: nbw as u32, stride: nbw as u32, ..second[p] };
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let tap = i * g.kw + j;
                        let a = g.tap_view(stage[p], i, j, c0, nbw, m_blk);
                        let mut deps = vec![staged, loaded];
                        deps.extend(vpu_last);
                        deps.extend(second_readers[p].iter().copied());
                        let mul = e.push(Operation::Binary { op: BinaryOp::Mul, a, b: dyt, dst: prod }, &deps);
                        let part_t = part.expect("allocated for the depthwise path").columns(0, nbw);
                        let sum = e.push(
                            Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: prod, dst: part_t },
                            &[mul],
                        );
                        let row = acc_t.rows(tap, 1);
                        let mut deps = vec![sum];
                        deps.extend(last_write[tap]);
                        deps.extend(acc_free.iter().copied());
                        let add = match last_write[tap] {
                            Some(_) => {
                                e.push(Operation::Binary { op: BinaryOp::Add, a: row, b: part_t, dst: row }, &deps)
                            }
                            None => e.push(Operation::Unary { op: UnaryOp::Copy, src: part_t, dst: row }, &deps),
                        };
                        last_write[tap] = Some(add);
                        vpu_last = Some(add);
                    }
                }
                readers.extend(vpu_last);
                second_readers[p] = readers.clone();
                dy_readers[p] = readers.clone();
            } else {
                // dyᵀ, shared by every tap of the block.
                let dyt_t = Tile { rows: nbw as u32, cols: m_blk as u32, stride: m_blk as u32, ..second[p] };
                let mut deps = second_readers[p].clone();
                deps.push(loaded);
                let turned = e.push(Operation::Transpose { src: dyt, dst: dyt_t }, &deps);
                dy_readers[p] = vec![turned];
                readers.push(turned);
                let cols_t = im2col.then(|| Tile { rows: m_blk as u32, ..im2col_bufs[p] });
                let copied = cols_t.map(|ct| im2col_copies(e, &g, stage[p], ct, staged, m_blk));
                let mut matmuls = Vec::new();
                for (ji, job) in jobs.iter().enumerate() {
                    let rhs = match (job.tap, cols_t) {
                        (Some((i, j)), _) => g.tap_view(stage[p], i, j, gi * cg + job.col0, job.kn, m_blk),
                        (None, Some(ct)) => ct.columns(job.col0, job.kn),
                        (None, None) => unreachable!("im2col jobs have their matrix"),
                    };
                    // When the jobs do not divide evenly among the MXUs, they are dealt
                    // starting one further each block, which evens out over the blocks. A job's
                    // previous block on the same MXU is ordered by program order; on another
                    // MXU it is an explicit dependency.
                    let mxu = if jobs.len().is_multiple_of(mxus) { ji % mxus } else { (ji + block_no) % mxus };
                    let mut deps = vec![staged, turned];
                    deps.extend(copied);
                    deps.extend(acc_free.iter().copied());
                    if last_mxu[ji] != Some(mxu) {
                        deps.extend(last_write[ji]);
                    }
                    last_mxu[ji] = Some(mxu);
                    let id = e.push(
                        Operation::MatMul {
                            mxu: mxu as u8,
                            lhs: dyt_t,
                            rhs,
                            out: acc_t.columns(job.k0, job.kn),
                            accumulate: last_write[ji].is_some(),
                            precision,
                        },
                        &deps,
                    );
                    last_write[ji] = Some(id);
                    matmuls.push(id);
                }
                block_no += 1;
                readers.extend(matmuls.iter().copied());
                second_readers[p] = matmuls.clone();
                readers.extend(copied);
            }
            stage_readers[p] = readers;
        }
        // Columns no block wrote (every block was padding) are zero.
        let writes: Vec<u32> = last_write.iter().flatten().copied().collect();
        let mut ready = writes.clone();
        if writes.len() < if depthwise { taps } else { jobs.len() } {
            let mut deps = writes.clone();
            deps.extend(acc_free.iter().copied());
            // Only reached when some accumulators were never written: zero the untouched ones.
            for (ji, w) in last_write.iter().enumerate().take(if depthwise { taps } else { jobs.len() }) {
                if w.is_none() {
                    let dst = if depthwise { acc_t.rows(ji, 1) } else { acc_t.columns(jobs[ji].k0, jobs[ji].kn) };
                    ready.push(e.push(Operation::Fill { dst, value: 0.0 }, &deps));
                }
            }
        }
        // Back to HWIO: dW rows are (tap, input channel), columns output channels.
        acc_free.clear();
        if depthwise {
            acc_free.push(e.push(Operation::dma(2, acc_t, dw.tile.columns(c0, nbw)), &ready));
        } else {
            for (q, k0) in (0..kdim).step_by(kc).enumerate() {
                let kn = kc.min(kdim - k0);
                let o = Tile { rows: kn as u32, cols: nbw as u32, stride: nbw as u32, ..outs[q % 2] };
                let mut deps = ready.clone();
                deps.extend(out_free[q % 2].iter().copied());
                let tr = e.push(Operation::Transpose { src: acc_t.columns(k0, kn), dst: o }, &deps);
                let st = e.push(Operation::dma(2, o, dw.tile.rows(k0, kn).columns(c0, nbw)), &[tr]);
                out_free[q % 2] = vec![st];
                acc_free.push(tr);
            }
        }
    }
    let unit = if depthwise {
        "on the VPU (per tap a product with dy and a column sum)".to_string()
    } else if im2col {
        format!("dyᵀ · im2col(x), {} accumulator columns", kdim)
    } else {
        format!("dyᵀ · x per tap, {taps} taps")
    };
    let blocks_desc = if whole {
        format!("{} images per block", m_rows / per_image)
    } else {
        format!("bands of {} rows", m_rows / g.wv)
    };
    let strategy = format!("{unit}; {blocks_desc}; {nb} output channels per block");
    let padded = if depthwise {
        format!("{m_rows} pixels x {nb} channels x {taps} taps (VPU)")
    } else {
        format!("M {nb} x K {m_rows} x N {}", if im2col { kdim } else { cg })
    };
    Ok(Emitted::new(strategy, padded, conv_macs(&g, cg)))
}

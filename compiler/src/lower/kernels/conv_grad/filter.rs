//! The filter gradient (`Conv2dBackpropFilter`): per tap `dWᵀ_tap = dyᵀ · x_tap`, summed over
//! blocks of output pixels. `dy` is loaded in the forward kernel's layout (zeros at the
//! padded-width columns, so those pixels add nothing) and transposed once per block; each
//! tap's view of the staged input is the stationary operand, so a block's `K` is its pixel
//! count and the streamed rows are the output channels. The input is staged as forward: by
//! stride phase for strided convolutions, as its gathered im2col matrix on small maps, with
//! the taps folded into one im2col matrix when the channels are few (the 3-channel first
//! layer). The per-tap accumulators stay in VMEM for the whole kernel and are transposed back
//! to HWIO at the end. Depthwise filters run on the VPU: per tap a product with `dy` and a
//! column sum.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{NodeId, Op};
use crate::lower::blocks::conv_layout::{ConvLayout, PixelBlocks};
use crate::lower::blocks::staging::{im2col_copies, out_rows, stage_block};
use crate::lower::emitter::{BUFFERS, Emitted, Emitter, TARGET_ROWS};
use crate::lower::kernel::Kernel;

/// Where accumulator columns `k0..k0+kn` go in the HWIO kernel: runs of `(first column
/// relative to k0, first kernel row, length)`. The columns are (tap, input channel) in tap
/// order, but an im2col matrix staged by phase orders its taps by phase
/// ([`ConvLayout::im2col_taps`]).
fn hwio_runs(g: &ConvLayout, im2col: bool, cg: usize, k0: usize, kn: usize) -> Vec<(usize, usize, usize)> {
    if !(im2col && g.phases) {
        return vec![(0, k0, kn)];
    }
    let order = g.im2col_taps();
    let row_of = |k: usize| {
        let (i, j) = order[k / cg];
        (i * g.kw + j) * cg + k % cg
    };
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for k in k0..k0 + kn {
        match runs.last_mut() {
            Some((_, at, len)) if *at + *len == row_of(k) => *len += 1,
            _ => runs.push((k - k0, row_of(k), 1)),
        }
    }
    runs
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

/// Buffers of each ring in a filter gradient staged as a gathered matrix: two, so the next
/// block's gather overlaps this block's matmuls — there is no copy step between them and
/// nothing is stored per block — leaving VMEM for more pixels per block. Other layouts keep
/// `BUFFERS`, the third for the im2col copies and transposes in flight.
const GATHERED_RING: usize = 2;

pub(crate) fn filter(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let Op::Conv2dBackpropFilter(b) = &n.op else { unreachable!("a ConvGradFilter main") };
    let (x, dy, dw) = (e.place(n.inputs[0]), e.place(n.inputs[1]), e.place(kernel.output));
    // A strided convolution's taps read the input by stride phase, as forward: dense rows,
    // no streamed pixels between the strided ones.
    let g = ConvLayout::new(&b.conv, &x.shape, &b.kernel_shape);
    let cg = b.kernel_shape[2];
    let (rows, cols) = (e.m.core.mxu.rows, e.m.core.mxu.cols);
    // On small maps the input is staged as its im2col matrix, as forward (no padded-width
    // pixels in K, no copies).
    let gathered = g.gather_pays(cg, rows, GATHERED_RING, e.m.core.vmem_bytes);
    let g = if gathered {
        g.gathered()
    } else if g.phases_pay() {
        g.phased()
    } else {
        g
    };
    let ring = if gathered { GATHERED_RING } else { BUFFERS };
    let (c, co, groups, taps) = (g.c, g.co, g.groups, g.taps());
    let cog = co / groups;
    let depthwise = g.depthwise(cg);
    let im2col = gathered || g.im2col_pays(cg, rows);
    // Copies into an im2col matrix (a gathered stage is one already).
    let copies = im2col && !gathered;
    // Accumulator columns per output channel: every tap's input channels.
    let kdim = taps * cg;
    let vmem_bytes = e.m.core.vmem_bytes as usize;
    // Output-channel blocks: a group each when grouped; else as many channels as keep the
    // accumulators within 3/8 of VMEM, in whole array widths when possible.
    let widest = if depthwise {
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
    let acc_bytes = |nb: usize| if depthwise { taps * nb * 4 } else { nb * kdim * 4 + 2 * kc * nb * 4 };
    let fits = |nb: usize, pb: &PixelBlocks| {
        let stage = g.stage_pixels(pb.stage_rows) * c * 4;
        let dyb = pb.m_rows * nb * 4;
        // Transposed dy (MXU) or the per-tap product (VPU).
        let second = dyb;
        let cols_buf = if copies { pb.m_rows * kdim * 4 } else { 0 };
        ring * (stage + dyb + second + cols_buf) + acc_bytes(nb) + 16 * 512 <= vmem_bytes
    };
    // A block's pixels are the matmuls' K. The largest block that fits (whole images, or
    // bands of output rows), unless a smaller one leaves clearly less of its last array-deep
    // pass empty — a 7×7 map: 5 images fill 2 passes to 96%, 4 fill 2 to 77%.
    let per_image = g.hv() * g.wv;
    let choose = |nb: usize| -> Option<(PixelBlocks, f64)> {
        // Whole images when one fits, else bands of output rows.
        let largest = |unit: usize, most: usize| (1..=most).rev().find(|&k| fits(nb, &g.blocks(k * unit)));
        let images = (per_image <= TARGET_ROWS)
            .then(|| largest(per_image, (TARGET_ROWS / per_image).clamp(1, g.n)))
            .flatten()
            .map(|k| (per_image, k));
        let (unit, most) = match images {
            Some(found) => found,
            None => (g.wv, largest(g.wv, (TARGET_ROWS / g.wv).clamp(1, g.oh))?),
        };
        let filled = |k: usize| (k * unit) as f64 / ((k * unit).div_ceil(rows) * rows) as f64;
        // Smaller blocks cost their own transposes and transfers: only for a fuller pass.
        let fuller = |k: usize| filled(k) > filled(most) + 0.05;
        let best = if depthwise {
            most
        } else {
            (1..most).rev().filter(|&k| fuller(k)).fold(most, |b, k| if filled(k) > filled(b) + 1e-9 { k } else { b })
        };
        Some((g.blocks(best * unit), filled(best)))
    };
    // Narrower channel blocks leave VMEM for more pixels per block: taken when that fills
    // the passes at least 10 points better (each channel block stages the input again).
    let mut options = vec![widest];
    if !depthwise && groups == 1 && widest / 2 >= cols && (widest / 2).is_multiple_of(cols) {
        options.push(widest / 2);
    }
    let mut picked: Option<(usize, PixelBlocks, f64)> = None;
    for nb in options {
        if let Some((pb, fill)) = choose(nb)
            && picked.as_ref().is_none_or(|p| fill > p.2 + 0.1)
        {
            picked = Some((nb, pb, fill));
        }
    }
    let Some((nb, pb, _)) = picked else {
        return Err(e.vmem_error(kernel, "staging, gradient and accumulator buffers"));
    };
    let PixelBlocks { blocks, m_rows, stage_rows, whole } = pb;

    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "buffers");
    let stage = vmem.ring_of(ring, g.stage_pixels(stage_rows), c).ok_or_else(|| oom(e))?;
    let dyb = vmem.ring_of(ring, m_rows, nb).ok_or_else(|| oom(e))?;
    // dyᵀ for the MXU, or the VPU's per-tap product.
    let second = if depthwise { vmem.ring_of(ring, m_rows, nb) } else { vmem.ring_of(ring, nb, m_rows) }
        .ok_or_else(|| oom(e))?;
    let im2col_bufs = if copies { vmem.ring_of(ring, m_rows, kdim).ok_or_else(|| oom(e))? } else { Vec::new() };
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
    let mut stage_readers: Vec<Vec<u32>> = vec![Vec::new(); ring];
    let mut stage_filled = vec![false; ring];
    let mut dy_readers: Vec<Vec<u32>> = vec![Vec::new(); ring];
    let mut dy_filled = vec![false; ring];
    let mut second_readers: Vec<Vec<u32>> = vec![Vec::new(); ring];
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
            let p = wi % ring;
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
            let loaded = out_rows(e, &g, blk, whole, dy.tile, dyt, c0, nbw, true, &dy_deps);
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
                let cols_t = if gathered {
                    Some(g.matrix(stage[p], m_blk))
                } else {
                    copies.then(|| Tile { rows: m_blk as u32, ..im2col_bufs[p] })
                };
                let copied = cols_t.filter(|_| copies).map(|ct| im2col_copies(e, &g, stage[p], ct, staged, m_blk));
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
                let mut stores = Vec::new();
                for (row, at, len) in hwio_runs(&g, im2col, cg, k0, kn) {
                    let dst = dw.tile.rows(at, len).columns(c0, nbw);
                    stores.push(e.push(Operation::dma(2, o.rows(row, len), dst), &[tr]));
                }
                let st = e.after_all(stores[0], &stores[1..]);
                out_free[q % 2] = vec![st];
                acc_free.push(tr);
            }
        }
    }
    let unit = if depthwise {
        "on the VPU (per tap a product with dy and a column sum)".to_string()
    } else if gathered {
        format!("dyᵀ · im2col(x) gathered by the staging DMAs, {} accumulator columns", kdim)
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
    Ok(Emitted::new(strategy, padded, g.macs(cg)))
}

//! Moving a convolution's rows between HBM and VMEM: the input staged with its zero padding
//! (over the padded width, by stride phase, or gathered as the im2col matrix), the im2col
//! copies, and output rows to and from an accumulator laid out over the padded width (or a
//! strided view of a larger tensor: one stride phase of an input gradient).

use systolic_simulator::isa::*;

use crate::lower::blocks::conv_layout::{Block, ConvLayout, Scatter};
use crate::lower::emitter::Emitter;

/// DMAs the input rows block `sb` reads into `stage` (zero padding already in place): whole
/// images one slot each (`sh·hv` padded rows of `wp` pixels), or one band of padded rows. A
/// band that reads no input row (padding only) was zero-filled: it only waits for `deps`.
fn stage_input(e: &mut Emitter, g: &ConvLayout, x: Tile, sb: &Block, whole: bool, stage: Tile, deps: &[u32]) -> u32 {
    let c = g.c;
    let hv = g.hv();
    // HBM rows in the tensor's element type (bf16 activations widen as they land in VMEM).
    let row_bytes = (g.w * c) as u64 * x.dtype.size();
    let slot_elems = (g.sh * hv * g.wp * c) as u64;
    if g.phases {
        return stage_phases(e, g, x, sb, whole, stage, deps);
    }
    if g.gathered {
        return stage_gathered(e, g, x, sb, whole, stage, deps);
    }
    if whole {
        // Whole images, one slot each.
        let src = Tile {
            space: Space::Hbm,
            offset: x.offset + (sb.n0 * g.h) as u64 * row_bytes,
            rows: g.h as u32,
            cols: (g.w * c) as u32,
            stride: (g.w * c) as u32,
            dtype: x.dtype,
        };
        let dst = Tile {
            space: Space::Vmem,
            offset: stage.offset + ((g.pt * g.wp + g.pl) * c * 4) as u64,
            rows: g.h as u32,
            cols: (g.w * c) as u32,
            stride: (g.wp * c) as u32,
            dtype: DType::F32,
        };
        // The next image: one slot down, or packed, one pitch along the row.
        let dst_step = if g.packed > 0 { (g.pitch() * c * 4) as u64 } else { slot_elems * 4 };
        let repeat =
            (sb.images > 1).then(|| Repeat { count: sb.images as u32, src_step: g.h as u64 * row_bytes, dst_step });
        e.push(Operation::Dma { engine: 0, src, dst, repeat }, deps)
    } else {
        // A band: padded rows oh0·s .. from image n0.
        let first_padded = sb.oh0 * g.sh;
        let h_lo = first_padded.saturating_sub(g.pt);
        let h_hi = (first_padded + g.sh * sb.bh + g.halo()).saturating_sub(g.pt).min(g.h);
        if h_hi <= h_lo {
            return e.push(Operation::Barrier, deps);
        }
        let q_lo = h_lo + g.pt - first_padded;
        let src = Tile {
            space: Space::Hbm,
            offset: x.offset + ((sb.n0 * g.h + h_lo) as u64) * row_bytes,
            rows: (h_hi - h_lo) as u32,
            cols: (g.w * c) as u32,
            stride: (g.w * c) as u32,
            dtype: x.dtype,
        };
        let dst = Tile {
            space: Space::Vmem,
            offset: stage.offset + ((q_lo * g.wp + g.pl) * c * 4) as u64,
            rows: (h_hi - h_lo) as u32,
            cols: (g.w * c) as u32,
            stride: (g.wp * c) as u32,
            dtype: DType::F32,
        };
        e.push(Operation::dma(0, src, dst), deps)
    }
}

/// Stages block `sb` into `stage` after its previous `readers`: zero padding first — once per
/// buffer (`filled`), and again before a band whose valid outputs read padding rows that an
/// earlier band filled with data — then [`stage_input`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_block(
    e: &mut Emitter,
    g: &ConvLayout,
    x: Tile,
    sb: &Block,
    whole: bool,
    stage: Tile,
    filled: &mut bool,
    readers: &[u32],
) -> u32 {
    if !*filled || (!whole && g.band_needs_fill(sb)) {
        *filled = true;
        let f = e.push(Operation::Fill { dst: stage, value: 0.0 }, readers);
        stage_input(e, g, x, sb, whole, stage, &[f])
    } else {
        stage_input(e, g, x, sb, whole, stage, readers)
    }
}

/// [`stage_input`] by stride phase ([`ConvLayout::phased`]): phase `(pr, pc)` is a dense
/// image of `rows × wv` pixels at pixel `(pr·sw + pc) · rows · wv` of `stage`, its row `i`
/// holding padded row `sh·i + pr` (from the slot or band start) at columns `sw·j + pc`. One
/// DMA per phase (and image) gathers the stored pixels of the phase from HBM (a tile of
/// pixels, `sw·c` elements apart) and repeats over the image rows of the phase. Phases no tap
/// reads are not staged.
fn stage_phases(e: &mut Emitter, g: &ConvLayout, x: Tile, sb: &Block, whole: bool, stage: Tile, deps: &[u32]) -> u32 {
    let (c, sh, sw, wq) = (g.c, g.sh, g.sw, g.wv);
    let len = stage.rows as usize / (sh * sw);
    let rows = len / wq;
    let row_bytes = (g.w * c) as u64 * x.dtype.size();
    // (image, first padded row, its phase row, padded rows covered, its first phase column):
    // images one under the other, or packed, side by side.
    let parts: Vec<(usize, usize, usize, usize, usize)> = if whole && g.packed > 0 {
        (0..sb.images).map(|img| (sb.n0 + img, 0, 0, sh * rows, img * g.pitch())).collect()
    } else if whole {
        (0..sb.images).map(|img| (sb.n0 + img, 0, img * g.hv(), sh * g.hv(), 0)).collect()
    } else {
        vec![(sb.n0, sb.oh0 * sh, 0, sh * rows, 0)]
    };
    let engines = e.m.core.dma.engines.max(1);
    let mut ids = Vec::new();
    for (n, p0, i0, span, j0) in parts {
        for pr in 0..sh {
            // Padded rows p0 + pr + sh·t that hold stored rows.
            let first = p0 + pr;
            let t_lo = g.pt.saturating_sub(first).div_ceil(sh);
            let t_hi =
                (g.pt + g.h).saturating_sub(first).div_ceil(sh).min((p0 + span).saturating_sub(first).div_ceil(sh));
            for pc in (0..sw).filter(|&pc| g.phase_read(pr, pc)) {
                let col0 = (pc + sw - g.pl % sw) % sw;
                if t_hi <= t_lo || col0 >= g.w {
                    continue;
                }
                let r0 = first + sh * t_lo - g.pt;
                let pixels = (g.w - col0).div_ceil(sw);
                let src = Tile {
                    space: Space::Hbm,
                    offset: x.offset + (((n * g.h + r0) * g.w + col0) * c) as u64 * x.dtype.size(),
                    rows: pixels as u32,
                    cols: c as u32,
                    stride: (sw * c) as u32,
                    dtype: x.dtype,
                };
                let at = (pr * sw + pc) * len + (i0 + t_lo) * wq + j0 + (col0 + g.pl) / sw;
                let dst = Tile {
                    space: Space::Vmem,
                    offset: stage.offset + (at * c * 4) as u64,
                    rows: pixels as u32,
                    cols: c as u32,
                    stride: c as u32,
                    dtype: DType::F32,
                };
                let repeat = Repeat {
                    count: (t_hi - t_lo) as u32,
                    src_step: sh as u64 * row_bytes,
                    dst_step: (wq * c * 4) as u64,
                };
                let engine = (ids.len() % engines) as u8;
                ids.push(e.push(Operation::Dma { engine, src, dst, repeat: Some(repeat) }, deps));
            }
        }
    }
    match ids.as_slice() {
        [one] => *one,
        _ => e.push(Operation::Barrier, if ids.is_empty() { deps } else { &ids }),
    }
}

/// [`stage_input`] as the im2col matrix ([`ConvLayout::gathered`]): per image and tap, one
/// DMA gathers the input pixels the tap reads for the block's output rows — a run of pixels
/// `sw` apart per output row, repeated over the rows — into the tap's columns. Windows that
/// reach the padding keep the zeros the buffer was filled with.
fn stage_gathered(e: &mut Emitter, g: &ConvLayout, x: Tile, sb: &Block, whole: bool, stage: Tile, deps: &[u32]) -> u32 {
    let (c, taps) = (g.c, g.taps());
    let size = x.dtype.size();
    let row_bytes = (g.w * c) as u64 * size;
    // Output indices `lo..hi` whose input index `o·s + k·d − pad` falls in `0..len`.
    let valid = |lo: usize, hi: usize, s: usize, kd: usize, pad: usize, len: usize| {
        let first = pad.saturating_sub(kd).div_ceil(s);
        let end = if len + pad > kd { (len + pad - kd - 1) / s + 1 } else { 0 };
        (lo.max(first), hi.min(end))
    };
    let (r0, r1) = if whole { (0, g.oh) } else { (sb.oh0, sb.oh0 + sb.bh) };
    let engines = e.m.core.dma.engines.max(1);
    let mut ids = Vec::new();
    for img in 0..sb.images {
        let n = sb.n0 + img;
        let base = if whole { img * g.oh * g.ow } else { 0 };
        for i in 0..g.kh {
            let (o_lo, o_hi) = valid(r0, r1, g.sh, i * g.dh, g.pt, g.h);
            for j in 0..g.kw {
                let (c_lo, c_hi) = valid(0, g.ow, g.sw, j * g.dw, g.pl, g.w);
                if o_hi <= o_lo || c_hi <= c_lo {
                    continue;
                }
                let (in_r, in_c) = (o_lo * g.sh + i * g.dh - g.pt, c_lo * g.sw + j * g.dw - g.pl);
                let src = Tile {
                    space: Space::Hbm,
                    offset: x.offset + (((n * g.h + in_r) * g.w + in_c) * c) as u64 * size,
                    rows: (c_hi - c_lo) as u32,
                    cols: c as u32,
                    stride: (g.sw * c) as u32,
                    dtype: x.dtype,
                };
                let row = base + (o_lo - r0) * g.ow + c_lo;
                let dst = Tile {
                    space: Space::Vmem,
                    offset: stage.offset + ((row * taps + i * g.kw + j) * c * 4) as u64,
                    rows: (c_hi - c_lo) as u32,
                    cols: c as u32,
                    stride: (taps * c) as u32,
                    dtype: DType::F32,
                };
                let repeat = (o_hi - o_lo > 1).then(|| Repeat {
                    count: (o_hi - o_lo) as u32,
                    src_step: g.sh as u64 * row_bytes,
                    dst_step: (g.ow * taps * c * 4) as u64,
                });
                let engine = (ids.len() % engines) as u8;
                ids.push(e.push(Operation::Dma { engine, src, dst, repeat }, deps));
            }
        }
    }
    match ids.as_slice() {
        [one] => *one,
        _ => e.push(Operation::Barrier, if ids.is_empty() { deps } else { &ids }),
    }
}

/// The im2col copies of one block: each kernel row's taps into their columns of `cols`
/// (one copy per kernel row when the taps of a row are consecutive, else one per tap; staged
/// by phase, one per run of taps in a phase row).
/// Returns the last copy.
pub(crate) fn im2col_copies(
    e: &mut Emitter,
    g: &ConvLayout,
    stage: Tile,
    cols: Tile,
    staged: u32,
    m_blk: usize,
) -> u32 {
    let c = stage.cols as usize;
    if g.phases {
        // Columns in [`ConvLayout::im2col_taps`] order: one copy per run of taps at
        // consecutive offsets of one phase row.
        let taps = g.im2col_taps();
        let (mut k, mut last) = (0, staged);
        while k < taps.len() {
            let [pr, pc, ai, aj] = g.phase_of(taps[k].0, taps[k].1);
            let n = (1..taps.len() - k)
                .take_while(|&d| g.phase_of(taps[k + d].0, taps[k + d].1) == [pr, pc, ai, aj + d])
                .count()
                + 1;
            let src = g.tap_view(stage, taps[k].0, taps[k].1, 0, n * c, m_blk);
            last = e.push(Operation::Unary { op: UnaryOp::Copy, src, dst: cols.columns(k * c, n * c) }, &[staged]);
            k += n;
        }
        return last;
    }
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
            last = e.push(Operation::Unary { op: UnaryOp::Copy, src, dst: cols.columns(tap * c, per_copy) }, &[staged]);
        }
    }
    last
}

/// Moves the valid output rows of a block between HBM (compact NHWC rows) and an accumulator
/// laid out over the padded width; `load` reads HBM into VMEM (residuals), else writes back.
#[allow(clippy::too_many_arguments)]
pub(crate) fn out_rows(
    e: &mut Emitter,
    g: &ConvLayout,
    blk: &Block,
    whole: bool,
    hbm: Tile,
    vmem: Tile,
    c0: usize,
    nb: usize,
    load: bool,
    deps: &[u32],
) -> u32 {
    // The tensor holds the output window `crop .. crop + out_hw` (usually all of it), spread
    // over a larger tensor when the layout says so (one stride phase of an input gradient).
    let ([top, left], [oh, ow]) = (g.crop, g.out_hw);
    let s = g.scatter.unwrap_or(Scatter { dims: [oh, ow], step: [1, 1], at: [0, 0] });
    // VMEM rows are `pitch` elements apart (the block's channel width, or wider when a
    // narrower last block keeps the layout of the full-width ones).
    let pitch = vmem.stride as usize;
    let (h_step, v_step) = ((s.step[0] * s.dims[1] * g.co) as u64 * hbm.dtype.size(), (g.wv * pitch * 4) as u64);
    // When image slots hold exactly the output rows (hv = OH), rows of successive images are
    // evenly spaced on both sides: one DMA moves the whole block. Otherwise one per image,
    // spread over the DMA engines so their start-up latencies overlap.
    let cropped = g.crop != [0, 0] || g.out_hw != [g.oh, g.ow] || g.scatter.is_some();
    let merged = whole && g.hv() == g.oh && g.packed == 0 && !cropped;
    // The block's rows that fall in the window.
    let (r_lo, r_hi) = (blk.oh0.max(top), (blk.oh0 + blk.bh).min(top + oh));
    if r_hi <= r_lo {
        return e.push(Operation::Barrier, deps);
    }
    let (copies, rows_each) = if merged { (1, blk.images * blk.bh) } else { (blk.images, r_hi - r_lo) };
    let engines = e.m.core.dma.engines.max(1);
    let mut ids = Vec::with_capacity(copies);
    for img in 0..copies {
        let n = blk.n0 + img;
        let v_row0 = if whole { g.image_offset(img) } else { 0 } + (r_lo - blk.oh0) * g.wv + left;
        let pixel = (n * s.dims[0] + s.at[0] + (r_lo - top) * s.step[0]) * s.dims[1] + s.at[1];
        let h = Tile {
            space: Space::Hbm,
            offset: hbm.offset + (pixel * g.co + c0) as u64 * hbm.dtype.size(),
            rows: ow as u32,
            cols: nb as u32,
            stride: (s.step[1] * g.co) as u32,
            dtype: hbm.dtype,
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
        ids.push(e.push(Operation::Dma { engine: engine as u8, src, dst, repeat }, deps));
    }
    if ids.len() == 1 { ids[0] } else { e.push(Operation::Barrier, &ids) }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use systolic_simulator::config::presets;
    use systolic_simulator::functional::Functional;
    use systolic_simulator::isa::{DType, Space, Tile};
    use systolic_simulator::numerics::Precision;

    use crate::graph::{Conv2d, Graph, NodeId, Padding};
    use crate::lower::blocks::conv_layout::{Block, ConvLayout};
    use crate::lower::blocks::staging::stage_block;
    use crate::lower::emitter::{Context, Emitted, Emitter, Extras};
    use crate::lower::kernel::{Kernel, Main};
    use crate::lower::options::Options;

    /// What staging must leave in VMEM: padded row `q` (from the slot or band start) and padded
    /// column `p` hold the input pixel there — zero in the padding.
    fn expected(g: &ConvLayout, x: &[f32], image: usize, padded_row: usize, p: usize, ch: usize) -> f32 {
        let (r, col) = (padded_row as i64 - g.pt as i64, p as i64 - g.pl as i64);
        if r < 0 || col < 0 || r >= g.h as i64 || col >= g.w as i64 {
            return 0.0;
        }
        x[((image * g.h + r as usize) * g.w + col as usize) * g.c + ch]
    }

    /// The layout of a `k × k` convolution of `[n, xh, xw, c]` with these strides, dilation
    /// and padding; None when the kernel reaches past the padded input.
    fn layout(
        [n, xh, xw, c]: [usize; 4],
        k: usize,
        strides: [usize; 2],
        dilation: usize,
        [top, bottom, left, right]: [usize; 4],
    ) -> Option<ConvLayout> {
        let reach = (k - 1) * dilation + 1;
        if xh + top + bottom < reach || xw + left + right < reach {
            return None;
        }
        let attrs = Conv2d {
            strides,
            padding: Padding::Explicit { top, bottom, left, right },
            dilation: [dilation, dilation],
            groups: 1,
        };
        Some(ConvLayout::new(&attrs, &[n, xh, xw, c], &[k, k, c, 1]))
    }

    /// Where phase (pr, pc), row i, column j of a staged block reads: an image of the block
    /// (from `b.n0`) and a padded row and column of it, or None for zeros.
    type Source<'s> = &'s dyn Fn(usize, usize, usize, usize) -> Option<(usize, usize, usize)>;

    /// Checks a block staged by phase (`got`: every phase's rows of `wv` pixels) against `source`.
    fn check_phases(g: &ConvLayout, x: &[f32], b: &Block, got: &[f32], source: Source) -> Result<(), TestCaseError> {
        let rows = got.len() / (g.sh * g.sw * g.wv * g.c);
        let len = rows * g.wv;
        for (pr, pc) in (0..g.sh).flat_map(|pr| (0..g.sw).map(move |pc| (pr, pc))) {
            if !g.phase_read(pr, pc) {
                continue;
            }
            for i in 0..rows {
                for j in 0..g.wv {
                    for ch in 0..g.c {
                        let want = match source(pr, pc, i, j) {
                            Some((img, row, col)) => expected(g, x, b.n0 + img, row, col, ch),
                            None => 0.0,
                        };
                        let at = ((pr * g.sw + pc) * len + i * g.wv + j) * g.c + ch;
                        prop_assert_eq!(got[at], want, "block {:?} phase {:?} at {:?}", b, (pr, pc), (i, j, ch));
                    }
                }
            }
        }
        Ok(())
    }

    /// Stages block `b` of `g` from `x` into `stage` on the functional engine; what lands.
    fn run_staging(g: &ConvLayout, n: usize, x: &[f32], b: &Block, whole: bool, stage: Tile) -> Vec<f32> {
        let machine = presets::preset("v2-8").unwrap();
        let opts = Options::new(machine.clone(), n, Precision::Default);
        let graph = Graph::new("staging");
        let extras = Extras::default();
        let cx = Context { graph: &graph, opts: &opts, places: &[], extras: &extras };
        let x_tile = Tile::new(Space::Hbm, 0, x.len() / g.c, g.c, DType::F32);
        let mut e = Emitter::new(&cx, "stage", None, None);
        let mut filled = false;
        stage_block(&mut e, g, x_tile, b, whole, stage, &mut filled, &[]);
        let kernel = Kernel {
            name: "stage".into(),
            main: Main::Advance(Vec::new()),
            epilogue: Vec::new(),
            nodes: Vec::new(),
            output: NodeId::new(0),
            also: Vec::new(),
            stats_for: None,
        };
        let fragment = e.finish(&kernel, Emitted::new("", "", 0));
        let mut f = Functional::new(&machine);
        f.write(x_tile, x).unwrap();
        f.run(&fragment.program).unwrap();
        f.read(stage).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Every block a convolution stages — whole images or bands — holds exactly the
        /// zero-padded input its taps read.
        #[test]
        fn staged_blocks_hold_the_padded_input(
            n in 1usize..3, xh in 1usize..7, xw in 1usize..7, c in 1usize..4,
            k in 1usize..4, stride in 1usize..3, dilation in 1usize..3,
            pads in proptest::array::uniform4(0usize..3), target in 1usize..64,
        ) {
            let g = layout([n, xh, xw, c], k, [stride, stride], dilation, pads);
            prop_assume!(g.is_some());
            let g = g.unwrap();
            let x: Vec<f32> = (0..n * xh * xw * c).map(|i| i as f32 + 1.0).collect();
            let pb = g.blocks(target);
            let stage = Tile::new(Space::Vmem, 0, pb.stage_rows * g.wp, c, DType::F32);
            for b in &pb.blocks {
                let got = run_staging(&g, n, &x, b, pb.whole, stage);
                let slot_rows = g.sh * g.hv();
                for q in 0..pb.stage_rows {
                    for p in 0..g.wp {
                        for ch in 0..c {
                            let want = if pb.whole {
                                let (img, row) = (q / slot_rows, q % slot_rows);
                                if img < b.images { expected(&g, &x, b.n0 + img, row, p, ch) } else { 0.0 }
                            } else {
                                expected(&g, &x, b.n0, b.oh0 * g.sh + q, p, ch)
                            };
                            prop_assert_eq!(got[(q * g.wp + p) * c + ch], want, "block {:?} row {} col {} ch {}", b, q, p, ch);
                        }
                    }
                }
            }
        }
        /// Staged by stride phase, every block holds in each phase some tap reads exactly that
        /// phase of the zero-padded input: phase (pr, pc), row i, column j is padded pixel
        /// (sh·i + pr, sw·j + pc) of the slot or band.
        #[test]
        fn phased_blocks_hold_the_phases_of_the_padded_input(
            n in 1usize..3, xh in 1usize..9, xw in 1usize..9, c in 1usize..4,
            k in 1usize..4, sh in 1usize..4, sw in 1usize..4, dilation in 1usize..3,
            pads in proptest::array::uniform4(0usize..3), target in 1usize..64,
        ) {
            let g = layout([n, xh, xw, c], k, [sh, sw], dilation, pads);
            prop_assume!(g.as_ref().is_some_and(|g| g.phases_pay()));
            let g = g.unwrap().phased();
            let x: Vec<f32> = (0..n * xh * xw * c).map(|i| i as f32 + 1.0).collect();
            let pb = g.blocks(target);
            let stage = Tile::new(Space::Vmem, 0, g.stage_pixels(pb.stage_rows), c, DType::F32);
            for b in &pb.blocks {
                let got = run_staging(&g, n, &x, b, pb.whole, stage);
                check_phases(&g, &x, b, &got, &|pr, pc, i, j| {
                    if !pb.whole {
                        return Some((0, b.oh0 * sh + sh * i + pr, sw * j + pc));
                    }
                    let img = i / g.hv();
                    (img < b.images).then(|| (img, sh * (i % g.hv()) + pr, sw * j + pc))
                })?;
            }
        }

        /// Gathered, every block holds the im2col matrix of its output pixels: row (image,
        /// output row, output column), columns (tap, channel) in tap order, zero where the
        /// tap's window reaches the padding.
        #[test]
        fn gathered_blocks_hold_the_im2col_matrix(
            n in 1usize..3, xh in 1usize..8, xw in 1usize..8, c in 1usize..4,
            k in 1usize..4, sh in 1usize..3, sw in 1usize..3, dilation in 1usize..3,
            pads in proptest::array::uniform4(0usize..3), target in 1usize..64,
        ) {
            let g = layout([n, xh, xw, c], k, [sh, sw], dilation, pads);
            prop_assume!(g.is_some());
            let g = g.unwrap().gathered();
            let x: Vec<f32> = (0..n * xh * xw * c).map(|i| i as f32 + 1.0).collect();
            let pb = g.blocks(target);
            let stage = Tile::new(Space::Vmem, 0, g.stage_pixels(pb.stage_rows), c, DType::F32);
            let taps = k * k;
            for b in &pb.blocks {
                let got = run_staging(&g, n, &x, b, pb.whole, stage);
                for r in 0..pb.m_rows {
                    let (img, o) = if pb.whole { (r / (g.oh * g.ow), r % (g.oh * g.ow)) } else { (0, r) };
                    let (o_r, o_c) = (o / g.ow + if pb.whole { 0 } else { b.oh0 }, o % g.ow);
                    let inside = img < b.images && (pb.whole || o_r < b.oh0 + b.bh);
                    for t in 0..taps {
                        let (i, j) = (t / k, t % k);
                        for ch in 0..c {
                            let (row, col) = (o_r * sh + i * dilation, o_c * sw + j * dilation);
                            let want = if inside { expected(&g, &x, b.n0 + img, row, col, ch) } else { 0.0 };
                            prop_assert_eq!(got[(r * taps + t) * c + ch], want, "block {:?} row {} tap {} ch {}", b, r, t, ch);
                        }
                    }
                }
            }
        }

        /// Packed, every block holds its images side by side: padded row q, column p is pixel
        /// (q − pt, p mod pitch − pl) of image p / pitch of the block, zero elsewhere.
        #[test]
        fn packed_blocks_hold_their_images_side_by_side(
            n in 1usize..5, xh in 1usize..7, xw in 1usize..7, c in 1usize..4,
            k in 1usize..4, dilation in 1usize..3, pads in proptest::array::uniform4(0usize..3),
            side in 1usize..4,
        ) {
            let g = layout([n, xh, xw, c], k, [1, 1], dilation, pads);
            prop_assume!(g.is_some());
            let g = g.unwrap().packed(side);
            let x: Vec<f32> = (0..n * xh * xw * c).map(|i| i as f32 + 1.0).collect();
            let pb = g.blocks(2048);
            let stage = Tile::new(Space::Vmem, 0, g.stage_pixels(pb.stage_rows), c, DType::F32);
            let pitch = g.pitch();
            for b in &pb.blocks {
                let got = run_staging(&g, n, &x, b, pb.whole, stage);
                for q in 0..pb.stage_rows {
                    for p in 0..g.wp {
                        let img = p / pitch;
                        for ch in 0..c {
                            let want = if img < b.images {
                                expected(&g, &x, b.n0 + img, q, p % pitch, ch)
                            } else {
                                0.0
                            };
                            prop_assert_eq!(got[(q * g.wp + p) * c + ch], want, "block {:?} row {} col {} ch {}", b, q, p, ch);
                        }
                    }
                }
            }
        }

        /// Packed by phase, each phase holds the block's images side by side: phase (pr, pc),
        /// row i, column p is padded pixel (sh·i + pr, sw·(p mod pitch) + pc) of image
        /// p / pitch.
        #[test]
        fn packed_phases_hold_their_images_side_by_side(
            n in 1usize..4, xh in 1usize..9, xw in 1usize..9, c in 1usize..3,
            k in 1usize..4, sh in 1usize..4, sw in 1usize..4, dilation in 1usize..3,
            pads in proptest::array::uniform4(0usize..3), side in 1usize..4,
        ) {
            let g = layout([n, xh, xw, c], k, [sh, sw], dilation, pads);
            prop_assume!(g.as_ref().is_some_and(|g| g.phases_pay()));
            let g = g.unwrap().phased().packed(side);
            let x: Vec<f32> = (0..n * xh * xw * c).map(|i| i as f32 + 1.0).collect();
            let pb = g.blocks(2048);
            let stage = Tile::new(Space::Vmem, 0, g.stage_pixels(pb.stage_rows), c, DType::F32);
            let pitch = g.pitch();
            for b in &pb.blocks {
                let got = run_staging(&g, n, &x, b, pb.whole, stage);
                check_phases(&g, &x, b, &got, &|pr, pc, i, j| {
                    let img = j / pitch;
                    (img < b.images).then(|| (img, sh * i + pr, sw * (j % pitch) + pc))
                })?;
            }
        }
    }
}

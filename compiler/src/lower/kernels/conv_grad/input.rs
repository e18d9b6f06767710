//! The input gradient (`Conv2dBackpropInput`): the transposed convolution, `dx` from `dy`
//! and the kernel flipped in space and transposed per tap (`[kh, kw, cout, cin]`). The flip and
//! transpose run once per step on the VPU's transpose unit into an HBM scratch buffer; the
//! convolution itself is the forward kernel ([`conv_with`]), once per stride phase of `dx`
//! (each phase a stride-1 convolution of `dy` with the taps that reach it), so no zeros between
//! `dy`'s pixels are streamed; a stride-1 convolution's has one phase, all of `dx`.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{Conv2d, NodeId, Op, Padding};
use crate::lower::blocks::conv_layout::{ConvLayout, PixelBlocks, Scatter};
use crate::lower::blocks::epilogue::{Operands, apply_epilogue, mask_of, prepare_channels, residual_of};
use crate::lower::blocks::staging::out_rows;
use crate::lower::emitter::{BUFFERS, Emitted, Emitter};
use crate::lower::kernel::{Kernel, Place};
use crate::lower::kernels::conv::{ConvSpec, conv_with};

pub(crate) fn input(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let Op::Conv2dBackpropInput(b) = &n.op else { unreachable!("a ConvGradInput main") };
    let (dy, w, dx) = (e.place(n.inputs[0]), e.place(n.inputs[1]), e.place(kernel.output));
    let g = ConvLayout::new(&b.conv, &dx.shape, &w.shape);
    let cg = w.shape[2];
    let scratch = e.scratch.expect("the allocation pass gives every input gradient its scratch");
    let mut report = by_phase(e, kernel, &g, cg, [dy, w, dx], scratch)?;
    // The useful work is the gradient's, not the padded transposed convolution's.
    report.useful_macs = g.macs(cg);
    Ok(report)
}

/// One axis of a stride phase of `dx`: input positions `s·a + r` (`len` of them) receive
/// `dy[a + off_k]·W[k]` from the taps `k` with `(r + pad − k·d) ≡ 0 (mod s)`, where
/// `off_k = (r + pad − k·d) / s`. Ordered by `off` these taps are a stride-1 convolution over
/// `dy` with dilation `dilation`, padded by `pad` and cropped by `crop` rows.
struct PhaseAxis {
    /// Kernel indices in the phase convolution's tap order (descending `k`, ascending `off`).
    taps: Vec<usize>,
    dilation: usize,
    pad: [usize; 2],
    crop: usize,
    len: usize,
}

impl PhaseAxis {
    /// Phase `r` of an axis with kernel `k`, dilation `d`, stride `s`, leading padding `pad`,
    /// `out` forward outputs and `size` inputs.
    fn new(r: usize, [k, d, s, pad]: [usize; 4], out: usize, size: usize) -> PhaseAxis {
        let reach = |ki: usize| (r + pad) as i64 - (ki * d) as i64;
        let taps: Vec<usize> = (0..k).rev().filter(|&ki| reach(ki).rem_euclid(s as i64) == 0).collect();
        let len = if r < size { (size - r).div_ceil(s) } else { 0 };
        let offs: Vec<i64> = taps.iter().map(|&ki| reach(ki).div_euclid(s as i64)).collect();
        let (first, dilation) = match offs.as_slice() {
            [] => (0, 1),
            [one] => (*one, 1),
            [a, b, ..] => (*a, (b - a) as usize),
        };
        let (top, crop) = ((-first).max(0) as usize, first.max(0) as usize);
        let span = taps.len().saturating_sub(1) * dilation;
        let bottom = (crop + len + span).saturating_sub(out + top);
        PhaseAxis { taps, dilation, pad: [top, bottom], crop, len }
    }
}

/// The transposed convolution by stride phase: phase `(rh, rw)` of `dx` (the pixels
/// `(sh·a + rh, sw·b + rw)`) is a stride-1 convolution of the stored `dy` with the taps that
/// reach that phase, so no zeros between `dy`'s pixels are streamed (stride 1: one phase, the
/// whole flipped kernel, `dy` padded by the kernel's reach beyond the forward padding). Each phase's flipped
/// taps are contiguous in the scratch; phases run one after another (they share VMEM) and write
/// their pixels of `dx` through a strided view; a phase no tap reaches (a 1×1 convolution's odd
/// pixels) gets the kernel's epilogue applied to zeros.
fn by_phase(
    e: &mut Emitter,
    kernel: &Kernel,
    g: &ConvLayout,
    cg: usize,
    [dy, w, dx]: [&Place; 3],
    scratch: u64,
) -> Result<Emitted> {
    let cog = g.co / g.groups;
    let rows: Vec<PhaseAxis> = (0..g.sh).map(|r| PhaseAxis::new(r, [g.kh, g.dh, g.sh, g.pt], g.oh, g.h)).collect();
    let cols: Vec<PhaseAxis> = (0..g.sw).map(|r| PhaseAxis::new(r, [g.kw, g.dw, g.sw, g.pl], g.ow, g.w)).collect();
    // Each phase's taps from `base` (in taps of the scratch); the phases `dx` has.
    let mut phases = Vec::new();
    let mut base = 0;
    for (rh, ph) in rows.iter().enumerate().filter(|(_, p)| p.len > 0) {
        for (rw, pw) in cols.iter().enumerate().filter(|(_, p)| p.len > 0) {
            phases.push((rh, rw, base));
            base += ph.taps.len() * pw.taps.len();
        }
    }
    let dest = |t: usize| {
        let (ki, kj) = (t / g.kw, t % g.kw);
        phases.iter().find_map(|&(rh, rw, base)| {
            let th = rows[rh].taps.iter().position(|&k| k == ki)?;
            let tw = cols[rw].taps.iter().position(|&k| k == kj)?;
            Some(base + th * cols[rw].taps.len() + tw)
        })
    };
    flip_kernel(e, kernel, g, cg, w, scratch, dest)?;

    // Each phase's report with its tap count.
    let mut parts: Vec<(usize, Emitted)> = Vec::new();
    let mut zero = Vec::new();
    for &(rh, rw, base) in &phases {
        let (ph, pw) = (&rows[rh], &cols[rw]);
        // Stride 1: one phase, all of `dx`.
        let strided = g.sh > 1 || g.sw > 1;
        let scatter = strided.then_some(Scatter { dims: [g.h, g.w], step: [g.sh, g.sw], at: [rh, rw] });
        if ph.taps.is_empty() || pw.taps.is_empty() {
            zero.push((rh, rw));
            continue;
        }
        let (nh, nw) = (ph.taps.len(), pw.taps.len());
        let taps = Place {
            shape: vec![nh, nw, cog, g.c],
            tile: Tile::new(Space::Hbm, scratch + (base * cog * g.c * 4) as u64, nh * nw * cog, g.c, DType::F32),
        };
        let attrs = Conv2d {
            strides: [1, 1],
            padding: Padding::Explicit { top: ph.pad[0], bottom: ph.pad[1], left: pw.pad[0], right: pw.pad[1] },
            dilation: [ph.dilation, pw.dilation],
            groups: g.groups,
        };
        let spec = ConvSpec {
            x: dy,
            w: &taps,
            y: dx,
            attrs,
            bias: None,
            out_window: Some([ph.crop, pw.crop, ph.len, pw.len]),
            scatter,
        };
        // Phases reuse the same VMEM: each waits for the one before.
        if !parts.is_empty() {
            e.fence();
        }
        parts.push((nh * nw, conv_with(e, kernel, &spec)?));
    }
    if !zero.is_empty() {
        e.fence();
        zero_phases(e, kernel, g, dx, &zero, [&rows, &cols])?;
    }
    if let [(_, one)] = parts.as_slice()
        && zero.is_empty()
    {
        return Ok(Emitted::new(format!("transposed conv: {}", one.strategy), one.padded.clone(), 0));
    }
    // The phase with the most taps speaks for the others.
    let (strategy, padded) = match parts.iter().max_by_key(|(taps, _)| *taps) {
        Some((_, p)) => (p.strategy.clone(), format!("largest phase: {}", p.padded)),
        None => ("the epilogue alone".to_string(), String::new()),
    };
    let zeros = if zero.is_empty() {
        String::new()
    } else {
        format!("; {} phases no tap reaches get the epilogue of zeros", zero.len())
    };
    let strategy = format!(
        "transposed conv by stride phase ({} phases of dx, each a stride-1 conv of dy with its taps{zeros}): {strategy}",
        parts.len(),
    );
    Ok(Emitted::new(strategy, padded, 0))
}

/// The forward kernel `w` `[kh, kw, cg, co]` flipped and transposed per group into the scratch
/// at `scratch`: source tap `t` becomes the `cog × c` block of rows `dest(t)·cog` (None: no
/// phase reads it), each group's `[cg × cog]` block transposed on the VPU. Returns once done.
fn flip_kernel(
    e: &mut Emitter,
    kernel: &Kernel,
    g: &ConvLayout,
    cg: usize,
    w: &Place,
    scratch: u64,
    dest: impl Fn(usize) -> Option<usize>,
) -> Result<()> {
    let (groups, taps) = (g.groups, g.taps());
    let cog = g.co / groups;
    let flipped = Tile::new(Space::Hbm, scratch, taps * cog, g.c, DType::F32);
    let mut done = Vec::new();
    if g.depthwise(cg) {
        for t in 0..taps {
            if let Some(d) = dest(t) {
                done.push(e.push(Operation::dma(t as u8, w.tile.rows(t, 1), flipped.rows(d, 1)), &[]));
            }
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
            let Some(d) = dest(t) else { continue };
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
                    let dst = flipped.rows(d * cog, cog).columns(gi * cg + r0, rn);
                    let st = e.push(Operation::dma(2, bt, dst), &[tr]);
                    load_free[p] = vec![tr];
                    turned_free[p] = vec![st];
                    done.push(st);
                }
            }
        }
    }
    e.wait_for(&done);
    Ok(())
}

/// The stride phases `which` of `dx` that no tap reaches: the kernel's epilogue applied to
/// zeros (zeros, or the residual a fused gradient sum adds), block by block over each phase's
/// pixels, stored through the phase's strided view.
fn zero_phases(
    e: &mut Emitter,
    kernel: &Kernel,
    g: &ConvLayout,
    dx: &Place,
    which: &[(usize, usize)],
    [rows, cols]: [&[PhaseAxis]; 2],
) -> Result<()> {
    let c = g.c;
    let (residual, mask) = (residual_of(kernel), mask_of(kernel));
    let arrays = 1 + residual.is_some() as usize + mask.is_some() as usize;
    let target = (e.m.core.vmem_bytes as usize / 2 / (BUFFERS * arrays * c * 4)).max(1);
    // Each phase as the output of a 1x1 convolution over its own pixels, spread over `dx`.
    let layouts: Vec<ConvLayout> = which
        .iter()
        .map(|&(rh, rw)| {
            let attrs = Conv2d {
                strides: [1, 1],
                padding: Padding::Explicit { top: 0, bottom: 0, left: 0, right: 0 },
                dilation: [1, 1],
                groups: 1,
            };
            let mut pg = ConvLayout::new(&attrs, &[g.n, rows[rh].len, cols[rw].len, c], &[1, 1, c, c]);
            pg.scatter = Some(Scatter { dims: [g.h, g.w], step: [g.sh, g.sw], at: [rh, rw] });
            pg
        })
        .collect();
    let m_rows = layouts.iter().map(|pg| pg.blocks(target).m_rows).max().unwrap_or(1);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "zero-phase buffers");
    let acc = vmem.ring(m_rows, c).ok_or_else(|| oom(e))?;
    let res = if residual.is_some() { vmem.ring(m_rows, c).ok_or_else(|| oom(e))? } else { Vec::new() };
    let masks = if mask.is_some() { vmem.ring(m_rows, c).ok_or_else(|| oom(e))? } else { Vec::new() };
    let ch = prepare_channels(e, kernel, c, &mut vmem)?;
    // An epilogue changes the accumulator in place: zero it for every block; else once.
    let refill = !kernel.epilogue.is_empty();
    let mut zeroed: Vec<Option<u32>> = vec![None; BUFFERS];
    let mut acc_free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut res_free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let mut i = 0;
    for pg in &layouts {
        let PixelBlocks { blocks, whole, .. } = pg.blocks(target);
        for blk in &blocks {
            let p = i % BUFFERS;
            i += 1;
            let m_blk = pg.block_rows(blk, whole);
            let accp = Tile { rows: m_blk as u32, cols: c as u32, stride: c as u32, ..acc[p] };
            if refill || zeroed[p].is_none() {
                let full = Tile { rows: m_rows as u32, ..accp };
                zeroed[p] = Some(e.push(Operation::Fill { dst: full, value: 0.0 }, &acc_free[p]));
            }
            let load = |e: &mut Emitter, t: NodeId, ring: &[Tile]| {
                let v = Tile { rows: m_blk as u32, cols: c as u32, stride: c as u32, ..ring[p] };
                (v, out_rows(e, pg, blk, whole, e.place(t).tile, v, 0, c, true, &res_free[p]))
            };
            let operands =
                Operands { residual: residual.map(|r| load(e, r, &res)), mask: mask.map(|y| load(e, y, &masks)) };
            let ready = zeroed[p].into_iter().collect();
            let done = apply_epilogue(e, kernel, &ch, accp, 0, operands, ready);
            let stored = out_rows(e, pg, blk, whole, dx.tile, accp, 0, c, false, &[done]);
            res_free[p] = vec![done];
            acc_free[p] = vec![stored];
        }
    }
    Ok(())
}

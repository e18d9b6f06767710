//! Batch norm with batch statistics (training), on the VPU.
//!
//! A pass over the rows of `x` (and, for the gradients, `dy`) accumulates per-channel sums of
//! `x' = x − K`, where `K` is the first row of `x`: `Σx'`, `Σx'²`, `Σdy`, `Σx'·dy`, each block
//! added into block-shaped accumulators (one add or multiply-add per block) that are reduced
//! over rows once at the end. The shift keeps `E[x'²] − E[x']²` from cancelling when the mean
//! is large against the spread (a batch of two 1x1 images is the extreme). With `m` rows,
//! `μ' = Σx'/m`, `μ = μ' + K`, `var = Σx'²/m − μ'²` (clamped at 0), `σ⁻¹ = rsqrt(var + ε)`:
//! - forward: `y = x·(γσ⁻¹) + (β − μγσ⁻¹)`, and the moving statistics move towards `μ` and the
//!   unbiased `var·m/(m−1)` (written in place, as the reference's training run does);
//! - `dβ = Σdy`, `dγ = σ⁻¹(Σx'·dy − μ'Σdy)`;
//! - `dx = γσ⁻¹(dy − mean(dy) − x̂·dγ/m)`, as `a·dy + b·(x − μ) + k` per channel, in a
//!   second pass.
//!
//! The gradient kernel fuses the three gradients and the ReLU mask that makes `dy` (see
//! [`super::fusion::BatchNormGrad`]). Sums are f32 (the reference's are f64): they agree to
//! f32 rounding of the sums.

use systolic_simulator::isa::*;

use super::KernelReport;
use super::emit::{BUFFERS, Emitter, Vmem};
use super::fusion::{BatchNormGrad, Kernel};
use crate::error::Result;
use crate::graph::{BatchNorm, NodeId, Op as GOp};

/// What a pass reads: `x`, and `dy` (masked by the activation `y` on load).
#[derive(Clone, Copy)]
struct Source {
    x: Tile,
    dy: Option<Tile>,
    mask: Option<(Tile, BinaryOp)>,
}

/// Block buffers for a pass over a source: `BUFFERS` of each, `rows` rows.
struct Rings {
    rows: usize,
    x: Vec<Tile>,
    dy: Vec<Tile>,
    y: Vec<Tile>,
}

impl Rings {
    /// Rings for `src` plus `accumulators` block-shaped arrays, in `share` of what VMEM has
    /// left (room kept for a few channel vectors).
    fn new(
        e: &Emitter,
        kernel: &Kernel,
        src: &Source,
        accumulators: usize,
        share: f64,
        vmem: &mut Vmem,
    ) -> Result<Rings> {
        let (rows, c) = (src.x.rows as usize, src.x.cols as usize);
        let loads = 1 + src.dy.is_some() as usize + src.mask.is_some() as usize;
        let arrays = BUFFERS * loads + accumulators;
        let budget = (vmem.remaining().saturating_sub((16 * c * 4 + 64 * 512) as u64) as f64 * share) as usize;
        let rb = (budget / (arrays * c * 4)).clamp(1, rows.max(1));
        let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
        let mut ring = |on: bool| -> Result<Vec<Tile>> {
            if on { vmem.ring(rb, c).ok_or_else(|| oom(e)) } else { Ok(Vec::new()) }
        };
        Ok(Rings { rows: rb, x: ring(true)?, dy: ring(src.dy.is_some())?, y: ring(src.mask.is_some())? })
    }

    /// Loads block `b` (rows `r0..r0+rn`) of `src`, masking `dy`; returns (x, dy, ready).
    fn load(
        &self,
        e: &mut Emitter,
        src: &Source,
        b: usize,
        r0: usize,
        rn: usize,
        free: &[u32],
    ) -> (Tile, Option<Tile>, Vec<u32>) {
        let p = b % BUFFERS;
        let sub = |t: Tile| Tile { rows: rn as u32, ..t };
        let xt = sub(self.x[p]);
        let mut ready = vec![e.push(Op::dma(0, src.x.rows(r0, rn), xt), free)];
        let dt = src.dy.map(|dy| {
            let dt = sub(self.dy[p]);
            let ld = e.push(Op::dma(1, dy.rows(r0, rn), dt), free);
            match src.mask {
                Some((y, op)) => {
                    let yt = sub(self.y[p]);
                    let ly = e.push(Op::dma(3, y.rows(r0, rn), yt), free);
                    ready.push(e.push(Op::Binary { op, a: yt, b: dt, dst: dt }, &[ld, ly]));
                }
                None => ready.push(ld),
            }
            dt
        });
        (xt, dt, ready)
    }
}

/// Per-channel batch statistics in VMEM (`1 × C` tiles), ready after `done`.
struct Moments {
    mean: Tile,
    /// `μ' = μ − K`, the mean of the shifted values the sums are of.
    mean_shifted: Tile,
    var: Tile,
    inv_std: Tile,
    /// `Σdy` and `Σx'·dy`, when the pass read `dy`.
    dy: Option<(Tile, Tile)>,
    done: u32,
    /// Per ring slot: what the pass's last use of it was.
    free: Vec<Vec<u32>>,
}

/// One pass over `src`: the sums, then mean, variance and `σ⁻¹`.
fn moments(
    e: &mut Emitter,
    kernel: &Kernel,
    src: &Source,
    rings: &Rings,
    epsilon: f32,
    vmem: &mut Vmem,
) -> Result<Moments> {
    let (rows, c) = (src.x.rows as usize, src.x.cols as usize);
    let rb = rings.rows;
    let oom = |e: &Emitter| e.vmem_error(kernel, "batch-statistics accumulators");
    let mut block = |e: &Emitter| vmem.alloc(rb, c).ok_or_else(|| oom(e));
    let (ax, axx) = (block(e)?, block(e)?);
    let acc_dy = if src.dy.is_some() { Some((block(e)?, block(e)?)) } else { None };
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (sx, sxx, inv, tmp, shift, mean) = (vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?);
    let sums_dy = if src.dy.is_some() { Some((vec(e)?, vec(e)?)) } else { None };
    let accs: Vec<Tile> =
        [Some(ax), Some(axx), acc_dy.map(|a| a.0), acc_dy.map(|a| a.1)].into_iter().flatten().collect();
    let shift_loaded = e.push(Op::dma(1, src.x.rows(0, 1), shift), &[]);
    let mut last = e.push(Op::Fill { dst: ax, value: 0.0 }, &[]);
    for &t in &accs[1..] {
        last = e.push(Op::Fill { dst: t, value: 0.0 }, &[last]);
    }
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let (xt, dt, mut ready) = rings.load(e, src, b, r0, rn, &free[b % BUFFERS]);
        ready.extend([last, shift_loaded]);
        let rows_of = |t: Tile| t.rows(0, rn);
        last = e.push(Op::Binary { op: BinaryOp::Sub, a: xt, b: shift, dst: xt }, &ready);
        last = e.push(Op::Binary { op: BinaryOp::Add, a: rows_of(ax), b: xt, dst: rows_of(ax) }, &[last]);
        last = e.push(Op::MulAdd { a: xt, b: xt, acc: rows_of(axx) }, &[last]);
        if let (Some(dt), Some((ady, axdy))) = (dt, acc_dy) {
            last = e.push(Op::Binary { op: BinaryOp::Add, a: rows_of(ady), b: dt, dst: rows_of(ady) }, &[last]);
            last = e.push(Op::MulAdd { a: xt, b: dt, acc: rows_of(axdy) }, &[last]);
        }
        free[b % BUFFERS] = vec![last];
    }
    let sums = [Some(sx), Some(sxx), sums_dy.map(|s| s.0), sums_dy.map(|s| s.1)].into_iter().flatten();
    for (&acc, sum) in accs.iter().zip(sums) {
        last = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: acc, dst: sum }, &[last]);
    }
    let done = finish_moments(e, [sx, sxx, shift, mean, inv, tmp], rows, epsilon, last);
    Ok(Moments { mean, mean_shifted: sx, var: sxx, inv_std: inv, dy: sums_dy, done, free })
}

fn attrs(e: &Emitter, node: NodeId) -> BatchNorm {
    match &e.graph.node(node).op {
        GOp::BatchNorm(bn) | GOp::BatchNormGradInput(bn) | GOp::BatchNormGradGamma(bn) => bn.clone(),
        _ => unreachable!("a batch-norm node"),
    }
}

/// From the sums `[Σx', Σx'², K]` in VMEM (ready after `last`): `μ'` (in place of `Σx'`),
/// `μ = μ' + K`, `var = E[x'²] − μ'²` ≥ 0 (in place of `Σx'²`) and `σ⁻¹`, using `tmp`.
fn finish_moments(
    e: &mut Emitter,
    [sx, sxx, shift, mean, inv, tmp]: [Tile; 6],
    rows: usize,
    epsilon: f32,
    last: u32,
) -> u32 {
    let inv_m = 1.0 / rows as f32;
    let unary = |e: &mut Emitter, op, src, dst, after: u32| e.push(Op::Unary { op, src, dst }, &[after]);
    let a = unary(e, UnaryOp::Scale(inv_m), sx, sx, last);
    let a = e.push(Op::Binary { op: BinaryOp::Add, a: sx, b: shift, dst: mean }, &[a]);
    let b = unary(e, UnaryOp::Scale(inv_m), sxx, sxx, a);
    let sq = e.push(Op::Binary { op: BinaryOp::Mul, a: sx, b: sx, dst: tmp }, &[b]);
    let d = e.push(Op::Binary { op: BinaryOp::Sub, a: sxx, b: tmp, dst: sxx }, &[sq]);
    let var = unary(e, UnaryOp::Relu, sxx, sxx, d);
    let eps = unary(e, UnaryOp::AddScalar(epsilon), sxx, inv, var);
    unary(e, UnaryOp::Rsqrt, inv, inv, eps)
}

/// The moments from the sums a convolution's epilogue wrote to HBM at `at` (`[K; Σ; Σ²]`).
fn moments_from_sums(
    e: &mut Emitter,
    kernel: &Kernel,
    at: u64,
    rows: usize,
    c: usize,
    epsilon: f32,
    vmem: &mut Vmem,
) -> Result<Moments> {
    let oom = |e: &Emitter| e.vmem_error(kernel, "channel vectors");
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (shift, sx, sxx, mean, inv, tmp) = (vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?);
    let row = |r: usize| Tile::new(Space::Hbm, at + (r * c * 4) as u64, 1, c, DType::F32);
    let loads: Vec<u32> =
        [shift, sx, sxx].into_iter().enumerate().map(|(r, t)| e.push(Op::dma(1, row(r), t), &[])).collect();
    let last = e.push(Op::Barrier, &loads);
    let done = finish_moments(e, [sx, sxx, shift, mean, inv, tmp], rows, epsilon, last);
    Ok(Moments { mean, mean_shifted: sx, var: sxx, inv_std: inv, dy: None, done, free: vec![Vec::new(); BUFFERS] })
}

/// The forward's per-channel `scale = γσ⁻¹` and `shift = β − μ·scale` from the batch, and the
/// moving statistics' update (in place). Returns (scale, shift, ready).
pub(super) fn train_channels(
    e: &mut Emitter,
    kernel: &Kernel,
    node: NodeId,
    vmem: &mut Vmem,
) -> Result<(Tile, Tile, u32)> {
    let bn = attrs(e, node);
    let ins = e.graph.node(node).inputs.clone();
    let src = Source { x: e.place(ins[0]).tile, dy: None, mask: None };
    let (rows, c) = (src.x.rows as usize, src.x.cols as usize);
    let st = match e.extras.stats.get(&node) {
        // The convolution before summed its output: no pass over x here.
        Some(&at) => moments_from_sums(e, kernel, at, rows, c, bn.epsilon, vmem)?,
        None => {
            let rings = Rings::new(e, kernel, &src, 2, 0.9, vmem)?;
            moments(e, kernel, &src, &rings, bn.epsilon, vmem)?
        }
    };
    let oom = |e: &Emitter| e.vmem_error(kernel, "channel vectors");
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (gamma, beta, mm, mv, tmp) = (vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?);
    let lg = e.push(Op::dma(1, e.place(ins[1]).tile, gamma), &[]);
    let lb = e.push(Op::dma(1, e.place(ins[2]).tile, beta), &[]);
    let lm = e.push(Op::dma(1, e.place(ins[3]).tile, mm), &[]);
    let lv = e.push(Op::dma(1, e.place(ins[4]).tile, mv), &[]);
    let binary = |e: &mut Emitter, op, a, b, dst, deps: &[u32]| e.push(Op::Binary { op, a, b, dst }, deps);
    let unary = |e: &mut Emitter, op, src, dst, deps: &[u32]| e.push(Op::Unary { op, src, dst }, deps);
    // Moving statistics: m·moving + (1 − m)·batch (the variance unbiased).
    let m = bn.momentum;
    let bessel = if rows > 1 { rows as f32 / (rows - 1) as f32 } else { 1.0 };
    let a = unary(e, UnaryOp::Scale(m), mm, mm, &[lm]);
    let b = unary(e, UnaryOp::Scale(1.0 - m), st.mean, tmp, &[st.done]);
    let new_mean = binary(e, BinaryOp::Add, mm, tmp, mm, &[a, b]);
    let store_m = e.push(Op::dma(2, mm, e.place(ins[3]).tile), &[new_mean]);
    let a = unary(e, UnaryOp::Scale(m), mv, mv, &[lv]);
    let b = unary(e, UnaryOp::Scale((1.0 - m) * bessel), st.var, tmp, &[new_mean]);
    let new_var = binary(e, BinaryOp::Add, mv, tmp, mv, &[a, b]);
    let store_v = e.push(Op::dma(2, mv, e.place(ins[4]).tile), &[new_var]);
    // scale = γσ⁻¹; shift = β − μ·scale.
    let s = binary(e, BinaryOp::Mul, gamma, st.inv_std, gamma, &[lg, st.done]);
    let ms = binary(e, BinaryOp::Mul, st.mean, gamma, tmp, &[s, new_var]);
    let shift = binary(e, BinaryOp::Sub, beta, tmp, beta, &[ms, lb]);
    let mut ready = vec![shift, store_m, store_v];
    ready.extend(st.free.into_iter().flatten());
    Ok((gamma, beta, e.push(Op::Barrier, &ready)))
}

/// A standalone `BatchNormGradGamma` (when no input gradient is wanted): one pass of sums.
pub(super) fn grad_gamma(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let bn = attrs(e, node);
    let ins = e.graph.node(node).inputs.clone();
    let src = Source { x: e.place(ins[0]).tile, dy: Some(e.place(ins[3]).tile), mask: None };
    let out = e.place(kernel.output).tile;
    let mut vmem = e.vmem();
    let rings = Rings::new(e, kernel, &src, 4, 0.9, &mut vmem)?;
    let st = moments(e, kernel, &src, &rings, bn.epsilon, &mut vmem)?;
    let (sdy, sxdy) = st.dy.expect("the pass read dy");
    let a = e.push(Op::Binary { op: BinaryOp::Mul, a: sdy, b: st.mean_shifted, dst: sdy }, &[st.done]);
    let b = e.push(Op::Binary { op: BinaryOp::Sub, a: sxdy, b: sdy, dst: sxdy }, &[a]);
    let c = e.push(Op::Binary { op: BinaryOp::Mul, a: sxdy, b: st.inv_std, dst: sxdy }, &[b]);
    e.push(Op::dma(2, sxdy, out), &[c]);
    let (rows, ch) = (src.x.rows, src.x.cols);
    let range = first..e.program.len() + 1;
    let strategy = format!("one pass of sums, blocks of {} rows on the VPU", rings.rows);
    Ok(e.report(e.graph, kernel, strategy, format!("{rows} x {ch} to {ch}"), 0, range))
}

/// A batch norm's gradients: the sums (with `dy` masked on load), `dβ` and `dγ` from them,
/// then a second pass for `dx = a·dy + b·x + k`.
pub(super) fn grad(e: &mut Emitter, kernel: &Kernel, group: &BatchNormGrad) -> Result<KernelReport> {
    let first = e.program.len();
    let bn = attrs(e, group.input);
    let ins = e.graph.node(group.input).inputs.clone();
    let (dy, mask) = match group.mask {
        Some(m) => {
            let n = e.graph.node(m);
            let op = if matches!(n.op, GOp::Relu6Grad) { BinaryOp::MaskRelu6 } else { BinaryOp::MaskPositive };
            (e.place(n.inputs[1]).tile, Some((e.place(n.inputs[0]).tile, op)))
        }
        None => (e.place(ins[4]).tile, None),
    };
    let src = Source { x: e.place(ins[0]).tile, dy: Some(dy), mask };
    let out = e.place(kernel.output).tile;
    let (rows, c) = (src.x.rows as usize, src.x.cols as usize);
    let mut vmem = e.vmem();
    let rings = Rings::new(e, kernel, &src, 4, 0.9, &mut vmem)?;
    let st = moments(e, kernel, &src, &rings, bn.epsilon, &mut vmem)?;
    let (sdy, sxdy) = st.dy.expect("the pass read dy");
    let oom = |e: &Emitter| e.vmem_error(kernel, "channel vectors");
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (a, b, k, dgamma, t) = (vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?);
    let lg = e.push(Op::dma(1, e.place(ins[1]).tile, a), &[]);
    let binary = |e: &mut Emitter, op, x, y, dst, deps: &[u32]| e.push(Op::Binary { op, a: x, b: y, dst }, deps);
    let unary = |e: &mut Emitter, op, src, dst, deps: &[u32]| e.push(Op::Unary { op, src, dst }, deps);
    let mut stores = Vec::new();
    if let Some(beta) = group.beta {
        stores.push(e.push(Op::dma(2, sdy, e.place(beta).tile), &[st.done]));
    }
    // dγ = σ⁻¹(Σx'·dy − μ'Σdy).
    let t1 = binary(e, BinaryOp::Mul, st.mean_shifted, sdy, t, &[st.done]);
    let t2 = binary(e, BinaryOp::Sub, sxdy, t, dgamma, &[t1]);
    let dg = binary(e, BinaryOp::Mul, dgamma, st.inv_std, dgamma, &[t2]);
    if let Some(gamma) = group.gamma {
        stores.push(e.push(Op::dma(2, dgamma, e.place(gamma).tile), &[dg]));
    }
    // a = γσ⁻¹; b = −a·σ⁻¹·dγ/m; k = −a·Σdy/m.
    let inv_m = 1.0 / rows as f32;
    let ra = binary(e, BinaryOp::Mul, a, st.inv_std, a, &[lg, dg]);
    let t1 = binary(e, BinaryOp::Mul, a, st.inv_std, b, &[ra]);
    let t1 = binary(e, BinaryOp::Mul, b, dgamma, b, &[t1]);
    let rb = unary(e, UnaryOp::Scale(-inv_m), b, b, &[t1]);
    let t1 = binary(e, BinaryOp::Mul, a, sdy, k, &[rb]);
    let ready = unary(e, UnaryOp::Scale(-inv_m), k, k, &[t1]);

    // Second pass.
    let mut free = st.free;
    for (i, r0) in (0..rows).step_by(rings.rows).enumerate() {
        let rn = rings.rows.min(rows - r0);
        let (xt, dt, mut loaded) = rings.load(e, &src, i, r0, rn, &free[i % BUFFERS]);
        let dt = dt.expect("the source has dy");
        loaded.push(ready);
        let centred = binary(e, BinaryOp::Sub, xt, st.mean, xt, &loaded);
        let m = binary(e, BinaryOp::Mul, dt, a, dt, &[centred]);
        let ma = e.push(Op::MulAdd { a: xt, b, acc: dt }, &[m]);
        let add = binary(e, BinaryOp::Add, dt, k, dt, &[ma]);
        let store = e.push(Op::dma(2, dt, out.rows(r0, rn)), &[add]);
        free[i % BUFFERS] = vec![add, store];
    }
    let range = first..e.program.len() + 1;
    let strategy = format!(
        "two passes of {} rows on the VPU{}",
        rings.rows,
        if group.mask.is_some() { ", dy masked on load" } else { "" }
    );
    Ok(e.report(e.graph, kernel, strategy, format!("{rows} x {c}"), 0, range))
}

//! Batch norm with batch statistics (training), on the VPU.
//!
//! A pass over the rows of `x` (and, for the gradients, `dy`) accumulates per-channel sums:
//! `Σx`, `Σx²`, `Σdy`, `Σx·dy`. From them, with `m` rows, `μ = Σx/m`, `var = Σx²/m − μ²`
//! (clamped at 0), `σ⁻¹ = rsqrt(var + ε)`:
//! - forward: `y = x·(γσ⁻¹) + (β − μγσ⁻¹)`, and the moving statistics move towards `μ` and the
//!   unbiased `var·m/(m−1)` (written in place, as the reference's training run does);
//! - `dγ = σ⁻¹(Σx·dy − μΣdy)`;
//! - `dx = γσ⁻¹(dy − mean(dy) − x̂·mean(dy·x̂))`, as `a·dy + b·x + k` per channel, in a second
//!   pass over `x` and `dy`.
//!
//! The sums are f32 (the reference's are f64): they agree to f32 rounding of the sums.

use systolic_simulator::isa::*;

use super::backward::rows_per_block;
use super::emit::{BUFFERS, Emitter, Vmem};
use super::fusion::Kernel;
use super::{KernelReport, rows_cols};
use crate::error::Result;
use crate::graph::{BatchNorm, NodeId, Op as GOp};

/// Per-channel batch statistics in VMEM (`1 × C` tiles), ready after `done`.
pub(super) struct Moments {
    pub mean: Tile,
    pub var: Tile,
    pub inv_std: Tile,
    /// `Σdy` and `Σx·dy`, when the pass read `dy`.
    pub dy: Option<(Tile, Tile)>,
    pub done: u32,
    pub rows: usize,
}

/// One pass over `x` (and `dy`): the sums, then mean, variance and `σ⁻¹`.
pub(super) fn moments(
    e: &mut Emitter,
    kernel: &Kernel,
    x: Tile,
    dy: Option<Tile>,
    epsilon: f32,
    vmem: &mut Vmem,
) -> Result<Moments> {
    let (rows, c) = (x.rows as usize, x.cols as usize);
    let arrays = if dy.is_some() { 3 } else { 2 };
    let rb = rows_per_block(e, rows, c, arrays * BUFFERS);
    let oom = |e: &Emitter| e.vmem_error(kernel, "batch-statistics buffers");
    let mut ring = |e: &Emitter| vmem.ring(rb, c).ok_or_else(|| oom(e));
    let (xb, tb) = (ring(e)?, ring(e)?);
    let db = if dy.is_some() { ring(e)? } else { Vec::new() };
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (sx, sxx, part, tmp) = (vec(e)?, vec(e)?, vec(e)?, vec(e)?);
    let sums_dy = if dy.is_some() { Some((vec(e)?, vec(e)?)) } else { None };
    let mut last = e.push(Op::Fill { dst: sx, value: 0.0 }, &[]);
    for t in [Some(sxx), sums_dy.map(|s| s.0), sums_dy.map(|s| s.1)].into_iter().flatten() {
        last = e.push(Op::Fill { dst: t, value: 0.0 }, &[last]);
    }
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let p = b % BUFFERS;
        let sub = |t: Tile| Tile { rows: rn as u32, ..t };
        let (xt, tt) = (sub(xb[p]), sub(tb[p]));
        let lx = e.push(Op::dma(0, x.rows(r0, rn), xt), &free[p]);
        // Σ src over the block's rows into `acc`, after `after`.
        let sum_into = |e: &mut Emitter, src: Tile, acc: Tile, after: &[u32]| {
            let r = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src, dst: part }, after);
            e.push(Op::Binary { op: BinaryOp::Add, a: acc, b: part, dst: acc }, &[r])
        };
        last = sum_into(e, xt, sx, &[lx, last]);
        let sq = e.push(Op::Binary { op: BinaryOp::Mul, a: xt, b: xt, dst: tt }, &[last]);
        last = sum_into(e, tt, sxx, &[sq]);
        if let (Some(dy), Some((sdy, sxdy))) = (dy, sums_dy) {
            let dt = sub(db[p]);
            let ld = e.push(Op::dma(1, dy.rows(r0, rn), dt), &free[p]);
            last = sum_into(e, dt, sdy, &[ld, last]);
            let pr = e.push(Op::Binary { op: BinaryOp::Mul, a: xt, b: dt, dst: tt }, &[last]);
            last = sum_into(e, tt, sxdy, &[pr]);
        }
        free[p] = vec![last];
    }
    // μ, var = E[x²] − μ² (≥ 0), σ⁻¹.
    let inv_m = 1.0 / rows as f32;
    let unary = |e: &mut Emitter, op, src, dst, after: u32| e.push(Op::Unary { op, src, dst }, &[after]);
    let a = unary(e, UnaryOp::Scale(inv_m), sx, sx, last);
    let b = unary(e, UnaryOp::Scale(inv_m), sxx, sxx, a);
    let sq = e.push(Op::Binary { op: BinaryOp::Mul, a: sx, b: sx, dst: tmp }, &[b]);
    let d = e.push(Op::Binary { op: BinaryOp::Sub, a: sxx, b: tmp, dst: sxx }, &[sq]);
    let var = unary(e, UnaryOp::Relu, sxx, sxx, d);
    let eps = unary(e, UnaryOp::AddScalar(epsilon), sxx, part, var);
    let inv = unary(e, UnaryOp::Rsqrt, part, part, eps);
    Ok(Moments { mean: sx, var: sxx, inv_std: part, dy: sums_dy, done: inv, rows })
}

fn attrs(e: &Emitter, node: NodeId) -> BatchNorm {
    match &e.graph.node(node).op {
        GOp::BatchNorm(bn) | GOp::BatchNormGradInput(bn) | GOp::BatchNormGradGamma(bn) => bn.clone(),
        _ => unreachable!("a batch-norm node"),
    }
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
    let x = e.place(ins[0]).tile;
    let st = moments(e, kernel, x, None, bn.epsilon, vmem)?;
    let c = x.cols as usize;
    let oom = |e: &Emitter| e.vmem_error(kernel, "channel vectors");
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (gamma, beta, mm, mv) = (vec(e)?, vec(e)?, vec(e)?, vec(e)?);
    let lg = e.push(Op::dma(1, e.place(ins[1]).tile, gamma), &[]);
    let lb = e.push(Op::dma(1, e.place(ins[2]).tile, beta), &[]);
    let lm = e.push(Op::dma(1, e.place(ins[3]).tile, mm), &[]);
    let lv = e.push(Op::dma(1, e.place(ins[4]).tile, mv), &[]);
    let binary = |e: &mut Emitter, op, a, b, dst, deps: &[u32]| e.push(Op::Binary { op, a, b, dst }, deps);
    let unary = |e: &mut Emitter, op, src, dst, deps: &[u32]| e.push(Op::Unary { op, src, dst }, deps);
    // Moving statistics: m·moving + (1 − m)·batch (the variance unbiased).
    let m = bn.momentum;
    let bessel = if st.rows > 1 { st.rows as f32 / (st.rows - 1) as f32 } else { 1.0 };
    let a = unary(e, UnaryOp::Scale(m), mm, mm, &[lm]);
    let tmp = vec(e)?;
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
    let ready = e.push(Op::Barrier, &[shift, store_m, store_v]);
    Ok((gamma, beta, ready))
}

/// `BatchNormGradGamma`: `σ⁻¹(Σx·dy − μΣdy)`, one pass.
pub(super) fn grad_gamma(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let bn = attrs(e, node);
    let ins = e.graph.node(node).inputs.clone();
    let (x, dy, out) = (e.place(ins[0]).tile, e.place(ins[3]).tile, e.place(kernel.output).tile);
    let mut vmem = e.vmem();
    let st = moments(e, kernel, x, Some(dy), bn.epsilon, &mut vmem)?;
    let (sdy, sxdy) = st.dy.expect("the pass read dy");
    let a = e.push(Op::Binary { op: BinaryOp::Mul, a: sdy, b: st.mean, dst: sdy }, &[st.done]);
    let b = e.push(Op::Binary { op: BinaryOp::Sub, a: sxdy, b: sdy, dst: sxdy }, &[a]);
    let c = e.push(Op::Binary { op: BinaryOp::Mul, a: sxdy, b: st.inv_std, dst: sxdy }, &[b]);
    e.push(Op::dma(2, sxdy, out), &[c]);
    let (rows, ch) = rows_cols(&e.place(ins[0]).shape);
    let range = first..e.program.len() + 1;
    Ok(e.report(e.graph, kernel, "one pass of sums on the VPU".into(), format!("{rows} x {ch} to {ch}"), 0, range))
}

/// `BatchNormGradInput` with batch statistics: the sums, then `dx = a·dy + b·x + k`.
pub(super) fn grad_input(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let bn = attrs(e, node);
    let ins = e.graph.node(node).inputs.clone();
    let (x, gamma_hbm, dy) = (e.place(ins[0]).tile, e.place(ins[1]).tile, e.place(ins[4]).tile);
    let out = e.place(kernel.output).tile;
    let (rows, c) = (x.rows as usize, x.cols as usize);
    let mut vmem = e.vmem();
    let st = moments(e, kernel, x, Some(dy), bn.epsilon, &mut vmem)?;
    let (sdy, sxdy) = st.dy.expect("the pass read dy");
    let oom = |e: &Emitter| e.vmem_error(kernel, "channel vectors");
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (a, b, k) = (vec(e)?, vec(e)?, vec(e)?);
    let lg = e.push(Op::dma(1, gamma_hbm, a), &[]);
    let binary = |e: &mut Emitter, op, x, y, dst, deps: &[u32]| e.push(Op::Binary { op, a: x, b: y, dst }, deps);
    let unary = |e: &mut Emitter, op, src, dst, deps: &[u32]| e.push(Op::Unary { op, src, dst }, deps);
    let inv_m = 1.0 / rows as f32;
    // mean(dy) and mean(dy·x̂) = σ⁻¹(Σx·dy/m − μ·mean(dy)).
    let s1 = unary(e, UnaryOp::Scale(inv_m), sdy, sdy, &[st.done]);
    let s2 = unary(e, UnaryOp::Scale(inv_m), sxdy, sxdy, &[s1]);
    let t = binary(e, BinaryOp::Mul, st.mean, sdy, k, &[s2]);
    let t = binary(e, BinaryOp::Sub, sxdy, k, sxdy, &[t]);
    let mdx = binary(e, BinaryOp::Mul, sxdy, st.inv_std, sxdy, &[t]);
    // a = γσ⁻¹; b = −a·σ⁻¹·mean(dy·x̂); k = −a·mean(dy) − b·μ.
    let ra = binary(e, BinaryOp::Mul, a, st.inv_std, a, &[lg, mdx]);
    let t = binary(e, BinaryOp::Mul, a, st.inv_std, b, &[ra]);
    let t = binary(e, BinaryOp::Mul, b, sxdy, b, &[t]);
    let rb_ = unary(e, UnaryOp::Neg, b, b, &[t]);
    let t = binary(e, BinaryOp::Mul, a, sdy, k, &[rb_]);
    let t = binary(e, BinaryOp::Mul, b, st.mean, sdy, &[t]);
    let t = binary(e, BinaryOp::Add, k, sdy, k, &[t]);
    let ready = unary(e, UnaryOp::Neg, k, k, &[t]);

    // Second pass.
    let blk = rows_per_block(e, rows, c, 2 * BUFFERS);
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let mut ring = |e: &Emitter| vmem.ring(blk, c).ok_or_else(|| oom(e));
    let (xb, db) = (ring(e)?, ring(e)?);
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (i, r0) in (0..rows).step_by(blk).enumerate() {
        let rn = blk.min(rows - r0);
        let p = i % BUFFERS;
        let (xt, dt) = (Tile { rows: rn as u32, ..xb[p] }, Tile { rows: rn as u32, ..db[p] });
        let lx = e.push(Op::dma(0, x.rows(r0, rn), xt), &free[p]);
        let ld = e.push(Op::dma(1, dy.rows(r0, rn), dt), &free[p]);
        let m = binary(e, BinaryOp::Mul, dt, a, dt, &[ld, ready]);
        let ma = e.push(Op::MulAdd { a: xt, b, acc: dt }, &[m, lx]);
        let add = binary(e, BinaryOp::Add, dt, k, dt, &[ma]);
        let store = e.push(Op::dma(2, dt, out.rows(r0, rn)), &[add]);
        free[p] = vec![add, store];
    }
    let range = first..e.program.len() + 1;
    Ok(e.report(
        e.graph,
        kernel,
        format!("a pass of sums, then blocks of {blk} rows on the VPU"),
        format!("{rows} x {c}"),
        0,
        range,
    ))
}

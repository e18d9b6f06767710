//! Batch norm's gradients with batch statistics on the VPU: one pass of sums (with `dy` masked
//! on load), `dβ` and `dγ` from them, then a second pass for `dx`. The forward batch norm is an
//! epilogue step ([`crate::lower::blocks::epilogue`]) whose batch statistics come from
//! [`crate::lower::blocks::batch_stats`] or from the convolution before it.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{Graph, NodeId, Op};
use crate::lower::blocks::batch_stats::{Group, Rings, Source, attrs, moments};
use crate::lower::emitter::{BUFFERS, Emitted, Emitter};
use crate::lower::kernel::{BatchNormGrad, Kernel};
use crate::lower::options::Options;

/// HBM scratch for the sums a batch-norm node's kernel all-reduces over its group of
/// replicas (four `1 × C` f32 rows), if the options ask for groups.
pub(crate) fn group_scratch_bytes(graph: &Graph, node: NodeId, opts: &Options) -> u64 {
    let c = graph.node(node).shape.dims.last().copied().unwrap_or(1);
    if opts.batch_norm_group > 1 { 4 * c as u64 * 4 } else { 0 }
}

/// A standalone `BatchNormGradGamma` (when no input gradient is wanted): one pass of sums.
pub(crate) fn grad_gamma(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let bn = attrs(e, node);
    let ins = e.graph.node(node).inputs.clone();
    let src = Source { x: e.place(ins[0]).tile, dy: Some(e.place(ins[3]).tile), mask: None };
    let out = e.place(kernel.output).tile;
    let mut vmem = e.vmem();
    let rings = Rings::new(e, kernel, &src, 4, 0.9, &mut vmem)?;
    // Inputs: x, the moving mean and variance, dy. dγ is this replica's own.
    let group = Group::of(e, ins[1]);
    let st = moments(e, kernel, &src, &rings, bn.epsilon, group, false, &mut vmem)?;
    let (sdy, sxdy) = st.dy.expect("the pass read dy");
    let a = e.push(Operation::Binary { op: BinaryOp::Mul, a: sdy, b: st.mean_shifted, dst: sdy }, &[st.done]);
    let b = e.push(Operation::Binary { op: BinaryOp::Sub, a: sxdy, b: sdy, dst: sxdy }, &[a]);
    let c = e.push(Operation::Binary { op: BinaryOp::Mul, a: sxdy, b: st.inv_std, dst: sxdy }, &[b]);
    e.push(Operation::dma(2, sxdy, out), &[c]);
    let (rows, ch) = (src.x.rows, src.x.cols);
    let strategy = format!("one pass of sums, blocks of {} rows on the VPU", rings.rows);
    Ok(Emitted::new(strategy, format!("{rows} x {ch} to {ch}"), 0))
}

/// A batch norm's gradients: the sums (with `dy` masked on load), `dβ` and `dγ` from them,
/// then a second pass for `dx = a·dy + b·x + k`.
pub(crate) fn grad(e: &mut Emitter, kernel: &Kernel, fused: &BatchNormGrad) -> Result<Emitted> {
    let bn = attrs(e, fused.input);
    let ins = e.graph.node(fused.input).inputs.clone();
    let (dy, mask) = match fused.mask {
        Some(m) => {
            let n = e.graph.node(m);
            let op = if matches!(n.op, Op::Relu6Grad) { BinaryOp::MaskRelu6 } else { BinaryOp::MaskPositive };
            (e.place(n.inputs[1]).tile, Some((e.place(n.inputs[0]).tile, op)))
        }
        None => (e.place(ins[4]).tile, None),
    };
    let src = Source { x: e.place(ins[0]).tile, dy: Some(dy), mask };
    let out = e.place(kernel.output).tile;
    let (rows, c) = (src.x.rows as usize, src.x.cols as usize);
    let mut vmem = e.vmem();
    let rings = Rings::new(e, kernel, &src, 4, 0.9, &mut vmem)?;
    // Inputs: x, γ, the moving mean and variance, dy.
    let group = Group::of(e, ins[2]);
    let st = moments(e, kernel, &src, &rings, bn.epsilon, group, true, &mut vmem)?;
    let (sdy, sxdy) = st.dy.expect("the pass read dy");
    let (gsdy, gsxdy) = st.dy_group.expect("the pass read dy");
    let oom = |e: &Emitter| e.vmem_error(kernel, "channel vectors");
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (a, b, k, dgamma, t) = (vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?);
    let dgamma_group = if group.is_some() { vec(e)? } else { dgamma };
    let lg = e.push(Operation::dma(1, e.place(ins[1]).tile, a), &[]);
    let binary = |e: &mut Emitter, op, x, y, dst, deps: &[u32]| e.push(Operation::Binary { op, a: x, b: y, dst }, deps);
    let unary = |e: &mut Emitter, op, src, dst, deps: &[u32]| e.push(Operation::Unary { op, src, dst }, deps);
    let mut stores = Vec::new();
    if let Some(beta) = fused.beta {
        stores.push(e.push(Operation::dma(2, sdy, e.place(beta).tile), &[st.done]));
    }
    // dγ = σ⁻¹(Σx'·dy − μ'Σdy).
    let t1 = binary(e, BinaryOp::Mul, st.mean_shifted, sdy, t, &[st.done]);
    let t2 = binary(e, BinaryOp::Sub, sxdy, t, dgamma, &[t1]);
    let dg = binary(e, BinaryOp::Mul, dgamma, st.inv_std, dgamma, &[t2]);
    if let Some(gamma) = fused.gamma {
        stores.push(e.push(Operation::dma(2, dgamma, e.place(gamma).tile), &[dg]));
    }
    // Over a group, dx takes the group's dγ and Σdy (the statistics depend on every member's x).
    let dg = if group.is_some() {
        let t1 = binary(e, BinaryOp::Mul, st.mean_shifted, gsdy, t, &[dg]);
        let t2 = binary(e, BinaryOp::Sub, gsxdy, t, dgamma_group, &[t1]);
        binary(e, BinaryOp::Mul, dgamma_group, st.inv_std, dgamma_group, &[t2])
    } else {
        dg
    };
    // a = γσ⁻¹; b = −a·σ⁻¹·dγ/m; k = −a·Σdy/m.
    let inv_m = 1.0 / st.rows as f32;
    let ra = binary(e, BinaryOp::Mul, a, st.inv_std, a, &[lg, dg]);
    let t1 = binary(e, BinaryOp::Mul, a, st.inv_std, b, &[ra]);
    let t1 = binary(e, BinaryOp::Mul, b, dgamma_group, b, &[t1]);
    let rb = unary(e, UnaryOp::Scale(-inv_m), b, b, &[t1]);
    let t1 = binary(e, BinaryOp::Mul, a, gsdy, k, &[rb]);
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
        let ma = e.push(Operation::MulAdd { a: xt, b, acc: dt }, &[m]);
        let add = binary(e, BinaryOp::Add, dt, k, dt, &[ma]);
        let store = e.push(Operation::dma(2, dt, out.rows(r0, rn)), &[add]);
        free[i % BUFFERS] = vec![add, store];
    }
    let strategy = format!(
        "two passes of {} rows on the VPU{}",
        rings.rows,
        if fused.mask.is_some() { ", dy masked on load" } else { "" }
    );
    Ok(Emitted::new(strategy, format!("{rows} x {c}"), 0))
}

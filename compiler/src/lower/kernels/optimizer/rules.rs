//! The update rules on blocks of rows: each VPU sequence performs the f32 operations of
//! [`crate::optimizer::Optimizer::apply`] in the same order, so from the same gradient the
//! update gives the same bits.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::lower::blocks::rows::rows_per_block;
use crate::lower::emitter::{BUFFERS, Emitter, Vmem};
use crate::lower::kernel::Kernel;
use crate::lower::kernels::optimizer::scalars::{self, Factor};
use crate::optimizer::{Optimizer, Rule};

/// What one pass of updates works on: the parameter `p` (updated in place) and its gradient
/// `g` in HBM, its slots, the step's rate (for LARS, the scaled rate) and the weight decay.
pub(crate) struct Pass<'a> {
    pub p: Tile,
    pub g: Tile,
    pub slots: &'a [Tile],
    pub rate: Factor,
    pub decay: Option<f32>,
}

/// Adam's step size from the shared powers: `lr · sqrt(1 - b2^t) / (1 - b1^t)`.
fn adam_step(e: &mut Emitter, vmem: &mut Vmem, kernel: &Kernel, rate: Factor) -> Result<Factor> {
    let (s1, l1) = scalars::load(e, vmem, kernel, e.extras.state[0], 0)?;
    let (s2, l2) = scalars::load(e, vmem, kernel, e.extras.state[1], 1)?;
    let one_minus = |e: &mut Emitter, t: Tile, after: u32| {
        let n = e.push(Operation::Unary { op: UnaryOp::Scale(-1.0), src: t, dst: t }, &[after]);
        e.push(Operation::Unary { op: UnaryOp::AddScalar(1.0), src: t, dst: t }, &[n])
    };
    let a = one_minus(e, s2, l2);
    let r = e.push(Operation::Unary { op: UnaryOp::Sqrt, src: s2, dst: s2 }, &[a]);
    let lr = rate.scale(e, s2, s2, &[r]);
    let b = one_minus(e, s1, l1);
    Ok(Factor::Tile(s2, e.push(Operation::Binary { op: BinaryOp::Div, a: s2, b: s1, dst: s2 }, &[lr, b])))
}

/// The optimizer's update of `pass.p` (in place) from `pass.g` with its slots, block by
/// block, the first loads after `after`: the rows per block and the last instructions.
pub(crate) fn update_tiles(
    e: &mut Emitter,
    vmem: &mut Vmem,
    kernel: &Kernel,
    opt: &Optimizer,
    pass: &Pass,
    after: &[u32],
) -> Result<(usize, Vec<u32>)> {
    let (p, g, slots) = (pass.p, pass.g, pass.slots);
    let (rows, c) = (p.rows as usize, p.cols as usize);
    let arrays = 2 + slots.len() + 2;
    let rb = rows_per_block(e, rows, c, arrays * BUFFERS);
    let oom = |e: &Emitter| e.vmem_error(kernel, "parameter blocks");
    let mut ring = |e: &Emitter| vmem.ring(rb, c).ok_or_else(|| oom(e));
    let (pb, gb, tb) = (ring(e)?, ring(e)?, ring(e)?);
    let sb: Vec<Vec<Tile>> = (0..slots.len()).map(|_| ring(e)).collect::<Result<_>>()?;
    let step = match opt.rule {
        Rule::Adam { .. } => Some(adam_step(e, vmem, kernel, pass.rate)?),
        _ => None,
    };
    let lr = pass.rate;
    let mut free: Vec<Vec<u32>> = vec![after.to_vec(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let k = b % BUFFERS;
        let sub = |t: Tile| Tile { rows: rn as u32, ..t };
        let (pt, gt, tt) = (sub(pb[k]), sub(gb[k]), sub(tb[k]));
        let lp = e.push(Operation::dma(0, p.rows(r0, rn), pt), &free[k]);
        let lg = e.push(Operation::dma(1, g.rows(r0, rn), gt), &free[k]);
        let st: Vec<Tile> = sb.iter().map(|bufs| sub(bufs[k])).collect();
        let ls: Vec<u32> =
            slots.iter().zip(&st).map(|(s, &t)| e.push(Operation::dma(2, s.rows(r0, rn), t), &free[k])).collect();
        let unary = |e: &mut Emitter, op: UnaryOp, src: Tile, dst: Tile, deps: &[u32]| {
            e.push(Operation::Unary { op, src, dst }, deps)
        };
        let binary = |e: &mut Emitter, op: BinaryOp, a: Tile, b: Tile, dst: Tile, deps: &[u32]| {
            e.push(Operation::Binary { op, a, b, dst }, deps)
        };
        // Weight decay: g + wd · p.
        let lg = match pass.decay {
            Some(wd) => {
                let a = unary(e, UnaryOp::Scale(wd), pt, tt, &[lp]);
                binary(e, BinaryOp::Add, gt, tt, gt, &[a, lg])
            }
            None => lg,
        };
        let done = match opt.rule {
            // p -= lr · g.
            Rule::Sgd => {
                let s = lr.scale(e, gt, gt, &[lg]);
                binary(e, BinaryOp::Sub, pt, gt, pt, &[s, lp])
            }
            // v = v · momentum + g; p -= v · lr, or with Nesterov p -= g · lr + v · momentum · lr.
            Rule::Momentum { momentum, nesterov } => {
                let v = st[0];
                let gl = if nesterov { Some(lr.scale(e, gt, tt, &[lg])) } else { None };
                let a = unary(e, UnaryOp::Scale(momentum), v, v, &[ls[0]]);
                let b = binary(e, BinaryOp::Add, v, gt, v, &[a, lg]);
                match gl {
                    Some(gl) => {
                        let m = unary(e, UnaryOp::Scale(momentum), v, gt, &[b]);
                        let ml = lr.scale(e, gt, gt, &[m]);
                        let sum = binary(e, BinaryOp::Add, tt, gt, tt, &[gl, ml]);
                        binary(e, BinaryOp::Sub, pt, tt, pt, &[sum, lp])
                    }
                    None => {
                        let c = lr.scale(e, v, tt, &[b]);
                        binary(e, BinaryOp::Sub, pt, tt, pt, &[c, lp])
                    }
                }
            }
            // m = b1·m + (1-b1)·g; v = b2·v + (1-b2)·g²; p -= step · m / (sqrt(v) + eps).
            Rule::Adam { beta1, beta2, epsilon } => {
                let (m, v) = (st[0], st[1]);
                let a = unary(e, UnaryOp::Scale(beta1), m, m, &[ls[0]]);
                let b = unary(e, UnaryOp::Scale(1.0 - beta1), gt, tt, &[lg]);
                let m_new = binary(e, BinaryOp::Add, m, tt, m, &[a, b]);
                let c = unary(e, UnaryOp::Scale(beta2), v, v, &[ls[1]]);
                let sq = binary(e, BinaryOp::Mul, gt, gt, gt, &[lg, b]);
                let d = unary(e, UnaryOp::Scale(1.0 - beta2), gt, gt, &[sq]);
                let v_new = binary(e, BinaryOp::Add, v, gt, v, &[c, d]);
                let root = unary(e, UnaryOp::Sqrt, v, gt, &[v_new]);
                let den = unary(e, UnaryOp::AddScalar(epsilon), gt, gt, &[root]);
                let num = step.expect("computed above").scale(e, m, tt, &[m_new]);
                let q = binary(e, BinaryOp::Div, tt, gt, tt, &[num, den]);
                binary(e, BinaryOp::Sub, pt, tt, pt, &[q, lp])
            }
            // ms += (g² - ms) · (1 - decay); mom = mom · momentum + g · lr / sqrt(ms + eps);
            // p -= mom.
            Rule::RmsProp { decay, momentum, epsilon } => {
                let (ms, mom) = (st[0], st[1]);
                let sq = binary(e, BinaryOp::Mul, gt, gt, tt, &[lg]);
                let d = binary(e, BinaryOp::Sub, tt, ms, tt, &[sq, ls[0]]);
                let s = unary(e, UnaryOp::Scale(1.0 - decay), tt, tt, &[d]);
                let ms_new = binary(e, BinaryOp::Add, ms, tt, ms, &[s]);
                let a = unary(e, UnaryOp::Scale(momentum), mom, mom, &[ls[1]]);
                let gl = lr.scale(e, gt, gt, &[lg, sq]);
                let den = unary(e, UnaryOp::AddScalar(epsilon), ms, tt, &[ms_new]);
                let root = unary(e, UnaryOp::Sqrt, tt, tt, &[den]);
                let q = binary(e, BinaryOp::Div, gt, tt, gt, &[gl, root]);
                let mom_new = binary(e, BinaryOp::Add, mom, gt, mom, &[a, q]);
                binary(e, BinaryOp::Sub, pt, mom, pt, &[mom_new, lp])
            }
            // v = v · momentum + g · scaled; p -= v (the decay is in g, the ratio in `lr`).
            Rule::Lars { momentum, .. } => {
                let v = st[0];
                let u = lr.scale(e, gt, gt, &[lg]);
                let a = unary(e, UnaryOp::Scale(momentum), v, v, &[ls[0]]);
                let b = binary(e, BinaryOp::Add, v, gt, v, &[a, u]);
                binary(e, BinaryOp::Sub, pt, v, pt, &[b, lp])
            }
        };
        let mut stores = vec![e.push(Operation::dma(0, pt, p.rows(r0, rn)), &[done])];
        for (s, &t) in slots.iter().zip(&st) {
            stores.push(e.push(Operation::dma(1, t, s.rows(r0, rn)), &[done]));
        }
        stores.push(done);
        free[k] = stores;
    }
    Ok((rb, free.into_iter().flatten().collect()))
}

//! The optimizer's update of each parameter (in place, with its slots) and the advance of
//! the step's shared state.
//!
//! Every VPU sequence here performs the same f32 operations in the same order as
//! [`crate::optimizer`], so from the same gradient the update gives the same bits.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::NodeId;
use crate::lower::blocks::rows::rows_per_block;
use crate::lower::emitter::{BUFFERS, Emitted, Emitter};
use crate::lower::kernel::{Kernel, rows_cols};
use crate::lower::training::{ShardedUpdate, Update};
use crate::optimizer::Optimizer;

/// A tile of one `rows` × 1 column broadcasting the scalar at `t` (row stride 0).
fn scalar_column(t: Tile, rows: usize) -> Tile {
    Tile { rows: rows as u32, cols: 1, stride: 0, ..t }
}

/// One parameter's optimizer update, in place, block by block.
pub(crate) fn update(e: &mut Emitter, kernel: &Kernel, u: &Update) -> Result<Emitted> {
    let p = e.place(u.param).tile;
    let g = e.place(u.grad).tile;
    let slots: Vec<Tile> = u.slots.iter().map(|&s| e.place(s).tile).collect();
    let (rb, _) = update_tiles(e, kernel, p, g, &slots, &[])?;
    let opt = e.extras.optimizer.expect("updates come with an optimizer");
    Ok(Emitted::new(format!("{} on the VPU, blocks of {rb} rows", opt.name()), format!("{} x {}", p.rows, p.cols), 0))
}

/// One bucket of a sharded update: this replica's shard of the parameters taken from the
/// replicated tensors, updated in place from the reduce-scattered gradient shard (the
/// `collectives` pass issues that reduce-scatter, and this kernel waits for it) with the
/// slots' shards, then all-gathered into every replica's parameters.
pub(crate) fn sharded_update(e: &mut Emitter, kernel: &Kernel, s: &ShardedUpdate) -> Result<Emitted> {
    let replicas = e.opts.replicas as u32;
    let params: Vec<Tile> = s.params.iter().map(|&p| e.place(p).tile).collect();
    let (p, g) = (e.place(s.param_shard).tile, e.place(s.grad_shard).tile);
    let slots: Vec<Tile> = s.slots.iter().map(|&t| e.place(t).tile).collect();
    let collective = |kind| Operation::Collective {
        kind,
        reduction: Reduction::Sum,
        tiles: params.clone(),
        shard: Some(p),
        replicas,
    };
    let take = e.push(collective(CollectiveKind::Shard), &[]);
    let (rb, stores) = update_tiles(e, kernel, p, g, &slots, &[take])?;
    e.push(collective(CollectiveKind::AllGather), &stores);
    let opt = e.extras.optimizer.expect("updates come with an optimizer");
    let elements: u64 = params.iter().map(|t| t.elements()).sum();
    Ok(Emitted::new(
        format!("{} on the VPU over a shard of {} (blocks of {rb} rows), all-gathered", opt.name(), p.rows * p.cols),
        format!("{elements} elements over {replicas} replicas"),
        0,
    ))
}

/// The optimizer's update of `p` (in place) from `g` with `slots`, block by block, the first
/// loads after `after`: the rows per block and the last instructions.
fn update_tiles(
    e: &mut Emitter,
    kernel: &Kernel,
    p: Tile,
    g: Tile,
    slots: &[Tile],
    after: &[u32],
) -> Result<(usize, Vec<u32>)> {
    let opt = e.extras.optimizer.expect("updates come with an optimizer");
    let (rows, c) = (p.rows as usize, p.cols as usize);
    let arrays = 2 + slots.len() + 2;
    let rb = rows_per_block(e, rows, c, arrays * BUFFERS);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "parameter blocks");
    let mut ring = |e: &Emitter| vmem.ring(rb, c).ok_or_else(|| oom(e));
    let (pb, gb, tb) = (ring(e)?, ring(e)?, ring(e)?);
    let sb: Vec<Vec<Tile>> = (0..slots.len()).map(|_| ring(e)).collect::<Result<_>>()?;
    // Adam's step size from the shared powers: lr · sqrt(1 - b2^t) / (1 - b1^t).
    let step = match opt {
        Optimizer::Adam { learning_rate, .. } => {
            let (b1p, b2p) = (e.place(e.extras.state[0]).tile, e.place(e.extras.state[1]).tile);
            let (s1, s2) = (vmem.alloc(1, 1).ok_or_else(|| oom(e))?, vmem.alloc(1, 1).ok_or_else(|| oom(e))?);
            let l1 = e.push(Operation::dma(0, b1p, s1), &[]);
            let l2 = e.push(Operation::dma(1, b2p, s2), &[]);
            let one_minus = |e: &mut Emitter, t: Tile, after: u32| {
                let n = e.push(Operation::Unary { op: UnaryOp::Scale(-1.0), src: t, dst: t }, &[after]);
                e.push(Operation::Unary { op: UnaryOp::AddScalar(1.0), src: t, dst: t }, &[n])
            };
            let a = one_minus(e, s2, l2);
            let r = e.push(Operation::Unary { op: UnaryOp::Sqrt, src: s2, dst: s2 }, &[a]);
            let lr = e.push(Operation::Unary { op: UnaryOp::Scale(learning_rate), src: s2, dst: s2 }, &[r]);
            let b = one_minus(e, s1, l1);
            Some((s2, e.push(Operation::Binary { op: BinaryOp::Div, a: s2, b: s1, dst: s2 }, &[lr, b])))
        }
        Optimizer::Sgd { .. } | Optimizer::Momentum { .. } => None,
    };
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
        let done = match opt {
            // p -= lr · g.
            Optimizer::Sgd { learning_rate } => {
                let s = unary(e, UnaryOp::Scale(-learning_rate), gt, gt, &[lg]);
                binary(e, BinaryOp::Add, pt, gt, pt, &[s, lp])
            }
            // v = momentum · v + g; p -= lr · v.
            Optimizer::Momentum { learning_rate, momentum } => {
                let v = st[0];
                let a = unary(e, UnaryOp::Scale(momentum), v, v, &[ls[0]]);
                let b = binary(e, BinaryOp::Add, v, gt, v, &[a, lg]);
                let c = unary(e, UnaryOp::Scale(-learning_rate), v, tt, &[b]);
                binary(e, BinaryOp::Add, pt, tt, pt, &[c, lp])
            }
            // m = b1·m + (1-b1)·g; v = b2·v + (1-b2)·g²; p -= step · m / (sqrt(v) + eps).
            Optimizer::Adam { beta1, beta2, epsilon, .. } => {
                let (m, v) = (st[0], st[1]);
                let (step_tile, step_ready) = step.expect("computed above");
                let a = unary(e, UnaryOp::Scale(beta1), m, m, &[ls[0]]);
                let b = unary(e, UnaryOp::Scale(1.0 - beta1), gt, tt, &[lg]);
                let m_new = binary(e, BinaryOp::Add, m, tt, m, &[a, b]);
                let c = unary(e, UnaryOp::Scale(beta2), v, v, &[ls[1]]);
                let sq = binary(e, BinaryOp::Mul, gt, gt, gt, &[lg, b]);
                let d = unary(e, UnaryOp::Scale(1.0 - beta2), gt, gt, &[sq]);
                let v_new = binary(e, BinaryOp::Add, v, gt, v, &[c, d]);
                let root = unary(e, UnaryOp::Sqrt, v, gt, &[v_new]);
                let den = unary(e, UnaryOp::AddScalar(epsilon), gt, gt, &[root]);
                let num = binary(e, BinaryOp::Mul, m, scalar_column(step_tile, rn), tt, &[m_new, step_ready]);
                let q = binary(e, BinaryOp::Div, tt, gt, tt, &[num, den]);
                binary(e, BinaryOp::Sub, pt, tt, pt, &[q, lp])
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

/// Advances the optimizer's shared state once per step (Adam: `beta^t -> beta^(t+1)`).
pub(crate) fn advance(e: &mut Emitter, kernel: &Kernel, state: &[NodeId]) -> Result<Emitted> {
    let factors: Vec<f32> = match e.extras.optimizer {
        Some(Optimizer::Adam { beta1, beta2, .. }) => vec![beta1, beta2],
        Some(Optimizer::Sgd { .. } | Optimizer::Momentum { .. }) | None => Vec::new(),
    };
    let mut vmem = e.vmem();
    for (i, &s) in state.iter().enumerate() {
        // Adam's powers times beta; the dropout step plus one.
        let op = if Some(s) == e.extras.dropout_step { UnaryOp::AddScalar(1.0) } else { UnaryOp::Scale(factors[i]) };
        let hbm = e.place(s).tile;
        let (r, c) = rows_cols(&e.place(s).shape);
        let t = vmem.alloc(r, c).ok_or_else(|| e.vmem_error(kernel, "state"))?;
        let l = e.push(Operation::dma(0, hbm, t), &[]);
        let m = e.push(Operation::Unary { op, src: t, dst: t }, &[l]);
        e.push(Operation::dma(1, t, hbm), &[m]);
    }
    Ok(Emitted::new("on the VPU", format!("{} values", state.len()), 0))
}

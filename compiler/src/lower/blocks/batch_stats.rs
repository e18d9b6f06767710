//! Batch statistics on the VPU, for batch norm in training: the forward's scale and shift and the
//! moving statistics' update (an epilogue step), and the sums its gradients start from
//! ([`crate::lower::kernels::batch_norm`]).
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
//! [`crate::lower::kernel::BatchNormGrad`]).
//!
//! Over a group of replicas ([`Group`]), every replica shifts by the moving mean (the group's
//! replicas hold the same one, so their shifted sums add up), the sums are all-reduced over
//! the group before the moments, and `m` counts the group's rows. The gradients `dβ` and `dγ`
//! stay each replica's own (the gradient all-reduce combines them); `dx` uses the group's
//! `Σdy` and `Σx'·dy`, since the group's statistics depend on every member's `x`. (The moving
//! mean starts at zero, so the shift guards against cancellation only once it has moved
//! towards the batches' means.) Sums are f32 (the reference's are f64): they agree to
//! f32 rounding of the sums.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{BatchNorm, NodeId, Op};
use crate::lower::emitter::{BUFFERS, Emitter, Vmem};
use crate::lower::kernel::Kernel;

/// Batch statistics over `replicas` consecutive replicas: the shift every member uses (the
/// moving mean, `1 × C` f32 in HBM) and the HBM scratch (`4 × C` f32) the sums are
/// all-reduced in.
#[derive(Clone, Copy)]
pub(crate) struct Group {
    pub(crate) replicas: u32,
    pub(crate) shift: Tile,
    pub(crate) scratch: u64,
}

impl Group {
    /// The group of a batch norm whose moving mean is `moving_mean`, if the options ask for
    /// one (the sums go in the kernel's scratch).
    pub(crate) fn of(e: &Emitter, moving_mean: NodeId) -> Option<Group> {
        let replicas = e.opts.batch_norm_group;
        (replicas > 1).then(|| Group {
            replicas: replicas as u32,
            shift: e.place(moving_mean).tile,
            scratch: e.scratch.expect("kernels with batch statistics over a group have scratch for the sums"),
        })
    }

    /// Sums the `rows × C` f32 sums at `at` in HBM over the group, after `after`.
    fn all_reduce(&self, e: &mut Emitter, at: u64, rows: usize, c: usize, after: &[u32]) -> u32 {
        let tile = Tile::new(Space::Hbm, at, rows, c, DType::F32);
        let op = Operation::Collective {
            kind: CollectiveKind::AllReduce,
            reduction: Reduction::Sum,
            tiles: vec![tile],
            shard: None,
            replicas: self.replicas,
        };
        e.push(op, after)
    }

    /// Replaces the `1 × C` sums in VMEM by the group's (each `local` also copied to its
    /// `group` tile, where one is given); returns when they are loaded.
    fn reduce_vectors(&self, e: &mut Emitter, sums: &[(Tile, Tile)], after: u32) -> u32 {
        let c = sums[0].0.cols as usize;
        let row = |r: usize| Tile::new(Space::Hbm, self.scratch + (r * c * 4) as u64, 1, c, DType::F32);
        let stores: Vec<u32> =
            sums.iter().enumerate().map(|(r, &(v, _))| e.push(Operation::dma(2, v, row(r)), &[after])).collect();
        let reduced = self.all_reduce(e, self.scratch, sums.len(), c, &stores);
        let loads: Vec<u32> =
            sums.iter().enumerate().map(|(r, &(_, g))| e.push(Operation::dma(1, row(r), g), &[reduced])).collect();
        e.push(Operation::Barrier, &loads)
    }
}

/// What a pass reads: `x`, and `dy` (masked by the activation `y` on load).
#[derive(Clone, Copy)]
pub(crate) struct Source {
    pub(crate) x: Tile,
    pub(crate) dy: Option<Tile>,
    pub(crate) mask: Option<(Tile, BinaryOp)>,
}

/// Block buffers for a pass over a source: `BUFFERS` of each, `rows` rows.
pub(crate) struct Rings {
    pub(crate) rows: usize,
    pub(crate) x: Vec<Tile>,
    pub(crate) dy: Vec<Tile>,
    pub(crate) y: Vec<Tile>,
}

impl Rings {
    /// Rings for `src` plus `accumulators` block-shaped arrays, in `share` of what VMEM has
    /// left (room kept for a few channel vectors).
    pub(crate) fn new(
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
    pub(crate) fn load(
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
        let mut ready = vec![e.push(Operation::dma(0, src.x.rows(r0, rn), xt), free)];
        let dt = src.dy.map(|dy| {
            let dt = sub(self.dy[p]);
            let ld = e.push(Operation::dma(1, dy.rows(r0, rn), dt), free);
            match src.mask {
                Some((y, op)) => {
                    let yt = sub(self.y[p]);
                    let ly = e.push(Operation::dma(3, y.rows(r0, rn), yt), free);
                    ready.push(e.push(Operation::Binary { op, a: yt, b: dt, dst: dt }, &[ld, ly]));
                }
                None => ready.push(ld),
            }
            dt
        });
        (xt, dt, ready)
    }
}

/// Per-channel batch statistics in VMEM (`1 × C` tiles), ready after `done`.
pub(crate) struct Moments {
    pub(crate) mean: Tile,
    /// `μ' = μ − K`, the mean of the shifted values the sums are of.
    pub(crate) mean_shifted: Tile,
    pub(crate) var: Tile,
    pub(crate) inv_std: Tile,
    /// `Σdy` and `Σx'·dy`, when the pass read `dy`: this replica's.
    pub(crate) dy: Option<(Tile, Tile)>,
    /// The same over the group (this replica's, without one).
    pub(crate) dy_group: Option<(Tile, Tile)>,
    /// The rows the statistics are over (the group's).
    pub(crate) rows: usize,
    pub(crate) done: u32,
    /// Per ring slot: what the pass's last use of it was.
    pub(crate) free: Vec<Vec<u32>>,
}

/// One pass over `src`: the sums (over `group`, with its `dy` sums where `group_dy`), then
/// mean, variance and `σ⁻¹`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn moments(
    e: &mut Emitter,
    kernel: &Kernel,
    src: &Source,
    rings: &Rings,
    epsilon: f32,
    group: Option<Group>,
    group_dy: bool,
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
    let shift_from = group.map_or(src.x.rows(0, 1), |g| g.shift);
    let shift_loaded = e.push(Operation::dma(1, shift_from, shift), &[]);
    let mut last = e.push(Operation::Fill { dst: ax, value: 0.0 }, &[]);
    for &t in &accs[1..] {
        last = e.push(Operation::Fill { dst: t, value: 0.0 }, &[last]);
    }
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let (xt, dt, mut ready) = rings.load(e, src, b, r0, rn, &free[b % BUFFERS]);
        ready.extend([last, shift_loaded]);
        let rows_of = |t: Tile| t.rows(0, rn);
        last = e.push(Operation::Binary { op: BinaryOp::Sub, a: xt, b: shift, dst: xt }, &ready);
        last = e.push(Operation::Binary { op: BinaryOp::Add, a: rows_of(ax), b: xt, dst: rows_of(ax) }, &[last]);
        last = e.push(Operation::MulAdd { a: xt, b: xt, acc: rows_of(axx) }, &[last]);
        if let (Some(dt), Some((ady, axdy))) = (dt, acc_dy) {
            last = e.push(Operation::Binary { op: BinaryOp::Add, a: rows_of(ady), b: dt, dst: rows_of(ady) }, &[last]);
            last = e.push(Operation::MulAdd { a: xt, b: dt, acc: rows_of(axdy) }, &[last]);
        }
        free[b % BUFFERS] = vec![last];
    }
    let sums = [Some(sx), Some(sxx), sums_dy.map(|s| s.0), sums_dy.map(|s| s.1)].into_iter().flatten();
    for (&acc, sum) in accs.iter().zip(sums) {
        last = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: acc, dst: sum }, &[last]);
    }
    let (mut dy_group, mut m) = (sums_dy, rows);
    if let Some(g) = group {
        let mut pairs = vec![(sx, sx), (sxx, sxx)];
        if let (Some((sdy, sxdy)), true) = (sums_dy, group_dy) {
            let (gdy, gxdy) = (vec(e)?, vec(e)?);
            pairs.extend([(sdy, gdy), (sxdy, gxdy)]);
            dy_group = Some((gdy, gxdy));
        }
        last = g.reduce_vectors(e, &pairs, last);
        m = rows * g.replicas as usize;
    }
    let done = finish_moments(e, [sx, sxx, shift, mean, inv, tmp], m, epsilon, last);
    Ok(Moments { mean, mean_shifted: sx, var: sxx, inv_std: inv, dy: sums_dy, dy_group, rows: m, done, free })
}

pub(crate) fn attrs(e: &Emitter, node: NodeId) -> BatchNorm {
    let (Op::BatchNorm(bn) | Op::BatchNormGradInput(bn) | Op::BatchNormGradGamma(bn)) = &e.graph.node(node).op else {
        unreachable!("a batch-norm node")
    };
    bn.clone()
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
    let unary = |e: &mut Emitter, op, src, dst, after: u32| e.push(Operation::Unary { op, src, dst }, &[after]);
    let a = unary(e, UnaryOp::Scale(inv_m), sx, sx, last);
    let a = e.push(Operation::Binary { op: BinaryOp::Add, a: sx, b: shift, dst: mean }, &[a]);
    let b = unary(e, UnaryOp::Scale(inv_m), sxx, sxx, a);
    let sq = e.push(Operation::Binary { op: BinaryOp::Mul, a: sx, b: sx, dst: tmp }, &[b]);
    let d = e.push(Operation::Binary { op: BinaryOp::Sub, a: sxx, b: tmp, dst: sxx }, &[sq]);
    let var = unary(e, UnaryOp::Relu, sxx, sxx, d);
    let eps = unary(e, UnaryOp::AddScalar(epsilon), sxx, inv, var);
    unary(e, UnaryOp::Rsqrt, inv, inv, eps)
}

/// The moments from the sums a convolution's epilogue wrote to HBM at `at` (`[K; Σ; Σ²]`),
/// over `group` (whose shift the convolution used: see `ChannelSums`).
#[allow(clippy::too_many_arguments)]
fn moments_from_sums(
    e: &mut Emitter,
    kernel: &Kernel,
    at: u64,
    rows: usize,
    c: usize,
    epsilon: f32,
    group: Option<Group>,
    vmem: &mut Vmem,
) -> Result<Moments> {
    let oom = |e: &Emitter| e.vmem_error(kernel, "channel vectors");
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (shift, sx, sxx, mean, inv, tmp) = (vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?);
    let row = |r: usize| Tile::new(Space::Hbm, at + (r * c * 4) as u64, 1, c, DType::F32);
    // Over a group: Σ and Σ² (rows 1 and 2) summed in place first.
    let reduced: Vec<u32> = group.map(|g| g.all_reduce(e, at + (c * 4) as u64, 2, c, &[])).into_iter().collect();
    let loads: Vec<u32> =
        [shift, sx, sxx].into_iter().enumerate().map(|(r, t)| e.push(Operation::dma(1, row(r), t), &reduced)).collect();
    let last = e.push(Operation::Barrier, &loads);
    let m = rows * group.map_or(1, |g| g.replicas as usize);
    let done = finish_moments(e, [sx, sxx, shift, mean, inv, tmp], m, epsilon, last);
    let free = vec![Vec::new(); BUFFERS];
    Ok(Moments { mean, mean_shifted: sx, var: sxx, inv_std: inv, dy: None, dy_group: None, rows: m, done, free })
}

/// The forward's per-channel `scale = γσ⁻¹` and `shift = β − μ·scale` from the batch, and the
/// moving statistics' update (in place). Returns (scale, shift, ready).
pub(crate) fn train_channels(
    e: &mut Emitter,
    kernel: &Kernel,
    node: NodeId,
    vmem: &mut Vmem,
) -> Result<(Tile, Tile, u32)> {
    let bn = attrs(e, node);
    let ins = e.graph.node(node).inputs.clone();
    let src = Source { x: e.place(ins[0]).tile, dy: None, mask: None };
    let (rows, c) = (src.x.rows as usize, src.x.cols as usize);
    let group = Group::of(e, ins[3]);
    let st = match e.extras.stats.get(&node) {
        // The convolution before summed its output: no pass over x here.
        Some(&at) => moments_from_sums(e, kernel, at, rows, c, bn.epsilon, group, vmem)?,
        None => {
            let rings = Rings::new(e, kernel, &src, 2, 0.9, vmem)?;
            moments(e, kernel, &src, &rings, bn.epsilon, group, false, vmem)?
        }
    };
    let rows = st.rows;
    let oom = |e: &Emitter| e.vmem_error(kernel, "channel vectors");
    let mut vec = |e: &Emitter| vmem.alloc(1, c).ok_or_else(|| oom(e));
    let (gamma, beta, mm, mv, tmp) = (vec(e)?, vec(e)?, vec(e)?, vec(e)?, vec(e)?);
    let lg = e.push(Operation::dma(1, e.place(ins[1]).tile, gamma), &[]);
    let lb = e.push(Operation::dma(1, e.place(ins[2]).tile, beta), &[]);
    let lm = e.push(Operation::dma(1, e.place(ins[3]).tile, mm), &[]);
    let lv = e.push(Operation::dma(1, e.place(ins[4]).tile, mv), &[]);
    let binary = |e: &mut Emitter, op, a, b, dst, deps: &[u32]| e.push(Operation::Binary { op, a, b, dst }, deps);
    let unary = |e: &mut Emitter, op, src, dst, deps: &[u32]| e.push(Operation::Unary { op, src, dst }, deps);
    // Moving statistics: m·moving + (1 − m)·batch (the variance unbiased).
    let m = bn.momentum;
    let bessel = if rows > 1 { rows as f32 / (rows - 1) as f32 } else { 1.0 };
    let a = unary(e, UnaryOp::Scale(m), mm, mm, &[lm]);
    let b = unary(e, UnaryOp::Scale(1.0 - m), st.mean, tmp, &[st.done]);
    let new_mean = binary(e, BinaryOp::Add, mm, tmp, mm, &[a, b]);
    let store_m = e.push(Operation::dma(2, mm, e.place(ins[3]).tile), &[new_mean]);
    let a = unary(e, UnaryOp::Scale(m), mv, mv, &[lv]);
    let b = unary(e, UnaryOp::Scale((1.0 - m) * bessel), st.var, tmp, &[new_mean]);
    let new_var = binary(e, BinaryOp::Add, mv, tmp, mv, &[a, b]);
    let store_v = e.push(Operation::dma(2, mv, e.place(ins[4]).tile), &[new_var]);
    // scale = γσ⁻¹; shift = β − μ·scale.
    let s = binary(e, BinaryOp::Mul, gamma, st.inv_std, gamma, &[lg, st.done]);
    let ms = binary(e, BinaryOp::Mul, st.mean, gamma, tmp, &[s, new_var]);
    let shift = binary(e, BinaryOp::Sub, beta, tmp, beta, &[ms, lb]);
    let mut ready = vec![shift, store_m, store_v];
    ready.extend(st.free.into_iter().flatten());
    Ok((gamma, beta, e.push(Operation::Barrier, &ready)))
}

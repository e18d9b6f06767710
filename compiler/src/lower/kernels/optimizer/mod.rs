//! The optimizer's update of each parameter (in place, with its slots) and the advance of
//! the step's shared state.
//!
//! Every VPU sequence here performs the same f32 operations in the same order as
//! [`crate::optimizer`], so from the same gradient the update gives the same bits. The
//! per-step scalars (a scheduled rate, Adam's step size, LARS's trust ratio) are computed by
//! each update kernel from the shared state: a few 1×1 VPU instructions, and every kernel
//! stays on its own.

mod lars;
mod rules;
mod scalars;

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::NodeId;
use crate::lower::emitter::{Emitted, Emitter};
use crate::lower::kernel::{Kernel, rows_cols};
use crate::lower::kernels::optimizer::rules::{Pass, update_tiles};
use crate::lower::training::{ShardedUpdate, Update};
use crate::optimizer::{Optimizer, Rule};

fn optimizer<'a>(e: &Emitter<'a>) -> &'a Optimizer {
    let extras = e.extras;
    extras.optimizer.as_ref().expect("updates come with an optimizer")
}

/// One parameter's optimizer update, in place, block by block (LARS: after a pass for the
/// norms).
pub(crate) fn update(e: &mut Emitter, kernel: &Kernel, u: &Update) -> Result<Emitted> {
    let opt = optimizer(e);
    let p = e.place(u.param).tile;
    let g = e.place(u.grad).tile;
    let slots: Vec<Tile> = u.slots.iter().map(|&s| e.place(s).tile).collect();
    let name = e.graph.node(u.param).name.clone();
    let mut vmem = e.vmem();
    let mut rate = scalars::rate(e, &mut vmem, kernel, opt)?;
    let mut how = "";
    if matches!(opt.rule, Rule::Lars { .. }) && Optimizer::decays(&name) {
        rate = lars::scaled_rate(e, &mut vmem, kernel, opt, (p, g), rate)?;
        how = ", after a pass for the norms";
    }
    let pass = Pass { p, g, slots: &slots, rate, decay: opt.decay_of(&name) };
    let (rb, _) = update_tiles(e, &mut vmem, kernel, opt, &pass, &[])?;
    Ok(Emitted::new(
        format!("{} on the VPU, blocks of {rb} rows{how}", opt.name()),
        format!("{} x {}", p.rows, p.cols),
        0,
    ))
}

/// One bucket of a sharded update: this replica's shard of the parameters taken from the
/// replicated tensors, updated in place from the reduce-scattered gradient shard (the
/// `collectives` pass issues that reduce-scatter, and this kernel waits for it) with the
/// slots' shards, then all-gathered into every replica's parameters. A shard mixes
/// parameters, so neither LARS nor weight decay runs here (`compile` refuses both).
pub(crate) fn sharded_update(e: &mut Emitter, kernel: &Kernel, s: &ShardedUpdate) -> Result<Emitted> {
    let opt = optimizer(e);
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
    let mut vmem = e.vmem();
    let rate = scalars::rate(e, &mut vmem, kernel, opt)?;
    let pass = Pass { p, g, slots: &slots, rate, decay: None };
    let (rb, stores) = update_tiles(e, &mut vmem, kernel, opt, &pass, &[take])?;
    e.push(collective(CollectiveKind::AllGather), &stores);
    let elements: u64 = params.iter().map(|t| t.elements()).sum();
    Ok(Emitted::new(
        format!("{} on the VPU over a shard of {} (blocks of {rb} rows), all-gathered", opt.name(), p.rows * p.cols),
        format!("{elements} elements over {replicas} replicas"),
        0,
    ))
}

/// Advances the shared state once per step (Adam: `beta^t -> beta^(t+1)`; the global step
/// and the dropout step: plus one).
pub(crate) fn advance(e: &mut Emitter, kernel: &Kernel, state: &[NodeId]) -> Result<Emitted> {
    let ops = e.extras.optimizer.as_ref().map(Optimizer::advances).unwrap_or_default();
    let mut vmem = e.vmem();
    for (i, &s) in state.iter().enumerate() {
        let op = if Some(s) == e.extras.dropout_step { UnaryOp::AddScalar(1.0) } else { ops[i] };
        let hbm = e.place(s).tile;
        let (r, c) = rows_cols(&e.place(s).shape);
        let t = vmem.alloc(r, c).ok_or_else(|| e.vmem_error(kernel, "state"))?;
        let l = e.push(Operation::dma(0, hbm, t), &[]);
        let m = e.push(Operation::Unary { op, src: t, dst: t }, &[l]);
        e.push(Operation::dma(1, t, hbm), &[m]);
    }
    Ok(Emitted::new("on the VPU", format!("{} values", state.len()), 0))
}

//! Epilogues: the elementwise steps a kernel applies to a block while it is still in VMEM
//! (bias, batch norm, residual add or product, ReLU masks, ReLU / ReLU6), and the per-channel
//! vectors they read, prepared once per kernel.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{NodeId, Op};
use crate::lower::blocks::batch_stats;
use crate::lower::emitter::{Emitter, Vmem};
use crate::lower::kernel::{Epilogue, Kernel};

/// Per-channel vectors an epilogue needs, prepared in VMEM once per kernel.
pub(crate) struct Channels {
    bias: Option<Tile>,
    /// Batch norm as `x · scale + shift`.
    bn: Option<(Tile, Tile)>,
    ready: Option<u32>,
}

/// Loads biases and folds batch-norm statistics into scale and shift (`1 × C` tiles).
pub(crate) fn prepare_channels(e: &mut Emitter, kernel: &Kernel, c: usize, vmem: &mut Vmem) -> Result<Channels> {
    let mut ch = Channels { bias: None, bn: None, ready: None };
    let mut last = Vec::new();
    for step in &kernel.epilogue {
        match *step {
            Epilogue::Bias(p) => {
                let t = vmem.alloc(1, c).ok_or_else(|| e.vmem_error(kernel, "channel vectors"))?;
                last.push(e.push(Operation::dma(0, e.place(p).tile, t), &[]));
                ch.bias = Some(t);
            }
            Epilogue::BatchNormTrain(bn) => {
                let (scale, shift, ready) = batch_stats::train_channels(e, kernel, bn, vmem)?;
                last.push(ready);
                ch.bn = Some((scale, shift));
            }
            Epilogue::BatchNorm(bn) => {
                let node = e.graph.node(bn);
                let Op::BatchNorm(attrs) = &node.op else { unreachable!("a BatchNorm epilogue step") };
                let mut load = |e: &mut Emitter, p: NodeId| -> Result<(Tile, u32)> {
                    let t = vmem.alloc(1, c).ok_or_else(|| e.vmem_error(kernel, "channel vectors"))?;
                    Ok((t, e.push(Operation::dma(1, e.place(p).tile, t), &[])))
                };
                let (gamma, d0) = load(e, node.inputs[1])?;
                let (beta, d1) = load(e, node.inputs[2])?;
                let (mean, d2) = load(e, node.inputs[3])?;
                let (var, d3) = load(e, node.inputs[4])?;
                // scale = gamma / sqrt(var + eps); shift = beta - mean * scale.
                let a = e.push(Operation::Unary { op: UnaryOp::AddScalar(attrs.epsilon), src: var, dst: var }, &[d3]);
                let b = e.push(Operation::Unary { op: UnaryOp::Rsqrt, src: var, dst: var }, &[a]);
                let s = e.push(Operation::Binary { op: BinaryOp::Mul, a: gamma, b: var, dst: gamma }, &[b, d0]);
                let m = e.push(Operation::Binary { op: BinaryOp::Mul, a: mean, b: gamma, dst: mean }, &[s, d2]);
                last.push(e.push(Operation::Binary { op: BinaryOp::Sub, a: beta, b: mean, dst: beta }, &[m, d1]));
                ch.bn = Some((gamma, beta));
            }
            // Steps that read no per-channel vector.
            Epilogue::Residual(_) | Epilogue::Product(_) | Epilogue::Mask { .. } | Epilogue::Relu | Epilogue::Relu6 => {
            }
        }
    }
    if !last.is_empty() {
        ch.ready = Some(e.push(Operation::Barrier, &last));
    }
    Ok(ch)
}

/// Applies a kernel's epilogue to `acc` (rows × nb, channels c0..c0+nb) in place.
/// Tensor operands of an epilogue, loaded in the accumulator's layout: each tile with the
/// instruction after which it holds the rows.
#[derive(Clone, Copy, Default)]
pub(crate) struct Operands {
    /// The residual add's or product's tensor.
    pub residual: Option<(Tile, u32)>,
    /// The activation a fused mask step reads.
    pub mask: Option<(Tile, u32)>,
}

pub(crate) fn apply_epilogue(
    e: &mut Emitter,
    kernel: &Kernel,
    ch: &Channels,
    acc: Tile,
    c0: usize,
    operands: Operands,
    mut after: Vec<u32>,
) -> u32 {
    if let Some(r) = ch.ready {
        after.push(r);
    }
    let nb = acc.cols as usize;
    let mut last = None;
    for step in &kernel.epilogue {
        let deps: Vec<u32> = match last {
            Some(l) => vec![l],
            None => after.clone(),
        };
        let op = match *step {
            Epilogue::Bias(_) => {
                Operation::Binary { op: BinaryOp::Add, a: acc, b: ch.bias.expect("prepared").columns(c0, nb), dst: acc }
            }
            Epilogue::BatchNorm(_) | Epilogue::BatchNormTrain(_) => {
                let (scale, shift) = ch.bn.expect("prepared");
                let m =
                    e.push(Operation::Binary { op: BinaryOp::Mul, a: acc, b: scale.columns(c0, nb), dst: acc }, &deps);
                last = Some(
                    e.push(Operation::Binary { op: BinaryOp::Add, a: acc, b: shift.columns(c0, nb), dst: acc }, &[m]),
                );
                continue;
            }
            Epilogue::Mask { relu6, .. } => {
                let (y, loaded) = operands.mask.expect("a mask step has its activation");
                let mut d = deps.clone();
                d.push(loaded);
                let op = if relu6 { BinaryOp::MaskRelu6 } else { BinaryOp::MaskPositive };
                last = Some(e.push(Operation::Binary { op, a: y, b: acc, dst: acc }, &d));
                continue;
            }
            Epilogue::Residual(_) | Epilogue::Product(_) => {
                let (res, loaded) = operands.residual.expect("a tensor operand step has its tile");
                let mut d = deps.clone();
                d.push(loaded);
                let op = if matches!(step, Epilogue::Residual(_)) { BinaryOp::Add } else { BinaryOp::Mul };
                last = Some(e.push(Operation::Binary { op, a: acc, b: res, dst: acc }, &d));
                continue;
            }
            Epilogue::Relu => Operation::Unary { op: UnaryOp::Relu, src: acc, dst: acc },
            Epilogue::Relu6 => Operation::Unary { op: UnaryOp::Relu6, src: acc, dst: acc },
        };
        last = Some(e.push(op, &deps));
    }
    match last {
        Some(l) => l,
        None => e.push(Operation::Barrier, &after),
    }
}

/// The activation a kernel's fused mask step reads.
pub(crate) fn mask_of(kernel: &Kernel) -> Option<NodeId> {
    kernel.epilogue.iter().find_map(|s| match s {
        Epilogue::Mask { y, .. } => Some(*y),
        Epilogue::Bias(_) | Epilogue::BatchNorm(_) | Epilogue::BatchNormTrain(_) => None,
        Epilogue::Residual(_) | Epilogue::Product(_) | Epilogue::Relu | Epilogue::Relu6 => None,
    })
}

/// The tensor operand of a kernel's epilogue (a residual add's or a product's), loaded in the
/// output's layout beside the accumulator.
pub(crate) fn residual_of(kernel: &Kernel) -> Option<NodeId> {
    kernel.epilogue.iter().find_map(|s| match s {
        Epilogue::Residual(r) | Epilogue::Product(r) => Some(*r),
        Epilogue::Bias(_) | Epilogue::BatchNorm(_) | Epilogue::BatchNormTrain(_) => None,
        Epilogue::Mask { .. } | Epilogue::Relu | Epilogue::Relu6 => None,
    })
}

//! Elementwise kernels on the VPU: an epilogue alone over an existing tensor (bias, batch
//! norm, residual add, ReLU), activation gradients (ReLU masks) and dropout.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{NodeId, Op};
use crate::lower::blocks::epilogue::{Operands, apply_epilogue, prepare_channels, residual_of};
use crate::lower::blocks::rows::map_rows;
use crate::lower::emitter::{BUFFERS, Emitted, Emitter};
use crate::lower::kernel::Kernel;

pub(crate) fn pointwise(e: &mut Emitter, kernel: &Kernel, input: NodeId) -> Result<Emitted> {
    let x = e.place(input);
    let y = e.place(kernel.output);
    let (rows, c) = (x.tile.rows as usize, x.tile.cols as usize);
    let rb = ((e.m.core.vmem_bytes / 16) as usize / (c * 4)).clamp(1, rows);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let buf: Vec<Tile> = (0..BUFFERS).map(|_| vmem.alloc(rb, c)).collect::<Option<_>>().ok_or_else(|| oom(e))?;
    let res: Vec<Tile> = if residual_of(kernel).is_some() {
        (0..BUFFERS).map(|_| vmem.alloc(rb, c)).collect::<Option<_>>().ok_or_else(|| oom(e))?
    } else {
        Vec::new()
    };
    let ch = prepare_channels(e, kernel, c, &mut vmem)?;
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let p = b % BUFFERS;
        let t = Tile { rows: rn as u32, ..buf[p] };
        let load = e.push(Operation::dma(0, x.tile.rows(r0, rn), t), &free[p]);
        let residual = match residual_of(kernel) {
            Some(r) => {
                let rt = Tile { rows: rn as u32, ..res[p] };
                Some((rt, e.push(Operation::dma(1, e.place(r).tile.rows(r0, rn), rt), &free[p])))
            }
            None => None,
        };
        let done = apply_epilogue(e, kernel, &ch, t, 0, Operands { residual, mask: None }, vec![load]);
        let store = e.push(Operation::dma(2, t, y.tile.rows(r0, rn)), &[done]);
        free[p] = vec![done, store];
    }
    Ok(Emitted::new(format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0))
}

/// `ReluGrad` / `Relu6Grad`: `dy` where the activation (its output, see the op) is in the active range.
pub(crate) fn mask(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let (x, dy) = (e.place(n.inputs[0]).tile, e.place(n.inputs[1]).tile);
    let out = e.place(kernel.output).tile;
    let op = if matches!(n.op, Op::Relu6Grad) { BinaryOp::MaskRelu6 } else { BinaryOp::MaskPositive };
    let (rows, c) = (x.rows as usize, x.cols as usize);
    let rb = map_rows(e, kernel, &[x, dy], &[], out, |e, b| {
        let (xt, dt) = (b.inputs[0], b.inputs[1]);
        (dt, e.push(Operation::Binary { op, a: xt, b: dt, dst: dt }, &b.loaded))
    })?;
    Ok(Emitted::new(format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0))
}

/// Dropout with the step's mask, blocks of whole rows (element counters run over the tensor
/// in row-major order, as the reference's).
pub(crate) fn dropout(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let Op::Dropout(d) = &e.graph.node(node).op else { unreachable!("a Dropout main") };
    let (seed, rate) = (d.seed, d.rate);
    let x = e.place(e.graph.node(node).inputs[0]).tile;
    let out = e.place(kernel.output).tile;
    let step_hbm = e.place(e.extras.dropout_step.expect("a training step with dropout has a step counter")).tile;
    let (rows, c) = (x.rows as usize, x.cols as usize);
    // The step (one value) sits past the VMEM the row blocks use.
    let step = Tile::new(Space::Vmem, e.m.core.vmem_bytes - 512, 1, 1, DType::F32);
    let loaded_step = e.push(Operation::dma(1, step_hbm, step), &[]);
    let rb = map_rows(e, kernel, &[x], &[], out, |e, b| {
        let t = b.inputs[0];
        let counter = (b.r0 * c) as u64;
        (t, e.push(Operation::Dropout { seed, rate, step, counter, src: t, dst: t }, &[b.loaded[0], loaded_step]))
    })?;
    let strategy = format!("mask drawn on the VPU, blocks of {rb} rows");
    Ok(Emitted::new(strategy, format!("{rows} x {c}, rate {rate}"), 0))
}

//! Softmax and softmax cross-entropy on the VPU: the forward softmax, its gradient, the mean
//! loss and the loss's gradient.
//!
//! Every VPU sequence here performs the same f32 operations in the same order as the
//! reference ([`crate::reference`]), so the loss's arithmetic differs from the CPU only where
//! the MXU's bf16 products enter.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{NodeId, Op};
use crate::lower::blocks::rows::{map_rows, rows_per_block};
use crate::lower::emitter::{Emitted, Emitter};
use crate::lower::kernel::Kernel;

pub(crate) fn softmax(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let graph = e.graph;
    let x = e.place(graph.node(node).inputs[0]);
    let y = e.place(kernel.output);
    let (rows, c) = (x.tile.rows as usize, x.tile.cols as usize);
    let rb = ((e.m.core.vmem_bytes / 16) as usize / (c * 4 + 8)).clamp(1, rows);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let buf = vmem.alloc(rb, c).ok_or_else(|| oom(e))?;
    let col = vmem.alloc(rb, 1).ok_or_else(|| oom(e))?;
    let mut free = Vec::new();
    for r0 in (0..rows).step_by(rb) {
        let rn = rb.min(rows - r0);
        let (t, s) = (Tile { rows: rn as u32, ..buf }, Tile { rows: rn as u32, ..col });
        let load = e.push(Operation::dma(0, x.tile.rows(r0, rn), t), &free);
        let mx = e.push(Operation::Reduce { op: ReduceOp::Max, axis: Axis::Cols, src: t, dst: s }, &[load]);
        let sub = e.push(Operation::Binary { op: BinaryOp::Sub, a: t, b: s, dst: t }, &[mx]);
        let ex = e.push(Operation::Unary { op: UnaryOp::Exp, src: t, dst: t }, &[sub]);
        let sum = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: t, dst: s }, &[ex]);
        let div = e.push(Operation::Binary { op: BinaryOp::Div, a: t, b: s, dst: t }, &[sum]);
        let store = e.push(Operation::dma(2, t, y.tile.rows(r0, rn)), &[div]);
        free = vec![div, store];
    }
    Ok(Emitted::new(format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0))
}

/// `SoftmaxGrad`: `dx = y · (dy − Σ_row dy·y)`, blocks of rows on the VPU.
pub(crate) fn softmax_grad(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let (y, dy) = (e.place(n.inputs[0]).tile, e.place(n.inputs[1]).tile);
    let out = e.place(kernel.output).tile;
    let (rows, c) = (y.rows as usize, y.cols as usize);
    let rb = map_rows(e, kernel, &[y, dy], &[c, 1], out, |e, b| {
        let ([yt, dt], [tt, st]) = ([b.inputs[0], b.inputs[1]], [b.scratch[0], b.scratch[1]]);
        let m = e.push(Operation::Binary { op: BinaryOp::Mul, a: dt, b: yt, dst: tt }, &b.loaded);
        let s = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: tt, dst: st }, &[m]);
        let d = e.push(Operation::Binary { op: BinaryOp::Sub, a: dt, b: st, dst: dt }, &[s]);
        (dt, e.push(Operation::Binary { op: BinaryOp::Mul, a: dt, b: yt, dst: dt }, &[d]))
    })?;
    Ok(Emitted::new(format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0))
}

/// The label-smoothing target `q = y·(1 - s) + s/C`, in place on a one-hot block.
fn smooth(e: &mut Emitter, y: Tile, smoothing: f32, classes: usize, after: u32) -> u32 {
    if smoothing == 0.0 {
        return after;
    }
    let a = e.push(Operation::Unary { op: UnaryOp::Scale(1.0 - smoothing), src: y, dst: y }, &[after]);
    e.push(Operation::Unary { op: UnaryOp::AddScalar(smoothing / classes as f32), src: y, dst: y }, &[a])
}

fn smoothing_of(e: &Emitter, node: NodeId) -> f32 {
    let (Op::SoftmaxCrossEntropy(s) | Op::SoftmaxCrossEntropyGrad(s)) = &e.graph.node(node).op else {
        unreachable!("a loss node")
    };
    s.label_smoothing
}

/// The one-hot input standing for `node`'s labels.
fn one_hot_tile(e: &Emitter, node: NodeId) -> Tile {
    let labels = e.graph.node(node).inputs[1];
    e.place(e.extras.one_hot[&labels]).tile
}

/// The mean softmax cross-entropy: per row `logsumexp(z) - Σ q·z`, summed over blocks, over N.
pub(crate) fn loss(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let z = e.place(e.graph.node(node).inputs[0]).tile;
    let y = one_hot_tile(e, node);
    let out = e.place(kernel.output).tile;
    let (rows, c) = (z.rows as usize, z.cols as usize);
    let smoothing = smoothing_of(e, node);
    let rb = rows_per_block(e, rows, c, 3);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let zb = vmem.alloc(rb, c).ok_or_else(|| oom(e))?;
    let yb = vmem.alloc(rb, c).ok_or_else(|| oom(e))?;
    let tb = vmem.alloc(rb, c).ok_or_else(|| oom(e))?;
    let (mx, lse, dot) = (vmem.alloc(rb, 1), vmem.alloc(rb, 1), vmem.alloc(rb, 1));
    let (mx, lse, dot) = (mx.ok_or_else(|| oom(e))?, lse.ok_or_else(|| oom(e))?, dot.ok_or_else(|| oom(e))?);
    let (part, total) = (vmem.alloc(1, 1).ok_or_else(|| oom(e))?, vmem.alloc(1, 1).ok_or_else(|| oom(e))?);
    let mut last = e.push(Operation::Fill { dst: total, value: 0.0 }, &[]);
    for r0 in (0..rows).step_by(rb) {
        let rn = rb.min(rows - r0);
        let sub = |t: Tile| Tile { rows: rn as u32, ..t };
        let (zt, yt, tt, mxt, lset, dott) = (sub(zb), sub(yb), sub(tb), sub(mx), sub(lse), sub(dot));
        let lz = e.push(Operation::dma(0, z.rows(r0, rn), zt), &[last]);
        let ly = e.push(Operation::dma(1, y.rows(r0, rn), yt), &[last]);
        let q = smooth(e, yt, smoothing, c, ly);
        // logsumexp(z) = max + log(Σ exp(z - max)).
        let m = e.push(Operation::Reduce { op: ReduceOp::Max, axis: Axis::Cols, src: zt, dst: mxt }, &[lz]);
        let d = e.push(Operation::Binary { op: BinaryOp::Sub, a: zt, b: mxt, dst: tt }, &[m]);
        let x = e.push(Operation::Unary { op: UnaryOp::Exp, src: tt, dst: tt }, &[d]);
        let s = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: tt, dst: lset }, &[x]);
        let l = e.push(Operation::Unary { op: UnaryOp::Log, src: lset, dst: lset }, &[s]);
        let a = e.push(Operation::Binary { op: BinaryOp::Add, a: lset, b: mxt, dst: lset }, &[l]);
        // Σ q·z.
        let p = e.push(Operation::Binary { op: BinaryOp::Mul, a: yt, b: zt, dst: tt }, &[q, a]);
        let r = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: tt, dst: dott }, &[p]);
        let per_row = e.push(Operation::Binary { op: BinaryOp::Sub, a: lset, b: dott, dst: lset }, &[r]);
        let sum = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: lset, dst: part }, &[per_row]);
        last = e.push(Operation::Binary { op: BinaryOp::Add, a: total, b: part, dst: total }, &[sum]);
    }
    let mean = e.push(Operation::Unary { op: UnaryOp::Scale(1.0 / rows as f32), src: total, dst: total }, &[last]);
    e.push(Operation::dma(2, total, out), &[mean]);
    Ok(Emitted::new(format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0))
}

/// `(softmax(z) - q) / N`.
pub(crate) fn loss_grad(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let z = e.place(e.graph.node(node).inputs[0]).tile;
    let y = one_hot_tile(e, node);
    let out = e.place(kernel.output).tile;
    let (rows, c) = (z.rows as usize, z.cols as usize);
    let smoothing = smoothing_of(e, node);
    let rb = map_rows(e, kernel, &[z, y], &[1], out, |e, b| {
        let ([zt, yt], [st]) = ([b.inputs[0], b.inputs[1]], [b.scratch[0]]);
        let q = smooth(e, yt, smoothing, c, b.loaded[1]);
        let m = e.push(Operation::Reduce { op: ReduceOp::Max, axis: Axis::Cols, src: zt, dst: st }, &[b.loaded[0]]);
        let d = e.push(Operation::Binary { op: BinaryOp::Sub, a: zt, b: st, dst: zt }, &[m]);
        let x = e.push(Operation::Unary { op: UnaryOp::Exp, src: zt, dst: zt }, &[d]);
        let s = e.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: zt, dst: st }, &[x]);
        let sm = e.push(Operation::Binary { op: BinaryOp::Div, a: zt, b: st, dst: zt }, &[s]);
        let g = e.push(Operation::Binary { op: BinaryOp::Sub, a: zt, b: yt, dst: zt }, &[sm, q]);
        (zt, e.push(Operation::Unary { op: UnaryOp::Scale(1.0 / rows as f32), src: zt, dst: zt }, &[g]))
    })?;
    Ok(Emitted::new(format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0))
}

//! Emission of the training step's own kernels: the loss and its gradient, the dense-layer
//! gradients (matmuls with a transposed operand), bias and activation gradients, and the
//! optimizer's updates. Forward kernels are in [`super::emit`].
//!
//! Every VPU sequence here performs the same f32 operations in the same order as the
//! reference ([`crate::reference`], [`crate::optimizer`]), so the loss's and the updates'
//! arithmetic differs from the CPU only where the MXU's bf16 products enter.

use systolic_simulator::isa::*;

use super::emit::{self, BUFFERS, Emitter, Operand, matmul_kernel};
use super::fusion::Kernel;
use super::training::Update;
use super::{KernelReport, rows_cols};
use crate::error::Result;
use crate::graph::{NodeId, Op as GOp, Padding, Pool as PoolAttrs};
use crate::optimizer::Optimizer;

/// Rows per block so that `arrays` row-blocks of `cols` f32 values fit in a quarter of VMEM.
pub(super) fn rows_per_block(e: &Emitter, rows: usize, cols: usize, arrays: usize) -> usize {
    let budget = (e.m.core.vmem_bytes / 4) as usize;
    (budget / (arrays * cols.max(1) * 4)).clamp(1, rows.max(1))
}

/// A tile of one `rows` × 1 column broadcasting the scalar at `t` (row stride 0).
fn scalar_column(t: Tile, rows: usize) -> Tile {
    Tile { rows: rows as u32, cols: 1, stride: 0, ..t }
}

/// The label-smoothing target `q = y·(1 - s) + s/C`, in place on a one-hot block.
fn smooth(e: &mut Emitter, y: Tile, smoothing: f32, classes: usize, after: u32) -> u32 {
    if smoothing == 0.0 {
        return after;
    }
    let a = e.push(Op::Unary { op: UnaryOp::Scale(1.0 - smoothing), src: y, dst: y }, &[after]);
    e.push(Op::Unary { op: UnaryOp::AddScalar(smoothing / classes as f32), src: y, dst: y }, &[a])
}

fn smoothing_of(e: &Emitter, node: NodeId) -> f32 {
    match &e.graph.node(node).op {
        GOp::SoftmaxCrossEntropy(s) | GOp::SoftmaxCrossEntropyGrad(s) => s.label_smoothing,
        _ => unreachable!("a loss node"),
    }
}

/// The one-hot input standing for `node`'s labels.
fn one_hot_tile(e: &Emitter, node: NodeId) -> Tile {
    let labels = e.graph.node(node).inputs[1];
    e.place(e.extras.one_hot[&labels]).tile
}

/// The mean softmax cross-entropy: per row `logsumexp(z) - Σ q·z`, summed over blocks, over N.
pub(super) fn loss(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
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
    let mut last = e.push(Op::Fill { dst: total, value: 0.0 }, &[]);
    for r0 in (0..rows).step_by(rb) {
        let rn = rb.min(rows - r0);
        let sub = |t: Tile| Tile { rows: rn as u32, ..t };
        let (zt, yt, tt, mxt, lset, dott) = (sub(zb), sub(yb), sub(tb), sub(mx), sub(lse), sub(dot));
        let lz = e.push(Op::dma(0, z.rows(r0, rn), zt), &[last]);
        let ly = e.push(Op::dma(1, y.rows(r0, rn), yt), &[last]);
        let q = smooth(e, yt, smoothing, c, ly);
        // logsumexp(z) = max + log(Σ exp(z - max)).
        let m = e.push(Op::Reduce { op: ReduceOp::Max, axis: Axis::Cols, src: zt, dst: mxt }, &[lz]);
        let d = e.push(Op::Binary { op: BinaryOp::Sub, a: zt, b: mxt, dst: tt }, &[m]);
        let x = e.push(Op::Unary { op: UnaryOp::Exp, src: tt, dst: tt }, &[d]);
        let s = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: tt, dst: lset }, &[x]);
        let l = e.push(Op::Unary { op: UnaryOp::Log, src: lset, dst: lset }, &[s]);
        let a = e.push(Op::Binary { op: BinaryOp::Add, a: lset, b: mxt, dst: lset }, &[l]);
        // Σ q·z.
        let p = e.push(Op::Binary { op: BinaryOp::Mul, a: yt, b: zt, dst: tt }, &[q, a]);
        let r = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: tt, dst: dott }, &[p]);
        let per_row = e.push(Op::Binary { op: BinaryOp::Sub, a: lset, b: dott, dst: lset }, &[r]);
        let sum = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: lset, dst: part }, &[per_row]);
        last = e.push(Op::Binary { op: BinaryOp::Add, a: total, b: part, dst: total }, &[sum]);
    }
    let mean = e.push(Op::Unary { op: UnaryOp::Scale(1.0 / rows as f32), src: total, dst: total }, &[last]);
    e.push(Op::dma(2, total, out), &[mean]);
    let range = first..e.program.len() + 1;
    Ok(e.report(e.graph, kernel, format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0, range))
}

/// A block of rows handed to a [`map_rows`] body: the loaded input tiles, in order, the work
/// tiles (`scratch` columns), the block's first row, and the loads to wait for.
struct RowBlock {
    inputs: Vec<Tile>,
    scratch: Vec<Tile>,
    r0: usize,
    loaded: Vec<u32>,
}

/// Streams `inputs` (tensors of equal rows) through VMEM in blocks of rows, `BUFFERS` deep:
/// `body` computes a block's result in one of its tiles and returns that tile with the
/// instruction after which it holds the result; it is stored to the same rows of `out`.
/// Returns the block height.
fn map_rows(
    e: &mut Emitter,
    kernel: &Kernel,
    inputs: &[Tile],
    scratch: &[usize],
    out: Tile,
    mut body: impl FnMut(&mut Emitter, &RowBlock) -> (Tile, u32),
) -> Result<usize> {
    let rows = inputs[0].rows as usize;
    let cols: usize = inputs.iter().map(|t| t.cols as usize).sum::<usize>() + scratch.iter().sum::<usize>();
    let rb = rows_per_block(e, rows, cols, BUFFERS);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let widths = inputs.iter().map(|t| t.cols as usize).chain(scratch.iter().copied());
    let rings: Vec<Vec<Tile>> = widths.map(|c| vmem.ring(rb, c).ok_or_else(|| oom(e))).collect::<Result<_>>()?;
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let p = b % BUFFERS;
        let tiles: Vec<Tile> = rings.iter().map(|r| Tile { rows: rn as u32, ..r[p] }).collect();
        let (loaded_tiles, scratch_tiles) = tiles.split_at(inputs.len());
        let loaded = inputs
            .iter()
            .zip(loaded_tiles)
            .enumerate()
            .map(|(i, (src, &dst))| e.push(Op::dma(i as u8, src.rows(r0, rn), dst), &free[p]))
            .collect();
        let block = RowBlock { inputs: loaded_tiles.to_vec(), scratch: scratch_tiles.to_vec(), r0, loaded };
        let (result, ready) = body(e, &block);
        let store = e.push(Op::dma(2, result, out.rows(r0, rn)), &[ready]);
        free[p] = vec![ready, store];
    }
    Ok(rb)
}

/// `(softmax(z) - q) / N`.
pub(super) fn loss_grad(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let z = e.place(e.graph.node(node).inputs[0]).tile;
    let y = one_hot_tile(e, node);
    let out = e.place(kernel.output).tile;
    let (rows, c) = (z.rows as usize, z.cols as usize);
    let smoothing = smoothing_of(e, node);
    let rb = map_rows(e, kernel, &[z, y], &[1], out, |e, b| {
        let ([zt, yt], [st]) = ([b.inputs[0], b.inputs[1]], [b.scratch[0]]);
        let q = smooth(e, yt, smoothing, c, b.loaded[1]);
        let m = e.push(Op::Reduce { op: ReduceOp::Max, axis: Axis::Cols, src: zt, dst: st }, &[b.loaded[0]]);
        let d = e.push(Op::Binary { op: BinaryOp::Sub, a: zt, b: st, dst: zt }, &[m]);
        let x = e.push(Op::Unary { op: UnaryOp::Exp, src: zt, dst: zt }, &[d]);
        let s = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: zt, dst: st }, &[x]);
        let sm = e.push(Op::Binary { op: BinaryOp::Div, a: zt, b: st, dst: zt }, &[s]);
        let g = e.push(Op::Binary { op: BinaryOp::Sub, a: zt, b: yt, dst: zt }, &[sm, q]);
        (zt, e.push(Op::Unary { op: UnaryOp::Scale(1.0 / rows as f32), src: zt, dst: zt }, &[g]))
    })?;
    let range = first..e.program.len() + 1;
    Ok(e.report(e.graph, kernel, format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0, range))
}

/// `DenseBackpropInput` (`dy · Wᵀ`) and `DenseBackpropKernel` (`xᵀ · dy`) on the MXU.
pub(super) fn dense_grad(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let n = e.graph.node(node);
    let (a, b) = (e.place(n.inputs[0]).tile, e.place(n.inputs[1]).tile);
    let out = e.place(kernel.output).tile;
    match n.op {
        // dy [rows x out] · (W [in x out])ᵀ.
        GOp::DenseBackpropInput => {
            matmul_kernel(e, kernel, Operand { tile: a, transposed: false }, Operand { tile: b, transposed: true }, out)
        }
        // (x [rows x in])ᵀ · dy [rows x out].
        _ => {
            matmul_kernel(e, kernel, Operand { tile: a, transposed: true }, Operand { tile: b, transposed: false }, out)
        }
    }
}

/// Sums over rows (`BiasAddGrad`): partial sums per block of rows, added in block order.
pub(super) fn column_sums(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let x = e.place(e.graph.node(node).inputs[0]).tile;
    let out = e.place(kernel.output).tile;
    let (rows, c) = (x.rows as usize, x.cols as usize);
    let rb = rows_per_block(e, rows, c, BUFFERS);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "row blocks");
    let bufs = vmem.ring(rb, c).ok_or_else(|| oom(e))?;
    let (part, total) = (vmem.alloc(1, c).ok_or_else(|| oom(e))?, vmem.alloc(1, c).ok_or_else(|| oom(e))?);
    let mut last = e.push(Op::Fill { dst: total, value: 0.0 }, &[]);
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let p = b % BUFFERS;
        let t = Tile { rows: rn as u32, ..bufs[p] };
        let load = e.push(Op::dma(0, x.rows(r0, rn), t), &free[p]);
        let s = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: t, dst: part }, &[load, last]);
        last = e.push(Op::Binary { op: BinaryOp::Add, a: total, b: part, dst: total }, &[s]);
        free[p] = vec![s];
    }
    e.push(Op::dma(2, total, out), &[last]);
    let range = first..e.program.len() + 1;
    Ok(e.report(e.graph, kernel, format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c} to {c}"), 0, range))
}

/// `SoftmaxGrad`: `dx = y · (dy − Σ_row dy·y)`, blocks of rows on the VPU.
pub(super) fn softmax_grad(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let n = e.graph.node(node);
    let (y, dy) = (e.place(n.inputs[0]).tile, e.place(n.inputs[1]).tile);
    let out = e.place(kernel.output).tile;
    let (rows, c) = (y.rows as usize, y.cols as usize);
    let rb = map_rows(e, kernel, &[y, dy], &[c, 1], out, |e, b| {
        let ([yt, dt], [tt, st]) = ([b.inputs[0], b.inputs[1]], [b.scratch[0], b.scratch[1]]);
        let m = e.push(Op::Binary { op: BinaryOp::Mul, a: dt, b: yt, dst: tt }, &b.loaded);
        let s = e.push(Op::Reduce { op: ReduceOp::Sum, axis: Axis::Cols, src: tt, dst: st }, &[m]);
        let d = e.push(Op::Binary { op: BinaryOp::Sub, a: dt, b: st, dst: dt }, &[s]);
        (dt, e.push(Op::Binary { op: BinaryOp::Mul, a: dt, b: yt, dst: dt }, &[d]))
    })?;
    let range = first..e.program.len() + 1;
    Ok(e.report(e.graph, kernel, format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0, range))
}

/// `ReluGrad` / `Relu6Grad`: `dy` where the activation (its output, see the op) is in the active range.
pub(super) fn mask(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let n = e.graph.node(node);
    let (x, dy) = (e.place(n.inputs[0]).tile, e.place(n.inputs[1]).tile);
    let out = e.place(kernel.output).tile;
    let op = if matches!(n.op, GOp::Relu6Grad) { BinaryOp::MaskRelu6 } else { BinaryOp::MaskPositive };
    let (rows, c) = (x.rows as usize, x.cols as usize);
    let rb = map_rows(e, kernel, &[x, dy], &[], out, |e, b| {
        let (xt, dt) = (b.inputs[0], b.inputs[1]);
        (dt, e.push(Op::Binary { op, a: xt, b: dt, dst: dt }, &b.loaded))
    })?;
    let range = first..e.program.len() + 1;
    Ok(e.report(e.graph, kernel, format!("blocks of {rb} rows on the VPU"), format!("{rows} x {c}"), 0, range))
}

/// Pooling gradients on the VPU, a block of images at a time: the max-pool gradient reads the
/// forward input to find each window's first maximum; a global average is one window per image.
pub(super) fn pool_grad(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let n = e.graph.node(node);
    let dx = e.place(kernel.output);
    let [batch, h, w, c] = [dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]];
    let (op, pool, x, dy) = match &n.op {
        GOp::MaxPoolGrad(p) => (PoolOp::Max, p.clone(), Some(e.place(n.inputs[0]).tile), e.place(n.inputs[1]).tile),
        GOp::AvgPoolGrad(p) => (PoolOp::Avg, p.pool.clone(), None, e.place(n.inputs[0]).tile),
        GOp::GlobalAvgPoolGrad(_) => {
            let whole = PoolAttrs { window: [h, w], strides: [1, 1], padding: Padding::Valid };
            (PoolOp::Avg, whole, None, e.place(n.inputs[0]).tile)
        }
        _ => unreachable!("a pooling gradient"),
    };
    let win = pool.resolve([h, w]).expect("checked when the node was added");
    let (in_px, out_px) = (h * w, win.out_h * win.out_w);
    let arrays = if x.is_some() { 2 } else { 1 };
    let (imgs, cb) = emit::image_channel_blocks(e, batch, c, (arrays * in_px + out_px) * 4);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "image buffers");
    let xb = if x.is_some() { vmem.ring(imgs * in_px, cb).ok_or_else(|| oom(e))? } else { Vec::new() };
    let db = vmem.ring(imgs * out_px, cb).ok_or_else(|| oom(e))?;
    let ob = vmem.ring(imgs * in_px, cb).ok_or_else(|| oom(e))?;
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let blocks = (0..batch).step_by(imgs).flat_map(|n0| (0..c).step_by(cb).map(move |c0| (n0, c0)));
    for (b, (n0, c0)) in blocks.enumerate() {
        let k = imgs.min(batch - n0);
        let cn = cb.min(c - c0);
        let p = b % BUFFERS;
        let dt = Tile::new(Space::Vmem, db[p].offset, k * out_px, cn, DType::F32);
        let ot = Tile::new(Space::Vmem, ob[p].offset, k * in_px, cn, DType::F32);
        let mut loads = vec![e.push(Op::dma(0, dy.rows(n0 * out_px, k * out_px).columns(c0, cn), dt), &free[p])];
        let xt = x.map(|x| {
            let t = Tile::new(Space::Vmem, xb[p].offset, k * in_px, cn, DType::F32);
            loads.push(e.push(Op::dma(1, x.rows(n0 * in_px, k * in_px).columns(c0, cn), t), &free[p]));
            t
        });
        loads.extend(free[p].iter().copied());
        let shape = emit::pool_shape(k, [h, w], &pool, &win);
        let g = e.push(Op::PoolGrad { op, shape, x: xt, dy: dt, dst: ot }, &loads);
        let store = e.push(Op::dma(2, ot, dx.tile.rows(n0 * in_px, k * in_px).columns(c0, cn)), &[g]);
        free[p] = vec![g, store];
    }
    let range = first..e.program.len() + 1;
    Ok(e.report(
        e.graph,
        kernel,
        format!("{imgs} images of {cb} channels per block on the VPU"),
        format!("{}x{} windows over {h}x{w}x{c}", pool.window[0], pool.window[1]),
        0,
        range,
    ))
}

/// Dropout with the step's mask, blocks of whole rows (element counters run over the tensor
/// in row-major order, as the reference's).
pub(super) fn dropout(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<KernelReport> {
    let first = e.program.len();
    let GOp::Dropout(d) = &e.graph.node(node).op else { unreachable!("a Dropout main") };
    let (seed, rate) = (d.seed, d.rate);
    let x = e.place(e.graph.node(node).inputs[0]).tile;
    let out = e.place(kernel.output).tile;
    let step_hbm = e.place(e.extras.dropout_step.expect("a training step with dropout has a step counter")).tile;
    let (rows, c) = (x.rows as usize, x.cols as usize);
    // The step (one value) sits past the VMEM the row blocks use.
    let step = Tile::new(Space::Vmem, e.m.core.vmem_bytes - 512, 1, 1, DType::F32);
    let loaded_step = e.push(Op::dma(1, step_hbm, step), &[]);
    let rb = map_rows(e, kernel, &[x], &[], out, |e, b| {
        let t = b.inputs[0];
        let counter = (b.r0 * c) as u64;
        (t, e.push(Op::Dropout { seed, rate, step, counter, src: t, dst: t }, &[b.loaded[0], loaded_step]))
    })?;
    let range = first..e.program.len() + 1;
    let strategy = format!("mask drawn on the VPU, blocks of {rb} rows");
    Ok(e.report(e.graph, kernel, strategy, format!("{rows} x {c}, rate {rate}"), 0, range))
}

/// One parameter's optimizer update, in place, block by block.
pub(super) fn update(e: &mut Emitter, kernel: &Kernel, u: &Update) -> Result<KernelReport> {
    let first = e.program.len();
    let opt = e.extras.optimizer.expect("updates come with an optimizer");
    let p = e.place(u.param).tile;
    let g = e.place(u.grad).tile;
    let slots: Vec<Tile> = u.slots.iter().map(|&s| e.place(s).tile).collect();
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
            let l1 = e.push(Op::dma(0, b1p, s1), &[]);
            let l2 = e.push(Op::dma(1, b2p, s2), &[]);
            let one_minus = |e: &mut Emitter, t: Tile, after: u32| {
                let n = e.push(Op::Unary { op: UnaryOp::Scale(-1.0), src: t, dst: t }, &[after]);
                e.push(Op::Unary { op: UnaryOp::AddScalar(1.0), src: t, dst: t }, &[n])
            };
            let a = one_minus(e, s2, l2);
            let r = e.push(Op::Unary { op: UnaryOp::Sqrt, src: s2, dst: s2 }, &[a]);
            let lr = e.push(Op::Unary { op: UnaryOp::Scale(learning_rate), src: s2, dst: s2 }, &[r]);
            let b = one_minus(e, s1, l1);
            Some((s2, e.push(Op::Binary { op: BinaryOp::Div, a: s2, b: s1, dst: s2 }, &[lr, b])))
        }
        _ => None,
    };
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    for (b, r0) in (0..rows).step_by(rb).enumerate() {
        let rn = rb.min(rows - r0);
        let k = b % BUFFERS;
        let sub = |t: Tile| Tile { rows: rn as u32, ..t };
        let (pt, gt, tt) = (sub(pb[k]), sub(gb[k]), sub(tb[k]));
        let lp = e.push(Op::dma(0, p.rows(r0, rn), pt), &free[k]);
        let lg = e.push(Op::dma(1, g.rows(r0, rn), gt), &free[k]);
        let st: Vec<Tile> = sb.iter().map(|bufs| sub(bufs[k])).collect();
        let ls: Vec<u32> =
            slots.iter().zip(&st).map(|(s, &t)| e.push(Op::dma(2, s.rows(r0, rn), t), &free[k])).collect();
        let unary =
            |e: &mut Emitter, op: UnaryOp, src: Tile, dst: Tile, deps: &[u32]| e.push(Op::Unary { op, src, dst }, deps);
        let binary = |e: &mut Emitter, op: BinaryOp, a: Tile, b: Tile, dst: Tile, deps: &[u32]| {
            e.push(Op::Binary { op, a, b, dst }, deps)
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
        let mut stores = vec![e.push(Op::dma(0, pt, p.rows(r0, rn)), &[done])];
        for (s, &t) in slots.iter().zip(&st) {
            stores.push(e.push(Op::dma(1, t, s.rows(r0, rn)), &[done]));
        }
        stores.push(done);
        free[k] = stores;
    }
    let range = first..e.program.len() + 1;
    Ok(e.report(
        e.graph,
        kernel,
        format!("{} on the VPU, blocks of {rb} rows", opt.name()),
        format!("{rows} x {c}"),
        0,
        range,
    ))
}

/// Advances the optimizer's shared state once per step (Adam: `beta^t -> beta^(t+1)`).
pub(super) fn advance(e: &mut Emitter, kernel: &Kernel, state: &[NodeId]) -> Result<KernelReport> {
    let first = e.program.len();
    let factors: Vec<f32> = match e.extras.optimizer {
        Some(Optimizer::Adam { beta1, beta2, .. }) => vec![beta1, beta2],
        _ => Vec::new(),
    };
    let mut vmem = e.vmem();
    for (i, &s) in state.iter().enumerate() {
        // Adam's powers times beta; the dropout step plus one.
        let op = if Some(s) == e.extras.dropout_step { UnaryOp::AddScalar(1.0) } else { UnaryOp::Scale(factors[i]) };
        let hbm = e.place(s).tile;
        let (r, c) = rows_cols(&e.place(s).shape);
        let t = vmem.alloc(r, c).ok_or_else(|| e.vmem_error(kernel, "state"))?;
        let l = e.push(Op::dma(0, hbm, t), &[]);
        let m = e.push(Op::Unary { op, src: t, dst: t }, &[l]);
        e.push(Op::dma(1, t, hbm), &[m]);
    }
    let range = first..e.program.len() + 1;
    Ok(e.report(e.graph, kernel, "on the VPU".into(), format!("{} values", state.len()), 0, range))
}

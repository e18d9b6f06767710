//! Pooling on the VPU, forward and gradient: max and average windows, global average.

use systolic_simulator::isa::*;

use crate::error::Result;
use crate::graph::{NodeId, Op, Padding, Pool as PoolAttrs, Window2d};
use crate::lower::emitter::{BUFFERS, Emitted, Emitter};
use crate::lower::kernel::Kernel;

/// Images per block so that `images × bytes_per_image` (in and out, twice) fits in VMEM.
/// The VPU's pooling geometry for `n` images of `hw` pixels.
pub(crate) fn pool_shape(n: usize, [h, w]: [usize; 2], attrs: &PoolAttrs, win: &Window2d) -> PoolShape {
    let u = |v: usize| v as u32;
    PoolShape {
        n: u(n),
        h: u(h),
        w: u(w),
        window: attrs.window.map(u),
        strides: attrs.strides.map(u),
        pad: [u(win.pad_top), u(win.pad_left)],
        out_h: u(win.out_h),
        out_w: u(win.out_w),
    }
}

/// Blocks for image-wise VPU work (pooling and its gradient): whole images, and as many
/// channels of them as keep `BUFFERS` blocks within half of VMEM — all channels unless one
/// image is too big (the 224x224 first pools of VGG). Returns (images, channels) per block.
pub(crate) fn image_channel_blocks(e: &Emitter, n: usize, c: usize, bytes_per_pixel_channel: usize) -> (usize, usize) {
    let budget = (e.m.core.vmem_bytes / 2 / BUFFERS as u64) as usize;
    let fit = (budget / bytes_per_pixel_channel.max(1)).clamp(1, c);
    let cb = c.div_ceil(c.div_ceil(fit));
    ((budget / (bytes_per_pixel_channel * cb).max(1)).clamp(1, n), cb)
}

pub(crate) fn pool(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let op = &e.graph.node(node).op;
    let (Op::MaxPool(attrs) | Op::AvgPool(attrs)) = op else { unreachable!("a pooling main") };
    let max = matches!(op, Op::MaxPool(_));
    let graph = e.graph;
    let x = e.place(graph.node(node).inputs[0]);
    let y = e.place(kernel.output);
    let [n, h, w, c] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let win = attrs.resolve([h, w]).expect("checked when the node was added");
    let (in_px, out_px) = (h * w, win.out_h * win.out_w);
    let (imgs, cb) = image_channel_blocks(e, n, c, (in_px + out_px) * 4);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "image buffers");
    let src = vmem.ring(imgs * in_px, cb).ok_or_else(|| oom(e))?;
    let dst = vmem.ring(imgs * out_px, cb).ok_or_else(|| oom(e))?;
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let blocks = (0..n).step_by(imgs).flat_map(|n0| (0..c).step_by(cb).map(move |c0| (n0, c0)));
    for (b, (n0, c0)) in blocks.enumerate() {
        let k = imgs.min(n - n0);
        let cn = cb.min(c - c0);
        let p = b % BUFFERS;
        let s = Tile::new(Space::Vmem, src[p].offset, k * in_px, cn, DType::F32);
        let d = Tile::new(Space::Vmem, dst[p].offset, k * out_px, cn, DType::F32);
        let load = e.push(Operation::dma(0, x.tile.rows(n0 * in_px, k * in_px).columns(c0, cn), s), &free[p]);
        let shape = pool_shape(k, [h, w], attrs, &win);
        let op = if max { PoolOp::Max } else { PoolOp::Avg };
        let pooled = e.push(Operation::Pool { op, shape, src: s, dst: d }, &[load]);
        let store = e.push(Operation::dma(2, d, y.tile.rows(n0 * out_px, k * out_px).columns(c0, cn)), &[pooled]);
        free[p] = vec![pooled, store];
    }
    let pad = matches!(attrs.padding, Padding::Same | Padding::Explicit { .. });
    Ok(Emitted::new(
        format!(
            "{imgs} images of {cb} channels per block on the VPU{}",
            if pad { ", padding excluded from windows" } else { "" }
        ),
        format!("{}x{} windows over {h}x{w}x{c}", attrs.window[0], attrs.window[1]),
        0,
    ))
}

pub(crate) fn global_avg_pool(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let graph = e.graph;
    let x = e.place(graph.node(node).inputs[0]);
    let y = e.place(kernel.output);
    let [n, h, w, c] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let px = h * w;
    let (imgs, cb) = image_channel_blocks(e, n, c, (px + 1) * 4);
    let mut vmem = e.vmem();
    let oom = |e: &Emitter| e.vmem_error(kernel, "image buffers");
    let src = vmem.ring(imgs * px, cb).ok_or_else(|| oom(e))?;
    let dst = vmem.ring(imgs, cb).ok_or_else(|| oom(e))?;
    let mut free: Vec<Vec<u32>> = vec![Vec::new(); BUFFERS];
    let blocks = (0..n).step_by(imgs).flat_map(|n0| (0..c).step_by(cb).map(move |c0| (n0, c0)));
    for (b, (n0, c0)) in blocks.enumerate() {
        let (k, cn) = (imgs.min(n - n0), cb.min(c - c0));
        let p = b % BUFFERS;
        let s = Tile::new(Space::Vmem, src[p].offset, k * px, cn, DType::F32);
        let d = Tile::new(Space::Vmem, dst[p].offset, k, cn, DType::F32);
        let load = e.push(Operation::dma(0, x.tile.rows(n0 * px, k * px).columns(c0, cn), s), &free[p]);
        let mut last = load;
        for i in 0..k {
            last = e.push(
                Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: s.rows(i * px, px), dst: d.rows(i, 1) },
                &[last],
            );
        }
        let mean = e.push(Operation::Unary { op: UnaryOp::Scale(1.0 / px as f32), src: d, dst: d }, &[last]);
        let store = e.push(Operation::dma(2, d, y.tile.rows(n0, k).columns(c0, cn)), &[mean]);
        free[p] = vec![mean, store];
    }
    Ok(Emitted::new(
        format!("{imgs} images of {cb} channels per block, row sums on the VPU"),
        format!("{h}x{w}x{c} to {c}"),
        0,
    ))
}

/// Pooling gradients on the VPU, a block of images at a time: the max-pool gradient reads the
/// forward input to find each window's first maximum; a global average is one window per image.
pub(crate) fn pool_grad(e: &mut Emitter, kernel: &Kernel, node: NodeId) -> Result<Emitted> {
    let n = e.graph.node(node);
    let dx = e.place(kernel.output);
    let [batch, h, w, c] = [dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]];
    let (op, pool, x, dy) = if let Op::MaxPoolGrad(p) = &n.op {
        (PoolOp::Max, p.clone(), Some(e.place(n.inputs[0]).tile), e.place(n.inputs[1]).tile)
    } else if let Op::AvgPoolGrad(p) = &n.op {
        (PoolOp::Avg, p.pool.clone(), None, e.place(n.inputs[0]).tile)
    } else {
        let Op::GlobalAvgPoolGrad(_) = &n.op else { unreachable!("a pooling gradient") };
        let whole = PoolAttrs { window: [h, w], strides: [1, 1], padding: Padding::Valid };
        (PoolOp::Avg, whole, None, e.place(n.inputs[0]).tile)
    };
    let win = pool.resolve([h, w]).expect("checked when the node was added");
    let (in_px, out_px) = (h * w, win.out_h * win.out_w);
    let arrays = if x.is_some() { 2 } else { 1 };
    let (imgs, cb) = image_channel_blocks(e, batch, c, (arrays * in_px + out_px) * 4);
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
        let mut loads = vec![e.push(Operation::dma(0, dy.rows(n0 * out_px, k * out_px).columns(c0, cn), dt), &free[p])];
        let xt = x.map(|x| {
            let t = Tile::new(Space::Vmem, xb[p].offset, k * in_px, cn, DType::F32);
            loads.push(e.push(Operation::dma(1, x.rows(n0 * in_px, k * in_px).columns(c0, cn), t), &free[p]));
            t
        });
        loads.extend(free[p].iter().copied());
        let shape = pool_shape(k, [h, w], &pool, &win);
        let g = e.push(Operation::PoolGrad { op, shape, x: xt, dy: dt, dst: ot }, &loads);
        let store = e.push(Operation::dma(2, ot, dx.tile.rows(n0 * in_px, k * in_px).columns(c0, cn)), &[g]);
        free[p] = vec![g, store];
    }
    Ok(Emitted::new(
        format!("{imgs} images of {cb} channels per block on the VPU"),
        format!("{}x{} windows over {h}x{w}x{c}", pool.window[0], pool.window[1]),
        0,
    ))
}

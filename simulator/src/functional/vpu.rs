//! The VPU's operations on f32 tiles: each instruction's element function ([`unary`],
//! [`binary`]), applied over a tile's rows where they lie in a view of its bytes (row `r` at
//! `r · stride`), one loop per operation so each loop vectorises, large tiles in pieces of
//! whole rows on every thread (elementwise, so the bits do not depend on the split); pooling.

use rayon::prelude::*;

use crate::isa::*;

/// Elements per parallel piece of a VPU operation: smaller tiles run on one thread.
const VPU_PIECE: usize = 1 << 15;

/// A tile's rows inside a view of its span: `rows` rows of `cols` values, `stride` apart.
#[derive(Clone, Copy)]
pub(super) struct Rows {
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl Rows {
    pub fn of(t: &Tile) -> Rows {
        Rows { rows: t.rows as usize, cols: t.cols as usize, stride: t.stride as usize }
    }

    /// The same rows packed one after another (a decoded copy of the tile).
    pub fn packed(t: &Tile) -> Rows {
        Rows { stride: t.cols as usize, ..Rows::of(t) }
    }

    /// Rows per parallel piece.
    fn per_piece(self) -> usize {
        (VPU_PIECE / self.cols.max(1)).max(1)
    }

    /// Whether the tile is large enough to split over threads.
    fn parallel(self) -> bool {
        self.rows > 1 && self.rows * self.cols > VPU_PIECE
    }
}

/// `x = f(x)` for every element of `t`'s rows in `v`.
#[inline(always)]
fn rows_each(v: &mut [f32], t: Rows, f: impl Fn(f32) -> f32 + Sync) {
    let piece =
        |rows: &mut [f32]| rows.chunks_mut(t.stride).for_each(|row| row[..t.cols].iter_mut().for_each(|x| *x = f(*x)));
    if t.parallel() {
        v.par_chunks_mut(t.per_piece() * t.stride).for_each(piece);
    } else {
        piece(v);
    }
}

/// `x = f(x, y)` for every element of `t`'s rows in `v`, `y` from `b` (rows `b_stride` apart)
/// paired as `mode` says.
#[inline(always)]
fn rows_pair(v: &mut [f32], t: Rows, b: &[f32], b_stride: usize, mode: Broadcast, f: impl Fn(f32, f32) -> f32 + Sync) {
    let per_piece = t.per_piece();
    let piece = |(p, rows): (usize, &mut [f32])| {
        for (i, row) in rows.chunks_mut(t.stride).enumerate() {
            let (r, row) = (p * per_piece + i, &mut row[..t.cols]);
            match mode {
                Broadcast::Same => row.iter_mut().zip(&b[r * b_stride..][..t.cols]).for_each(|(x, &y)| *x = f(*x, y)),
                Broadcast::Row => row.iter_mut().zip(&b[..t.cols]).for_each(|(x, &y)| *x = f(*x, y)),
                Broadcast::Column => {
                    let y = b[r * b_stride];
                    row.iter_mut().for_each(|x| *x = f(*x, y))
                }
            }
        }
    };
    if t.parallel() {
        v.par_chunks_mut(per_piece * t.stride).enumerate().for_each(piece);
    } else {
        piece((0, v));
    }
}

/// A `Unary` instruction in place over `t`'s rows in `v`: one loop per operation, so each
/// loop's body is one operation and vectorises (the `match` resolved outside it).
pub(super) fn unary_rows(op: UnaryOp, v: &mut [f32], t: Rows) {
    match op {
        UnaryOp::Copy => {}
        UnaryOp::Relu => rows_each(v, t, |x| unary(UnaryOp::Relu, x)),
        UnaryOp::Relu6 => rows_each(v, t, |x| unary(UnaryOp::Relu6, x)),
        UnaryOp::Neg => rows_each(v, t, |x| unary(UnaryOp::Neg, x)),
        UnaryOp::Exp => rows_each(v, t, |x| unary(UnaryOp::Exp, x)),
        UnaryOp::Log => rows_each(v, t, |x| unary(UnaryOp::Log, x)),
        UnaryOp::Sqrt => rows_each(v, t, |x| unary(UnaryOp::Sqrt, x)),
        UnaryOp::Rsqrt => rows_each(v, t, |x| unary(UnaryOp::Rsqrt, x)),
        UnaryOp::Square => rows_each(v, t, |x| unary(UnaryOp::Square, x)),
        UnaryOp::Reciprocal => rows_each(v, t, |x| unary(UnaryOp::Reciprocal, x)),
        UnaryOp::Cos => rows_each(v, t, |x| unary(UnaryOp::Cos, x)),
        UnaryOp::Scale(c) => rows_each(v, t, |x| unary(UnaryOp::Scale(c), x)),
        UnaryOp::AddScalar(c) => rows_each(v, t, |x| unary(UnaryOp::AddScalar(c), x)),
    }
}

/// A `Binary` instruction in place over `t`'s rows in `v` (see [`unary_rows`]), `b` with rows
/// `b_stride` apart.
pub(super) fn binary_rows(op: BinaryOp, v: &mut [f32], t: Rows, b: &[f32], b_stride: usize, mode: Broadcast) {
    // Each arm its own closure type, so each loop is compiled (and vectorised) for its operation.
    match op {
        BinaryOp::Add => rows_pair(v, t, b, b_stride, mode, |x, y| binary(BinaryOp::Add, x, y)),
        BinaryOp::Sub => rows_pair(v, t, b, b_stride, mode, |x, y| binary(BinaryOp::Sub, x, y)),
        BinaryOp::Mul => rows_pair(v, t, b, b_stride, mode, |x, y| binary(BinaryOp::Mul, x, y)),
        BinaryOp::Div => rows_pair(v, t, b, b_stride, mode, |x, y| binary(BinaryOp::Div, x, y)),
        BinaryOp::Max => rows_pair(v, t, b, b_stride, mode, |x, y| binary(BinaryOp::Max, x, y)),
        BinaryOp::Min => rows_pair(v, t, b, b_stride, mode, |x, y| binary(BinaryOp::Min, x, y)),
        BinaryOp::MaskPositive => rows_pair(v, t, b, b_stride, mode, |x, y| binary(BinaryOp::MaskPositive, x, y)),
        BinaryOp::MaskRelu6 => rows_pair(v, t, b, b_stride, mode, |x, y| binary(BinaryOp::MaskRelu6, x, y)),
    }
}

/// Copies `t`'s rows from `src` (rows `src_stride` apart) into `v`.
pub(super) fn copy_rows(v: &mut [f32], t: Rows, src: &[f32], src_stride: usize) {
    v.chunks_mut(t.stride)
        .enumerate()
        .for_each(|(r, row)| row[..t.cols].copy_from_slice(&src[r * src_stride..][..t.cols]));
}

/// How a `Binary` operand `b` pairs with `a`'s elements.
#[derive(Clone, Copy)]
pub(super) enum Broadcast {
    /// The same shape: element by element.
    Same,
    /// One row, used by every row of `a`.
    Row,
    /// One column: row `r` of `a` uses `b[r]`.
    Column,
}

impl Broadcast {
    /// The element of `b` that element `i` of `a` (rows of `cols`) pairs with.
    pub fn index(self, i: usize, cols: usize) -> usize {
        match self {
            Broadcast::Same => i,
            Broadcast::Row => i % cols,
            Broadcast::Column => i / cols,
        }
    }

    pub fn of(a: &Tile, b: &Tile) -> Broadcast {
        if b.rows == 1 && a.rows > 1 {
            Broadcast::Row
        } else if b.cols == 1 && a.cols > 1 {
            Broadcast::Column
        } else {
            Broadcast::Same
        }
    }
}

/// One element of a `Unary` instruction: the compiler's optimizer reference evaluates its
/// scalar programs with this, so both give the same bits.
#[inline(always)]
pub fn unary(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Copy => x,
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Relu6 => x.clamp(0.0, 6.0),
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Square => x * x,
        UnaryOp::Reciprocal => 1.0 / x,
        UnaryOp::Cos => x.cos(),
        UnaryOp::Scale(c) => x * c,
        UnaryOp::AddScalar(c) => x + c,
    }
}

/// One element of a `Binary` instruction (see [`unary`]).
#[inline(always)]
pub fn binary(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::MaskPositive => {
            if a > 0.0 {
                b
            } else {
                0.0
            }
        }
        BinaryOp::MaskRelu6 => {
            if a > 0.0 && a < 6.0 {
                b
            } else {
                0.0
            }
        }
    }
}

/// The in-image taps of window (oh, ow): rows and columns.
fn window_taps(s: &PoolShape, oh: i64, ow: i64) -> (std::ops::Range<i64>, std::ops::Range<i64>) {
    let (h, w) = (s.h as i64, s.w as i64);
    let (h0, w0) = (oh * s.strides[0] as i64 - s.pad[0] as i64, ow * s.strides[1] as i64 - s.pad[1] as i64);
    (h0.max(0)..(h0 + s.window[0] as i64).min(h), w0.max(0)..(w0 + s.window[1] as i64).min(w))
}

/// The pooling gradient (see [`Operation::PoolGrad`]): windows in order, channels independent.
pub(super) fn pool_grad(op: PoolOp, s: &PoolShape, x: Option<&[f32]>, dy: &[f32], c: usize) -> Vec<f32> {
    let (h, w) = (s.h as i64, s.w as i64);
    let img = (h * w) as usize * c;
    let mut dx = vec![0f32; s.n as usize * img];
    // Images on every thread: each writes only its own image's gradient, in window order.
    dx.par_chunks_mut(img).enumerate().for_each(|(n, dx)| {
        for oh in 0..s.out_h as i64 {
            for ow in 0..s.out_w as i64 {
                let (rows, cols) = window_taps(s, oh, ow);
                let at = |ih: i64, iw: i64, ch: usize| n * img + (ih * w + iw) as usize * c + ch;
                let d = &dy[((n as i64 * s.out_h as i64 + oh) * s.out_w as i64 + ow) as usize * c..][..c];
                match (op, x) {
                    (PoolOp::Max, Some(x)) => {
                        for (ch, &dv) in d.iter().enumerate() {
                            // The first maximum in window order takes the gradient.
                            let mut best: Option<(f32, usize)> = None;
                            for ih in rows.clone() {
                                for iw in cols.clone() {
                                    let i = at(ih, iw, ch);
                                    if best.is_none_or(|(b, _)| x[i] > b) {
                                        best = Some((x[i], i));
                                    }
                                }
                            }
                            if let Some((_, i)) = best {
                                dx[i - n * img] += dv;
                            }
                        }
                    }
                    _ => {
                        let count = (rows.end - rows.start) as f32 * (cols.end - cols.start) as f32;
                        for ih in rows.clone() {
                            for iw in cols.clone() {
                                for (ch, &dv) in d.iter().enumerate() {
                                    dx[at(ih, iw, ch) - n * img] += dv / count;
                                }
                            }
                        }
                    }
                }
            }
        }
    });
    dx
}

/// Pooling over `n` NHWC images stored as `n·h·w × c` rows: each output row (one image row
/// of windows) on any thread, every window's taps in order over all channels at once.
pub(super) fn pool(op: PoolOp, s: &PoolShape, v: &[f32], c: usize) -> Vec<f32> {
    let (h, w, out_h, out_w) = (s.h as i64, s.w as i64, s.out_h as usize, s.out_w as usize);
    let mut out = vec![0f32; s.n as usize * out_h * out_w * c];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(out_w * c).enumerate().for_each(|(row, out)| {
        let (img, oh) = ((row / out_h) as i64, (row % out_h) as i64);
        for (ow, acc) in out.chunks_exact_mut(c).enumerate() {
            acc.fill(if op == PoolOp::Max { f32::NEG_INFINITY } else { 0.0 });
            let mut count = 0u32;
            for i in 0..s.window[0] as i64 {
                for j in 0..s.window[1] as i64 {
                    let ih = oh * s.strides[0] as i64 + i - s.pad[0] as i64;
                    let iw = ow as i64 * s.strides[1] as i64 + j - s.pad[1] as i64;
                    if ih < 0 || iw < 0 || ih >= h || iw >= w {
                        continue;
                    }
                    let x = &v[((img * h + ih) * w + iw) as usize * c..][..c];
                    match op {
                        PoolOp::Max => acc.iter_mut().zip(x).for_each(|(a, &x)| *a = if x > *a { x } else { *a }),
                        PoolOp::Avg => acc.iter_mut().zip(x).for_each(|(a, &x)| *a += x),
                    }
                    count += 1;
                }
            }
            if op == PoolOp::Avg {
                acc.iter_mut().for_each(|a| *a /= count.max(1) as f32);
            }
        }
    });
    out
}

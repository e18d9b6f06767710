//! Max, average and global-average pooling, forward and backward, NHWC.
//!
//! Loops run over output rows in parallel and over channels innermost (contiguous in NHWC).
//! Max pooling sends the gradient to the first maximum of each window in (row, column) order;
//! average pooling divides by the number of window taps that fall inside the image.

use rayon::prelude::*;

use crate::graph::Window2d;

/// The geometry of one pooling window, resolved for concrete shapes.
#[derive(Clone, Copy, Debug)]
pub struct PoolGeom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub win: Window2d,
}

impl PoolGeom {
    /// The input rows and columns covered by output `(oh, ow)`, clipped to the image.
    #[inline]
    fn span(&self, oh: usize, ow: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let h0 = (oh * self.sh) as isize - self.win.pad_top as isize;
        let w0 = (ow * self.sw) as isize - self.win.pad_left as isize;
        let clip = |start: isize, len: usize, limit: usize| {
            start.max(0) as usize..((start + len as isize).max(0) as usize).min(limit)
        };
        (clip(h0, self.kh, self.h), clip(w0, self.kw, self.w))
    }

    fn out_len(&self) -> usize {
        self.n * self.win.out_h * self.win.out_w * self.c
    }
}

pub fn max_forward(g: &PoolGeom, x: &[f32]) -> Vec<f32> {
    let mut y = vec![f32::NEG_INFINITY; g.out_len()];
    let row_len = g.win.out_w * g.c;
    y.par_chunks_mut(row_len).enumerate().for_each(|(r, yrow)| {
        let (n, oh) = (r / g.win.out_h, r % g.win.out_h);
        for ow in 0..g.win.out_w {
            let out = &mut yrow[ow * g.c..(ow + 1) * g.c];
            let (rows, cols) = g.span(oh, ow);
            for ih in rows {
                for iw in cols.clone() {
                    let xs = &x[((n * g.h + ih) * g.w + iw) * g.c..][..g.c];
                    // A select rather than a branch, so the channel loop vectorises.
                    for (o, &v) in out.iter_mut().zip(xs) {
                        *o = if v > *o || v.is_nan() { v } else { *o };
                    }
                }
            }
        }
    });
    y
}

pub fn max_backward(g: &PoolGeom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let img = g.h * g.w * g.c;
    let mut dx = vec![0f32; g.n * img];
    let ohw = g.win.out_h * g.win.out_w;
    dx.par_chunks_mut(img).enumerate().for_each(|(n, dx_img)| {
        let x_img = &x[n * img..(n + 1) * img];
        // Each channel's first maximum, found over the window's taps in order for all channels
        // at once (contiguous, selects rather than branches, so the loop vectorises).
        let (mut best, mut at) = (vec![f32::NEG_INFINITY; g.c], vec![usize::MAX; g.c]);
        for oh in 0..g.win.out_h {
            for ow in 0..g.win.out_w {
                let (rows, cols) = g.span(oh, ow);
                let d = &dy[(n * ohw + oh * g.win.out_w + ow) * g.c..][..g.c];
                best.fill(f32::NEG_INFINITY);
                at.fill(usize::MAX);
                for ih in rows {
                    for iw in cols.clone() {
                        let base = (ih * g.w + iw) * g.c;
                        let xs = &x_img[base..base + g.c];
                        for (ch, ((b, a), &v)) in best.iter_mut().zip(at.iter_mut()).zip(xs).enumerate() {
                            let take = *a == usize::MAX || v > *b;
                            *b = if take { v } else { *b };
                            *a = if take { base + ch } else { *a };
                        }
                    }
                }
                for (&a, &dv) in at.iter().zip(d) {
                    if a != usize::MAX {
                        dx_img[a] += dv;
                    }
                }
            }
        }
    });
    dx
}

pub fn avg_forward(g: &PoolGeom, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.out_len()];
    let row_len = g.win.out_w * g.c;
    y.par_chunks_mut(row_len).enumerate().for_each(|(r, yrow)| {
        let (n, oh) = (r / g.win.out_h, r % g.win.out_h);
        for ow in 0..g.win.out_w {
            let out = &mut yrow[ow * g.c..(ow + 1) * g.c];
            let (rows, cols) = g.span(oh, ow);
            let count = (rows.len() * cols.len()) as f32;
            for ih in rows {
                for iw in cols.clone() {
                    let xs = &x[((n * g.h + ih) * g.w + iw) * g.c..][..g.c];
                    out.iter_mut().zip(xs).for_each(|(o, &v)| *o += v);
                }
            }
            out.iter_mut().for_each(|o| *o /= count);
        }
    });
    y
}

pub fn avg_backward(g: &PoolGeom, dy: &[f32]) -> Vec<f32> {
    let img = g.h * g.w * g.c;
    let mut dx = vec![0f32; g.n * img];
    let ohw = g.win.out_h * g.win.out_w;
    dx.par_chunks_mut(img).enumerate().for_each(|(n, dx_img)| {
        for oh in 0..g.win.out_h {
            for ow in 0..g.win.out_w {
                let (rows, cols) = g.span(oh, ow);
                let count = (rows.len() * cols.len()) as f32;
                let d = &dy[(n * ohw + oh * g.win.out_w + ow) * g.c..][..g.c];
                for ih in rows {
                    for iw in cols.clone() {
                        let dst = &mut dx_img[(ih * g.w + iw) * g.c..][..g.c];
                        dst.iter_mut().zip(d).for_each(|(o, &v)| *o += v / count);
                    }
                }
            }
        }
    });
    dx
}

/// Mean over each image's pixels: `[n, h, w, c] -> [n, c]`, summed in pixel order.
pub fn global_avg_forward(n: usize, hw: usize, c: usize, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; n * c];
    y.par_chunks_mut(c).enumerate().for_each(|(img, out)| {
        for px in x[img * hw * c..(img + 1) * hw * c].chunks_exact(c) {
            out.iter_mut().zip(px).for_each(|(o, &v)| *o += v);
        }
        out.iter_mut().for_each(|o| *o /= hw as f32);
    });
    y
}

pub fn global_avg_backward(n: usize, hw: usize, c: usize, dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; n * hw * c];
    dx.par_chunks_mut(hw * c).enumerate().for_each(|(img, dx_img)| {
        let d = &dy[img * c..(img + 1) * c];
        for px in dx_img.chunks_exact_mut(c) {
            px.iter_mut().zip(d).for_each(|(o, &v)| *o = v / hw as f32);
        }
    });
    dx
}

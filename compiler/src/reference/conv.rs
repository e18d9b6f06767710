//! Convolutions in NHWC with HWIO kernels: forward, input-gradient and kernel-gradient.
//!
//! Dense and grouped convolutions gather input patches into a row-major panel (im2col, one
//! block of output pixels at a time so the panel stays in cache) and multiply it with the kernel
//! seen as a `[kh·kw·cin_g, cout]` matrix; 1×1 stride-1 convolutions skip the gather. Depthwise
//! convolutions (one input channel per group) have too little reduction depth for a matrix
//! product, so they run as direct loops vectorised over channels.

use rayon::prelude::*;

use super::gemm::{self, MatRef, matmul, row_block};
use crate::graph::{Conv2d, Window2d};

/// The geometry of one convolution, resolved for concrete shapes.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub co: usize,
    pub groups: usize,
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    pub win: Window2d,
}

impl ConvGeom {
    pub fn new(conv: &Conv2d, x: [usize; 4], kernel: [usize; 4]) -> ConvGeom {
        let [n, h, w, c] = x;
        let [kh, kw, _, co] = kernel;
        let win = conv.window([h, w], [kh, kw]).expect("shapes were checked when the node was added");
        ConvGeom {
            n,
            h,
            w,
            c,
            kh,
            kw,
            co,
            groups: conv.groups,
            sh: conv.strides[0],
            sw: conv.strides[1],
            dh: conv.dilation[0],
            dw: conv.dilation[1],
            win,
        }
    }

    pub fn cin_g(&self) -> usize {
        self.c / self.groups
    }

    pub fn cout_g(&self) -> usize {
        self.co / self.groups
    }

    /// Reduction depth of one group's matrix product.
    pub fn depth(&self) -> usize {
        self.kh * self.kw * self.cin_g()
    }

    pub fn out_pixels_per_image(&self) -> usize {
        self.win.out_h * self.win.out_w
    }

    /// A 1×1, stride-1, unpadded convolution: output pixels are input pixels, so the input
    /// is already the im2col matrix. (Padding on any side adds output pixels.)
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.sh == 1
            && self.sw == 1
            && self.win.out_h == self.h
            && self.win.out_w == self.w
            && self.win.pad_top == 0
            && self.win.pad_left == 0
            && self.groups == 1
    }

    pub(crate) fn is_depthwise(&self) -> bool {
        self.cin_g() == 1 && self.groups > 1
    }

    /// Input row and column read by output `(oh, ow)` at kernel tap `(i, j)`, if inside.
    #[inline]
    fn tap(&self, oh: usize, ow: usize, i: usize, j: usize) -> Option<(usize, usize)> {
        let ih = (oh * self.sh + i * self.dh).checked_sub(self.win.pad_top)?;
        let iw = (ow * self.sw + j * self.dw).checked_sub(self.win.pad_left)?;
        (ih < self.h && iw < self.w).then_some((ih, iw))
    }

    /// Gathers the patches of output pixels `p0 .. p0 + rows` (flattened over n, oh, ow) of
    /// channel group `g` into `panel` (`rows × depth`, row-major); taps outside are zero.
    fn im2col(&self, x: &[f32], g: usize, p0: usize, rows: usize, panel: &mut [f32]) {
        let (depth, ohw) = (self.depth(), self.out_pixels_per_image());
        let runs = self.taps_are_runs();
        for r in 0..rows {
            let p = p0 + r;
            let (img, rem) = (p / ohw, p % ohw);
            let (oh, ow) = (rem / self.win.out_w, rem % self.win.out_w);
            let row = &mut panel[r * depth..(r + 1) * depth];
            if runs {
                self.gather_runs(x, img, oh, ow, row);
            } else {
                self.gather_taps(x, g, img, oh, ow, row);
            }
        }
    }

    /// One panel row of [`Self::im2col`], tap by tap: the definition [`Self::gather_runs`]
    /// must equal.
    fn gather_taps(&self, x: &[f32], g: usize, img: usize, oh: usize, ow: usize, row: &mut [f32]) {
        let cg = self.cin_g();
        for i in 0..self.kh {
            for j in 0..self.kw {
                let dst = &mut row[(i * self.kw + j) * cg..(i * self.kw + j + 1) * cg];
                match self.tap(oh, ow, i, j) {
                    Some((ih, iw)) => {
                        let src = ((img * self.h + ih) * self.w + iw) * self.c + g * cg;
                        dst.copy_from_slice(&x[src..src + cg]);
                    }
                    None => dst.fill(0.0),
                }
            }
        }
    }

    /// Whether every kernel row's taps are one contiguous run of the input: one group (so a
    /// pixel's channels are all taken) and no dilation along the width (so the taps' pixels
    /// are adjacent). Then [`Self::im2col`] and [`Self::col2im_add`] copy or add a kernel row
    /// at once instead of tap by tap (the 7 x 7 first convolution's taps are 3 channels each).
    fn taps_are_runs(&self) -> bool {
        self.cin_g() == self.c && self.dw == 1
    }

    /// The taps `j0..j1` of a kernel row that read inside the input for output column `ow`
    /// (tap j reads column `ow * sw + j - pad_left`), and the first one's input column.
    fn inside_taps(&self, ow: usize) -> (usize, usize, usize) {
        let (base, pad_left) = (ow * self.sw, self.win.pad_left);
        let j0 = pad_left.saturating_sub(base).min(self.kw);
        let j1 = (self.w + pad_left).saturating_sub(base).clamp(j0, self.kw);
        (j0, j1, (base + j0).saturating_sub(pad_left))
    }

    /// The input row read by kernel row `i` for output row `oh`, if inside.
    fn input_row(&self, oh: usize, i: usize) -> Option<usize> {
        (oh * self.sh + i * self.dh).checked_sub(self.win.pad_top).filter(|&ih| ih < self.h)
    }

    /// One panel row of [`Self::im2col`] when [`Self::taps_are_runs`]: each kernel row's taps
    /// inside the input copied at once, the ones in the padding zeroed.
    fn gather_runs(&self, x: &[f32], img: usize, oh: usize, ow: usize, row: &mut [f32]) {
        let c = self.c;
        let (j0, j1, iw0) = self.inside_taps(ow);
        for (i, dst) in row.chunks_exact_mut(self.kw * c).enumerate() {
            match self.input_row(oh, i) {
                Some(ih) if j1 > j0 => {
                    dst[..j0 * c].fill(0.0);
                    let src = ((img * self.h + ih) * self.w + iw0) * c;
                    dst[j0 * c..j1 * c].copy_from_slice(&x[src..src + (j1 - j0) * c]);
                    dst[j1 * c..].fill(0.0);
                }
                _ => dst.fill(0.0),
            }
        }
    }

    /// The inverse of [`Self::im2col`] for one image: adds each panel entry back into `dx`.
    fn col2im_add(&self, panel: &[f32], g: usize, p0: usize, rows: usize, dx_img: &mut [f32]) {
        let depth = self.depth();
        let runs = self.taps_are_runs();
        for r in 0..rows {
            let p = p0 + r;
            let (oh, ow) = (p / self.win.out_w, p % self.win.out_w);
            let row = &panel[r * depth..(r + 1) * depth];
            if runs {
                self.scatter_runs(row, oh, ow, dx_img);
            } else {
                self.scatter_taps(row, g, oh, ow, dx_img);
            }
        }
    }

    /// One panel row of [`Self::col2im_add`], tap by tap: the definition
    /// [`Self::scatter_runs`] must equal.
    fn scatter_taps(&self, row: &[f32], g: usize, oh: usize, ow: usize, dx_img: &mut [f32]) {
        let cg = self.cin_g();
        for i in 0..self.kh {
            for j in 0..self.kw {
                if let Some((ih, iw)) = self.tap(oh, ow, i, j) {
                    let dst = (ih * self.w + iw) * self.c + g * cg;
                    let src = &row[(i * self.kw + j) * cg..(i * self.kw + j + 1) * cg];
                    dx_img[dst..dst + cg].iter_mut().zip(src).for_each(|(d, s)| *d += s);
                }
            }
        }
    }

    /// One panel row of [`Self::col2im_add`] when [`Self::taps_are_runs`]: each kernel row's
    /// taps inside the input added at once. A row's taps reach distinct input values, so every
    /// value takes its additions in the tap-wise order.
    fn scatter_runs(&self, row: &[f32], oh: usize, ow: usize, dx_img: &mut [f32]) {
        let c = self.c;
        let (j0, j1, iw0) = self.inside_taps(ow);
        for i in 0..self.kh {
            if let Some(ih) = self.input_row(oh, i).filter(|_| j1 > j0) {
                let dst = (ih * self.w + iw0) * c;
                let src = &row[(i * self.kw + j0) * c..(i * self.kw + j1) * c];
                dx_img[dst..dst + src.len()].iter_mut().zip(src).for_each(|(d, s)| *d += s);
            }
        }
    }
}

/// `y = conv(x, kernel)`: x `[n, h, w, c]`, kernel HWIO; returns `[n, oh, ow, co]` row-major.
pub fn forward(g: &ConvGeom, x: &[f32], kernel: &[f32]) -> Vec<f32> {
    let pixels = g.n * g.out_pixels_per_image();
    let mut y = vec![0f32; pixels * g.co];
    if g.is_depthwise() {
        depthwise_forward(g, x, kernel, &mut y);
        return y;
    }
    if g.is_pointwise() {
        gemm::par_matmul(pixels, g.c, g.co, MatRef::rows(x, g.c), MatRef::rows(kernel, g.co), &mut y);
        return y;
    }
    let (depth, cog) = (g.depth(), g.cout_g());
    let block = row_block(depth);
    let w = MatRef::rows(kernel, g.co);
    y.par_chunks_mut(block * g.co).enumerate().for_each_init(Vec::new, |panel, (bi, yb)| {
        let rows = yb.len() / g.co;
        panel.resize(rows * depth, 0.0);
        for grp in 0..g.groups {
            g.im2col(x, grp, bi * block, rows, panel);
            matmul(
                rows,
                depth,
                cog,
                MatRef::rows(panel, depth),
                w.col_offset(grp * cog),
                &mut yb[grp * cog..],
                g.co,
                false,
            );
        }
    });
    y
}

/// `dx` of a convolution from `dy` `[n, oh, ow, co]` and the kernel; returns `[n, h, w, c]`.
pub fn backprop_input(g: &ConvGeom, dy: &[f32], kernel: &[f32]) -> Vec<f32> {
    let img = g.h * g.w * g.c;
    let mut dx = vec![0f32; g.n * img];
    if g.is_depthwise() {
        depthwise_backprop_input(g, dy, kernel, &mut dx);
        return dx;
    }
    let ohw = g.out_pixels_per_image();
    if g.is_pointwise() {
        let wt = MatRef::rows(kernel, g.co).t();
        gemm::par_matmul(g.n * ohw, g.co, g.c, MatRef::rows(dy, g.co), wt, &mut dx);
        return dx;
    }
    let (depth, cog) = (g.depth(), g.cout_g());
    let block = row_block(depth);
    let wt = MatRef::rows(kernel, g.co).t();
    dx.par_chunks_mut(img).enumerate().for_each_init(Vec::new, |panel, (n, dx_img)| {
        let dy_img = &dy[n * ohw * g.co..(n + 1) * ohw * g.co];
        for p0 in (0..ohw).step_by(block) {
            let rows = block.min(ohw - p0);
            panel.resize(rows * depth, 0.0);
            for grp in 0..g.groups {
                let dyb = MatRef::rows(&dy_img[p0 * g.co..], g.co).col_offset(grp * cog);
                matmul(rows, cog, depth, dyb, wt.row_offset(grp * cog), panel, depth, false);
                g.col2im_add(panel, grp, p0, rows, dx_img);
            }
        }
    });
    dx
}

/// Images per partial kernel gradient: at most 16 partials, whatever the thread count.
pub(crate) fn images_per_partial(n: usize) -> usize {
    n.div_ceil(16).max(1)
}

/// `dkernel` of a convolution from `x` and `dy`; returns HWIO `[kh, kw, c / groups, co]`.
pub fn backprop_filter(g: &ConvGeom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (depth, cog, ohw) = (g.depth(), g.cout_g(), g.out_pixels_per_image());
    let len = depth * g.co;
    if g.is_pointwise() {
        return gemm::par_matmul_tn(g.n * ohw, g.c, g.co, x, dy);
    }
    let per = images_per_partial(g.n);
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(per))
        .into_par_iter()
        .map(|chunk| {
            let mut dk = vec![0f32; len];
            if g.is_depthwise() {
                depthwise_backprop_filter(g, x, dy, chunk * per..((chunk + 1) * per).min(g.n), &mut dk);
                return dk;
            }
            let block = row_block(depth);
            let mut panel = Vec::new();
            let mut first = true;
            for n in chunk * per..((chunk + 1) * per).min(g.n) {
                for p0 in (0..ohw).step_by(block) {
                    let rows = block.min(ohw - p0);
                    panel.resize(rows * depth, 0.0);
                    let dyb = &dy[(n * ohw + p0) * g.co..];
                    for grp in 0..g.groups {
                        g.im2col(x, grp, n * ohw + p0, rows, &mut panel);
                        let at = MatRef::rows(&panel, depth).t();
                        let b = MatRef::rows(dyb, g.co).col_offset(grp * cog);
                        matmul(depth, rows, cog, at, b, &mut dk[grp * cog..], g.co, !first);
                    }
                    first = false;
                }
            }
            dk
        })
        .collect();
    gemm::sum_in_order(partials, len)
}

/// Depthwise forward: `y[.., c·m + j] = Σ_taps x[.., c] · k[i, j, 0, c·m + j]`, in tap order.
fn depthwise_forward(g: &ConvGeom, x: &[f32], kernel: &[f32], y: &mut [f32]) {
    let mult = g.cout_g();
    let row_len = g.win.out_w * g.co;
    y.par_chunks_mut(row_len).enumerate().for_each(|(r, yrow)| {
        let (n, oh) = (r / g.win.out_h, r % g.win.out_h);
        for ow in 0..g.win.out_w {
            let out = &mut yrow[ow * g.co..(ow + 1) * g.co];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let Some((ih, iw)) = g.tap(oh, ow, i, j) else {
                        continue;
                    };
                    let xs = &x[((n * g.h + ih) * g.w + iw) * g.c..][..g.c];
                    let ks = &kernel[(i * g.kw + j) * g.co..][..g.co];
                    if mult == 1 {
                        for ((o, &xv), &kv) in out.iter_mut().zip(xs).zip(ks) {
                            *o += xv * kv;
                        }
                    } else {
                        for (oc, o) in out.iter_mut().enumerate() {
                            *o += xs[oc / mult] * ks[oc];
                        }
                    }
                }
            }
        }
    });
}

fn depthwise_backprop_input(g: &ConvGeom, dy: &[f32], kernel: &[f32], dx: &mut [f32]) {
    let mult = g.cout_g();
    let img = g.h * g.w * g.c;
    let ohw = g.out_pixels_per_image();
    dx.par_chunks_mut(img).enumerate().for_each(|(n, dx_img)| {
        for oh in 0..g.win.out_h {
            for ow in 0..g.win.out_w {
                let d = &dy[((n * ohw) + oh * g.win.out_w + ow) * g.co..][..g.co];
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let Some((ih, iw)) = g.tap(oh, ow, i, j) else {
                            continue;
                        };
                        let dst = &mut dx_img[(ih * g.w + iw) * g.c..][..g.c];
                        let ks = &kernel[(i * g.kw + j) * g.co..][..g.co];
                        for (oc, (&dv, &kv)) in d.iter().zip(ks).enumerate() {
                            dst[oc / mult] += dv * kv;
                        }
                    }
                }
            }
        }
    });
}

fn depthwise_backprop_filter(g: &ConvGeom, x: &[f32], dy: &[f32], images: std::ops::Range<usize>, dk: &mut [f32]) {
    let mult = g.cout_g();
    let ohw = g.out_pixels_per_image();
    for n in images {
        for oh in 0..g.win.out_h {
            for ow in 0..g.win.out_w {
                let d = &dy[((n * ohw) + oh * g.win.out_w + ow) * g.co..][..g.co];
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let Some((ih, iw)) = g.tap(oh, ow, i, j) else {
                            continue;
                        };
                        let xs = &x[((n * g.h + ih) * g.w + iw) * g.c..][..g.c];
                        let ks = &mut dk[(i * g.kw + j) * g.co..][..g.co];
                        for (oc, (k, &dv)) in ks.iter_mut().zip(d).enumerate() {
                            *k += xs[oc / mult] * dv;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::graph::Padding;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// The run-wise gather copies exactly what the tap-wise one does, padding and strides
        /// included (every input value distinct, so a wrong tap shows), and the run-wise
        /// scatter adds the same values in the same order.
        #[test]
        fn runs_gather_and_scatter_what_taps_do(
            (n, h, w, c) in (1usize..=2, 1usize..=9, 1usize..=9, 1usize..=4),
            (kh, kw) in (1usize..=7, 1usize..=7),
            (sh, sw, dh) in (1usize..=3, 1usize..=3, 1usize..=2),
            (top, bottom, left, right) in (0usize..=3, 0usize..=3, 0usize..=3, 0usize..=3),
            same in any::<bool>(),
        ) {
            let padding = if same { Padding::Same } else { Padding::Explicit { top, bottom, left, right } };
            let conv = Conv2d { strides: [sh, sw], padding, dilation: [dh, 1], groups: 1 };
            prop_assume!(conv.window([h, w], [kh, kw]).is_ok());
            let g = ConvGeom::new(&conv, [n, h, w, c], [kh, kw, c, 2]);
            prop_assume!(g.win.out_h > 0 && g.win.out_w > 0);
            let x: Vec<f32> = (0..n * h * w * c).map(|i| i as f32 + 1.0).collect();
            let depth = g.depth();
            let (mut runs, mut taps) = (vec![f32::NAN; depth], vec![f32::NAN; depth]);
            for p in 0..n * g.out_pixels_per_image() {
                let (img, rem) = (p / g.out_pixels_per_image(), p % g.out_pixels_per_image());
                let (oh, ow) = (rem / g.win.out_w, rem % g.win.out_w);
                g.gather_runs(&x, img, oh, ow, &mut runs);
                g.gather_taps(&x, 0, img, oh, ow, &mut taps);
                prop_assert_eq!(&runs, &taps, "pixel {}", p);
            }
            // And the inverse: every pixel's panel row added back into one image, in the
            // same order by both (values whose sums round, so an order change would show).
            let img = h * w * c;
            let (mut by_runs, mut by_taps) = (vec![0f32; img], vec![0f32; img]);
            for p in 0..g.out_pixels_per_image() {
                let row: Vec<f32> = (0..depth).map(|i| 0.1 + (p * depth + i) as f32 * 1.37e-3).collect();
                let (oh, ow) = (p / g.win.out_w, p % g.win.out_w);
                g.scatter_runs(&row, oh, ow, &mut by_runs);
                g.scatter_taps(&row, 0, oh, ow, &mut by_taps);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&by_runs), bits(&by_taps));
        }
    }
}

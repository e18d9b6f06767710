//! Batch normalisation over the last axis, forward and backward.
//!
//! Statistics are accumulated in f64 over fixed row chunks combined in order (see
//! [`super::gemm::column_sums`]), so they are exact to f32 rounding and identical for any thread
//! count. With `x̂ = (x - μ) / σ`, `σ = sqrt(var + ε)` and `m` rows per channel:
//! - training: `dx = γ/σ · (dy - mean(dy) - x̂ · mean(dy · x̂))` (μ and σ depend on x);
//! - inference: `dx = γ/σ · dy` (moving statistics are constants).
//!
//! `dγ = Σ dy · x̂` in both modes; `dβ = Σ dy` is a BiasAddGrad.

use rayon::prelude::*;

use super::gemm::{column_fold, column_sums};

/// Per-channel mean and biased variance of a row-major `rows × c` matrix.
pub fn moments(x: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = (x.len() / c.max(1)) as f64;
    let mean: Vec<f64> = column_sums(x, c, |_, v| v as f64).into_iter().map(|s| s / rows).collect();
    let squares = |acc: &mut [f64], row: &[f32]| {
        for ((a, &v), &m) in acc.iter_mut().zip(row).zip(&mean) {
            *a += (v as f64 - m).powi(2);
        }
    };
    let var: Vec<f64> = column_fold(x, c, squares).into_iter().map(|s| s / rows).collect();
    (mean, var)
}

/// The statistics a batch-norm node normalises with: the batch's in training, else the moving.
pub struct Stats {
    pub mean: Vec<f64>,
    pub inv_std: Vec<f64>,
}

impl Stats {
    pub fn new(mean: Vec<f64>, var: &[f64], epsilon: f32) -> Stats {
        let inv_std = var.iter().map(|v| 1.0 / (v + epsilon as f64).sqrt()).collect();
        Stats { mean, inv_std }
    }
}

/// `x ← γ · (x - μ) / σ + β`, in `x`'s own buffer.
pub fn forward_in_place(x: &mut [f32], c: usize, stats: &Stats, gamma: &[f32], beta: &[f32]) {
    let scale: Vec<f32> = (0..c).map(|ch| (gamma[ch] as f64 * stats.inv_std[ch]) as f32).collect();
    let shift: Vec<f32> =
        (0..c).map(|ch| (beta[ch] as f64 - stats.mean[ch] * gamma[ch] as f64 * stats.inv_std[ch]) as f32).collect();
    x.par_chunks_mut(c * BLOCK_ROWS).for_each(|block| {
        for row in block.chunks_exact_mut(c) {
            for ((v, &a), &b) in row.iter_mut().zip(&scale).zip(&shift) {
                *v = *v * a + b;
            }
        }
    });
}

/// Rows per parallel block of the elementwise passes.
const BLOCK_ROWS: usize = 64;

/// `dy · x̂` elementwise, a block of rows per task and a row's channels in one zipped loop
/// (no index arithmetic per element, so it vectorises).
fn xhat_times_dy(x: &[f32], dy: &[f32], c: usize, stats: &Stats) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let block = c.max(1) * BLOCK_ROWS;
    out.par_chunks_mut(block).zip(x.par_chunks(block)).zip(dy.par_chunks(block)).for_each(|((o, xb), db)| {
        for ((orow, xrow), drow) in o.chunks_exact_mut(c).zip(xb.chunks_exact(c)).zip(db.chunks_exact(c)) {
            let channels = stats.mean.iter().zip(&stats.inv_std);
            for (((o, &xv), &d), (&mean, &inv_std)) in orow.iter_mut().zip(xrow).zip(drow).zip(channels) {
                *o = (d as f64 * (xv as f64 - mean) * inv_std) as f32;
            }
        }
    });
    out
}

/// `Σ dy · x̂` per channel, in f64: γ's gradient (rounded to f32) and, over the rows, a term of
/// the input gradient in training.
pub fn sum_xhat_dy(x: &[f32], dy: &[f32], c: usize, stats: &Stats) -> Vec<f64> {
    column_sums(&xhat_times_dy(x, dy, c, stats), c, |_, v| v as f64)
}

/// `Σ dy` per channel, in f64: β's gradient (a BiasAddGrad, rounded to f32) and, over the
/// rows, a term of the input gradient in training.
pub fn sum_dy(dy: &[f32], c: usize) -> Vec<f64> {
    column_sums(dy, c, |_, v| v as f64)
}

/// The input gradient. In training the statistics depend on x, and `sums` holds `Σ dy` and
/// `Σ dy · x̂` per channel ([`sum_dy`], [`sum_xhat_dy`]); at inference it is `None`.
pub fn grad_input(
    x: &[f32],
    dy: &[f32],
    c: usize,
    stats: &Stats,
    gamma: &[f32],
    sums: Option<(&[f64], &[f64])>,
) -> Vec<f32> {
    let rows = (x.len() / c.max(1)) as f64;
    let (mean_dy, mean_dy_xhat) = match sums {
        Some((sum_dy, sum_xhat_dy)) => {
            (sum_dy.iter().map(|s| s / rows).collect(), sum_xhat_dy.iter().map(|s| s / rows).collect())
        }
        None => (vec![0f64; c], vec![0f64; c]),
    };
    // Per channel: (μ, 1/σ, γ/σ, mean(dy), mean(dy · x̂)), each computed as before.
    let channel: Vec<[f64; 5]> = (0..c)
        .map(|ch| {
            let inv_std = stats.inv_std[ch];
            [stats.mean[ch], inv_std, gamma[ch] as f64 * inv_std, mean_dy[ch], mean_dy_xhat[ch]]
        })
        .collect();
    let mut dx = vec![0f32; x.len()];
    let block = c.max(1) * BLOCK_ROWS;
    dx.par_chunks_mut(block).zip(x.par_chunks(block)).zip(dy.par_chunks(block)).for_each(|((o, xb), db)| {
        for ((orow, xrow), drow) in o.chunks_exact_mut(c).zip(xb.chunks_exact(c)).zip(db.chunks_exact(c)) {
            for (((o, &xv), &d), &[mean, inv_std, g, mdy, mdyx]) in orow.iter_mut().zip(xrow).zip(drow).zip(&channel) {
                let xhat = (xv as f64 - mean) * inv_std;
                *o = (g * (d as f64 - mdy - xhat * mdyx)) as f32;
            }
        }
    });
    dx
}

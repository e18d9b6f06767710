//! Softmax and softmax cross-entropy over the last axis.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Softmax of each row of a row-major `rows × c` matrix (max-subtracted for stability).
pub fn softmax(x: &[f32], c: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    y.par_chunks_mut(c).for_each(|row| {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f64;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v as f64;
        }
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    });
    y
}

/// `dx = y · (dy - Σ dy·y)` per row.
pub fn softmax_grad(y: &[f32], dy: &[f32], c: usize) -> Vec<f32> {
    let mut dx = vec![0f32; y.len()];
    dx.par_chunks_mut(c).zip(y.par_chunks(c).zip(dy.par_chunks(c))).for_each(|(dr, (yr, dyr))| {
        let dot: f64 = yr.iter().zip(dyr).map(|(&a, &b)| a as f64 * b as f64).sum();
        for ((d, &yv), &g) in dr.iter_mut().zip(yr).zip(dyr) {
            *d = (yv as f64 * (g as f64 - dot)) as f32;
        }
    });
    dx
}

/// Checks that every label is an integer class id in `[0, classes)`.
pub fn check_labels(name: &str, labels: &[f32], classes: usize) -> Result<Vec<usize>> {
    labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            if l.fract() == 0.0 && l >= 0.0 && (l as usize) < classes {
                Ok(l as usize)
            } else {
                Err(Error::binding(
                    name,
                    format!("label {l} of example {i} is not a class id in [0, {classes}); labels must be integers"),
                ))
            }
        })
        .collect()
}

/// Target distribution weight of class `k` for label `label`.
#[inline]
fn target(k: usize, label: usize, classes: usize, smoothing: f32) -> f64 {
    let s = smoothing as f64;
    (if k == label { 1.0 - s } else { 0.0 }) + s / classes as f64
}

/// Mean over rows of `-Σ_k q_k · log softmax(z)_k`, computed as `logsumexp(z) - Σ q_k z_k`.
pub fn cross_entropy(logits: &[f32], labels: &[usize], c: usize, smoothing: f32) -> f32 {
    let per_row: Vec<f64> = logits
        .par_chunks(c)
        .zip(labels.par_iter())
        .map(|(row, &label)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            let dot: f64 = row.iter().enumerate().map(|(k, &v)| target(k, label, c, smoothing) * v as f64).sum();
            lse - dot
        })
        .collect();
    (per_row.iter().sum::<f64>() / labels.len() as f64) as f32
}

/// The gradient of the mean loss: `(softmax(z) - q) / rows`.
pub fn cross_entropy_grad(logits: &[f32], labels: &[usize], c: usize, smoothing: f32) -> Vec<f32> {
    let mut d = softmax(logits, c);
    let rows = labels.len() as f64;
    d.par_chunks_mut(c).zip(labels.par_iter()).for_each(|(row, &label)| {
        for (k, v) in row.iter_mut().enumerate() {
            *v = ((*v as f64 - target(k, label, c, smoothing)) / rows) as f32;
        }
    });
    d
}

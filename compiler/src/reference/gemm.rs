//! Matrix products and reductions for the reference, deterministic across thread counts.
//!
//! The rule that makes results bit-identical for any number of threads: work is split into
//! blocks whose boundaries depend only on the problem's shape, each block is computed by one
//! single-threaded kernel, and partial sums are combined in block order. The inner kernel is the
//! `gemm` crate (runtime-dispatched AVX-512/AVX2/NEON micro-kernels), always called with
//! `Parallelism::None`.

use rayon::prelude::*;

/// A strided read-only matrix view over a slice: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix (`cols` is the row stride).
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        MatRef { data, rs: cols, cs: 1 }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rs: self.cs, cs: self.rs }
    }

    /// The view starting at column `j`.
    pub fn col_offset(self, j: usize) -> Self {
        MatRef { data: &self.data[j * self.cs..], ..self }
    }

    /// The view starting at row `i`.
    pub fn row_offset(self, i: usize) -> Self {
        MatRef { data: &self.data[i * self.rs..], ..self }
    }

    fn fits(&self, m: usize, n: usize) -> bool {
        m == 0 || n == 0 || (m - 1) * self.rs + (n - 1) * self.cs < self.data.len()
    }
}

/// `c[m×n] = a[m×k] · b[k×n]` (or `+=` with `accumulate`), `c` with row stride `ldc`.
/// Single-threaded; the sum over `k` happens in a fixed order for a given shape.
#[allow(clippy::too_many_arguments)] // BLAS-style: three shapes, three operands, a mode
pub fn matmul(m: usize, k: usize, n: usize, a: MatRef, b: MatRef, c: &mut [f32], ldc: usize, accumulate: bool) {
    assert!(a.fits(m, k) && b.fits(k, n), "matmul operand out of bounds");
    assert!(m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(), "matmul output out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                c[row * ldc..row * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the kernel touches inside the three slices,
    // all strides are non-negative, and `c` is borrowed mutably so it aliases nothing.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Rows per block for row-parallel products: about 256 KiB of the `k`-wide operand, so a block
/// stays in L2, and never fewer than 16 rows.
pub fn row_block(k: usize) -> usize {
    (65_536 / k.max(1)).clamp(16, 1024)
}

/// `c[m×n] = a[m×k] · b[k×n]` with row blocks in parallel; `c` is row-major `m × n`.
pub fn par_matmul(m: usize, k: usize, n: usize, a: MatRef, b: MatRef, c: &mut [f32]) {
    let block = row_block(k);
    c[..m * n].par_chunks_mut(block * n).enumerate().for_each(|(bi, cb)| {
        let rows = cb.len() / n;
        matmul(rows, k, n, a.row_offset(bi * block), b, cb, n, false);
    });
}

/// Rows per partial product of [`par_matmul_tn`] (each partial is `p × q`, all kept until summed).
pub const TN_CHUNK_ROWS: usize = 4096;

/// `aᵀ · b` for row-major `a[rows×p]` and `b[rows×q]`, summing over the (long) row axis: fixed
/// chunks of rows are multiplied in parallel and their partial products added in chunk order.
pub fn par_matmul_tn(rows: usize, p: usize, q: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    const CHUNK: usize = TN_CHUNK_ROWS;
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(CHUNK))
        .into_par_iter()
        .map(|ci| {
            let r0 = ci * CHUNK;
            let r = CHUNK.min(rows - r0);
            let mut out = vec![0f32; p * q];
            let at = MatRef::rows(&a[r0 * p..], p).t();
            matmul(p, r, q, at, MatRef::rows(&b[r0 * q..], q), &mut out, q, false);
            out
        })
        .collect();
    sum_in_order(partials, p * q)
}

/// Adds equally long vectors in the order given (deterministic whatever produced them).
pub fn sum_in_order(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    const BLOCK: usize = 16 * 1024;
    let mut iter = parts.into_iter();
    let mut acc = iter.next().unwrap_or_else(|| vec![0.0; len]);
    let rest: Vec<Vec<f32>> = iter.collect();
    // Every element adds the partials in their order, so blocks of elements run in parallel
    // with the bits of one sequential pass; a block takes every partial while it is in cache.
    acc.par_chunks_mut(BLOCK).enumerate().for_each(|(i, block)| {
        let at = i * BLOCK;
        for p in &rest {
            let len = block.len();
            block.iter_mut().zip(&p[at..at + len]).for_each(|(a, b)| *a += b);
        }
    });
    acc
}

/// Per-column sums (in f64) of `f(column, value)` over a row-major `rows × cols` matrix: fixed
/// row chunks in parallel, combined in order.
pub fn column_sums(data: &[f32], cols: usize, f: impl Fn(usize, f32) -> f64 + Sync) -> Vec<f64> {
    column_fold(data, cols, |acc, row| {
        for (c, (a, &v)) in acc.iter_mut().zip(row).enumerate() {
            *a += f(c, v);
        }
    })
}

/// The chunking of [`column_sums`] with the per-row step given whole (`add_row(acc, row)` adds
/// one row into the chunk's f64 sums), so a step that zips its own per-column operands
/// vectorises; the same chunks and order, so the same bits as the element-wise form.
pub fn column_fold(data: &[f32], cols: usize, add_row: impl Fn(&mut [f64], &[f32]) + Sync) -> Vec<f64> {
    const CHUNK_ROWS: usize = 1024;
    let rows = data.len().checked_div(cols).unwrap_or(0);
    let partials: Vec<Vec<f64>> = (0..rows.div_ceil(CHUNK_ROWS))
        .into_par_iter()
        .map(|ci| {
            let mut acc = vec![0f64; cols];
            let r0 = ci * CHUNK_ROWS;
            for row in data[r0 * cols..(r0 + CHUNK_ROWS).min(rows) * cols].chunks_exact(cols) {
                add_row(&mut acc, row);
            }
            acc
        })
        .collect();
    let mut acc = vec![0f64; cols];
    for p in partials {
        acc.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn matmul_and_transposed_products_match_naive() {
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
        let want = naive(m, k, n, &a, &b);
        let mut c = vec![0f32; m * n];
        par_matmul(m, k, n, MatRef::rows(&a, k), MatRef::rows(&b, n), &mut c);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-4);
        }
        // aᵀ·b over the row axis: (k×m)ᵀ · (k×n).
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let got = par_matmul_tn(k, m, n, &at, &b);
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() < 1e-4);
        }
    }
}

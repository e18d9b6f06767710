//! The fast MXU models against the PE-level array: the same bits and the same cycles on every
//! shape tried, including M, K, N that are not multiples of the array, for arrays from 2x2 to
//! 128x128, with and without weight double buffering, in every precision.

use proptest::prelude::*;
use systolic_simulator::mxu::kernel::{Matrix, matmul, matmul_reference};
use systolic_simulator::mxu::{Timeline, passes, pe_array};
use systolic_simulator::numerics::Precision;

fn values(n: usize, seed: u64) -> Vec<f32> {
    // Values with full f32 mantissas and mixed exponents, so rounding and ordering matter.
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mant = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            let exp = ((s >> 20) % 9) as i32 - 4;
            mant * 2f32.powi(exp)
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn precision() -> impl Strategy<Value = Precision> {
    prop_oneof![Just(Precision::Default), Just(Precision::High), Just(Precision::Highest)]
}

/// Runs all three models on one case and checks they agree.
#[allow(clippy::too_many_arguments)] // one case: shape, array, mode, seed
fn agree(m: usize, k: usize, n: usize, rows: usize, cols: usize, double: bool, p: Precision, seed: u64) {
    let a = values(m * k, seed);
    let b = values(k * n, seed + 1);
    let init = values(m * n, seed + 2);

    let mut fast = init.clone();
    matmul(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut fast, n, rows, p);
    let mut plain = init.clone();
    matmul_reference(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut plain, n, rows, p);
    let mut pe = init.clone();
    let run = pe_array::matmul(&a, &b, (m, k, n), rows, cols, double, p, &mut pe).unwrap();

    assert_eq!(bits(&fast), bits(&pe), "fast kernel vs PE array: {m}x{k}x{n} on {rows}x{cols} {p:?}");
    assert_eq!(bits(&plain), bits(&pe), "contract vs PE array: {m}x{k}x{n} on {rows}x{cols} {p:?}");

    let mut timeline = Timeline::new(rows, double);
    let ps = passes(m, k, n, rows, cols, p);
    let timings: Vec<_> = ps.iter().map(|&pass| timeline.schedule(pass, 0)).collect();
    assert_eq!(timings, run.timings, "per-pass timing: {m}x{k}x{n} on {rows}x{cols} double={double}");
    assert_eq!(timings.iter().map(|t| t.end).max().unwrap(), run.cycles, "cycles");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn small_arrays_agree_in_bits_and_cycles(
        (rows, cols) in (2usize..=12, 2usize..=12),
        (m, k, n) in (1usize..=20, 1usize..=40, 1usize..=40),
        double in any::<bool>(),
        p in precision(),
        seed in any::<u64>(),
    ) {
        agree(m, k, n, rows, cols, double, p, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn full_size_arrays_agree_in_bits_and_cycles(
        (m, k, n) in (1usize..=140, 1usize..=300, 1usize..=300),
        double in any::<bool>(),
        seed in any::<u64>(),
    ) {
        agree(m, k, n, 128, 128, double, Precision::Default, seed);
    }
}

#[test]
fn rectangular_and_extreme_shapes_agree() {
    agree(1, 1, 1, 2, 2, true, Precision::Default, 1);
    agree(3, 129, 257, 128, 128, true, Precision::High, 2);
    agree(200, 64, 16, 16, 64, false, Precision::Default, 3);
    agree(8, 256, 256, 128, 128, true, Precision::Highest, 4);
    agree(64, 7, 300, 4, 32, true, Precision::Default, 5);
}

#[test]
fn precision_modes_approach_the_f64_product() {
    // The worst relative error against an f64 reference falls sharply with each mode.
    let (m, k, n) = (64, 512, 64);
    let a = values(m * k, 11);
    let b = values(k * n, 12);
    let mut exact = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            exact[i * n + j] = (0..k).map(|kk| a[i * k + kk] as f64 * b[kk * n + j] as f64).sum();
        }
    }
    let scale = exact.iter().fold(0f64, |s, v| s.max(v.abs()));
    let error = |p: Precision| {
        let mut c = vec![0f32; m * n];
        matmul(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut c, n, 128, p);
        c.iter().zip(&exact).map(|(x, e)| (*x as f64 - e).abs()).fold(0f64, f64::max) / scale
    };
    let (d, h, hh) = (error(Precision::Default), error(Precision::High), error(Precision::Highest));
    // bf16 keeps 8 significant bits (relative rounding 2^-9 per input); f32 keeps 24.
    assert!(d > 1e-4 && d < 2e-2, "default {d:e}");
    assert!(h < 1e-4, "high {h:e}");
    assert!(hh < 2e-6, "highest {hh:e}");
    assert!(hh * 100.0 < d, "highest must be far closer than default: {hh:e} vs {d:e}");
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (m, k, n) = (300, 700, 260);
    let a = values(m * k, 21);
    let b = values(k * n, 22);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
            let mut c = vec![0f32; m * n];
            matmul(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut c, n, 128, Precision::High);
            bits(&c)
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
fn every_micro_kernel_gives_the_same_bits() {
    use systolic_simulator::mxu::kernel::{KernelChoice, force_kernel};
    let (m, k, n) = (37, 300, 70);
    let a = values(m * k, 31);
    let b = values(k * n, 32);
    let run = |choice: KernelChoice, p: Precision| {
        force_kernel(choice);
        let mut c = values(m * n, 33);
        matmul(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut c, n, 128, p);
        force_kernel(KernelChoice::Auto);
        bits(&c)
    };
    for p in [Precision::Default, Precision::Highest] {
        let mut plain = values(m * n, 33);
        matmul_reference(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut plain, n, 128, p);
        for choice in [KernelChoice::Portable, KernelChoice::Avx2, KernelChoice::Avx512] {
            if choice.available() {
                assert_eq!(run(choice, p), bits(&plain), "{choice:?} {p:?}");
            }
        }
    }
}

//! The fast MXU models against the PE-level array: the same bits and the same cycles on every
//! shape tried, including M, K, N that are not multiples of the array, for arrays from 2x2 to
//! 128x128, with and without weight double buffering, in every precision, in both timing
//! models (`core.mxu.timing`): Systolic's pipelined passes and SCALE-Sim's weight-stationary
//! folds, the latter also against SCALE-Sim's closed form.

use proptest::prelude::*;
use systolic_simulator::config::{Mxu, MxuTiming, presets};
use systolic_simulator::mxu::kernel::{Matrix, matmul, matmul_reference};
use systolic_simulator::mxu::{Timeline, matmul_cycles, passes, pe_array, scalesim_cycles};
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

/// Runs all three models on one case and checks they agree (pipelined timing).
#[allow(clippy::too_many_arguments)] // one case: shape, array, mode, seed
fn agree(m: usize, k: usize, n: usize, rows: usize, cols: usize, double: bool, p: Precision, seed: u64) {
    let mxu = Mxu { count: 1, rows, cols, weight_double_buffering: double, timing: MxuTiming::Pipelined };
    agree_on(&mxu, (m, k, n), p, seed);
}

/// Runs all three models on one case on one MXU, in its timing model, and checks they agree;
/// returns the cycles.
fn agree_on(mxu: &Mxu, (m, k, n): (usize, usize, usize), p: Precision, seed: u64) -> u64 {
    let (rows, cols, double) = (mxu.rows, mxu.cols, mxu.weight_double_buffering);
    let a = values(m * k, seed);
    let b = values(k * n, seed + 1);
    let init = values(m * n, seed + 2);

    let mut fast = init.clone();
    matmul(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut fast, n, rows, p);
    let mut plain = init.clone();
    matmul_reference(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut plain, n, rows, p);
    let mut pe = init.clone();
    let run = if mxu.timing == MxuTiming::Pipelined {
        pe_array::matmul(&a, &b, (m, k, n), rows, cols, double, p, &mut pe).unwrap()
    } else {
        pe_array::matmul_on(mxu, &a, &b, (m, k, n), p, &mut pe).unwrap()
    };

    assert_eq!(bits(&fast), bits(&pe), "fast kernel vs PE array: {m}x{k}x{n} on {rows}x{cols} {p:?}");
    assert_eq!(bits(&plain), bits(&pe), "contract vs PE array: {m}x{k}x{n} on {rows}x{cols} {p:?}");

    let mut timeline = Timeline::for_mxu(mxu);
    let ps = passes(m, k, n, rows, cols, p);
    let timings: Vec<_> = ps.iter().map(|&pass| timeline.schedule(pass, 0)).collect();
    let case = format!("{m}x{k}x{n} on {rows}x{cols} double={double} {:?} {p:?}", mxu.timing);
    assert_eq!(timings, run.timings, "per-pass timing: {case}");
    assert_eq!(timings.iter().map(|t| t.end).max().unwrap(), run.cycles, "cycles: {case}");
    run.cycles
}

/// SCALE-Sim's timing: the fast model, the PE-level array and SCALE-Sim's closed form agree,
/// and Systolic's default (pipelined) timing is never slower on the same shape.
#[allow(clippy::too_many_arguments)] // one case: shape, array, mode, seed
fn agree_scalesim(m: usize, k: usize, n: usize, rows: usize, cols: usize, double: bool, p: Precision, seed: u64) {
    let mxu = Mxu { count: 1, rows, cols, weight_double_buffering: double, timing: MxuTiming::Scalesim };
    let cycles = agree_on(&mxu, (m, k, n), p, seed);
    assert_eq!(cycles, scalesim_cycles(m, k, n, rows, cols, p), "closed form: {m}x{k}x{n} on {rows}x{cols} {p:?}");
    let pipelined = Timeline::new(rows, double).schedule_all(passes(m, k, n, rows, cols, p), 0);
    assert!(
        pipelined <= cycles + allowance(m, k, n, rows, cols, p),
        "pipelined {pipelined} > scalesim {cycles}: {m}x{k}x{n} on {rows}x{cols} double={double} {p:?}"
    );
}

/// How many cycles the pipelined timing may exceed SCALE-Sim's: none, but for one case. SCALE-Sim
/// writes outputs in the bottom PE's cycle and reports the last write's index (2 cycles fewer
/// than Systolic's count of the same timeline: it adds results one cycle later and counts
/// cycles), while its full weight load costs `rows - 1` cycles more than the pipelined one and
/// its full-width drain `cols - n` more. Only a single pass on a 2-row array using every column
/// comes out 1 cycle slower in the pipelined model (a second pass costs SCALE-Sim far more).
fn allowance(m: usize, k: usize, n: usize, rows: usize, cols: usize, p: Precision) -> u64 {
    let single = passes(m, k, n, rows, cols, p).len() == 1;
    u64::from(single && rows == 2 && n == cols)
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn scalesim_timing_agrees_with_the_pe_array_and_the_closed_form_on_small_arrays(
        (rows, cols) in (2usize..=12, 2usize..=12),
        (m, k, n) in (1usize..=20, 1usize..=40, 1usize..=40),
        double in any::<bool>(),
        p in precision(),
        seed in any::<u64>(),
    ) {
        agree_scalesim(m, k, n, rows, cols, double, p, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn scalesim_timing_agrees_with_the_pe_array_and_the_closed_form_up_to_128x128(
        (rows, cols) in (13usize..=128, 13usize..=128),
        (m, k, n) in (1usize..=140, 1usize..=260, 1usize..=260),
        double in any::<bool>(),
        p in precision(),
        seed in any::<u64>(),
    ) {
        agree_scalesim(m, k, n, rows, cols, double, p, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// The fast models alone, over many more shapes: the pipelined timing is never slower than
    /// SCALE-Sim's (but for the one case of [`allowance`]), with or without double buffering.
    #[test]
    fn pipelined_timing_is_never_slower_than_scalesim(
        (rows, cols) in (2usize..=128, 2usize..=128),
        (m, k, n) in (1usize..=600, 1usize..=600, 1usize..=600),
        double in any::<bool>(),
        p in precision(),
    ) {
        let ps = passes(m, k, n, rows, cols, p);
        let scalesim = Timeline::with_timing(rows, cols, double, MxuTiming::Scalesim).schedule_all(ps.clone(), 0);
        prop_assert_eq!(scalesim, scalesim_cycles(m, k, n, rows, cols, p));
        let pipelined = Timeline::new(rows, double).schedule_all(ps, 0);
        prop_assert!(pipelined <= scalesim + allowance(m, k, n, rows, cols, p), "{} > {}", pipelined, scalesim);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    /// The pipelined timing's closed form (docs/timing.md) when every pass is a whole tile
    /// (K and N multiples of the array): with `P` passes and `t = P - 1`, the last pass starts
    /// `S + 1` cycles in and the matmul takes `S + m + rows + cols` cycles, where
    /// `S = max(t·m, t·k, ⌊t/2⌋·(m + n) + (t mod 2)·max(k, m))` with two weight banks and
    /// `S = t·max(k, m + n)` with one (`k = rows`, `n = cols`).
    #[test]
    fn pipelined_timing_has_a_closed_form_for_whole_tiles(
        (rows, cols) in (2usize..=128, 2usize..=128),
        (m, k_tiles, n_tiles) in (1usize..=600, 1usize..=6, 1usize..=6),
        double in any::<bool>(),
        p in precision(),
    ) {
        let (k, n) = (k_tiles * rows, n_tiles * cols);
        let ps = passes(m, k, n, rows, cols, p);
        let t = (ps.len() - 1) as u64;
        let (m, k, n, r) = (m as u64, rows as u64, cols as u64, rows as u64);
        let s = if double {
            (t * m).max(t * k).max(t / 2 * (m + n) + t % 2 * k.max(m))
        } else {
            t * k.max(m + n)
        };
        prop_assert_eq!(Timeline::new(rows, double).schedule_all(ps, 0), s + m + r + n);
    }
}

#[test]
fn scalesim_timing_gives_scale_sims_own_totals() {
    // SCALE-Sim v2's golden compute report (test/golden_trace/COMPUTE_REPORT.csv): AlexNet's
    // Conv1 (224x224x3 input, 96 11x11 filters, stride 4) on a 32x32 weight-stationary array,
    // 112283 cycles: a GEMM of M = 55 * 55 output pixels, K = 11 * 11 * 3, N = 96.
    assert_eq!(scalesim_cycles(3025, 363, 96, 32, 32, Precision::Default), 112_283);
    let conv1 = passes(3025, 363, 96, 32, 32, Precision::Default);
    let mut timeline = Timeline::with_timing(32, 32, true, MxuTiming::Scalesim);
    assert_eq!(timeline.schedule_all(conv1, 0), 112_283);
    // GEMMs run through SCALE-Sim v2 (dataflow ws, ideal memories): (rows, cols, M, K, N, cycles).
    for (rows, cols, m, k, n, cycles) in [
        (4, 4, 5, 7, 6, 59),
        (128, 128, 256, 300, 200, 3827),
        (2, 2, 1, 1, 1, 4),
        (3, 5, 1, 4, 7, 39),
        (8, 3, 10, 20, 2, 80),
        (16, 32, 33, 17, 40, 379),
        (32, 8, 64, 100, 9, 1071),
    ] {
        assert_eq!(scalesim_cycles(m, k, n, rows, cols, Precision::Default), cycles, "{m}x{k}x{n} on {rows}x{cols}");
        let mxu = Mxu { count: 1, rows, cols, weight_double_buffering: true, timing: MxuTiming::Scalesim };
        if rows * cols <= 1024 {
            assert_eq!(agree_on(&mxu, (m, k, n), Precision::Default, 7), cycles, "{m}x{k}x{n} on {rows}x{cols}");
        }
    }
}

#[test]
fn the_one_case_where_scale_sims_count_is_lower() {
    // A single full-width pass on a 2-row array: SCALE-Sim's full load costs 1 cycle more than
    // the pipelined one, its counting 2 fewer (module docs of `mxu`).
    let pipelined = Timeline::new(2, true).schedule_all(passes(5, 2, 2, 2, 2, Precision::Default), 0);
    assert_eq!((pipelined, scalesim_cycles(5, 2, 2, 2, 2, Precision::Default)), (5 + 2 + 2, 2 * 2 + 2 + 5 - 3));
    assert_eq!(allowance(5, 2, 2, 2, 2, Precision::Default), 1);
    // One row more, one column unused, or one pass more, and it is not.
    for (m, k, n, rows, cols) in [(5, 3, 3, 3, 3), (5, 2, 1, 2, 2), (5, 4, 2, 2, 2)] {
        let pipelined = Timeline::new(rows, true).schedule_all(passes(m, k, n, rows, cols, Precision::Default), 0);
        assert!(pipelined <= scalesim_cycles(m, k, n, rows, cols, Precision::Default));
        assert_eq!(allowance(m, k, n, rows, cols, Precision::Default), 0);
    }
}

#[test]
fn matmul_cycles_follows_the_machines_timing_model() {
    let mut machine = presets::preset("v2-8").unwrap();
    let pipelined = matmul_cycles(&machine, 256, 300, 200, Precision::Default);
    assert_eq!(
        pipelined,
        Timeline::new(128, true).schedule_all(passes(256, 300, 200, 128, 128, Precision::Default), 0)
    );
    machine.set("core.mxu.timing", "scalesim").unwrap();
    assert_eq!(machine.core.mxu.timing, MxuTiming::Scalesim);
    assert_eq!(matmul_cycles(&machine, 256, 300, 200, Precision::Default), 3827);
    assert_eq!(matmul_cycles(&machine, 256, 300, 200, Precision::High), 3 * 6 * 638 - 1);
    assert!(pipelined * 2 < 3827, "{pipelined}");
}

#[test]
fn rectangular_and_extreme_shapes_agree() {
    agree(1, 1, 1, 2, 2, true, Precision::Default, 1);
    agree(3, 129, 257, 128, 128, true, Precision::High, 2);
    agree(200, 64, 16, 16, 64, false, Precision::Default, 3);
    agree(8, 256, 256, 128, 128, true, Precision::Highest, 4);
    agree(64, 7, 300, 4, 32, true, Precision::Default, 5);
    agree_scalesim(1, 1, 1, 2, 2, true, Precision::Default, 1);
    agree_scalesim(3, 129, 257, 128, 128, true, Precision::High, 2);
    agree_scalesim(200, 64, 16, 16, 64, false, Precision::Default, 3);
    agree_scalesim(64, 7, 300, 4, 32, true, Precision::Default, 5);
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

/// Held by every test that forces a micro-kernel: the choice is global to the process, and
/// tests run in parallel, so a case would otherwise run whichever kernel another forced.
static FORCING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn every_micro_kernel_gives_the_same_bits() {
    use systolic_simulator::mxu::kernel::{KernelChoice, force_kernel};
    let _only_us = FORCING.lock().unwrap_or_else(|e| e.into_inner());
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

/// `matmul_into` (BLAS's beta = 0: the first step stores, never reading the output) gives the
/// bits of `matmul` into zeros, on every micro-kernel, at every precision, with strided
/// outputs whose gaps it must not touch and old values (NaN) it must not read.
#[test]
fn products_into_fresh_outputs_equal_products_added_to_zeros() {
    use systolic_simulator::mxu::kernel::{KernelChoice, force_kernel, matmul_into};
    let _only_us = FORCING.lock().unwrap_or_else(|e| e.into_inner());
    for (m, k, n, ldc) in [(37, 300, 70, 70), (13, 128, 33, 40), (5, 0, 9, 12), (30, 1, 1, 3), (96, 257, 64, 64)] {
        let a = values(m * k, 41);
        let b = values(k * n, 42);
        for p in [Precision::Default, Precision::High, Precision::Highest] {
            let mut zeros = vec![0f32; m * ldc];
            matmul(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut zeros, ldc, 128, p);
            for choice in [KernelChoice::Portable, KernelChoice::Avx2, KernelChoice::Avx512] {
                if !choice.available() {
                    continue;
                }
                force_kernel(choice);
                let mut out = vec![f32::NAN; m * ldc];
                matmul_into(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut out, ldc, 128, p);
                force_kernel(KernelChoice::Auto);
                for i in 0..m {
                    let (row, want) = (&out[i * ldc..(i + 1) * ldc], &zeros[i * ldc..i * ldc + n]);
                    assert_eq!(bits(&row[..n]), bits(want), "{choice:?} {p:?} {m}x{k}x{n} row {i}");
                    assert!(row[n..].iter().all(|x| x.is_nan()), "{choice:?} wrote into the stride's gap");
                }
            }
        }
    }
}

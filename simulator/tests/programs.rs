//! Machines, programs, the validator, the functional engine, the timing engine and traces.

use systolic_simulator::config::presets;
use systolic_simulator::functional::Functional;
use systolic_simulator::isa::*;
use systolic_simulator::kernels;
use systolic_simulator::mxu::kernel::{Matrix, matmul_reference};
use systolic_simulator::mxu::{Timeline, passes};
use systolic_simulator::numerics::{Precision, bf16};
use systolic_simulator::rng;
use systolic_simulator::timing::simulate;
use systolic_simulator::trace::chrome_trace;
use systolic_simulator::{Error, Machine};

fn v2() -> Machine {
    presets::preset("v2-8").unwrap()
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
}

fn vmem(offset: u64, rows: usize, cols: usize) -> Tile {
    Tile::new(Space::Vmem, offset, rows, cols, DType::F32)
}

fn hbm(offset: u64, rows: usize, cols: usize) -> Tile {
    Tile::new(Space::Hbm, offset, rows, cols, DType::F32)
}

fn program_error(p: &Program, m: &Machine) -> String {
    match p.validate(m) {
        Err(e @ Error::Program { .. }) => e.to_string(),
        other => panic!("expected a program error, got {other:?}"),
    }
}

// ---- machines ----

#[test]
fn overrides_change_fields_and_derived_figures() {
    let mut m = v2();
    let peak = m.chip_peak_flops();
    m.set("core.mxu.rows", "256").unwrap();
    m.set("core.mxu.cols", "256").unwrap();
    assert_eq!(m.core.mxu.rows, 256);
    assert!((m.chip_peak_flops() / peak - 4.0).abs() < 1e-9);
    m.set("core.mxu.weight_double_buffering", "false").unwrap();
    assert!(!m.core.mxu.weight_double_buffering);
    m.set("slice.torus", "[4, 4]").unwrap();
    assert_eq!(m.cores(), 32);
    assert!(m.sources["core.mxu.rows"].contains("set by the user"));
}

#[test]
fn impossible_machines_are_rejected_with_the_field_path() {
    let cases: [(&str, &str, &str); 7] = [
        ("core.mxu.rows", "0", "core.mxu.rows"),
        ("core.vmem_bytes", "1000", "smaller than one 128x128 f32 tile"),
        ("slice.torus", "[4, 4, 4]", "needs 6 ICI links per chip but chips have 4"),
        ("slice.torus", "[0, 4]", "zero dimension"),
        ("core.clock_hz", "-1", "positive"),
        ("core.mxu.colls", "3", "'core.mxu' has no field 'colls' (fields: "),
        ("core.mxu.count", "true", "is not a number"),
    ];
    for (field, value, needle) in cases {
        let e = v2().set(field, value).unwrap_err().to_string();
        assert!(e.starts_with("machine field '"), "{e}");
        assert!(e.contains(needle), "setting {field}={value}: {e}");
    }
    let e = v2().set("slice.wraparound", "[true]").unwrap_err().to_string();
    assert!(e.contains("slice.wraparound") && e.contains("one entry per torus dimension"), "{e}");
}

/// Found by fuzzing (`systolic::fuzz::specs`): `slice.torus=[4, 18446744073709551615]`
/// overflowed the chip count while the machine was validated.
#[test]
fn slices_too_large_to_count_are_refused() {
    let e = v2().set("slice.torus", "[4, 18446744073709551615]").unwrap_err().to_string();
    assert!(e.contains("slice.torus") && e.contains("more than the 1048576 chips"), "{e}");
    let e = v2().set("chip.cores", "18446744073709551615").unwrap_err().to_string();
    assert!(e.contains("chip.cores") && e.contains("cores this simulator models"), "{e}");
}

#[test]
fn machines_round_trip_through_ron_files() {
    let dir = std::env::temp_dir().join(format!("systolic-machines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mine.ron");
    let mut m = presets::preset("v3-32").unwrap();
    m.set("core.mxu.count", "4").unwrap();
    std::fs::write(&path, m.to_ron()).unwrap();
    assert_eq!(Machine::resolve(path.to_str().unwrap()).unwrap(), m);
    std::fs::write(&path, m.to_ron().replace("count: 4", "count: 0")).unwrap();
    let e = Machine::load(&path).unwrap_err().to_string();
    assert!(e.contains("core.mxu.count") && e.contains("at least 1"), "{e}");
    std::fs::write(&path, "(name: \"x\",\n core: oops)").unwrap();
    let e = Machine::load(&path).unwrap_err().to_string();
    assert!(e.contains("mine.ron:2:"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    let e = Machine::resolve("v5-8").unwrap_err().to_string();
    assert!(e.contains("unknown machine 'v5-8'") && e.contains("v4-8192"), "{e}");
}

// ---- validation ----

#[test]
fn out_of_bounds_and_over_capacity_tiles_are_rejected() {
    let m = v2();
    let mut p = Program::new("big");
    p.push(Operation::Unary { op: UnaryOp::Relu, src: vmem(0, 2049, 2048), dst: vmem(0, 2049, 2048) }, &[]);
    let e = program_error(&p, &m);
    assert!(e.contains("instruction 0 (unary)") && e.contains("VMEM holds 16777216 bytes"), "{e}");

    let mut p = Program::new("hbm");
    let far = m.core.hbm.bytes - 64;
    p.push(Operation::dma(0, hbm(far, 1, 32), vmem(0, 1, 32)), &[]);
    assert!(program_error(&p, &m).contains("HBM holds"));

    let mut p = Program::new("misaligned");
    p.push(Operation::dma(0, hbm(2, 1, 4), vmem(0, 1, 4)), &[]);
    assert!(program_error(&p, &m).contains("not a multiple of its element size"));
}

/// Found by fuzzing (`systolic::fuzz::program`): tiles at the top of the address space, and a
/// repeated DMA whose steps run past it, overflowed in the validator's bounds arithmetic.
#[test]
fn tiles_at_the_top_of_the_address_space_are_out_of_bounds() {
    let m = v2();
    let mut p = Program::new("top");
    p.push(Operation::dma(0, hbm(u64::MAX - 7, 4, 4), vmem(0, 4, 4)), &[]);
    assert!(program_error(&p, &m).contains("HBM holds"));
    let huge = Tile { stride: u32::MAX, ..vmem(0, u32::MAX as usize, 4) };
    let mut p = Program::new("huge");
    p.push(Operation::Unary { op: UnaryOp::Relu, src: huge, dst: vmem(0, 1, 4) }, &[]);
    assert!(program_error(&p, &m).contains("VMEM holds"));
    let mut p = Program::new("steps");
    let repeat = Some(Repeat { count: 3, src_step: 1 << 63, dst_step: 64 });
    p.push(Operation::Dma { engine: 0, src: hbm(0, 1, 4), dst: vmem(0, 1, 4), repeat }, &[]);
    assert!(program_error(&p, &m).contains("instruction 0 (dma)"));
}

#[test]
fn shapes_units_and_dependencies_are_checked() {
    let m = v2();
    let mut p = Program::new("shape");
    p.push(
        Operation::MatMul {
            mxu: 0,
            lhs: vmem(0, 8, 16),
            rhs: vmem(4096, 17, 8),
            out: vmem(8192, 8, 8),
            accumulate: false,
            precision: Precision::Default,
        },
        &[],
    );
    assert!(program_error(&p, &m).contains("shapes do not multiply: 8x16 times 17x8"));

    let mut p = Program::new("unit");
    p.push(
        Operation::MatMul {
            mxu: 1,
            lhs: vmem(0, 8, 16),
            rhs: vmem(4096, 16, 8),
            out: vmem(8192, 8, 8),
            accumulate: false,
            precision: Precision::Default,
        },
        &[],
    );
    assert!(program_error(&p, &m).contains("MXU 1 does not exist (the core has 1"));

    let mut p = Program::new("overlap");
    p.push(
        Operation::MatMul {
            mxu: 0,
            lhs: vmem(0, 8, 16),
            rhs: vmem(4096, 16, 8),
            out: vmem(64, 8, 8),
            accumulate: false,
            precision: Precision::Default,
        },
        &[],
    );
    assert!(program_error(&p, &m).contains("out and lhs"));

    let mut p = Program::new("deps");
    p.push(Operation::Barrier, &[1]);
    p.push(Operation::Barrier, &[]);
    assert!(program_error(&p, &m).contains("depends on instruction 1, which is not earlier"));
}

#[test]
fn races_are_found_and_dependencies_remove_them() {
    let m = v2();
    let racy = |deps: &[u32], engine: u8| {
        let mut p = Program::new("race");
        p.push(Operation::dma(0, hbm(0, 16, 16), vmem(0, 16, 16)), &[]);
        // Reads part of what instruction 0 writes, on another unit.
        p.push(Operation::Unary { op: UnaryOp::Relu, src: vmem(256, 4, 16), dst: vmem(4096, 4, 16) }, deps);
        p.push(Operation::dma(engine, vmem(4096, 4, 16), hbm(8192, 4, 16)), &[]);
        p
    };
    let e = program_error(&racy(&[], 0), &m);
    assert!(
        e.contains("instruction 1 (unary)") && e.contains("instruction 0 (dma) writes") && e.contains("add 0"),
        "{e}"
    );
    // With the dependency, 1 follows 0; instruction 2 is then a race with 1 unless ordered.
    let e = program_error(&racy(&[0], 1), &m);
    assert!(e.contains("instruction 2 (dma)") && e.contains("add 1"), "{e}");
    // On the same engine as 0 it is still unordered with 1 (different units).
    assert!(program_error(&racy(&[0], 0), &m).contains("instruction 2"));

    // Interleaved column blocks of one matrix do not overlap; the same block does.
    let c = vmem(0, 64, 256);
    let mut p = Program::new("columns");
    p.push(Operation::Unary { op: UnaryOp::Copy, src: vmem(1 << 20, 64, 128), dst: c.columns(0, 128) }, &[]);
    p.push(Operation::dma(0, vmem(1 << 21, 64, 128), c.columns(128, 128)), &[]);
    p.validate(&m).unwrap();
    p.push(Operation::dma(1, vmem(1 << 22, 64, 128), c.columns(64, 128)), &[]);
    assert!(program_error(&p, &m).contains("instruction 2 (dma): writes"));
}

/// The validator against brute force on random programs: a race is reported exactly when two
/// instructions touch a common byte, one writing, with neither reachable from the other
/// through dependencies and unit order. Exercises the index, epochs and the forgetting of
/// overwritten accesses (writes cover rows, column strips and whole regions often here).
#[test]
fn the_race_check_agrees_with_brute_force_on_random_programs() {
    use std::collections::HashSet;
    let m = v2();
    let mut seed = 7u64;
    let mut next = |n: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let bytes = |t: &Tile| -> HashSet<u64> {
        (0..t.rows as u64)
            .flat_map(|r| (0..t.cols as u64 * 4).map(move |c| t.offset + r * t.stride as u64 * 4 + c))
            .collect()
    };
    let (mut racy, mut clean) = (0, 0);
    let mut long_first_races = Vec::new();
    for case in 0..3000 {
        let mut p = Program::new("random");
        // Every 50th program is long, with full barriers, so accesses are split into epochs.
        let long = case % 50 == 0;
        let n = if long { 300 } else { 2 + next(14) as usize };
        for i in 0..n {
            if long && i % 60 == 59 {
                p.push(Operation::Barrier, &(0..i as u32).collect::<Vec<_>>());
                continue;
            }
            let (rows, cols) = (1 + next(6) as u32, 1 + next(8) as u32);
            let tile = |offset: u64, stride: u32| Tile {
                space: Space::Vmem,
                offset: offset * 4,
                rows,
                cols,
                stride,
                dtype: DType::F32,
            };
            let dst = tile(next(96), cols + next(3) as u32);
            // Reads may overlap their own rows (sliding windows).
            let src = tile(128 + next(96) * (next(2)), (cols + next(4) as u32).saturating_sub(1));
            let op = match next(4) {
                0 => Operation::Fill { dst, value: 0.0 },
                1 => Operation::Unary { op: UnaryOp::Copy, src, dst },
                _ => Operation::dma(next(4) as u8, src, dst),
            };
            // Long programs mostly chain each instruction to the one before, so their first race
            // (if any) comes late, after epochs and overwritten accesses have been dropped.
            let window = if long { i.saturating_sub(12) } else { 0 };
            let mut deps: Vec<u32> = (window as u32..i as u32).filter(|_| next(4) == 0).collect();
            if long && i > 0 && next(1000) < 994 && !deps.contains(&(i as u32 - 1)) {
                deps.push(i as u32 - 1);
            }
            p.push(op, &deps);
        }
        // Brute force: happens-before as reachability, then every pair.
        // Byte sets as bitmaps (every tile lies in the first 2 KiB).
        let touched = |tiles: Vec<Tile>| {
            let mut set = [0u64; 32];
            for b in tiles.iter().flat_map(&bytes) {
                set[(b / 64) as usize] |= 1 << (b % 64);
            }
            set
        };
        let meet = |a: &[u64; 32], b: &[u64; 32]| a.iter().zip(b).any(|(x, y)| x & y != 0);
        let writes: Vec<[u64; 32]> = p.instrs.iter().map(|x| touched(x.op.writes())).collect();
        let all: Vec<[u64; 32]> =
            p.instrs.iter().map(|x| touched(x.op.reads().into_iter().chain(x.op.writes()).collect())).collect();
        let mut before: Vec<HashSet<usize>> = Vec::new();
        let mut first_race = None;
        for (j, instr) in p.instrs.iter().enumerate() {
            let mut hb = HashSet::new();
            let prev_same_unit = (0..j).rev().find(|&i| p.instrs[i].op.unit() == instr.op.unit());
            for d in instr.deps.iter().map(|&d| d as usize).chain(prev_same_unit) {
                hb.insert(d);
                hb.extend(before[d].iter().copied());
            }
            for i in 0..j {
                let conflict = meet(&writes[i], &all[j]) || meet(&all[i], &writes[j]);
                if conflict && !hb.contains(&i) {
                    first_race.get_or_insert(j);
                }
            }
            before.push(hb);
        }
        if long {
            long_first_races.push(first_race.unwrap_or(n));
        }
        // Split into small pieces (checked in parallel, carrying a few pending accesses), a
        // long program gives the same first race.
        if long {
            for min in [1, 5, 37] {
                let (whole, split) = (p.validate(&m), p.validate_in_pieces(&m, min));
                let first = |r: &Result<(), _>| {
                    r.as_ref().err().map(|e: &systolic_simulator::Error| {
                        e.to_string().split(':').next().unwrap_or_default().to_string()
                    })
                };
                assert_eq!(first(&whole), first(&split), "case {case}: pieces of {min}\n{p}");
            }
        }
        match (p.validate(&m), first_race) {
            (Ok(()), None) => clean += 1,
            (Err(e), Some(j)) if e.to_string().contains("neither waits") => {
                assert!(
                    e.to_string().starts_with(&format!("instruction {j} ")),
                    "case {case}: first race at {j}: {e}\n{p}"
                );
                racy += 1;
            }
            // Other rejections (e.g. an in-place copy that partly overlaps) say nothing about races.
            (Err(e), _) if !e.to_string().contains("neither waits") => {}
            (result, race) => panic!("case {case}: validator {result:?}, brute force first race {race:?}\n{p}"),
        }
    }
    assert!(racy > 300 && clean > 300, "{racy} racy and {clean} clean programs: the generator needs balance");
    long_first_races.sort();
    assert!(long_first_races[long_first_races.len() / 2] > 100, "long programs race too early: {long_first_races:?}");
}

// ---- functional engine ----

#[test]
fn a_program_computes_what_its_instructions_say() {
    let m = v2();
    let (rows, k, n) = (24, 40, 20);
    let a_vals = values(rows * k, 1);
    let b_vals = values(k * n, 2);
    let bias = values(n, 3);
    let mut p = Program::new("layer");
    let (a_h, b_h, bias_h, out_h) = (hbm(0, rows, k), hbm(8192, k, n), hbm(16384, 1, n), hbm(32768, 1, n));
    let (a, b, bv) = (vmem(0, rows, k), vmem(8192, k, n), vmem(16384, 1, n));
    let (c, r, s) = (vmem(20480, rows, n), vmem(24576, rows, n), vmem(28672, 1, n));
    let i0 = p.push(Operation::dma(0, a_h, a), &[]);
    let i1 = p.push(Operation::dma(1, b_h, b), &[]);
    let i2 = p.push(Operation::dma(2, bias_h, bv), &[]);
    let i3 = p.push(
        Operation::MatMul { mxu: 0, lhs: a, rhs: b, out: c, accumulate: false, precision: Precision::High },
        &[i0, i1],
    );
    let i4 = p.push(Operation::Binary { op: BinaryOp::Add, a: c, b: bv, dst: r }, &[i2, i3]);
    let i5 = p.push(Operation::Unary { op: UnaryOp::Relu, src: r, dst: r }, &[i4]);
    let i6 = p.push(Operation::Reduce { op: ReduceOp::Sum, axis: Axis::Rows, src: r, dst: s }, &[i5]);
    p.push(Operation::dma(0, s, out_h), &[i6]);

    let mut f = Functional::new(&m);
    f.write(a_h, &a_vals).unwrap();
    f.write(b_h, &b_vals).unwrap();
    f.write(bias_h, &bias).unwrap();
    f.run(&p).unwrap();

    let mut prod = vec![0f32; rows * n];
    matmul_reference(Matrix::new(&a_vals, rows, k), Matrix::new(&b_vals, k, n), &mut prod, n, 128, Precision::High);
    let want: Vec<f32> =
        (0..n).map(|j| (0..rows).map(|i| (prod[i * n + j] + bias[j]).max(0.0)).fold(0.0, |acc, v| acc + v)).collect();
    assert_eq!(f.read(out_h).unwrap(), want);
}

#[test]
fn pooling_transpose_and_bf16_storage() {
    let m = v2();
    // Two 5x5 images of 3 channels, 3x3 max pool stride 2 with padding 1 -> 3x3.
    let shape = PoolShape { n: 2, h: 5, w: 5, window: [3, 3], strides: [2, 2], pad: [1, 1], out_h: 3, out_w: 3 };
    let x = values(2 * 25 * 3, 9);
    let (src, dst) = (vmem(0, 50, 3), vmem(4096, 18, 3));
    let (t_src, t_dst) = (vmem(8192, 3, 7), vmem(12288, 7, 3));
    let half = Tile::new(Space::Vmem, 16384, 3, 7, DType::Bf16);
    let mut p = Program::new("misc");
    p.push(Operation::Pool { op: PoolOp::Max, shape, src, dst }, &[]);
    p.push(Operation::Transpose { src: t_src, dst: t_dst }, &[]);
    p.push(Operation::Unary { op: UnaryOp::Copy, src: t_src, dst: half }, &[]);
    let mut f = Functional::new(&m);
    f.write(src, &x).unwrap();
    let t = values(21, 4);
    f.write(t_src, &t).unwrap();
    f.run(&p).unwrap();
    let pooled = f.read(dst).unwrap();
    // Output (0, 0) of image 1, channel 2 covers rows 0..=1, columns 0..=1 (padding excluded).
    let at = |img: usize, h: usize, w: usize, ch: usize| x[((img * 5 + h) * 5 + w) * 3 + ch];
    let want = [at(1, 0, 0, 2), at(1, 0, 1, 2), at(1, 1, 0, 2), at(1, 1, 1, 2)].into_iter().fold(f32::MIN, f32::max);
    assert_eq!(pooled[9 * 3 + 2], want);
    let tr = f.read(t_dst).unwrap();
    assert_eq!(tr[4 * 3 + 1], t[7 + 4]);
    assert_eq!(f.read(half).unwrap(), t.iter().map(|&v| bf16(v)).collect::<Vec<_>>());
}

#[test]
fn dropout_draws_the_shared_mask_for_the_step_and_checks_its_operands() {
    let m = v2();
    let (src, dst, step) = (vmem(0, 6, 40), vmem(4096, 6, 40), vmem(8192, 1, 1));
    let x = values(240, 3);
    let mut p = Program::new("dropout");
    p.push(Operation::Dropout { seed: 5, rate: 0.3, step, counter: 80, src, dst }, &[]);
    let mut f = Functional::new(&m);
    f.write(src, &x).unwrap();
    f.write(step, &[9.0]).unwrap();
    f.run(&p).unwrap();
    let key = rng::derive(5, 9);
    let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * rng::dropout_scale(0.3, key, 80 + i as u64)).collect();
    let got = f.read(dst).unwrap();
    assert_eq!(got, want);
    let dropped = got.iter().filter(|&&v| v == 0.0).count();
    assert!((40..110).contains(&dropped), "{dropped} of 240 dropped at rate 0.3");
    // One register: the hash's lane operations shared by the VPU's ALUs.
    let t = simulate(&m, &p, false).unwrap();
    let vpu = t.report.units.iter().find(|u| u.unit == "vpu").unwrap();
    assert_eq!(vpu.busy_cycles, rng::DROPOUT_LANE_OPS.div_ceil(m.core.vpu.alus as u64));

    // A step that is not a whole number, a rate of 1, a step of more than one value.
    f.write(step, &[2.5]).unwrap();
    let e = f.run(&p).unwrap_err().to_string();
    assert!(e.contains("whole number"), "{e}");
    let mut bad = Program::new("bad");
    bad.push(Operation::Dropout { seed: 5, rate: 1.0, step, counter: 0, src, dst }, &[]);
    assert!(program_error(&bad, &m).contains("rate 1 must be in [0, 1)"));
    let mut bad = Program::new("bad");
    bad.push(Operation::Dropout { seed: 5, rate: 0.5, step: vmem(8192, 1, 2), counter: 0, src, dst }, &[]);
    assert!(program_error(&bad, &m).contains("must be one value"));
}

// ---- timing ----

#[test]
fn dma_costs_latency_plus_bytes_over_bandwidth_and_shares_hbm() {
    let m = v2();
    let bytes = 64 * 1024 * 4;
    let mut p = Program::new("dma");
    p.push(Operation::dma(0, hbm(0, 64, 1024), vmem(0, 64, 1024)), &[]);
    p.push(Operation::dma(1, hbm(1 << 20, 64, 1024), vmem(1 << 20, 64, 1024)), &[]);
    let t = simulate(&m, &p, true).unwrap();
    let transfer = (bytes as f64 / m.core.hbm.bytes_per_cycle).ceil() as u64;
    let latency = m.core.dma.latency_cycles;
    assert_eq!(t.finish[0], latency + transfer);
    // Both start at once, but the second's data waits for the HBM port.
    assert_eq!(t.finish[1], latency + 2 * transfer);
    assert_eq!(t.report.hbm_bytes, 2 * bytes);
    // Two transfers behind one 500-cycle latency: the port is busy for 2 x transfer of the cycles.
    let busy = 2.0 * transfer as f64 / t.report.cycles as f64;
    assert!((t.report.hbm_utilization - busy).abs() < 0.01, "{} vs {busy}", t.report.hbm_utilization);
}

#[test]
fn vector_work_is_counted_in_registers() {
    let m = v2();
    let mut p = Program::new("vpu");
    // 8 x 128 is one register; 9 x 129 needs 4 (two sublane groups x two lane groups).
    p.push(Operation::Unary { op: UnaryOp::Relu, src: vmem(0, 64, 1024), dst: vmem(0, 64, 1024) }, &[]);
    p.push(Operation::Unary { op: UnaryOp::Relu, src: vmem(1 << 20, 9, 129), dst: vmem(1 << 20, 9, 129) }, &[]);
    let t = simulate(&m, &p, false).unwrap();
    assert_eq!(t.finish[0], 64 / 2, "64 registers, 2 ALUs");
    assert_eq!(t.finish[1] - t.finish[0], 2);
}

#[test]
fn matmul_time_is_the_mxu_pipeline_and_overlaps_independent_dma() {
    let m = v2();
    let (mm, k, n) = (256, 512, 384);
    let mp = kernels::matmul(&m, mm, k, n, Precision::Default).unwrap();
    let mut p = mp.program.clone();
    // An unrelated transfer runs alongside the matmul.
    p.push(Operation::dma(0, hbm(0, 128, 128), vmem(8 << 20, 128, 128)), &[]);
    let t = simulate(&m, &p, true).unwrap();
    let mut tl = Timeline::new(128, true);
    let want = tl.schedule_all(passes(mm, k, n, 128, 128, Precision::Default), 0);
    assert_eq!(t.finish[0], want);
    assert_eq!(t.report.cycles, want.max(t.finish[1]));
    assert!(t.finish[1] < want, "the DMA overlaps the matmul");
    let util = (mm * k * n) as f64 / (want as f64 * 128.0 * 128.0);
    assert!((t.report.mxu_utilization - util).abs() < 1e-12);

    // Dependencies order units: the same DMA after the matmul starts when it ends.
    let mut q = mp.program.clone();
    q.push(Operation::dma(0, mp.c.columns(0, 128).rows(0, 64), hbm(0, 64, 128)), &[0]);
    let t = simulate(&m, &q, false).unwrap();
    assert!(t.finish[1] >= want + m.core.dma.latency_cycles);
}

#[test]
fn multiple_mxus_share_a_matmul() {
    let v3 = presets::preset("v3-8").unwrap();
    let mp = kernels::matmul(&v3, 512, 512, 512, Precision::Default).unwrap();
    assert_eq!(mp.program.len(), 2, "two MXUs per v3 core");
    let t = simulate(&v3, &mp.program, false).unwrap();
    let mut tl = Timeline::new(128, true);
    assert_eq!(t.report.cycles, tl.schedule_all(passes(512, 512, 256, 128, 128, Precision::Default), 0));
    assert!(t.report.mxu_utilization > 0.8, "{}", t.report.mxu_utilization);
}

#[test]
fn an_mxu_waits_for_its_own_results_before_reading_them() {
    let m = v2();
    let mut p = Program::new("chain");
    let (a, b, c, d) = (vmem(0, 128, 128), vmem(65536, 128, 128), vmem(131072, 128, 128), vmem(196608, 128, 128));
    p.push(Operation::MatMul { mxu: 0, lhs: a, rhs: b, out: c, accumulate: false, precision: Precision::Default }, &[]);
    p.push(Operation::MatMul { mxu: 0, lhs: c, rhs: b, out: d, accumulate: false, precision: Precision::Default }, &[]);
    let t = simulate(&m, &p, true).unwrap();
    assert!(t.spans[1].start >= t.finish[0], "{:?}", t.spans);
    // Independent matmuls pipeline instead.
    let mut q = Program::new("pipelined");
    q.push(Operation::MatMul { mxu: 0, lhs: a, rhs: b, out: c, accumulate: false, precision: Precision::Default }, &[]);
    q.push(Operation::MatMul { mxu: 0, lhs: a, rhs: b, out: d, accumulate: false, precision: Precision::Default }, &[]);
    let u = simulate(&m, &q, true).unwrap();
    assert!(u.spans[1].start < u.finish[0]);
    assert!(u.report.cycles < t.report.cycles);
}

#[test]
fn scalesim_timing_runs_folds_one_after_another_in_the_timing_engine() {
    // One MXU: SCALE-Sim's total for the GEMM, F * (2R + C + M - 2) - 1.
    let mut m = v2();
    m.set("core.mxu.timing", "scalesim").unwrap();
    let mp = kernels::matmul(&m, 256, 300, 200, Precision::Default).unwrap();
    let t = simulate(&m, &mp.program, false).unwrap();
    assert_eq!(t.report.cycles, 6 * (2 * 128 + 128 + 256 - 2) - 1);
    assert_eq!(t.report.cycles, systolic_simulator::mxu::scalesim_cycles(256, 300, 200, 128, 128, Precision::Default));
    assert_eq!(t.report.cycles, systolic_simulator::mxu::matmul_cycles(&m, 256, 300, 200, Precision::Default));
    // The default timing on the same machine is less than half of it.
    let default = simulate(&v2(), &mp.program, false).unwrap();
    assert!(default.report.cycles * 2 < t.report.cycles, "{} vs {}", default.report.cycles, t.report.cycles);
    // Independent matmuls on one MXU do not overlap: the second's first fold loads the cycle
    // after the first's last write.
    let (a, b, c, d) = (vmem(0, 128, 128), vmem(65536, 128, 128), vmem(131072, 128, 128), vmem(196608, 128, 128));
    let mut q = Program::new("folds");
    q.push(Operation::MatMul { mxu: 0, lhs: a, rhs: b, out: c, accumulate: false, precision: Precision::Default }, &[]);
    q.push(Operation::MatMul { mxu: 0, lhs: a, rhs: b, out: d, accumulate: false, precision: Precision::Default }, &[]);
    let u = simulate(&m, &q, true).unwrap();
    let fold = 2 * 128 + 128 + 128 - 2;
    assert_eq!(u.finish[0], fold - 1);
    assert_eq!(u.spans[1].start, fold);
    assert_eq!(u.report.cycles, 2 * fold - 1);
    // Two MXUs (v3) each run their share of the column blocks.
    let mut v3 = presets::preset("v3-8").unwrap();
    v3.set("core.mxu.timing", "scalesim").unwrap();
    let mp = kernels::matmul(&v3, 512, 512, 512, Precision::Default).unwrap();
    let t = simulate(&v3, &mp.program, false).unwrap();
    assert_eq!(t.report.cycles, systolic_simulator::mxu::scalesim_cycles(512, 512, 256, 128, 128, Precision::Default));
}

#[test]
fn timing_is_deterministic_and_traces_have_a_track_per_unit() {
    let m = presets::preset("v4-8").unwrap();
    let mp = kernels::matmul(&m, 128, 640, 1000, Precision::High).unwrap();
    let mut p = mp.program.clone();
    p.push(Operation::dma(1, mp.c, Tile::new(Space::Hbm, 0, 128, 1000, DType::F32)), &[0, 1, 2, 3]);
    let a = simulate(&m, &p, true).unwrap();
    let b = simulate(&m, &p, true).unwrap();
    assert_eq!(a.finish, b.finish);
    let trace = chrome_trace(&m, &p, &a.spans);
    let events = trace["traceEvents"].as_array().unwrap();
    let names: Vec<&str> =
        events.iter().filter(|e| e["name"] == "thread_name").map(|e| e["args"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["dma1", "mxu0", "mxu1", "mxu2", "mxu3"]);
    let slices = events.iter().filter(|e| e["ph"] == "X").count();
    assert_eq!(slices, p.len());
}

#[test]
fn repeated_dma_fill_muladd_and_column_broadcast() {
    let m = v2();
    // A 3-row band of a 4-wide image copied into the middle of a zero-filled 6-wide buffer,
    // one image row per repetition: the padded staging a convolution needs.
    let img = hbm(0, 3, 4);
    let staging = vmem(0, 5, 6);
    let mut p = Program::new("stage");
    let fill = p.push(Operation::Fill { dst: staging, value: 0.0 }, &[]);
    let row_in = Tile { rows: 1, ..img };
    let row_out = Tile { offset: staging.offset + (6 + 1) * 4, rows: 1, cols: 4, stride: 4, ..staging };
    let copy = p.push(
        Operation::Dma {
            engine: 0,
            src: row_in,
            dst: row_out,
            repeat: Some(Repeat { count: 3, src_step: 16, dst_step: 24 }),
        },
        &[fill],
    );
    let (a, col, acc) = (vmem(4096, 2, 3), vmem(8192, 2, 1), vmem(12288, 2, 3));
    let f = p.push(Operation::Fill { dst: acc, value: 1.0 }, &[]);
    p.push(Operation::MulAdd { a, b: col, acc }, &[f]);
    p.push(Operation::Binary { op: BinaryOp::Sub, a, b: col, dst: vmem(16384, 2, 3) }, &[]);
    let mut func = Functional::new(&m);
    let pixels: Vec<f32> = (1..=12).map(|v| v as f32).collect();
    func.write(img, &pixels).unwrap();
    func.write(a, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    func.write(col, &[10.0, 100.0]).unwrap();
    func.run(&p).unwrap();
    let staged = func.read(staging).unwrap();
    #[rustfmt::skip]
    let want = [
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        0.0, 1.0, 2.0, 3.0, 4.0, 0.0,
        0.0, 5.0, 6.0, 7.0, 8.0, 0.0,
        0.0, 9.0, 10.0, 11.0, 12.0, 0.0,
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    ];
    assert_eq!(staged, want);
    assert_eq!(func.read(acc).unwrap(), [11.0, 21.0, 31.0, 401.0, 501.0, 601.0]);
    assert_eq!(func.read(vmem(16384, 2, 3)).unwrap(), [-9.0, -8.0, -7.0, -96.0, -95.0, -94.0]);
    // The repeated DMA moves 3 rows of 16 bytes behind one latency.
    let t = simulate(&m, &p, false).unwrap();
    assert_eq!(
        t.finish[copy as usize] - t.finish[fill as usize],
        m.core.dma.latency_cycles + (48.0 / m.core.hbm.bytes_per_cycle).ceil() as u64
    );
    // Each repetition is checked for races: a second writer of row 2 of the band is caught.
    p.push(Operation::dma(1, hbm(4096, 1, 4), Tile { offset: row_out.offset + 2 * 24, ..row_out }), &[]);
    let e = program_error(&p, &m);
    assert!(e.contains("instruction 5 (dma): writes") && e.contains("neither waits"), "{e}");
}

#[test]
fn overrides_apply_together_and_units_are_bounded() {
    let mut m = v2();
    m.set("core.vmem_bytes", "65536").unwrap();
    // A taller array alone no longer fits one tile in VMEM; with more VMEM in the same call it does.
    assert!(m.clone().set("core.mxu.rows", "256").is_err());
    m.set_all(&[("core.mxu.rows", "256"), ("core.vmem_bytes", "262144")]).unwrap();
    assert_eq!(m.core.mxu.rows, 256);
    let e = v2().set("core.mxu.count", "300").unwrap_err().to_string();
    assert!(e.contains("core.mxu.count") && e.contains("64 units"), "{e}");
    // v4 slices wrap only when every dimension spans whole 4x4x4 cubes.
    assert_eq!(presets::preset("v4-64").unwrap().slice.wraparound, vec![false, false, false]);
    assert_eq!(presets::preset("v4-128").unwrap().slice.wraparound, vec![true, true, true]);
    let e = kernels::matmul(&v2(), 1 << 33, 1, 1, Precision::Default).unwrap_err().to_string();
    assert!(e.contains("beyond 2^32"), "{e}");
}

#[test]
fn hbm_to_hbm_copies_cross_the_port_twice() {
    let m = v2();
    let mut p = Program::new("copy");
    p.push(Operation::dma(0, hbm(0, 64, 1024), hbm(1 << 20, 64, 1024)), &[]);
    let t = simulate(&m, &p, false).unwrap();
    let bytes = 64 * 1024 * 4;
    assert_eq!(t.report.hbm_bytes, 2 * bytes);
    assert_eq!(
        t.finish[0],
        m.core.dma.latency_cycles + (2.0 * bytes as f64 / m.core.hbm.bytes_per_cycle).ceil() as u64
    );
}

#[test]
fn matmuls_retire_in_order_so_unit_order_is_completion_order() {
    // A wide matmul then a 1x1x1 one on the same MXU: the second retires after the first, so
    // a copy that waits only for the second sees the first's results.
    let m = v2();
    let mut p = Program::new("retire");
    let (a, b, c) = (vmem(0, 128, 128), vmem(65536, 128, 128), vmem(131072, 128, 128));
    let (x, y, z) = (vmem(262144, 1, 1), vmem(262160, 1, 1), vmem(262176, 1, 1));
    p.push(Operation::MatMul { mxu: 0, lhs: a, rhs: b, out: c, accumulate: false, precision: Precision::Default }, &[]);
    p.push(Operation::MatMul { mxu: 0, lhs: x, rhs: y, out: z, accumulate: false, precision: Precision::Default }, &[]);
    p.push(Operation::dma(0, c, hbm(0, 128, 128)), &[1]);
    let t = simulate(&m, &p, true).unwrap();
    assert!(t.finish[1] >= t.finish[0]);
    assert!(t.spans[2].start >= t.finish[0]);
}

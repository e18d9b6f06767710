//! Speed of the simulator: the bit-exact MXU kernel (DESIGN target: at least 0.8x NumPy's f32
//! matmul at 1024^3, compared by scripts/bench_mxu.py), the timing engine in instructions per
//! second (target: 10 million on one core), and the PE-level array.
//!
//! `cargo bench --bench simulator`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use systolic::simulator::config::presets;
use systolic::simulator::isa::*;
use systolic::simulator::mxu::kernel::{Matrix, matmul};
use systolic::simulator::mxu::pe_array;
use systolic::simulator::numerics::Precision;
use systolic::simulator::timing::simulate_unchecked;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
}

fn mxu_kernel(c: &mut Criterion) {
    let mut group = c.benchmark_group("mxu kernel");
    let n = 1024;
    let (a, b) = (values(n * n, 1), values(n * n, 2));
    let mut out = vec![0f32; n * n];
    group.throughput(Throughput::Elements(2 * (n * n * n) as u64));
    for p in [Precision::Default, Precision::High] {
        group.bench_function(format!("1024^3 {}", p.name()), |bench| {
            bench.iter(|| matmul(Matrix::new(&a, n, n), Matrix::new(&b, n, n), &mut out, n, 128, p))
        });
    }
    group.finish();
}

/// A synthetic core program in the shape compiled layers take: double-buffered DMA in, a
/// matmul, an epilogue on the VPU, DMA out, repeated.
fn layer_program(blocks: usize) -> Program {
    let mut p = Program::new("synthetic");
    let f32 = |space, offset, rows, cols| Tile::new(space, offset, rows, cols, DType::F32);
    let mut last_out: Option<u32> = None;
    for i in 0..blocks {
        let buf = (i % 2) as u64 * (4 << 20);
        let a = f32(Space::Vmem, buf, 128, 128);
        let w = f32(Space::Vmem, buf + (1 << 20), 128, 128);
        let c = f32(Space::Vmem, buf + (2 << 20), 128, 128);
        let hbm_in = (i as u64 % 64) << 20;
        let mut deps: Vec<u32> = last_out.into_iter().collect();
        let d0 = p.push(Operation::dma(0, f32(Space::Hbm, hbm_in, 128, 128), a), &deps);
        let d1 = p.push(Operation::dma(1, f32(Space::Hbm, hbm_in + (512 << 10), 128, 128), w), &deps);
        let mm = p.push(
            Operation::MatMul { mxu: 0, lhs: a, rhs: w, out: c, accumulate: false, precision: Precision::Default },
            &[d0, d1],
        );
        let r = p.push(Operation::Unary { op: UnaryOp::Relu, src: c, dst: c }, &[mm]);
        deps = vec![r];
        last_out = Some(p.push(Operation::dma(2, c, f32(Space::Hbm, (1 << 30) + hbm_in, 128, 128)), &deps));
    }
    p
}

fn timing_engine(c: &mut Criterion) {
    let mut group = c.benchmark_group("timing engine");
    let machine = presets::preset("v2-8").unwrap();
    let program = layer_program(20_000);
    program.validate(&machine).unwrap();
    group.throughput(Throughput::Elements(program.len() as u64));
    group.bench_function("100k instructions", |b| b.iter(|| simulate_unchecked(&machine, &program, false).unwrap()));
    group.bench_function("validate 100k instructions", |b| b.iter(|| program.validate(&machine).unwrap()));
    group.finish();
}

fn pe_level(c: &mut Criterion) {
    let mut group = c.benchmark_group("pe array");
    group.sample_size(10);
    let (m, k, n) = (128, 256, 256);
    let (a, b) = (values(m * k, 3), values(k * n, 4));
    group.bench_function("128x256x256 on 128x128", |bench| {
        bench.iter(|| {
            let mut acc = vec![0f32; m * n];
            pe_array::matmul(&a, &b, (m, k, n), 128, 128, true, Precision::Default, &mut acc).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, mxu_kernel, timing_engine, pe_level);
criterion_main!(benches);

//! Speed of the lowering and of simulating what it produces: ResNet-50 at batch 128 on one
//! core, inference on v2-8 and the training step on v3-8 (issue target: compiling the
//! training graph at batch 128 in under 1 s), with activations stored in bf16 (the default
//! at DEFAULT precision: 5.4 GiB at the peak; 10.5 GiB in f32); and one data-parallel
//! training step of a whole slice, compiled and simulated as `systolic simulate` does it
//! (pod targets: v2-512 under 1 s, v4-8192 under 2 s).
//!
//! `cargo bench --bench lowering`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use systolic::compiler::lower::{Options, Training, compile};
use systolic::compiler::optimizer::Optimizer;
use systolic::compiler::zoo;
use systolic::simulator::config::presets;
use systolic::simulator::numerics::Precision;
use systolic::simulator::pod::slice::{self, Hosts};
use systolic::simulator::timing::{simulate, simulate_unchecked};

fn resnet50(c: &mut Criterion) {
    let graph = zoo::build("resnet50").unwrap();
    let machine = presets::preset("v2-8").unwrap();
    let opts = Options::new(machine.clone(), 128, Precision::Default);
    let mut group = c.benchmark_group("resnet50 inference, batch 128, v2-8");
    group.sample_size(10);
    group.bench_function("compile", |b| b.iter(|| compile(&graph, &opts).unwrap()));
    let program = compile(&graph, &opts).unwrap().executable.program;
    group.throughput(Throughput::Elements(program.len() as u64));
    group.bench_function("validate and simulate", |b| b.iter(|| simulate(&machine, &program, false).unwrap()));
    group.bench_function("simulate (validated)", |b| b.iter(|| simulate_unchecked(&machine, &program, false).unwrap()));
    group.finish();
}

fn resnet50_training(c: &mut Criterion) {
    let graph = zoo::build("resnet50").unwrap();
    let machine = presets::preset("v3-8").unwrap();
    let training = Some(Training { optimizer: Optimizer::momentum(0.1, 0.9), label_smoothing: 0.1 });
    let opts = Options { training, ..Options::new(machine.clone(), 128, Precision::Default) };
    let mut group = c.benchmark_group("resnet50 training step, batch 128, v3-8");
    group.sample_size(10);
    group.bench_function("compile", |b| b.iter(|| compile(&graph, &opts).unwrap()));
    let program = compile(&graph, &opts).unwrap().executable.program;
    group.throughput(Throughput::Elements(program.len() as u64));
    group.bench_function("validate and simulate", |b| b.iter(|| simulate(&machine, &program, false).unwrap()));
    group.finish();
}

fn resnet50_slices(c: &mut Criterion) {
    let graph = zoo::build("resnet50").unwrap();
    let mut group = c.benchmark_group("resnet50 training step, batch 128 per core, whole slice");
    group.sample_size(10);
    for name in ["v2-512", "v4-8192"] {
        let machine = presets::preset(name).unwrap();
        let training = Some(Training { optimizer: Optimizer::momentum(0.1, 0.9), label_smoothing: 0.1 });
        let opts =
            Options { training, replicas: machine.cores(), ..Options::new(machine.clone(), 128, Precision::Default) };
        let step = || {
            let exe = compile(&graph, &opts).unwrap().executable;
            let hosts = Hosts::new(128, exe.input_bytes() / 128);
            slice::simulate(&machine, &exe.program, &hosts, &slice::Options::default()).unwrap()
        };
        group.bench_function(format!("compile and simulate, {name}"), |b| b.iter(step));
    }
    group.finish();
}

criterion_group!(benches, resnet50, resnet50_training, resnet50_slices);
criterion_main!(benches);

//! Speed of the f32 CPU reference: ResNet-50 inference at batch 8 (the DESIGN target, compared
//! with JAX by scripts/bench_reference.py), its convolution shapes alone, and a training step.
//!
//! `cargo bench --bench reference`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use systolic::compiler::graph::{Conv2d, Padding};
use systolic::compiler::reference::conv::{ConvGeom, backprop_filter, backprop_input, forward};
use systolic::compiler::reference::{self, RunOptions};
use systolic::compiler::{Tensor, autodiff, rng, zoo};

fn random(n: usize, seed: u64) -> Vec<f32> {
    (0..n).map(|i| rng::uniform(seed, i as u64) - 0.5).collect()
}

fn convolutions(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv");
    group.sample_size(10);
    // (label, batch, size, cin, kernel, cout, stride): ResNet-50 shapes at batch 8.
    for (label, n, hw, cin, k, cout, s) in [
        ("conv1 7x7/2 3->64 224", 8, 224, 3, 7, 64, 2),
        ("1x1 64->256 56", 8, 56, 64, 1, 256, 1),
        ("3x3 128->128 28", 8, 28, 128, 3, 128, 1),
        ("1x1 1024->256 14", 8, 14, 1024, 1, 256, 1),
        ("3x3 512->512 7", 8, 7, 512, 3, 512, 1),
    ] {
        let pad = if k > 1 {
            Padding::Explicit { top: k / 2, bottom: k / 2, left: k / 2, right: k / 2 }
        } else {
            Padding::Valid
        };
        let conv = Conv2d { strides: [s, s], padding: pad, dilation: [1, 1], groups: 1 };
        let g = ConvGeom::new(&conv, [n, hw, hw, cin], [k, k, cin, cout]);
        let x = random(n * hw * hw * cin, 1);
        let w = random(k * k * cin * cout, 2);
        let dy = random(n * g.win.out_h * g.win.out_w * cout, 3);
        group.throughput(Throughput::Elements(2 * (n * g.win.out_h * g.win.out_w * cout * k * k * cin) as u64));
        group.bench_function(format!("forward {label}"), |b| b.iter(|| forward(&g, &x, &w)));
        group.bench_function(format!("backprop input {label}"), |b| b.iter(|| backprop_input(&g, &dy, &w)));
        group.bench_function(format!("backprop filter {label}"), |b| b.iter(|| backprop_filter(&g, &x, &dy)));
    }
    group.finish();
}

fn models(c: &mut Criterion) {
    let mut group = c.benchmark_group("model");
    group.sample_size(10);
    let g = zoo::build("resnet50").unwrap();
    let mut b = g.init_parameters(0);
    b.insert("image".into(), Tensor::from_shape_vec(vec![8, 224, 224, 3], random(8 * 224 * 224 * 3, 4)).unwrap());
    group.throughput(Throughput::Elements(8));
    group.bench_function("resnet50 forward batch 8", |bench| {
        bench.iter(|| reference::run_outputs(&g, &b, RunOptions::default()).unwrap())
    });

    let d = zoo::build("digits_cnn").unwrap();
    let train = autodiff::training_graph(&d, 0.0).unwrap();
    let mut b = d.init_parameters(0);
    b.insert("image".into(), Tensor::from_shape_vec(vec![32, 8, 8, 1], random(32 * 64, 5)).unwrap());
    b.insert("labels".into(), Tensor::from_shape_vec(vec![32], (0..32).map(|i| (i % 10) as f32).collect()).unwrap());
    group.throughput(Throughput::Elements(32));
    group.bench_function("digits_cnn training step batch 32", |bench| {
        bench.iter(|| reference::run_gradients(&train, &b, RunOptions::training(0)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, convolutions, models);
criterion_main!(benches);

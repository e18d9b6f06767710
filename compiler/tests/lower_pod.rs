//! Data-parallel training steps on a slice, for values: every replica runs its shard of the
//! global batch and the gradient all-reduce exchanges real values (`pod::slice::run_values`).

mod common;

use std::collections::BTreeMap;

use common::lowering::{add_labels, norm_err};
use common::random_bindings;
use systolic_compiler::graph::Op;
use systolic_compiler::lower::{Options, Training, compile};
use systolic_compiler::optimizer::Optimizer;
use systolic_compiler::zoo;
use systolic_simulator::config::presets;
use systolic_simulator::executable::Role;
use systolic_simulator::functional::Functional;
use systolic_simulator::isa::{Operation, Reduction};
use systolic_simulator::numerics::Precision;
use systolic_simulator::pod::slice;

/// The first `rows` rows of replica `r`'s shard of a row-major tensor of `total` rows.
fn shard(values: &[f32], replicas: usize, r: usize) -> Vec<f32> {
    let per = values.len() / replicas;
    values[r * per..(r + 1) * per].to_vec()
}

#[test]
fn a_data_parallel_step_on_v2_8_equals_one_core_on_the_global_batch() {
    // digits_cnn has no batch norm: the mean of the replicas' gradients is the gradient of the
    // global batch, and the updated parameters agree with one core's step on all 16 examples
    // (as bf16 storage rounds: the same roundings per example, sums in another order).
    let g = zoo::build("digits_cnn").unwrap();
    assert!(g.nodes().all(|(_, n)| !matches!(n.op, Op::BatchNorm(_))));
    let machine = presets::preset("v2-8").unwrap();
    let (replicas, per_core) = (8, 2);
    let global = replicas * per_core;
    let training = Some(Training { optimizer: Optimizer::Sgd { learning_rate: 0.1 }, label_smoothing: 0.0 });
    let one = compile(&g, &Options { training, ..Options::new(machine.clone(), global, Precision::Default) }).unwrap();
    let dp = compile(
        &g,
        &Options {
            training,
            replicas,
            bucket_bytes: 4096,
            ..Options::new(machine.clone(), per_core, Precision::Default)
        },
    )
    .unwrap();
    // Small buckets: several all-reduces, each issued as soon as its gradients exist.
    let buckets: Vec<&Operation> = dp
        .executable
        .program
        .instrs
        .iter()
        .map(|i| &i.op)
        .filter(|op| matches!(op, Operation::Collective { .. }))
        .collect();
    assert!(buckets.len() >= 3, "{} buckets", buckets.len());
    assert!(
        buckets.iter().all(|op| matches!(op, Operation::Collective { reduction: Reduction::Mean, replicas: 8, .. }))
    );

    let mut b = random_bindings(&g, global, 3, 5);
    let feed = add_labels(&mut b, global);
    let want: BTreeMap<String, Vec<f32>> =
        one.executable.run(&machine, |n| feed.get(n).and_then(|t| t.as_slice())).unwrap().into_iter().collect();

    let exe = &dp.executable;
    let mut cores: Vec<Functional> = (0..replicas).map(|_| Functional::new(&machine)).collect();
    for (r, core) in cores.iter_mut().enumerate() {
        let mine: BTreeMap<String, Vec<f32>> = exe
            .bindings
            .iter()
            .filter(|b| b.role != Role::Output)
            .map(|b| {
                let all = feed[&b.name].as_slice().unwrap();
                let v = if b.role == Role::Input { shard(all, replicas, r) } else { all.to_vec() };
                (b.name.clone(), v)
            })
            .collect();
        exe.load(core, |n| mine.get(n).map(|v| v.as_slice())).unwrap();
    }
    slice::run_values(&machine, &exe.program, &mut cores).unwrap();
    let outputs: Vec<BTreeMap<String, Vec<f32>>> =
        cores.iter_mut().map(|c| exe.outputs(c).unwrap().into_iter().collect()).collect();
    let mut checked = 0;
    for (name, w) in &want {
        if name == "loss" {
            continue;
        }
        // Every replica holds the same gradients and parameters, bit for bit.
        for o in &outputs[1..] {
            assert_eq!(o[name], outputs[0][name], "{name} differs between replicas");
        }
        let e = norm_err(w, &outputs[0][name]);
        assert!(e < 2e-3, "{name}: {e} in norm");
        checked += 1;
    }
    assert!(checked >= 16, "{checked} tensors checked");
    // The loss each replica reports is its own shard's; their mean is the global batch's.
    let mean: f32 = outputs.iter().map(|o| o["loss"][0]).sum::<f32>() / replicas as f32;
    assert!((mean - want["loss"][0]).abs() < 1e-2 * want["loss"][0].abs(), "{mean} vs {}", want["loss"][0]);
}

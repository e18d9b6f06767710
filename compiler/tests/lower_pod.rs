//! Data-parallel training steps on a slice, for values: every replica runs its shard of the
//! global batch and the gradient all-reduce exchanges real values (`pod::slice::run_values`).

mod common;

use std::collections::BTreeMap;

use common::lowering::{add_labels, batch_normed_trunk, norm_err};
use common::random_bindings;
use ndarray::Axis;
use systolic_compiler::autodiff;
use systolic_compiler::graph::{BatchNorm, DenseSpec, Graph, Op};
use systolic_compiler::lower::training::grad_name;
use systolic_compiler::lower::{Options, Training, compile};
use systolic_compiler::optimizer::{Optimizer, Rule, STEP, Schedule};
use systolic_compiler::reference::{self, RunOptions};
use systolic_compiler::tensors::{Tensor, TensorMap};
use systolic_compiler::zoo;
use systolic_simulator::config::{Machine, presets};
use systolic_simulator::executable::{Executable, Role};
use systolic_simulator::functional::Functional;
use systolic_simulator::isa::{CollectiveKind, DType, Operation, Reduction};
use systolic_simulator::numerics::Precision;
use systolic_simulator::pod::slice;

/// The first `rows` rows of replica `r`'s shard of a row-major tensor of `total` rows.
fn shard(values: &[f32], replicas: usize, r: usize) -> Vec<f32> {
    let per = values.len() / replicas;
    values[r * per..(r + 1) * per].to_vec()
}

/// Runs `exe` on every core of `machine`'s slice in lock step, replica `r` fed its shard of
/// the inputs in `feed` and the whole of everything else; each core's outputs.
fn run_replicas(
    machine: &Machine,
    exe: &Executable,
    feed: &TensorMap,
    replicas: usize,
) -> Vec<BTreeMap<String, Vec<f32>>> {
    run_steps(machine, exe, feed, replicas, 1)
}

/// [`run_replicas`] for `steps` steps on the same inputs (parameters and state carried).
fn run_steps(
    machine: &Machine,
    exe: &Executable,
    feed: &TensorMap,
    replicas: usize,
    steps: usize,
) -> Vec<BTreeMap<String, Vec<f32>>> {
    let mut cores: Vec<Functional> = (0..replicas).map(|_| Functional::new(machine)).collect();
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
    for _ in 0..steps {
        slice::run_values(machine, &exe.program, &mut cores).unwrap();
    }
    cores.iter_mut().map(|c| exe.outputs(c).unwrap().into_iter().collect()).collect()
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
    let training = Some(Training { optimizer: Optimizer::sgd(0.1), label_smoothing: 0.0 });
    let one = compile(
        &g,
        &Options { training: training.clone(), ..Options::new(machine.clone(), global, Precision::Default) },
    )
    .unwrap();
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

    let outputs = run_replicas(&machine, &dp.executable, &feed, replicas);
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

/// The batch-normed trunk of the lowering tests with a dense layer and a batch norm of its
/// own (a statistics pass, where the convolutions' batch norms read the convolutions' sums).
fn batch_normed() -> Graph {
    let mut g = Graph::new("batch_normed");
    let h = batch_normed_trunk(&mut g);
    let h = g.dense("fc", h, DenseSpec::new(12).no_bias()).unwrap();
    let h = g.batch_norm("bn3", h, BatchNorm::default()).unwrap();
    let h = g.relu("relu3", h).unwrap();
    let logits = g.dense("logits", h, 10).unwrap();
    g.set_outputs(vec![logits]);
    g
}

/// Rows `from..to` of a batched tensor.
fn rows(t: &Tensor, from: usize, to: usize) -> Tensor {
    t.slice_axis(Axis(0), (from..to).into()).to_owned()
}

/// Batch norm in a data-parallel step, with statistics over groups of 1 (each replica its own,
/// TensorFlow's default), 2 and all 8 replicas: each group's moving statistics and mean loss
/// are the reference's on the group's examples, and the replicas' gradient is the mean of the
/// reference's over the groups (each replica's loss is its share of its group's, and the
/// statistics depend on every member's examples).
#[test]
fn batch_norm_over_groups_of_replicas_equals_the_reference_on_each_group() {
    let g = batch_normed();
    let machine = presets::preset("v2-8").unwrap();
    let (replicas, per_core) = (8, 4);
    let global = replicas * per_core;
    let (with_loss, loss) = g.with_classifier_loss(0.0).unwrap();
    let grads = autodiff::differentiate(&with_loss, loss, &with_loss.trainable_parameters()).unwrap();
    let mut b = random_bindings(&g, global, 3, 5);
    let feed = add_labels(&mut b, global);
    let training = Some(Training { optimizer: Optimizer::sgd(0.1), label_smoothing: 0.0 });
    for group in [1, 2, 8] {
        // Six passes and f32 storage, so the step is the f32 reference's but for the order of
        // sums and the shift of the statistics (bf16 storage moves a loss over four examples
        // by up to 1%: one ReLU flip).
        let opts = Options {
            training: training.clone(),
            replicas,
            batch_norm_group: group,
            activations: DType::F32,
            ..Options::new(machine.clone(), per_core, Precision::Highest)
        };
        let exe = compile(&g, &opts).unwrap().executable;
        let collectives = exe.program.instrs.iter().filter(|i| matches!(i.op, Operation::Collective { .. })).count();
        let got = run_replicas(&machine, &exe, &feed, replicas);

        let mut mean_grads: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let groups = replicas / group;
        for first in (0..replicas).step_by(group) {
            let (from, to) = (first * per_core, (first + group) * per_core);
            let mut mine = b.clone();
            for name in ["x", "labels"] {
                mine.insert(name.into(), rows(&b[name], from, to));
            }
            let want = reference::run_gradients(&grads, &mine, RunOptions::training(0)).unwrap();
            let what = format!("groups of {group}, replicas {first}..{}", first + group);
            let members = &got[first..first + group];
            // The group's mean loss is the reference's on the group's examples.
            let loss: f32 = members.iter().map(|o| o["loss"][0]).sum::<f32>() / group as f32;
            let want_loss = want.root.iter().next().copied().unwrap();
            assert!((loss - want_loss).abs() < 1e-4 * want_loss.abs(), "{what}: loss {loss} vs {want_loss}");
            for (name, v) in &want.updates {
                for o in members {
                    let e = norm_err(v.as_slice().unwrap(), &o[name]);
                    assert!(e < 1e-4, "{what}: {name}: {e}");
                }
            }
            for (name, gw) in &want.grads {
                let sum = mean_grads.entry(grad_name(name)).or_insert_with(|| vec![0.0; gw.len()]);
                sum.iter_mut().zip(gw.iter()).for_each(|(s, &v)| *s += v / groups as f32);
            }
        }
        for (name, w) in &mean_grads {
            for o in &got[1..] {
                assert_eq!(o[name], got[0][name], "groups of {group}: {name} differs between replicas");
            }
            let e = norm_err(w, &got[0][name]);
            assert!(e < 1e-3, "groups of {group}: {name}: {e} in norm");
        }
        // Per batch norm: a forward and a backward all-reduce of sums over each group.
        let buckets = 1 + usize::from(group > 1) * 6;
        assert!(collectives >= buckets, "groups of {group}: {collectives} collectives");
    }
}

#[test]
fn data_parallel_options_are_checked() {
    let g = batch_normed();
    let machine = presets::preset("v2-8").unwrap();
    let training = Some(Training { optimizer: Optimizer::sgd(0.1), label_smoothing: 0.0 });
    let base = Options { training, replicas: 8, ..Options::new(machine, 2, Precision::Default) };
    let e = compile(&g, &Options { batch_norm_group: 3, ..base.clone() }).unwrap_err().to_string();
    assert!(e.contains("groups of 3") && e.contains("divides the 8 replicas"), "{e}");
    let e = compile(&g, &Options { batch_norm_group: 2, training: None, ..base.clone() }).unwrap_err().to_string();
    assert!(e.contains("applies to training"), "{e}");
    let e = compile(&g, &Options { sharded_update: true, replicas: 1, ..base.clone() }).unwrap_err().to_string();
    assert!(e.contains("sharded weight update") && e.contains("more than one replica (now 1 replica)"), "{e}");
    let e = compile(&g, &Options { sharded_update: true, training: None, ..base.clone() }).unwrap_err().to_string();
    assert!(e.contains("8 replicas, inference"), "{e}");
    // A shard mixes parameters: LARS's per-parameter norms and selective weight decay refused.
    let lars = Some(Training { optimizer: Optimizer::lars(0.1), label_smoothing: 0.0 });
    let e = compile(&g, &Options { sharded_update: true, training: lars, ..base.clone() }).unwrap_err().to_string();
    assert!(e.contains("LARS") && e.contains("turn off the sharded update"), "{e}");
    let decayed = Some(Training { optimizer: Optimizer::sgd(0.1).with_weight_decay(1e-4), label_smoothing: 0.0 });
    let e = compile(&g, &Options { sharded_update: true, training: decayed, ..base }).unwrap_err().to_string();
    assert!(e.contains("weight decay 0.0001") && e.contains("set the weight decay to 0"), "{e}");
}

/// The sharded weight update gives the bits of the all-reduce's: the reduce-scatter's shards
/// hold the all-reduce's sums, and each replica's update of its shard does, element for
/// element, what the whole update does. Three steps, so the slots' shards carry over and the
/// schedules pass their warm-up and a boundary.
#[test]
fn the_sharded_update_gives_the_all_reduce_bits() {
    let g = zoo::build("digits_cnn").unwrap();
    let machine = presets::preset("v2-8").unwrap();
    let (replicas, per_core) = (8, 2);
    let rmsprop = Rule::RmsProp { decay: 0.9, momentum: 0.5, epsilon: 1e-10 };
    for optimizer in [
        Optimizer::momentum(0.1, 0.9),
        Optimizer::adam(0.01),
        Optimizer::nesterov(0.1, 0.9).with_schedule(Schedule::parse("warmup=1,step=2,factor=0.5", 0.1).unwrap()),
        Optimizer::new(rmsprop, 0.01).with_schedule(Schedule::parse("cosine=3", 0.01).unwrap()),
    ] {
        let training = Some(Training { optimizer: optimizer.clone(), label_smoothing: 0.0 });
        let base = Options {
            training,
            replicas,
            bucket_bytes: 4096,
            ..Options::new(machine.clone(), per_core, Precision::Default)
        };
        let mut b = random_bindings(&g, replicas * per_core, 3, 5);
        let feed = add_labels(&mut b, replicas * per_core);
        let run = |sharded: bool| {
            let compiled = compile(&g, &Options { sharded_update: sharded, ..base.clone() }).unwrap();
            let mut feed = feed.clone();
            feed.extend(compiled.initial_state.clone());
            let kinds: Vec<_> = compiled
                .executable
                .program
                .instrs
                .iter()
                .filter_map(|i| match &i.op {
                    Operation::Collective { kind, .. } => Some(*kind),
                    _ => None,
                })
                .collect();
            (run_steps(&machine, &compiled.executable, &feed, replicas, 3), kinds)
        };
        let ((whole, ar), (sharded, rs)) = (run(false), run(true));
        // Buckets of reduce-scatter, then per bucket a shard taken and all-gathered.
        assert!(ar.iter().all(|k| *k == CollectiveKind::AllReduce) && ar.len() >= 3, "{ar:?}");
        let count = |k| rs.iter().filter(|&&x| x == k).count();
        assert_eq!(
            [count(CollectiveKind::ReduceScatter), count(CollectiveKind::Shard), count(CollectiveKind::AllGather)],
            [ar.len(); 3],
            "{rs:?}"
        );
        let mut checked = 0;
        for p in g.trainable_parameters() {
            let name = &g.node(p).name;
            for r in 0..replicas {
                assert_eq!(sharded[r][name], whole[r][name], "{optimizer:?}: {name} on replica {r}");
            }
            checked += 1;
        }
        assert!(checked >= 6, "{checked} parameters");
        assert_eq!(sharded[0]["loss"], whole[0]["loss"]);
        if optimizer.step_index().is_some() {
            assert_eq!((&sharded[0][STEP], &whole[0][STEP]), (&vec![3.0], &vec![3.0]), "{optimizer:?}");
        }
    }
}

//! The estimators as a TensorFlow user meets them: one model function trained with the CPU
//! `Estimator` and with the `TpuEstimator` on a simulated v2-8; TensorFlow's rules; loops of
//! `iterations_per_loop`; checkpoints that resume exactly; NaN stops; evaluation and
//! prediction with padding; host calls, eval metrics and warm starts.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use systolic_compiler::graph::{BatchNorm, ConvSpec, Graph, Pool};
use systolic_compiler::optimizer::{Optimizer, Schedule};
use systolic_compiler::{TensorMap, zoo};
use systolic_runtime::IterationsPerLoop;
use systolic_runtime::data::digits_split;
use systolic_runtime::{
    CrossShardOptimizer, Error, Estimator, EstimatorSpec, EvalMetrics, Examples, HookAction, HostCall, InputContext,
    LoopReport, Loss, MetricUpdate, Mode, Params, RunConfig, TpuConfig, TpuEstimator, TpuEstimatorArgs,
    TpuEstimatorSpec, TrainingHook, Value,
};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("systolic-estimator-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The TPU model function: `model` trained with momentum in a CrossShardOptimizer.
fn tpu_model_fn(model: Graph, lr: f32) -> impl Fn(Mode, &Params) -> systolic_runtime::Result<TpuEstimatorSpec> {
    with_optimizer(model, Optimizer::momentum(lr, 0.9))
}

/// The TPU model function: `model` trained with `optimizer` in a CrossShardOptimizer.
fn with_optimizer(
    model: Graph,
    optimizer: Optimizer,
) -> impl Fn(Mode, &Params) -> systolic_runtime::Result<TpuEstimatorSpec> {
    move |mode, params| {
        assert!(params.batch_size().is_ok(), "the estimator sets batch_size");
        let mut spec = TpuEstimatorSpec::new(mode, model.clone());
        if mode != Mode::Predict {
            spec.loss = Some(Loss::default());
        }
        if mode == Mode::Train {
            spec.train_op = Some(CrossShardOptimizer::new(optimizer.clone()).into());
        }
        Ok(spec)
    }
}

fn digits_input(train: bool) -> impl Fn(&InputContext) -> systolic_runtime::Result<Box<dyn systolic_runtime::Input>> {
    let (tr, te) = digits_split().unwrap();
    let ex: Examples = if train { tr } else { te };
    move |ctx| ex.input(ctx)
}

fn tpu_args(batch: usize) -> TpuEstimatorArgs {
    TpuEstimatorArgs {
        train_batch_size: Some(batch),
        eval_batch_size: Some(batch),
        predict_batch_size: Some(batch),
        ..TpuEstimatorArgs::default()
    }
}

fn quiet<E>(e: &mut E, set: impl FnOnce(&mut E, Box<dyn FnMut(&str)>)) {
    set(e, Box::new(|_| {}));
}

/// The four-step migration: the same model function on the CPU (f32) and on a simulated
/// v2-8 (8 replicas, bf16): the loss curves agree within bf16's drift and the TPU run
/// reports its simulated examples/s.
#[test]
fn the_same_model_trains_on_the_cpu_and_on_a_simulated_v2_8() {
    let model = zoo::build("digits_cnn").unwrap();
    let steps = 12;
    let config = RunConfig {
        tpu_config: TpuConfig { iterations_per_loop: IterationsPerLoop::Steps(4), ..TpuConfig::default() },
        ..RunConfig::default()
    };
    let mut cpu = TpuEstimator::new(
        tpu_model_fn(model.clone(), 0.05),
        TpuEstimatorArgs { use_tpu: false, config: config.clone(), ..tpu_args(64) },
    )
    .unwrap();
    quiet(&mut cpu, |e, l| e.set_log(l));
    let mut tpu = TpuEstimator::new(tpu_model_fn(model, 0.05), TpuEstimatorArgs { config, ..tpu_args(64) }).unwrap();
    quiet(&mut tpu, |e, l| e.set_log(l));
    assert_eq!(tpu.replicas(), 8);
    let a = cpu.train(&digits_input(true), Some(steps), None).unwrap();
    let b = tpu.train(&digits_input(true), Some(steps), None).unwrap();
    let (la, lb) = (a.losses(), b.losses());
    assert_eq!((la.len(), lb.len()), (12, 12));
    // The CPU Estimator with the model function before the migration (an EstimatorSpec, a
    // plain optimizer) is what use_tpu: false runs: the same losses, bit for bit.
    let before = {
        let model = zoo::build("digits_cnn").unwrap();
        move |mode, _: &Params| {
            let mut spec = EstimatorSpec::new(mode, model.clone());
            spec.loss = Some(Loss::default());
            spec.train_op = Some(Optimizer::parse("momentum", 0.05)?.into());
            Ok(spec)
        }
    };
    let mut plain =
        Estimator::new(before, RunConfig::default(), Params::new().with("batch_size", Value::Int(64))).unwrap();
    quiet(&mut plain, |e, l| e.set_log(l));
    assert_eq!(plain.train(&digits_input(true), Some(steps), None).unwrap().losses(), la);
    // Same start, same batches: the first loss differs only by bf16 rounding; the curves
    // stay within 5% of each other and both fall.
    assert!((la[0] - lb[0]).abs() < 0.01 * la[0], "{la:?} vs {lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 0.05 * x.max(*y), "loss curves part: {la:?} vs {lb:?}");
    }
    assert!(la[11] < la[0] && lb[11] < lb[0], "{la:?} {lb:?}");
    assert!(a.simulated_examples_per_second().is_none());
    let ex = b.simulated_examples_per_second().unwrap();
    assert!(ex > 1e4, "simulated examples/s {ex}");
    assert_eq!(b.backend, "v2-8 (8 replicas)");
    // Loops of iterations_per_loop: 4, 4, 4.
    assert_eq!(b.loops.iter().map(|l| l.steps).collect::<Vec<_>>(), vec![4, 4, 4]);
    // Evaluation on the TPU and on the CPU of the TPU-trained model agree.
    let e_tpu = tpu.evaluate(&digits_input(false), Some(3)).unwrap();
    assert_eq!((e_tpu.examples, e_tpu.steps, e_tpu.global_step), (192, 3, 12));
    let e_cpu = cpu.evaluate(&digits_input(false), Some(3)).unwrap();
    assert!((e_tpu.metrics["loss"] - e_cpu.metrics["loss"]).abs() < 0.05 * e_cpu.metrics["loss"]);
    assert!(e_tpu.metrics.contains_key("accuracy") && e_tpu.metrics.contains_key("top_5_accuracy"));
}

#[test]
fn loops_are_min_of_remaining_and_iterations_per_loop() {
    let model = zoo::build("digits_cnn").unwrap();
    let config = RunConfig {
        tpu_config: TpuConfig { iterations_per_loop: IterationsPerLoop::Steps(4), ..TpuConfig::default() },
        ..RunConfig::default()
    };
    let mut e =
        TpuEstimator::new(tpu_model_fn(model, 0.05), TpuEstimatorArgs { use_tpu: false, config, ..tpu_args(16) })
            .unwrap();
    quiet(&mut e, |e, l| e.set_log(l));
    let r = e.train(&digits_input(true), Some(10), None).unwrap();
    assert_eq!(r.loops.iter().map(|l| l.steps).collect::<Vec<_>>(), vec![4, 4, 2]);
    assert_eq!(r.loops.iter().map(|l| l.global_step).collect::<Vec<_>>(), vec![4, 8, 10]);
    // max_steps counts from the start: 3 more to 13; then nothing is left to do.
    let r = e.train(&digits_input(true), None, Some(13)).unwrap();
    assert_eq!((r.start_step, r.global_step), (10, 13));
    let r = e.train(&digits_input(true), None, Some(13)).unwrap();
    assert!(r.loops.is_empty());
    // A duration: the first loop runs one step, the next as many as fit (all that remain).
    let model = zoo::build("digits_cnn").unwrap();
    let config = RunConfig {
        tpu_config: TpuConfig { iterations_per_loop: "1h".parse().unwrap(), ..TpuConfig::default() },
        ..RunConfig::default()
    };
    let mut e =
        TpuEstimator::new(tpu_model_fn(model, 0.05), TpuEstimatorArgs { use_tpu: false, config, ..tpu_args(16) })
            .unwrap();
    quiet(&mut e, |e, l| e.set_log(l));
    let r = e.train(&digits_input(true), Some(7), None).unwrap();
    assert_eq!(r.loops.iter().map(|l| l.steps).collect::<Vec<_>>(), vec![1, 6]);
}

/// per_host_input_for_training decides how many input pipelines train opens and the batch
/// each yields (v2-8: one host, 8 replicas, a global batch of 32).
#[test]
fn input_pipelines_follow_per_host_input_for_training() {
    use systolic_runtime::InputPipeline::*;
    for (kind, want) in [
        (PerHostV1, vec![(0, 1, 32)]),
        (PerShard, (0..8).map(|i| (i, 8, 4)).collect()),
        (PerHostV2, vec![(0, 1, 4)]),
        (Broadcast, vec![(0, 1, 32)]),
    ] {
        let seen: Rc<RefCell<Vec<(usize, usize, usize)>>> = Rc::default();
        let record = seen.clone();
        let (train, _) = digits_split().unwrap();
        let input = move |ctx: &InputContext| {
            record.borrow_mut().push((ctx.input_index, ctx.inputs, ctx.batch_size()?));
            train.input(ctx)
        };
        let config = RunConfig {
            tpu_config: TpuConfig { per_host_input_for_training: kind, ..TpuConfig::default() },
            ..RunConfig::default()
        };
        let model = zoo::build("digits_cnn").unwrap();
        let mut e = TpuEstimator::new(tpu_model_fn(model, 0.05), TpuEstimatorArgs { config, ..tpu_args(32) }).unwrap();
        quiet(&mut e, |e, l| e.set_log(l));
        let r = e.train(&input, Some(2), None).unwrap();
        assert_eq!(*seen.borrow(), want, "{kind:?}");
        assert!(r.losses().iter().all(|l| l.is_finite()));
    }
}

/// A hook sees the start, every loop and the end, and can stop training after a loop (which
/// then ends with a checkpoint).
#[test]
fn hooks_run_at_loop_boundaries_and_can_stop_training() {
    #[derive(Default)]
    struct Recorder {
        events: Vec<String>,
    }
    impl TrainingHook for Recorder {
        fn begin(&mut self, step: u64) -> systolic_runtime::Result<()> {
            self.events.push(format!("begin {step}"));
            Ok(())
        }
        fn after_loop(&mut self, l: &LoopReport) -> systolic_runtime::Result<HookAction> {
            self.events.push(format!("loop {} of {}", l.global_step, l.steps));
            Ok(if l.global_step >= 6 { HookAction::Stop } else { HookAction::Continue })
        }
        fn end(&mut self, r: &systolic_runtime::TrainReport) -> systolic_runtime::Result<()> {
            self.events.push(format!("end {}", r.global_step));
            Ok(())
        }
    }
    let dir = temp_dir("hooks");
    let config = RunConfig {
        model_dir: Some(dir.clone()),
        tpu_config: TpuConfig { iterations_per_loop: IterationsPerLoop::Steps(3), ..TpuConfig::default() },
        ..RunConfig::default()
    };
    let model = zoo::build("digits_cnn").unwrap();
    let mut e =
        TpuEstimator::new(tpu_model_fn(model, 0.05), TpuEstimatorArgs { use_tpu: false, config, ..tpu_args(16) })
            .unwrap();
    quiet(&mut e, |e, l| e.set_log(l));
    let mut hook = Recorder::default();
    let r = e.train_with_hooks(&digits_input(true), &mut [&mut hook], None, Some(100)).unwrap();
    assert_eq!(r.global_step, 6);
    assert_eq!(hook.events, vec!["begin 0", "loop 3 of 3", "loop 6 of 3", "end 6"]);
    let steps: Vec<u64> = systolic_runtime::checkpoint::list(&dir).unwrap().iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![6]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tensorflow_rules_are_errors() {
    let model = zoo::build("digits_cnn").unwrap();
    let msg = |r: systolic_runtime::Result<TpuEstimator>| r.err().map(|e| e.to_string()).unwrap_or_default();
    // A batch that does not divide by the replicas.
    let e = msg(TpuEstimator::new(tpu_model_fn(model.clone(), 0.1), tpu_args(12)));
    assert!(e.contains("train batch size 12 must be divisible by number of replicas 8"), "{e}");
    // Both checkpoint intervals.
    let config =
        RunConfig { save_checkpoints_steps: Some(5), save_checkpoints_secs: Some(60.0), ..RunConfig::default() };
    let e = msg(TpuEstimator::new(tpu_model_fn(model.clone(), 0.1), TpuEstimatorArgs { config, ..tpu_args(16) }));
    assert!(e.contains("both set"), "{e}");
    // Reserved params keys.
    let params = Params::new().with("batch_size", Value::Int(8));
    let e = msg(TpuEstimator::new(tpu_model_fn(model.clone(), 0.1), TpuEstimatorArgs { params, ..tpu_args(16) }));
    assert!(e.contains("reserved key") && e.contains("batch_size"), "{e}");
    // num_shards that is not the machine's.
    let config =
        RunConfig { tpu_config: TpuConfig { num_shards: Some(4), ..TpuConfig::default() }, ..RunConfig::default() };
    let e = msg(TpuEstimator::new(tpu_model_fn(model.clone(), 0.1), TpuEstimatorArgs { config, ..tpu_args(16) }));
    assert!(e.contains("num_shards") && e.contains("does not match v2-8"), "{e}");
    // Neither steps nor max_steps on a TPU; both anywhere.
    let mut est = TpuEstimator::new(tpu_model_fn(model.clone(), 0.1), tpu_args(16)).unwrap();
    let e = est.train(&digits_input(true), None, None).unwrap_err().to_string();
    assert!(e.contains("one of steps or max_steps must be set"), "{e}");
    let e = est.train(&digits_input(true), Some(1), Some(2)).unwrap_err().to_string();
    assert!(e.contains("both steps and max_steps"), "{e}");
    // Several replicas without a CrossShardOptimizer.
    let plain = move |mode: Mode, _: &Params| {
        let mut spec = TpuEstimatorSpec::new(mode, model.clone());
        spec.loss = Some(Loss::default());
        spec.train_op = Some(Optimizer::parse("sgd", 0.1)?.into());
        Ok(spec)
    };
    let mut est = TpuEstimator::new(plain, tpu_args(16)).unwrap();
    let e = est.train(&digits_input(true), Some(1), None).unwrap_err().to_string();
    assert!(e.contains("CrossShardOptimizer must be used for model training on TPUs"), "{e}");
    // A TPU estimator is told each mode's batch size.
    let model = zoo::build("digits_cnn").unwrap();
    let mut bare = TpuEstimator::new(tpu_model_fn(model, 0.1), TpuEstimatorArgs::default()).unwrap();
    let e = bare.train(&digits_input(true), Some(1), None).unwrap_err().to_string();
    assert!(e.starts_with("train_batch_size: cannot be None"), "{e}");
    // Evaluation on a TPU needs steps.
    let e = est.evaluate(&digits_input(false), None).unwrap_err().to_string();
    assert!(e.contains("steps must be set"), "{e}");
}

/// A small CNN with batch norm: replicas' moving statistics differ, and a resumed slice must
/// give each replica its own back.
fn bn_model() -> Graph {
    let mut g = Graph::new("bn_cnn");
    let x = g.input("image", &[8, 8, 1]).unwrap();
    let h = g.conv2d("conv", x, ConvSpec::new(8, 3).same()).unwrap();
    let h = g.batch_norm("bn", h, BatchNorm::default()).unwrap();
    let h = g.relu("relu", h).unwrap();
    let h = g.max_pool("pool", h, Pool::default()).unwrap();
    let h = g.flatten("flat", h).unwrap();
    let logits = g.dense("logits", h, 10).unwrap();
    g.set_outputs(vec![logits]);
    g
}

/// Training 6 steps in one run and in two (4, then resumed to 6 from the checkpoint) ends
/// with the same state bit for bit — on the CPU and on a v2-8 slice with batch norm, with
/// Nesterov momentum, weight decay and a warm-up and cosine schedule (whose global step is
/// optimizer state in the checkpoint).
#[test]
fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    for use_tpu in [false, true] {
        let run = |dir: &PathBuf, max_steps: u64| {
            let config = RunConfig {
                model_dir: Some(dir.clone()),
                save_checkpoints_steps: Some(2),
                random_seed: Some(3),
                ..RunConfig::default()
            };
            let optimizer = Optimizer::nesterov(0.05, 0.9)
                .with_schedule(Schedule::parse("warmup=2,cosine=10", 0.05).unwrap())
                .with_weight_decay(1e-4);
            let model_fn = with_optimizer(bn_model(), optimizer);
            let mut e = TpuEstimator::new(model_fn, TpuEstimatorArgs { use_tpu, config, ..tpu_args(16) }).unwrap();
            quiet(&mut e, |e, l| e.set_log(l));
            e.train(&digits_input(true), None, Some(max_steps)).unwrap()
        };
        let (whole, split) = (temp_dir(&format!("whole-{use_tpu}")), temp_dir(&format!("split-{use_tpu}")));
        run(&whole, 6);
        run(&split, 4);
        let resumed = run(&split, 6);
        assert!(resumed.resumed_from.as_deref().unwrap().ends_with("model.ckpt-4.safetensors"));
        assert_eq!(resumed.start_step, 4);
        let last = |d: &PathBuf| systolic_runtime::checkpoint::load(&systolic_runtime::checkpoint::path(d, 6)).unwrap();
        let (a, b) = (last(&whole), last(&split));
        assert_eq!(a.input_positions, b.input_positions);
        assert_eq!(a.state, b.state, "use_tpu {use_tpu}");
        if use_tpu {
            assert!(a.state.keys().any(|k| k.starts_with("replica1/bn/")), "replicas keep their own statistics");
        }
        assert_eq!(a.state["optimizer/step"][[0]], 6.0);
        // keep_checkpoint_max = 5 of 2, 4, 6: all kept. Resuming with another optimizer is
        // refused: its slots are not in the checkpoint (and the momentum ones are extra).
        assert_eq!(systolic_runtime::checkpoint::list(&whole).unwrap().len(), 3);
        let config = RunConfig { model_dir: Some(whole.clone()), ..RunConfig::default() };
        let mut other = TpuEstimator::new(
            with_optimizer(bn_model(), Optimizer::adam(0.01)),
            TpuEstimatorArgs { use_tpu, config, ..tpu_args(16) },
        )
        .unwrap();
        quiet(&mut other, |e, l| e.set_log(l));
        let err = other.train(&digits_input(true), None, Some(8)).unwrap_err().to_string();
        assert!(err.contains("model.ckpt-6.safetensors") && err.contains("another model or optimizer"), "{err}");
        for d in [whole, split] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}

/// A diverging run stops at the step that went non-finite, on the CPU (the update leaves a
/// NaN in a parameter) and on a simulated v2-8 (where a NaN can vanish behind a ReLU before it
/// reaches the loss: the gradients are checked too), and writes no checkpoint of it.
#[test]
fn a_non_finite_loss_stops_training_naming_the_step() {
    for use_tpu in [false, true] {
        let dir = temp_dir(&format!("nan-{use_tpu}"));
        let config =
            RunConfig { model_dir: Some(dir.clone()), save_checkpoints_steps: Some(1), ..RunConfig::default() };
        let model = zoo::build("digits_cnn").unwrap();
        let mut e =
            TpuEstimator::new(tpu_model_fn(model, 1e30), TpuEstimatorArgs { use_tpu, config, ..tpu_args(16) }).unwrap();
        quiet(&mut e, |e, l| e.set_log(l));
        match e.train(&digits_input(true), Some(20), None) {
            Err(Error::NonFinite { step, tensor, .. }) => {
                assert!((1..=3).contains(&step), "use_tpu {use_tpu}: step {step}");
                assert!(!tensor.is_empty());
                let saved = systolic_runtime::checkpoint::list(&dir).unwrap();
                assert!(saved.iter().all(|c| c.0 < step), "a non-finite state was checkpointed: {saved:?}");
            }
            other => panic!("use_tpu {use_tpu}: expected a non-finite loss error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// An input that ends at a loop boundary ends training there, checkpointed; training again
/// from that checkpoint, the input has nothing left and training returns at once.
#[test]
fn an_input_that_ends_ends_training_with_a_checkpoint() {
    let dir = temp_dir("end");
    let config = RunConfig { model_dir: Some(dir.clone()), ..RunConfig::default() };
    let model = zoo::build("digits_cnn").unwrap();
    let mut e =
        TpuEstimator::new(tpu_model_fn(model, 0.05), TpuEstimatorArgs { use_tpu: false, config, ..tpu_args(16) })
            .unwrap();
    quiet(&mut e, |e, l| e.set_log(l));
    let (train, _) = digits_split().unwrap();
    let four = train.split(0..64);
    let input = move |ctx: &InputContext| {
        let d = systolic_runtime::data::Dataset::from_source(std::sync::Arc::new(four.clone()))
            .batch(ctx.batch_size()?, true)?;
        Ok(Box::new(d) as Box<dyn systolic_runtime::Input>)
    };
    let r = e.train(&input, Some(10), None).unwrap();
    assert_eq!(r.global_step, 4);
    let steps: Vec<u64> = systolic_runtime::checkpoint::list(&dir).unwrap().iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![4]);
    let r = e.train(&input, Some(10), None).unwrap();
    assert_eq!((r.start_step, r.global_step, r.loops.len()), (4, 4, 0));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Prediction pads the last partial batch and drops the padding; host calls see every step;
/// eval_metrics run on the host over the gathered tensors.
#[test]
fn predict_pads_host_calls_run_and_eval_metrics_stream() {
    let model = zoo::build("digits_cnn").unwrap();
    let calls: Arc<Mutex<Vec<(u64, f32)>>> = Arc::default();
    let seen = calls.clone();
    let model_fn = move |mode: Mode, _: &Params| {
        let mut spec = TpuEstimatorSpec::new(mode, model.clone());
        if mode != Mode::Predict {
            spec.loss = Some(Loss::default());
        }
        spec.train_op = Some(CrossShardOptimizer::new(Optimizer::parse("sgd", 0.1)?).into());
        let seen = seen.clone();
        spec.host_call = Some(HostCall {
            host_fn: Arc::new(move |step, t: &TensorMap| {
                seen.lock().unwrap().push((step, t["loss"][[0]]));
                Ok(())
            }),
            tensors: vec!["loss".into(), "global_step".into()],
        });
        spec.eval_metrics = Some(EvalMetrics {
            metric_fn: Arc::new(|t: &TensorMap| {
                let n = t["labels"].len() as f64;
                let zeros = t["labels"].iter().filter(|&&l| l == 0.0).count() as f64;
                Ok(vec![("share_of_zeros".to_string(), MetricUpdate { sum: zeros, count: n })])
            }),
            tensors: vec!["logits".into(), "labels".into()],
        });
        Ok(spec)
    };
    let mut e = TpuEstimator::new(model_fn, tpu_args(16)).unwrap();
    let log = Rc::new(RefCell::new(Vec::<String>::new()));
    let sink = log.clone();
    e.set_log(move |l| sink.borrow_mut().push(l.to_string()));
    e.train(&digits_input(true), Some(3), None).unwrap();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(log.borrow().iter().any(|l| l.contains("simulated on v2-8 (8 replicas)") && l.contains("examples/s")));

    let (_, test) = digits_split().unwrap();
    let few = test.split(0..21);
    let input = move |ctx: &InputContext| few.input(ctx);
    let p = e.predict(&input).unwrap();
    assert_eq!(p["logits"].shape(), &[21, 10]);
    // The padded batch's real rows are what a full batch gives those examples, bit for bit.
    let (_, test) = digits_split().unwrap();
    let next = test.split(16..32);
    let full = e.predict(&move |ctx: &InputContext| next.input(ctx)).unwrap();
    assert_eq!(p["logits"].slice(ndarray::s![16..21, ..]), full["logits"].slice(ndarray::s![0..5, ..]));
    let r = e.evaluate(&digits_input(false), Some(2)).unwrap();
    let (_, test) = digits_split().unwrap();
    let first = test.gather(&(0..32).collect::<Vec<_>>());
    let zeros = first["labels"].iter().filter(|&&l| l == 0.0).count() as f64 / 32.0;
    assert_eq!(r.metrics["share_of_zeros"], zeros);
}

/// Test-time augmentation averages the views' outputs: with a deterministic view (rescale)
/// it equals predicting the rescaled images; with flips it is the mean of the flipped and
/// unflipped predictions' range.
#[test]
fn test_time_augmentation_is_the_mean_over_views() {
    let model = zoo::build("digits_cnn").unwrap();
    let mut e =
        TpuEstimator::new(tpu_model_fn(model, 0.05), TpuEstimatorArgs { use_tpu: false, ..tpu_args(16) }).unwrap();
    quiet(&mut e, |e, l| e.set_log(l));
    e.train(&digits_input(true), Some(2), None).unwrap();
    let (_, test) = digits_split().unwrap();
    let few = test.split(0..20);
    let plain_input = {
        let few = few.clone();
        move |ctx: &InputContext| few.input(ctx)
    };
    let rescale = systolic_runtime::augment::Augment::parse("rescale").unwrap();
    let tta = e.predict_with_tta(&plain_input, &rescale, 3).unwrap();
    let mut rescaled = few.gather(&(0..20).collect::<Vec<_>>());
    rescaled.insert("image".into(), rescaled["image"].mapv(|v| 2.0 * v - 1.0));
    let rescaled = Examples::new(rescaled).unwrap();
    let direct = e.predict(&move |ctx: &InputContext| rescaled.input(ctx)).unwrap();
    let diff = tta["logits"].iter().zip(direct["logits"].iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "three identical views average to the view: {diff}");
    // Random views differ from the plain prediction but average within its neighbourhood.
    let rotate = systolic_runtime::augment::Augment::parse("rotate=10").unwrap();
    let views = e.predict_with_tta(&plain_input, &rotate, 4).unwrap();
    let plain = e.predict(&plain_input).unwrap();
    assert_ne!(views["logits"], plain["logits"]);
    assert_eq!(views["logits"].shape(), &[20, 10]);
}

/// A warm start loads another run's variables through a name map and freezes a pattern:
/// frozen parameters do not move, the rest train.
#[test]
fn warm_start_maps_names_and_freezes() {
    let dir = temp_dir("warm-source");
    let model = zoo::build("digits_cnn").unwrap();
    let config = RunConfig { model_dir: Some(dir.clone()), ..RunConfig::default() };
    let mut source = Estimator::new(
        {
            let model = model.clone();
            move |mode, _: &Params| {
                let mut spec = EstimatorSpec::new(mode, model.clone());
                spec.loss = Some(Loss::default());
                spec.train_op = Some(Optimizer::parse("sgd", 0.1)?.into());
                Ok(spec)
            }
        },
        config,
        Params::new().with("batch_size", Value::Int(16)),
    )
    .unwrap();
    quiet(&mut source, |e, l| e.set_log(l));
    source.train(&digits_input(true), Some(2), None).unwrap();
    let trained = systolic_runtime::checkpoint::latest(&dir).unwrap().0.unwrap().state;

    let warm = systolic_runtime::WarmStart {
        from: dir.clone(),
        vars_to_warm_start: Some("conv.*".into()),
        var_name_to_prev_var_name: vec![],
        freeze: Some("conv1/.*".into()),
    };
    // A name map entry for a variable vars_to_warm_start leaves out is refused.
    let stray = systolic_runtime::WarmStart {
        var_name_to_prev_var_name: vec![("fc1/kernel".into(), "fc1/kernel".into())],
        ..warm.clone()
    };
    let mut e = TpuEstimator::new(
        tpu_model_fn(model.clone(), 0.1),
        TpuEstimatorArgs { use_tpu: false, warm_start_from: Some(stray), ..tpu_args(16) },
    )
    .unwrap();
    quiet(&mut e, |e, l| e.set_log(l));
    let err = e.train(&digits_input(true), Some(1), None).unwrap_err().to_string();
    assert!(err.contains("maps 'fc1/kernel'"), "{err}");
    let target = temp_dir("warm-target");
    let config = RunConfig { model_dir: Some(target.clone()), ..RunConfig::default() };
    let mut e = TpuEstimator::new(
        tpu_model_fn(model.clone(), 0.1),
        TpuEstimatorArgs { use_tpu: false, warm_start_from: Some(warm), config, ..tpu_args(16) },
    )
    .unwrap();
    quiet(&mut e, |e, l| e.set_log(l));
    e.train(&digits_input(true), Some(2), None).unwrap();
    let after = systolic_runtime::checkpoint::latest(&target).unwrap().0.unwrap().state;
    let fresh = model.init_parameters(0);
    // conv1: loaded and frozen; conv2: loaded, then trained; the head: fresh, then trained.
    assert_eq!(after["conv1/kernel"], trained["conv1/kernel"]);
    assert!(!after.contains_key("conv1/kernel/momentum"), "a frozen parameter has no slots");
    assert_ne!(after["conv2/kernel"], trained["conv2/kernel"]);
    let moved = |name: &str, from: &TensorMap| {
        after[name].iter().zip(from[name].iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
    };
    assert!(moved("conv2/kernel", &trained) < 0.05, "conv2 starts from the source run's values");
    assert!(moved("logits/kernel", &fresh) > 0.0 && moved("logits/kernel", &fresh) < 0.05);
    // A pattern that matches nothing, and a shape that does not fit, are errors.
    let bad = systolic_runtime::WarmStart { from: dir.clone(), freeze: Some("nosuch.*".into()), ..Default::default() };
    let mut e = TpuEstimator::new(
        tpu_model_fn(model.clone(), 0.1),
        TpuEstimatorArgs { use_tpu: false, warm_start_from: Some(bad), ..tpu_args(16) },
    )
    .unwrap();
    let err = e.train(&digits_input(true), Some(1), None).unwrap_err().to_string();
    assert!(err.contains("matches no trainable parameter"), "{err}");
    let eleven = zoo::build_with("digits_cnn", zoo::ZooOptions { classes: Some(11), ..Default::default() }).unwrap();
    let all = systolic_runtime::WarmStart { from: dir.clone(), ..Default::default() };
    let mut e = TpuEstimator::new(
        tpu_model_fn(eleven, 0.1),
        TpuEstimatorArgs { use_tpu: false, warm_start_from: Some(all), ..tpu_args(16) },
    )
    .unwrap();
    quiet(&mut e, |e, l| e.set_log(l));
    let err = e.train(&digits_input(true), Some(1), None).unwrap_err().to_string();
    assert!(err.contains("'logits/kernel' has shape [64, 10]") && err.contains("leave it out"), "{err}");
    std::fs::remove_dir_all(target).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

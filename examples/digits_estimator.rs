//! The four-step migration of an Estimator model to a TPU, on the shipped 8×8 digits:
//! `digits_cnn` trained with the CPU `Estimator` (f32), then — after TensorFlow's four
//! changes — with the `TpuEstimator` on a simulated v2-8 (8 replicas, bf16 MXU passes).
//! Prints both loss curves, both test accuracies and the simulated examples/s.
//!
//! ```text
//! cargo run --release --example digits_estimator -- [--steps 300] [--batch 64] [--lr 0.05] [--machine v2-8] [--cpu-only]
//! ```
//!
//! The data (1,797 images, CC BY 4.0, Alpaydin & Kaynak 1998) ship in `data/digits/`:
//! 1,500 to train, 297 to test (`runtime::data::digits_split`).

use std::time::Instant;

use anyhow::{Context, Result};
use systolic::compiler::optimizer::Optimizer;
use systolic::compiler::zoo;
use systolic::runtime::data::digits_split;
use systolic::runtime::{
    CrossShardOptimizer, Estimator, EstimatorSpec, Examples, InputContext, IterationsPerLoop, Loss, Mode, Params,
    RunConfig, TpuConfig, TpuEstimator, TpuEstimatorArgs, TpuEstimatorSpec, TrainReport, Value,
};
use systolic::simulator::config::presets;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn number(name: &str, default: f64) -> Result<f64> {
    arg(name).map_or(Ok(default), |v| v.parse().with_context(|| format!("{name} takes a number, not {v}")))
}

/// The model function before the migration: an `EstimatorSpec` with a plain optimizer.
fn model_fn(lr: f32) -> impl Fn(Mode, &Params) -> systolic::runtime::Result<EstimatorSpec> {
    move |mode, _params| {
        let mut spec = EstimatorSpec::new(mode, zoo::build("digits_cnn")?);
        spec.loss = Some(Loss::default());
        spec.train_op = Some(Optimizer::parse("momentum", lr)?.into());
        Ok(spec)
    }
}

/// After: steps 1 and 2 — the optimizer in a `CrossShardOptimizer`, a `TpuEstimatorSpec`.
fn tpu_model_fn(lr: f32) -> impl Fn(Mode, &Params) -> systolic::runtime::Result<TpuEstimatorSpec> {
    move |mode, _params| {
        let mut spec = TpuEstimatorSpec::new(mode, zoo::build("digits_cnn")?);
        spec.loss = Some(Loss::default());
        spec.train_op = Some(CrossShardOptimizer::new(Optimizer::parse("momentum", lr)?).into());
        Ok(spec)
    }
}

fn input(examples: Examples) -> impl Fn(&InputContext) -> systolic::runtime::Result<Box<dyn systolic::runtime::Input>> {
    move |ctx| examples.input(ctx)
}

/// The loss every `every` steps.
fn curve(r: &TrainReport, every: usize) -> String {
    let l = r.losses();
    l.iter()
        .enumerate()
        .filter(|(i, _)| i % every == 0 || *i + 1 == l.len())
        .map(|(_, v)| format!("{v:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the example measured.
#[allow(dead_code)] // Read by tests/examples.rs.
pub struct Summary {
    pub cpu_accuracy: f64,
    pub tpu_accuracy: Option<f64>,
    pub simulated_examples_per_second: Option<f64>,
}

fn main() -> Result<()> {
    let steps = number("--steps", 300.0)? as u64;
    let batch = number("--batch", 64.0)? as usize;
    let lr = number("--lr", 0.05)? as f32;
    let machine = arg("--machine").unwrap_or_else(|| "v2-8".into());
    let cpu_only = std::env::args().any(|a| a == "--cpu-only");
    run(steps, batch, lr, &machine, cpu_only)?;
    Ok(())
}

/// Trains with the CPU Estimator, then (unless `cpu_only`) with the TpuEstimator on `machine`.
pub fn run(steps: u64, batch: usize, lr: f32, machine: &str, cpu_only: bool) -> Result<Summary> {
    let (train, test) = digits_split()?;
    let test_steps = test.len().div_ceil(batch) as u64;

    // Before: the CPU Estimator, f32. `params` carry the batch size the input function reads.
    let params = Params::new().with("batch_size", Value::Int(batch as i64));
    let mut cpu = Estimator::new(model_fn(lr), RunConfig::default(), params)?;
    cpu.set_log(|_| {});
    let began = Instant::now();
    let a = cpu.train(&input(train.clone()), Some(steps), None)?;
    let cpu_wall = began.elapsed().as_secs_f64();
    let ea = cpu.evaluate(&input(test.clone()), Some(test_steps))?;
    println!("CPU Estimator (f32), {steps} steps of {batch} in {cpu_wall:.1} s:");
    println!("  loss every {} steps: {}", steps / 10, curve(&a, (steps / 10).max(1) as usize));
    println!("  test accuracy {:.1}% ({} examples)", 100.0 * ea.metrics["accuracy"], ea.examples);
    let mut summary =
        Summary { cpu_accuracy: ea.metrics["accuracy"], tpu_accuracy: None, simulated_examples_per_second: None };
    if cpu_only {
        return Ok(summary);
    }

    // After: steps 3 and 4 — a RunConfig with a TpuConfig, and the TpuEstimator.
    let config = RunConfig {
        tpu_config: TpuConfig { iterations_per_loop: IterationsPerLoop::Steps(100), ..TpuConfig::default() },
        ..RunConfig::default()
    };
    let args = TpuEstimatorArgs {
        config,
        machine: Some(presets::preset(machine)?),
        train_batch_size: Some(batch),
        eval_batch_size: Some(batch),
        ..TpuEstimatorArgs::default()
    };
    let mut tpu = TpuEstimator::new(tpu_model_fn(lr), args)?;
    tpu.set_log(|line| println!("  {line}"));
    println!("TpuEstimator on a simulated {machine} ({} replicas, bf16):", tpu.replicas());
    let began = Instant::now();
    let b = tpu.train(&input(train), Some(steps), None)?;
    let tpu_wall = began.elapsed().as_secs_f64();
    let eb = tpu.evaluate(&input(test), Some(test_steps))?;
    println!("  loss every {} steps: {}", steps / 10, curve(&b, (steps / 10).max(1) as usize));
    // Step by step the curves part once bf16 rounding has moved the parameters (training is
    // chaotic); their means over windows of steps stay together.
    let window = (steps / 5).max(1) as usize;
    let means = |l: Vec<f32>| {
        l.chunks(window).map(|c| format!("{:.3}", c.iter().sum::<f32>() / c.len() as f32)).collect::<Vec<_>>().join(" ")
    };
    println!("  mean loss per {window} steps: CPU {} | TPU {}", means(a.losses()), means(b.losses()));
    println!("  test accuracy {:.1}% ({} examples)", 100.0 * eb.metrics["accuracy"], eb.examples);
    println!(
        "  simulated {:.0} examples/s on {machine}; the functional simulation took {tpu_wall:.1} s of wall time",
        b.simulated_examples_per_second().unwrap_or(0.0)
    );
    summary.tpu_accuracy = Some(eb.metrics["accuracy"]);
    summary.simulated_examples_per_second = b.simulated_examples_per_second();
    Ok(summary)
}

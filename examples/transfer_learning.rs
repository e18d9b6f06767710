//! Transfer learning on the shipped digits: pre-train `digits_cnn` on the digits 0–4, then
//! learn 5–9 from 20 examples per class three ways — frozen features (the pre-trained
//! convolutions loaded and frozen: no gradients for them, so the step is cheaper; the dense
//! layer loaded and trained, a new 5-class head), full fine-tuning (loaded, everything
//! trained) and from scratch — and compare their test accuracies.
//!
//! ```text
//! cargo run --release --example transfer_learning -- [--pretrain-steps 300] [--steps 150] [--per-class 20]
//! ```
//!
//! Each way runs with a short budget (a quarter of `--steps`) and the full one: on these small
//! images transfer wins the short budget, and training from scratch catches up given time.

use anyhow::{Context, Result};
use systolic::compiler::TensorMap;
use systolic::compiler::optimizer::Optimizer;
use systolic::compiler::zoo::{self, ZooOptions};
use systolic::runtime::data::digits_split;
use systolic::runtime::{
    CrossShardOptimizer, Examples, InputContext, Loss, Mode, Params, RunConfig, TpuEstimator, TpuEstimatorArgs,
    TpuEstimatorSpec, WarmStart,
};

fn number(name: &str, default: f64) -> Result<f64> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).with_context(|| format!("{name} needs a value"))?.parse().context(name.to_string()),
        None => Ok(default),
    }
}

/// The examples whose label is in `classes`, relabelled from 0, at most `per_class` of each.
fn classes(ex: &Examples, classes: std::ops::Range<usize>, per_class: Option<usize>) -> Result<Examples> {
    let all = ex.gather(&(0..ex.len()).collect::<Vec<_>>());
    let mut taken = vec![0usize; classes.len()];
    let mut keep = Vec::new();
    for (i, &l) in all["labels"].iter().enumerate() {
        let l = l as usize;
        if classes.contains(&l) && per_class.is_none_or(|n| taken[l - classes.start] < n) {
            taken[l - classes.start] += 1;
            keep.push(i);
        }
    }
    let mut picked: TensorMap = ex.gather(&keep);
    let labels = picked["labels"].mapv(|l| l - classes.start as f32);
    picked.insert("labels".into(), labels);
    Ok(Examples::new(picked)?)
}

/// digits_cnn with five classes, trained with momentum (a CrossShardOptimizer: the same model
/// function serves a TPU).
fn model_fn(lr: f32) -> impl Fn(Mode, &Params) -> systolic::runtime::Result<TpuEstimatorSpec> {
    move |mode, _| {
        let model = zoo::build_with("digits_cnn", ZooOptions { classes: Some(5), ..ZooOptions::default() })?;
        let mut spec = TpuEstimatorSpec::new(mode, model);
        spec.loss = Some(Loss::default());
        spec.train_op = Some(CrossShardOptimizer::new(Optimizer::momentum(lr, 0.9)).into());
        Ok(spec)
    }
}

fn input(ex: Examples) -> impl Fn(&InputContext) -> systolic::runtime::Result<Box<dyn systolic::runtime::Input>> {
    move |ctx| ex.input(ctx)
}

/// Test accuracies on the digits 5–9 after the short and the full budget: frozen features,
/// full fine-tuning, from scratch.
#[allow(dead_code)] // Read by tests/examples.rs.
pub struct Summary {
    pub pretrained: f64,
    pub short: [f64; 3],
    pub full: [f64; 3],
}

fn main() -> Result<()> {
    let pretrain_steps = number("--pretrain-steps", 300.0)? as u64;
    let steps = number("--steps", 150.0)? as u64;
    let per_class = number("--per-class", 20.0)? as usize;
    run(pretrain_steps, steps, per_class)?;
    Ok(())
}

/// Runs the comparison (on the f32 CPU reference, `use_tpu: false`, so it takes seconds).
pub fn run(pretrain_steps: u64, steps: u64, per_class: usize) -> Result<Summary> {
    let (train, test) = digits_split()?;
    let dir = std::env::temp_dir().join(format!("systolic-transfer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = |model_dir: &str, batch: usize, warm: Option<WarmStart>| TpuEstimatorArgs {
        use_tpu: false,
        config: RunConfig { model_dir: Some(dir.join(model_dir)), random_seed: Some(1), ..RunConfig::default() },
        train_batch_size: Some(batch),
        eval_batch_size: Some(100),
        warm_start_from: warm,
        ..TpuEstimatorArgs::default()
    };
    let test_late = classes(&test, 5..10, None)?;
    let eval_steps = test_late.len().div_ceil(100) as u64;

    let mut pre = TpuEstimator::new(model_fn(0.05), args("pretrain", 64, None))?;
    pre.set_log(|_| {});
    pre.train(&input(classes(&train, 0..5, None)?), Some(pretrain_steps), None)?;
    let early = pre.evaluate(&input(classes(&test, 0..5, None)?), Some(2))?;
    println!(
        "pre-trained on the digits 0-4 ({pretrain_steps} steps of 64): test accuracy {:.1}% on 0-4",
        100.0 * early.metrics["accuracy"]
    );

    let few = classes(&train, 5..10, Some(per_class))?;
    let short = (steps / 4).max(1);
    println!(
        "learning the digits 5-9 from {} examples ({per_class} per class), test accuracy after {short} | {steps} steps of {}:",
        few.len(),
        few.len().min(20)
    );
    // Everything but the classifier comes from the pre-trained run; "frozen" freezes the
    // convolutional part (the dense layer after it adapts, the new head learns).
    let warm = |freeze: bool| WarmStart {
        from: dir.join("pretrain"),
        vars_to_warm_start: Some("conv.*|fc1/.*".into()),
        var_name_to_prev_var_name: Vec::new(),
        freeze: freeze.then(|| "conv.*".to_string()),
    };
    let (mut at_short, mut at_full) = ([0.0; 3], [0.0; 3]);
    for (k, (name, warm)) in
        [("frozen features", Some(warm(true))), ("full fine-tuning", Some(warm(false))), ("from scratch", None)]
            .into_iter()
            .enumerate()
    {
        let mut e = TpuEstimator::new(model_fn(0.02), args(name, few.len().min(20), warm))?;
        e.set_log(|_| {});
        // Train to the short budget, evaluate, then on to the full one (resumed in place).
        e.train(&input(few.clone()), None, Some(short))?;
        at_short[k] = e.evaluate(&input(test_late.clone()), Some(eval_steps))?.metrics["accuracy"];
        e.train(&input(few.clone()), None, Some(steps))?;
        let r = e.evaluate(&input(test_late.clone()), Some(eval_steps))?;
        at_full[k] = r.metrics["accuracy"];
        println!(
            "  {name:<17} {:5.1}% | {:5.1}% ({} test digits 5-9)",
            100.0 * at_short[k],
            100.0 * at_full[k],
            r.examples
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(Summary { pretrained: early.metrics["accuracy"], short: at_short, full: at_full })
}

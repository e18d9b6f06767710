//! Data augmentation with few training examples: `digits_cnn` trained on 10 digits per class
//! with and without run-time augmentation (small rotations, crops and zooms, freshly random
//! for every example in every step), the test accuracy of each, and a grid of the
//! augmented views as PNG.
//!
//! ```text
//! cargo run --release --example augmentation -- [--per-class 10] [--steps 400] [--augment rotate=12,crop=0.7,zoom=1.15] [--out augmentation.png]
//! ```

use anyhow::{Context, Result};
use systolic::compiler::optimizer::Optimizer;
use systolic::compiler::zoo;
use systolic::compiler::{Tensor, rng};
use systolic::runtime::augment::{self, Augment, Image};
use systolic::runtime::data::{self, digits_split};
use systolic::runtime::input::{self as inputs, Input};
use systolic::runtime::{
    CrossShardOptimizer, Examples, InputContext, Loss, Mode, Params, RunConfig, TpuEstimator, TpuEstimatorArgs,
    TpuEstimatorSpec,
};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn number(name: &str, default: f64) -> Result<f64> {
    arg(name).map_or(Ok(default), |v| v.parse().with_context(|| format!("{name} takes a number, not {v}")))
}

/// The first `per_class` training digits of each class.
fn few(train: &Examples, per_class: usize) -> Result<Examples> {
    let labels = train.gather(&(0..train.len()).collect::<Vec<_>>())["labels"].clone();
    let mut taken = [0usize; 10];
    let keep: Vec<usize> = (0..train.len())
        .filter(|&i| {
            let c = labels[[i]] as usize;
            taken[c] += 1;
            taken[c] <= per_class
        })
        .collect();
    Ok(Examples::new(train.gather(&keep))?)
}

fn model_fn(mode: Mode, _: &Params) -> systolic::runtime::Result<TpuEstimatorSpec> {
    let mut spec = TpuEstimatorSpec::new(mode, zoo::build("digits_cnn")?);
    spec.loss = Some(Loss::default());
    spec.train_op = Some(CrossShardOptimizer::new(Optimizer::momentum(0.02, 0.9)).into());
    Ok(spec)
}

/// Test accuracies without and with augmentation.
#[allow(dead_code)] // Read by tests/examples.rs.
pub struct Summary {
    pub plain: f64,
    pub augmented: f64,
}

fn main() -> Result<()> {
    let per_class = number("--per-class", 10.0)? as usize;
    let steps = number("--steps", 400.0)? as u64;
    let spec = arg("--augment").unwrap_or_else(|| "rotate=12,crop=0.7,zoom=1.15".into());
    let out = arg("--out").unwrap_or_else(|| "augmentation.png".into());
    run(per_class, steps, &spec, std::path::Path::new(&out))?;
    Ok(())
}

/// Trains twice (on the f32 CPU reference) and writes the grid to `out`.
pub fn run(per_class: usize, steps: u64, spec: &str, out: &std::path::Path) -> Result<Summary> {
    let augment = Augment::parse(spec)?;
    augment.check(1)?;
    let (train, test) = digits_split()?;
    let small = few(&train, per_class)?;
    let batch = small.len().min(50);
    println!("digits_cnn on {} training digits ({per_class} per class), {steps} steps of {batch}:", small.len());
    let mut accuracy = [0.0; 2];
    for (k, with) in [None, Some(augment.clone())].into_iter().enumerate() {
        let args = TpuEstimatorArgs {
            use_tpu: false,
            config: RunConfig { random_seed: Some(2), ..RunConfig::default() },
            train_batch_size: Some(batch),
            eval_batch_size: Some(99),
            ..TpuEstimatorArgs::default()
        };
        let mut e = TpuEstimator::new(model_fn, args)?;
        e.set_log(|_| {});
        let source = small.clone();
        let input = move |ctx: &InputContext| -> systolic::runtime::Result<Box<dyn Input>> {
            let mut d = source.dataset(ctx)?;
            if let Some(a) = &with {
                d = d.map(data::augmentation("image", a.clone(), ctx.seed, ctx.input_index));
            }
            Ok(Box::new(inputs::batched(d, ctx)?))
        };
        e.train(&input, Some(steps), None)?;
        let test = test.clone();
        let r = e.evaluate(&move |ctx: &InputContext| test.input(ctx), Some(3))?;
        accuracy[k] = r.metrics["accuracy"];
        let what = if k == 0 { "without augmentation".to_string() } else { format!("with {augment}") };
        println!("  {what:<44} test accuracy {:.1}% ({} test digits)", 100.0 * accuracy[k], r.examples);
    }
    // The grid: six training digits, each the original then five augmented views.
    let images: Tensor = small.gather(&(0..6).collect::<Vec<_>>())["image"].clone();
    let mut cells = Vec::new();
    for (i, example) in images.outer_iter().enumerate() {
        let original = Image::from_example(&[8, 8, 1], example.as_standard_layout().as_slice().expect("contiguous"))?;
        cells.push(original.clone());
        for view in 0..5u64 {
            cells.push(augment.apply(&original, rng::derive(view, i as u64))?);
        }
    }
    augment::write_png(out, &augment::grid(&cells, 6, 1))?;
    println!("  wrote {}: six training digits, each the original then five views", out.display());
    Ok(Summary { plain: accuracy[0], augmented: accuracy[1] })
}

//! `systolic train`, `evaluate` and `predict`: a model trained, evaluated and run through
//! the runtime's TPUEstimator on a simulated machine (`--machine`) or the f32 CPU reference
//! (`--cpu`, TensorFlow's `use_tpu=False`), with checkpoints and metrics in `--model-dir`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use systolic::compiler::optimizer::Optimizer;
use systolic::compiler::{Graph, TensorMap};
use systolic::runtime::data;
use systolic::runtime::{
    CrossShardOptimizer, Examples, InputContext, IterationsPerLoop, Loss, Mode, Params, RunConfig, TpuEstimator,
    TpuEstimatorArgs, TpuEstimatorSpec,
};

/// What every estimator command shares: the model, where it runs, the data and the run's
/// folder and configuration.
#[derive(clap::Args)]
pub struct Common {
    /// A zoo model name or a `.ron` graph.
    model: String,
    /// Run on the f32 CPU reference instead of a simulated TPU (TensorFlow's use_tpu=False).
    #[arg(long, conflicts_with_all = ["machine", "precision"])]
    cpu: bool,
    /// The simulated machine: a preset (`v2-8`: 8 replicas) or a `.ron` file.
    #[arg(long)]
    machine: Option<String>,
    /// MXU precision on the TPU: default (one bf16 pass), high or highest.
    #[arg(long)]
    precision: Option<String>,
    /// Global batch size (every replica's examples); must divide by the replicas.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// `digits` (the built-in 8x8 digits: 1,500 to train, 297 to test) or a safetensors file of
    /// examples (the model's inputs and integer `labels`, examples first).
    #[arg(long, default_value = "digits")]
    dataset: String,
    /// Checkpoints and metrics.jsonl go here; training resumes from its newest checkpoint.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// A RunConfig as RON (`(model_dir: Some("runs/a"), save_checkpoints_steps: Some(100),
    /// tpu_config: (iterations_per_loop: "30s"))`); the options here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seeds parameter initialisation and the input's shuffle (RunConfig's random_seed).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    common: Common,
    /// Train until this global step (TensorFlow's max_steps: a restarted run continues from
    /// its checkpoint to the same step).
    #[arg(long)]
    steps: u64,
    /// Steps per host round trip: a count or a duration (`30s`, `5m`, `1h`).
    #[arg(long)]
    iterations_per_loop: Option<String>,
    /// sgd, momentum (0.9), nesterov (0.9), adam, rmsprop or lars (in a CrossShardOptimizer,
    /// which on several replicas puts the gradient all-reduce in the step).
    #[arg(long, default_value = "momentum")]
    optimizer: String,
    /// The learning rate (the schedule's base rate).
    #[arg(long, visible_alias = "learning-rate", default_value_t = 0.05, allow_negative_numbers = true)]
    lr: f32,
    /// The learning rate by global step: constant, warmup=N, or a decay (step=B1/B2/...[,factor=F],
    /// poly=N[,end=F][,power=F], cosine=N[,alpha=F]) optionally after warmup=N.
    #[arg(long, default_value = "constant", value_name = "SPEC")]
    schedule: String,
    /// L2 weight decay on all parameters but batch norm's and biases.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f32,
    /// Label smoothing of the softmax cross-entropy loss.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// Write a checkpoint every N steps (at the first loop boundary past each multiple).
    #[arg(long)]
    save_checkpoints_steps: Option<u64>,
}

#[derive(clap::Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    common: Common,
    /// Batches to evaluate; default: the whole test split (required on a TPU by TensorFlow,
    /// so the command counts them for you).
    #[arg(long)]
    steps: Option<u64>,
}

#[derive(clap::Args)]
pub struct PredictArgs {
    #[command(flatten)]
    common: Common,
    /// Where to write the predictions (safetensors, one row per example).
    #[arg(long)]
    output: PathBuf,
}

/// The model function every command uses: the model, its classifier loss, the optimizer in
/// a CrossShardOptimizer (a no-op on one replica, required on several).
fn model_fn(
    model: Graph,
    optimizer: Optimizer,
    label_smoothing: f32,
) -> impl Fn(Mode, &Params) -> systolic::runtime::Result<TpuEstimatorSpec> {
    move |mode, _params| {
        let mut spec = TpuEstimatorSpec::new(mode, model.clone());
        if mode != Mode::Predict {
            spec.loss = Some(Loss { label_smoothing });
        }
        if mode == Mode::Train {
            spec.train_op = Some(CrossShardOptimizer::new(optimizer.clone()).into());
        }
        Ok(spec)
    }
}

impl Common {
    /// The run configuration: the file's, then the options'.
    fn config(&self) -> Result<RunConfig> {
        let mut c = match &self.config {
            Some(path) => RunConfig::load(path)?,
            None => RunConfig::default(),
        };
        if let Some(d) = &self.model_dir {
            c.model_dir = Some(d.clone());
        }
        if let Some(s) = self.seed {
            c.random_seed = Some(s);
        }
        Ok(c)
    }

    /// The estimator for `model_fn` with `batch` in every mode.
    fn estimator(
        &self,
        config: RunConfig,
        optimizer: Optimizer,
        label_smoothing: f32,
    ) -> Result<(TpuEstimator, Graph)> {
        let model = super::load_model(&self.model)?;
        let (machine, precision) = if self.cpu {
            (None, systolic::simulator::numerics::Precision::Highest)
        } else {
            let target = super::Target {
                machine: self.machine.clone().unwrap_or_else(|| "v2-8".into()),
                precision: self.precision.clone().unwrap_or_else(|| "default".into()),
                sets: Vec::new(),
            };
            let (m, p) = target.resolve()?;
            (Some(m), p)
        };
        let args = TpuEstimatorArgs {
            config,
            use_tpu: !self.cpu,
            machine,
            precision,
            train_batch_size: Some(self.batch),
            eval_batch_size: Some(self.batch),
            predict_batch_size: Some(self.batch),
            ..TpuEstimatorArgs::default()
        };
        let mut est = TpuEstimator::new(model_fn(model.clone(), optimizer, label_smoothing), args)?;
        est.set_log(|line| println!("{line}"));
        Ok((est, model))
    }

    /// The examples of `--dataset` for training (`train`) or testing.
    fn examples(&self, train: bool) -> Result<Examples> {
        if self.dataset == "digits" {
            let (tr, te) = data::digits_split()?;
            return Ok(if train { tr } else { te });
        }
        let path = Path::new(&self.dataset);
        anyhow::ensure!(
            path.extension().is_some_and(|e| e == "safetensors"),
            "--dataset {}: give digits or a .safetensors file of examples",
            self.dataset
        );
        Ok(data::load(path)?)
    }
}

fn input_fn(
    examples: Examples,
) -> impl Fn(&InputContext) -> systolic::runtime::Result<Box<dyn systolic::runtime::Input>> {
    move |ctx| examples.input(ctx)
}

pub fn train(args: TrainArgs) -> Result<()> {
    let c = &args.common;
    let mut config = c.config()?;
    if let Some(i) = &args.iterations_per_loop {
        config.tpu_config.iterations_per_loop =
            i.parse::<IterationsPerLoop>().map_err(anyhow::Error::msg).context("--iterations-per-loop")?;
    }
    if let Some(n) = args.save_checkpoints_steps {
        config.save_checkpoints_steps = Some(n);
        config.save_checkpoints_secs = None;
    }
    let optimizer = super::compile::optimizer(&args.optimizer, args.lr, &args.schedule, args.weight_decay)?;
    let (mut est, model) = c.estimator(config, optimizer, args.label_smoothing)?;
    let examples = c.examples(true)?;
    let began = Instant::now();
    let report = est.train(&input_fn(examples), None, Some(args.steps))?;
    let wall = began.elapsed().as_secs_f64();
    if report.loops.is_empty() {
        println!("{} is already trained to global step {}", model.name(), report.global_step);
        return Ok(());
    }
    let losses = report.losses();
    let last = report.loops.last().expect("at least one loop");
    println!(
        "trained {} from global step {} to {} on {}: loss {:.4} -> {:.4} ({} steps in {wall:.1} s)",
        model.name(),
        report.start_step,
        report.global_step,
        report.backend,
        losses[0],
        last.mean_loss(),
        losses.len(),
    );
    if let Some(ex) = report.simulated_examples_per_second() {
        println!("simulated: {ex:.0} examples/s ({:.1} steps/s)", ex / last.batch as f64);
    }
    if let Some(dir) = &est.config().model_dir {
        println!("checkpoint: {}", systolic::runtime::checkpoint::path(dir, report.global_step).display());
    }
    Ok(())
}

pub fn evaluate(args: EvaluateArgs) -> Result<()> {
    let c = &args.common;
    let (mut est, _) = c.estimator(c.config()?, Optimizer::default(), 0.0)?;
    let examples = c.examples(false)?;
    let steps = args.steps.unwrap_or(examples.len().div_ceil(c.batch) as u64);
    // The estimator prints the metrics (and writes them to the model folder's metrics file).
    est.evaluate(&input_fn(examples), Some(steps))?;
    Ok(())
}

pub fn predict(args: PredictArgs) -> Result<()> {
    let c = &args.common;
    let (mut est, _) = c.estimator(c.config()?, Optimizer::default(), 0.0)?;
    let mut examples = c.examples(false)?;
    // Prediction reads features only.
    examples = examples.without("labels");
    let p: TensorMap = est.predict(&input_fn(examples))?;
    super::save_tensors(&args.output, &p)?;
    let shapes: Vec<String> = p.iter().map(|(k, t)| format!("{k} {:?}", t.shape())).collect();
    println!("wrote {} to {}", shapes.join(", "), args.output.display());
    Ok(())
}

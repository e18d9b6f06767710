//! `systolic train`, `evaluate` and `predict`: a model trained, evaluated and run through
//! the runtime's TPUEstimator on a simulated machine (`--machine`) or the f32 CPU reference
//! (`--cpu`, TensorFlow's `use_tpu=False`), with checkpoints and metrics in `--model-dir`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use std::sync::Arc;
use systolic::compiler::optimizer::Optimizer;
use systolic::compiler::{Graph, TensorMap};

use systolic::runtime::augment::{self, Augment, Image};
use systolic::runtime::data::{self, ImageFolder, Shapes, Source, Subset};
use systolic::runtime::input;
use systolic::runtime::{
    CrossShardOptimizer, InputContext, IterationsPerLoop, Loss, Mode, Params, RunConfig, TpuEstimator,
    TpuEstimatorArgs, TpuEstimatorSpec, WarmStart,
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
    /// `digits` (the built-in 8x8 digits: 1,500 to train, 297 to test), `shapes` (generated
    /// RGB circles, squares and triangles at the model's input size: 2,000 to train, 400 to
    /// test), a folder of class sub-folders of PNG/JPEG images (resized to the model's input),
    /// or a safetensors file of examples (the model's inputs and integer `labels`, examples
    /// first).
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
    /// Rescale images from [0, 1] to [-1, 1] in every mode (preprocessing: training,
    /// evaluation and prediction must see the same; give it to each command).
    #[arg(long)]
    rescale: bool,
    /// With a zoo model: this many classes in its head (transfer learning's new head).
    #[arg(long)]
    classes: Option<usize>,
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
    /// Augment the training images at run time, freshly for every example in every step:
    /// flip, flip_ud, crop, zoom, brightness, contrast, saturation, hue, rotate, rescale
    /// (comma-separated, each optionally `=VALUE`, e.g. `flip,crop,brightness=0.2`).
    #[arg(long, value_name = "OPS")]
    augment: Option<String>,
    /// Start from another run's newest checkpoint (its parameters, not its optimizer state),
    /// when --model-dir has no checkpoint yet: transfer learning.
    #[arg(long, value_name = "DIR")]
    warm_start: Option<PathBuf>,
    /// With --warm-start: the parameters to load (a regular expression over names, matched
    /// whole, e.g. 'conv.*'); default: every parameter (each must exist with its shape).
    #[arg(long, value_name = "REGEX", requires = "warm_start")]
    warm_start_vars: Option<String>,
    /// With --warm-start: parameters to freeze (a regular expression over names, matched
    /// whole): no gradient, no update, e.g. 'conv.*'.
    #[arg(long, value_name = "REGEX", requires = "warm_start")]
    freeze: Option<String>,
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
    /// Test-time augmentation: each prediction the mean over N augmented views (with --augment).
    #[arg(long, value_name = "N", requires = "augment")]
    tta: Option<usize>,
    /// The augmentation of test-time augmentation's views (as train's --augment).
    #[arg(long, value_name = "OPS", requires = "tta")]
    augment: Option<String>,
}

#[derive(clap::Args)]
pub struct AugmentArgs {
    /// The model whose input size the images take (shapes and folders are made at it).
    #[arg(long, default_value = "digits_cnn")]
    model: String,
    /// As train's --dataset (its training split).
    #[arg(long, default_value = "digits")]
    dataset: String,
    /// The augmentation, as train's --augment.
    #[arg(long, value_name = "OPS")]
    augment: String,
    /// Examples shown, one row each: the original, then --views augmented views.
    #[arg(long, default_value_t = 6)]
    count: usize,
    #[arg(long, default_value_t = 5)]
    views: usize,
    /// Seeds the augmentation's draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the grid (PNG).
    #[arg(long)]
    out: PathBuf,
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
        warm_start_from: Option<WarmStart>,
    ) -> Result<(TpuEstimator, Graph)> {
        let model = self.model()?;
        let (machine, precision) = if self.cpu {
            (None, systolic::simulator::numerics::Precision::Highest)
        } else {
            let target =
                super::Target { machine: self.machine.clone(), precision: self.precision.clone(), sets: Vec::new() };
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
            warm_start_from,
            ..TpuEstimatorArgs::default()
        };
        let mut est = TpuEstimator::new(model_fn(model.clone(), optimizer, label_smoothing), args)?;
        est.set_log(|line| println!("{line}"));
        Ok((est, model))
    }

    /// The examples of `--dataset` for training (`train`) or testing.
    fn examples(&self, model: &Graph, train: bool) -> Result<Arc<dyn Source>> {
        dataset(&self.dataset, model, train)
    }

    /// The model, with `--classes` applied to a zoo model's head.
    fn model(&self) -> Result<Graph> {
        let Some(classes) = self.classes else { return super::load_model(&self.model) };
        anyhow::ensure!(classes >= 1, "--classes {classes}: give at least one class");
        anyhow::ensure!(
            systolic::compiler::zoo::names().contains(&self.model.as_str()),
            "--classes applies to zoo models; for {} change the head in the file",
            self.model
        );
        let opts = systolic::compiler::zoo::ZooOptions { classes: Some(classes), ..Default::default() };
        Ok(systolic::compiler::zoo::build_with(&self.model, opts)?)
    }

    /// The preprocessing every mode applies (`--rescale`).
    fn preprocessing(&self) -> Option<Augment> {
        self.rescale.then(|| Augment::new(vec![augment::Op::Rescale]).expect("rescale alone is valid"))
    }
}

/// The model's image input: its first input (what augmentation and preprocessing change).
pub fn image_input(model: &Graph) -> Result<String> {
    let id = *model.inputs().first().with_context(|| format!("model '{}' has no inputs", model.name()))?;
    Ok(model.node(id).name.clone())
}

/// The examples of `--dataset` for training (`train`) or testing, at `model`'s input size.
pub fn dataset(spec: &str, model: &Graph, train: bool) -> Result<Arc<dyn Source>> {
    if spec == "digits" {
        let (tr, te) = data::digits_split()?;
        return Ok(Arc::new(if train { tr } else { te }));
    }
    // The first input's [H, W, C]: the size generated and decoded images take.
    let input = model.inputs().first().map(|&i| model.node(i).shape.dims.clone()).unwrap_or_default();
    let hwc = |what: &str| -> Result<(usize, usize)> {
        match input.as_slice() {
            [h, w, 3] => Ok((*h, *w)),
            other => anyhow::bail!(
                "--dataset {what}: makes RGB images, but model '{}' takes {other:?}: use a model with an [H, W, 3] input",
                model.name()
            ),
        }
    };
    if spec == "shapes" {
        let (h, w) = hwc("shapes")?;
        anyhow::ensure!(h == w, "--dataset shapes: makes square images, but model '{}' takes {h}x{w}", model.name());
        let all: Arc<dyn Source> = Arc::new(Shapes::new(SHAPES_TRAIN + SHAPES_TEST, h, SHAPES_SEED)?);
        let range = if train { 0..SHAPES_TRAIN } else { SHAPES_TRAIN..SHAPES_TRAIN + SHAPES_TEST };
        return Ok(Arc::new(Subset::new(all, range)?));
    }
    let path = Path::new(spec);
    let classes = model_classes(model);
    if path.is_dir() {
        let (h, w) = hwc(spec)?;
        let folder = ImageFolder::open(path, h, w)?;
        if let Some(c) = classes {
            anyhow::ensure!(
                folder.classes().len() <= c,
                "{spec}: has {} class folders but model '{}' predicts {c} classes: give a model with a head of {}",
                folder.classes().len(),
                model.name(),
                folder.classes().len()
            );
        }
        return Ok(Arc::new(folder));
    }
    anyhow::ensure!(
        path.extension().is_some_and(|e| e == "safetensors"),
        "--dataset {spec}: give digits, shapes, a folder of class folders of images or a .safetensors file of examples"
    );
    let examples = data::load(path)?;
    for id in model.inputs() {
        let name = &model.node(id).name;
        anyhow::ensure!(
            examples.tensor(name).is_some(),
            "{spec}: has no tensor '{name}', the input of model '{}' (it holds {:?})",
            model.name(),
            examples.shapes().keys().collect::<Vec<_>>()
        );
    }
    let labels =
        examples.tensor("labels").with_context(|| format!("{spec}: has no tensor 'labels' (integer class ids)"))?;
    if let Some(c) = classes {
        systolic::compiler::reference::loss::check_labels("labels", &labels.iter().copied().collect::<Vec<_>>(), c)
            .with_context(|| format!("{spec}: model '{}' predicts {c} classes", model.name()))?;
    }
    Ok(Arc::new(examples))
}

/// The classes a model predicts: its first output's last axis.
fn model_classes(model: &Graph) -> Option<usize> {
    let out = model.outputs().first()?;
    model.node(*out).shape.dims.last().copied()
}

/// The `shapes` data set the commands use: its seed and split.
const SHAPES_SEED: u64 = 11;
const SHAPES_TRAIN: usize = 2000;
const SHAPES_TEST: usize = 400;

/// An input function over `source`: tensor `image`'s training batches augmented by
/// `augment`, every mode's preprocessed by `preprocess`.
fn input_fn(
    source: Arc<dyn Source>,
    image: String,
    augment: Option<Augment>,
    preprocess: Option<Augment>,
) -> impl Fn(&InputContext) -> systolic::runtime::Result<Box<dyn systolic::runtime::Input>> {
    move |ctx| {
        let mut d = input::source_dataset(source.clone(), ctx)?;
        if let Some(a) = &augment
            && ctx.mode == Mode::Train
        {
            d = d.map(data::augmentation(&image, a.clone(), ctx.seed, ctx.input_index));
        }
        if let Some(p) = &preprocess {
            d = d.map(data::augmentation(&image, p.clone(), ctx.seed, ctx.input_index));
        }
        Ok(Box::new(input::batched(d, ctx)?))
    }
}

/// Parses `--augment` and checks it against the model's image channels.
pub fn parse_augment(spec: Option<&str>, model: &Graph) -> Result<Option<Augment>> {
    let Some(spec) = spec else { return Ok(None) };
    let a = Augment::parse(spec).with_context(|| format!("--augment {spec}"))?;
    anyhow::ensure!(
        !a.ops().contains(&augment::Op::Rescale),
        "--augment {spec}: rescale is preprocessing, which evaluation and prediction must apply too: give --rescale to every command instead"
    );
    let channels = model.inputs().first().and_then(|&i| model.node(i).shape.dims.last().copied()).unwrap_or(0);
    a.check(channels).with_context(|| format!("--augment {spec} on model '{}'", model.name()))?;
    Ok(Some(a))
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
    let warm = args.warm_start.as_ref().map(|from| WarmStart {
        from: from.clone(),
        vars_to_warm_start: args.warm_start_vars.clone(),
        var_name_to_prev_var_name: Vec::new(),
        freeze: args.freeze.clone(),
    });
    let (mut est, model) = c.estimator(config, optimizer, args.label_smoothing, warm)?;
    let augment = parse_augment(args.augment.as_deref(), &model)?;
    let examples = c.examples(&model, true)?;
    let began = Instant::now();
    let input = input_fn(examples, image_input(&model)?, augment, c.preprocessing());
    let report = est.train(&input, None, Some(args.steps))?;
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
    let (mut est, model) = c.estimator(c.config()?, Optimizer::default(), 0.0, None)?;
    let examples = c.examples(&model, false)?;
    let steps = args.steps.unwrap_or(examples.len().div_ceil(c.batch) as u64);
    // The estimator prints the metrics (and writes them to the model folder's metrics file).
    est.evaluate(&input_fn(examples, image_input(&model)?, None, c.preprocessing()), Some(steps))?;
    Ok(())
}

pub fn predict(args: PredictArgs) -> Result<()> {
    super::check_outputs([("--output", Some(args.output.as_path()))])?;
    let c = &args.common;
    let (mut est, model) = c.estimator(c.config()?, Optimizer::default(), 0.0, None)?;
    let examples = c.examples(&model, false)?;
    let input = input_fn(examples, image_input(&model)?, None, c.preprocessing());
    let p: TensorMap = match (args.tta, parse_augment(args.augment.as_deref(), &model)?) {
        (Some(views), Some(a)) => {
            anyhow::ensure!(views >= 1, "--tta {views}: give at least 1 view");
            est.predict_with_tta(&input, &a, views)?
        }
        _ => est.predict(&input)?,
    };
    super::save_tensors(&args.output, &p)?;
    let shapes: Vec<String> = p.iter().map(|(k, t)| format!("{k} {:?}", t.shape())).collect();
    println!("wrote {} to {}", shapes.join(", "), args.output.display());
    Ok(())
}

/// `systolic augment`: a grid of examples, each row the original and augmented views.
pub fn augment(args: AugmentArgs) -> Result<()> {
    super::check_outputs([("--out", Some(args.out.as_path()))])?;
    anyhow::ensure!(args.count >= 1, "--count {}: show at least one example", args.count);
    let model = super::load_model(&args.model)?;
    let augment = parse_augment(Some(&args.augment), &model)?.expect("given");
    let source = dataset(&args.dataset, &model, true)?;
    let n = args.count.min(source.len());
    let batch = source.gather(&(0..n).collect::<Vec<_>>())?;
    let name = image_input(&model)?;
    let images = batch.get(&name).with_context(|| format!("the data set has no '{name}' tensor to augment"))?;
    let example: Vec<usize> = images.shape()[1..].to_vec();
    let values = images.as_standard_layout();
    let size: usize = example.iter().product();
    let mut cells = Vec::new();
    for (i, data) in values.as_slice().expect("standard layout").chunks(size).enumerate() {
        let original = Image::from_example(&example, data)?;
        cells.push(original.clone());
        for view in 0..args.views {
            let key =
                systolic::compiler::rng::derive(systolic::compiler::rng::derive(args.seed, view as u64), i as u64);
            cells.push(augment.apply(&original, key)?);
        }
    }
    let grid = augment::grid(&cells, 1 + args.views, 2);
    augment::write_png(&args.out, &grid)?;
    println!(
        "wrote {} ({}x{}): {n} examples of {}, each the original then {} views of {augment}",
        args.out.display(),
        grid.width,
        grid.height,
        args.dataset,
        args.views
    );
    Ok(())
}

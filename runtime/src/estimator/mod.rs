//! TensorFlow's `Estimator` and `TPUEstimator`: a model function, a run configuration and
//! params, and `train`, `evaluate` and `predict` over input functions.
//!
//! Both share one engine ([`Runner`]): the CPU [`Estimator`] runs the f32 reference; the
//! [`TpuEstimator`] runs a simulated core or slice (or, with `use_tpu: false`, the CPU
//! reference — the way TPU users debug a model first). Training runs loops of
//! `min(remaining, iterations_per_loop)` steps; logs, metrics, host calls' flushing and
//! checkpoints happen at loop boundaries, as on a TPU whose host only sees the device
//! between loops.

mod run;

use std::path::PathBuf;

use systolic_compiler::Graph;
use systolic_compiler::TensorMap;
use systolic_simulator::Machine;
use systolic_simulator::config::presets;
use systolic_simulator::numerics::Precision;

pub use run::{EvalReport, HookAction, LoopReport, TrainReport, TrainingHook};

use crate::augment::Augment;
use crate::backend::Target;
use crate::config::{InputPipeline, RunConfig};
use crate::error::{Error, Result};
use crate::input::InputFn;
use crate::spec::{self, EstimatorSpec, HostCall, Mode, Params, TpuEstimatorSpec};

/// Where a warm start takes its variables (TensorFlow's `WarmStartSettings`).
#[derive(Clone, Debug, Default)]
pub struct WarmStart {
    /// Another run's model folder (its newest checkpoint) or a checkpoint file.
    pub from: PathBuf,
    /// Which of this model's variables to load (a regular expression over names, matched
    /// whole; TensorFlow's `vars_to_warm_start`); `None`: every parameter.
    pub vars_to_warm_start: Option<String>,
    /// This model's name -> the name in the checkpoint, where they differ.
    pub var_name_to_prev_var_name: Vec<(String, String)>,
    /// Parameters to freeze after loading (a regular expression over names): no gradient,
    /// no update.
    pub freeze: Option<String>,
}

/// The model function of either estimator, as the engine calls it.
type ModelFn = Box<dyn Fn(Mode, &Params) -> Result<(EstimatorSpec, Option<HostCall>)>>;

/// Where each mode runs and with how many replicas.
#[derive(Clone, Debug)]
struct Placement {
    /// Training's target (the simulated machine, or the CPU).
    train: Target,
    /// Evaluation's (the CPU when `eval_on_tpu` is false).
    eval: Target,
    replicas: usize,
    hosts: usize,
    /// Global batch sizes by mode; `None`: the input function's own (the CPU estimator).
    train_batch: Option<usize>,
    eval_batch: Option<usize>,
    predict_batch: Option<usize>,
    tpu: bool,
}

/// The shared engine of [`Estimator`] and [`TpuEstimator`].
struct Runner {
    model_fn: ModelFn,
    config: RunConfig,
    params: Params,
    placement: Placement,
    precision: Precision,
    warm_start: Option<WarmStart>,
    /// The state after the last `train` when there is no model folder to read it from.
    memory: Option<(u64, TensorMap, Vec<u64>)>,
    /// Where log lines go (stderr by default).
    log: Box<dyn FnMut(&str)>,
}

/// TensorFlow's `Estimator`, on the f32 CPU reference: `params` are passed to the model and
/// input functions as given (set `batch_size` there for [`crate::Examples`] inputs).
pub struct Estimator {
    runner: Runner,
}

impl Estimator {
    pub fn new(
        model_fn: impl Fn(Mode, &Params) -> Result<EstimatorSpec> + 'static,
        config: RunConfig,
        params: Params,
    ) -> Result<Estimator> {
        config.validate()?;
        let placement = Placement {
            train: Target::Cpu,
            eval: Target::Cpu,
            replicas: 1,
            hosts: 1,
            train_batch: None,
            eval_batch: None,
            predict_batch: None,
            tpu: false,
        };
        let model_fn: ModelFn = Box::new(move |mode, params| Ok((model_fn(mode, params)?, None)));
        Ok(Estimator { runner: Runner::new(model_fn, config, params, placement, Precision::Highest, None) })
    }

    /// Trains `steps` more steps, or up to global step `max_steps`; with neither, until the
    /// input ends (both: an error, as in TensorFlow).
    pub fn train(&mut self, input_fn: &InputFn, steps: Option<u64>, max_steps: Option<u64>) -> Result<TrainReport> {
        self.runner.train(input_fn, &mut [], steps, max_steps)
    }

    /// [`Estimator::train`] with `hooks` called at its start, after every loop and at its end.
    pub fn train_with_hooks(
        &mut self,
        input_fn: &InputFn,
        hooks: &mut [&mut dyn TrainingHook],
        steps: Option<u64>,
        max_steps: Option<u64>,
    ) -> Result<TrainReport> {
        self.runner.train(input_fn, hooks, steps, max_steps)
    }

    /// Evaluates the newest checkpoint (or the state `train` left) on `steps` batches, or
    /// until the input ends.
    pub fn evaluate(&mut self, input_fn: &InputFn, steps: Option<u64>) -> Result<EvalReport> {
        self.runner.evaluate(input_fn, steps)
    }

    /// The predictions for every example of the input, in order.
    pub fn predict(&mut self, input_fn: &InputFn) -> Result<TensorMap> {
        self.runner.predict(input_fn, None)
    }

    /// Test-time augmentation: each prediction the mean over `views` augmented views of its
    /// example.
    pub fn predict_with_tta(&mut self, input_fn: &InputFn, augment: &Augment, views: usize) -> Result<TensorMap> {
        self.runner.predict(input_fn, Some((augment, views)))
    }

    /// Sends log lines to `log` instead of stderr.
    pub fn set_log(&mut self, log: impl FnMut(&str) + 'static) {
        self.runner.log = Box::new(log);
    }

    pub fn config(&self) -> &RunConfig {
        &self.runner.config
    }
}

/// TensorFlow's `TPUEstimator` arguments beyond the model function.
#[derive(Clone, Debug)]
pub struct TpuEstimatorArgs {
    pub config: RunConfig,
    /// The user's params (`batch_size` and `context` are reserved: the estimator sets them).
    pub params: Params,
    /// False runs every mode on the f32 CPU reference, with the whole batch as one.
    pub use_tpu: bool,
    /// The simulated machine (default `v2-8`); its cores are the replicas unless
    /// `tpu_config.num_shards` says 1.
    pub machine: Option<Machine>,
    /// Global batch sizes; each must divide by the replicas when it runs on the TPU.
    pub train_batch_size: Option<usize>,
    pub eval_batch_size: Option<usize>,
    pub predict_batch_size: Option<usize>,
    /// False evaluates on the CPU reference from the TPU-trained checkpoint.
    pub eval_on_tpu: bool,
    pub warm_start_from: Option<WarmStart>,
    /// The MXU precision on the TPU (default: one bf16 pass, as TPUs train).
    pub precision: Precision,
}

impl Default for TpuEstimatorArgs {
    fn default() -> TpuEstimatorArgs {
        TpuEstimatorArgs {
            config: RunConfig::default(),
            params: Params::new(),
            use_tpu: true,
            machine: None,
            train_batch_size: None,
            eval_batch_size: None,
            predict_batch_size: None,
            eval_on_tpu: true,
            warm_start_from: None,
            precision: Precision::Default,
        }
    }
}

/// TensorFlow's `TPUEstimator`.
pub struct TpuEstimator {
    runner: Runner,
}

impl TpuEstimator {
    /// Checks what TensorFlow checks when the estimator is built: the run configuration,
    /// reserved params keys, the shard count against the machine, each batch size against the
    /// replicas.
    pub fn new(
        model_fn: impl Fn(Mode, &Params) -> Result<TpuEstimatorSpec> + 'static,
        args: TpuEstimatorArgs,
    ) -> Result<TpuEstimator> {
        args.config.validate()?;
        args.params.check_reserved()?;
        let machine = match args.machine {
            Some(m) => m,
            None => presets::preset("v2-8")?,
        };
        let cores = machine.cores();
        let replicas = match args.config.tpu_config.num_shards {
            None => cores,
            Some(n) if n == cores || n == 1 => n,
            Some(n) => {
                return Err(Error::Config {
                    field: "tpu_config.num_shards".into(),
                    reason: format!(
                        "{n} does not match {} ({cores} cores): give {cores}, 1 or leave it unset",
                        machine.name
                    ),
                });
            }
        };
        let (train, eval, replicas, hosts) = if !args.use_tpu {
            (Target::Cpu, Target::Cpu, 1, 1)
        } else {
            let target = if replicas == 1 { Target::Core(machine.clone()) } else { Target::Slice(machine.clone()) };
            let eval = if args.eval_on_tpu { target.clone() } else { Target::Cpu };
            let hosts = if replicas == 1 { 1 } else { machine.hosts().max(1) };
            (target, eval, replicas, hosts)
        };
        for (field, size) in [
            ("train_batch_size", args.train_batch_size),
            ("eval_batch_size", args.eval_batch_size),
            ("predict_batch_size", args.predict_batch_size),
        ] {
            match size {
                Some(0) => {
                    return Err(Error::Config { field: field.into(), reason: "must be at least 1".into() });
                }
                Some(n) if args.use_tpu && !n.is_multiple_of(replicas) => {
                    let mode = field.trim_end_matches("_batch_size");
                    return Err(Error::Config {
                        field: field.into(),
                        reason: format!(
                            "{mode} batch size {n} must be divisible by number of replicas {replicas}: give a multiple of {replicas}"
                        ),
                    });
                }
                _ => {}
            }
        }
        let placement = Placement {
            train,
            eval,
            replicas,
            hosts,
            train_batch: args.train_batch_size,
            eval_batch: args.eval_batch_size,
            predict_batch: args.predict_batch_size,
            tpu: args.use_tpu,
        };
        let precision = if args.use_tpu { args.precision } else { Precision::Highest };
        let model_fn: ModelFn = Box::new(move |mode, params| Ok(model_fn(mode, params)?.as_estimator_spec()));
        Ok(TpuEstimator {
            runner: Runner::new(model_fn, args.config, args.params, placement, precision, args.warm_start_from),
        })
    }

    /// Trains `steps` more steps or up to global step `max_steps` (one of them, as TensorFlow
    /// requires on a TPU), in loops of `iterations_per_loop`.
    pub fn train(&mut self, input_fn: &InputFn, steps: Option<u64>, max_steps: Option<u64>) -> Result<TrainReport> {
        self.train_with_hooks(input_fn, &mut [], steps, max_steps)
    }

    /// [`TpuEstimator::train`] with `hooks` called at its start, after every loop (the host
    /// sees the device only between loops) and at its end.
    pub fn train_with_hooks(
        &mut self,
        input_fn: &InputFn,
        hooks: &mut [&mut dyn TrainingHook],
        steps: Option<u64>,
        max_steps: Option<u64>,
    ) -> Result<TrainReport> {
        if self.runner.placement.tpu && steps.is_none() && max_steps.is_none() {
            return Err(Error::Config {
                field: "train".into(),
                reason: "for TPU training, one of steps or max_steps must be set".into(),
            });
        }
        self.needs_batch("train_batch_size", self.runner.placement.train_batch)?;
        self.runner.train(input_fn, hooks, steps, max_steps)
    }

    /// Evaluates on `steps` batches (required on a TPU, as in TensorFlow).
    pub fn evaluate(&mut self, input_fn: &InputFn, steps: Option<u64>) -> Result<EvalReport> {
        let on_tpu = !matches!(self.runner.placement.eval, Target::Cpu);
        self.needs_batch("eval_batch_size", self.runner.placement.eval_batch)?;
        if on_tpu && steps.is_none() {
            return Err(Error::Config {
                field: "evaluate".into(),
                reason: "steps must be set when evaluating on a TPU (or set eval_on_tpu: false)".into(),
            });
        }
        self.runner.evaluate(input_fn, steps)
    }

    /// The predictions for every example of the input (which must end): the last partial
    /// batch padded to `predict_batch_size` and the padding dropped.
    pub fn predict(&mut self, input_fn: &InputFn) -> Result<TensorMap> {
        self.needs_batch("predict_batch_size", self.runner.placement.predict_batch)?;
        self.runner.predict(input_fn, None)
    }

    /// Test-time augmentation: each prediction the mean over `views` augmented views of its
    /// example (its image inputs augmented afresh for every view).
    pub fn predict_with_tta(&mut self, input_fn: &InputFn, augment: &Augment, views: usize) -> Result<TensorMap> {
        self.needs_batch("predict_batch_size", self.runner.placement.predict_batch)?;
        self.runner.predict(input_fn, Some((augment, views)))
    }

    pub fn set_log(&mut self, log: impl FnMut(&str) + 'static) {
        self.runner.log = Box::new(log);
    }

    pub fn config(&self) -> &RunConfig {
        &self.runner.config
    }

    /// TensorFlow's rule: a TPU estimator is told each mode's global batch size.
    fn needs_batch(&self, field: &str, size: Option<usize>) -> Result<()> {
        match size {
            Some(_) => Ok(()),
            None => Err(Error::Config {
                field: field.into(),
                reason: "cannot be None: give the global batch size (the input function gets it per replica)".into(),
            }),
        }
    }

    /// Replicas the model trains on (1 on the CPU).
    pub fn replicas(&self) -> usize {
        self.runner.placement.replicas
    }
}

impl Runner {
    fn new(
        model_fn: ModelFn,
        config: RunConfig,
        params: Params,
        placement: Placement,
        precision: Precision,
        warm_start: Option<WarmStart>,
    ) -> Runner {
        Runner {
            model_fn,
            config,
            params,
            placement,
            precision,
            warm_start,
            memory: None,
            log: Box::new(|line| eprintln!("{line}")),
        }
    }

    /// The model function's spec for `mode`, checked, and the host call.
    fn spec(&self, mode: Mode, params: &Params) -> Result<(EstimatorSpec, Option<HostCall>)> {
        let (spec, host_call) = (self.model_fn)(mode, params)?;
        spec::check(&spec, mode)?;
        Ok((spec, host_call))
    }

    /// The global batch of `mode`, and the batch each input pipeline yields, the pipelines
    /// and how many batches each gives per step, as `per_host_input_for_training` says
    /// (training only: evaluation and prediction read one input of the global batch).
    fn pipelines(&self, mode: Mode) -> Option<Pipelines> {
        let p = &self.placement;
        let global = match mode {
            Mode::Train => p.train_batch,
            Mode::Eval => p.eval_batch,
            Mode::Predict => p.predict_batch,
        }?;
        let (r, h) = (p.replicas, p.hosts);
        let per_replica = global / r;
        Some(match self.config.tpu_config.per_host_input_for_training {
            _ if r == 1 => Pipelines { global, batch: global, inputs: 1, per_step: 1 },
            InputPipeline::PerShard => Pipelines { global, batch: per_replica, inputs: r, per_step: 1 },
            // TPUConfig's docstring: batch_size is train_batch_size // #hosts in PER_HOST_V1,
            // // #cores in PER_HOST_V2 (whose input yields each of its host's replicas a batch).
            InputPipeline::PerHostV1 => Pipelines { global, batch: global / h, inputs: h, per_step: 1 },
            InputPipeline::PerHostV2 => Pipelines { global, batch: per_replica, inputs: h, per_step: r / h },
            InputPipeline::Broadcast => Pipelines { global, batch: global, inputs: 1, per_step: 1 },
        })
    }

    fn log(&mut self, line: &str) {
        (self.log)(line);
    }

    /// The graph with the warm start's frozen parameters made non-trainable.
    fn frozen(&self, model: &Graph) -> Result<Graph> {
        let Some(pattern) = self.warm_start.as_ref().and_then(|w| w.freeze.as_deref()) else {
            return Ok(model.clone());
        };
        let re = whole_match(pattern, "warm_start_from.freeze")?;
        let mut g = model.clone();
        let names: Vec<String> = g.trainable_parameters().iter().map(|&p| g.node(p).name.clone()).collect();
        let frozen: Vec<&String> = names.iter().filter(|n| re.is_match(n)).collect();
        if frozen.is_empty() {
            return Err(Error::Config {
                field: "warm_start_from.freeze".into(),
                reason: format!("'{pattern}' matches no trainable parameter of '{}'", g.name()),
            });
        }
        for name in frozen {
            g.set_trainable(name, false)?;
        }
        Ok(g)
    }
}

/// How a mode's batches are read.
#[derive(Clone, Copy, Debug)]
struct Pipelines {
    /// Examples per step over every replica.
    global: usize,
    /// Examples per batch of one pipeline.
    batch: usize,
    inputs: usize,
    /// Batches each pipeline yields per step.
    per_step: usize,
}

/// A regular expression that must match a whole name.
fn whole_match(pattern: &str, field: &str) -> Result<regex::Regex> {
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| Error::Config {
        field: field.into(),
        reason: format!("'{pattern}' is not a regular expression: {e}"),
    })
}

//! The estimators' three verbs: training in loops with checkpoints, evaluation and
//! prediction, and where each starts from (a checkpoint, the last run in memory, a warm
//! start, or freshly initialised parameters).

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::json;
use systolic_compiler::optimizer::Optimizer;
use systolic_compiler::rng::derive;
use systolic_compiler::{Graph, Tensor, TensorMap};
use systolic_simulator::isa::Reduction;

use super::{Runner, whole_match};
use crate::augment::Augment;
use crate::backend::{Backend, Settings, Target, backend};
use crate::checkpoint::{self, Checkpoint};
use crate::config::{CheckpointEvery, IterationsPerLoop};
use crate::error::{Error, Result};
use crate::input::{Input, InputContext, InputFn};
use crate::metrics::{self, Means, MetricsFile};
use crate::session::{self, LOSS};
use crate::spec::{EstimatorSpec, Mode, Params};

/// One loop of training steps between two visits of the host.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopReport {
    /// The global step after the loop.
    pub global_step: u64,
    pub steps: u64,
    /// Each step's loss.
    pub losses: Vec<f32>,
    /// Examples per step (every replica's).
    pub batch: usize,
    pub wall_seconds: f64,
    /// The loop's time on the simulated machine (`None` on the CPU).
    pub simulated_seconds: Option<f64>,
}

impl LoopReport {
    pub fn mean_loss(&self) -> f32 {
        self.losses.iter().sum::<f32>() / self.losses.len().max(1) as f32
    }

    pub fn steps_per_second(&self) -> f64 {
        self.steps as f64 / self.wall_seconds.max(1e-9)
    }

    /// Examples per second of this host's wall time.
    pub fn examples_per_second(&self) -> f64 {
        self.steps_per_second() * self.batch as f64
    }

    /// Examples per second of the simulated machine.
    pub fn simulated_examples_per_second(&self) -> Option<f64> {
        self.simulated_seconds.map(|s| (self.steps as usize * self.batch) as f64 / s)
    }
}

/// What `train` did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainReport {
    /// The global step training started from (a checkpoint's, or 0).
    pub start_step: u64,
    pub global_step: u64,
    pub loops: Vec<LoopReport>,
    /// The checkpoint training resumed from, if any.
    pub resumed_from: Option<String>,
    /// What runs the steps (`v2-8 (8 replicas)`, `the f32 CPU reference`).
    pub backend: String,
}

impl TrainReport {
    /// Every step's loss, in order.
    pub fn losses(&self) -> Vec<f32> {
        self.loops.iter().flat_map(|l| l.losses.iter().copied()).collect()
    }

    /// Examples per second on the simulated machine over every loop.
    pub fn simulated_examples_per_second(&self) -> Option<f64> {
        let secs: Option<f64> = self.loops.iter().map(|l| l.simulated_seconds).sum();
        let examples: usize = self.loops.iter().map(|l| l.steps as usize * l.batch).sum();
        secs.map(|s| examples as f64 / s)
    }
}

/// What `evaluate` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    pub global_step: u64,
    /// `loss`, `accuracy`, `top_5_accuracy` (more than five classes) and the spec's metrics.
    pub metrics: BTreeMap<String, f64>,
    pub examples: usize,
    pub steps: u64,
}

/// TensorFlow's `SessionRunHook` at the granularity a TPU's host sees: when training
/// begins, after every loop of steps (which may end training there, as `StopAtStepHook` or
/// an early-stopping hook would), and at the end.
pub trait TrainingHook {
    /// Training begins at `global_step`.
    fn begin(&mut self, _global_step: u64) -> Result<()> {
        Ok(())
    }

    /// A loop ended; `Stop` ends training here (with a checkpoint, as at the end).
    fn after_loop(&mut self, _l: &LoopReport) -> Result<HookAction> {
        Ok(HookAction::Continue)
    }

    /// Training ended.
    fn end(&mut self, _report: &TrainReport) -> Result<()> {
        Ok(())
    }
}

/// What a hook asks for after a loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookAction {
    Continue,
    Stop,
}

/// Mixed into the run's seed for test-time augmentation's views.
const TTA_SEED: u64 = 0x7e57_71e3;

/// Where a run starts.
struct Start {
    step: u64,
    state: TensorMap,
    positions: Option<Vec<u64>>,
    checkpoint: Option<String>,
}

impl Runner {
    pub(super) fn train(
        &mut self,
        input_fn: &InputFn,
        hooks: &mut [&mut dyn TrainingHook],
        steps: Option<u64>,
        max_steps: Option<u64>,
    ) -> Result<TrainReport> {
        let fail = |reason: &str| Err(Error::Config { field: "train".into(), reason: reason.into() });
        match (steps, max_steps) {
            (Some(_), Some(_)) => return fail("can not provide both steps and max_steps: give one"),
            (Some(0), _) => return fail("steps must be positive"),
            (_, Some(0)) => return fail("max_steps must be positive"),
            _ => {}
        }
        let pipes = self.pipelines(Mode::Train);
        let model_params = self.model_params(pipes.map(|p| p.global / self.placement.replicas));
        let (spec, host_call) = self.spec(Mode::Train, &model_params)?;
        let train_op = spec.train_op.clone().expect("checked: training has a train op");
        if self.placement.replicas > 1 && train_op.cross_shard.is_none() {
            return Err(Error::Config {
                field: "train_op".into(),
                reason: format!(
                    "CrossShardOptimizer must be used for model training on TPUs ({} replicas): wrap the optimizer, \
                     CrossShardOptimizer::new(optimizer)",
                    self.placement.replicas
                ),
            });
        }
        let settings = Settings {
            optimizer: train_op.optimizer,
            label_smoothing: spec.loss.map_or(0.0, |l| l.label_smoothing),
            precision: self.precision,
            reduction: train_op.cross_shard.unwrap_or(Reduction::Mean),
        };
        let model = self.frozen(&spec.model)?;
        let start = self.start(&model)?;
        let target = match (steps, max_steps) {
            (_, Some(m)) => m,
            (Some(s), None) => start.step + s,
            (None, None) => u64::MAX,
        };
        let mut report = TrainReport { start_step: start.step, global_step: start.step, ..Default::default() };
        if start.step >= target {
            self.log(&format!("skipping training: global step {} is already at max_steps {target}", start.step));
            return Ok(report);
        }
        let (seed, inputs_params) = (self.seed(), self.model_params(pipes.map(|p| p.batch)));
        let (count, per_step) = pipes.map_or((1, 1), |p| (p.inputs, p.per_step));
        let mut inputs = open(input_fn, Mode::Train, &inputs_params, count, seed)?;
        if let Some(positions) = &start.positions {
            if positions.len() != inputs.len() {
                return Err(Error::Input(format!(
                    "the checkpoint holds {} input positions but this run reads {} inputs: per_host_input_for_training or the machine changed",
                    positions.len(),
                    inputs.len()
                )));
            }
            for (input, &p) in inputs.iter_mut().zip(positions) {
                input.seek(p)?;
            }
        }
        let Some(first) = next_batch(&mut inputs, per_step, pipes.map(|p| p.batch))? else {
            // As TensorFlow: an input already read to its end ends training at once.
            self.log(&format!("the training input has no more batches: training stays at global step {}", start.step));
            return Ok(report);
        };
        let global = rows(&first);
        let mut backend = backend(self.placement.train.clone(), &model, start.state.clone(), global, settings)?;
        report.backend = backend.describe();
        if let Some(file) = &start.checkpoint {
            checkpoint::check_state(file, &start.state, &backend.state_shapes()?)?;
            report.resumed_from = Some(file.clone());
            self.log(&format!("resuming from {file} at global step {}", start.step));
        }
        for h in hooks.iter_mut() {
            h.begin(start.step)?;
        }
        let metrics_file = self.config.model_dir.as_deref().map(MetricsFile::new);
        let every = self.config.checkpoint_every()?;
        let (mut step, mut saved_step, mut saved_at) = (start.step, start.step, Instant::now());
        let mut pending = Some(first);
        // Seconds per step for a duration-valued iterations_per_loop: the simulated machine's
        // on a TPU (the device's time is what the loop spends), the host's on the CPU.
        let mut seconds_per_step: Option<f64> = None;
        let bar = progress(target.saturating_sub(step), target != u64::MAX);
        'train: while step < target {
            let n = match self.config.tpu_config.iterations_per_loop {
                IterationsPerLoop::Steps(k) => k,
                IterationsPerLoop::Seconds(s) => seconds_per_step.map_or(1, |w| ((s / w).floor() as u64).max(1)),
            }
            .min(target - step);
            let began = Instant::now();
            let mut l = LoopReport {
                global_step: step,
                steps: 0,
                losses: Vec::new(),
                batch: global,
                wall_seconds: 0.0,
                simulated_seconds: None,
            };
            let mut ended = false;
            for _ in 0..n {
                let batch = match pending.take() {
                    Some(b) => b,
                    None => match next_batch(&mut inputs, per_step, pipes.map(|p| p.batch))? {
                        Some(b) => b,
                        None => {
                            ended = true;
                            break;
                        }
                    },
                };
                let out = match backend.train_step(&batch) {
                    Err(Error::NonFiniteState { tensor, value }) => {
                        return Err(Error::NonFinite { step: step + 1, loss: None, tensor, value });
                    }
                    out => out?,
                };
                let loss = out.loss.unwrap_or(f32::NAN);
                // The loss, then the gradients (a NaN can vanish behind a ReLU before it reaches
                // the loss); the state is checked whenever it is read back.
                let bad = (!loss.is_finite()).then(|| (LOSS.to_string(), loss));
                if let Some((tensor, value)) = bad.or_else(|| metrics::first_non_finite(&out.outputs)) {
                    return Err(Error::NonFinite { step: step + 1, loss: Some(loss), tensor, value });
                }
                step += 1;
                if let Some(hc) = &host_call {
                    let tensors = host_tensors(&hc.tensors, &out.outputs, &batch, loss, step)?;
                    (hc.host_fn)(step, &tensors)?;
                }
                l.losses.push(loss);
                l.steps += 1;
                if let Some(s) = out.simulated_seconds {
                    l.simulated_seconds = Some(l.simulated_seconds.unwrap_or(0.0) + s);
                }
                bar.inc(1);
            }
            if l.steps == 0 {
                break 'train;
            }
            l.wall_seconds = began.elapsed().as_secs_f64();
            l.global_step = step;
            seconds_per_step = Some(l.simulated_seconds.unwrap_or(l.wall_seconds) / l.steps as f64);
            let mut stop = false;
            for h in hooks.iter_mut() {
                stop |= h.after_loop(&l)? == HookAction::Stop;
            }
            let crossed = |every: u64| every > 0 && (step / every > (step - l.steps) / every);
            let last = step >= target || ended || stop;
            if crossed(self.config.log_step_count_steps) || last {
                let line = loop_line(&l, &report.backend);
                bar.suspend(|| self.log(&line));
            }
            if let Some(f) = &metrics_file
                && (crossed(self.config.save_summary_steps) || last)
            {
                f.append(&loop_record(&l))?;
            }
            let due = match every {
                CheckpointEvery::Steps(k) => step / k > saved_step / k,
                CheckpointEvery::Seconds(s) => saved_at.elapsed().as_secs_f64() >= s,
            };
            if (due || last) && self.config.model_dir.is_some() {
                self.save(step, &inputs, backend.as_mut())?;
                (saved_step, saved_at) = (step, Instant::now());
            }
            report.loops.push(l);
            if ended || stop {
                break;
            }
        }
        bar.finish_and_clear();
        // The input ended at a loop boundary: training ends here, saved as at any end.
        if step != saved_step && self.config.model_dir.is_some() {
            self.log(&format!("the training input ended at global step {step}"));
            self.save(step, &inputs, backend.as_mut())?;
        }
        report.global_step = step;
        let positions = inputs.iter().map(|i| i.position()).collect();
        let state = backend.state()?;
        check_finite(step, &state)?;
        self.memory = Some((step, state, positions));
        if let Some(f) = &metrics_file {
            // The curves are a view of the metrics: a failure to draw them is a note, not a
            // failed run.
            if let Err(e) = f.write_curves() {
                self.log(&format!("note: curves not drawn: {e}"));
            }
        }
        for h in hooks.iter_mut() {
            h.end(&report)?;
        }
        Ok(report)
    }

    pub(super) fn evaluate(&mut self, input_fn: &InputFn, steps: Option<u64>) -> Result<EvalReport> {
        if steps == Some(0) {
            return Err(Error::Config { field: "evaluate".into(), reason: "steps must be positive".into() });
        }
        let global = self.placement.eval_batch;
        let replicas = self.replicas_on(&self.placement.eval);
        let (spec, _) = self.spec(Mode::Eval, &self.model_params(global.map(|g| g / replicas)))?;
        let labels = labels_name(&spec.model)?;
        let smoothing = spec.loss.map_or(0.0, |l| l.label_smoothing);
        let (step, state) = self.trained("evaluate")?;
        let mut input = open(input_fn, Mode::Eval, &self.model_params(global), 1, self.seed())?.remove(0);
        let mut backend: Option<Box<dyn Backend>> = None;
        let mut means = Means::default();
        let (mut done, mut examples) = (0u64, 0usize);
        while steps.is_none_or(|s| done < s) {
            let Some(batch) = input.next_batch()? else { break };
            if rows(&batch) == 0 {
                continue;
            }
            let (outputs, real) =
                self.predict_padded(&mut backend, &spec, &state, global, &batch, self.placement.eval.clone())?;
            let logits = outputs.get(&output_name(&spec.model, 0)).expect("the first output is predicted");
            let label_values =
                batch.get(&labels).ok_or_else(|| Error::Input(format!("the batch has no labels '{labels}'")))?;
            for (name, u) in metrics::classifier_metrics(logits, &labels, label_values, smoothing)? {
                means.add(&name, u);
            }
            if let Some(em) = &spec.eval_metrics {
                let mut gathered = TensorMap::new();
                for name in &em.tensors {
                    let t = outputs.get(name).or_else(|| batch.get(name)).ok_or_else(|| {
                        Error::Input(format!(
                            "eval_metrics tensor '{name}' is neither an output of the model nor in the batch"
                        ))
                    })?;
                    gathered.insert(name.clone(), t.clone());
                }
                for (name, u) in (em.metric_fn)(&gathered)? {
                    means.add(&name, u);
                }
            }
            done += 1;
            examples += real;
        }
        if done == 0 {
            return Err(Error::Input("the evaluation input gave no batch".into()));
        }
        let report = EvalReport { global_step: step, metrics: means.values(), examples, steps: done };
        let line: Vec<String> = report.metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        self.log(&format!(
            "evaluation at global step {step} on {examples} examples in {done} batches: {}",
            line.join(", ")
        ));
        if let Some(dir) = &self.config.model_dir {
            let mut record = json!({"mode": "eval", "global_step": step, "examples": examples});
            for (k, v) in &report.metrics {
                record[k] = json!(v);
            }
            let file = MetricsFile::new(dir);
            file.append(&record)?;
            if let Err(e) = file.write_curves() {
                self.log(&format!("note: curves not drawn: {e}"));
            }
        }
        Ok(report)
    }

    /// The predictions for every example; with `tta`, the mean over that many views of each
    /// example, its image inputs augmented afresh for every view (test-time augmentation).
    pub(super) fn predict(&mut self, input_fn: &InputFn, tta: Option<(&Augment, usize)>) -> Result<TensorMap> {
        let global = self.placement.predict_batch;
        let replicas = self.replicas_on(&self.placement.train);
        let (spec, _) = self.spec(Mode::Predict, &self.model_params(global.map(|g| g / replicas)))?;
        let (_, state) = self.trained("predict")?;
        let mut input = open(input_fn, Mode::Predict, &self.model_params(global), 1, self.seed())?.remove(0);
        let keys: Vec<String> = if spec.predictions.is_empty() {
            spec.model.outputs().iter().map(|&o| spec.model.node(o).name.clone()).collect()
        } else {
            spec.predictions.clone()
        };
        let mut backend: Option<Box<dyn Backend>> = None;
        let mut parts: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
        // The model's image inputs ([N, H, W, C]): what test-time augmentation varies.
        let images: Vec<String> = spec
            .model
            .inputs()
            .into_iter()
            .filter(|&i| spec.model.node(i).shape.dims.len() == 3)
            .map(|i| spec.model.node(i).name.clone())
            .collect();
        let mut seen = 0u64;
        while let Some(batch) = input.next_batch()? {
            let target = self.placement.train.clone();
            let outputs = match tta {
                None => self.predict_padded(&mut backend, &spec, &state, global, &batch, target)?.0,
                Some((augment, views)) => {
                    let mut sum: Option<TensorMap> = None;
                    for view in 0..views {
                        let mut b = batch.clone();
                        let key = derive(self.seed() ^ TTA_SEED, view as u64);
                        for name in &images {
                            if let Some(t) = batch.get(name) {
                                b.insert(name.clone(), augment.apply_batch(t, |i| derive(key, seen + i as u64))?);
                            }
                        }
                        let (out, _) = self.predict_padded(&mut backend, &spec, &state, global, &b, target.clone())?;
                        sum = Some(match sum {
                            None => out,
                            Some(mut acc) => {
                                for (k, t) in acc.iter_mut() {
                                    *t += &out[k];
                                }
                                acc
                            }
                        });
                    }
                    let mut mean =
                        sum.ok_or_else(|| Error::Input("test-time augmentation needs at least 1 view".into()))?;
                    mean.values_mut().for_each(|t| *t /= views as f32);
                    mean
                }
            };
            seen += rows(&batch) as u64;
            for k in &keys {
                parts.entry(k.clone()).or_default().push(outputs[k].clone());
            }
        }
        if parts.is_empty() {
            return Err(Error::Input("the prediction input gave no batch".into()));
        }
        parts
            .into_iter()
            .map(|(k, ts)| {
                let views: Vec<_> = ts.iter().map(|t| t.view()).collect();
                let t = ndarray::concatenate(ndarray::Axis(0), &views)
                    .map_err(|e| Error::Input(format!("prediction '{k}' does not stack over batches: {e}")))?;
                Ok((k, t))
            })
            .collect()
    }

    /// The model's outputs for `batch` padded with zero examples to the backend's batch
    /// (`global`, or the first batch's size), the padding dropped; and the real examples.
    fn predict_padded(
        &self,
        backend: &mut Option<Box<dyn Backend>>,
        spec: &EstimatorSpec,
        state: &TensorMap,
        global: Option<usize>,
        batch: &TensorMap,
        target: Target,
    ) -> Result<(TensorMap, usize)> {
        let real = rows(batch);
        if backend.is_none() {
            let size = global.unwrap_or(real);
            let settings = Settings { precision: self.precision, ..Settings::new(Optimizer::default()) };
            *backend = Some(crate::backend::backend(target, &spec.model, state.clone(), size, settings)?);
        }
        let b = backend.as_mut().expect("built above");
        let size = b.batch();
        if real > size {
            return Err(Error::Input(format!(
                "the input gave a batch of {real} examples, more than the batch size {size} it was asked for: make the input function batch by params.batch_size()"
            )));
        }
        let inputs: TensorMap =
            session::inputs(&spec.model, batch, real)?.into_iter().map(|(n, t)| (n, pad_rows(t, size))).collect();
        let outputs = b.predict(&inputs)?.outputs;
        let outputs = outputs
            .into_iter()
            .map(|(n, t)| {
                let t = if t.shape().first() == Some(&size) {
                    t.slice_axis(ndarray::Axis(0), (0..real).into()).to_owned()
                } else {
                    t
                };
                (n, t)
            })
            .collect();
        Ok((outputs, real))
    }

    /// The trained state to evaluate or predict with: the newest checkpoint in the model
    /// folder, or what the last `train` left.
    fn trained(&mut self, verb: &str) -> Result<(u64, TensorMap)> {
        if let Some(dir) = self.config.model_dir.clone()
            && let Some(c) = self.newest(&dir)?
        {
            return Ok((c.global_step, c.state));
        }
        match &self.memory {
            Some((step, state, _)) => Ok((*step, state.clone())),
            None => Err(Error::Input(match &self.config.model_dir {
                Some(d) => format!("could not find a trained model in {} to {verb}: train first", d.display()),
                None => format!("there is no trained model to {verb}: train first, or set model_dir to a trained run"),
            })),
        }
    }

    /// The newest usable checkpoint, the last run in memory, or fresh (warm-started)
    /// parameters.
    fn start(&mut self, model: &Graph) -> Result<Start> {
        if let Some(dir) = self.config.model_dir.clone()
            && let Some(c) = self.newest(&dir)?
        {
            let file = checkpoint::path(&dir, c.global_step).display().to_string();
            return Ok(Start {
                step: c.global_step,
                state: c.state,
                positions: Some(c.input_positions),
                checkpoint: Some(file),
            });
        }
        if let Some((step, state, positions)) = &self.memory {
            return Ok(Start {
                step: *step,
                state: state.clone(),
                positions: Some(positions.clone()),
                checkpoint: None,
            });
        }
        let mut state = model.init_parameters(self.seed());
        if let Some(w) = self.warm_start.clone() {
            let n = self.warm_start(model, &w, &mut state)?;
            self.log(&format!("warm-started {n} variables from {}", w.from.display()));
        }
        Ok(Start { step: 0, state, positions: None, checkpoint: None })
    }

    /// The newest checkpoint in `dir` that checks, the ones skipped logged.
    fn newest(&mut self, dir: &std::path::Path) -> Result<Option<Checkpoint>> {
        let (ckpt, notes) = checkpoint::latest(dir)?;
        for n in notes {
            self.log(&n);
        }
        Ok(ckpt)
    }

    /// Loads the warm start's variables into `state`; returns how many.
    fn warm_start(&mut self, model: &Graph, w: &super::WarmStart, state: &mut TensorMap) -> Result<usize> {
        let source = if w.from.is_dir() {
            let ckpt = self.newest(&w.from)?;
            ckpt.ok_or_else(|| Error::Input(format!("warm_start_from: no checkpoint in {}", w.from.display())))?.state
        } else {
            checkpoint::load(&w.from)?.state
        };
        let re = whole_match(w.vars_to_warm_start.as_deref().unwrap_or(".*"), "warm_start_from.vars_to_warm_start")?;
        // As TensorFlow: a name map entry for a variable that is not warm-started is a mistake.
        for (name, _) in &w.var_name_to_prev_var_name {
            if model.find(name).is_none() || !re.is_match(name) {
                return Err(Error::Config {
                    field: "warm_start_from.var_name_to_prev_var_name".into(),
                    reason: format!(
                        "maps '{name}', which is not a parameter of the model that vars_to_warm_start selects"
                    ),
                });
            }
        }
        let mut n = 0;
        for id in model.parameters() {
            let name = &model.node(id).name;
            if !re.is_match(name) {
                continue;
            }
            let prev = w.var_name_to_prev_var_name.iter().find(|(k, _)| k == name).map_or(name.as_str(), |(_, v)| v);
            let t = source.get(prev).ok_or_else(|| {
                Error::Input(format!(
                    "warm_start_from {}: no variable '{prev}' for '{name}': map it with var_name_to_prev_var_name or leave it out of vars_to_warm_start",
                    w.from.display()
                ))
            })?;
            let want = &model.node(id).shape.dims;
            if t.shape() != want.as_slice() {
                return Err(Error::Input(format!(
                    "warm_start_from {}: '{prev}' has shape {:?} but '{name}' needs {want:?}: leave it out of vars_to_warm_start",
                    w.from.display(),
                    t.shape()
                )));
            }
            state.insert(name.clone(), t.clone());
            n += 1;
        }
        if n == 0 {
            return Err(Error::Input(format!(
                "warm_start_from {}: vars_to_warm_start matches no parameter",
                w.from.display()
            )));
        }
        Ok(n)
    }

    /// Writes a checkpoint of the backend's state at `step`.
    fn save(&mut self, step: u64, inputs: &[Box<dyn Input>], backend: &mut dyn Backend) -> Result<()> {
        let dir = self.config.model_dir.clone().expect("only called with a model folder");
        let state = backend.state()?;
        check_finite(step, &state)?;
        let ckpt =
            Checkpoint { global_step: step, input_positions: inputs.iter().map(|i| i.position()).collect(), state };
        checkpoint::save(&dir, &ckpt, self.config.keep_checkpoint_max)?;
        Ok(())
    }

    fn seed(&self) -> u64 {
        self.config.random_seed.unwrap_or(0)
    }

    /// The params a model function gets: on a TPU estimator `batch_size` per replica; on
    /// the CPU estimator the user's own.
    fn model_params(&self, per_replica: Option<usize>) -> Params {
        match per_replica {
            Some(n) => self.params.with_batch_size(n),
            None => self.params.clone(),
        }
    }

    /// The replicas that run on `target` (evaluation can run on the CPU after TPU training).
    fn replicas_on(&self, target: &Target) -> usize {
        if matches!(target, Target::Cpu) { 1 } else { self.placement.replicas }
    }
}

/// Refuses a state holding a NaN or an infinity (never checkpointed), naming the tensor.
fn check_finite(step: u64, state: &TensorMap) -> Result<()> {
    match metrics::first_non_finite(state) {
        Some((tensor, value)) => Err(Error::NonFinite { step, loss: None, tensor, value }),
        None => Ok(()),
    }
}

/// `count` inputs from `input_fn`.
fn open(input_fn: &InputFn, mode: Mode, params: &Params, count: usize, seed: u64) -> Result<Vec<Box<dyn Input>>> {
    (0..count)
        .map(|i| input_fn(&InputContext { mode, params: params.clone(), input_index: i, inputs: count, seed }))
        .collect()
}

/// One step's batch: `per_step` batches of each input in turn, concatenated (replica order),
/// each checked for `batch` examples; `None` when an input ends.
fn next_batch(inputs: &mut [Box<dyn Input>], per_step: usize, batch: Option<usize>) -> Result<Option<TensorMap>> {
    let mut parts: Vec<TensorMap> = Vec::new();
    for (i, input) in inputs.iter_mut().enumerate() {
        for _ in 0..per_step {
            let Some(b) = input.next_batch()? else { return Ok(None) };
            if let Some(want) = batch
                && rows(&b) != want
            {
                return Err(Error::Input(format!(
                    "input {i} gave a batch of {} examples where each step needs {want}: batches on a TPU have a fixed size (drop the remainder)",
                    rows(&b)
                )));
            }
            parts.push(b);
        }
    }
    if parts.len() == 1 {
        return Ok(parts.pop());
    }
    let mut out = TensorMap::new();
    for name in parts[0].keys() {
        let views: Vec<_> = parts
            .iter()
            .map(|p| {
                p.get(name).map(|t| t.view()).ok_or_else(|| Error::Input(format!("an input's batch has no '{name}'")))
            })
            .collect::<Result<_>>()?;
        let t = ndarray::concatenate(ndarray::Axis(0), &views)
            .map_err(|e| Error::Input(format!("'{name}' differs in shape between inputs: {e}")))?;
        out.insert(name.clone(), t);
    }
    Ok(Some(out))
}

/// Examples in a batch (its tensors' first axis).
fn rows(batch: &TensorMap) -> usize {
    batch.values().next().and_then(|t| t.shape().first().copied()).unwrap_or(0)
}

/// `t` with zero examples appended up to `size`.
fn pad_rows(t: &Tensor, size: usize) -> Tensor {
    let n = t.shape()[0];
    if n == size {
        return t.clone();
    }
    let mut shape = t.shape().to_vec();
    shape[0] = size - n;
    ndarray::concatenate(ndarray::Axis(0), &[t.view(), Tensor::zeros(shape).view()]).expect("same trailing shape")
}

/// The labels' input name the classifier loss reads.
fn labels_name(model: &Graph) -> Result<String> {
    let (g, loss) = model.with_classifier_loss(0.0)?;
    Ok(g.node(g.node(loss).inputs[1]).name.clone())
}

fn output_name(model: &Graph, i: usize) -> String {
    model.node(model.outputs()[i]).name.clone()
}

/// The tensors a host call asked for, from one training step.
fn host_tensors(names: &[String], outputs: &TensorMap, batch: &TensorMap, loss: f32, step: u64) -> Result<TensorMap> {
    names
        .iter()
        .map(|name| {
            let t = match name.as_str() {
                LOSS => session::scalar(loss),
                "global_step" => session::scalar(step as f32),
                _ => outputs.get(name).or_else(|| batch.get(name)).cloned().ok_or_else(|| {
                    Error::Input(format!(
                        "host_call tensor '{name}' is not loss, global_step, a gradient (<param>/grad) or a batch tensor"
                    ))
                })?,
            };
            Ok((name.clone(), t))
        })
        .collect()
}

/// A loop's log line.
fn loop_line(l: &LoopReport, backend: &str) -> String {
    let mut line = format!(
        "global step {}: loss {:.4} over {} steps, {:.1} steps/s",
        l.global_step,
        l.mean_loss(),
        l.steps,
        l.steps_per_second()
    );
    if let (Some(s), Some(ex)) = (l.simulated_seconds, l.simulated_examples_per_second()) {
        line += &format!("; simulated on {backend}: {:.1} steps/s, {:.0} examples/s", l.steps as f64 / s, ex);
    }
    line
}

/// A loop's record in the metrics file.
fn loop_record(l: &LoopReport) -> serde_json::Value {
    let mut r = json!({
        "mode": "train",
        "global_step": l.global_step,
        "loss": l.mean_loss(),
        "steps": l.steps,
        "steps_per_second": l.steps_per_second(),
        "examples_per_second": l.examples_per_second(),
    });
    if let (Some(s), Some(ex)) = (l.simulated_seconds, l.simulated_examples_per_second()) {
        r["simulated_steps_per_second"] = json!(l.steps as f64 / s);
        r["simulated_examples_per_second"] = json!(ex);
    }
    r
}

/// A progress bar over `steps` on a terminal (hidden otherwise, and for unbounded runs).
fn progress(steps: u64, bounded: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !bounded || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {per_sec}, eta {eta}") {
        bar.set_style(style);
    }
    bar
}

//! A simulated core or slice as a backend: the training step compiled for one replica's
//! share of the batch (with the gradient all-reduce over `replicas`), validated once, run on
//! one functional engine per core step after step — the state stays in each core's HBM, only
//! the inputs are written each step — and timed once.

use systolic_compiler::lower::{Compiled, Options, Training, compile};
use systolic_compiler::{Graph, Tensor, TensorMap};
use systolic_simulator::Machine;
use systolic_simulator::executable::{Binding, Executable, Role};
use systolic_simulator::functional::Functional;
use systolic_simulator::pod::slice::{self, Hosts};
use systolic_simulator::timing;

use super::{Backend, Settings, StepOutput};
use crate::error::{Error, Result};
use crate::session::{self, LOSS};

/// One simulated core, or every core of a slice (one replica each).
pub struct Simulated {
    model: Graph,
    machine: Machine,
    replicas: usize,
    /// Examples per replica.
    per_replica: usize,
    settings: Settings,
    /// The training step, once a training step asks for it.
    step: Option<Compiled>,
    infer: Executable,
    cores: Vec<Functional>,
    /// The state to load before the first step (then it lives in HBM).
    initial: Option<TensorMap>,
    /// Parameters the training step does not bind (the loss does not reach them, so no step
    /// changes them): held on the host from the first step on, part of the state.
    unbound: TensorMap,
    /// The step's simulated time, once measured.
    seconds: Option<f64>,
}

impl Simulated {
    /// `replicas`: 1 for one core, the slice's cores for a slice.
    pub fn new(
        model: &Graph,
        state: TensorMap,
        batch: usize,
        settings: Settings,
        machine: Machine,
        replicas: usize,
    ) -> Result<Simulated> {
        if batch == 0 || replicas == 0 {
            return Err(Error::Input(format!(
                "a batch of {batch} examples over {replicas} replicas: give both at least 1"
            )));
        }
        if !batch.is_multiple_of(replicas) {
            return Err(Error::Input(format!(
                "a batch of {batch} examples does not split evenly over {replicas} replicas: give a multiple of {replicas}"
            )));
        }
        let per_replica = batch / replicas;
        let base = Options::new(machine.clone(), per_replica, settings.precision);
        let infer = compile(model, &base)?.executable;
        infer.program.validate(&machine)?;
        // Every parameter of the model, as the CPU backend checks: those no program binds (the
        // outputs and the loss do not reach them) stay on the host, part of the state.
        for id in model.parameters() {
            let node = model.node(id);
            session::state_tensor(&state, &node.name, &node.shape.dims)?;
        }
        let cores = (0..replicas).map(|_| Functional::new(&machine)).collect();
        Ok(Simulated {
            model: model.clone(),
            machine,
            replicas,
            per_replica,
            settings,
            step: None,
            infer,
            cores,
            initial: Some(state),
            unbound: TensorMap::new(),
            seconds: None,
        })
    }

    /// The training step, compiled (and validated) the first time it is needed: a backend
    /// that only predicts never compiles one (nor needs a model with a classifier head).
    fn training_step(&mut self) -> Result<&Compiled> {
        if self.step.is_none() {
            let s = &self.settings;
            let base = Options::new(self.machine.clone(), self.per_replica, s.precision);
            let training = Some(Training { optimizer: s.optimizer.clone(), label_smoothing: s.label_smoothing });
            let opts = Options { training, replicas: self.replicas, gradient_reduction: s.reduction, ..base };
            let step = compile(&self.model, &opts)?;
            step.executable.program.validate(&self.machine)?;
            // Every replica's core holds the step's memories from the first step on.
            systolic_simulator::host::check(step.executable.memory_need(self.replicas))
                .map_err(systolic_simulator::Error::from)?;
            // The state not given (slots, the optimizer's and dropout's counters) starts as
            // the compiled step starts it; before the first step it is still on the host.
            let mut initial = step.initial_state.clone();
            initial.extend(self.initial.clone().unwrap_or_default());
            for b in step.executable.bindings.iter().filter(|b| b.role == Role::Parameter) {
                session::state_tensor(&initial, &b.name, &b.shape)?;
            }
            // Only once every check passed: a failed compile leaves the backend as it was.
            for core in &mut self.cores {
                core.reserve(step.executable.footprint);
            }
            self.initial = Some(initial);
            self.step = Some(step);
        }
        Ok(self.step.as_ref().expect("compiled above"))
    }

    /// Replica `r`'s share of `t` (its rows of the batch).
    fn shard<'t>(&self, t: &'t Tensor, r: usize) -> &'t [f32] {
        let per = t.len() / self.replicas;
        &t.as_slice().expect("batches are contiguous")[r * per..(r + 1) * per]
    }

    /// The simulated time of one step (measured the first time).
    fn seconds(&mut self) -> Result<f64> {
        if let Some(s) = self.seconds {
            return Ok(s);
        }
        let step = self.step.as_ref().expect("timed after a training step");
        let program = &step.executable.program;
        let s = if self.replicas == 1 {
            timing::simulate_unchecked(&self.machine, program, false)?.report.seconds
        } else {
            let hosts = Hosts::new(self.per_replica, step.executable.input_bytes() / self.per_replica as u64);
            slice::simulate(&self.machine, program, &hosts, &slice::Options::default())?.step_seconds
        };
        self.seconds = Some(s);
        Ok(s)
    }
}

impl Backend for Simulated {
    fn describe(&self) -> String {
        match self.replicas {
            1 => format!("one {} core", self.machine.name),
            n => format!("{} ({n} replicas)", self.machine.name),
        }
    }

    fn batch(&self) -> usize {
        self.per_replica * self.replicas
    }

    fn train_step(&mut self, batch: &TensorMap) -> Result<StepOutput> {
        self.training_step()?;
        let exe = &self.step.as_ref().expect("compiled").executable;
        let mut feed: TensorMap =
            session::inputs(&self.model, batch, self.batch())?.into_iter().map(|(n, t)| (n, t.clone())).collect();
        feed.extend(session::one_hot_labels(exe, batch)?);
        // Every replica's values first, checked, so a bad batch changes nothing: the state
        // (before the first step) and the replica's share of each input.
        let mut writes: Vec<Vec<(&Binding, &[f32])>> = Vec::with_capacity(self.replicas);
        for r in 0..self.replicas {
            let mut mine = Vec::new();
            for b in &exe.bindings {
                let values: &[f32] = match (b.role, &self.initial) {
                    (Role::Input, _) => {
                        let t =
                            feed.get(&b.name).ok_or_else(|| Error::Input(format!("the batch has no '{}'", b.name)))?;
                        self.shard(t, r)
                    }
                    (Role::Parameter, Some(state)) => {
                        let own = state.get(&session::replica_state(r, &b.name));
                        own.unwrap_or(&state[&b.name]).as_slice().expect("state is contiguous")
                    }
                    _ => continue,
                };
                let want: usize = b.shape.iter().product();
                if values.len() != want {
                    return Err(Error::Input(format!(
                        "'{}' has {} values for one replica but its shape {:?} holds {want}",
                        b.name,
                        values.len(),
                        b.shape
                    )));
                }
                mine.push((b, values));
            }
            writes.push(mine);
        }
        for (core, mine) in self.cores.iter_mut().zip(writes) {
            for (b, values) in mine {
                core.write(b.tile, values)?;
            }
        }
        // The state the step does not bind stays on the host (with any replica's own value).
        if let Some(initial) = self.initial.take() {
            let bound = |name: &str| exe.bindings.iter().any(|b| b.role == Role::Parameter && b.name == name);
            let unbound: Vec<&str> = self
                .model
                .parameters()
                .into_iter()
                .map(|id| self.model.node(id).name.as_str())
                .filter(|name| !bound(name))
                .collect();
            for (key, t) in initial {
                let name = session::replica_of(&key).map_or(key.as_str(), |(_, name)| name);
                if unbound.contains(&name) {
                    self.unbound.insert(key, t);
                }
            }
        }
        let program = &exe.program;
        if self.replicas == 1 {
            if let Some(i) = self.cores[0].run_until_collective(program, 0)? {
                return Err(Error::Input(format!(
                    "instruction {i} is a collective over several replicas: run a slice"
                )));
            }
        } else {
            slice::run_values_validated(&self.machine, program, &mut self.cores)?;
        }
        let mut loss = 0.0;
        let mut outputs = TensorMap::new();
        for (r, core) in self.cores.iter_mut().enumerate() {
            for b in exe.bindings.iter().filter(|b| b.role == Role::Output) {
                if b.name == LOSS {
                    loss += core.read(b.tile)?[0] / self.replicas as f32;
                } else if r == 0 && b.name.ends_with(session::GRAD_SUFFIX) {
                    let t = Tensor::from_shape_vec(b.shape.clone(), core.read(b.tile)?).expect("a binding's shape");
                    outputs.insert(b.name.clone(), t);
                }
            }
        }
        // A parameter the loss does not reach has no gradient in the program (and no update):
        // its gradient is reported as zeros, as the CPU reference reports it.
        for id in self.model.trainable_parameters() {
            let node = self.model.node(id);
            outputs.entry(session::grad_name(&node.name)).or_insert_with(|| Tensor::zeros(node.shape.dims.clone()));
        }
        Ok(StepOutput { loss: Some(loss), outputs, simulated_seconds: Some(self.seconds()?) })
    }

    fn predict(&mut self, batch: &TensorMap) -> Result<StepOutput> {
        let params = self.state()?;
        let inputs = session::inputs(&self.model, batch, self.batch())?;
        let mut shards: Vec<Vec<(String, Vec<f32>)>> = Vec::new();
        for r in 0..self.replicas {
            let mut feed: Vec<(String, Vec<f32>)> =
                inputs.iter().map(|(n, t)| (n.clone(), self.shard(t, r).to_vec())).collect();
            for b in self.infer.bindings.iter().filter(|b| b.role == Role::Parameter) {
                let p = params.get(&b.name).ok_or_else(|| Error::Input(format!("no parameter '{}'", b.name)))?;
                feed.push((b.name.clone(), p.iter().copied().collect()));
            }
            let find = |n: &str| feed.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_slice());
            // Validated once in `new`: load, run, read.
            let mut core = self.infer.core(&self.machine)?;
            self.infer.load(&mut core, find)?;
            if let Some(i) = core.run_until_collective(&self.infer.program, 0)? {
                return Err(Error::Input(format!("instruction {i} of the inference program is a collective")));
            }
            shards.push(self.infer.outputs(&mut core)?);
        }
        // Each batched output's shards, in replica order, as one batch (others: replica 0's).
        let mut outputs = TensorMap::new();
        for (i, b) in self.infer.bindings.iter().filter(|b| b.role == Role::Output).enumerate() {
            let mut shape = b.shape.clone();
            let values: Vec<f32> = match shape.first_mut() {
                Some(n) if *n == self.per_replica => {
                    *n *= self.replicas;
                    shards.iter().flat_map(|s| s[i].1.iter().copied()).collect()
                }
                _ => shards[0][i].1.clone(),
            };
            outputs.insert(b.name.clone(), Tensor::from_shape_vec(shape, values).expect("the shards make the batch"));
        }
        Ok(StepOutput { loss: None, outputs, simulated_seconds: None })
    }

    fn state_shapes(&mut self) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
        let bound = self.training_step()?.executable.bindings.iter().filter(|b| b.role == Role::Parameter);
        let mut shapes: std::collections::BTreeMap<String, Vec<usize>> =
            bound.map(|b| (b.name.clone(), b.shape.clone())).collect();
        // With the parameters the step does not bind, which predictions read.
        for id in self.model.parameters() {
            let node = self.model.node(id);
            shapes.entry(node.name.clone()).or_insert_with(|| node.shape.dims.clone());
        }
        Ok(shapes)
    }

    fn state(&mut self) -> Result<TensorMap> {
        if let Some(initial) = &self.initial {
            return Ok(initial.clone());
        }
        let mut state = TensorMap::new();
        let step = self.step.as_ref().expect("the state is on the cores only after a training step");
        for b in step.executable.bindings.iter().filter(|b| b.role == Role::Parameter) {
            let first = self.cores[0].read(b.tile)?;
            // Replicas differ only in what their own examples drive (batch norm's moving
            // statistics): each such value is kept under `replica<r>/`, so a restored slice
            // continues exactly.
            for r in 1..self.replicas {
                let own = self.cores[r].read(b.tile)?;
                // Bit for bit (a NaN is not equal to itself, yet the same value).
                if own.iter().zip(&first).any(|(a, b)| a.to_bits() != b.to_bits()) {
                    let t = Tensor::from_shape_vec(b.shape.clone(), own).expect("a binding's shape");
                    state.insert(session::replica_state(r, &b.name), t);
                }
            }
            state.insert(b.name.clone(), Tensor::from_shape_vec(b.shape.clone(), first).expect("a binding's shape"));
        }
        state.extend(self.unbound.iter().map(|(k, t)| (k.clone(), t.clone())));
        Ok(state)
    }
}

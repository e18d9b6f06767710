//! Backends: one trait, three ways to run a model's steps — the f32 CPU reference, one
//! simulated core, a simulated slice of cores (data parallel: each replica a shard of the
//! batch, gradients all-reduced).

mod cpu;
mod simulated;

pub use cpu::Cpu;
pub use simulated::Simulated;

use systolic_compiler::optimizer::Optimizer;
use systolic_compiler::{Graph, TensorMap};
use systolic_simulator::Machine;
use systolic_simulator::isa::Reduction;
use systolic_simulator::numerics::Precision;

use crate::error::Result;

/// What a step returns.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// A training step's loss over the whole batch (on a slice, the mean of the replicas').
    pub loss: Option<f32>,
    /// A training step's gradients (`<param>/grad`), or a prediction's outputs, by name;
    /// batched outputs hold the whole batch in order.
    pub outputs: TensorMap,
    /// On a simulated machine, the simulated time of the step (the slowest core's, with the
    /// collectives); the same for every step of a backend, whose program does not change.
    pub simulated_seconds: Option<f64>,
}

/// How to train: the optimizer, the loss's label smoothing, the MXU precision of a simulated
/// machine and how replicas combine gradients.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub optimizer: Optimizer,
    pub label_smoothing: f32,
    pub precision: Precision,
    /// How replicas combine gradients: `Mean` (CrossShardOptimizer's default) or `Sum`. The
    /// CPU reference runs the whole batch as one: its gradient is always the mean's.
    pub reduction: Reduction,
}

impl Settings {
    pub fn new(optimizer: Optimizer) -> Settings {
        Settings { optimizer, label_smoothing: 0.0, precision: Precision::Default, reduction: Reduction::Mean }
    }
}

/// Where steps run.
#[derive(Clone, Debug)]
pub enum Target {
    /// The f32 CPU reference (TPUEstimator's `use_tpu = False`).
    Cpu,
    /// One core of the machine.
    Core(Machine),
    /// Every core of the machine's slice, one replica each.
    Slice(Machine),
}

/// A model's state and the steps that change it.
pub trait Backend {
    /// What runs the steps (`cpu`, `v2-8 core`, `v2-8 (8 replicas)`).
    fn describe(&self) -> String;
    /// Examples per step (the whole batch, over every replica).
    fn batch(&self) -> usize;
    /// One training step on `batch` (the model's inputs and the integer labels, by name):
    /// forward, loss, backward and the optimizer's update of the state.
    fn train_step(&mut self, batch: &TensorMap) -> Result<StepOutput>;
    /// The model's outputs for `batch` with the current parameters (inference: batch norm
    /// with its moving statistics, no dropout).
    fn predict(&mut self, batch: &TensorMap) -> Result<StepOutput>;
    /// The state: parameters, batch norm's moving statistics, the optimizer's slots
    /// (`<param>/<slot>`) and shared state, the dropout step — what a checkpoint holds. On a
    /// slice, replica 0's, plus each other replica's own moving statistics where they differ
    /// (`replica<r>/<name>`, see [`crate::session::replica_state`]); a backend started from
    /// such a state gives each replica its own.
    fn state(&mut self) -> Result<TensorMap>;
    /// The state's tensors this backend's step reads and writes, with their shapes: what a
    /// checkpoint to resume from must hold (beyond it only `replica<r>/` statistics).
    fn state_shapes(&mut self) -> Result<std::collections::BTreeMap<String, Vec<usize>>>;
}

/// A backend for `model` on `target`, starting from `state` (at least the model's
/// parameters; slots and optimizer state not given start as the optimizer starts them),
/// running `batch` examples per step.
pub fn backend(
    target: Target,
    model: &Graph,
    state: TensorMap,
    batch: usize,
    settings: Settings,
) -> Result<Box<dyn Backend>> {
    Ok(match target {
        Target::Cpu => Box::new(Cpu::new(model, state, batch, settings)?),
        Target::Core(machine) => Box::new(Simulated::new(model, state, batch, settings, machine, 1)?),
        Target::Slice(machine) => {
            let cores = machine.cores();
            Box::new(Simulated::new(model, state, batch, settings, machine, cores)?)
        }
    })
}

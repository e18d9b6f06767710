//! Lowering: graphs to simulator executables (per-core programs and their HBM layout).
//!
//! The lowering is built in layers, each importing only from the layers below it:
//!
//! 1. [`options`], [`kernel`] and [`training`]: what to compile for, what flows between the
//!    passes (fused kernels, tensor places, kernel reports), and the training step as a graph;
//! 2. [`emitter`]: one kernel's instruction buffer, its waits and dependencies, VMEM, and the
//!    accounting behind the cost estimate and report;
//! 3. [`blocks`]: reusable pieces — staging with zero fill, matmul blocks, row streaming,
//!    epilogues, per-channel sums and batch statistics;
//! 4. [`kernels`]: one module per op family and the dispatcher, the only `match` from a fused
//!    kernel to the function that emits it;
//! 5. [`passes`] (`fusion`, `layout`, `storage`, `allocation`, `tiling`, `collectives`,
//!    `scheduling`), run in order by
//!    [`pipeline`], each printable with `--dump-after PASS`.
//!
//! The result runs on the functional engine (values) and the timing engine (cycles).

mod blocks;
mod emitter;
mod kernel;
mod kernels;
mod options;
mod passes;
mod pipeline;
pub mod training;

use std::collections::BTreeSet;

use serde::Serialize;
use systolic_simulator::executable::{Binding, Executable, Role};
use systolic_simulator::isa::DType;

use crate::error::{Error, Result};
use crate::graph::{Graph, Op};
use crate::optimizer::Rule;
use crate::tensors::TensorMap;
pub use kernel::{BatchNormGrad, Epilogue, Kernel, KernelReport, Main, Storage};
pub use options::Options;
pub use pipeline::{Dump, PassName};
pub use training::Training;

/// A compiled graph.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub executable: Executable,
    pub kernels: Vec<KernelReport>,
    /// Each pass's result as `--dump-after` shows it (see [`Compiled::dump`]).
    pub dumps: Vec<(PassName, Dump)>,
    /// Initial values of the state the lowering added (optimizer slots at their start, Adam's
    /// powers, a schedule's global step):
    /// feed them with the model's parameters before the first training step.
    pub initial_state: TensorMap,
    /// Every tensor the program keeps in HBM (inputs, parameters, state, activations), with
    /// its element type there and its bytes.
    pub tensors: Vec<StoredTensor>,
    /// The instructions of the gradient all-reduces (one per bucket; reduce-scatters with the
    /// sharded update, whose kernels also take and all-gather the parameters); the other
    /// all-reduces sum batch-norm statistics over a group of replicas.
    pub gradient_all_reduces: Vec<usize>,
}

/// A tensor in HBM: its name, element type and bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: DType,
    pub bytes: u64,
}

impl Compiled {
    /// The names of the tensors stored in bf16: what the reference rounds to reproduce bf16
    /// storage ([`crate::reference::RunOptions::bf16`]).
    pub fn bf16_tensors(&self) -> BTreeSet<String> {
        self.tensors.iter().filter(|t| t.dtype == DType::Bf16).map(|t| t.name.clone()).collect()
    }

    /// The multiply-adds the graph asks of the MXU over what the core's MXUs could do in
    /// `cycles`: the step's MXU utilisation. (The timing engine's own figure counts the
    /// matmuls as issued, padding included.)
    pub fn mxu_utilization(&self, machine: &systolic_simulator::Machine, cycles: u64) -> f64 {
        let useful: u64 = self.kernels.iter().map(|k| k.useful_macs).sum();
        let peak = machine.macs_per_cycle() as f64 * cycles as f64;
        if peak > 0.0 { useful as f64 / peak } else { 0.0 }
    }

    /// HBM bytes bf16 storage saves against f32: half of what the bf16 tensors would take.
    pub fn bytes_saved(&self) -> u64 {
        self.tensors.iter().filter(|t| t.dtype == DType::Bf16).map(|t| t.bytes).sum()
    }

    /// The text of `pass`'s result.
    pub fn dump(&self, pass: PassName) -> String {
        match self.dumps.iter().find(|(name, _)| *name == pass).map(|(_, d)| d) {
            Some(Dump::Text(text)) => text.clone(),
            Some(Dump::Listing) => self.executable.program.to_string(),
            None => unreachable!("every pass of the pipeline leaves a dump"),
        }
    }
}

/// How the training step shards its update, if the options ask for it: (replicas, bucket bytes).
fn sharding(opts: &Options) -> Option<(usize, u64)> {
    opts.sharded_update.then_some((opts.replicas, opts.bucket_bytes))
}

/// Compiles `graph` for one core of `opts.machine`: inference, or with `opts.training` the
/// whole training step.
pub fn compile(graph: &Graph, opts: &Options) -> Result<Compiled> {
    let fail = |reason: String| Error::Graph { graph: graph.name().to_string(), reason };
    if opts.batch == 0 {
        return Err(fail("a batch of zero examples cannot be compiled; give --batch 1 or more".into()));
    }
    let group = opts.batch_norm_group;
    if group == 0 || opts.replicas == 0 || !opts.replicas.is_multiple_of(group) {
        return Err(fail(format!(
            "batch norm over groups of {group} replicas needs a group size of at least 1 that divides the {} replicas",
            opts.replicas
        )));
    }
    if group > 1 && opts.training.is_none() && !opts.train_mode {
        return Err(fail(format!(
            "batch norm over groups of {group} replicas applies to training, where batch norm uses the batch's \
             statistics: lower the training step or leave the group at 1"
        )));
    }
    if opts.sharded_update && (opts.training.is_none() || opts.replicas < 2) {
        return Err(fail(format!(
            "the sharded weight update shares a training step's update among replicas: lower the training step \
             over more than one replica (now {} replica{}{})",
            opts.replicas,
            if opts.replicas == 1 { "" } else { "s" },
            if opts.training.is_none() { ", inference" } else { "" }
        )));
    }
    if let Some(t) = opts.training.as_ref().filter(|_| opts.sharded_update) {
        if let Rule::Lars { .. } = t.optimizer.rule {
            return Err(fail(
                "LARS scales each parameter by its own norms, and a shard of the sharded weight update holds \
                 pieces of several parameters: turn off the sharded update or choose another optimizer"
                    .into(),
            ));
        }
        if t.optimizer.weight_decay > 0.0 {
            return Err(fail(format!(
                "weight decay {} with the sharded weight update: a shard mixes parameters that decay with \
                 batch norm's and biases, which do not; set the weight decay to 0 or turn off the sharded update",
                t.optimizer.weight_decay
            )));
        }
    }
    // The graph the passes see: the training step, or the model with one-hot labels for any loss.
    let (prepared, step) = training::prepare(graph, opts.training.as_ref(), opts.train_mode, sharding(opts))?;
    let graph = &prepared;
    let mut lowering = pipeline::Lowering::new(graph, opts, &step);
    let dumps = lowering.run()?;

    let places = &lowering.places;
    let mut bindings = Vec::new();
    for (id, node) in graph.nodes() {
        let role = if let Op::Input(_) = node.op {
            Role::Input
        } else if let Op::Parameter(_) = node.op {
            Role::Parameter
        } else {
            continue;
        };
        if let Some(p) = &places[id.index()] {
            bindings.push(Binding { name: node.name.clone(), role, shape: p.shape.clone(), tile: p.tile });
        }
    }
    for &out in graph.outputs() {
        let p = places[out.index()].as_ref().expect("outputs are placed");
        let name = step.output_names.get(&out).cloned().unwrap_or_else(|| graph.node(out).name.clone());
        bindings.push(Binding { name, role: Role::Output, shape: p.shape.clone(), tile: p.tile });
    }
    let tensors = graph
        .node_ids()
        .filter(|&id| lowering.owner[id.index()] == Some(id))
        .filter_map(|id| {
            let p = places[id.index()].as_ref()?;
            Some(StoredTensor { name: graph.node(id).name.clone(), dtype: p.tile.dtype, bytes: p.tile.bytes() })
        })
        .collect();
    let hbm_peak_bytes = lowering.plan.as_ref().expect("allocation ran").peak;
    let program = std::mem::take(&mut lowering.program);
    let executable = Executable::new(graph.name(), program, bindings, hbm_peak_bytes);
    let added = step
        .updates
        .iter()
        .flat_map(|u| &u.slots)
        .chain(step.sharded.iter().flat_map(|s| s.state()))
        .chain(&step.state);
    let initial_state =
        added.filter_map(|&id| Some((graph.node(id).name.clone(), graph.init_parameter(id, 0)?))).collect();
    let gradient_all_reduces = std::mem::take(&mut lowering.bucket_instrs);
    Ok(Compiled { executable, kernels: lowering.reports, dumps, initial_state, tensors, gradient_all_reduces })
}

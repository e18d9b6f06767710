//! Lowering: graphs to simulator executables (per-core programs and their HBM layout).
//!
//! The pipeline is a list of named passes, each a function of the previous one's result, each
//! printable with `--dump-after PASS`:
//!
//! 1. `fusion` ([`fusion`]): nodes grouped into kernels with epilogues;
//! 2. `layout`: every tensor's 2-D shape in HBM, views sharing bytes;
//! 3. `allocation` ([`memory`]): HBM addresses by liveness, the peak checked against the core;
//! 4. `tiling` and `scheduling` ([`emit`]): per kernel, blocks sized to VMEM, then instructions
//!    with double-buffered DMA, MXU passes and VPU epilogues, and the compiler's cost estimate.
//!
//! The result runs on the functional engine (values) and the timing engine (cycles).

mod backward;
mod batch_norm;
mod conv_grad;
mod emit;
pub mod fusion;
mod memory;
pub mod training;

use std::ops::Range;

use serde::Serialize;
use systolic_simulator::Machine;
use systolic_simulator::executable::{Binding, Executable, Role};
use systolic_simulator::isa::{DType, Space, Tile};
use systolic_simulator::numerics::Precision;

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId, Op};
use crate::tensors::TensorMap;
pub use fusion::{Epilogue, Kernel, Main};
pub use training::Training;

/// What to compile for.
#[derive(Clone, Debug)]
pub struct Options {
    pub machine: Machine,
    /// Examples per core.
    pub batch: usize,
    pub precision: Precision,
    /// Lower the training step (forward, backward, update) with these settings, rather than
    /// inference.
    pub training: Option<Training>,
    /// Without `training`: the forward pass in training mode — batch norm with the batch's
    /// statistics (moving statistics updated in place and output), dropout with the mask of
    /// the step in `dropout/step` (advanced by the program) — as `run --train-mode` does.
    pub train_mode: bool,
}

/// The named passes, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PassName {
    Fusion,
    Layout,
    Allocation,
    Tiling,
    Scheduling,
}

impl PassName {
    pub const ALL: [PassName; 5] =
        [PassName::Fusion, PassName::Layout, PassName::Allocation, PassName::Tiling, PassName::Scheduling];

    pub fn name(self) -> &'static str {
        match self {
            PassName::Fusion => "fusion",
            PassName::Layout => "layout",
            PassName::Allocation => "allocation",
            PassName::Tiling => "tiling",
            PassName::Scheduling => "scheduling",
        }
    }

    pub fn parse(s: &str) -> Option<PassName> {
        PassName::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// The compiler's account of one kernel: what it computes, how it was tiled, and its estimate.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub name: String,
    pub ops: String,
    /// How the kernel was lowered (conv strategy, block sizes, unit).
    pub strategy: String,
    /// The matmul shape after padding to the array, e.g. `M 928 x K 64→128 x N 64→128 (9 taps)`.
    pub padded: String,
    /// MXU passes (weight tiles streamed).
    pub mxu_passes: u64,
    /// FLOPs of the graph nodes (2 per multiply-add).
    pub flops: u64,
    /// Multiply-adds the graph asks for.
    pub useful_macs: u64,
    /// Multiply-adds the MXU performs, padding included (`passes × rows × cols × streamed rows`).
    pub padded_macs: u64,
    /// Fraction of the padded MXU work that is padding.
    pub padding_waste: f64,
    /// Estimated cycles of each resource.
    pub mxu_cycles: u64,
    pub hbm_bytes: u64,
    pub dma_cycles: u64,
    pub vpu_cycles: u64,
    /// The compiler's estimate for the kernel (the slowest resource, plus what does not overlap).
    pub estimate_cycles: u64,
    /// The kernel's instructions in the program.
    pub instructions: Range<usize>,
}

/// A compiled graph.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub executable: Executable,
    pub kernels: Vec<KernelReport>,
    /// Text of each pass's result, for `--dump-after`.
    pub dumps: Vec<(PassName, String)>,
    /// Initial values of the state the lowering added (optimizer slots at zero, Adam's powers):
    /// feed them with the model's parameters before the first training step.
    pub initial_state: TensorMap,
}

/// Where a tensor lives: its logical shape and its HBM tile (shared by views).
#[derive(Clone, Debug)]
pub(crate) struct Place {
    pub shape: Vec<usize>,
    pub tile: Tile,
}

/// A tensor's 2-D view: all dimensions but the last as rows.
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        None => (1, 1),
        Some((&last, rest)) => (rest.iter().product::<usize>().max(1), last),
    }
}

/// Compiles `graph` for one core of `opts.machine`: inference, or with `opts.training` the
/// whole training step.
pub fn compile(graph: &Graph, opts: &Options) -> Result<Compiled> {
    let fail = |reason: String| Error::Graph { graph: graph.name().to_string(), reason };
    if opts.batch == 0 {
        return Err(fail("a batch of zero examples cannot be compiled; give --batch 1 or more".into()));
    }
    // The graph the passes see: the training step, or the model with one-hot labels for any loss.
    let (prepared, step) = training::prepare(graph, opts.training.as_ref(), opts.train_mode)?;
    let graph = &prepared;
    let mut dumps = Vec::new();

    // 1. Fusion (and, for training, one update kernel per parameter).
    let mut kernels = fusion::fuse(graph, opts.training.is_some() || opts.train_mode)?;
    for u in &step.updates {
        let name = format!("update/{}", graph.node(u.param).name);
        let nodes = vec![u.param];
        kernels.push(Kernel {
            name,
            main: Main::Update(u.clone()),
            epilogue: Vec::new(),
            nodes,
            output: u.param,
            also: Vec::new(),
            stats_for: None,
        });
    }
    if let Some(&first) = step.state.first() {
        let main = Main::Advance(step.state.clone());
        let name = "update/optimizer state".to_string();
        kernels.push(Kernel {
            name,
            main,
            epilogue: Vec::new(),
            nodes: step.state.clone(),
            output: first,
            also: Vec::new(),
            stats_for: None,
        });
    }
    dumps.push((PassName::Fusion, dump_fusion(graph, &kernels)));

    // 2. Layout: every materialised tensor's shape; views point at their source. Labels are
    // read as their one-hot encoding.
    let mut owner: Vec<Option<NodeId>> = vec![None; graph.len()];
    for (id, node) in graph.nodes() {
        if node.op.is_leaf() && !step.one_hot.contains_key(&id) {
            owner[id.index()] = Some(id);
        }
    }
    for k in kernels.iter().filter(|k| k.allocates() || matches!(k.main, Main::View(_))) {
        owner[k.output.index()] = Some(match k.main {
            Main::View(n) => owner[graph.node(n).inputs[0].index()].expect("views follow their source"),
            _ => k.output,
        });
        for &a in &k.also {
            owner[a.index()] = Some(a);
        }
    }
    let shape_of = |id: NodeId| graph.node(id).shape.concrete(opts.batch);
    dumps.push((PassName::Layout, dump_layout(graph, &kernels, &owner, &shape_of)));

    // 3. Allocation: HBM addresses by liveness.
    // Leaves no output depends on through graph edges but kernels read: one-hot labels.
    let extra_leaves: Vec<NodeId> = step.one_hot.values().copied().collect();
    let scratch = |k: &Kernel| conv_grad::scratch_bytes(graph, k);
    let plan = memory::plan(graph, &kernels, &owner, &shape_of, &opts.machine, &extra_leaves, &scratch)?;
    let places: Vec<Option<Place>> = graph
        .node_ids()
        .map(|id| {
            let o = owner[id.index()]?;
            let offset = plan.offsets[o.index()]?;
            let shape = shape_of(id);
            let (r, c) = rows_cols(&shape);
            Some(Place { tile: Tile::new(Space::Hbm, offset, r, c, DType::F32), shape })
        })
        .collect();
    dumps.push((PassName::Allocation, plan.dump.clone()));

    // 4-5. Tiling and scheduling.
    let extras = emit::Extras {
        one_hot: step.one_hot.clone(),
        optimizer: opts.training.map(|t| t.optimizer),
        state: step.state.clone(),
        dropout_step: step.dropout_step,
        stats: kernels.iter().zip(&plan.stats).filter_map(|(k, &at)| Some((k.stats_for?, at?))).collect(),
    };
    let (program, kernels_out, tiling_dump) =
        emit::emit(graph, &kernels, &places, (&plan.scratch, &plan.stats), opts, &extras)?;
    dumps.push((PassName::Tiling, tiling_dump));
    dumps.push((PassName::Scheduling, program.to_string()));

    let mut bindings = Vec::new();
    for (id, node) in graph.nodes() {
        let role = match &node.op {
            Op::Input(_) => Role::Input,
            Op::Parameter(_) => Role::Parameter,
            _ => continue,
        };
        if let Some(p) = &places[id.index()] {
            bindings.push(Binding { name: node.name.clone(), role, shape: p.shape.clone(), tile: p.tile });
        }
    }
    let output_names = &step.output_names;
    for &out in graph.outputs() {
        let p = places[out.index()].as_ref().expect("outputs are placed");
        let name = output_names.get(&out).cloned().unwrap_or_else(|| graph.node(out).name.clone());
        bindings.push(Binding { name, role: Role::Output, shape: p.shape.clone(), tile: p.tile });
    }
    let executable = Executable { name: graph.name().to_string(), program, bindings, hbm_peak_bytes: plan.peak };
    let added = step.updates.iter().flat_map(|u| &u.slots).chain(&step.state);
    let initial_state =
        added.filter_map(|&id| Some((graph.node(id).name.clone(), graph.init_parameter(id, 0)?))).collect();
    Ok(Compiled { executable, kernels: kernels_out, dumps, initial_state })
}

fn dump_fusion(graph: &Graph, kernels: &[Kernel]) -> String {
    let mut s = format!("{} kernels\n", kernels.len());
    for (i, k) in kernels.iter().enumerate() {
        let names: Vec<&str> = k.nodes.iter().map(|&n| graph.node(n).name.as_str()).collect();
        s += &format!("{i:>4}  {:<28} {:<40} [{}]\n", k.name, k.ops(graph), names.join(", "));
    }
    s
}

fn dump_layout(
    graph: &Graph,
    kernels: &[Kernel],
    owner: &[Option<NodeId>],
    shape_of: &dyn Fn(NodeId) -> Vec<usize>,
) -> String {
    let mut s = String::new();
    for k in kernels {
        for out in std::iter::once(k.output).chain(k.also.iter().copied()) {
            let o = owner[out.index()].expect("placed");
            let shape = shape_of(out);
            let (r, c) = rows_cols(&shape);
            let alias = if o == out { String::new() } else { format!("  (view of {})", graph.node(o).name) };
            s += &format!("{:<28} {:?} as {r} x {c} f32{alias}\n", graph.node(out).name, shape);
        }
    }
    s
}

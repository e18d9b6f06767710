//! The pass pipeline: a list of named passes over one [`Lowering`], each printable with
//! `--dump-after PASS`. A new pass (sharding, storage precision) is one more entry in
//! [`PIPELINE`] and one more module in [`crate::lower::passes`].

use serde::Serialize;
use systolic_simulator::isa::{DType, Program, Space, Tile};

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::lower::emitter::{Context, Extras, Fragment};
use crate::lower::kernel::{Kernel, KernelReport, Place, rows_cols};
use crate::lower::kernels;
use crate::lower::options::Options;
use crate::lower::passes::{allocation, collectives, fusion, layout, scheduling, storage, tiling};
use crate::lower::training::Step;

/// The named passes, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PassName {
    Fusion,
    Layout,
    Storage,
    Allocation,
    Tiling,
    Collectives,
    Scheduling,
}

impl PassName {
    pub const ALL: [PassName; 7] = [
        PassName::Fusion,
        PassName::Layout,
        PassName::Storage,
        PassName::Allocation,
        PassName::Tiling,
        PassName::Collectives,
        PassName::Scheduling,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PassName::Fusion => "fusion",
            PassName::Layout => "layout",
            PassName::Storage => "storage",
            PassName::Allocation => "allocation",
            PassName::Tiling => "tiling",
            PassName::Collectives => "collectives",
            PassName::Scheduling => "scheduling",
        }
    }

    pub fn parse(s: &str) -> Option<PassName> {
        PassName::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// What `--dump-after PASS` shows of a pass's result.
#[derive(Clone, Debug, PartialEq)]
pub enum Dump {
    /// Text the pass wrote as it ran.
    Text(String),
    /// The program's listing, rendered only when asked: for a large program it takes longer
    /// than the rest of the compile (ResNet-50's 86,000 instructions: 70 ms of 90).
    Listing,
}

/// A pass: its name and what it does to the lowering, returning what `--dump-after` shows.
pub(crate) struct Pass {
    pub name: PassName,
    pub run: fn(&mut Lowering) -> Result<Dump>,
}

/// The passes, in order.
pub(crate) const PIPELINE: [Pass; 7] = [
    Pass { name: PassName::Fusion, run: run_fusion },
    Pass { name: PassName::Layout, run: run_layout },
    Pass { name: PassName::Storage, run: run_storage },
    Pass { name: PassName::Allocation, run: run_allocation },
    Pass { name: PassName::Tiling, run: run_tiling },
    Pass { name: PassName::Collectives, run: run_collectives },
    Pass { name: PassName::Scheduling, run: run_scheduling },
];

/// A graph on its way to a program: what each pass has made so far.
pub(crate) struct Lowering<'g> {
    /// The prepared graph (the training step, or the model with one-hot labels).
    pub graph: &'g Graph,
    pub opts: &'g Options,
    pub step: &'g Step,
    /// `fusion`: the kernels, in an order where each kernel's inputs come from earlier ones.
    pub kernels: Vec<Kernel>,
    /// `layout`: the node that owns each node's HBM bytes.
    pub owner: Vec<Option<NodeId>>,
    /// `storage`: each node's element type in HBM.
    pub dtypes: Vec<DType>,
    /// `allocation`: HBM addresses, per-kernel scratch and channel sums, the peak.
    pub plan: Option<allocation::Plan>,
    /// `allocation`: each placed tensor's shape and HBM tile.
    pub places: Vec<Option<Place>>,
    /// `tiling`: each kernel's instructions and report.
    pub fragments: Vec<Fragment>,
    /// `collectives`: a data-parallel step's gradient all-reduce buckets.
    pub buckets: Vec<collectives::Bucket>,
    /// `scheduling`: the program and the kernels' reports.
    pub program: Program,
    pub reports: Vec<KernelReport>,
    /// `scheduling`: the instruction of each bucket's gradient all-reduce.
    pub bucket_instrs: Vec<usize>,
}

impl<'g> Lowering<'g> {
    pub(crate) fn new(graph: &'g Graph, opts: &'g Options, step: &'g Step) -> Lowering<'g> {
        Lowering {
            graph,
            opts,
            step,
            kernels: Vec::new(),
            owner: Vec::new(),
            dtypes: Vec::new(),
            plan: None,
            places: Vec::new(),
            fragments: Vec::new(),
            buckets: Vec::new(),
            program: Program::new(graph.name()),
            reports: Vec::new(),
            bucket_instrs: Vec::new(),
        }
    }

    /// A node's concrete shape at the compiled batch.
    fn shape_of(&self, id: NodeId) -> Vec<usize> {
        self.graph.node(id).shape.concrete(self.opts.batch)
    }

    /// Runs every pass in order; returns each one's dump.
    pub(crate) fn run(&mut self) -> Result<Vec<(PassName, Dump)>> {
        let mut dumps = Vec::with_capacity(PIPELINE.len());
        for pass in &PIPELINE {
            dumps.push((pass.name, (pass.run)(self)?));
        }
        Ok(dumps)
    }
}

fn run_fusion(l: &mut Lowering) -> Result<Dump> {
    let training = l.opts.training.is_some() || l.opts.train_mode;
    l.kernels = fusion::run(l.graph, l.step, training)?;
    Ok(Dump::Text(fusion::dump(l.graph, &l.kernels)))
}

fn run_layout(l: &mut Lowering) -> Result<Dump> {
    l.owner = layout::owners(l.graph, &l.kernels, &l.step.one_hot);
    Ok(Dump::Text(layout::dump(l.graph, &l.kernels, &l.owner, &|id| l.shape_of(id))))
}

fn run_storage(l: &mut Lowering) -> Result<Dump> {
    l.dtypes = storage::dtypes(l.graph, &l.owner, l.opts.activations);
    let bytes_f32 = |id: NodeId| l.shape_of(id).iter().product::<usize>().max(1) as u64 * 4;
    Ok(Dump::Text(storage::dump(l.graph, &l.owner, &l.dtypes, &bytes_f32)))
}

fn run_allocation(l: &mut Lowering) -> Result<Dump> {
    let graph = l.graph;
    // Leaves no output depends on through graph edges but kernels read: one-hot labels.
    let extra_leaves: Vec<NodeId> = l.step.one_hot.values().copied().collect();
    let scratch = |k: &Kernel| kernels::scratch_bytes(graph, k, l.opts);
    let shape_of = |id: NodeId| l.shape_of(id);
    let dtype_of = |id: NodeId| l.dtypes[id.index()];
    let tensors = allocation::Tensors {
        owner: &l.owner,
        shape_of: &shape_of,
        dtype_of: &dtype_of,
        activations: l.opts.activations,
    };
    let plan = allocation::plan(graph, &l.kernels, &tensors, &l.opts.machine, &extra_leaves, &scratch)?;
    l.places = graph
        .node_ids()
        .map(|id| {
            let o = l.owner[id.index()]?;
            let offset = plan.offsets[o.index()]?;
            let shape = l.shape_of(id);
            let (r, c) = rows_cols(&shape);
            Some(Place { tile: Tile::new(Space::Hbm, offset, r, c, l.dtypes[id.index()]), shape })
        })
        .collect();
    let dump = plan.dump.clone();
    l.plan = Some(plan);
    Ok(Dump::Text(dump))
}

fn run_tiling(l: &mut Lowering) -> Result<Dump> {
    let plan = l.plan.as_ref().expect("allocation runs before tiling");
    let extras = Extras {
        one_hot: l.step.one_hot.clone(),
        optimizer: l.opts.training.as_ref().map(|t| t.optimizer.clone()),
        state: l.step.state.clone(),
        dropout_step: l.step.dropout_step,
        stats: l.kernels.iter().zip(&plan.stats).filter_map(|(k, &at)| Some((k.stats_for?, at?))).collect(),
    };
    let cx = Context { graph: l.graph, opts: l.opts, places: &l.places, extras: &extras };
    let (fragments, dump) = tiling::run(&cx, &l.kernels, plan)?;
    l.fragments = fragments;
    Ok(Dump::Text(dump))
}

fn run_collectives(l: &mut Lowering) -> Result<Dump> {
    l.buckets = collectives::buckets(&l.kernels, &l.owner, &l.places, l.opts);
    Ok(Dump::Text(collectives::dump(l.graph, &l.kernels, &l.buckets)))
}

fn run_scheduling(l: &mut Lowering) -> Result<Dump> {
    let (program, reports, bucket_instrs) =
        scheduling::run(l.graph.name(), std::mem::take(&mut l.fragments), &l.buckets);
    (l.program, l.reports, l.bucket_instrs) = (program, reports, bucket_instrs);
    Ok(Dump::Listing)
}

//! Fuzz targets: what users hand the toolchain (model, machine and tensor files, programs,
//! option strings), each a function that must return on any bytes without a panic.
//!
//! Two drivers call them: `fuzz/` (cargo-fuzz, libFuzzer on nightly, for long runs) and
//! `tests/fuzz.rs` (seeds and seeded mutations on stable, in CI); docs/validation.md has the
//! commands and the figures. Errors are the expected outcome for most inputs and are dropped;
//! a panic is a bug. Each target bounds what it runs after parsing so one input stays cheap.

use std::path::Path;
use std::sync::OnceLock;

use crate::compiler::graph::Graph;
use crate::compiler::lower::{self, Options, Training};
use crate::compiler::reference::{self, RunOptions, memory};
use crate::compiler::tensors::{self, Tensor, TensorMap};
use crate::compiler::{autodiff, cost, optimizer, rng, zoo};
use crate::runtime::augment::{Augment, Image};
use crate::runtime::{IterationsPerLoop, RunConfig};
use crate::simulator::config::{MxuTiming, presets};
use crate::simulator::functional::{self, Functional};
use crate::simulator::isa::*;
use crate::simulator::numerics::Precision;
use crate::simulator::{Machine, host, kernels, pod, timing, trace};

/// Graphs at most this many elements (all nodes, batch 1) run on the reference.
const GRAPH_ELEMENTS: u64 = 1 << 17;
/// ... and at most this many FLOPs per example.
const GRAPH_FLOPS: u64 = 1 << 23;

/// A model file (RON text): parsed, written back and parsed again to the same text; its FLOP
/// counts; and, when small, its training graph and a reference run at batch 1.
pub fn graph_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(graph) = Graph::from_ron(text, Path::new("fuzz.ron")) else { return };
    let ron = graph.to_ron();
    let again = Graph::from_ron(&ron, Path::new("fuzz.ron"))
        .unwrap_or_else(|e| panic!("a graph's own RON does not load: {e}\n{ron}"));
    assert_eq!(again.to_ron(), ron, "a graph's RON changes on a round trip");

    for id in graph.node_ids() {
        cost::flops(&graph, id, usize::MAX);
        cost::layer_params(&graph, id);
    }
    if !is_small(&graph) {
        return;
    }
    let _ = autodiff::training_graph(&graph, 0.1);
    let bindings = bindings(&graph, 1);
    let _ = reference::run_outputs(&graph, &bindings, RunOptions::default());
    let _ = reference::run_outputs(&graph, &bindings, RunOptions::training(1));
}

/// Whether a graph is small enough to run (and lower) once per fuzz input.
fn is_small(graph: &Graph) -> bool {
    let flops = cost::flops_per_example(graph);
    let elements = graph.nodes().fold(0u64, |n, (_, node)| n.saturating_add(node.shape.numel() as u64));
    let footprint = memory::footprint(graph, graph.outputs(), 1);
    elements <= GRAPH_ELEMENTS && flops <= GRAPH_FLOPS && footprint.peak.saturating_add(footprint.bound) <= 64 << 20
}

/// A graph's parameters (initialised) and inputs (normal values) at `batch`.
fn bindings(graph: &Graph, batch: usize) -> TensorMap {
    let mut bindings = graph.init_parameters(7);
    for id in graph.inputs() {
        let node = graph.node(id);
        let shape = node.shape.concrete(batch);
        let values = (0..shape.iter().product::<usize>()).map(|i| rng::normal(3, i as u64)).collect();
        bindings.insert(node.name.clone(), Tensor::from_shape_vec(shape, values).expect("numel values"));
    }
    bindings
}

/// A graph decoded from bytes (most mutations of a model file no longer parse, so the
/// lowering would see few graphs otherwise): a small input image, then up to 8 layers, each
/// on an earlier layer's output — convolutions (kernel 1 to 4, stride 1 to 3, valid, same or
/// explicit padding, dilation, groups, depthwise), batch norm, ReLU and ReLU6, max and average
/// pooling, residual adds, concatenation, dropout, global pooling — and a dense classifier.
/// Layers whose shapes do not fit are left out, as the graph builder refuses them.
fn decode_graph(data: &[u8]) -> Option<Graph> {
    use crate::compiler::graph::{BatchNorm, ConvSpec, Padding, Pool};
    let mut r = Reader(data);
    let mut g = Graph::new("fuzz");
    let shape = [1 + r.small(8) as usize, 1 + r.small(8) as usize, 1 + r.small(4) as usize];
    let mut values = vec![g.input("image", &shape).ok()?];
    let padding = |r: &mut Reader| match r.small(3) {
        0 => Padding::Valid,
        1 => Padding::Same,
        _ => Padding::Explicit {
            top: r.small(2) as usize,
            bottom: r.small(2) as usize,
            left: r.small(2) as usize,
            right: r.small(2) as usize,
        },
    };
    for i in 0..1 + r.small(7) {
        let name = format!("n{i}");
        let x = values[r.byte() as usize % values.len()];
        let other = values[r.byte() as usize % values.len()];
        let node = match r.small(10) {
            0 | 1 => {
                let (filters, kernel) = (1 + r.small(7) as usize, 1 + r.small(3) as usize);
                let spec = if r.small(4) == 0 { ConvSpec::depthwise(kernel) } else { ConvSpec::new(filters, kernel) };
                let spec = spec.stride(1 + r.small(2) as usize).padding(padding(&mut r));
                let spec = match r.small(5) {
                    0 => spec.dilation(2),
                    1 => spec.groups(1 + r.small(3) as usize),
                    _ => spec,
                };
                g.conv2d(&name, x, spec)
            }
            2 => g.batch_norm(&name, x, BatchNorm::default()),
            3 => g.relu(&name, x),
            4 => g.relu6(&name, x),
            5 | 6 => {
                let window = [1 + r.small(2) as usize, 1 + r.small(2) as usize];
                let pool = Pool {
                    window,
                    strides: [1 + r.small(2) as usize, 1 + r.small(2) as usize],
                    padding: padding(&mut r),
                };
                if r.byte() & 1 == 0 { g.max_pool(&name, x, pool) } else { g.avg_pool(&name, x, pool) }
            }
            7 => g.add_op(&name, x, other),
            8 => g.concat(&name, &[x, other], -1),
            9 => g.dropout(&name, x, 0.25, u64::from(r.byte())),
            _ => g.global_avg_pool(&name, x),
        };
        if let Ok(node) = node {
            values.push(node);
        }
    }
    let last = *values.last()?;
    let flat = g.flatten("flatten", last).ok()?;
    let logits = g.dense("logits", flat, 2 + r.small(3) as usize).ok()?;
    g.add_output(logits);
    Some(g)
}

/// A model file (or a graph decoded from bytes, when the bytes are not one) lowered, when
/// small, on one v2 core: inference at batch 1 (HIGHEST) and the training step (SGD, the
/// classifier loss added when the graph has none) at batch 2 (DEFAULT, bf16 activations).
/// Whatever compiles must be a valid program that the timing engine schedules; the inference
/// program runs on the functional engine and must give the reference's outputs, and one
/// training step must give the reference's loss and gradients ([`training_step_matches`]).
/// Errors are expected (a graph the lowering does not support says so); a panic, an invalid
/// program or a disagreement with the reference is a bug.
pub fn lowering(data: &[u8]) {
    let parsed = std::str::from_utf8(data).ok().and_then(|text| Graph::from_ron(text, Path::new("fuzz.ron")).ok());
    let Some(graph) = parsed.or_else(|| decode_graph(data)) else { return };
    if !is_small(&graph) {
        return;
    }
    let machine = presets::preset("v2-8").expect("the v2-8 preset");
    // Inference at HIGHEST precision with f32 activations, whose values must match the f32
    // reference's; the training step as TPUs train (DEFAULT, bf16 activations).
    let inference = Options::new(machine.clone(), 1, Precision::Highest);
    let training = Options {
        training: Some(Training { optimizer: optimizer::Optimizer::sgd(0.1), label_smoothing: 0.0 }),
        ..Options::new(machine.clone(), 2, Precision::Default)
    };
    for (opts, run) in [(inference, true), (training, false)] {
        let Ok(compiled) = lower::compile(&graph, &opts) else { continue };
        let program = &compiled.executable.program;
        if let Err(e) = program.validate(&machine) {
            panic!("the lowering emitted an invalid program: {e}");
        }
        let _ = timing::simulate(&machine, program, false);
        if !run {
            continue;
        }
        let bindings = bindings(&graph, opts.batch);
        let Ok(simulated) = compiled.executable.run(&machine, |name| bindings.get(name).and_then(|t| t.as_slice()))
        else {
            continue;
        };
        let Ok((reference, _)) = reference::run_outputs(&graph, &bindings, RunOptions::default()) else { continue };
        for (name, values) in &simulated {
            let Some(want) = reference.get(name) else { continue };
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (i, (&got, &want)) in values.iter().zip(want.iter()).enumerate() {
                // HIGHEST's six bf16 passes carry about 24 bits; sums in another order differ
                // in the last bits of the largest values.
                if !((got - want).abs() <= 1e-4 * scale || (got.is_nan() && want.is_nan())) {
                    panic!("output '{name}'[{i}]: the lowered program gives {got}, the reference {want}");
                }
            }
        }
    }
    training_step_matches(&graph, &machine);
}

/// One SGD step of `graph` (the classifier loss added) at batch 2 on the f32 reference and on
/// one simulated core at HIGHEST precision with f32 activations, which must agree: the loss
/// within 1e-5 of itself, each gradient within 1e-3 of its largest value plus 1e-4 of the
/// largest gradient of all plus 1e-6 (a bias followed by batch norm has a gradient of exactly
/// zero in exact arithmetic, which both compute as rounding noise of the other gradients'
/// size, or of the loss's when every gradient vanishes). A
/// parameter that does not reach the loss has a zero gradient on both.
fn training_step_matches(graph: &Graph, machine: &crate::simulator::Machine) {
    use crate::runtime::{Settings, Target, backend};
    let settings = Settings { precision: Precision::Highest, ..Settings::new(optimizer::Optimizer::sgd(0.1)) };
    let n = 2;
    let params = graph.init_parameters(7);
    let mut batch = bindings(graph, n);
    batch.retain(|name, _| !params.contains_key(name));
    let Some(&logits) = graph.outputs().first() else { return };
    let classes = graph.node(logits).shape.concrete(1).last().copied().unwrap_or(1).max(1);
    let labels = (0..n).map(|i| (i % classes) as f32).collect();
    batch.insert("labels".into(), Tensor::from_shape_vec(vec![n], labels).expect("n labels"));
    let step = |target| backend(target, graph, params.clone(), n, settings.clone())?.train_step(&batch);
    let (Ok(want), Ok(got)) = (step(Target::Cpu), step(Target::Core(machine.clone()))) else { return };
    let (w, l) = (want.loss.unwrap_or(0.0), got.loss.unwrap_or(0.0));
    assert!((w - l).abs() <= 1e-5 * w.abs().max(1.0), "loss: the lowered step gives {l}, the reference {w}");
    let largest = want.outputs.values().flat_map(|g| g.iter()).fold(0f32, |m, v| m.max(v.abs()));
    for (name, want) in &want.outputs {
        let got = got.outputs.get(name).unwrap_or_else(|| panic!("'{name}': the lowered step gives no gradient"));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (&a, &b)) in want.iter().zip(got.iter()).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * scale + 1e-4 * largest + 1e-6,
                "'{name}'[{i}]: the lowered step gives {b}, the reference {a}"
            );
        }
    }
}

/// A machine file (RON text): parsed and validated, written back to an equal machine; its
/// figures, its slice's topology when small, and a tiny matmul timed and run.
pub fn machine_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(machine) = Machine::from_ron(text) else { return };
    let ron = machine.to_ron();
    let again = Machine::from_ron(&ron).unwrap_or_else(|e| panic!("a machine's own RON does not load: {e}\n{ron}"));
    assert_eq!(again, machine, "a machine changes on a RON round trip");
    machine.fields();
    let _ = (machine.peak_flops(), machine.hbm_bytes_per_second(), machine.hosts());
    if machine.cores() <= 64
        && let Ok(topology) = pod::topology::Topology::of(&machine)
    {
        topology.group_sizes();
        let _ = topology.groups(topology.cores());
        topology.route(0, topology.chips() - 1);
    }
    for precision in [Precision::Default, Precision::Highest] {
        let Ok(mm) = kernels::matmul(&machine, 3, 5, 7, precision) else { continue };
        let _ = timing::simulate(&machine, &mm.program, false);
        let mut core = Functional::new(&machine);
        let ones = |t: &Tile| vec![1.0; t.elements() as usize];
        if core.write(mm.a, &ones(&mm.a)).is_ok() && core.write(mm.b, &ones(&mm.b)).is_ok() {
            let _ = core.run(&mm.program);
        }
    }
}

/// A safetensors file: decoded, encoded again to the same bits, and bound as the weights and
/// inputs of digits_cnn, whose reference checks every shape and value before it runs.
pub fn safetensors(data: &[u8]) {
    let Ok((tensors, metadata)) = tensors::from_bytes(Path::new("fuzz.safetensors"), data) else { return };
    let bytes = tensors::to_bytes_with_metadata(&tensors, &metadata);
    let (again, meta) = tensors::from_bytes(Path::new("fuzz.safetensors"), &bytes)
        .unwrap_or_else(|e| panic!("a safetensors file we wrote does not load: {e}"));
    let bits = |m: &TensorMap| -> Vec<(String, Vec<usize>, Vec<u32>)> {
        m.iter().map(|(n, t)| (n.clone(), t.shape().to_vec(), t.iter().map(|v| v.to_bits()).collect())).collect()
    };
    assert!(bits(&again) == bits(&tensors) && meta == metadata, "tensors change on a safetensors round trip");

    static DIGITS: OnceLock<(Graph, TensorMap, TensorMap)> = OnceLock::new();
    let (graph, params, input) = DIGITS.get_or_init(|| {
        let graph = zoo::build("digits_cnn").expect("digits_cnn builds");
        let params = graph.init_parameters(1);
        let input = TensorMap::from([("image".to_string(), Tensor::zeros(vec![1, 8, 8, 1]))]);
        (graph, params, input)
    });
    // The file as weights (over initial values), then as inputs, then as both.
    for (base, over) in [(params, input), (input, params)] {
        let mut bindings = base.clone();
        bindings.extend(over.iter().map(|(n, t)| (n.clone(), t.clone())));
        bindings.extend(tensors.iter().map(|(n, t)| (n.clone(), t.clone())));
        let _ = reference::run_outputs(graph, &bindings, RunOptions::default());
    }
}

/// The machine programs run on: small memories keep the functional engine's allocations
/// small; the first byte picks the MXU size, timing model and buffering.
fn program_machine(byte: u8) -> Machine {
    static BASE: OnceLock<Machine> = OnceLock::new();
    let mut m = BASE
        .get_or_init(|| {
            let mut m = presets::preset("v2-8").expect("v2-8 exists");
            (m.core.hbm.bytes, m.core.vmem_bytes, m.core.mxu.count, m.core.dma.engines) = (1 << 16, 1 << 15, 2, 2);
            m
        })
        .clone();
    m.core.mxu.rows = [4, 8, 16, 8][byte as usize & 3];
    m.core.mxu.cols = [4, 8, 8, 16][byte as usize >> 2 & 3];
    m.core.mxu.timing = if byte & 16 == 0 { MxuTiming::Pipelined } else { MxuTiming::Scalesim };
    m.core.mxu.weight_double_buffering = byte & 32 != 0;
    m.core.vpu.alus = 1 + (byte as usize >> 6);
    m
}

/// Every collective, for decoders to pick from.
const COLLECTIVE_KINDS: [CollectiveKind; 5] = [
    CollectiveKind::AllReduce,
    CollectiveKind::ReduceScatter,
    CollectiveKind::AllGather,
    CollectiveKind::Broadcast,
    CollectiveKind::Shard,
];

/// Bytes read as a program's fields; past the end every byte is 0.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn f32(&mut self) -> f32 {
        f32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    /// A small count, 0 to `max` (0 makes empty tiles the validator must refuse).
    fn small(&mut self, max: u8) -> u32 {
        (self.byte() % (max + 1)) as u32
    }

    fn tile(&mut self, space: Space, rows: u32, cols: u32) -> Tile {
        let flags = self.byte();
        let dtype = if flags & 1 == 0 { DType::F32 } else { DType::Bf16 };
        let space = if flags & 2 == 0 {
            space
        } else if space == Space::Hbm {
            Space::Vmem
        } else {
            Space::Hbm
        };
        // Mostly aligned offsets within the memories; now and then unaligned, past the end or
        // at the top of the address space.
        let offset = match flags >> 5 {
            0 => u64::MAX - u64::from(self.u16()),
            1 => u64::from(self.u16()) * 2 + 1,
            _ => u64::from(self.u16()) * 4 % (1 << 17),
        };
        let stride = match flags >> 2 & 7 {
            0 => cols.saturating_sub(1),
            1 => u32::MAX - self.small(4),
            _ => cols + self.small(3),
        };
        Tile { space, offset, rows, cols, stride, dtype }
    }

    fn vmem(&mut self, rows: u32, cols: u32) -> Tile {
        self.tile(Space::Vmem, rows, cols)
    }

    fn pool_shape(&mut self) -> PoolShape {
        let (n, h, w) = (1 + self.small(2), 1 + self.small(5), 1 + self.small(5));
        let window = [1 + self.small(3), 1 + self.small(3)];
        let strides = [1 + self.small(2), 1 + self.small(2)];
        let pad = [self.small(1), self.small(1)];
        // The output size the geometry gives, or now and then one off.
        let out = |size: u32, win: u32, stride: u32, pad: u32| ((size + 2 * pad).saturating_sub(win)) / stride + 1;
        let skew = self.byte();
        let out_h = (out(h, window[0], strides[0], pad[0]) + u32::from(skew == 1)).saturating_sub(u32::from(skew == 2));
        let out_w = out(w, window[1], strides[1], pad[1]);
        PoolShape { n, h, w, window, strides, pad, out_h, out_w }
    }

    fn operation(&mut self) -> Operation {
        let (r, c) = (self.small(12), self.small(12));
        match self.byte() % 15 {
            0 => {
                let (src, dst) = (self.tile(Space::Hbm, r, c), self.vmem(r, c));
                let repeat = (self.byte() & 1 == 1).then(|| Repeat {
                    count: self.small(3),
                    src_step: u64::from(self.u16()) * 4,
                    dst_step: u64::from(self.u16()) * 4,
                });
                Operation::Dma { engine: self.small(2) as u8, src, dst, repeat }
            }
            1 => {
                let k = self.small(12);
                let precision = [Precision::Default, Precision::High, Precision::Highest][self.small(2) as usize];
                let (lhs, rhs, out) = (self.vmem(r, k), self.vmem(k, c), self.vmem(r, c));
                Operation::MatMul {
                    mxu: self.small(2) as u8,
                    lhs,
                    rhs,
                    out,
                    accumulate: self.byte() & 1 == 1,
                    precision,
                }
            }
            2 => {
                let op = [
                    UnaryOp::Copy,
                    UnaryOp::Relu,
                    UnaryOp::Relu6,
                    UnaryOp::Neg,
                    UnaryOp::Exp,
                    UnaryOp::Log,
                    UnaryOp::Sqrt,
                    UnaryOp::Rsqrt,
                    UnaryOp::Square,
                    UnaryOp::Reciprocal,
                    UnaryOp::Cos,
                ];
                let op = match self.small(12) as usize {
                    11 => UnaryOp::Scale(self.f32()),
                    12 => UnaryOp::AddScalar(self.f32()),
                    i => op[i],
                };
                Operation::Unary { op, src: self.vmem(r, c), dst: self.vmem(r, c) }
            }
            3 | 4 => {
                let (a, dst) = (self.vmem(r, c), self.vmem(r, c));
                let b = match self.small(2) {
                    0 => self.vmem(r, c),
                    1 => self.vmem(1, c),
                    _ => self.vmem(r, 1),
                };
                if self.byte() & 1 == 0 {
                    let ops = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max];
                    let ops = [ops.as_slice(), &[BinaryOp::Min, BinaryOp::MaskPositive, BinaryOp::MaskRelu6]].concat();
                    Operation::Binary { op: ops[self.small(7) as usize], a, b, dst }
                } else {
                    Operation::MulAdd { a, b, acc: dst }
                }
            }
            5 => Operation::Fill { dst: self.vmem(r, c), value: self.f32() },
            6 => {
                let axis = if self.byte() & 1 == 0 { Axis::Rows } else { Axis::Cols };
                let dst = if axis == Axis::Rows { self.vmem(1, c) } else { self.vmem(r, 1) };
                let op = if self.byte() & 1 == 0 { ReduceOp::Sum } else { ReduceOp::Max };
                Operation::Reduce { op, axis, src: self.vmem(r, c), dst }
            }
            7 | 8 => {
                let shape = self.pool_shape();
                let op = if self.byte() & 1 == 0 { PoolOp::Max } else { PoolOp::Avg };
                let input = self.vmem(shape.n * shape.h * shape.w, c);
                let output = self.vmem(shape.n * shape.out_h * shape.out_w, c);
                if self.byte() & 1 == 0 {
                    Operation::Pool { op, shape, src: input, dst: output }
                } else {
                    let x = (self.byte() & 3 != 0).then(|| self.vmem(input.rows, c));
                    Operation::PoolGrad { op, shape, x, dy: output, dst: input }
                }
            }
            9 => Operation::Transpose { src: self.vmem(r, c), dst: self.vmem(c, r) },
            10 => Operation::Dropout {
                seed: u64::from(self.u16()),
                rate: [0.0, 0.5, 0.99, 1.0, -0.1][self.small(4) as usize],
                step: self.vmem(1, 1),
                counter: u64::from(self.u16()) << (self.byte() % 64),
                src: self.vmem(r, c),
                dst: self.vmem(r, c),
            },
            11 => Operation::Barrier,
            12 => {
                let kind = COLLECTIVE_KINDS[self.small(4) as usize];
                let reduction = if self.byte() & 1 == 0 { Reduction::Sum } else { Reduction::Mean };
                let tiles = (0..self.small(2)).map(|_| self.tile(Space::Hbm, r, c)).collect();
                let rows = self.small(12);
                let shard = (self.byte() & 1 == 1).then(|| self.tile(Space::Hbm, rows, c));
                Operation::Collective { kind, reduction, tiles, shard, replicas: self.small(2) }
            }
            13 => Operation::Infeed { dst: self.tile(Space::Hbm, r, c) },
            _ => Operation::Outfeed { src: self.tile(Space::Hbm, r, c) },
        }
    }
}

/// A program decoded from bytes (no file format holds programs: the compiler builds them):
/// validated, and when valid run on the functional engine and timed, with its trace.
pub fn program(data: &[u8]) {
    let mut bytes = Reader(data);
    let machine = program_machine(bytes.byte());
    let mut program = Program::new("fuzz");
    for i in 0..1 + bytes.small(15) {
        let op = bytes.operation();
        let deps: Vec<u32> = (0..bytes.small(2)).map(|_| u32::from(bytes.byte()) % (i + 2)).collect();
        program.push(op, &deps);
    }
    if program.validate(&machine).is_err() {
        return;
    }
    let mut core = Functional::new(&machine);
    core.reserve(functional::footprint(&program, []));
    let _ = core.run(&program);
    if let Ok(timed) = timing::simulate(&machine, &program, true) {
        trace::chrome_trace(&machine, &program, &timed.spans);
    }
}

/// Collectives over a small slice decoded from bytes — 1 to 3 × 1 to 3 chips (each axis a
/// ring or a line) of 1 or 2 cores — then up to four all-reduces, reduce-scatters,
/// all-gathers, broadcasts and shards in a row, of HBM tiles of random shapes and strides
/// (fresh, or one an earlier collective wrote, so results feed the next), over a group size
/// the slice has; each core's HBM starts with its own values. The program must validate, run
/// for values on every core (`pod::slice::run_values`) and be timed (`pod::slice::simulate`);
/// every core's HBM must then hold what the collectives mean, computed here from their
/// definitions on an f64 copy of each core's memory that carries each word's error bound:
/// words moved exactly, sums and means within f32 rounding of the exact sum (any order of the
/// adds) plus the bounds of the words they sum.
pub fn collectives(data: &[u8]) {
    use pod::slice;
    let mut bytes = Reader(data);
    let mut machine = presets::preset("v2-8").expect("v2-8 exists");
    let shape = bytes.byte();
    machine.slice.torus = vec![1 + (shape % 3) as usize, 1 + (shape / 3 % 3) as usize];
    machine.slice.wraparound = vec![shape & 0x20 != 0, shape & 0x40 != 0];
    machine.chip.cores = 1 + (shape >> 7) as usize;
    machine.core.hbm.bytes = 1 << 16;
    let Ok(topology) = pod::topology::Topology::of(&machine) else { return };
    let (cores, sizes) = (topology.cores(), topology.group_sizes());
    // Each tile fills its own 4 KiB region of HBM, so two tiles overlap only if they are one;
    // a collective's tiles must not (the validator refuses that), later ones may reuse them.
    let mut made: Vec<Tile> = Vec::new();
    let mut tile = |bytes: &mut Reader, taken: &[Tile], elements_at_least: u64| {
        let reuse = bytes.byte();
        let old = made.get(reuse as usize / 4 % made.len().max(1)).copied();
        if let Some(t) = old.filter(|t| reuse & 3 == 0 && !taken.contains(t) && t.elements() >= elements_at_least) {
            return t;
        }
        let cols = 1 + bytes.small(8);
        let rows = (1 + bytes.small(5)).max(elements_at_least.div_ceil(u64::from(cols)) as u32);
        let stride = cols + bytes.small(2);
        let t =
            Tile { space: Space::Hbm, offset: (made.len() as u64 + 1) * 4096, rows, cols, stride, dtype: DType::F32 };
        made.push(t);
        t
    };
    let mut program = Program::new("collectives");
    let mut ops = Vec::new();
    for i in 0..1 + bytes.small(3) {
        let kind = COLLECTIVE_KINDS[bytes.small(4) as usize];
        let reduction = if kind.reduces() && bytes.byte() & 1 == 1 { Reduction::Mean } else { Reduction::Sum };
        let replicas = sizes[bytes.byte() as usize % sizes.len()] as u32;
        let mut tiles: Vec<Tile> = Vec::new();
        for _ in 0..1 + bytes.small(1) {
            let t = tile(&mut bytes, &tiles, 0);
            tiles.push(t);
        }
        let elements: u64 = tiles.iter().map(|t| t.elements()).sum();
        let takes_shard = matches!(kind, CollectiveKind::ReduceScatter | CollectiveKind::AllGather);
        let shard = (kind == CollectiveKind::Shard || (takes_shard && bytes.byte() & 1 == 1))
            .then(|| tile(&mut bytes, &tiles, elements.div_ceil(u64::from(replicas))));
        let op = Operation::Collective { kind, reduction, tiles, shard, replicas };
        ops.push(op.clone());
        let deps: Vec<u32> = (i > 0).then(|| i - 1).into_iter().collect();
        program.push(op, &deps);
    }
    program
        .validate(&machine)
        .unwrap_or_else(|e| panic!("collectives built to be valid were refused: {e}\n{program:?}"));
    // Every core's HBM as f32 values (the first 4 KiB region unused), its own values first.
    let words = (made.len() + 1) * 1024;
    let image = |core: usize| -> Vec<f32> {
        (0..words)
            .map(|i| {
                let r = rng::derive(u64::from(shape) << 32 | core as u64, i as u64);
                // Mostly moderate values, now and then an exact zero or a large one (small
                // enough that four sums over 18 cores stay finite in f32).
                match r % 16 {
                    0 => 0.0,
                    1 => ((r >> 8) % 1_000_000) as f32 * 1e25,
                    _ => ((r >> 8) % 20_001) as f32 / 1000.0 - 10.0,
                }
            })
            .collect()
    };
    let whole =
        Tile { space: Space::Hbm, offset: 0, rows: 1, cols: words as u32, stride: words as u32, dtype: DType::F32 };
    let mut engines: Vec<Functional> = (0..cores)
        .map(|c| {
            let mut core = Functional::new(&machine);
            core.reserve(functional::footprint(&program, [&whole]));
            core.write(whole, &image(c)).expect("the image fits HBM");
            core
        })
        .collect();
    slice::run_values(&machine, &program, &mut engines).unwrap_or_else(|e| panic!("a valid program failed: {e}"));
    slice::simulate(&machine, &program, &slice::Hosts::new(1, 1024), &slice::Options::default())
        .unwrap_or_else(|e| panic!("a valid program was not timed: {e}"));
    // The definitions, on each core's copy: each word's value and how far the f32 result may
    // be from it.
    let mut want: Vec<Vec<(f64, f64)>> =
        (0..cores).map(|c| image(c).into_iter().map(|v| (f64::from(v), 0.0)).collect()).collect();
    let at = |t: &Tile| -> Vec<usize> {
        let base = (t.offset / 4) as usize;
        (0..t.rows as usize).flat_map(|r| (0..t.cols as usize).map(move |c| base + r * t.stride as usize + c)).collect()
    };
    let eps = f64::from(f32::EPSILON);
    for op in &ops {
        let Operation::Collective { kind, reduction, tiles, shard, replicas } = op else { unreachable!() };
        let n = *replicas as usize;
        let words_of: Vec<usize> = tiles.iter().flat_map(&at).collect();
        let ranges = pod::collectives::shards(words_of.len(), n);
        for first in (0..cores).step_by(n) {
            let members = first..first + n;
            // Every member's operand, read before any member's result is written.
            let own: Vec<Vec<(f64, f64)>> =
                members.clone().map(|c| words_of.iter().map(|&w| want[c][w]).collect()).collect();
            let result: Vec<(f64, f64)> = match kind {
                CollectiveKind::AllReduce | CollectiveKind::ReduceScatter => {
                    let scale = if *reduction == Reduction::Mean { n as f64 } else { 1.0 };
                    (0..words_of.len())
                        .map(|i| {
                            let (sum, error, magnitude) =
                                own.iter().fold((0.0, 0.0, 0.0), |(s, e, m): (f64, f64, f64), v| {
                                    (s + v[i].0, e + v[i].1, m + v[i].0.abs() + v[i].1)
                                });
                            // n - 1 rounded adds in some order, then the mean's division.
                            let x = sum / scale;
                            (x, (error + (n as f64 + 1.0) * eps * magnitude) / scale + eps * x.abs() + 1e-30)
                        })
                        .collect()
                }
                CollectiveKind::Broadcast => own[0].clone(),
                CollectiveKind::AllGather => {
                    let mut all = vec![(0.0, 0.0); words_of.len()];
                    for (r, range) in ranges.iter().enumerate() {
                        for i in range.clone() {
                            all[i] = match shard {
                                // Member r's shard comes from its shard tile.
                                Some(s) => want[first + r][at(s)[i - range.start]],
                                None => own[r][i],
                            };
                        }
                    }
                    all
                }
                CollectiveKind::Shard => Vec::new(),
            };
            for (r, c) in members.enumerate() {
                let range = ranges[r].clone();
                match (kind, shard) {
                    (CollectiveKind::ReduceScatter, Some(s)) => {
                        for (j, &w) in at(s).iter().take(range.len()).enumerate() {
                            want[c][w] = result[range.start + j];
                        }
                    }
                    (CollectiveKind::Shard, Some(s)) => {
                        for (j, &w) in at(s).iter().take(range.len()).enumerate() {
                            want[c][w] = own[r][range.start + j];
                        }
                    }
                    (CollectiveKind::ReduceScatter, None) => {
                        for i in range {
                            want[c][words_of[i]] = result[i];
                        }
                    }
                    _ => {
                        for (i, &w) in words_of.iter().enumerate() {
                            want[c][w] = result[i];
                        }
                    }
                }
            }
        }
    }
    for (c, engine) in engines.iter_mut().enumerate() {
        let got = engine.read(whole).expect("HBM reads back");
        for (w, (&g, &(x, bound))) in got.iter().zip(&want[c]).enumerate() {
            let ok = if bound == 0.0 { f64::from(g) == x } else { (f64::from(g) - x).abs() <= bound };
            assert!(
                ok,
                "core {c}, HBM word {w}: the slice gives {g}, the collectives' definitions {x} (± {bound})\n{ops:?}"
            );
        }
    }
}

/// The option strings users type: the first byte picks the parser, the rest is its text.
/// Optimizers, schedules, augmentations, run configurations, memory sizes, loop lengths and
/// machine overrides; whatever parses is printed and parsed back, and used once.
pub fn specs(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 7 {
        0 => {
            let _ = optimizer::Optimizer::parse(text, 0.1);
        }
        1 => {
            let Ok(schedule) = optimizer::Schedule::parse(text, 0.1) else { return };
            let again = optimizer::Schedule::parse(&schedule.to_string(), 0.1);
            assert_eq!(again.ok().as_ref(), Some(&schedule), "schedule '{text}' changes when printed as '{schedule}'");
            for step in [0, 1, 1000, u64::MAX] {
                schedule.rate(step);
            }
            let _ = optimizer::Optimizer::sgd(0.1).with_schedule(schedule).check();
        }
        2 => {
            let Ok(augment) = Augment::parse(text) else { return };
            let again = Augment::parse(&augment.to_string());
            assert_eq!(
                again.ok().as_ref(),
                Some(&augment),
                "augmentation '{text}' changes when printed as '{augment}'"
            );
            for channels in [1, 3] {
                if augment.check(channels).is_ok() {
                    let data = (0..36 * channels).map(|i| (i % 7) as f32 / 7.0).collect();
                    let image = Image::new(6, 6, channels, data).expect("a 6x6 image");
                    let _ = augment.apply(&image, 5);
                }
            }
        }
        3 => {
            let Ok(config) = RunConfig::from_ron(text, Path::new("fuzz.ron")) else { return };
            let _ = config.checkpoint_every();
            if let Ok(ron) = config.to_ron() {
                let again = RunConfig::from_ron(&ron, Path::new("fuzz.ron"));
                assert_eq!(again.ok().as_ref(), Some(&config), "a run configuration changes on a RON round trip");
            }
        }
        4 => {
            if let Ok(Some(bytes)) = host::parse_size(text) {
                host::format_bytes(bytes);
            }
        }
        5 => {
            let _ = text.parse::<IterationsPerLoop>();
        }
        _ => {
            static V2: OnceLock<Machine> = OnceLock::new();
            let mut machine = V2.get_or_init(|| presets::preset("v2-8").expect("v2-8 exists")).clone();
            let (field, value) = text.split_once('=').unwrap_or((text, ""));
            if machine.set(field, value).is_ok() {
                machine_file(machine.to_ron().as_bytes());
            }
        }
    }
}

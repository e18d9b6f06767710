//! `systolic run`: evaluate a model on the f32 CPU reference, or compile it for one simulated
//! TPU core and compute the same outputs with bf16 MXU numerics.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use systolic::compiler::reference::{self, Mode, RunOptions};
use systolic::compiler::{Graph, NodeId, Tensor, TensorMap, cost};
use systolic::runtime::session::DROPOUT_STEP;
use systolic::simulator::executable::Role;
use systolic::simulator::timing::simulate;

use crate::table::{Table, si};

#[derive(clap::Args)]
pub struct Args {
    /// A zoo model name or a `.ron` graph.
    model: String,
    /// cpu: the f32 reference; tpu: compile for one simulated core (--machine) and compute the
    /// outputs with its bf16 MXU numerics, reporting the simulated step time too.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    #[command(flatten)]
    target: super::Target,
    /// With --backend tpu.
    #[command(flatten)]
    storage: super::Storage,
    /// Parameter values (safetensors, named `<layer>/<param>`); without it, initialise from --seed.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed for parameter initialisation when no --weights are given.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the parameters used (with batch-norm statistics updated under --train-mode).
    #[arg(long)]
    save_weights: Option<PathBuf>,
    /// Input tensors (safetensors), named after the graph's Input nodes (see `inspect`);
    /// without it, a standard-normal batch of --batch examples drawn from --seed.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Examples in the random batch (when no --input is given).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Where to write every graph output (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Training semantics: batch norm uses batch statistics, dropout is active.
    #[arg(long)]
    train_mode: bool,
    /// Training step mixed into dropout masks (with --train-mode).
    #[arg(long, default_value_t = 0)]
    step: u64,
    /// Time the evaluation over this many runs and report the fastest and the median.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Print where the host's time went (of the last run): on the CPU reference per op kind and
    /// the slowest layers; on the simulated TPU per instruction kind of the functional engine.
    #[arg(long)]
    profile: bool,
    /// Print the timing as JSON (`{"model", "batch", "runs", "min_seconds", "median_seconds"}`).
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq)]
enum Backend {
    Cpu,
    Tpu,
}

pub fn run(args: Args) -> Result<()> {
    super::check_outputs([
        ("--output", Some(args.output.as_path())),
        ("--save-weights", args.save_weights.as_deref()),
    ])?;
    let graph = super::load_model(&args.model)?;
    let file_inputs = args.input.as_deref().map(|path| super::load_inputs(&graph, path)).transpose()?;
    // What the run will hold is checked before the parameters and inputs are made.
    let batch = match &file_inputs {
        Some(inputs) => batch_of(&graph, inputs, args.input.as_deref()).ok(),
        None => Some(args.batch),
    };
    if let Some(batch) = batch.filter(|&b| b > 0) {
        match args.backend {
            Backend::Cpu => super::check_reference_memory(&graph, graph.outputs(), batch)?,
            Backend::Tpu => super::check_leaves_memory(&graph, batch)?,
        }
    }
    let weights = super::load_weights(&graph, args.weights.as_deref(), args.seed)?;
    let inputs = match file_inputs {
        Some(inputs) => inputs,
        None => super::random_inputs(&graph, args.batch, args.seed)?,
    };
    anyhow::ensure!(args.repeat >= 1, "--repeat must be at least 1");
    anyhow::ensure!(
        args.storage.activations.is_none() || matches!(args.backend, Backend::Tpu),
        "--activations sets how the simulated TPU stores activations; the CPU reference keeps f32 (add --backend tpu)"
    );
    if args.backend == Backend::Cpu
        && let Some(option) = args.target.given()
    {
        anyhow::bail!(
            "{option} applies to the simulated TPU, not the CPU reference: add --backend tpu or drop {option}"
        );
    }
    match args.backend {
        Backend::Cpu => run_reference(&args, &graph, weights, inputs),
        Backend::Tpu => run_simulated(&args, &graph, weights, inputs),
    }
}

/// The f32 CPU reference.
fn run_reference(args: &Args, graph: &Graph, weights: TensorMap, inputs: TensorMap) -> Result<()> {
    let mut bindings = weights.clone();
    bindings.extend(inputs);
    let mode = if args.train_mode { Mode::Training } else { Mode::Inference };
    let mut times = Vec::with_capacity(args.repeat);
    let mut result = None;
    for _ in 0..args.repeat {
        let start = Instant::now();
        let ev = reference::run(graph, &bindings, graph.outputs(), RunOptions { mode, step: args.step, bf16: None })
            .map_err(|e| {
                super::blame(e, |name| {
                    super::source_of(graph, name, args.weights.as_deref(), None, args.input.as_deref())
                })
            })?;
        times.push(start.elapsed().as_secs_f64());
        result = Some(ev);
    }
    let mut ev = result.expect("at least one run");
    if args.profile {
        print_profile(graph, &ev.node_seconds, ev.batch);
    }
    let mut outputs = TensorMap::new();
    for &id in graph.outputs() {
        outputs.insert(graph.node(id).name.clone(), ev.take(id).expect("outputs are fetched"));
    }
    let updates = std::mem::take(&mut ev.updates);
    times.sort_by(f64::total_cmp);
    let (min, median) = (times[0], times[times.len() / 2]);
    super::save_tensors(&args.output, &outputs)?;
    let batch = outputs.values().next().and_then(|t| t.shape().first().copied()).unwrap_or(1);
    if args.json {
        let report = serde_json::json!({
            "model": graph.name(), "batch": batch, "runs": args.repeat,
            "min_seconds": min, "median_seconds": median,
        });
        println!("{report}");
    } else {
        for (name, t) in &outputs {
            println!("{name} {:?}", t.shape());
        }
        let timing = timing_text(min, median, args.repeat);
        println!(
            "ran {} (batch {batch}) on the CPU reference: {timing}; wrote {}",
            graph.name(),
            args.output.display()
        );
    }
    save_weights(args, weights, updates)
}

/// Compiles for one core of `--machine` and computes the outputs with the functional simulator.
fn run_simulated(args: &Args, graph: &Graph, weights: TensorMap, inputs: TensorMap) -> Result<()> {
    let (machine, precision) = args.target.resolve()?;
    let activations = args.storage.resolve(precision)?;
    let batch = batch_of(graph, &inputs, args.input.as_deref())?;
    let (compiled, compile_seconds) = super::compile::compile_model(
        &args.model,
        &systolic::compiler::lower::Options {
            train_mode: args.train_mode,
            activations,
            ..systolic::compiler::lower::Options::new(machine.clone(), batch, precision)
        },
    )?;
    let exe = &compiled.executable;
    let mut bindings = weights.clone();
    bindings.extend(inputs);
    // Training mode: dropout draws the mask of `--step`, as the CPU backend does.
    if compiled.initial_state.contains_key(DROPOUT_STEP) {
        bindings.insert(DROPOUT_STEP.into(), Tensor::from_shape_vec(vec![1], vec![args.step as f32])?);
    }
    // The executable checks element counts; check whole shapes here so a mismatch names its file.
    for b in exe.bindings.iter().filter(|b| b.role != Role::Output) {
        let source = super::source_of(graph, &b.name, args.weights.as_deref(), None, args.input.as_deref());
        let file = source.map_or_else(|| "the inputs".to_string(), |p| p.display().to_string());
        match bindings.get(&b.name) {
            None => anyhow::bail!("{file}: has no tensor '{}' (shape {:?})", b.name, b.shape),
            Some(t) if t.shape() != b.shape.as_slice() => {
                anyhow::bail!("{file}: tensor '{}' has shape {:?} but the model needs {:?}", b.name, t.shape(), b.shape)
            }
            Some(_) => {}
        }
    }
    let mut times = Vec::with_capacity(args.repeat);
    let mut result = None;
    let mut profile = Vec::new();
    for _ in 0..args.repeat {
        let start = Instant::now();
        let feed = |name: &str| bindings.get(name).and_then(|t| t.as_slice());
        let got = if args.profile {
            let (got, kinds) = exe.run_profiled(&machine, feed)?;
            profile = kinds;
            got
        } else {
            exe.run(&machine, feed)?
        };
        times.push(start.elapsed().as_secs_f64());
        result = Some(got);
    }
    // The graph's outputs go to --output; in training mode the moving statistics the step
    // updated go to --save-weights (the step counter is the program's own).
    let mut outputs = TensorMap::new();
    let mut updates = TensorMap::new();
    for (name, values) in result.expect("at least one run") {
        let binding = exe.binding(&name, Role::Output).expect("the executable binds its outputs");
        let t = Tensor::from_shape_vec(binding.shape.clone(), values)?;
        if graph.outputs().iter().any(|&o| graph.node(o).name == name) {
            outputs.insert(name, t);
        } else if name != DROPOUT_STEP {
            updates.insert(name, t);
        }
    }
    let report = simulate(&machine, &exe.program, false)?.report;
    times.sort_by(f64::total_cmp);
    let (min, median) = (times[0], times[times.len() / 2]);
    super::save_tensors(&args.output, &outputs)?;
    if args.json {
        let out = serde_json::json!({
            "model": graph.name(), "batch": batch, "backend": "tpu", "machine": machine.name,
            "precision": precision.name(), "runs": args.repeat, "min_seconds": min, "median_seconds": median,
            "compile_seconds": compile_seconds, "simulated_step_seconds": report.seconds,
            "simulated_step_cycles": report.cycles, "mxu_utilization": compiled.mxu_utilization(&machine, report.cycles),
        });
        println!("{out}");
    } else {
        for (name, t) in &outputs {
            println!("{name} {:?}", t.shape());
        }
        println!(
            "ran {} (batch {batch}) on one simulated {} core, precision {}: {:.3} ms simulated step \
             ({} cycles, MXU utilization {:.1}%); wrote {}",
            graph.name(),
            machine.name,
            precision.name(),
            report.seconds * 1e3,
            report.cycles,
            100.0 * compiled.mxu_utilization(&machine, report.cycles),
            args.output.display()
        );
        let timing = timing_text(min, median, args.repeat);
        println!("computing the values on this host took {timing}; compiling {compile_seconds:.3} s");
        if args.profile {
            print_engine_profile(&profile);
        }
    }
    save_weights(args, weights, updates)
}

/// The functional engine's host time per instruction kind, slowest first.
fn print_engine_profile(profile: &[(&'static str, u64, f64)]) {
    let total: f64 = profile.iter().map(|p| p.2).sum();
    let mut rows: Vec<_> = profile.to_vec();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    println!();
    println!("functional engine, host time per instruction kind (last run):");
    let mut table = crate::table::Table::new(&["instruction", "count", "seconds", "share", "us each"]);
    for (kind, count, seconds) in rows {
        table.row(vec![
            kind.to_string(),
            crate::table::thousands(count),
            format!("{seconds:.3}"),
            format!("{:.1}%", 100.0 * seconds / total.max(f64::MIN_POSITIVE)),
            format!("{:.1}", 1e6 * seconds / count.max(1) as f64),
        ]);
    }
    print!("{}", table.render());
}

/// Wall time of `repeat` runs, as printed.
fn timing_text(min: f64, median: f64, repeat: usize) -> String {
    if repeat > 1 {
        format!("median {median:.3} s, fastest {min:.3} s of {repeat} runs")
    } else {
        format!("{min:.3} s")
    }
}

/// `--save-weights`: the parameters used, with what the run updated (moving statistics).
fn save_weights(args: &Args, mut weights: TensorMap, updates: TensorMap) -> Result<()> {
    if let Some(path) = &args.save_weights {
        weights.extend(updates);
        super::save_tensors(path, &weights)?;
        if !args.json {
            println!("wrote weights to {}", path.display());
        }
    }
    Ok(())
}

/// The batch the inputs carry: the leading dimension every batched input agrees on.
fn batch_of(graph: &Graph, inputs: &TensorMap, file: Option<&std::path::Path>) -> Result<usize> {
    let file = file.map_or_else(|| "the inputs".to_string(), |p| p.display().to_string());
    let mut batch = None;
    for id in graph.inputs() {
        let node = graph.node(id);
        let Some(t) = inputs.get(&node.name) else {
            anyhow::bail!("{file}: has no tensor '{}' (input of shape {})", node.name, node.shape);
        };
        if !node.shape.batched {
            continue;
        }
        let Some(&b) = t.shape().first() else {
            anyhow::bail!("{file}: tensor '{}' is a scalar but the input is batched", node.name);
        };
        match batch {
            None => batch = Some(b),
            Some(prev) if prev != b => {
                anyhow::bail!("{file}: tensor '{}' has batch {b} but another input has batch {prev}", node.name)
            }
            Some(_) => {}
        }
    }
    batch.ok_or_else(|| anyhow::anyhow!("{file}: the model has no batched input to size the batch from"))
}

/// Time per op kind and the ten slowest layers, with achieved FLOP rates.
pub(super) fn print_profile(graph: &Graph, node_seconds: &[(NodeId, f64)], batch: usize) {
    let total: f64 = node_seconds.iter().map(|(_, s)| s).sum();
    let mut kinds: Vec<(&str, f64, usize)> = Vec::new();
    for &(id, secs) in node_seconds {
        let kind = graph.node(id).op.kind();
        match kinds.iter_mut().find(|k| k.0 == kind) {
            Some(k) => {
                k.1 += secs;
                k.2 += 1;
            }
            None => kinds.push((kind, secs, 1)),
        }
    }
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut t = Table::new(&["op", "nodes", "seconds", "share"]);
    for (kind, secs, count) in &kinds {
        t.row(vec![kind.to_string(), count.to_string(), format!("{secs:.4}"), format!("{:.1}%", 100.0 * secs / total)]);
    }
    print!("{}", t.render());
    let mut slow = node_seconds.to_vec();
    slow.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut t = Table::new(&["slowest layer", "op", "seconds", "FLOP/s"]);
    for &(id, secs) in slow.iter().take(10) {
        let n = graph.node(id);
        t.row(vec![
            n.name.clone(),
            n.op.kind().to_string(),
            format!("{secs:.4}"),
            si(cost::flops(graph, id, batch) as f64 / secs),
        ]);
    }
    print!("{}", t.render());
}

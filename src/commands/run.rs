//! `systolic run`: evaluate a model on the f32 CPU reference.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use systolic::compiler::reference::{self, Mode, RunOptions};
use systolic::compiler::{Graph, NodeId, TensorMap, cost};

use crate::table::{Table, si};

#[derive(clap::Args)]
pub struct Args {
    /// A zoo model name or a `.ron` graph.
    model: String,
    /// Parameter values (safetensors, named `<layer>/<param>`); without it, initialise from --seed.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed for parameter initialisation when no --weights are given.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the parameters used (with batch-norm statistics updated under --train-mode).
    #[arg(long)]
    save_weights: Option<PathBuf>,
    /// Input tensors (safetensors), named after the graph's Input nodes (see `inspect`).
    #[arg(long)]
    input: PathBuf,
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
    /// Print where the time went: per op kind and the slowest layers (of the last run).
    #[arg(long)]
    profile: bool,
    /// Print the timing as JSON (`{"model", "batch", "runs", "min_seconds", "median_seconds"}`).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let graph = super::load_model(&args.model)?;
    let mut weights = super::load_weights(&graph, args.weights.as_deref(), args.seed)?;
    let inputs = super::load_inputs(&args.input)?;
    let mut bindings = weights.clone();
    bindings.extend(inputs);
    let mode = if args.train_mode { Mode::Training } else { Mode::Inference };
    anyhow::ensure!(args.repeat >= 1, "--repeat must be at least 1");
    let mut times = Vec::with_capacity(args.repeat);
    let mut result = None;
    for _ in 0..args.repeat {
        let start = Instant::now();
        let ev =
            reference::run(&graph, &bindings, graph.outputs(), RunOptions { mode, step: args.step }).map_err(|e| {
                super::blame(e, |name| super::source_of(&graph, name, args.weights.as_deref(), None, &args.input))
            })?;
        times.push(start.elapsed().as_secs_f64());
        result = Some(ev);
    }
    let mut ev = result.expect("at least one run");
    if args.profile {
        print_profile(&graph, &ev.node_seconds, ev.batch);
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
        let timing = if args.repeat > 1 {
            format!("median {median:.3} s, fastest {min:.3} s of {} runs", args.repeat)
        } else {
            format!("{min:.3} s")
        };
        println!(
            "ran {} (batch {batch}) on the CPU reference: {timing}; wrote {}",
            graph.name(),
            args.output.display()
        );
    }
    if let Some(path) = &args.save_weights {
        weights.extend(updates);
        super::save_tensors(path, &weights)?;
        if !args.json {
            println!("wrote weights to {}", path.display());
        }
    }
    Ok(())
}

/// Time per op kind and the ten slowest layers, with achieved FLOP rates.
fn print_profile(graph: &Graph, node_seconds: &[(NodeId, f64)], batch: usize) {
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

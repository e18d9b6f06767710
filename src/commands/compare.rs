//! `systolic compare`: the simulated TPU (bf16 MXU numerics) against the f32 CPU reference —
//! how close the values are, and how the reference's wall time compares with simulated time.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use systolic::compiler::Tensor;
use systolic::compiler::reference::{self, RunOptions};
use systolic::simulator::timing::simulate;

use crate::table::Table;

#[derive(clap::Args)]
pub struct Args {
    /// A zoo model name or a `.ron` graph.
    model: String,
    #[command(flatten)]
    target: super::Target,
    /// Parameter values (safetensors); without it, initialise from --seed.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed for parameters (and for the random input when no --input is given).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Input tensors (safetensors); without it, a random batch of --batch examples.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Examples in the random batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Agreement {
    name: String,
    max_abs_error: f64,
    /// Largest error relative to the largest reference magnitude.
    max_rel_error: f64,
    cosine: f64,
    /// For [batch, classes] outputs: fraction of examples whose argmax agrees.
    top1_agreement: Option<f64>,
}

fn agreement(name: &str, want: &Tensor, got: &[f32]) -> Agreement {
    let w: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let g: Vec<f64> = got.iter().map(|&v| v as f64).collect();
    let scale = w.iter().fold(0f64, |a, v| a.max(v.abs())).max(f64::MIN_POSITIVE);
    let max_abs = w.iter().zip(&g).fold(0f64, |a, (x, y)| a.max((x - y).abs()));
    let dot: f64 = w.iter().zip(&g).map(|(x, y)| x * y).sum();
    let norm = (w.iter().map(|x| x * x).sum::<f64>() * g.iter().map(|y| y * y).sum::<f64>()).sqrt();
    let top1 = (want.ndim() == 2 && want.shape()[1] > 1).then(|| {
        let c = want.shape()[1];
        let argmax = |row: &[f64]| {
            row.iter().enumerate().fold((0, f64::NEG_INFINITY), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0
        };
        let rows = w.len() / c;
        let same = (0..rows).filter(|&r| argmax(&w[r * c..(r + 1) * c]) == argmax(&g[r * c..(r + 1) * c])).count();
        same as f64 / rows as f64
    });
    Agreement {
        name: name.to_string(),
        max_abs_error: max_abs,
        max_rel_error: max_abs / scale,
        cosine: if norm > 0.0 { dot / norm } else { 1.0 },
        top1_agreement: top1,
    }
}

pub fn run(args: Args) -> Result<()> {
    let (machine, precision) = args.target.resolve()?;
    let graph = super::load_model(&args.model)?;
    let weights = super::load_weights(&graph, args.weights.as_deref(), args.seed)?;
    let inputs = match &args.input {
        Some(path) => super::load_inputs(path)?,
        None => super::random_inputs(&graph, args.batch, args.seed)?,
    };
    let batch = inputs.values().next().and_then(|t| t.shape().first().copied()).unwrap_or(args.batch);
    let mut bindings = weights;
    bindings.extend(inputs);

    let start = Instant::now();
    let (want, _) = reference::run_outputs(&graph, &bindings, RunOptions::default())
        .map_err(|e| super::blame(e, |_| args.input.as_deref()))?;
    let cpu_seconds = start.elapsed().as_secs_f64();

    let (compiled, compile_seconds) = super::compile::compile_model(&args.model, &machine, batch, precision, false)?;
    let start = Instant::now();
    let got = compiled.executable.run(&machine, |name| bindings.get(name).and_then(|t| t.as_slice()))?;
    let functional_seconds = start.elapsed().as_secs_f64();
    let timing = simulate(&machine, &compiled.executable.program, false)?;
    let r = &timing.report;

    let results: Vec<Agreement> = got.iter().map(|(name, values)| agreement(name, &want[name], values)).collect();
    if args.json {
        let out = serde_json::json!({
            "model": graph.name(), "machine": machine.name, "batch": batch, "precision": precision.name(),
            "outputs": results, "cpu_reference_seconds": cpu_seconds, "simulated_seconds": r.seconds,
            "simulated_cycles": r.cycles, "functional_simulation_seconds": functional_seconds,
            "compile_seconds": compile_seconds, "mxu_utilization": r.mxu_utilization,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} at batch {batch}: simulated {} core ({} precision) against the f32 CPU reference",
        graph.name(),
        machine.name,
        precision.name()
    );
    let mut t = Table::new(&["output", "max abs error", "max rel error", "cosine", "top-1 agreement"]);
    for a in &results {
        t.row(vec![
            a.name.clone(),
            format!("{:.3e}", a.max_abs_error),
            format!("{:.3e}", a.max_rel_error),
            format!("{:.6}", a.cosine),
            a.top1_agreement.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
        ]);
    }
    print!("{}", t.render());
    println!();
    println!("CPU reference     {:.3} ms wall time on this host", cpu_seconds * 1e3);
    println!(
        "simulated TPU     {:.3} ms ({} cycles on one {} core, MXU utilization {:.1}%)",
        r.seconds * 1e3,
        r.cycles,
        machine.name,
        100.0 * r.mxu_utilization
    );
    println!(
        "                  (the functional simulation computing those values took {:.3} s; compiling {:.3} s)",
        functional_seconds, compile_seconds
    );
    Ok(())
}

//! `systolic run`: evaluate a model on the f32 CPU reference.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use systolic::compiler::reference::{self, Mode, RunOptions};

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
}

pub fn run(args: Args) -> Result<()> {
    let graph = super::load_model(&args.model)?;
    let mut weights = super::load_weights(&graph, args.weights.as_deref(), args.seed)?;
    let inputs = super::load_inputs(&args.input)?;
    let mut bindings = weights.clone();
    bindings.extend(inputs);
    let mode = if args.train_mode {
        Mode::Training
    } else {
        Mode::Inference
    };
    let start = Instant::now();
    let files = [("inputs", args.input.as_path())];
    let (outputs, updates) = reference::run_outputs(
        &graph,
        &bindings,
        RunOptions {
            mode,
            step: args.step,
        },
    )
    .map_err(|e| super::blame(e, &graph, &files))?;
    let elapsed = start.elapsed();
    super::save_tensors(&args.output, &outputs)?;
    for (name, t) in &outputs {
        println!("{name} {:?}", t.shape());
    }
    println!(
        "ran {} on the CPU reference in {:.3} s; wrote {}",
        graph.name(),
        elapsed.as_secs_f64(),
        args.output.display()
    );
    if let Some(path) = &args.save_weights {
        weights.extend(updates);
        super::save_tensors(path, &weights)?;
        println!("wrote weights to {}", path.display());
    }
    Ok(())
}

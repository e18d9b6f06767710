//! The `systolic` command line: compile, simulate and compare models on TPU-like machines.
//!
//! Each subcommand lives in `commands/`; this file only parses arguments and reports errors as
//! one line (`error: ...`) with a non-zero exit status.

mod commands;
mod progress;
mod table;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "systolic",
    version,
    about = "A TPU-style accelerator toolchain: models, CPU reference, machines, MXU simulation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Memory the value engines may use (CPU reference, functional engine, MXU kernels), e.g.
    /// 64GiB, 500MB or 'none' to check nothing; by default what this host has available.
    /// Runs that would need more are refused before they allocate.
    #[arg(long, global = true, value_name = "SIZE", value_parser = memory_limit)]
    memory_limit: Option<MemoryLimit>,
    /// Refuse tensor files with tensors stored in another type than f32 or tensors the model
    /// does not use (by default each is a note on stderr).
    #[arg(long, global = true)]
    strict: bool,
}

/// A parsed `--memory-limit` (`None`: check nothing).
#[derive(Clone, Copy)]
struct MemoryLimit(Option<u64>);

fn memory_limit(text: &str) -> Result<MemoryLimit, String> {
    systolic::simulator::host::parse_size(text).map(MemoryLimit)
}

#[derive(Subcommand)]
enum Command {
    /// List the model zoo: parameters, FLOPs per example, input shape.
    Zoo(commands::zoo::Args),
    /// Show a model layer by layer: op, output shape, parameters, FLOPs.
    Inspect(commands::inspect::Args),
    /// Write a model as a `.ron` graph file to start from.
    Export(commands::export::Args),
    /// Evaluate a model and write every graph output: on the f32 CPU reference or a simulated TPU core.
    Run(commands::run::Args),
    /// Write the loss and the gradient of every parameter and input.
    Grad(commands::grad::Args),
    /// List the machine presets, show one machine with the source of every figure, or (`--ron`) write it as a file to edit.
    Machines(commands::machines::Args),
    /// Run one matmul on a core's MXUs: cycles, utilisation and why.
    Mxu(commands::mxu::Args),
    /// Lower a model for one core: per layer padded shapes, passes, estimate and simulated cycles.
    Compile(commands::compile::Args),
    /// Simulate one step of a model on a whole slice: step time, examples/s, the shares of compute, all-reduce, infeed and host; one core's units.
    Simulate(commands::simulate::Args),
    /// One step of a model on slices of growing size: throughput, scaling efficiency and where the time goes.
    Scale(commands::scale::Args),
    /// Compare the simulated TPU (bf16 MXU) against the f32 CPU reference, in values and speed.
    Compare(commands::compare::Args),
    /// Time one collective over every chip of a slice on the ICI network model, against its closed form.
    Collective(commands::collective::Args),
    /// Train a model with the TPUEstimator on a simulated slice (or --cpu), in loops, with checkpoints in --model-dir.
    Train(commands::estimator::TrainArgs),
    /// Evaluate the newest checkpoint in --model-dir: loss, top-1 and top-5 accuracy.
    Evaluate(commands::estimator::EvaluateArgs),
    /// Predict with the newest checkpoint in --model-dir and write the outputs.
    Predict(commands::estimator::PredictArgs),
    /// Write a grid of images from a data set with augmented views of each (PNG).
    Augment(commands::estimator::AugmentArgs),
    /// Measure this host's input pipeline (read, augment, batch) in examples/s, for simulate --input-rate.
    DataBench(commands::data_bench::Args),
}

/// Integer options (counts, sizes, seeds) refuse fractions, exponents and signs with a
/// message that says so, instead of the integer parser's "invalid digit found in string".
fn counts_explained(e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::num::IntErrorKind;
    let Some(parse) = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::num::ParseIntError>()) else {
        return e;
    };
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) =
        (e.get(ContextKind::InvalidArg), e.get(ContextKind::InvalidValue))
    else {
        return e;
    };
    let why = match parse.kind() {
        IntErrorKind::PosOverflow => "too large for this option".to_string(),
        IntErrorKind::Empty => "empty: give a whole number".to_string(),
        _ if value.trim_start().starts_with('-') => "a negative number: this option takes 0 or more".to_string(),
        _ if value.contains(['.', 'e', 'E']) => {
            "not a whole number: this option counts (write 1000, not 1e3 or 2.5)".to_string()
        }
        _ => "not a whole number".to_string(),
    };
    Cli::command().error(ErrorKind::ValueValidation, format!("invalid value '{value}' for '{arg}': {why}"))
}

fn main() {
    // Die quietly on a closed pipe (`systolic inspect resnet50 | head`) like other Unix tools,
    // instead of panicking in `println!`.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Negative numbers are values, never options (`--batch -1` is then refused by the option's
    // own check, naming it, instead of clap's hint to write `-- -1`).
    let mut command = Cli::command();
    let names: Vec<String> = command.get_subcommands().map(|s| s.get_name().to_string()).collect();
    for name in names {
        command = command.mut_subcommand(name, |s| s.allow_negative_numbers(true));
    }
    let matches = command.try_get_matches().unwrap_or_else(|e| counts_explained(e).exit());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    commands::set_strict(cli.strict);
    if let Some(MemoryLimit(limit)) = cli.memory_limit {
        systolic::simulator::host::set_limit(limit);
    }
    // Long runs of the value engines show a bar (training draws its own, per step).
    if matches!(cli.command, Command::Run(_) | Command::Grad(_) | Command::Compare(_)) {
        progress::install();
    }
    let result = match cli.command {
        Command::Zoo(a) => commands::zoo::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Export(a) => commands::export::run(a),
        Command::Run(a) => commands::run::run(a),
        Command::Grad(a) => commands::grad::run(a),
        Command::Machines(a) => commands::machines::run(a),
        Command::Mxu(a) => commands::mxu::run(a),
        Command::Compile(a) => commands::compile::run(a),
        Command::Simulate(a) => commands::simulate::run(a),
        Command::Scale(a) => commands::scale::run(a),
        Command::Compare(a) => commands::compare::run(a),
        Command::Collective(a) => commands::collective::run(a),
        Command::Train(a) => commands::estimator::train(a),
        Command::Evaluate(a) => commands::estimator::evaluate(a),
        Command::Predict(a) => commands::estimator::predict(a),
        Command::Augment(a) => commands::estimator::augment(a),
        Command::DataBench(a) => commands::data_bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

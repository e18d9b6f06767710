//! `systolic compare`: the simulated TPU (bf16 MXU numerics) against the f32 CPU reference —
//! how close the values are, and how the reference's wall time compares with simulated time.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use systolic::compiler::reference::{self, RunOptions};
use systolic::compiler::{Tensor, TensorMap, autodiff, rng};
use systolic::runtime::session;
use systolic::simulator::timing::simulate;

use crate::table::Table;

#[derive(clap::Args)]
pub struct Args {
    /// A zoo model name or a `.ron` graph.
    model: String,
    #[command(flatten)]
    target: super::Target,
    #[command(flatten)]
    storage: super::Storage,
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
    #[command(flatten)]
    train: super::compile::TrainArgs,
    /// With --train: integer class ids (safetensors, named after the labels input, e.g.
    /// `labels`); without it, random labels drawn from --seed.
    #[arg(long)]
    labels: Option<PathBuf>,
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
    /// With bf16 storage, the error split in two: the reference with the same tensors rounded
    /// to bf16 as they are stored, against the f32 reference (storage alone) ...
    #[serde(skip_serializing_if = "Option::is_none")]
    storage: Option<Part>,
    /// ... and the simulated TPU against that reference (bf16 multiplication alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    multiplication: Option<Part>,
}

/// One source of error: max error relative to the largest magnitude, and cosine.
#[derive(Serialize)]
struct Part {
    max_rel_error: f64,
    cosine: f64,
}

impl From<Agreement> for Part {
    fn from(a: Agreement) -> Part {
        Part { max_rel_error: a.max_rel_error, cosine: a.cosine }
    }
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
        storage: None,
        multiplication: None,
    }
}

pub fn run(args: Args) -> Result<()> {
    let (machine, precision) = args.target.resolve()?;
    let activations = args.storage.resolve(precision)?;
    let graph = super::load_model(&args.model)?;
    let file_inputs = args.input.as_deref().map(|path| super::load_inputs(&graph, path)).transpose()?;
    let batch = file_inputs
        .as_ref()
        .and_then(|inputs| inputs.values().next().and_then(|t| t.shape().first().copied()))
        .unwrap_or(args.batch);
    // The reference's run (the simulated core checks its own) before anything is made.
    if batch > 0 {
        super::check_reference_memory(&graph, graph.outputs(), batch)?;
    }
    let weights = super::load_weights(&graph, args.weights.as_deref(), args.seed)?;
    let inputs = match file_inputs {
        Some(inputs) => inputs,
        None => super::random_inputs(&graph, args.batch, args.seed)?,
    };
    let mut bindings = weights;
    bindings.extend(inputs);

    // What the reference computes: the outputs, or (training) the loss and every gradient.
    let training = args.train.training()?;
    if training.is_none() && args.labels.is_some() {
        anyhow::bail!("--labels applies to a training step: add --train or drop --labels");
    }
    let grads = match training {
        None => None,
        Some(_) => {
            let (g, loss) = graph.with_classifier_loss(0.0)?;
            let labels_name = g.node(g.node(loss).inputs[1]).name.clone();
            let classes = *g.node(g.node(loss).inputs[0]).shape.dims.last().expect("logits have classes");
            let labels = match &args.labels {
                Some(path) => super::load_labels(path, &labels_name)?,
                None => {
                    let key = rng::derive(args.seed, rng::hash_str(&labels_name));
                    let ids = (0..batch).map(|i| (rng::uniform(key, i as u64) * classes as f32).floor() as f32);
                    Tensor::from_shape_vec(vec![batch], ids.map(|v| v.min(classes as f32 - 1.0)).collect())?
                }
            };
            bindings.insert(labels_name, labels);
            let loss_name = g.node(loss).name.clone();
            Some((autodiff::differentiate(&g, loss, &g.trainable_parameters())?, loss_name))
        }
    };
    // The reference's values, with every value f32 or with the compiled program's bf16 tensors
    // rounded as they are stored.
    let reference_values = |bf16: Option<&BTreeSet<String>>| -> Result<TensorMap> {
        let blame = |e| super::blame(e, |_| args.labels.as_deref().or(args.input.as_deref()));
        Ok(match &grads {
            None => {
                reference::run_outputs(&graph, &bindings, RunOptions { bf16, ..RunOptions::default() })
                    .map_err(blame)?
                    .0
            }
            Some((grads, loss_name)) => {
                let values = reference::run_gradients(grads, &bindings, RunOptions { bf16, ..RunOptions::training(0) })
                    .map_err(blame)?;
                let mut want = TensorMap::new();
                want.insert(loss_name.clone(), values.root);
                for (name, t) in values.grads {
                    want.insert(session::grad_name(&name), t);
                }
                // Batch norm's moving statistics after the step.
                want.extend(values.updates);
                want
            }
        })
    };
    let start = Instant::now();
    let want = reference_values(None)?;
    let cpu_seconds = start.elapsed().as_secs_f64();

    let (compiled, compile_seconds) = super::compile::compile_model(
        &args.model,
        &systolic::compiler::lower::Options {
            training: training.clone(),
            activations,
            ..systolic::compiler::lower::Options::new(machine.clone(), batch, precision)
        },
    )?;
    let bf16_tensors = compiled.bf16_tensors();
    let stored = if bf16_tensors.is_empty() { None } else { Some(reference_values(Some(&bf16_tensors))?) };
    let mut feed = session::one_hot_labels(&compiled.executable, &bindings)?;
    feed.extend(compiled.initial_state.clone());
    let start = Instant::now();
    let got = compiled
        .executable
        .run(&machine, |name| feed.get(name).or_else(|| bindings.get(name)).and_then(|t| t.as_slice()))?;
    let functional_seconds = start.elapsed().as_secs_f64();
    let timing = simulate(&machine, &compiled.executable.program, false)?;
    let r = &timing.report;

    // Compare what both computed (a training step's updated parameters have no reference here).
    let got: Vec<(String, Vec<f32>)> = got.into_iter().filter(|(name, _)| want.contains_key(name)).collect();
    let mut results: Vec<Agreement> = got
        .iter()
        .map(|(name, values)| {
            let mut a = agreement(name, &want[name], values);
            if let Some(stored) = &stored {
                let s = &stored[name];
                a.storage = Some(agreement(name, &want[name], s.as_slice().expect("standard layout")).into());
                a.multiplication = Some(agreement(name, s, values).into());
            }
            a
        })
        .collect();
    if training.is_some() {
        // Gradients have no classes to agree on.
        results.iter_mut().for_each(|a| a.top1_agreement = None);
    }
    if args.json {
        let out = serde_json::json!({
            "model": graph.name(), "machine": machine.name, "batch": batch, "precision": precision.name(),
            "outputs": results, "cpu_reference_seconds": cpu_seconds, "simulated_seconds": r.seconds,
            "simulated_cycles": r.cycles, "functional_simulation_seconds": functional_seconds,
            "compile_seconds": compile_seconds, "mxu_utilization": compiled.mxu_utilization(&machine, r.cycles),
            "training": training.is_some(), "activations": super::compile::dtype_name(activations),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let what = if training.is_some() { "training step (loss and gradients)" } else { "outputs" };
    println!(
        "{} at batch {batch}, {what}: simulated {} core ({} precision) against the f32 CPU reference",
        graph.name(),
        machine.name,
        precision.name()
    );
    let split = stored.is_some();
    let mut header = vec!["output", "max abs error", "max rel error", "cosine", "top-1 agreement"];
    if split {
        header.extend(["storage: rel error", "cosine", "multiply: rel error", "cosine"]);
    }
    let mut t = Table::new(&header);
    for a in &results {
        let mut row = vec![
            a.name.clone(),
            format!("{:.3e}", a.max_abs_error),
            format!("{:.3e}", a.max_rel_error),
            format!("{:.6}", a.cosine),
            a.top1_agreement.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
        ];
        for part in [&a.storage, &a.multiplication].into_iter().flatten() {
            row.extend([format!("{:.3e}", part.max_rel_error), format!("{:.6}", part.cosine)]);
        }
        t.row(row);
    }
    print!("{}", t.render());
    if split {
        println!(
            "activations in bf16: storage = the reference with the same {} tensors rounded to bf16 as they are \
             stored, against f32; multiply = the simulated TPU against that reference (bf16 MXU products)",
            bf16_tensors.len()
        );
    }
    println!();
    println!("CPU reference     {:.3} ms wall time on this host", cpu_seconds * 1e3);
    println!(
        "simulated TPU     {:.3} ms ({} cycles on one {} core, MXU utilization {:.1}%)",
        r.seconds * 1e3,
        r.cycles,
        machine.name,
        100.0 * compiled.mxu_utilization(&machine, r.cycles)
    );
    println!(
        "                  (the functional simulation computing those values took {:.3} s; compiling {:.3} s)",
        functional_seconds, compile_seconds
    );
    Ok(())
}

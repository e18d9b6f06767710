//! `systolic grad`: the loss and its gradient for every parameter and input, on the CPU reference.

use std::path::PathBuf;

use anyhow::Result;
use systolic::compiler::autodiff;
use systolic::compiler::reference::{self, Mode, RunOptions};

#[derive(clap::Args)]
pub struct Args {
    /// A zoo model name or a `.ron` graph.
    model: String,
    /// Parameter values (safetensors); without it, initialise from --seed.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed for parameter initialisation when no --weights are given.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Input tensors (safetensors), named after the graph's Input nodes.
    #[arg(long)]
    input: PathBuf,
    /// Integer class labels, one per example (a tensor named `labels`, or the file's only tensor).
    #[arg(long)]
    labels: PathBuf,
    /// Where to write `loss` and the gradients (named like the parameters and inputs).
    #[arg(long)]
    output: PathBuf,
    /// Label smoothing of the cross-entropy loss added to the model's logits.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// Differentiate with inference semantics (moving batch-norm statistics, no dropout).
    #[arg(long)]
    inference_mode: bool,
    /// Training step mixed into dropout masks.
    #[arg(long, default_value_t = 0)]
    step: u64,
    /// Print the host time per op kind and the slowest nodes of the forward and backward pass.
    #[arg(long)]
    profile: bool,
}

pub fn run(args: Args) -> Result<()> {
    super::check_outputs([("--output", Some(args.output.as_path()))])?;
    let model = super::load_model(&args.model)?;
    let train = autodiff::training_graph(&model, args.label_smoothing)?;
    let graph = &train.graph;
    let inputs = super::load_inputs(&model, &args.input)?;
    let batch = model.inputs().into_iter().find_map(|id| inputs.get(&model.node(id).name)?.shape().first().copied());
    if let Some(batch) = batch.filter(|&b| b > 0) {
        let mut fetch = vec![train.root];
        fetch.extend(train.grads.values().copied());
        super::check_reference_memory(graph, &fetch, batch)?;
    }
    let mut bindings = super::load_weights(graph, args.weights.as_deref(), args.seed)?;
    bindings.extend(inputs);

    let labels_node = graph.node(graph.node(train.root).inputs[1]).name.clone();
    let labels = super::load_labels(&args.labels, &labels_node)?;
    bindings.insert(labels_node.clone(), labels);

    let mode = if args.inference_mode { Mode::Inference } else { Mode::Training };
    let values = reference::run_gradients(&train, &bindings, RunOptions { mode, step: args.step, bf16: None })
        .map_err(|e| {
            let labels = Some((labels_node.as_str(), args.labels.as_path()));
            super::blame(e, |name| super::source_of(graph, name, args.weights.as_deref(), labels, Some(&args.input)))
        })?;
    if args.profile {
        super::run::print_profile(graph, &values.node_seconds, values.batch);
    }
    let loss_value = values.root.first().copied().unwrap_or(f32::NAN);
    let mut out = values.grads;
    out.insert("loss".to_string(), values.root);
    super::save_tensors(&args.output, &out)?;
    println!(
        "loss {loss_value:.6} over a batch of {}; wrote the loss and {} gradients to {}",
        values.batch,
        out.len() - 1,
        args.output.display()
    );
    Ok(())
}

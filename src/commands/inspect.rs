//! `systolic inspect`: a model layer by layer.

use anyhow::Result;
use serde::Serialize;
use systolic::compiler::{Op, cost, graph::DType};

use crate::table::{Table, si, thousands};

#[derive(clap::Args)]
pub struct Args {
    /// A zoo model name or a `.ron` graph.
    model: String,
    /// Batch size for shapes and FLOPs.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Leaf {
    name: String,
    shape: Vec<usize>,
    dtype: &'static str,
}

#[derive(Serialize)]
struct Layer {
    name: String,
    op: &'static str,
    /// The op with its attributes, as in model files.
    attrs: serde_json::Value,
    inputs: Vec<String>,
    output_shape: Vec<usize>,
    params: usize,
    flops: u64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    batch: usize,
    inputs: Vec<Leaf>,
    outputs: Vec<String>,
    layers: Vec<Layer>,
    trainable_params: usize,
    non_trainable_params: usize,
    total_flops: u64,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let g = super::load_model(&args.model)?;
    let mut inputs = Vec::new();
    let mut layers = Vec::new();
    let mut non_trainable = 0;
    for (id, node) in g.nodes() {
        match &node.op {
            Op::Input(i) => inputs.push(Leaf {
                name: node.name.clone(),
                shape: node.shape.concrete(args.batch),
                dtype: if i.dtype == DType::I32 { "i32" } else { "f32" },
            }),
            Op::Parameter(p) if !p.trainable => non_trainable += node.shape.numel(),
            Op::Parameter(_) => {}
            op => layers.push(Layer {
                name: node.name.clone(),
                op: op.kind(),
                attrs: serde_json::to_value(op)?,
                inputs: node.inputs.iter().map(|&i| g.node(i).name.clone()).collect(),
                output_shape: node.shape.concrete(args.batch),
                params: cost::layer_params(&g, id),
                flops: cost::flops(&g, id, args.batch),
            }),
        }
    }
    let report = Report {
        model: g.name().to_string(),
        batch: args.batch,
        inputs,
        outputs: g.outputs().iter().map(|&o| g.node(o).name.clone()).collect(),
        trainable_params: g.trainable_param_count(),
        non_trainable_params: non_trainable,
        total_flops: layers.iter().map(|l| l.flops).sum(),
        layers,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model {} at batch {}", report.model, report.batch);
    for i in &report.inputs {
        println!("input  {} {:?} {}", i.name, i.shape, i.dtype);
    }
    println!("output {}", report.outputs.join(", "));
    println!();
    let mut t = Table::new(&["layer", "op", "output shape", "params", "FLOPs"]);
    for l in &report.layers {
        t.row(vec![
            l.name.clone(),
            l.op.to_string(),
            format!("{:?}", l.output_shape),
            thousands(l.params as u64),
            si(l.flops as f64),
        ]);
    }
    print!("{}", t.render());
    println!();
    println!(
        "{} layers, {} trainable parameters ({} non-trainable), {} FLOPs for the batch",
        report.layers.len(),
        thousands(report.trainable_params as u64),
        thousands(report.non_trainable_params as u64),
        si(report.total_flops as f64)
    );
    Ok(())
}

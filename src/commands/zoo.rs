//! `systolic zoo`: the model zoo at a glance.

use anyhow::Result;
use serde::Serialize;
use systolic::compiler::{cost, zoo};

use crate::table::{Table, si, thousands};

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON (an array of objects) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Entry {
    name: &'static str,
    params: usize,
    flops_per_example: u64,
    input_shape: Vec<usize>,
    description: &'static str,
}

pub fn run(args: Args) -> Result<()> {
    let mut entries = Vec::new();
    for name in zoo::names() {
        let g = zoo::build(name)?;
        let input = g.inputs().first().map(|&i| g.node(i).shape.dims.clone()).unwrap_or_default();
        entries.push(Entry {
            name,
            params: g.trainable_param_count(),
            flops_per_example: cost::flops_per_example(&g),
            input_shape: input,
            description: zoo::describe(name).unwrap_or(""),
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    let mut t = Table::new(&["model", "params", "FLOPs/example", "input", "description"]);
    for e in &entries {
        t.row(vec![
            e.name.to_string(),
            thousands(e.params as u64),
            si(e.flops_per_example as f64),
            format!("{:?}", e.input_shape),
            e.description.to_string(),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

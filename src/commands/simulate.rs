//! `systolic simulate`: one step of a model on one core — cycles, time, throughput, units.

use std::path::PathBuf;

use anyhow::{Context, Result};
use systolic::simulator::timing::simulate;
use systolic::simulator::trace::chrome_trace;

use crate::table::{Table, thousands};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    what: super::compile::Lowering,
    /// Write a Chrome trace (open it in ui.perfetto.dev).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let (machine, precision) = args.what.target.resolve()?;
    let (compiled, _) = super::compile::compile_model(
        &args.what.model,
        &machine,
        args.what.batch,
        precision,
        args.what.storage.resolve(precision)?,
        args.what.train.training()?,
        false,
    )?;
    let program = &compiled.executable.program;
    let timing = simulate(&machine, program, args.trace.is_some())?;
    let r = &timing.report;
    if let Some(path) = &args.trace {
        let trace = chrome_trace(&machine, program, &timing.spans);
        std::fs::write(path, serde_json::to_vec(&trace)?).with_context(|| format!("writing {}", path.display()))?;
    }
    let examples_per_second = args.what.batch as f64 / r.seconds;
    if args.json {
        let out = serde_json::json!({
            "model": compiled.executable.name, "machine": machine.name, "batch": args.what.batch,
            "step_cycles": r.cycles, "step_seconds": r.seconds, "examples_per_second": examples_per_second,
            "mxu_utilization": compiled.mxu_utilization(&machine, r.cycles), "hbm_bytes": r.hbm_bytes,
            "hbm_bytes_per_second": r.hbm_bytes_per_second, "units": r.units, "instructions": r.instructions,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} on one {} core, batch {} ({} instructions)",
        compiled.executable.name,
        machine.name,
        args.what.batch,
        thousands(r.instructions)
    );
    println!("step              {} cycles, {:.3} ms", thousands(r.cycles), r.seconds * 1e3);
    println!("throughput        {examples_per_second:.1} examples/s per core");
    println!("MXU utilization   {:.1}%", 100.0 * compiled.mxu_utilization(&machine, r.cycles));
    println!(
        "HBM               {} bytes at {:.1} GB/s ({:.0}% of peak)",
        thousands(r.hbm_bytes),
        r.hbm_bytes_per_second / 1e9,
        100.0 * r.hbm_utilization
    );
    let mut t = Table::new(&["unit", "instructions", "busy cycles", "utilization"]);
    for u in &r.units {
        t.row(vec![
            u.unit.clone(),
            thousands(u.instructions),
            thousands(u.busy_cycles),
            format!("{:.1}%", 100.0 * u.utilization),
        ]);
    }
    print!("{}", t.render());
    if let Some(path) = &args.trace {
        println!("trace written to {} (open in ui.perfetto.dev)", path.display());
    }
    Ok(())
}

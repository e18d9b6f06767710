//! `systolic machines`: the machine presets, or one machine in full with its sources.

use anyhow::Result;
use serde::Serialize;
use systolic::simulator::config::presets;

use crate::table::{Table, si, thousands};

#[derive(clap::Args)]
pub struct Args {
    /// Show one machine (a preset name or a `.ron` file) in full, with the source of every figure.
    machine: Option<String>,
    /// Override a field of the shown machine (repeatable), e.g. `--set core.mxu.rows=256`.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    name: String,
    chips: usize,
    cores: usize,
    hosts: usize,
    torus: Vec<usize>,
    wraparound: Vec<bool>,
    peak_tflops: f64,
    chip_peak_tflops: f64,
    clock_hz: f64,
    mxus_per_core: usize,
    hbm_bytes_per_core: u64,
    hbm_bytes_per_second_per_core: f64,
    vmem_bytes: u64,
    ici_links: usize,
    ici_bytes_per_second: f64,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(spec) = &args.machine {
        let m = super::load_machine(spec, &args.sets)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&m)?);
            return Ok(());
        }
        let mut shown = m.clone();
        shown.sources.clear();
        println!("{}", shown.to_ron());
        println!();
        println!(
            "{}: {} chips, {} cores, peak bf16 {:.1} TFLOP/s per chip, {:.1} TFLOP/s for the slice",
            m.name,
            m.chips(),
            m.cores(),
            m.chip_peak_flops() / 1e12,
            m.peak_flops() / 1e12
        );
        println!("\nsources:");
        for (field, source) in &m.sources {
            println!("  {field:<34} {source}");
        }
        return Ok(());
    }
    anyhow::ensure!(args.sets.is_empty(), "--set needs a machine to change: `systolic machines v3-8 --set ...`");
    let rows: Vec<Row> = presets::names()
        .iter()
        .map(|name| {
            let m = presets::preset(name).expect("presets build");
            Row {
                name: m.name.clone(),
                chips: m.chips(),
                cores: m.cores(),
                hosts: m.hosts(),
                torus: m.slice.torus.clone(),
                wraparound: m.slice.wraparound.clone(),
                peak_tflops: m.peak_flops() / 1e12,
                chip_peak_tflops: m.chip_peak_flops() / 1e12,
                clock_hz: m.core.clock_hz,
                mxus_per_core: m.core.mxu.count,
                hbm_bytes_per_core: m.core.hbm.bytes,
                hbm_bytes_per_second_per_core: m.hbm_bytes_per_second(),
                vmem_bytes: m.core.vmem_bytes,
                ici_links: m.chip.ici.links,
                ici_bytes_per_second: m.chip.ici.bytes_per_second,
            }
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut t = Table::new(&[
        "machine",
        "chips",
        "cores",
        "torus",
        "peak bf16 TFLOP/s",
        "HBM/core",
        "HBM GB/s/core",
        "VMEM",
        "ICI links",
        "ICI GB/s/link",
    ]);
    for r in &rows {
        let dims: Vec<String> = r.torus.iter().map(|d| d.to_string()).collect();
        let kind = if r.wraparound.iter().all(|&w| w) {
            "torus"
        } else if r.wraparound.iter().any(|&w| w) {
            "partial torus"
        } else {
            "mesh"
        };
        t.row(vec![
            r.name.clone(),
            thousands(r.chips as u64),
            thousands(r.cores as u64),
            format!("{} {kind}", dims.join("x")),
            format!("{:.1}", r.peak_tflops),
            format!("{} GiB", r.hbm_bytes_per_core >> 30),
            format!("{:.0}", r.hbm_bytes_per_second_per_core / 1e9),
            format!("{} MiB", r.vmem_bytes >> 20),
            r.ici_links.to_string(),
            si(r.ici_bytes_per_second).replace(" G", ""),
        ]);
    }
    print!("{}", t.render());
    println!("\n`systolic machines NAME` shows one machine in full with the source of every figure.");
    Ok(())
}

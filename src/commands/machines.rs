//! `systolic machines`: the machine presets, or one machine in full with its sources, or
//! (`--ron`) one machine as a file to edit and load with `--machine FILE.ron`.

use anyhow::Result;
use serde::Serialize;
use systolic::simulator::Machine;
use systolic::simulator::config::{FIELDS, presets};

use crate::table::{Table, si, thousands};

#[derive(clap::Args)]
pub struct Args {
    /// Show one machine (a preset name or a `.ron` file) in full, with the source of every figure.
    machine: Option<String>,
    /// Override a field of the shown machine (repeatable), e.g. `--set core.mxu.rows=256`.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "ron")]
    json: bool,
    /// Print only the machine as RON, sources included: a file that `--machine FILE.ron` loads
    /// back as the same machine (`systolic machines v3-8 --ron > mine.ron`).
    #[arg(long)]
    ron: bool,
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
        if args.ron {
            println!("{}", m.to_ron());
        } else if args.json {
            println!("{}", serde_json::to_string_pretty(&m)?);
        } else {
            print!("{}", describe(&m, spec));
        }
        return Ok(());
    }
    anyhow::ensure!(!args.ron, "--ron needs a machine to write: `systolic machines v3-8 --ron > mine.ron`");
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
        t.row(vec![
            r.name.clone(),
            thousands(r.chips as u64),
            thousands(r.cores as u64),
            topology(&r.torus, &r.wraparound),
            format!("{:.1}", r.peak_tflops),
            format!("{} GiB", r.hbm_bytes_per_core >> 30),
            format!("{:.0}", r.hbm_bytes_per_second_per_core / 1e9),
            format!("{} MiB", r.vmem_bytes >> 20),
            r.ici_links.to_string(),
            si(r.ici_bytes_per_second).replace(" G", ""),
        ]);
    }
    print!("{}", t.render());
    println!("\n`systolic machines NAME` shows one machine in full with the source of every figure;");
    println!(
        "`systolic machines NAME --ron > mine.ron` writes it as a file to edit and use with `--machine mine.ron`."
    );
    Ok(())
}

/// `2x2 mesh`, `4x4x4 torus`, `2x2x4 partial torus`.
fn topology(torus: &[usize], wraparound: &[bool]) -> String {
    let dims: Vec<String> = torus.iter().map(|d| d.to_string()).collect();
    let kind = if wraparound.iter().all(|&w| w) {
        "torus"
    } else if wraparound.iter().any(|&w| w) {
        "partial torus"
    } else {
        "mesh"
    };
    format!("{} {kind}", dims.join("x"))
}

/// One machine for people: a summary, then every field with its value (as `--set` and machine
/// files take it, with units where they help) and its source.
fn describe(m: &Machine, spec: &str) -> String {
    let hosts = m.hosts();
    let mut out = format!(
        "{}: {} chips ({}), {} cores, {hosts} host{}\n",
        m.name,
        thousands(m.chips() as u64),
        topology(&m.slice.torus, &m.slice.wraparound),
        thousands(m.cores() as u64),
        if hosts == 1 { "" } else { "s" },
    );
    out += &format!(
        "peak bf16 {:.1} TFLOP/s per chip, {:.1} TFLOP/s for the slice; HBM {} GB/s per core\n\n",
        m.chip_peak_flops() / 1e12,
        m.peak_flops() / 1e12,
        short(m.hbm_bytes_per_second() / 1e9),
    );
    let rows: Vec<[String; 3]> = m
        .fields()
        .into_iter()
        .map(|(field, value)| {
            let value = match unit(m, field) {
                Some(unit) => format!("{value} ({unit})"),
                None => value,
            };
            let source = m.sources.get(field).cloned().unwrap_or_else(|| "(no source given)".into());
            [field.to_string(), value, source]
        })
        .collect();
    let header = ["field".to_string(), "value".to_string(), "source".to_string()];
    let width = |i: usize| rows.iter().chain([&header]).map(|r| r[i].chars().count()).max().unwrap_or(0);
    let (w0, w1) = (width(0), width(1));
    let rule = ["-".repeat(w0), "-".repeat(w1), "-".repeat(6)];
    for [field, value, source] in [&header, &rule].into_iter().chain(&rows) {
        out += &format!("{field:<w0$}  {value:<w1$}  {source}\n");
    }
    // A hand-written file may cite fields that do not exist: list them rather than hide them.
    for (field, source) in m.sources.iter().filter(|(f, _)| !FIELDS.contains(&f.as_str())) {
        out += &format!("{field:<w0$}  {:<w1$}  {source}\n", "(not a field)");
    }
    out += &format!(
        "\nChange a field with `--set FIELD=VALUE`, or write the machine as a file to edit (values and\n\
         sources) with `systolic machines {spec} --ron > mine.ron` and use it with `--machine mine.ron`.\n"
    );
    out
}

/// A field's value in everyday units, where the raw number is hard to read.
fn unit(m: &Machine, field: &str) -> Option<String> {
    let c = &m.core;
    Some(match field {
        "core.clock_hz" => format!("{} MHz", short(c.clock_hz / 1e6)),
        "core.vmem_bytes" => binary(c.vmem_bytes),
        "core.hbm.bytes" => binary(c.hbm.bytes),
        "core.hbm.bytes_per_cycle" => format!("{} GB/s", short(m.hbm_bytes_per_second() / 1e9)),
        "core.dma.latency_cycles" => format!("{} µs", short(c.dma.latency_cycles as f64 / c.clock_hz * 1e6)),
        "chip.ici.bytes_per_second" => format!("{} GB/s", short(m.chip.ici.bytes_per_second / 1e9)),
        "chip.ici.latency_seconds" => format!("{} µs", short(m.chip.ici.latency_seconds * 1e6)),
        "host.pcie_bytes_per_second" => format!("{} GB/s", short(m.host.pcie_bytes_per_second / 1e9)),
        _ => return None,
    })
}

/// At most three decimals, trailing zeros dropped: `940`, `62.5`, `0.532`.
fn short(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `16 MiB`, `8 GiB`, `1.5 GiB`, `about 16 MiB` (not a whole number of KiB).
fn binary(bytes: u64) -> String {
    let Some((shift, unit)) =
        [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")].into_iter().find(|&(s, _)| bytes >= 1 << s)
    else {
        return format!("{bytes} bytes");
    };
    let about = if bytes.is_multiple_of(1 << 10) { "" } else { "about " };
    format!("{about}{} {unit}", short(bytes as f64 / (1u64 << shift) as f64))
}

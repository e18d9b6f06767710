//! `systolic scale`: one training (or inference) step of a model on slices of growing size —
//! per row the step time, throughput, scaling efficiency against the first row, and the shares
//! of compute, exposed all-reduce, infeed and host; optionally an SVG of throughput and
//! efficiency against cores.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::commands::compile::{Lowering, TrainArgs};
use crate::commands::simulate::{SliceArgs, per_core_batch, slice_step};
use crate::table::{Table, thousands};

#[derive(clap::Args)]
pub struct Args {
    /// A zoo model name or a `.ron` graph.
    model: String,
    /// A generation (v2, v3, v4): each row is the preset `GEN-CORES`.
    #[arg(long, default_value = "v3")]
    machine: String,
    /// Slice sizes in cores.
    #[arg(long, value_delimiter = ',', default_value = "8,32,128,512,2048")]
    cores: Vec<usize>,
    /// MXU precision: default, high or highest.
    #[arg(long, default_value = "default")]
    precision: String,
    /// Override a machine field in every row (repeatable).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    #[command(flatten)]
    storage: super::Storage,
    /// Examples per core (weak scaling; ignored with --global-batch).
    #[arg(long, default_value_t = 128)]
    batch: usize,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    slice: SliceArgs,
    /// Print JSON: an array of rows.
    #[arg(long)]
    json: bool,
    /// Draw throughput and scaling efficiency against cores into an SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// One slice size.
#[derive(Serialize)]
struct Row {
    machine: String,
    cores: usize,
    chips: usize,
    batch: usize,
    global_batch: usize,
    step_seconds: f64,
    examples_per_second: f64,
    examples_per_second_per_chip: f64,
    /// Examples per second per core over the first row's.
    scaling_efficiency: f64,
    compute_share: f64,
    allreduce_exposed_share: f64,
    infeed_share: f64,
    host_share: f64,
    allreduce_seconds: f64,
}

pub fn run(args: Args) -> Result<()> {
    super::check_outputs([("--plot", args.plot.as_deref())])?;
    if args.cores.is_empty() {
        bail!("--cores: give at least one slice size");
    }
    if let Some(p) = &args.plot {
        check_writable(p)?;
    }
    let mut rows: Vec<Row> = Vec::new();
    for &cores in &args.cores {
        let name = format!("{}-{cores}", args.machine);
        let what = Lowering {
            model: args.model.clone(),
            target: super::Target {
                machine: Some(name.clone()),
                precision: Some(args.precision.clone()),
                sets: args.sets.clone(),
            },
            storage: super::Storage { activations: args.storage.activations.clone() },
            batch: args.batch,
            train: args.train.clone(),
        };
        let (machine, precision) =
            what.target.resolve().with_context(|| format!("--cores {cores}: no slice {name}"))?;
        let batch = per_core_batch(&machine, args.batch, args.slice.global_batch)?;
        let step = slice_step(&what, &args.slice, &machine, precision, batch, &[0], false)?;
        let r = &step.report;
        let eps = step.global_batch as f64 / r.step_seconds;
        let share = |s: f64| s / r.step_seconds;
        let per_core = eps / r.cores as f64;
        let efficiency = rows.first().map_or(1.0, |f| per_core / (f.examples_per_second / f.cores as f64));
        rows.push(Row {
            machine: machine.name.clone(),
            cores: r.cores,
            chips: r.chips,
            batch,
            global_batch: step.global_batch,
            step_seconds: r.step_seconds,
            examples_per_second: eps,
            examples_per_second_per_chip: eps / r.chips as f64,
            scaling_efficiency: efficiency,
            compute_share: share(r.compute_seconds),
            allreduce_exposed_share: share(r.exposed_collective_seconds),
            infeed_share: share(r.exposed_infeed_seconds),
            host_share: share(r.host_seconds),
            allreduce_seconds: r.collective_seconds,
        });
    }
    if let Some(p) = &args.plot {
        plot(p, &args.model, &rows)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mode = if args.train.train { "training step" } else { "inference" };
    println!("{} {mode} on {} slices", args.model, args.machine);
    let mut t = Table::new(&[
        "cores",
        "chips",
        "global batch",
        "step ms",
        "examples/s",
        "per chip",
        "efficiency",
        "compute",
        "all-reduce",
        "infeed",
        "host",
    ]);
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    for r in &rows {
        t.row(vec![
            thousands(r.cores as u64),
            thousands(r.chips as u64),
            thousands(r.global_batch as u64),
            format!("{:.3}", r.step_seconds * 1e3),
            thousands(r.examples_per_second.round() as u64),
            format!("{:.1}", r.examples_per_second_per_chip),
            pct(r.scaling_efficiency),
            pct(r.compute_share),
            pct(r.allreduce_exposed_share),
            pct(r.infeed_share),
            pct(r.host_share),
        ]);
    }
    print!("{}", t.render());
    println!(
        "shares of the step: compute, all-reduce not hidden behind compute, infeed slower than the device, host round trips and checkpoints"
    );
    if let Some(p) = &args.plot {
        println!("plot written to {}", p.display());
    }
    Ok(())
}

/// Fails early when `path`'s folder cannot take the plot.
fn check_writable(path: &std::path::Path) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        bail!("--plot {}: folder {} does not exist", path.display(), dir.display());
    }
    Ok(())
}

/// Throughput (left axis, log-log) and scaling efficiency (right axis) against cores.
fn plot(path: &std::path::Path, model: &str, rows: &[Row]) -> Result<()> {
    use plotters::prelude::*;
    let mut svg = String::new();
    let mut draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let (c0, c1) = (rows[0].cores as f64, rows[rows.len() - 1].cores as f64 * 1.2);
        let top = rows.iter().map(|r| r.examples_per_second).fold(0.0, f64::max) * 1.5;
        let bottom = rows.iter().map(|r| r.examples_per_second).fold(f64::INFINITY, f64::min) / 1.5;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{model}: throughput and scaling efficiency"), ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .right_y_label_area_size(60)
            .build_cartesian_2d((c0 / 1.2..c1).log_scale(), (bottom..top).log_scale())?
            .set_secondary_coord((c0 / 1.2..c1).log_scale(), 0.0..1.1);
        chart.configure_mesh().x_desc("cores").y_desc("examples/s").draw()?;
        chart.configure_secondary_axes().y_desc("scaling efficiency").draw()?;
        let points: Vec<(f64, f64)> = rows.iter().map(|r| (r.cores as f64, r.examples_per_second)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))?
            .label("examples/s")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
        let eff: Vec<(f64, f64)> = rows.iter().map(|r| (r.cores as f64, r.scaling_efficiency)).collect();
        chart
            .draw_secondary_series(LineSeries::new(eff.clone(), RED.stroke_width(2)))?
            .label("scaling efficiency")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart.draw_secondary_series(eff.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing the plot {}: {e}", path.display()))?;
    super::write_file(path, svg.as_bytes())
}

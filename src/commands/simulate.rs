//! `systolic simulate`: one step of a model on a whole slice — every core's program timed,
//! the gradient all-reduce of a training step on the ICI network, the hosts' infeed and round
//! trips — and the per-core view of one core (cycles, units).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use systolic::compiler::lower::{Compiled, Options};
use systolic::simulator::Machine;
use systolic::simulator::executable::Role;
use systolic::simulator::isa::{CollectiveKind as Collective, Reduction};
use systolic::simulator::numerics::Precision;
use systolic::simulator::pod::slice::{self, Hosts, Report};
use systolic::simulator::timing::Timing;
use systolic::simulator::trace::slice_trace;

use crate::table::{Table, thousands};

/// How a slice is fed and driven: what `simulate` and `scale` share.
#[derive(clap::Args, Clone)]
pub struct SliceArgs {
    /// Examples per step over the whole slice, split evenly over its cores (instead of
    /// --batch, which is per core).
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Examples per second each host's input pipeline makes (default: as fast as needed): a
    /// number, or the JSON report of `systolic data-bench --json` (this host's measured rate).
    #[arg(long, value_name = "RATE|FILE.json")]
    pub input_rate: Option<String>,
    /// One host's pipeline at another rate, `HOST=EXAMPLES_PER_SECOND` (repeatable).
    #[arg(long = "host-rate", value_name = "HOST=RATE")]
    pub host_rates: Vec<String>,
    /// Steps per host round trip (TPUConfig's iterations_per_loop; its default is 2, the TPU
    /// ResNet-50 recipe runs many more).
    #[arg(long, default_value_t = 100)]
    pub iterations_per_loop: u64,
    /// Milliseconds of one host round trip (an assumption: no public figure).
    #[arg(long, default_value_t = 1.0)]
    pub loop_overhead_ms: f64,
    /// Write a checkpoint (parameters and optimizer state over PCIe) every N steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// How the training step combines gradients over replicas: mean (CrossShardOptimizer's
    /// default) or sum.
    #[arg(long, default_value = "mean")]
    pub reduction: String,
    /// Gradient all-reduce bucket, MiB.
    #[arg(long, default_value_t = 25.0)]
    pub bucket_mib: f64,
    /// With --train: batch norm's statistics over groups of this many consecutive replicas
    /// (their sums all-reduced in the step, as large-batch ResNet-50 recipes do); 1: each
    /// replica's own examples.
    #[arg(long, default_value_t = 1)]
    pub bn_group: usize,
    /// With --train: the sharded weight update — gradients reduce-scattered, each replica
    /// updating its shard of the parameters and optimizer slots, parameters all-gathered.
    #[arg(long)]
    pub sharded_update: bool,
    /// Run every core on its own instead of identical cores once (slower; the same result).
    #[arg(long)]
    pub no_shortcut: bool,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    what: super::compile::Lowering,
    #[command(flatten)]
    slice: SliceArgs,
    /// Write a Chrome trace (open it in ui.perfetto.dev): core 0 and the busiest links.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Cores to trace (comma-separated; default 0).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    trace_cores: Vec<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// One step of a slice: what was compiled, the slice's report and core 0's timing.
pub struct SliceStep {
    pub compiled: Compiled,
    pub report: Report,
    /// Examples per core and over the slice.
    pub batch: usize,
    pub global_batch: usize,
    pub core: Timing,
}

/// The per-core batch: `--batch`, or `--global-batch` split over the slice's cores.
pub fn per_core_batch(machine: &Machine, batch: usize, global: Option<usize>) -> Result<usize> {
    let cores = machine.cores();
    match global {
        None => Ok(batch),
        Some(0) => bail!("--global-batch 0: give at least one example per core ({cores})"),
        Some(g) if !g.is_multiple_of(cores) => bail!(
            "--global-batch {g} does not split evenly over the {cores} cores of {}: use a multiple of {cores}, e.g. {}",
            machine.name,
            (g.div_ceil(cores)) * cores
        ),
        Some(g) => Ok(g / cores),
    }
}

/// Compiles `what` for one replica of `machine`'s slice at `batch` examples per core and
/// simulates a step of the whole slice.
pub fn slice_step(
    what: &super::compile::Lowering,
    args: &SliceArgs,
    machine: &Machine,
    precision: Precision,
    batch: usize,
    trace_cores: &[usize],
    spans: bool,
) -> Result<SliceStep> {
    let cores = machine.cores();
    let reduction = match args.reduction.as_str() {
        "mean" => Reduction::Mean,
        "sum" => Reduction::Sum,
        other => bail!("--reduction {other}: use mean or sum"),
    };
    if !(args.bucket_mib > 0.0 && args.bucket_mib.is_finite()) {
        bail!("--bucket-mib {}: give a positive size", args.bucket_mib);
    }
    if args.bn_group == 0 || !cores.is_multiple_of(args.bn_group) {
        bail!("--bn-group {}: give a number of replicas that divides the slice's {cores} cores", args.bn_group);
    }
    if args.sharded_update && !what.train.train {
        bail!("--sharded-update needs --train: it shares the training step's weight update among replicas");
    }
    if args.bn_group > 1 && !what.train.train {
        bail!("--bn-group {} needs --train: batch norm uses batch statistics only in training", args.bn_group);
    }
    let opts = Options {
        replicas: cores,
        gradient_reduction: reduction,
        bucket_bytes: (args.bucket_mib * (1 << 20) as f64) as u64,
        batch_norm_group: args.bn_group,
        sharded_update: args.sharded_update,
        ..what.options(machine, precision, batch)?
    };
    let (compiled, _) = super::compile::compile_model(&what.model, &opts)?;
    let exe = &compiled.executable;
    // What the host sends per example: the inputs' bytes (images, one-hot labels).
    let mut hosts = Hosts::new(batch, exe.input_bytes() / batch as u64);
    hosts.examples_per_second = args.input_rate.as_deref().map(input_rate).transpose()?;
    for spec in &args.host_rates {
        let (h, r) =
            spec.split_once('=').with_context(|| format!("--host-rate {spec}: write HOST=RATE, e.g. 3=2000"))?;
        let host: usize = h.trim().parse().with_context(|| format!("--host-rate {spec}: the host is a number"))?;
        let rate: f64 =
            r.trim().parse().with_context(|| format!("--host-rate {spec}: the rate is examples per second"))?;
        hosts.host_rates.insert(host, rate);
    }
    hosts.iterations_per_loop = args.iterations_per_loop;
    hosts.loop_overhead_seconds = args.loop_overhead_ms * 1e-3;
    hosts.checkpoint_every = args.checkpoint_every;
    hosts.checkpoint_bytes = exe.bindings.iter().filter(|b| b.role == Role::Parameter).map(|b| b.tile.bytes()).sum();
    let mut trace_cores: Vec<usize> = trace_cores.to_vec();
    if let Some(&bad) = trace_cores.iter().find(|&&c| c >= cores) {
        bail!("--trace-cores {bad}: {} has cores 0 to {}", machine.name, cores - 1);
    }
    if !trace_cores.contains(&0) {
        trace_cores.push(0);
    }
    let options = slice::Options { shortcut: !args.no_shortcut, trace_cores, spans, ..slice::Options::default() };
    let report = slice::simulate(machine, &exe.program, &hosts, &options)?;
    let core = report.timings.iter().find(|(c, _)| *c == 0).map(|(_, t)| t.clone()).expect("core 0 is traced");
    Ok(SliceStep { compiled, report, batch, global_batch: batch * cores, core })
}

pub fn run(args: Args) -> Result<()> {
    super::check_outputs([("--trace", args.trace.as_deref())])?;
    let (machine, precision) = args.what.target.resolve()?;
    let batch = per_core_batch(&machine, args.what.batch, args.slice.global_batch)?;
    let trace_cores = if args.trace.is_some() { args.trace_cores.clone() } else { vec![0] };
    let step = slice_step(&args.what, &args.slice, &machine, precision, batch, &trace_cores, args.trace.is_some())?;
    let (r, c) = (&step.report, &step.core.report);
    let program = &step.compiled.executable.program;
    if let Some(path) = &args.trace {
        let trace = slice_trace(&machine, program, r);
        super::write_file(path, &serde_json::to_vec(&trace)?)?;
    }
    let examples_per_second = step.global_batch as f64 / r.step_seconds;
    // Gradient buckets (all-reduced, or reduce-scattered with the sharded update, whose
    // kernels then take and all-gather the parameters), and the batch-norm sums all-reduced
    // over groups of replicas.
    let (gradients, others): (Vec<_>, Vec<_>) =
        r.collectives.iter().partition(|c| step.compiled.gradient_all_reduces.contains(&c.instr));
    let (parameters, statistics): (Vec<_>, Vec<_>) =
        others.into_iter().partition(|c| matches!(c.kind, Collective::Shard | Collective::AllGather));
    let sharded = !parameters.is_empty();
    let buckets = gradients.len();
    let reduced: u64 = gradients.iter().map(|c| c.bytes).sum();
    let statistics_bytes: u64 = statistics.iter().map(|c| c.bytes).sum();
    if args.json {
        let links: Vec<_> = r.links.iter().take(4).collect();
        let out = serde_json::json!({
            "model": step.compiled.executable.name, "machine": machine.name, "cores": r.cores, "chips": r.chips,
            "hosts": r.hosts, "batch": step.batch, "global_batch": step.global_batch,
            "step_seconds": r.step_seconds, "examples_per_second": examples_per_second,
            "examples_per_second_per_chip": examples_per_second / r.chips as f64,
            "device_seconds": r.device_seconds, "compute_seconds": r.compute_seconds,
            "allreduce_seconds": { "total": r.collective_seconds, "exposed": r.exposed_collective_seconds,
                                   "hidden": r.hidden_collective_seconds },
            "allreduce_buckets": buckets, "allreduce_bytes_per_core": reduced, "sharded_update": sharded,
            "batch_norm_allreduces": statistics.len(), "batch_norm_allreduce_bytes_per_core": statistics_bytes,
            "infeed_seconds": { "per_step": r.infeed_seconds, "exposed": r.exposed_infeed_seconds },
            "host_seconds": r.host_seconds, "core_runs": r.core_runs, "busiest_links": links,
            "step_cycles": c.cycles, "core_step_seconds": c.seconds,
            "mxu_utilization": step.compiled.mxu_utilization(&machine, c.cycles), "hbm_bytes": c.hbm_bytes,
            "hbm_peak_bytes": step.compiled.executable.hbm_peak_bytes,
            "hbm_bytes_per_second": c.hbm_bytes_per_second, "units": c.units, "instructions": c.instructions,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let share = |s: f64| if r.step_seconds > 0.0 { 100.0 * s / r.step_seconds } else { 0.0 };
    println!(
        "{} on {} ({} cores, {} chips, {} hosts), batch {} per core, {} in all",
        step.compiled.executable.name,
        machine.name,
        r.cores,
        r.chips,
        r.hosts,
        step.batch,
        thousands(step.global_batch as u64)
    );
    println!("step              {:.3} ms", r.step_seconds * 1e3);
    println!(
        "throughput        {:.1} examples/s ({:.1} per chip)",
        examples_per_second,
        examples_per_second / r.chips as f64
    );
    println!("  compute         {:.3} ms ({:.1}%)", r.compute_seconds * 1e3, share(r.compute_seconds));
    if !r.collectives.is_empty() {
        let statistics = match statistics.len() {
            0 => String::new(),
            n => format!("; {n} of batch-norm sums, {} bytes", thousands(statistics_bytes)),
        };
        let statistics =
            if sharded { format!(", reduce-scattered, the parameters all-gathered{statistics}") } else { statistics };
        println!(
            "  all-reduce      {:.3} ms exposed ({:.1}%), {:.3} ms hidden behind compute ({buckets} buckets, {} bytes per core{statistics})",
            r.exposed_collective_seconds * 1e3,
            share(r.exposed_collective_seconds),
            r.hidden_collective_seconds * 1e3,
            thousands(reduced)
        );
    }
    println!(
        "  infeed          {:.3} ms exposed ({:.1}%; {:.3} ms per step to feed)",
        r.exposed_infeed_seconds * 1e3,
        share(r.exposed_infeed_seconds),
        r.infeed_seconds * 1e3
    );
    println!("  host            {:.3} ms ({:.1}%)", r.host_seconds * 1e3, share(r.host_seconds));
    println!(
        "core 0            {} cycles ({} instructions), MXU utilization {:.1}%, HBM {:.1} GB/s ({:.0}% of peak)",
        thousands(c.cycles),
        thousands(c.instructions),
        100.0 * step.compiled.mxu_utilization(&machine, c.cycles),
        c.hbm_bytes_per_second / 1e9,
        100.0 * c.hbm_utilization
    );
    println!("core runs         {} (cores that run alike are simulated once)", r.core_runs);
    if !r.links.is_empty() {
        println!("busiest links");
        for l in r.links.iter().take(4) {
            println!(
                "  {:?} -> {:?} (axis {}, {:?}): {} bytes, busy {:.1}% of the step",
                l.from,
                l.to,
                l.axis,
                l.direction,
                thousands(l.bytes as u64),
                100.0 * l.utilization
            );
        }
    }
    let mut t = Table::new(&["unit", "instructions", "busy cycles", "utilization"]);
    for u in &c.units {
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

/// `--input-rate`: examples per second, or a `data-bench --json` report's measured rate.
fn input_rate(spec: &str) -> Result<f64> {
    let rate = match spec.parse::<f64>() {
        Ok(r) => r,
        Err(_) => {
            let text = std::fs::read_to_string(spec)
                .with_context(|| format!("--input-rate {spec}: neither a number nor a readable data-bench report"))?;
            let report: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("--input-rate {spec}: not a JSON report of systolic data-bench --json"))?;
            report["examples_per_second"]
                .as_f64()
                .with_context(|| format!("--input-rate {spec}: the report has no examples_per_second"))?
        }
    };
    anyhow::ensure!(rate.is_finite() && rate > 0.0, "--input-rate {spec}: give a positive rate of examples per second");
    Ok(rate)
}

//! `systolic compile`: a model lowered for one core, layer by layer, with the compiler's
//! estimate beside the simulated cycles.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use systolic::compiler::lower::{Compiled, KernelReport, Options, PassName, Training, compile};
use systolic::compiler::optimizer::{Optimizer, Schedule};
use systolic::simulator::Machine;
use systolic::simulator::isa::DType;
use systolic::simulator::numerics::Precision;
use systolic::simulator::timing::{Timing, simulate};

use crate::table::{Table, si, thousands};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    what: Lowering,
    /// Write the executable (program and bindings) as JSON.
    #[arg(long)]
    emit: Option<PathBuf>,
    /// Print the result of a pass: fusion, layout, storage, allocation, tiling or scheduling.
    #[arg(long, value_name = "PASS")]
    dump_after: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// What to compile and for which machine: the options `compile` and `simulate` share.
#[derive(clap::Args)]
pub struct Lowering {
    /// A zoo model name or a `.ron` graph.
    pub model: String,
    #[command(flatten)]
    pub target: super::Target,
    #[command(flatten)]
    pub storage: super::Storage,
    /// Examples per core.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// The training step's options.
#[derive(clap::Args, Clone)]
pub struct TrainArgs {
    /// Lower the whole training step (forward, loss, backward, optimizer update) as one program.
    #[arg(long)]
    pub train: bool,
    /// With --train: sgd, momentum (0.9), nesterov (0.9), adam (0.9, 0.999, 1e-8), rmsprop
    /// (decay 0.9, momentum 0, 1e-10) or lars (momentum 0.9, eta 0.001, epsilon 0) [default: sgd].
    #[arg(long)]
    pub optimizer: Option<String>,
    /// With --train: the learning rate (the schedule's base rate) [default: 0.01].
    #[arg(long, allow_negative_numbers = true)]
    pub learning_rate: Option<f32>,
    /// With --train: the learning rate by global step: constant, warmup=N, or a decay
    /// (step=B1/B2/...[,factor=F], poly=N[,end=F][,power=F], cosine=N[,alpha=F]) optionally
    /// after warmup=N, e.g. warmup=500,step=3000/6000/8000,factor=0.1 [default: constant].
    #[arg(long, value_name = "SPEC")]
    pub schedule: Option<String>,
    /// With --train: L2 weight decay on all parameters but batch norm's and biases (the loss
    /// reported does not include it) [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f32>,
}

impl TrainArgs {
    /// The training settings, or None for inference.
    pub fn training(&self) -> Result<Option<Training>> {
        if !self.train {
            let given = [
                ("--optimizer", self.optimizer.is_some()),
                ("--learning-rate", self.learning_rate.is_some()),
                ("--schedule", self.schedule.is_some()),
                ("--weight-decay", self.weight_decay.is_some()),
            ];
            if let Some((option, _)) = given.iter().find(|g| g.1) {
                anyhow::bail!("{option} applies to a training step: add --train or drop {option}");
            }
            return Ok(None);
        }
        let optimizer = optimizer(
            self.optimizer.as_deref().unwrap_or("sgd"),
            self.learning_rate.unwrap_or(0.01),
            self.schedule.as_deref().unwrap_or("constant"),
            self.weight_decay.unwrap_or(0.0),
        )?;
        Ok(Some(Training { optimizer, label_smoothing: 0.0 }))
    }
}

/// The optimizer the command-line options name: a rule at a base learning rate, its schedule
/// and weight decay, each error naming the option to change.
pub fn optimizer(name: &str, learning_rate: f32, schedule: &str, weight_decay: f32) -> Result<Optimizer> {
    let optimizer = Optimizer::parse(name, learning_rate)
        .with_context(|| format!("--optimizer {name} --learning-rate {learning_rate}"))?;
    let schedule = Schedule::parse(schedule, learning_rate)
        .with_context(|| format!("--schedule {schedule} --learning-rate {learning_rate}"))?;
    let optimizer = optimizer.with_schedule(schedule).with_weight_decay(weight_decay);
    optimizer.check().with_context(|| format!("--weight-decay {weight_decay}"))?;
    Ok(optimizer)
}

/// One layer of the report: the compiler's view and the simulation's.
#[derive(Serialize)]
pub struct Layer {
    name: String,
    ops: String,
    strategy: String,
    padded: String,
    mxu_passes: u64,
    flops: u64,
    padding_waste: f64,
    array_fill: f64,
    mxu_cycles: u64,
    hbm_bytes: u64,
    estimate_cycles: u64,
    /// Simulated cycles from the kernel's first instruction starting to its last finishing.
    cycles: u64,
    /// Which roofline term is larger: compute (padded MXU work) or memory (HBM bytes).
    bound: &'static str,
    /// The larger roofline term over the simulated cycles.
    roofline_fraction: f64,
    /// The kernel's instructions in the program: [first, end).
    instructions: [usize; 2],
}

/// Compiles `model` (a zoo name or `.ron` graph) with `opts`; returns it and the seconds the
/// compile took.
pub fn compile_model(model: &str, opts: &Options) -> Result<(Compiled, f64)> {
    let graph = super::load_model(model)?;
    let start = Instant::now();
    let compiled = compile(&graph, opts)?;
    Ok((compiled, start.elapsed().as_secs_f64()))
}

impl Lowering {
    /// The compiler's options for one core of `machine` at `batch` examples.
    pub fn options(&self, machine: &Machine, precision: Precision, batch: usize) -> Result<Options> {
        Ok(Options {
            training: self.train.training()?,
            activations: self.storage.resolve(precision)?,
            ..Options::new(machine.clone(), batch, precision)
        })
    }
}

/// `bf16` or `f32`, as the command line writes them.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::Bf16 => "bf16",
        DType::F32 => "f32",
    }
}

/// Per-kernel simulated cycles and roofline terms.
pub fn layers(machine: &Machine, kernels: &[KernelReport], timing: &Timing) -> Vec<Layer> {
    let peak_macs = machine.macs_per_cycle() as f64;
    kernels
        .iter()
        .map(|k| {
            let spans = timing.spans.iter().filter(|s| k.instructions.contains(&(s.instr as usize)));
            let (lo, hi) = spans.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s.start), hi.max(s.end)));
            let cycles = hi.saturating_sub(lo.min(hi));
            let compute = k.padded_macs as f64 / peak_macs;
            let memory = k.hbm_bytes as f64 / machine.core.hbm.bytes_per_cycle;
            let roof = compute.max(memory);
            Layer {
                name: k.name.clone(),
                ops: k.ops.clone(),
                strategy: k.strategy.clone(),
                padded: k.padded.clone(),
                mxu_passes: k.mxu_passes,
                flops: k.flops,
                padding_waste: k.padding_waste,
                array_fill: k.array_fill,
                mxu_cycles: k.mxu_cycles,
                hbm_bytes: k.hbm_bytes,
                estimate_cycles: k.estimate_cycles,
                cycles,
                bound: if compute >= memory { "compute" } else { "memory" },
                roofline_fraction: if cycles > 0 { roof / cycles as f64 } else { 0.0 },
                instructions: [k.instructions.start, k.instructions.end],
            }
        })
        .collect()
}

pub fn run(args: Args) -> Result<()> {
    super::check_outputs([("--emit", args.emit.as_deref())])?;
    let (machine, precision) = args.what.target.resolve()?;
    if let Some(p) = &args.dump_after {
        anyhow::ensure!(
            PassName::parse(p).is_some(),
            "--dump-after {p}: the passes are {}",
            PassName::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
        );
    }
    let opts = args.what.options(&machine, precision, args.what.batch)?;
    let activations = opts.activations;
    let (compiled, compile_seconds) = compile_model(&args.what.model, &opts)?;
    if let Some(p) = &args.dump_after {
        let pass = PassName::parse(p).expect("checked above");
        println!("== after {} ==\n{}", pass.name(), compiled.dump(pass));
    }
    if let Some(path) = &args.emit {
        super::write_file(path, &serde_json::to_vec(&compiled.executable)?)?;
    }
    let start = Instant::now();
    let timing = simulate(&machine, &compiled.executable.program, true)?;
    let simulate_seconds = start.elapsed().as_secs_f64();
    let layers = layers(&machine, &compiled.kernels, &timing);
    let r = &timing.report;
    if args.json {
        let out = serde_json::json!({
            "model": compiled.executable.name, "machine": machine.name, "batch": args.what.batch,
            "precision": precision.name(), "layers": layers, "total_cycles": r.cycles,
            "seconds": r.seconds, "mxu_utilization": compiled.mxu_utilization(&machine, r.cycles),
            "hbm_peak_bytes": compiled.executable.hbm_peak_bytes, "instructions": r.instructions,
            "compile_seconds": compile_seconds, "simulate_seconds": simulate_seconds,
            "activations": dtype_name(activations), "hbm_bytes_saved": compiled.bytes_saved(),
            "tensors": compiled.tensors.iter().map(|t| serde_json::json!({
                "name": t.name, "dtype": dtype_name(t.dtype), "bytes": t.bytes,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} on one {} core, batch {}, {} precision: {} kernels, {} instructions",
        compiled.executable.name,
        machine.name,
        args.what.batch,
        precision.name(),
        layers.len(),
        thousands(r.instructions)
    );
    let mut t = Table::new(&[
        "layer",
        "ops",
        "padded shape",
        "passes",
        "FLOPs",
        "waste",
        "fill",
        "HBM bytes",
        "estimate",
        "simulated",
        "bound",
        "roofline",
    ]);
    for l in &layers {
        t.row(vec![
            l.name.clone(),
            l.ops.clone(),
            l.padded.clone(),
            thousands(l.mxu_passes),
            si(l.flops as f64),
            format!("{:.0}%", 100.0 * l.padding_waste),
            if l.mxu_passes > 0 { format!("{:.0}%", 100.0 * l.array_fill) } else { String::new() },
            si(l.hbm_bytes as f64),
            thousands(l.estimate_cycles),
            thousands(l.cycles),
            l.bound.to_string(),
            format!("{:.0}%", 100.0 * l.roofline_fraction),
        ]);
    }
    print!("{}", t.render());
    println!();
    println!("total             {} cycles, {:.3} ms", thousands(r.cycles), r.seconds * 1e3);
    println!("MXU utilization   {:.1}%", 100.0 * compiled.mxu_utilization(&machine, r.cycles));
    println!(
        "HBM peak          {} bytes ({:.2} GiB)",
        thousands(compiled.executable.hbm_peak_bytes),
        compiled.executable.hbm_peak_bytes as f64 / (1u64 << 30) as f64
    );
    let in_bf16: Vec<_> = compiled.tensors.iter().filter(|t| t.dtype == DType::Bf16).collect();
    println!(
        "activations       {} in HBM: {} tensors in bf16 ({}B, as much saved against f32; --dump-after storage lists them)",
        dtype_name(activations),
        in_bf16.len(),
        si(in_bf16.iter().map(|t| t.bytes).sum::<u64>() as f64),
    );
    println!("compiled in {compile_seconds:.3} s, simulated in {simulate_seconds:.3} s");
    println!(
        "(estimate: the compiler's own model, the slowest of MXU, DMA and VPU; roofline: the larger of padded MXU work and HBM bytes over the simulated cycles)"
    );
    Ok(())
}

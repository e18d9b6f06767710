//! `systolic mxu`: one matmul on one core's MXUs — cycles, utilisation, and why.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;
use systolic::simulator::Machine;
use systolic::simulator::config::MxuTiming;
use systolic::simulator::kernels;
use systolic::simulator::mxu::kernel::{Matrix, matmul, matmul_into, workspace_bytes as kernel_workspace};
use systolic::simulator::mxu::{passes, pe_array};
use systolic::simulator::numerics::Precision;
use systolic::simulator::timing::simulate;
use systolic::simulator::trace::chrome_trace;

use crate::table::{si, thousands};

#[derive(clap::Args)]
pub struct Args {
    /// Rows of the left operand (the batch, for a dense layer).
    #[arg(long)]
    m: usize,
    /// Shared dimension.
    #[arg(long)]
    k: usize,
    /// Columns of the right operand (the weights).
    #[arg(long)]
    n: usize,
    #[command(flatten)]
    target: super::Target,
    /// Also run the PE-level array (every PE, every cycle) and check it against the fast models.
    #[arg(long)]
    pe_level: bool,
    /// Also compute the values with the bit-exact MXU kernel and time it on this host.
    #[arg(long)]
    values: bool,
    /// With --values: time this many runs (median and fastest reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print the program (the ISA listing) before the results.
    #[arg(long)]
    show_program: bool,
    /// Write a Chrome trace (open it in ui.perfetto.dev).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    super::check_outputs([("--trace", args.trace.as_deref())])?;
    let (machine, precision) = args.target.resolve()?;
    let (m, k, n) = (args.m, args.k, args.n);
    let mp = kernels::matmul(&machine, m, k, n, precision)?;
    if args.show_program {
        println!("{}", mp.program);
    }
    let timing = simulate(&machine, &mp.program, args.trace.is_some())?;
    let r = &timing.report;
    let core = &machine.core;
    let (rows, cols) = (core.mxu.rows, core.mxu.cols);
    let per_mxu_cols = (n.div_ceil(cols)).div_ceil(core.mxu.count) * cols;
    let per_mxu_passes = passes(m, k, per_mxu_cols.min(n), rows, cols, precision).len();
    let flops = 2.0 * (m * k * n) as f64;
    let tflops = flops / r.seconds / 1e12;
    let core_peak = machine.core_peak_flops() / 1e12;
    let mut bound = explain(&machine, m, k, n, per_mxu_passes, r.cycles);
    let extra = precision.passes().len();
    if extra > 1 {
        bound = format!(
            "{} precision runs {extra} bf16 passes per product, so at most 1/{extra} of the MXU time is useful; {bound}",
            precision.name()
        );
    }

    if let Some(path) = &args.trace {
        let trace = chrome_trace(&machine, &mp.program, &timing.spans);
        super::write_file(path, &serde_json::to_vec(&trace)?)?;
    }

    check_memory(&machine, (m, k, n), precision, args.values, args.pe_level)?;
    let pe = if args.pe_level { Some(pe_check(&machine, m, k, n, precision)?) } else { None };
    let host = if args.values { Some(time_values(&machine, m, k, n, precision, args.repeat)?) } else { None };

    if args.json {
        let mut out = json!({
            "machine": machine.name, "m": m, "k": k, "n": n, "precision": precision.name(),
            "mxus": core.mxu.count, "array": [rows, cols], "weight_double_buffering": core.mxu.weight_double_buffering,
            "timing": core.mxu.timing.name(),
            "passes_per_mxu": per_mxu_passes, "cycles": r.cycles, "seconds": r.seconds,
            "mxu_utilization": r.mxu_utilization, "tflops": tflops, "peak_tflops": core_peak, "bound": bound,
        });
        if let Some((cycles, identical)) = pe {
            out["pe_level"] =
                json!({ "cycles": cycles, "cycles_match": cycles == r.cycles, "bits_identical": identical });
        }
        if let Some((median, fastest)) = host {
            out["host_seconds"] = json!(median);
            out["host_seconds_fastest"] = json!(fastest);
            out["host_gflops"] = json!(flops / fastest / 1e9);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{}: one core, {} MXU{} of {rows}x{cols} at {} MHz, weight double buffering {}",
        machine.name,
        core.mxu.count,
        if core.mxu.count == 1 { "" } else { "s" },
        core.clock_hz / 1e6,
        if core.mxu.weight_double_buffering { "on" } else { "off" }
    );
    println!(
        "timing model {}",
        match core.mxu.timing {
            MxuTiming::Pipelined =>
                "pipelined: weights written row by row under the stream, passes overlapping \
                 (core.mxu.timing=scalesim gives SCALE-Sim's cycles)",
            MxuTiming::Scalesim =>
                "scalesim: SCALE-Sim's weight-stationary folds, each loaded, streamed and drained \
                 through the whole array before the next; cycles counted as SCALE-Sim counts them",
        }
    );
    println!(
        "matmul {m}x{k}x{n}, {} precision: {per_mxu_passes} passes per MXU (weight tiles of up to {rows}x{cols}{})",
        precision.name(),
        if precision.passes().len() > 1 {
            format!(", {} bf16 passes each", precision.passes().len())
        } else {
            String::new()
        }
    );
    println!();
    println!("cycles            {}", thousands(r.cycles));
    println!("time              {:.2} us", r.seconds * 1e6);
    println!(
        "MXU utilization   {:.1}%  (useful multiply-adds / what the MXUs could do in that time)",
        100.0 * r.mxu_utilization
    );
    println!("achieved          {} of {core_peak:.1} TFLOP/s peak per core", si(tflops * 1e12) + "FLOP/s");
    println!("bound             {bound}");
    if let Some((cycles, identical)) = pe {
        println!(
            "PE-level array    {} cycles ({}), results {}",
            thousands(cycles),
            if cycles == r.cycles { "identical to the fast model" } else { "DIFFERENT from the fast model" },
            if identical { "bit-identical to the fast kernel" } else { "DIFFER from the fast kernel" }
        );
    }
    if let Some((median, fastest)) = host {
        println!(
            "values on host    {:.2} ms median, {:.2} ms fastest ({:.1} GFLOP/s bit-exact bf16 MXU numerics)",
            median * 1e3,
            fastest * 1e3,
            flops / fastest / 1e9
        );
    }
    if let Some(path) = &args.trace {
        println!("trace             {} (open in ui.perfetto.dev)", path.display());
    }
    Ok(())
}

/// A one-line reason for the utilisation, from the recurrence the timing model uses
/// (docs/timing.md): the steady-state cycles per pass are the largest of the stream (M rows),
/// the weight-load port (K rows) and the weight-bank reuse term; the array is also partly idle
/// when K or N is smaller than its rows or columns, and each run pays one fill and drain.
fn explain(machine: &Machine, m: usize, k: usize, n: usize, passes: usize, cycles: u64) -> String {
    let c = &machine.core.mxu;
    let (rows, cols) = (c.rows, c.cols);
    if c.timing == MxuTiming::Scalesim {
        let fold = 2 * rows + cols + m - 2;
        return format!(
            "SCALE-Sim's folds: each of the {passes} passes per MXU loads all {rows} weight rows, streams {m} rows and drains \
             through the {rows}x{cols} array with nothing overlapped, 2*{rows} + {cols} + {m} - 2 = {fold} cycles, \
             {passes} * {fold} - 1 = {} in all as SCALE-Sim counts ({m} of each {fold} cycles stream)",
            passes as u64 * fold as u64 - 1
        );
    }
    let n_per_mxu = (n.div_ceil(cols)).div_ceil(c.count) * cols;
    let kc = k.min(rows);
    let nc = n.min(n_per_mxu).min(cols);
    let (stream, load) = (m, kc);
    let reuse = if c.weight_double_buffering { (m + nc).div_ceil(2) } else { m + nc };
    let period = stream.max(load).max(reuse);
    let limiter = if passes == 1 {
        format!(
            "fill and drain: one weight tile, so {m} streamed rows pay {} cycles of pipeline fill and drain ({m} of {cycles} cycles stream)",
            rows + nc - 1
        )
    } else if period == stream {
        format!("streaming: each pass streams {m} rows, and its {kc}-row weight load hides under the stream")
    } else if period == load {
        format!(
            "weight loading: each pass streams only {m} rows while its {kc} weight rows take {kc} cycles to load (one row per cycle); M >= {kc} keeps the array busy"
        )
    } else if !c.weight_double_buffering {
        format!(
            "no weight double buffering: the next tile's weights go in only after this tile's {m} rows have left its {nc} columns ({reuse} cycles per pass for {m} streamed)"
        )
    } else {
        format!(
            "weight-bank reuse: a bank is rewritten only after the pass two back has left its {nc} columns, so each pass takes (M + N) / 2 = {reuse} cycles for {m} streamed rows"
        )
    };
    let mut losses = Vec::new();
    if kc < rows {
        losses.push(format!("K = {k} fills {kc} of the {rows} array rows"));
    }
    if nc < cols {
        losses.push(format!("each MXU's N = {nc} uses {nc} of the {cols} columns"));
    }
    if losses.is_empty() { limiter } else { format!("{limiter}; also {}", losses.join(", ")) }
}

/// Refuses `--values` or `--pe-level` runs whose operands, results and workspace this host
/// cannot hold, before any is allocated.
fn check_memory(
    machine: &Machine,
    (m, k, n): (usize, usize, usize),
    precision: Precision,
    values: bool,
    pe_level: bool,
) -> Result<()> {
    if !values && !pe_level {
        return Ok(());
    }
    let f32s = |x: usize, y: usize| 4 * x as u64 * y as u64;
    let chunk = machine.core.mxu.rows;
    let mut parts = vec![
        ("A".to_string(), f32s(m, k)),
        ("B".to_string(), f32s(k, n)),
        ("C".to_string(), f32s(m, n)),
        ("packing workspace".to_string(), kernel_workspace(m, k, n, chunk, precision)),
    ];
    if pe_level {
        let block = (n.div_ceil(machine.core.mxu.cols)).div_ceil(machine.core.mxu.count) * machine.core.mxu.cols;
        let w = block.min(n);
        parts.push(("PE-level passes".to_string(), pe_array::matmul_bytes(&machine.core.mxu, (m, k, w), precision)));
        parts.push(("PE-level operands".to_string(), f32s(k + m, w)));
    }
    let bytes = parts.iter().map(|p| p.1).sum();
    parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    parts.truncate(3);
    let what = if pe_level { "the PE-level check" } else { "the bit-exact MXU kernel" };
    systolic::simulator::host::check(systolic::simulator::host::Need {
        what: format!("{what} of a {m}x{k}x{n} matmul"),
        bytes,
        parts,
        lower: "lower --m, --k or --n".into(),
    })?;
    Ok(())
}

/// Runs the PE-level array on random data for every MXU's share; returns its cycles and whether
/// its results equal the fast kernel's bit for bit.
fn pe_check(machine: &Machine, m: usize, k: usize, n: usize, precision: Precision) -> Result<(u64, bool)> {
    let core = &machine.core;
    let a = random_values(m * k, 1);
    let b = random_values(k * n, 2);
    let mut fast = vec![0f32; m * n];
    matmul(Matrix::new(&a, m, k), Matrix::new(&b, k, n), &mut fast, n, core.mxu.rows, precision);
    let block = (n.div_ceil(core.mxu.cols)).div_ceil(core.mxu.count) * core.mxu.cols;
    let mut cycles = 0;
    let mut identical = true;
    for c0 in (0..n).step_by(block) {
        let w = block.min(n - c0);
        let bb: Vec<f32> = (0..k).flat_map(|r| b[r * n + c0..r * n + c0 + w].iter().copied()).collect();
        let mut acc = vec![0f32; m * w];
        let run = pe_array::matmul_on(&core.mxu, &a, &bb, (m, k, w), precision, &mut acc)?;
        cycles = cycles.max(run.cycles);
        identical &= (0..m).all(|i| (0..w).all(|j| acc[i * w + j].to_bits() == fast[i * n + c0 + j].to_bits()));
    }
    Ok((cycles, identical))
}

/// Times the bit-exact MXU kernel on this host: (median, fastest) seconds.
fn time_values(
    machine: &Machine,
    m: usize,
    k: usize,
    n: usize,
    precision: Precision,
    repeat: usize,
) -> Result<(f64, f64)> {
    anyhow::ensure!(repeat >= 1, "--repeat must be at least 1");
    let a = random_values(m * k, 1);
    let b = random_values(k * n, 2);
    let mut c = vec![0f32; m * n];
    // `c = A · B`, as NumPy's `a @ b` computes it: the kernel's first chunk stores where the
    // others add, so no pass zeroes `c` first.
    let run = |c: &mut Vec<f32>| {
        matmul_into(Matrix::new(&a, m, k), Matrix::new(&b, k, n), c, n, machine.core.mxu.rows, precision);
    };
    run(&mut c); // warm up (page in, fill the packing workspace)
    let mut times: Vec<f64> = (0..repeat)
        .map(|_| {
            let t = Instant::now();
            run(&mut c);
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
}

/// Deterministic values in [-1, 1) with full f32 mantissas (so bf16 rounding matters).
fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

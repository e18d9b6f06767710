//! `systolic collective`: one collective alone over every core of a slice — its time on the
//! network model against the closed form, and the links it kept busiest.

use anyhow::{Result, bail};
use serde_json::json;
use systolic::simulator::pod::collectives::{self, Collective};
use systolic::simulator::pod::network::Network;
use systolic::simulator::pod::topology::{Direction, Topology};

use crate::table::{si, thousands};

#[derive(clap::Args)]
pub struct Args {
    /// Which collective: all-reduce, reduce-scatter, all-gather or broadcast.
    kind: String,
    /// Bytes per core: what each holds before an all-reduce, reduce-scatter or broadcast,
    /// after an all-gather.
    #[arg(long)]
    bytes: u64,
    /// A slice preset or `.ron` machine file.
    #[arg(long, default_value = "v3-128")]
    machine: String,
    /// Override a machine field (repeatable), e.g. `--set chip.ici.bytes_per_second=50e9`.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    sets: Vec<String>,
    /// Bytes a transfer moves per hop at a time (large transfers stream in chunks; an
    /// assumption of the model, not a published figure).
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: u64,
    /// How many of the busiest links to list.
    #[arg(long, default_value_t = 4)]
    links: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.bytes == 0 {
        bail!("--bytes 0: give the bytes each chip holds, at least 1");
    }
    if args.chunk_bytes == 0 {
        bail!("--chunk-bytes 0: give a chunk of at least 1 byte");
    }
    let machine = super::load_machine(&args.machine, &args.sets)?;
    let topo = Topology::of(&machine)?;
    // Each ring step sends 1/(2n) of a chip's bytes; more chunks than this per transfer
    // would take the model minutes, not the figure any accuracy.
    let smallest_ring = topo.dims.iter().copied().filter(|&d| d > 1).min().unwrap_or(1);
    let chunks = (args.bytes / (2 * smallest_ring as u64)).div_ceil(args.chunk_bytes);
    if chunks > 1 << 16 {
        bail!(
            "--chunk-bytes {} cuts each transfer into {chunks} chunks; use at least {} bytes",
            args.chunk_bytes,
            (args.bytes / (2 * smallest_ring as u64)).div_ceil(1 << 16)
        );
    }
    let (collective, name) = match args.kind.as_str() {
        "all-reduce" => (Collective::AllReduce, "all-reduce"),
        "reduce-scatter" => (Collective::ReduceScatter, "reduce-scatter"),
        "all-gather" => (Collective::AllGather, "all-gather"),
        "broadcast" => (Collective::Broadcast, "broadcast"),
        other => bail!("unknown collective '{other}': use all-reduce, reduce-scatter, all-gather or broadcast"),
    };
    let bytes = args.bytes as f64;
    let mut net = Network::new(&topo, args.chunk_bytes as f64);
    let mut ready = vec![0.0; topo.chips()];
    collectives::run(&mut net, &topo.whole(), collective, bytes, &mut ready)?;
    let seconds = ready.into_iter().fold(0.0, f64::max);
    let closed = (collective != Collective::Broadcast)
        .then(|| collectives::closed_form(&topo, &topo.whole(), collective, bytes));
    let shape = topo.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
    let wraps: Vec<&str> = topo.wraparound.iter().map(|&w| if w { "wraps" } else { "mesh" }).collect();
    let busiest: Vec<usize> = net.busiest().into_iter().take(args.links).collect();
    let describe = |l: usize| {
        let link = &topo.links[l];
        let dir = if link.direction == Direction::Up { "up" } else { "down" };
        (topo.coords(link.from), topo.coords(link.to), link.axis, dir, net.stats[l])
    };
    if args.json {
        let links: Vec<_> = busiest
            .iter()
            .map(|&l| {
                let (from, to, axis, dir, s) = describe(l);
                json!({
                    "from": from, "to": to, "axis": axis, "direction": dir, "bytes": s.bytes,
                    "busy_seconds": s.busy_seconds,
                    "utilization": if seconds > 0.0 { s.busy_seconds / seconds } else { 0.0 },
                })
            })
            .collect();
        let out = json!({
            "collective": name, "machine": machine.name, "chips": topo.chips(), "cores": topo.cores(),
            "torus": topo.dims, "wraparound": topo.wraparound, "bytes": args.bytes, "seconds": seconds,
            "closed_form_seconds": closed, "chunk_bytes": args.chunk_bytes, "busiest_links": links,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{name} of {}B per core on {} ({} chips, {shape}: {}; {} directed ICI links at {}B/s one way, {:.1} us per hop)",
        si(bytes),
        machine.name,
        topo.chips(),
        wraps.join(", "),
        topo.links.len(),
        si(topo.links.first().map_or(0.0, |l| l.bytes_per_second)),
        topo.links.first().map_or(0.0, |l| l.latency_seconds) * 1e6,
    );
    match closed {
        Some(closed) => println!(
            "time              {:.3} us  (closed form on unloaded rings, folded over mesh axes: {:.3} us)",
            seconds * 1e6,
            closed * 1e6
        ),
        None => println!("time              {:.3} us", seconds * 1e6),
    }
    println!("busiest links");
    for l in busiest {
        let (from, to, axis, dir, s) = describe(l);
        println!(
            "  {from:?} -> {to:?} (axis {axis}, {dir}): {} bytes, busy {:.3} us ({:.0}% of the collective)",
            thousands(s.bytes as u64),
            s.busy_seconds * 1e6,
            if seconds > 0.0 { 100.0 * s.busy_seconds / seconds } else { 0.0 }
        );
    }
    Ok(())
}

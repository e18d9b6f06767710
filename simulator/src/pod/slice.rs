//! Runs a slice: every core's program on the timing engine, collectives matched across the
//! members of their groups and timed on the network, the hosts' infeed and loop around them.
//!
//! A collective ends, on every member of its group, when the last member has its result: it
//! starts when the slowest member reaches it, so a straggler holds back its whole group. The
//! ICI unit of each core runs its collectives in program order, concurrently with the rest of
//! the core (a gradient bucket's all-reduce overlaps the backward pass still running).
//!
//! Cores that cannot differ are run once: cores start in classes of identical machines (the
//! same program, the same clock) and a class is split only where its cores' collectives end at
//! different times (groups on different links). When every replica is the same that is one
//! core run for the whole slice; [`Options::shortcut`] off runs every core on its own, and a
//! test holds the two equal.
//!
//! Hosts: each feeds its chips over PCIe from an input pipeline of a given rate; infeed for
//! the next step overlaps the current one (a prefetching queue), so it shows only where it is
//! slower than the device. Every `iterations_per_loop` steps the host takes a round trip, and
//! every `checkpoint_every` steps it reads the parameters back over PCIe.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::Machine;
use crate::error::{Error, Result};
use crate::functional::Functional;
use crate::isa::{Operation, Program};
use crate::pod::collectives::{self, Collective};
use crate::pod::network::Network;
use crate::pod::topology::{Direction, Group, Topology};
use crate::timing::{CoreTiming, Timing};

/// What the hosts do around the device's steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Hosts {
    pub examples_per_core: usize,
    /// Bytes of one example as the host sends it.
    pub example_bytes: u64,
    /// Examples per second one host's input pipeline produces (`None`: as fast as needed).
    pub examples_per_second: Option<f64>,
    /// Hosts whose pipelines run at another rate: host number -> examples per second.
    pub host_rates: BTreeMap<usize, f64>,
    /// Steps per host round trip (TPUConfig's `iterations_per_loop`).
    pub iterations_per_loop: u64,
    /// Seconds of one host round trip.
    pub loop_overhead_seconds: f64,
    /// A checkpoint every this many steps (`None`: never), of `checkpoint_bytes`.
    pub checkpoint_every: Option<u64>,
    pub checkpoint_bytes: u64,
}

impl Hosts {
    /// Hosts that feed `examples_per_core` examples of `example_bytes` with no limit of
    /// their own, one round trip per 100 steps of 1 ms each (an assumption: no public figure),
    /// no checkpoints.
    pub fn new(examples_per_core: usize, example_bytes: u64) -> Hosts {
        Hosts {
            examples_per_core,
            example_bytes,
            examples_per_second: None,
            host_rates: BTreeMap::new(),
            iterations_per_loop: 100,
            loop_overhead_seconds: 1e-3,
            checkpoint_every: None,
            checkpoint_bytes: 0,
        }
    }
}

/// How to run a slice.
#[derive(Clone, Debug)]
pub struct Options {
    /// Bytes a transfer moves per hop at a time (an assumption of the network model).
    pub chunk_bytes: f64,
    /// Run identical cores once (see the module's doc).
    pub shortcut: bool,
    /// Cores whose timing to report ([`Report::timings`]).
    pub trace_cores: Vec<usize>,
    /// Keep those cores' every instruction and the links' busy intervals, for traces.
    pub spans: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { chunk_bytes: (1 << 20) as f64, shortcut: true, trace_cores: Vec::new(), spans: false }
    }
}

/// One collective as the slice ran it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CollectiveRecord {
    pub instr: usize,
    pub kind: Collective,
    pub replicas: u32,
    /// Bytes per member.
    pub bytes: u64,
    /// When the first member reached it and when the last member had its result.
    pub start_seconds: f64,
    pub end_seconds: f64,
}

/// What one link carried over the step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LinkReport {
    pub link: usize,
    pub from: Vec<usize>,
    pub to: Vec<usize>,
    pub axis: usize,
    pub direction: Direction,
    pub bytes: f64,
    pub busy_seconds: f64,
    /// Busy time over the device's step.
    pub utilization: f64,
    /// When the link was busy (seconds), kept for traces.
    #[serde(skip)]
    pub intervals: Vec<(f64, f64)>,
}

/// One step of the slice.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub cores: usize,
    pub chips: usize,
    pub hosts: usize,
    /// Core runs made: 1 when every replica is the same.
    pub core_runs: usize,
    /// The step, from the first core's start to the last core's end.
    pub device_seconds: f64,
    /// The slowest core's step were its collectives instantaneous.
    pub compute_seconds: f64,
    /// Seconds some collective was in flight.
    pub collective_seconds: f64,
    /// The part of the device's step collectives add to the compute.
    pub exposed_collective_seconds: f64,
    /// Collective time behind compute.
    pub hidden_collective_seconds: f64,
    /// The slowest host's time to feed one step.
    pub infeed_seconds: f64,
    /// The part of each step spent waiting for input.
    pub exposed_infeed_seconds: f64,
    /// Each step's share of the hosts' round trips and checkpoints.
    pub host_seconds: f64,
    /// Wall time per step in a long run: device or infeed, whichever is slower, plus host.
    pub step_seconds: f64,
    pub collectives: Vec<CollectiveRecord>,
    /// The busiest links, busiest first.
    pub links: Vec<LinkReport>,
    /// The timings of [`Options::trace_cores`] (with their spans if [`Options::spans`]).
    #[serde(skip)]
    pub timings: Vec<(usize, Timing)>,
}

/// State one core run keeps per instruction (finish time, queue entry, spare): for the bound
/// on running every core on its own.
const CORE_RUN_BYTES_PER_INSTRUCTION: u64 = 16;

/// The most state all core runs together may keep.
const MAX_CORE_RUNS_BYTES: u64 = 4 << 30;

/// Cores that run alike: one engine for all of them.
#[derive(Clone)]
struct Class<'a> {
    engine: CoreTiming<'a>,
    clock_hz: f64,
    cores: Vec<usize>,
}

/// Each core's machine: the slice's, with a slow chip's clock.
fn clocks(machine: &Machine, topo: &Topology) -> Vec<f64> {
    let mut chip_clock = vec![machine.core.clock_hz; topo.chips()];
    for slow in &machine.slice.slow_chips {
        chip_clock[topo.chip_at(&slow.chip)] = slow.clock_hz;
    }
    (0..topo.cores()).map(|c| chip_clock[topo.chip_of(c)]).collect()
}

/// The members of a collective instruction: its kind, groups and bytes per member.
fn collective_of(program: &Program, i: usize) -> (Collective, u32, u64) {
    let Operation::Collective { kind, tiles, replicas, .. } = &program.instrs[i].op else {
        unreachable!("runs pause at collectives")
    };
    (*kind, *replicas, tiles.iter().map(|t| t.bytes()).sum())
}

/// Simulates one step of `program` on every core of `machine`'s slice (validating it once).
pub fn simulate(machine: &Machine, program: &Program, hosts: &Hosts, options: &Options) -> Result<Report> {
    program.validate(machine)?;
    let topo = Topology::of(machine)?;
    let clock = clocks(machine, &topo);
    let machines: Vec<Machine> = {
        let mut distinct: Vec<f64> = clock.clone();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        distinct
            .into_iter()
            .map(|hz| {
                let mut m = machine.clone();
                m.core.clock_hz = hz;
                m
            })
            .collect()
    };
    let machine_of = |hz: f64| machines.iter().find(|m| m.core.clock_hz == hz).expect("every clock has a machine");
    // The compute alone, per distinct clock: collectives take no time.
    let mut compute_seconds: f64 = 0.0;
    for m in &machines {
        let mut core = CoreTiming::new(m, program, false)?;
        while let Some((_, at)) = core.advance()? {
            core.complete(at);
        }
        compute_seconds = compute_seconds.max(core.finish().report.seconds);
    }
    // Every core on its own keeps a run's state per core: refuse what the host cannot hold.
    if !options.shortcut {
        let bytes = topo.cores() as u64 * program.instrs.len() as u64 * CORE_RUN_BYTES_PER_INSTRUCTION;
        if bytes > MAX_CORE_RUNS_BYTES {
            return Err(Error::Config {
                field: "shortcut".into(),
                reason: format!(
                    "running each of the {} cores on its own keeps about {:.1} GiB of state ({} instructions per core), over {} GiB: keep the shortcut (cores that run alike are simulated once, with the same result) or simulate a smaller slice",
                    topo.cores(),
                    bytes as f64 / (1u64 << 30) as f64,
                    program.instrs.len(),
                    MAX_CORE_RUNS_BYTES >> 30
                ),
            });
        }
    }
    // The classes: by clock with the shortcut, else one per core. A class holding a traced
    // core keeps spans (an engine keeps them from its start).
    let traced = |core: usize, hz: f64| {
        options.spans
            && options.trace_cores.iter().any(|&t| if options.shortcut { clock.get(t) == Some(&hz) } else { t == core })
    };
    let mut classes: Vec<Class> = Vec::new();
    for (core, &hz) in clock.iter().enumerate() {
        let found = if options.shortcut { classes.iter().position(|c| c.clock_hz == hz) } else { None };
        match found {
            Some(c) => classes[c].cores.push(core),
            None => classes.push(Class {
                engine: CoreTiming::new(machine_of(hz), program, traced(core, hz))?,
                clock_hz: hz,
                cores: vec![core],
            }),
        }
    }
    let mut core_runs = classes.len();
    let mut net = Network::new(&topo, options.chunk_bytes);
    if options.spans {
        net.keep_intervals();
    }
    let mut groups: BTreeMap<u32, Vec<Group>> = BTreeMap::new();
    let mut records = Vec::new();
    let mut ready_chip = vec![0.0; topo.chips()];
    let mut end_core = vec![0.0; topo.cores()];
    let mut at_core = vec![0.0; topo.cores()];
    loop {
        let mut stops = Vec::with_capacity(classes.len());
        for class in &mut classes {
            stops.push(class.engine.advance()?);
        }
        let Some(Some((i, _))) = stops.first().copied() else { break };
        if stops.iter().any(|s| s.map(|(j, _)| j) != Some(i)) {
            return Err(Error::Program {
                index: i,
                op: program.instrs[i].op.name(),
                reason: "the cores reached different collectives: every member of a group must run the same collectives in the same order".into(),
            });
        }
        let (kind, replicas, bytes) = collective_of(program, i);
        if let std::collections::btree_map::Entry::Vacant(v) = groups.entry(replicas) {
            v.insert(topo.groups(replicas as usize)?);
        }
        for (class, stop) in classes.iter().zip(&stops) {
            let (_, at) = stop.expect("every class stopped here");
            for &c in &class.cores {
                at_core[c] = at as f64 / class.clock_hz;
            }
        }
        let mut start = f64::INFINITY;
        let mut end = 0f64;
        for group in &groups[&replicas] {
            let per_chip = group.cores_per_chip;
            let chips: Vec<usize> = (0..group.chips()).map(|l| group.chip(&topo, l)).collect();
            for (l, &chip) in chips.iter().enumerate() {
                let first = group.first_core + l * per_chip;
                ready_chip[chip] = at_core[first..first + per_chip].iter().copied().fold(0.0, f64::max);
                start = start.min(ready_chip[chip]);
            }
            collectives::run(&mut net, group, kind, bytes as f64, &mut ready_chip)?;
            let group_end = chips.iter().map(|&c| ready_chip[c]).fold(0.0, f64::max);
            end = end.max(group_end);
            end_core[group.first_core..group.first_core + group.cores()].fill(group_end);
        }
        records.push(CollectiveRecord { instr: i, kind, replicas, bytes, start_seconds: start, end_seconds: end });
        // Split classes whose cores end at different times, then end the collective.
        let mut next = Vec::with_capacity(classes.len());
        for mut class in classes {
            let mut by_end: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for &c in &class.cores {
                by_end.entry(end_core[c].to_bits()).or_default().push(c);
            }
            let cycles = |bits: u64, hz: f64| (f64::from_bits(bits) * hz).ceil() as u64;
            if by_end.len() == 1 {
                let (&bits, _) = by_end.iter().next().expect("a class has cores");
                class.engine.complete(cycles(bits, class.clock_hz));
                next.push(class);
                continue;
            }
            core_runs += by_end.len() - 1;
            for (bits, cores) in by_end {
                let mut part = class.clone();
                part.cores = cores;
                part.engine.complete(cycles(bits, part.clock_hz));
                next.push(part);
            }
        }
        next.sort_by_key(|c| c.cores[0]);
        classes = next;
    }
    let mut device_seconds: f64 = 0.0;
    let mut timings = Vec::new();
    for class in classes {
        let traced: Vec<usize> = class.cores.iter().copied().filter(|c| options.trace_cores.contains(c)).collect();
        let timing = class.engine.finish();
        device_seconds = device_seconds.max(timing.report.seconds);
        for c in traced {
            timings.push((c, timing.clone()));
        }
    }
    timings.sort_by_key(|(c, _)| *c);
    // Seconds some collective was in flight: the union of their spans.
    let mut spans: Vec<(f64, f64)> = records.iter().map(|r| (r.start_seconds, r.end_seconds)).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut collective_seconds = 0.0;
    let mut reach = f64::NEG_INFINITY;
    for (s, e) in spans {
        let s = s.max(reach);
        if e > s {
            collective_seconds += e - s;
            reach = e;
        }
    }
    let exposed = (device_seconds - compute_seconds).max(0.0);
    let infeed_seconds = infeed(machine, &topo, hosts)?;
    let exposed_infeed = (infeed_seconds - device_seconds).max(0.0);
    let host_seconds = host_share(machine, hosts)?;
    let links = net
        .busiest()
        .into_iter()
        .take(8)
        .filter(|&l| net.stats[l].bytes > 0.0)
        .map(|l| {
            let link = &topo.links[l];
            let s = net.stats[l];
            LinkReport {
                link: l,
                from: topo.coords(link.from),
                to: topo.coords(link.to),
                axis: link.axis,
                direction: link.direction,
                bytes: s.bytes,
                busy_seconds: s.busy_seconds,
                utilization: if device_seconds > 0.0 { s.busy_seconds / device_seconds } else { 0.0 },
                intervals: net.intervals.as_ref().map_or(Vec::new(), |i| i[l].clone()),
            }
        })
        .collect();
    Ok(Report {
        cores: topo.cores(),
        chips: topo.chips(),
        hosts: topo.hosts(),
        core_runs,
        device_seconds,
        compute_seconds,
        collective_seconds,
        exposed_collective_seconds: exposed,
        hidden_collective_seconds: (collective_seconds - exposed).max(0.0),
        infeed_seconds,
        exposed_infeed_seconds: exposed_infeed,
        host_seconds,
        step_seconds: device_seconds.max(infeed_seconds) + host_seconds,
        collectives: records,
        links,
        timings,
    })
}

/// The slowest host's time to feed one step: its pipeline's examples at its rate, or its
/// chips' bytes over their PCIe links (each chip has its own), whichever is slower.
fn infeed(machine: &Machine, topo: &Topology, hosts: &Hosts) -> Result<f64> {
    let host_count = topo.hosts();
    let bad = |field: &str, reason: String| Error::Config { field: field.into(), reason };
    for (&h, &rate) in &hosts.host_rates {
        if h >= host_count {
            return Err(bad("host rates", format!("host {h} does not exist: the slice has {host_count} hosts")));
        }
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(bad("host rates", format!("host {h}'s rate must be a positive number, got {rate}")));
        }
    }
    if let Some(r) = hosts.examples_per_second
        && !(r > 0.0 && r.is_finite())
    {
        return Err(bad("input rate", format!("examples per second must be a positive number, got {r}")));
    }
    let chips_per_host = topo.chips_per_host.min(topo.chips());
    let examples = (hosts.examples_per_core * topo.cores_per_chip * chips_per_host) as f64;
    let pcie = (hosts.examples_per_core * topo.cores_per_chip) as f64 * hosts.example_bytes as f64
        / machine.host.pcie_bytes_per_second;
    let slowest = (0..host_count)
        .map(|h| hosts.host_rates.get(&h).copied().or(hosts.examples_per_second).map_or(0.0, |rate| examples / rate))
        .fold(0.0, f64::max);
    Ok(slowest.max(pcie))
}

/// Each step's share of the host's round trips and checkpoints (parameters read back over one
/// chip's PCIe link).
fn host_share(machine: &Machine, hosts: &Hosts) -> Result<f64> {
    if hosts.iterations_per_loop == 0 {
        return Err(Error::Config {
            field: "iterations_per_loop".into(),
            reason: "must be at least 1 step per host round trip".into(),
        });
    }
    if !(hosts.loop_overhead_seconds >= 0.0 && hosts.loop_overhead_seconds.is_finite()) {
        return Err(Error::Config {
            field: "loop overhead".into(),
            reason: format!("must be zero or positive seconds, got {}", hosts.loop_overhead_seconds),
        });
    }
    let checkpoint = match hosts.checkpoint_every {
        Some(0) => {
            return Err(Error::Config { field: "checkpoint every".into(), reason: "must be at least 1 step".into() });
        }
        Some(n) => hosts.checkpoint_bytes as f64 / machine.host.pcie_bytes_per_second / n as f64,
        None => 0.0,
    };
    Ok(hosts.loop_overhead_seconds / hosts.iterations_per_loop as f64 + checkpoint)
}

/// Runs `program` for values on `cores` (one engine per core of the slice, in core order, its
/// inputs loaded), validating it once: each core runs to its next collective, then each group
/// exchanges its members' tiles as [`collectives::values`] says, and all go on — the same bits
/// every run and thread count.
pub fn run_values(machine: &Machine, program: &Program, cores: &mut [Functional]) -> Result<()> {
    program.validate(machine)?;
    run_values_validated(machine, program, cores)
}

/// [`run_values`] for a program already validated: a runtime running the same step again.
pub fn run_values_validated(machine: &Machine, program: &Program, cores: &mut [Functional]) -> Result<()> {
    let topo = Topology::of(machine)?;
    if cores.len() != topo.cores() {
        return Err(Error::Data(format!("{} cores given for a slice of {}", cores.len(), topo.cores())));
    }
    let mut from = 0;
    loop {
        let mut stops = Vec::with_capacity(cores.len());
        for core in cores.iter_mut() {
            stops.push(core.run_until_collective(program, from)?);
        }
        let Some(i) = stops[0] else { return Ok(()) };
        let Operation::Collective { kind, reduction, tiles, shard, replicas } = &program.instrs[i].op else {
            unreachable!("runs pause at collectives")
        };
        for group in topo.groups(*replicas as usize)? {
            let members = group.first_core..group.first_core + group.cores();
            let mut operands = Vec::with_capacity(group.cores());
            for c in members.clone() {
                let mut v = Vec::new();
                for &t in tiles {
                    v.extend(cores[c].read(t)?);
                }
                operands.push(v);
            }
            let ranges = collectives::shards(operands[0].len(), group.cores());
            // An all-gather from shard tiles: each member's shard comes from its tile.
            if let (Collective::AllGather, Some(s)) = (kind, shard) {
                for (r, c) in members.clone().enumerate() {
                    let range = ranges[r].clone();
                    let mine = cores[c].read(*s)?;
                    operands[r][range.clone()].copy_from_slice(&mine[..range.len()]);
                }
            }
            collectives::values(&group, *kind, *reduction, &mut operands);
            for (r, (c, values)) in members.zip(operands).enumerate() {
                match (kind, shard) {
                    // To the shard tile: member r's shard, at its start.
                    (Collective::ReduceScatter | Collective::Shard, Some(s)) => {
                        let mut mine = cores[c].read(*s)?;
                        let range = ranges[r].clone();
                        mine[..range.len()].copy_from_slice(&values[range]);
                        cores[c].write(*s, &mine)?;
                    }
                    _ => {
                        let mut at = 0;
                        for &t in tiles {
                            let n = t.elements() as usize;
                            cores[c].write(t, &values[at..at + n])?;
                            at += n;
                        }
                    }
                }
            }
        }
        from = i + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;
    use crate::isa::{DType, Reduction, Space, Tile, UnaryOp};

    /// A data-parallel step in miniature: compute (a copy through VMEM, a VPU op), then a
    /// bucket's all-reduce while more compute runs, a second bucket, and an update that waits
    /// for both.
    fn step(replicas: u32) -> Program {
        let mut p = Program::new("step");
        let hbm = |at: u64, rows: usize| Tile::new(Space::Hbm, at, rows, 1024, DType::F32);
        let vmem = Tile::new(Space::Vmem, 0, 64, 1024, DType::F32);
        let mut last = p.push(Operation::Barrier, &[]);
        let mut buckets = Vec::new();
        for b in 0..2u64 {
            for _ in 0..8 {
                let l = p.push(Operation::dma(0, hbm(0, 64), vmem), &[last]);
                let u = p.push(Operation::Unary { op: UnaryOp::Relu, src: vmem, dst: vmem }, &[l]);
                last = p.push(Operation::dma(1, vmem, hbm((1 + b) << 20, 64)), &[u]);
            }
            let tiles = vec![hbm((1 + b) << 20, 64), hbm((4 + b) << 20, 192)];
            let c = Operation::Collective {
                kind: Collective::AllReduce,
                reduction: Reduction::Mean,
                tiles,
                shard: None,
                replicas,
            };
            buckets.push(p.push(c, &[last]));
        }
        let l = p.push(Operation::dma(0, hbm(1 << 20, 64), vmem), &buckets);
        p.push(Operation::dma(1, vmem, hbm(8 << 20, 64)), &[l]);
        p
    }

    fn same(a: &Report, b: &Report) {
        assert_eq!(a.device_seconds.to_bits(), b.device_seconds.to_bits());
        assert_eq!(a.collectives, b.collectives);
        assert_eq!(a.links, b.links);
        assert_eq!(a.compute_seconds.to_bits(), b.compute_seconds.to_bits());
    }

    #[test]
    fn the_shortcut_equals_every_core_run_on_its_own() {
        // v2-8 and v3-32, as they are, with a slow chip, and with a degraded link (which makes
        // the groups of a row end at different times): the shortcut runs fewer cores and gives
        // the same bits.
        let mut slow = presets::preset("v3-32").unwrap();
        slow.slice.slow_chips = vec![crate::config::SlowChip { chip: vec![1, 2], clock_hz: 470e6 }];
        let mut degraded = presets::preset("v3-32").unwrap();
        degraded.slice.links = vec![crate::config::LinkOverride {
            chip: vec![2, 1],
            axis: 1,
            direction: Direction::Up,
            bytes_per_second: Some(1e9),
            failed: false,
        }];
        let hosts = Hosts::new(128, 150_528);
        for (machine, replicas, runs) in [
            (presets::preset("v2-8").unwrap(), 8, 1),
            (presets::preset("v3-32").unwrap(), 32, 1),
            (slow, 32, 2),
            (degraded, 8, 2),
        ] {
            let p = step(replicas);
            let fast = simulate(&machine, &p, &hosts, &Options::default()).unwrap();
            let full = simulate(&machine, &p, &hosts, &Options { shortcut: false, ..Options::default() }).unwrap();
            same(&fast, &full);
            assert_eq!(
                (fast.core_runs, full.core_runs),
                (runs, machine.chip.cores * machine.chips()),
                "{}",
                machine.name
            );
            assert_eq!(fast.collectives.len(), 2);
            assert!(fast.device_seconds > fast.compute_seconds, "{}", machine.name);
        }
    }

    #[test]
    fn a_slow_chip_holds_back_the_slice_and_buckets_overlap_compute() {
        let machine = presets::preset("v3-32").unwrap();
        let hosts = Hosts::new(128, 150_528);
        let p = step(32);
        let even = simulate(&machine, &p, &hosts, &Options::default()).unwrap();
        // The first bucket's all-reduce runs while the second bucket's compute does.
        let (first, second) = (&even.collectives[0], &even.collectives[1]);
        assert!(first.start_seconds < second.start_seconds && first.end_seconds > first.start_seconds);
        assert!(even.hidden_collective_seconds > 0.0, "{even:?}");
        // The ICI runs one collective at a time: the second waits for the first. What shows
        // is the rest, and the shares add up to the device's step.
        assert!(second.start_seconds >= first.end_seconds);
        let exposed = even.exposed_collective_seconds;
        assert!(exposed > 0.0 && exposed < even.collective_seconds, "{even:#?}");
        assert!((even.compute_seconds + exposed - even.device_seconds).abs() < 1e-15);
        let mut m = machine.clone();
        m.slice.slow_chips = vec![crate::config::SlowChip { chip: vec![3, 3], clock_hz: machine.core.clock_hz / 2.0 }];
        let slow = simulate(&m, &p, &hosts, &Options::default()).unwrap();
        // Its cores take the same cycles at half the clock; the first all-reduce waits for
        // them, so it ends later by what they are late, and so does the step.
        assert!((slow.compute_seconds - 2.0 * even.compute_seconds).abs() < 1e-12);
        let late = even.collectives[0].start_seconds;
        let shift = slow.collectives[0].end_seconds - even.collectives[0].end_seconds;
        assert!((shift - late).abs() < 1e-8, "{shift} vs {late}");
        assert!(slow.device_seconds > even.device_seconds + 0.9 * late);
    }

    #[test]
    fn hosts_show_as_infeed_and_round_trips() {
        let machine = presets::preset("v3-32").unwrap();
        let p = step(32);
        let quick = simulate(&machine, &p, &Hosts::new(128, 150_528), &Options::default()).unwrap();
        // PCIe alone: 256 examples of 150,528 bytes per chip at 16 GB/s.
        let pcie = 256.0 * 150_528.0 / 16e9;
        assert!((quick.infeed_seconds - pcie).abs() < 1e-12, "{}", quick.infeed_seconds);
        // A host making 1,000 examples/s feeds 4 chips x 256 examples in 1.024 s: infeed-bound,
        // and one slower host bounds the slice.
        let mut hosts = Hosts::new(128, 150_528);
        hosts.examples_per_second = Some(1000.0);
        let r = simulate(&machine, &p, &hosts, &Options::default()).unwrap();
        assert!((r.infeed_seconds - 1.024).abs() < 1e-12);
        assert!((r.exposed_infeed_seconds - (1.024 - r.device_seconds)).abs() < 1e-12);
        hosts.host_rates.insert(1, 500.0);
        assert!((simulate(&machine, &p, &hosts, &Options::default()).unwrap().infeed_seconds - 2.048).abs() < 1e-12);
        // Round trips and checkpoints: 1 ms per 100 steps, 100 MB every 1,000 steps.
        let mut hosts = Hosts::new(128, 150_528);
        hosts.checkpoint_every = Some(1000);
        hosts.checkpoint_bytes = 100_000_000;
        let r = simulate(&machine, &p, &hosts, &Options::default()).unwrap();
        assert!((r.host_seconds - (1e-5 + 1e8 / 16e9 / 1000.0)).abs() < 1e-15, "{}", r.host_seconds);
        assert!((r.step_seconds - (r.device_seconds.max(r.infeed_seconds) + r.host_seconds)).abs() < 1e-15);
        // Bad settings are errors naming them.
        hosts.host_rates.insert(9, 10.0);
        let e = simulate(&machine, &p, &hosts, &Options::default()).unwrap_err().to_string();
        assert!(e.contains("host 9 does not exist: the slice has 4 hosts"), "{e}");
    }

    #[test]
    fn every_core_on_its_own_is_refused_beyond_the_hosts_memory() {
        // 8,192 cores x 40,000 instructions would keep ~4.9 GiB of run state: an error that
        // says to keep the shortcut, not an allocation the host cannot make.
        let machine = presets::preset("v4-8192").unwrap();
        let mut p = Program::new("long");
        for _ in 0..40_000 {
            p.push(Operation::Barrier, &[]);
        }
        let options = Options { shortcut: false, ..Options::default() };
        let e = simulate(&machine, &p, &Hosts::new(1, 1), &options).unwrap_err().to_string();
        assert!(e.contains("8192 cores") && e.contains("keep the shortcut"), "{e}");
        assert!(simulate(&machine, &p, &Hosts::new(1, 1), &Options::default()).is_ok());
    }

    #[test]
    fn groups_that_do_not_exist_are_refused() {
        let machine = presets::preset("v3-32").unwrap();
        let e = simulate(&machine, &step(6), &Hosts::new(1, 1), &Options::default()).unwrap_err().to_string();
        assert!(e.contains("a group of 6 replicas does not exist"), "{e}");
        // One core alone cannot run a collective over others.
        let e = crate::timing::simulate(&machine, &step(32), false).unwrap_err().to_string();
        assert!(e.contains("needs the other replicas"), "{e}");
    }

    #[test]
    fn values_are_exchanged_in_lock_step() {
        // v2-8: each core holds its own numbers; after the step every core has the mean of
        // the first bucket's tiles, as collectives::values computes it.
        let machine = presets::preset("v2-8").unwrap();
        let p = step(8);
        let mut cores: Vec<Functional> = (0..8).map(|_| Functional::new(&machine)).collect();
        let input = Tile::new(Space::Hbm, 0, 64, 1024, DType::F32);
        let other = Tile::new(Space::Hbm, 4 << 20, 192, 1024, DType::F32);
        for (c, core) in cores.iter_mut().enumerate() {
            let v: Vec<f32> = (0..64 * 1024).map(|e| ((c * 31 + e) % 17) as f32 - 8.0).collect();
            core.write(input, &v).unwrap();
            let w: Vec<f32> = (0..192 * 1024).map(|e| (c + e % 5) as f32 * 0.1).collect();
            core.write(other, &w).unwrap();
        }
        let mut operands: Vec<Vec<f32>> = cores
            .iter_mut()
            .map(|core| {
                let relu: Vec<f32> = core.read(input).unwrap().into_iter().map(|x| x.max(0.0)).collect();
                [relu, core.read(other).unwrap()].concat()
            })
            .collect();
        run_values(&machine, &p, &mut cores).unwrap();
        let topo = Topology::of(&machine).unwrap();
        collectives::values(&topo.whole(), Collective::AllReduce, Reduction::Mean, &mut operands);
        let out = Tile::new(Space::Hbm, 8 << 20, 64, 1024, DType::F32);
        for core in &mut cores {
            assert_eq!(core.read(out).unwrap(), operands[0][..64 * 1024]);
            assert_eq!(core.read(other).unwrap(), operands[0][64 * 1024..]);
        }
    }

    #[test]
    fn shard_tiles_take_and_give_each_replicas_part() {
        // v2-8: a sharded weight update's collectives on 1,003 elements in two tiles (shards of
        // 126 and 125): the gradients reduce-scattered to a shard tile, each replica's part of
        // the (replicated) parameters taken, the parts gathered back into every replica's tiles.
        let machine = presets::preset("v2-8").unwrap();
        let hbm = |at: u64, n: usize| Tile::new(Space::Hbm, at, 1, n, DType::F32);
        let (g1, g2, p1, p2) = (hbm(0, 1000), hbm(8192, 3), hbm(16384, 1000), hbm(24576, 3));
        let (gs, ps) = (hbm(32768, 128), hbm(40960, 128));
        // Reduce-scatter by Mean; the others move values (Sum, as validation asks).
        let collective = |kind, tiles: Vec<Tile>, shard| Operation::Collective {
            kind,
            reduction: if kind == Collective::ReduceScatter { Reduction::Mean } else { Reduction::Sum },
            tiles,
            shard: Some(shard),
            replicas: 8,
        };
        let mut p = Program::new("sharded");
        let rs = p.push(collective(Collective::ReduceScatter, vec![g1, g2], gs), &[]);
        let take = p.push(collective(Collective::Shard, vec![p1, p2], ps), &[rs]);
        p.push(collective(Collective::AllGather, vec![p1, p2], ps), &[take]);
        let mut cores: Vec<Functional> = (0..8).map(|_| Functional::new(&machine)).collect();
        let params: Vec<f32> = (0..1003).map(|e| e as f32 * 0.5).collect();
        let mut grads = Vec::new();
        for (c, core) in cores.iter_mut().enumerate() {
            let g: Vec<f32> = (0..1003).map(|e| ((c * 7 + e) % 13) as f32 * 0.1).collect();
            core.write(g1, &g[..1000]).unwrap();
            core.write(g2, &g[1000..]).unwrap();
            core.write(p1, &params[..1000]).unwrap();
            core.write(p2, &params[1000..]).unwrap();
            grads.push(g);
        }
        let mut reduced = grads.clone();
        let topo = Topology::of(&machine).unwrap();
        collectives::values(&topo.whole(), Collective::AllReduce, Reduction::Mean, &mut reduced);
        run_values(&machine, &p, &mut cores).unwrap();
        let ranges = collectives::shards(1003, 8);
        assert_eq!((ranges[0].len(), ranges[7].len()), (126, 125));
        for (r, core) in cores.iter_mut().enumerate() {
            let range = ranges[r].clone();
            // The reduce-scatter's shard has the all-reduce's bits; the gradients stay.
            assert_eq!(core.read(gs).unwrap()[..range.len()], reduced[0][range.clone()]);
            assert_eq!(core.read(g1).unwrap(), grads[r][..1000]);
            // Each replica's part of the parameters, and every part back in place on all.
            assert_eq!(core.read(ps).unwrap()[..range.len()], params[range]);
            assert_eq!([core.read(p1).unwrap(), core.read(p2).unwrap()].concat(), params);
        }
        // The same program times: a shard is a local copy, the others move the operand.
        let report = simulate(&machine, &p, &Hosts::new(1, 4), &Options::default()).unwrap();
        let kinds: Vec<Collective> = report.collectives.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [Collective::ReduceScatter, Collective::Shard, Collective::AllGather]);
        let shard = &report.collectives[1];
        let copy = 2.0 * 1003.0 * 4.0 / 8.0 / topo.core_bytes_per_second;
        assert!((shard.end_seconds - shard.start_seconds - copy).abs() < 1e-12, "{shard:?}");
        // A group of one: the shard tile takes (or gives) the whole operand.
        let one = |kind, tiles: Vec<Tile>, shard| {
            let Operation::Collective { reduction, .. } = collective(kind, Vec::new(), shard) else { unreachable!() };
            Operation::Collective { kind, reduction, tiles, shard: Some(shard), replicas: 1 }
        };
        let whole = hbm(49152, 1003);
        let mut p1_only = Program::new("alone");
        let rs = p1_only.push(one(Collective::ReduceScatter, vec![g1, g2], whole), &[]);
        let zero =
            p1_only.push(Operation::Fill { dst: Tile::new(Space::Vmem, 0, 1, 1000, DType::F32), value: 0.0 }, &[]);
        let dma = p1_only.push(Operation::dma(0, Tile::new(Space::Vmem, 0, 1, 1000, DType::F32), g1), &[zero, rs]);
        p1_only.push(one(Collective::AllGather, vec![g1, g2], whole), &[dma]);
        let mut core = Functional::new(&machine);
        core.write(g1, &grads[0][..1000]).unwrap();
        core.write(g2, &grads[0][1000..]).unwrap();
        core.run(&p1_only).unwrap();
        assert_eq!(core.read(whole).unwrap(), grads[0]);
        assert_eq!(core.read(g1).unwrap(), grads[0][..1000]);
        // What a shard tile must be.
        let bad = |op: Operation, want: &str| {
            let mut p = Program::new("bad");
            p.push(op, &[]);
            let e = p.validate(&machine).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        bad(
            collective(Collective::ReduceScatter, vec![g1, g2], hbm(32768, 125)),
            "the longest of 8 shards of 1003 has 126",
        );
        bad(collective(Collective::AllReduce, vec![g1], gs), "works in place: give no shard tile");
        bad(
            Operation::Collective {
                kind: Collective::Shard,
                reduction: Reduction::Sum,
                tiles: vec![p1],
                shard: None,
                replicas: 8,
            },
            "shard needs a shard tile",
        );
        bad(collective(Collective::ReduceScatter, vec![g1], hbm(0, 200)), "overlap");
    }
}

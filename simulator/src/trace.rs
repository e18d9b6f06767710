//! Chrome trace-event JSON of a timed run: one track per unit, one slice per instruction.
//! Opens in Perfetto (ui.perfetto.dev) and chrome://tracing.

use serde_json::{Value, json};

use crate::config::Machine;
use crate::isa::{Program, Unit};
use crate::timing::Span;

/// The trace of `spans` (from [`crate::timing::simulate`] with spans kept), times in microseconds.
pub fn chrome_trace(machine: &Machine, program: &Program, spans: &[Span]) -> Value {
    let mut events = Vec::new();
    core_events(&mut events, machine, program, 0, spans);
    json!({ "traceEvents": events, "displayTimeUnit": "ns" })
}

/// The trace of a slice's step: a process per traced core (its units as tracks), and a process
/// for the network with a track of the collectives and one per busiest link.
pub fn slice_trace(machine: &Machine, program: &Program, report: &crate::pod::slice::Report) -> Value {
    let mut events = Vec::new();
    for (core, timing) in &report.timings {
        core_events(&mut events, machine, program, *core, &timing.spans);
    }
    let pid = report.cores;
    let us = |s: f64| s * 1e6;
    events.push(
        json!({ "name": "process_name", "ph": "M", "pid": pid, "args": { "name": format!("{} ICI", machine.name) } }),
    );
    events.push(json!({ "name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": { "name": "collectives" } }));
    for c in &report.collectives {
        events.push(json!({
            "name": c.kind.name(), "ph": "X", "pid": pid, "tid": 0, "ts": us(c.start_seconds),
            "dur": us(c.end_seconds - c.start_seconds),
            "args": { "instruction": c.instr, "bytes": c.bytes, "replicas": c.replicas },
        }));
    }
    for (t, l) in report.links.iter().enumerate() {
        let name = format!("link {:?} -> {:?} (axis {}, {:?})", l.from, l.to, l.axis, l.direction);
        events.push(json!({ "name": "thread_name", "ph": "M", "pid": pid, "tid": t + 1, "args": { "name": name } }));
        for &(start, end) in &l.intervals {
            events.push(
                json!({ "name": "busy", "ph": "X", "pid": pid, "tid": t + 1, "ts": us(start), "dur": us(end - start) }),
            );
        }
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ns" })
}

/// One core's process: a track per unit, a slice per instruction.
fn core_events(events: &mut Vec<Value>, machine: &Machine, program: &Program, pid: usize, spans: &[Span]) {
    let mut units: Vec<Unit> = spans.iter().map(|s| s.unit).collect();
    units.sort();
    units.dedup();
    let tid = |u: Unit| units.iter().position(|&x| x == u).unwrap_or(0);
    let us = |cycles: u64| cycles as f64 / machine.core.clock_hz * 1e6;
    events.push(json!({
        "name": "process_name", "ph": "M", "pid": pid,
        "args": { "name": format!("{} core {pid}: {}", machine.name, program.name) }
    }));
    for &u in &units {
        events.push(
            json!({ "name": "thread_name", "ph": "M", "pid": pid, "tid": tid(u), "args": { "name": u.to_string() } }),
        );
        events.push(json!({ "name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid(u), "args": { "sort_index": tid(u) } }));
    }
    for s in spans {
        let op = &program.instrs[s.instr as usize].op;
        events.push(json!({
            "name": op.name(),
            "cat": s.unit.to_string(),
            "ph": "X",
            "pid": pid,
            "tid": tid(s.unit),
            "ts": us(s.start),
            "dur": us(s.end - s.start),
            "args": { "instruction": s.instr, "start_cycle": s.start, "end_cycle": s.end, "op": op.to_string() },
        }));
    }
}

//! Chrome trace-event JSON of a timed run: one track per unit, one slice per instruction.
//! Opens in Perfetto (ui.perfetto.dev) and chrome://tracing.

use serde_json::{Value, json};

use crate::config::Machine;
use crate::isa::{Program, Unit};
use crate::timing::Span;

/// The trace of `spans` (from [`crate::timing::simulate`] with spans kept), times in microseconds.
pub fn chrome_trace(machine: &Machine, program: &Program, spans: &[Span]) -> Value {
    let mut units: Vec<Unit> = spans.iter().map(|s| s.unit).collect();
    units.sort();
    units.dedup();
    let tid = |u: Unit| units.iter().position(|&x| x == u).unwrap_or(0);
    let us = |cycles: u64| cycles as f64 / machine.core.clock_hz * 1e6;
    let mut events: Vec<Value> = vec![json!({
        "name": "process_name", "ph": "M", "pid": 0,
        "args": { "name": format!("{} core 0: {}", machine.name, program.name) }
    })];
    for &u in &units {
        events.push(
            json!({ "name": "thread_name", "ph": "M", "pid": 0, "tid": tid(u), "args": { "name": u.to_string() } }),
        );
        events.push(json!({ "name": "thread_sort_index", "ph": "M", "pid": 0, "tid": tid(u), "args": { "sort_index": tid(u) } }));
    }
    for s in spans {
        let op = &program.instrs[s.instr as usize].op;
        events.push(json!({
            "name": op.name(),
            "cat": s.unit.to_string(),
            "ph": "X",
            "pid": 0,
            "tid": tid(s.unit),
            "ts": us(s.start),
            "dur": us(s.end - s.start),
            "args": { "instruction": s.instr, "start_cycle": s.start, "end_cycle": s.end, "op": op.to_string() },
        }));
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ns" })
}

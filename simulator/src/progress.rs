//! Progress of long runs, for whoever shows it: the engines report `(done, total)` as they go
//! (the reference per node, the functional engine per thousand instructions) and a program
//! installs a [`Sink`] once — the CLI draws a progress bar on a terminal — in the manner of
//! the `log` crate. Without a sink a report costs one atomic load.

use std::sync::OnceLock;

/// Receives progress reports. `what` names the run ("CPU reference", "functional engine");
/// a run starts at `done == 0` and ends at `done == total`.
pub trait Sink: Send + Sync {
    fn report(&self, what: &str, done: u64, total: u64);
}

static SINK: OnceLock<Box<dyn Sink>> = OnceLock::new();

/// Installs the process's sink; the first one stays.
pub fn set_sink(sink: Box<dyn Sink>) {
    let _ = SINK.set(sink);
}

/// Reports progress to the sink, if one is installed.
pub fn report(what: &str, done: u64, total: u64) {
    if let Some(sink) = SINK.get() {
        sink.report(what, done, total);
    }
}

//! The command line's progress bars: the value engines report their runs
//! (`simulator::progress`), and a run still going after its first second gets a bar on the
//! terminal, cleared when it ends. Installed only when stderr is a terminal.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use systolic::simulator::progress::{self, Sink};

/// How long a run goes before it gets a bar (short runs draw nothing).
const QUIET: Duration = Duration::from_secs(1);

struct Run {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    bar: Option<ProgressBar>,
}

/// The sink: one bar for the run in progress.
struct Bars(Mutex<Option<Run>>);

impl Sink for Bars {
    fn report(&self, what: &str, done: u64, total: u64) {
        let mut current = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let same = current.as_ref().is_some_and(|r| r.what == what && r.total == total && r.done <= done);
        if !same {
            if let Some(bar) = current.take().and_then(|r| r.bar) {
                bar.finish_and_clear();
            }
            *current = Some(Run { what: what.to_string(), total, done, started: Instant::now(), bar: None });
        }
        let run = current.as_mut().expect("set above");
        run.done = done;
        if done >= total {
            if let Some(bar) = current.take().and_then(|r| r.bar) {
                bar.finish_and_clear();
            }
            return;
        }
        if run.bar.is_none() && run.started.elapsed() >= QUIET {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template("{msg} {bar:40} {pos}/{len}, eta {eta}") {
                bar.set_style(style);
            }
            bar.set_message(run.what.clone());
            run.bar = Some(bar);
        }
        if let Some(bar) = &run.bar {
            bar.set_position(done);
        }
    }
}

/// Shows the value engines' long runs as progress bars, when stderr is a terminal.
pub fn install() {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        progress::set_sink(Box::new(Bars(Mutex::new(None))));
    }
}

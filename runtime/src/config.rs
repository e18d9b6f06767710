//! `RunConfig` and `TpuConfig`, as TensorFlow's `tpu.RunConfig` and `tpu.TPUConfig` define
//! them (`tensorflow_estimator/python/estimator/tpu/tpu_config.py`): the same defaults, the
//! same refusals (both checkpoint intervals set, an `iterations_per_loop` that is neither
//! `[1-9][0-9]*` steps nor such a count of `s`, `m` or `h`, an empty `model_dir`), and ours
//! where TensorFlow would fail later (a checkpoint interval of zero, zero replicas); loadable
//! from a RON file whose unknown fields are errors.
//!
//! ```ron
//! (
//!     model_dir: Some("runs/digits"),
//!     save_checkpoints_steps: Some(100),
//!     tpu_config: (iterations_per_loop: "30s", per_host_input_for_training: PerHostV2),
//! )
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Steps per host round trip (TPUConfig's `iterations_per_loop`): a step count, or a duration
/// (`"30s"`, `"5m"`, `"1h"`) the runtime turns into steps by the measured step time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Count", into = "Count")]
pub enum IterationsPerLoop {
    Steps(u64),
    Seconds(f64),
}

/// How a RON file writes [`IterationsPerLoop`]: a number or a duration.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum Count {
    Steps(u64),
    Number(f64),
    Text(String),
}

impl TryFrom<Count> for IterationsPerLoop {
    type Error = String;

    fn try_from(c: Count) -> std::result::Result<Self, String> {
        match c {
            Count::Steps(n) => IterationsPerLoop::Steps(n).checked(),
            Count::Number(x) => Err(format!(
                "iterations_per_loop {x}: give a whole number of steps or a duration such as 30s, 5m or 1h"
            )),
            Count::Text(t) => t.parse(),
        }
    }
}

impl From<IterationsPerLoop> for Count {
    fn from(i: IterationsPerLoop) -> Count {
        match i {
            IterationsPerLoop::Steps(n) => Count::Steps(n),
            IterationsPerLoop::Seconds(_) => Count::Text(i.to_string()),
        }
    }
}

impl IterationsPerLoop {
    fn checked(self) -> std::result::Result<Self, String> {
        match self {
            IterationsPerLoop::Steps(0) => Err("iterations_per_loop must be at least 1 step".into()),
            IterationsPerLoop::Seconds(s) if !(s > 0.0 && s.is_finite()) => {
                Err(format!("iterations_per_loop of {s} seconds: give a positive duration"))
            }
            ok => Ok(ok),
        }
    }
}

impl FromStr for IterationsPerLoop {
    type Err = String;

    /// TensorFlow's forms: `"100"` (steps), or such a count of seconds, minutes or hours
    /// (`"30s"`, `"5m"`, `"1h"`).
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("iterations_per_loop '{text}': give a step count such as 100 or a duration such as 30s, 5m or 1h")
        };
        let t = text.trim();
        let (digits, scale) = match [("s", 1.0), ("m", 60.0), ("h", 3600.0)].iter().find(|(u, _)| t.ends_with(u)) {
            Some(&(unit, scale)) => (&t[..t.len() - unit.len()], Some(scale)),
            None => (t, None),
        };
        if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        match scale {
            None => IterationsPerLoop::Steps(n).checked(),
            Some(scale) => IterationsPerLoop::Seconds(n as f64 * scale).checked(),
        }
    }
}

impl fmt::Display for IterationsPerLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IterationsPerLoop::Steps(n) => write!(f, "{n}"),
            IterationsPerLoop::Seconds(s) if s % 3600.0 == 0.0 => write!(f, "{}h", s / 3600.0),
            IterationsPerLoop::Seconds(s) if s % 60.0 == 0.0 => write!(f, "{}m", s / 60.0),
            IterationsPerLoop::Seconds(s) => write!(f, "{s}s"),
        }
    }
}

/// How training input reaches the replicas (TPUConfig's `per_host_input_for_training`:
/// `True` is `PerHostV1`, `False` `PerShard`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputPipeline {
    /// One input pipeline per host, its batches the host's share of the global batch.
    #[default]
    PerHostV1,
    /// One pipeline per host yielding a per-replica batch for each of the host's replicas in
    /// turn.
    PerHostV2,
    /// One pipeline per replica.
    PerShard,
    /// One pipeline on one host, its batches broadcast to every replica.
    Broadcast,
}

/// TensorFlow's `TPUConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TpuConfig {
    /// Steps per host round trip (default 2, TensorFlow's).
    pub iterations_per_loop: IterationsPerLoop,
    /// Replicas; `None`: every core of the machine.
    pub num_shards: Option<usize>,
    pub per_host_input_for_training: InputPipeline,
}

impl Default for TpuConfig {
    fn default() -> TpuConfig {
        TpuConfig {
            iterations_per_loop: IterationsPerLoop::Steps(2),
            num_shards: None,
            per_host_input_for_training: InputPipeline::PerHostV1,
        }
    }
}

/// When checkpoints are written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CheckpointEvery {
    Steps(u64),
    Seconds(f64),
}

/// TensorFlow's `RunConfig` (with its `tpu_config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Where checkpoints and metrics go; `None`: nothing is written.
    pub model_dir: Option<PathBuf>,
    /// Checkpoint every N steps, or every N seconds (both set is an error; neither: every
    /// 600 seconds).
    pub save_checkpoints_steps: Option<u64>,
    pub save_checkpoints_secs: Option<f64>,
    /// Checkpoints kept (the oldest deleted); 0 keeps every one, as TensorFlow does.
    pub keep_checkpoint_max: usize,
    /// Metrics every N steps (0: never, as in TensorFlow).
    pub save_summary_steps: u64,
    /// Steps/s logged every N steps (0: never).
    pub log_step_count_steps: u64,
    /// Seeds parameter initialisation and dropout; `None`: 0.
    pub random_seed: Option<u64>,
    pub tpu_config: TpuConfig,
}

impl Default for RunConfig {
    fn default() -> RunConfig {
        RunConfig {
            model_dir: None,
            save_checkpoints_steps: None,
            save_checkpoints_secs: None,
            keep_checkpoint_max: 5,
            save_summary_steps: 100,
            log_step_count_steps: 100,
            random_seed: None,
            tpu_config: TpuConfig::default(),
        }
    }
}

impl RunConfig {
    /// Checks what TensorFlow checks: one checkpoint interval at most, positive counts.
    pub fn validate(&self) -> Result<()> {
        let fail = |field: &str, reason: String| Err(Error::Config { field: field.into(), reason });
        if let (Some(steps), Some(secs)) = (self.save_checkpoints_steps, self.save_checkpoints_secs) {
            return fail(
                "save_checkpoints_steps and save_checkpoints_secs",
                format!("both set ({steps} steps, {secs} s): set one of them"),
            );
        }
        if self.model_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return fail("model_dir", "is empty: give a directory, or leave it unset to write nothing".into());
        }
        if self.save_checkpoints_steps == Some(0) {
            return fail("save_checkpoints_steps", "must be at least 1 (or leave it unset)".into());
        }
        if let Some(s) = self.save_checkpoints_secs
            && !(s > 0.0 && s.is_finite())
        {
            return fail("save_checkpoints_secs", format!("{s}: give a positive number of seconds"));
        }
        if self.tpu_config.num_shards == Some(0) {
            return fail("tpu_config.num_shards", "must be at least 1 (or leave it unset for every core)".into());
        }
        self.tpu_config
            .iterations_per_loop
            .checked()
            .map_err(|reason| Error::Config { field: "tpu_config.iterations_per_loop".into(), reason })?;
        Ok(())
    }

    /// When checkpoints are written: the interval set, or every 600 seconds if neither is.
    pub fn checkpoint_every(&self) -> Result<CheckpointEvery> {
        self.validate()?;
        Ok(match (self.save_checkpoints_steps, self.save_checkpoints_secs) {
            (Some(n), _) => CheckpointEvery::Steps(n),
            (_, Some(s)) => CheckpointEvery::Seconds(s),
            (None, None) => CheckpointEvery::Seconds(600.0),
        })
    }

    /// Parses RON text (`origin` names it in errors) and validates it.
    pub fn from_ron(text: &str, origin: &Path) -> Result<RunConfig> {
        let config: RunConfig = ron::from_str(text).map_err(|e| Error::ConfigFile {
            path: origin.display().to_string(),
            line: e.span.start.line,
            col: e.span.start.col,
            reason: e.code.to_string(),
        })?;
        config.validate().map_err(|e| match e {
            Error::Config { field, reason } => {
                Error::Config { field: format!("{}: {field}", origin.display()), reason }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Loads and validates a RON file.
    pub fn load(path: impl AsRef<Path>) -> Result<RunConfig> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        RunConfig::from_ron(&text, path)
    }

    /// The configuration as RON text (what [`RunConfig::load`] reads back); an error for a
    /// `model_dir` that is not UTF-8.
    pub fn to_ron(&self) -> Result<String> {
        ron::ser::to_string_pretty(self, ron::ser::PrettyConfig::new())
            .map_err(|e| Error::Config { field: "model_dir".into(), reason: format!("cannot be written as RON: {e}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterations_per_loop_is_steps_or_a_duration() {
        let parse = |t: &str| t.parse::<IterationsPerLoop>();
        assert_eq!(parse("100"), Ok(IterationsPerLoop::Steps(100)));
        assert_eq!(parse("30s"), Ok(IterationsPerLoop::Seconds(30.0)));
        assert_eq!(parse("5m"), Ok(IterationsPerLoop::Seconds(300.0)));
        assert_eq!(parse("2h"), Ok(IterationsPerLoop::Seconds(7200.0)));
        for bad in
            ["30x", "", "s", "-5m", "0", "0s", "1.5h", "+5m", "1e3s", "05", "5м", "30µ", "99999999999999999999", "five"]
        {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("iterations_per_loop"), "{bad}: {e}");
        }
        for i in [IterationsPerLoop::Steps(7), IterationsPerLoop::Seconds(30.0), IterationsPerLoop::Seconds(7200.0)] {
            assert_eq!(i.to_string().parse(), Ok(i));
        }
    }

    #[test]
    fn defaults_and_refusals_are_tensorflows() {
        let c = RunConfig::default();
        assert_eq!((c.keep_checkpoint_max, c.save_summary_steps, c.log_step_count_steps), (5, 100, 100));
        assert_eq!(c.tpu_config.iterations_per_loop, IterationsPerLoop::Steps(2));
        assert_eq!(c.tpu_config.per_host_input_for_training, InputPipeline::PerHostV1);
        assert_eq!(c.checkpoint_every().unwrap(), CheckpointEvery::Seconds(600.0));
        let both = RunConfig { save_checkpoints_steps: Some(10), save_checkpoints_secs: Some(60.0), ..c.clone() };
        let e = both.checkpoint_every().unwrap_err().to_string();
        assert!(e.starts_with("save_checkpoints_steps and save_checkpoints_secs: both set"), "{e}");
        let steps = RunConfig { save_checkpoints_steps: Some(10), ..c.clone() };
        assert_eq!(steps.checkpoint_every().unwrap(), CheckpointEvery::Steps(10));
        let zero = RunConfig { tpu_config: TpuConfig { num_shards: Some(0), ..TpuConfig::default() }, ..c };
        assert!(zero.validate().unwrap_err().to_string().starts_with("tpu_config.num_shards"));
        let empty = RunConfig { model_dir: Some(PathBuf::new()), ..RunConfig::default() };
        assert!(empty.validate().unwrap_err().to_string().starts_with("model_dir: is empty"));
    }

    #[test]
    fn ron_files_round_trip_and_name_what_is_wrong() {
        let origin = Path::new("run.ron");
        let text = r#"(
    model_dir: Some("runs/digits"),
    save_checkpoints_steps: Some(100),
    tpu_config: (iterations_per_loop: "30s", per_host_input_for_training: PerHostV2),
)"#;
        let c = RunConfig::from_ron(text, origin).unwrap();
        assert_eq!(c.model_dir, Some(PathBuf::from("runs/digits")));
        assert_eq!(c.tpu_config.iterations_per_loop, IterationsPerLoop::Seconds(30.0));
        assert_eq!(c.keep_checkpoint_max, 5, "unset fields keep their defaults");
        assert_eq!(RunConfig::from_ron(&c.to_ron().unwrap(), origin).unwrap(), c);
        let steps = RunConfig::from_ron("(tpu_config: (iterations_per_loop: 100))", origin).unwrap();
        assert_eq!(steps.tpu_config.iterations_per_loop, IterationsPerLoop::Steps(100));
        // A misspelt field, a bad duration, both intervals: errors with the place or the field.
        let e = RunConfig::from_ron("(\n  keep_checkpoints_max: 3,\n)", origin).unwrap_err().to_string();
        assert!(e.starts_with("run.ron:2:") && e.contains("keep_checkpoints_max"), "{e}");
        let e = RunConfig::from_ron("(tpu_config: (iterations_per_loop: \"30x\"))", origin).unwrap_err().to_string();
        assert!(e.starts_with("run.ron:1:") && e.contains("30x"), "{e}");
        let e = RunConfig::from_ron("(save_checkpoints_steps: Some(5), save_checkpoints_secs: Some(9.0))", origin)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("run.ron: save_checkpoints_steps") && e.contains("set one of them"), "{e}");
        let e = RunConfig::from_ron("(tpu_config: (iterations_per_loop: 2.5))", origin).unwrap_err().to_string();
        assert!(e.contains("iterations_per_loop 2.5: give a whole number"), "{e}");
        let e = RunConfig::load("/nonexistent/run.ron").unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/run.ron"), "{e}");
    }
}

//! Machine configurations: cores, chips, hosts and slices, as RON-serialisable data.
//!
//! A [`Machine`] describes one slice of TPU-like hardware. Presets named like Cloud TPU slices
//! (`v2-8` … `v4-8192`, the number counts TensorCores) live in [`presets`]; each figure there
//! cites its public source, and [`Machine::sources`] carries the citations with the data so
//! that reports can show them. Users override any field by path (`core.mxu.rows=256`) or load
//! their own RON file; [`Machine::validate`] rejects impossible machines with the field's path
//! and the reason.

pub mod presets;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One TensorCore.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Core {
    /// Clock frequency in Hz.
    pub clock_hz: f64,
    pub mxu: Mxu,
    /// Vector memory (the on-core scratchpad) in bytes.
    pub vmem_bytes: u64,
    pub vpu: Vpu,
    pub hbm: Hbm,
    pub dma: Dma,
}

/// The matrix units of a core: `count` systolic arrays of `rows × cols` bf16 MACs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mxu {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    /// Two weight banks per PE: the next tile loads while the current one streams.
    pub weight_double_buffering: bool,
    /// Which timing model the MXUs follow (`docs/timing.md`); machine files written before
    /// the field existed load as [`MxuTiming::Pipelined`].
    #[serde(default)]
    pub timing: MxuTiming,
}

/// How an MXU's passes are timed (`core.mxu.timing`; `docs/timing.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MxuTiming {
    /// Systolic's model: weights written row by row under the stream, consecutive passes
    /// overlapping (the next tile loads while the current one streams and drains).
    #[default]
    Pipelined,
    /// SCALE-Sim's weight-stationary model: each fold's weights fully loaded (all `rows` rows)
    /// before its first LHS row enters, no overlap between folds, outputs drained through the
    /// whole array; cycles counted as SCALE-Sim counts them.
    Scalesim,
}

impl MxuTiming {
    /// The name machine files and `--set core.mxu.timing=NAME` use.
    pub fn name(self) -> &'static str {
        match self {
            MxuTiming::Pipelined => "pipelined",
            MxuTiming::Scalesim => "scalesim",
        }
    }
}

/// The vector unit: `lanes × sublanes` f32 elements per vector, `alus` operations on each per cycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vpu {
    pub lanes: usize,
    pub sublanes: usize,
    pub alus: usize,
}

/// The core's share of the chip's HBM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hbm {
    pub bytes: u64,
    /// Bandwidth in bytes per core clock cycle.
    pub bytes_per_cycle: f64,
}

/// DMA engines that move data between HBM and VMEM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dma {
    pub engines: usize,
    /// Fixed cost of a transfer (issue to first byte), in core cycles.
    pub latency_cycles: u64,
}

/// One chip: TensorCores and inter-chip interconnect (ICI) links.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chip {
    pub cores: usize,
    pub ici: Ici,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ici {
    /// Links per chip.
    pub links: usize,
    /// Bandwidth of one link in one direction, bytes per second.
    pub bytes_per_second: f64,
    /// Latency of one hop, seconds.
    pub latency_seconds: f64,
}

/// One host and its chips.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub chips: usize,
    /// Host-to-chip (PCIe) bandwidth per chip, bytes per second.
    pub pcie_bytes_per_second: f64,
}

/// The slice's chips in a 2-D or 3-D torus (or mesh, without wraparound).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slice {
    /// Chips along each dimension.
    pub torus: Vec<usize>,
    /// Whether each dimension wraps around.
    pub wraparound: Vec<bool>,
    /// Links that differ from the chip's: degraded or failed (none in a preset).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkOverride>,
    /// Chips whose cores run slower than the chip's clock (none in a preset): a straggler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slow_chips: Vec<SlowChip>,
}

/// A chip that runs at a lower clock than its generation's (a throttled or faulty part):
/// `(chip: [1, 0], clock_hz: 470e6)`. Its cores take the same cycles, each longer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowChip {
    /// The chip's torus coordinates.
    pub chip: Vec<usize>,
    pub clock_hz: f64,
}

/// Which way a link runs along its torus axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Towards the next coordinate (`+1`, wrapping at the end of a torus axis).
    Up,
    /// Towards the previous coordinate.
    Down,
}

/// One direction of one link, degraded or failed: `(chip: [3, 3], axis: 0, direction: Up,
/// bytes_per_second: Some(41e9))` or `(chip: [3, 3], axis: 0, direction: Up, failed: true)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkOverride {
    /// The torus coordinates of the chip the link leaves.
    pub chip: Vec<usize>,
    pub axis: usize,
    pub direction: Direction,
    /// Its bandwidth one way, bytes per second (None: the chip's `ici.bytes_per_second`).
    #[serde(default)]
    pub bytes_per_second: Option<f64>,
    /// A failed link carries nothing; routes go around it.
    #[serde(default)]
    pub failed: bool,
}

/// The path of every figure of a [`Machine`] (every field but `name` and `sources`), in the
/// order a machine file lists them.
pub const FIELDS: [&str; 22] = [
    "core.clock_hz",
    "core.mxu.count",
    "core.mxu.rows",
    "core.mxu.cols",
    "core.mxu.weight_double_buffering",
    "core.mxu.timing",
    "core.vmem_bytes",
    "core.vpu.lanes",
    "core.vpu.sublanes",
    "core.vpu.alus",
    "core.hbm.bytes",
    "core.hbm.bytes_per_cycle",
    "core.dma.engines",
    "core.dma.latency_cycles",
    "chip.cores",
    "chip.ici.links",
    "chip.ici.bytes_per_second",
    "chip.ici.latency_seconds",
    "host.chips",
    "host.pcie_bytes_per_second",
    "slice.torus",
    "slice.wraparound",
];

/// The most cores (and chips) a machine may have: 128 times the largest preset's 8192.
pub const MAX_CORES: usize = 1 << 20;

/// A whole machine: a slice of chips, each of cores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub name: String,
    pub core: Core,
    pub chip: Chip,
    pub host: Host,
    pub slice: Slice,
    /// Where each number comes from, by field path (`core.clock_hz` → "HC20: 700 MHz").
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

impl Machine {
    pub fn chips(&self) -> usize {
        self.slice.torus.iter().product()
    }

    pub fn cores(&self) -> usize {
        self.chips() * self.chip.cores
    }

    pub fn hosts(&self) -> usize {
        self.chips().div_ceil(self.host.chips)
    }

    /// Multiply-accumulates one core's MXUs complete per cycle.
    pub fn macs_per_cycle(&self) -> u64 {
        (self.core.mxu.count * self.core.mxu.rows * self.core.mxu.cols) as u64
    }

    /// Peak bf16 FLOP/s of one core (2 FLOP per multiply-accumulate).
    pub fn core_peak_flops(&self) -> f64 {
        2.0 * self.macs_per_cycle() as f64 * self.core.clock_hz
    }

    /// Peak bf16 FLOP/s of one chip.
    pub fn chip_peak_flops(&self) -> f64 {
        self.core_peak_flops() * self.chip.cores as f64
    }

    /// Peak bf16 FLOP/s of the whole slice.
    pub fn peak_flops(&self) -> f64 {
        self.chip_peak_flops() * self.chips() as f64
    }

    /// HBM bandwidth of one core in bytes per second.
    pub fn hbm_bytes_per_second(&self) -> f64 {
        self.core.hbm.bytes_per_cycle * self.core.clock_hz
    }

    /// Loads a machine from a RON file (validated). Errors name the file, line and column: of
    /// the syntax or type error, or of the field an impossible value was given to.
    pub fn load(path: impl AsRef<Path>) -> Result<Machine> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), cause: e })?;
        Machine::parse(&text, path)
    }

    /// Parses and validates a machine from RON text (what [`Machine::to_ron`] writes); errors
    /// are located as in [`Machine::load`], in `<machine RON>`.
    pub fn from_ron(text: &str) -> Result<Machine> {
        Machine::parse(text, Path::new("<machine RON>"))
    }

    fn parse(text: &str, path: &Path) -> Result<Machine> {
        let at = |(line, col), reason| Error::ConfigFile { path: path.to_path_buf(), line, col, reason };
        let m: Machine =
            ron::from_str(text).map_err(|e| at((e.span.start.line, e.span.start.col), e.code.to_string()))?;
        m.validate().map_err(|e| match &e {
            Error::Config { field, .. } => at(locate(text, field), e.to_string()),
            _ => e,
        })?;
        Ok(m)
    }

    /// The machine as RON text, sources included: [`Machine::from_ron`] and [`Machine::load`]
    /// read it back into an equal machine.
    pub fn to_ron(&self) -> String {
        ron::ser::to_string_pretty(self, ron::ser::PrettyConfig::new().indentor("  ".to_string()))
            .expect("machines always serialise")
    }

    /// Every field as (path, value as `--set` takes it: `128`, `940000000.0`, `[2, 2]`,
    /// `pipelined`), in the order of [`FIELDS`].
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let tree = serde_json::to_value(self).expect("machines serialise to JSON");
        FIELDS
            .iter()
            .map(|&path| {
                let value = path.split('.').fold(&tree, |node, key| &node[key]);
                (path, value_text(value))
            })
            .collect()
    }

    /// A preset by name (`v3-8`), or a RON file by path.
    pub fn resolve(spec: &str) -> Result<Machine> {
        let path = Path::new(spec);
        if path.is_file() || spec.ends_with(".ron") {
            return Machine::load(path);
        }
        presets::preset(spec)
    }

    /// Sets the field at a dotted `path` (`core.mxu.rows`) from text (`256`, `true`, `[4, 4]`,
    /// `scalesim`), without validating the result. The error names the path and says what is wrong.
    fn set_field(&mut self, path: &str, value: &str) -> Result<()> {
        let bad = |reason: String| Error::Config { field: path.to_string(), reason };
        let mut tree = serde_json::to_value(&*self).expect("machines serialise to JSON");
        let mut node = &mut tree;
        for (depth, key) in path.split('.').enumerate() {
            let here = node;
            let known: Vec<String> =
                here.as_object().map(|o| o.keys().filter(|k| *k != "sources").cloned().collect()).unwrap_or_default();
            node = match here.get_mut(key) {
                Some(child) if key != "sources" => child,
                _ => {
                    let parent = path.split('.').take(depth).collect::<Vec<_>>().join(".");
                    let at = if parent.is_empty() { "a machine".to_string() } else { format!("'{parent}'") };
                    return Err(bad(format!("{at} has no field '{key}' (fields: {})", known.join(", "))));
                }
            };
        }
        // A named choice (`core.mxu.timing=scalesim`) is taken as its name, quoted or not.
        let parsed: serde_json::Value = if node.is_string() {
            serde_json::Value::String(value.trim().trim_matches('"').to_string())
        } else {
            ron::from_str::<ron::Value>(value)
                .ok()
                .and_then(|v| serde_json::to_value(v).ok())
                .unwrap_or_else(|| serde_json::Value::String(value.to_string()))
        };
        // Integers written for float fields (and vice versa) are fine; other kinds must match.
        let fits = matches!(
            (&*node, &parsed),
            (serde_json::Value::Number(_), serde_json::Value::Number(_))
                | (serde_json::Value::Bool(_), serde_json::Value::Bool(_))
                | (serde_json::Value::String(_), serde_json::Value::String(_))
                | (serde_json::Value::Array(_), serde_json::Value::Array(_))
        );
        if !fits {
            return Err(bad(format!("'{value}' is not a {} like the current value {}", kind(node), node)));
        }
        *node = parsed;
        // A new torus shape keeps its wraparound flags only if they still fit; otherwise it
        // becomes a mesh (set slice.wraparound after slice.torus to change that).
        if path == "slice.torus" {
            let dims = tree["slice"]["torus"].as_array().map_or(0, |a| a.len());
            if tree["slice"]["wraparound"].as_array().map_or(0, |a| a.len()) != dims {
                tree["slice"]["wraparound"] = serde_json::Value::Array(vec![serde_json::Value::Bool(false); dims]);
            }
        }
        let updated: Machine = serde_json::from_value(tree).map_err(|e| bad(format!("'{value}' does not fit: {e}")))?;
        *self = Machine { sources: self.sources.clone(), ..updated };
        self.sources.insert(path.to_string(), format!("set by the user to {value}"));
        Ok(())
    }

    /// Sets one field (see [`Machine::set_all`]) and re-validates.
    pub fn set(&mut self, path: &str, value: &str) -> Result<()> {
        self.set_field(path, value)?;
        self.validate()
    }

    /// Sets several fields, then validates once: a combination may be valid when its steps
    /// taken one at a time are not (a larger array with a larger VMEM).
    pub fn set_all(&mut self, settings: &[(&str, &str)]) -> Result<()> {
        for (path, value) in settings {
            self.set_field(path, value)?;
        }
        self.validate()
    }

    /// Checks that the machine can exist; the error names the field and the reason.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Err(Error::Config { field: field.to_string(), reason });
        let c = &self.core;
        let positive: [(&str, f64); 4] = [
            ("core.clock_hz", c.clock_hz),
            ("core.hbm.bytes_per_cycle", c.hbm.bytes_per_cycle),
            ("chip.ici.bytes_per_second", self.chip.ici.bytes_per_second),
            ("host.pcie_bytes_per_second", self.host.pcie_bytes_per_second),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return bad(field, format!("must be a positive number, got {v}"));
            }
        }
        let latency = self.chip.ici.latency_seconds;
        if !(latency.is_finite() && latency >= 0.0) {
            return bad("chip.ici.latency_seconds", format!("must be zero or positive, got {latency}"));
        }
        let counts: [(&str, u64); 11] = [
            ("core.mxu.count", c.mxu.count as u64),
            ("core.mxu.rows", c.mxu.rows as u64),
            ("core.mxu.cols", c.mxu.cols as u64),
            ("core.vmem_bytes", c.vmem_bytes),
            ("core.vpu.lanes", c.vpu.lanes as u64),
            ("core.vpu.sublanes", c.vpu.sublanes as u64),
            ("core.vpu.alus", c.vpu.alus as u64),
            ("core.hbm.bytes", c.hbm.bytes),
            ("core.dma.engines", c.dma.engines as u64),
            ("chip.cores", self.chip.cores as u64),
            ("host.chips", self.host.chips as u64),
        ];
        for (field, v) in counts {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        for (field, v) in [("core.mxu.count", c.mxu.count), ("core.dma.engines", c.dma.engines)] {
            if v > 64 {
                return bad(field, format!("{v} is more than the 64 units per core this simulator models"));
            }
        }
        if c.mxu.rows > 4096 || c.mxu.cols > 4096 {
            return bad(
                "core.mxu.rows",
                format!(
                    "{}x{} is beyond any systolic array this simulator models (at most 4096)",
                    c.mxu.rows, c.mxu.cols
                ),
            );
        }
        let tile = (c.mxu.rows * c.mxu.cols * 4) as u64;
        if c.vmem_bytes < tile {
            return bad(
                "core.vmem_bytes",
                format!(
                    "{} bytes is smaller than one {}x{} f32 tile ({tile} bytes): raise core.vmem_bytes or lower core.mxu.rows/cols",
                    c.vmem_bytes, c.mxu.rows, c.mxu.cols
                ),
            );
        }
        let dims = self.slice.torus.len();
        if !(1..=3).contains(&dims) {
            return bad("slice.torus", format!("must have 1 to 3 dimensions, got {dims}"));
        }
        if self.slice.torus.contains(&0) {
            return bad("slice.torus", format!("{:?} has a zero dimension", self.slice.torus));
        }
        // Chips and cores are counted in usize everywhere after this, so their counts are
        // bounded first (a torus of [4, 2^64 - 1] overflowed `chips`).
        let chips = self.slice.torus.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).filter(|&n| n <= MAX_CORES);
        let Some(chips) = chips else {
            return bad(
                "slice.torus",
                format!("{:?} is more than the {MAX_CORES} chips this simulator models", self.slice.torus),
            );
        };
        if chips.checked_mul(self.chip.cores).is_none_or(|n| n > MAX_CORES) {
            return bad(
                "slice.torus",
                format!(
                    "{:?} is {chips} chips of {} cores (chip.cores), more than the {MAX_CORES} cores this simulator \
                     models: use a smaller torus or fewer cores per chip",
                    self.slice.torus, self.chip.cores
                ),
            );
        }
        if self.slice.wraparound.len() != dims {
            return bad(
                "slice.wraparound",
                format!("needs one entry per torus dimension ({dims}), got {}", self.slice.wraparound.len()),
            );
        }
        // Each dimension with more than one chip needs a link to each neighbour.
        let needed: usize = self.slice.torus.iter().map(|&d| if d > 1 { 2 } else { 0 }).sum();
        if needed > self.chip.ici.links {
            return bad(
                "slice.torus",
                format!(
                    "a {:?} torus needs {needed} ICI links per chip but chips have {} (chip.ici.links)",
                    self.slice.torus, self.chip.ici.links
                ),
            );
        }
        for (i, o) in self.slice.links.iter().enumerate() {
            let field = format!("slice.links[{i}]");
            let (torus, wrap) = (&self.slice.torus, &self.slice.wraparound);
            if o.chip.len() != dims || o.chip.iter().zip(torus).any(|(&c, &d)| c >= d) {
                return bad(&field, format!("chip {:?} is not a chip of the {torus:?} torus", o.chip));
            }
            if o.axis >= dims {
                return bad(&field, format!("axis {} does not exist: the torus has {dims} axes", o.axis));
            }
            let (c, n) = (o.chip[o.axis], torus[o.axis]);
            let at_edge = match o.direction {
                Direction::Up => c + 1 == n,
                Direction::Down => c == 0,
            };
            if n < 2 || (at_edge && !wrap[o.axis]) {
                return bad(&field, format!("chip {:?} has no link {:?} along axis {}", o.chip, o.direction, o.axis));
            }
            if o.bytes_per_second.is_some_and(|b| !(b > 0.0 && b.is_finite())) {
                return bad(&field, "bytes_per_second must be positive (use failed: true for a dead link)".into());
            }
        }
        for (i, slow) in self.slice.slow_chips.iter().enumerate() {
            let field = format!("slice.slow_chips[{i}]");
            let torus = &self.slice.torus;
            if slow.chip.len() != dims || slow.chip.iter().zip(torus).any(|(&c, &d)| c >= d) {
                return bad(&field, format!("chip {:?} is not a chip of the {torus:?} torus", slow.chip));
            }
            if !(slow.clock_hz > 0.0 && slow.clock_hz.is_finite()) {
                return bad(&field, format!("clock_hz must be a positive number, got {}", slow.clock_hz));
            }
        }
        if self.chips() > self.host.chips && !self.chips().is_multiple_of(self.host.chips) {
            return bad(
                "host.chips",
                format!("{} chips cannot be split evenly over hosts of {} chips", self.chips(), self.host.chips),
            );
        }
        Ok(())
    }
}

/// A JSON leaf as `--set` and RON write it: `128`, `940000000.0`, `true`, `[2, 2]`, `pipelined`.
fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(items) => {
            format!("[{}]", items.iter().map(value_text).collect::<Vec<_>>().join(", "))
        }
        serde_json::Value::String(name) => name.clone(),
        other => other.to_string(),
    }
}

/// Line and column (1-based) of the field at a dotted `path` in RON text: each key found as
/// `key:` after the previous one. Best effort (a comment naming a key can mislead it); (1, 1)
/// when a key is not found.
fn locate(text: &str, path: &str) -> (usize, usize) {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut at = 0;
    for key in path.split('.') {
        let found = text[at..].match_indices(key).map(|(i, _)| at + i).find(|&i| {
            let before = text[..i].chars().next_back();
            let after = text[i + key.len()..].trim_start();
            !before.is_some_and(is_ident) && after.starts_with(':')
        });
        match found {
            Some(i) => at = i,
            None => return (1, 1),
        }
    }
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    (text[..at].matches('\n').count() + 1, text[line_start..at].chars().count() + 1)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Number(_) => "number",
        serde_json::Value::Bool(_) => "boolean (true or false)",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "list",
        serde_json::Value::Object(_) => "group of fields (set one of its fields instead)",
        serde_json::Value::Null => "value",
    }
}

//! One module per subcommand, plus what several of them share: loading models, weights and
//! inputs with errors that name the file.

pub mod collective;
pub mod compare;
pub mod compile;
pub mod data_bench;
pub mod estimator;
pub mod export;
pub mod grad;
pub mod inspect;
pub mod machines;
pub mod mxu;
pub mod run;
pub mod scale;
pub mod simulate;
pub mod zoo;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use systolic::compiler::lower::Options;
use systolic::compiler::{Error, Graph, NodeId, Op, Tensor, TensorMap, rng, tensors, zoo as model_zoo};
use systolic::simulator::Machine;
use systolic::simulator::isa::DType;
use systolic::simulator::numerics::Precision;

/// The machine a command targets and how its MXU rounds: the options every simulating
/// command shares.
#[derive(clap::Args)]
pub struct Target {
    /// A machine preset or `.ron` file [default: v2-8].
    #[arg(long)]
    pub machine: Option<String>,
    /// MXU precision: default (one bf16 pass), high (3 passes) or highest (6 passes)
    /// [default: default].
    #[arg(long)]
    pub precision: Option<String>,
    /// Override a machine field (repeatable), e.g. `--set core.mxu.rows=256`.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub sets: Vec<String>,
}

impl Target {
    /// The machine with its overrides applied, and the parsed precision.
    pub fn resolve(&self) -> Result<(Machine, Precision)> {
        let machine = load_machine(self.machine.as_deref().unwrap_or("v2-8"), &self.sets)?;
        let precision = self.precision.as_deref().unwrap_or("default");
        let precision = Precision::parse(precision)
            .with_context(|| format!("--precision {precision}: use default, high or highest"))?;
        Ok((machine, precision))
    }

    /// The first of these options given on the command line (for commands where they do not
    /// apply: an option is never ignored in silence).
    pub fn given(&self) -> Option<&'static str> {
        if self.machine.is_some() {
            Some("--machine")
        } else if self.precision.is_some() {
            Some("--precision")
        } else if !self.sets.is_empty() {
            Some("--set")
        } else {
            None
        }
    }
}

/// How a lowered program stores activations in HBM: the option every compiling command shares.
#[derive(clap::Args)]
pub struct Storage {
    /// Activations, the values kept for the backward pass and activation gradients in HBM:
    /// bf16 (as a TPU trains) or f32. Default: bf16 at --precision default, f32 at high and
    /// highest. Parameters, optimizer state, statistics and weight gradients are always f32.
    #[arg(long, value_name = "bf16|f32")]
    pub activations: Option<String>,
}

impl Storage {
    /// The element type activations are stored in.
    pub fn resolve(&self, precision: Precision) -> Result<DType> {
        match self.activations.as_deref() {
            None => Ok(Options::default_activations(precision)),
            Some("bf16") => Ok(DType::Bf16),
            Some("f32") => Ok(DType::F32),
            Some(other) => anyhow::bail!("--activations {other}: use bf16 or f32"),
        }
    }
}

/// A machine preset or `.ron` file, with `FIELD=VALUE` overrides applied together (validated
/// once, after all of them).
pub fn load_machine(spec: &str, sets: &[String]) -> Result<Machine> {
    let mut m = Machine::resolve(spec)?;
    let mut settings = Vec::new();
    for set in sets {
        let Some((field, value)) = set.split_once('=') else {
            anyhow::bail!("--set {set}: write FIELD=VALUE, e.g. --set core.mxu.rows=256");
        };
        settings.push((field.trim(), value.trim()));
    }
    m.set_all(&settings)?;
    Ok(m)
}

/// Loads MODEL: a zoo name or a `.ron` file.
pub fn load_model(spec: &str) -> Result<Graph> {
    Ok(model_zoo::resolve(spec)?)
}

/// Whether what loading a file changed or left out is refused (`--strict`) rather than noted.
static STRICT: AtomicBool = AtomicBool::new(false);

/// Sets `--strict` for this process.
pub fn set_strict(on: bool) {
    STRICT.store(on, Ordering::Relaxed);
}

/// A note on stderr about a file (a conversion, tensors left out); an error under `--strict`.
fn note(path: &Path, what: &str) -> Result<()> {
    if STRICT.load(Ordering::Relaxed) {
        anyhow::bail!("{}: {what} (refused by --strict: fix the file, or drop --strict)", path.display());
    }
    eprintln!("note: {}: {what}", path.display());
    Ok(())
}

/// Reads a tensor file and notes (or under `--strict` refuses) the tensors stored in another
/// type than f32 — all of them, or with `integers_expected` (labels) the non-integer ones —
/// and the tensors `used` says nothing reads (`what` names the reader).
fn load_noting(path: &Path, integers_expected: bool, used: impl Fn(&str) -> bool, what: &str) -> Result<TensorMap> {
    let (loaded, conversions) = tensors::load_with_conversions(path)?;
    note_loaded(path, &loaded, &conversions, integers_expected, used, what)?;
    Ok(loaded)
}

/// The notes of [`load_noting`] for a file already read.
fn note_loaded(
    path: &Path,
    loaded: &TensorMap,
    conversions: &[tensors::Conversion],
    integers_expected: bool,
    used: impl Fn(&str) -> bool,
    what: &str,
) -> Result<()> {
    let integer = |dtype: &str| dtype.starts_with('I') || dtype.starts_with('U');
    let converted: Vec<String> = conversions
        .iter()
        .filter(|c| !(integers_expected && integer(&c.from)))
        .map(|c| format!("'{}' ({}, {})", c.name, c.from, if c.exact { "exactly" } else { "rounded" }))
        .collect();
    if !converted.is_empty() {
        note(path, &format!("converted to f32: {}", converted.join(", ")))?;
    }
    let unused: Vec<String> = loaded.keys().filter(|n| !used(n)).map(|n| format!("'{n}'")).collect();
    if !unused.is_empty() {
        let count = if unused.len() == 1 { "1 tensor".to_string() } else { format!("{} tensors", unused.len()) };
        note(path, &format!("{count} {what} does not use, ignored: {}", unused.join(", ")))?;
    }
    Ok(())
}

/// Parameter values: from a weights file (checked against the graph) or initialised from `seed`.
pub fn load_weights(graph: &Graph, path: Option<&Path>, seed: u64) -> Result<TensorMap> {
    let Some(path) = path else {
        return Ok(graph.init_parameters(seed));
    };
    let is_parameter = |name: &str| graph.find(name).is_some_and(|id| matches!(graph.node(id).op, Op::Parameter(_)));
    let weights = load_noting(path, false, is_parameter, &format!("the model '{}'", graph.name()))?;
    for id in graph.parameters() {
        let node = graph.node(id);
        match weights.get(&node.name) {
            None => anyhow::bail!(
                "{}: has no tensor '{}' (parameter of shape {}); export weights with `systolic run --save-weights` or pass --seed instead",
                path.display(),
                node.name,
                node.shape
            ),
            Some(t) if t.shape() != node.shape.dims.as_slice() => anyhow::bail!(
                "{}: tensor '{}' has shape {:?} but the parameter needs {}",
                path.display(),
                node.name,
                t.shape(),
                node.shape
            ),
            Some(_) => {}
        }
    }
    Ok(weights.into_iter().filter(|(name, _)| is_parameter(name)).collect())
}

/// Reads input tensors, named after the graph's Input nodes.
pub fn load_inputs(graph: &Graph, path: &Path) -> Result<TensorMap> {
    let is_input = |name: &str| graph.find(name).is_some_and(|id| matches!(graph.node(id).op, Op::Input(_)));
    load_noting(path, false, is_input, &format!("the model '{}' as an input", graph.name()))
}

/// Reads the labels (integer class ids, any integer or float type): the tensor named after
/// the labels input, or a file's only tensor.
pub fn load_labels(path: &Path, name: &str) -> Result<Tensor> {
    let (mut loaded, conversions) = tensors::load_with_conversions(path)?;
    let only = (loaded.len() == 1).then(|| loaded.keys().next().cloned()).flatten();
    let chosen = if loaded.contains_key(name) { name.to_string() } else { only.unwrap_or_default() };
    note_loaded(path, &loaded, &conversions, true, |n| n == chosen, "the labels")?;
    loaded.remove(&chosen).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: has no tensor '{name}' (integer class ids), and more than one tensor, so none can be taken as the labels",
            path.display()
        )
    })
}

/// A batch of standard-normal inputs, one tensor per Input node, reproducible from `seed`:
/// for trying a model (timing, numerics) without a data file.
pub fn random_inputs(graph: &Graph, batch: usize, seed: u64) -> Result<TensorMap> {
    anyhow::ensure!(batch >= 1, "--batch must be at least 1");
    let mut m = TensorMap::new();
    for id in graph.inputs() {
        let node = graph.node(id);
        let shape = node.shape.concrete(batch);
        let n: usize = shape.iter().product();
        let key = rng::derive(seed, rng::hash_str(&node.name));
        let values = (0..n).map(|i| rng::normal(key, i as u64)).collect();
        m.insert(node.name.clone(), Tensor::from_shape_vec(shape, values)?);
    }
    Ok(m)
}

/// Refuses a run of the CPU reference that this host cannot hold, before its inputs and
/// parameters are made (`--batch 99999999` is an error with the figure, not an abort).
pub fn check_reference_memory(graph: &Graph, fetch: &[NodeId], batch: usize) -> Result<()> {
    use systolic::compiler::reference::memory::{Leaves, check};
    Ok(check(graph, fetch, batch, Leaves::ToAllocate)?)
}

/// Refuses inputs and parameters this host cannot hold, before they are made: what the
/// simulated TPU's host side keeps (the functional engine checks its own memories).
pub fn check_leaves_memory(graph: &Graph, batch: usize) -> Result<()> {
    use systolic::compiler::reference::memory::footprint;
    let bytes = footprint(graph, graph.outputs(), batch).bound;
    systolic::simulator::host::check(systolic::simulator::host::Need {
        what: format!("holding the inputs and parameters of '{}' at batch {batch}", graph.name()),
        bytes,
        parts: Vec::new(),
        lower: "lower --batch".into(),
    })?;
    Ok(())
}

/// Adds the file a bad tensor came from to a binding error; `source` maps a tensor (node)
/// name to the file it was read from.
pub fn blame<'a>(err: Error, source: impl Fn(&str) -> Option<&'a Path>) -> anyhow::Error {
    if let Error::Binding { name, .. } = &err
        && let Some(path) = source(name)
    {
        return anyhow::Error::new(err).context(path.display().to_string());
    }
    err.into()
}

/// The file a bound tensor came from: the weights file for parameters (when one was given),
/// the labels file for the labels, the input file for everything else.
pub fn source_of<'a>(
    graph: &Graph,
    name: &str,
    weights: Option<&'a Path>,
    labels: Option<(&str, &'a Path)>,
    input: Option<&'a Path>,
) -> Option<&'a Path> {
    let is_param = graph.find(name).is_some_and(|id| matches!(graph.node(id).op, Op::Parameter(_)));
    match labels {
        _ if is_param => weights,
        Some((node, path)) if node == name => Some(path),
        _ => input,
    }
}

/// Writes tensors to a safetensors file (atomically).
pub fn save_tensors(path: &Path, tensors: &TensorMap) -> Result<()> {
    Ok(tensors::save(path, tensors)?)
}

/// Writes `bytes` to `path` atomically (a temporary file beside it, flushed, renamed; removed
/// on any failure): a failed write keeps the previous file whole and leaves nothing behind.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(tensors::write_atomically(path, bytes)?)
}

/// Checks, before any work, that each output path can be written: its folder exists and
/// takes a new file (tried with a temporary file, removed at once), and it is not a folder —
/// for the file a symbolic link names; a device, pipe or path through `/proc` is
/// written in place and not probed ([`tensors::destination`]). A command that fails on its
/// outputs then fails before it computes, writing nothing.
pub fn check_outputs<'a>(paths: impl IntoIterator<Item = (&'a str, Option<&'a Path>)>) -> Result<()> {
    for (option, given) in paths {
        let Some(given) = given else { continue };
        let tensors::Destination::Replace(path) = tensors::destination(given) else { continue };
        anyhow::ensure!(!path.is_dir(), "{option} {}: is a folder; give a file path", given.display());
        let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        anyhow::ensure!(
            folder.is_dir(),
            "{option} {}: the folder {} does not exist; create it or give another path",
            given.display(),
            folder.display()
        );
        let probe = folder.join(format!(".systolic-probe-{}", std::process::id()));
        std::fs::write(&probe, b"").with_context(|| {
            format!("{option} {}: the folder {} cannot be written", given.display(), folder.display())
        })?;
        let _ = std::fs::remove_file(&probe);
    }
    Ok(())
}

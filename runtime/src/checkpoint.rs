//! Checkpoints in a model folder: `model.ckpt-<step>.safetensors`, each holding a backend's
//! whole state (parameters, optimizer slots and shared state, moving statistics, the dropout
//! step) and, in its metadata, the global step, the input pipelines' positions and a
//! checksum of every tensor's bytes.
//!
//! Written atomically (a temporary file, flushed, renamed), so a crash leaves the previous
//! checkpoint whole; the oldest beyond `keep_checkpoint_max` are deleted after a new one is
//! written. Reading checks the format, the checksum and the step; [`latest`] skips a
//! truncated or corrupted checkpoint, says which and why, and takes the one before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use systolic_compiler::TensorMap;
use systolic_compiler::tensors::{self, Metadata};

use crate::error::{Error, Result};

/// The metadata key naming the format (and its version).
const FORMAT: (&str, &str) = ("format", "systolic-checkpoint-1");

const PREFIX: &str = "model.ckpt-";
const SUFFIX: &str = ".safetensors";

/// One checkpoint's contents.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub global_step: u64,
    /// Each input pipeline's position (batches read), in pipeline order.
    pub input_positions: Vec<u64>,
    pub state: TensorMap,
}

/// The file of the checkpoint at `step` in `dir`.
pub fn path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{step}{SUFFIX}"))
}

/// The checkpoints in `dir`, by step (oldest first); none if `dir` does not exist.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let step = name.strip_prefix(PREFIX).and_then(|s| s.strip_suffix(SUFFIX)).and_then(|s| s.parse::<u64>().ok());
        if let Some(step) = step {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// A CRC-32 of the step, the input positions and every tensor's name, shape and f32 bytes
/// (in name order): whatever a resume reads.
fn checksum(step: u64, positions: &str, state: &TensorMap) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&step.to_le_bytes());
    h.update(positions.as_bytes());
    for (name, t) in state {
        h.update(name.as_bytes());
        for &d in t.shape() {
            h.update(&(d as u64).to_le_bytes());
        }
        for v in t.iter() {
            h.update(&v.to_le_bytes());
        }
    }
    h.finalize()
}

/// Writes `ckpt` to `dir` (created if missing) atomically, then deletes the oldest
/// checkpoints beyond `keep` (0 keeps every one). Returns the file written.
pub fn save(dir: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let positions: Vec<String> = ckpt.input_positions.iter().map(u64::to_string).collect();
    let metadata: Metadata = [
        (FORMAT.0.to_string(), FORMAT.1.to_string()),
        ("global_step".to_string(), ckpt.global_step.to_string()),
        ("input_positions".to_string(), positions.join(",")),
        ("checksum".to_string(), format!("{:08x}", checksum(ckpt.global_step, &positions.join(","), &ckpt.state))),
    ]
    .into();
    remove_stale_temporaries(dir)?;
    let file = path(dir, ckpt.global_step);
    tensors::write_atomically(&file, &tensors::to_bytes_with_metadata(&ckpt.state, &metadata))?;
    if keep > 0 {
        // The oldest by step, never the one just written (a newer-numbered checkpoint can
        // only be another run's leftover).
        let others: Vec<PathBuf> = list(dir)?.into_iter().map(|(_, p)| p).filter(|p| *p != file).collect();
        for old in others.iter().take((others.len() + 1).saturating_sub(keep)) {
            std::fs::remove_file(old).map_err(|e| io(old, e))?;
        }
    }
    Ok(file)
}

/// Removes the temporary files of checkpoint writes a killed run left (`.model.ckpt-*`):
/// the run writing to a model folder is its only writer.
fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with(&format!(".{PREFIX}")) {
            std::fs::remove_file(entry.path()).map_err(|e| io(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// Reads and checks one checkpoint: a safetensors file of this format whose checksum and
/// step match its contents and name.
pub fn load(file: &Path) -> Result<Checkpoint> {
    let bad = |reason: String| Error::Checkpoint { path: file.display().to_string(), reason };
    let (state, meta) = tensors::load_with_metadata(file).map_err(|e| bad(e.to_string()))?;
    let field = |key: &str| meta.get(key).ok_or_else(|| bad(format!("its metadata has no '{key}'")));
    if field(FORMAT.0)? != FORMAT.1 {
        return Err(bad(format!("format '{}' is not {}", field(FORMAT.0)?, FORMAT.1)));
    }
    let global_step: u64 = field("global_step")?.parse().map_err(|_| bad("global_step is not a number".into()))?;
    let positions = field("input_positions")?;
    let input_positions = if positions.is_empty() {
        Vec::new()
    } else {
        positions
            .split(',')
            .map(|p| p.parse::<u64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("input_positions '{positions}' are not numbers")))?
    };
    let want = field("checksum")?;
    let got = format!("{:08x}", checksum(global_step, positions, &state));
    if *want != got {
        return Err(bad(format!(
            "checksum {got} of its tensors is not the {want} it was written with: the file is corrupt"
        )));
    }
    let named = list(file.parent().unwrap_or(Path::new(".")))?.into_iter().find(|(_, p)| p == file).map(|(s, _)| s);
    if let Some(step) = named.filter(|&s| s != global_step) {
        return Err(bad(format!("holds step {global_step} but is named for step {step}")));
    }
    Ok(Checkpoint { global_step, input_positions, state })
}

/// Appended to a checkpoint that does not check when it is set aside.
pub const CORRUPT_SUFFIX: &str = ".corrupt";

/// The newest checkpoint in `dir` that reads and checks, with a note for each newer one that
/// does not (which file, and why; each is renamed `<file>.corrupt`, out of the way of the
/// listing and of pruning, kept for inspection). `None` when `dir` holds no checkpoint; an
/// error when it holds checkpoints and none of them checks (TensorFlow's DataLossError:
/// starting afresh would silently throw the run away).
pub fn latest(dir: &Path) -> Result<(Option<Checkpoint>, Vec<String>)> {
    let mut notes = Vec::new();
    let all = list(dir)?;
    for (_, file) in all.iter().rev() {
        match load(file) {
            Ok(c) => return Ok((Some(c), notes)),
            Err(e) => {
                let aside = PathBuf::from(format!("{}{CORRUPT_SUFFIX}", file.display()));
                std::fs::rename(file, &aside).map_err(|e| io(file, e))?;
                notes.push(format!("skipping checkpoint {e} (renamed {})", aside.display()));
            }
        }
    }
    if !all.is_empty() {
        return Err(Error::Checkpoint {
            path: dir.display().to_string(),
            reason: format!(
                "none of its {} checkpoints checks ({}): restore one from a backup, or remove them to start afresh",
                all.len(),
                notes.join("; ")
            ),
        });
    }
    Ok((None, notes))
}

/// Checks a checkpoint's state against what a backend holds (`expected`, by name and
/// shape): every expected tensor present with its shape; extra tensors are allowed only
/// under `replica<r>/` (a slice's other replicas' statistics).
pub fn check_state(file: &str, state: &TensorMap, expected: &BTreeMap<String, Vec<usize>>) -> Result<()> {
    let bad = |reason: String| Error::Checkpoint { path: file.to_string(), reason };
    for (name, shape) in expected {
        match state.get(name) {
            None => {
                return Err(bad(format!(
                    "has no '{name}', which the model and optimizer need: was it written for another model or optimizer?"
                )));
            }
            Some(s) if s.shape() != shape.as_slice() => {
                return Err(bad(format!("'{name}' has shape {:?} but the model's is {shape:?}", s.shape())));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = state.keys().find(|n| !expected.contains_key(*n) && crate::session::replica_of(n).is_none()) {
        return Err(bad(format!(
            "holds '{extra}', which the model does not have: was it written for another model or optimizer?"
        )));
    }
    Ok(())
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use systolic_compiler::Tensor;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("systolic-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn ckpt(step: u64) -> Checkpoint {
        let w = Tensor::from_shape_vec(vec![2, 2], vec![1.0, -2.0, 3.5, step as f32]).unwrap();
        Checkpoint { global_step: step, input_positions: vec![step, 2 * step], state: [("w".to_string(), w)].into() }
    }

    #[test]
    fn keeps_the_newest_and_round_trips() {
        let d = dir("keep");
        for step in [10, 20, 30, 40] {
            save(&d, &ckpt(step), 2).unwrap();
        }
        let steps: Vec<u64> = list(&d).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, vec![30, 40]);
        let (c, notes) = latest(&d).unwrap();
        assert_eq!(c.unwrap(), ckpt(40));
        assert!(notes.is_empty());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupted_or_truncated_checkpoint_is_named_and_the_previous_used() {
        let d = dir("corrupt");
        save(&d, &ckpt(1), 0).unwrap();
        save(&d, &ckpt(2), 0).unwrap();
        let newest = path(&d, 2);
        let mut bytes = std::fs::read(&newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40; // one bit of the last tensor value
        std::fs::write(&newest, &bytes).unwrap();
        let (c, notes) = latest(&d).unwrap();
        assert_eq!(c.unwrap().global_step, 1);
        assert!(notes[0].contains("model.ckpt-2.safetensors") && notes[0].contains("checksum"), "{notes:?}");

        assert!(d.join("model.ckpt-2.safetensors.corrupt").exists() && !newest.exists());
        std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let (c, notes) = latest(&d).unwrap();
        assert_eq!(c.unwrap().global_step, 1);
        assert!(notes[0].contains("not a valid safetensors file"), "{notes:?}");
        // Nothing usable left: an error, not a fresh start.
        std::fs::write(path(&d, 1), b"junk").unwrap();
        let e = latest(&d).unwrap_err().to_string();
        assert!(e.contains("none of its 1 checkpoints checks"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pruning_never_deletes_the_checkpoint_just_written() {
        let d = dir("prune");
        save(&d, &ckpt(20), 1).unwrap();
        let written = save(&d, &ckpt(17), 1).unwrap();
        assert!(written.exists());
        assert_eq!(list(&d).unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), vec![17]);
        // The step and the input positions are under the checksum too.
        let mut bytes = std::fs::read(&written).unwrap();
        let at = bytes.windows(5).position(|w| w == b"17,34").unwrap();
        bytes[at + 3] = b'5';
        std::fs::write(&written, &bytes).unwrap();
        assert!(load(&written).unwrap_err().to_string().contains("checksum"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn state_is_checked_against_the_model() {
        let expected: BTreeMap<String, Vec<usize>> = [("w".to_string(), vec![2, 2])].into();
        let mut state: TensorMap = [("w".to_string(), Tensor::zeros(vec![2, 2]))].into();
        state.insert("replica1/bn/moving_mean".into(), Tensor::zeros(vec![3]));
        check_state("f", &state, &expected).unwrap();
        // Only `replica<r>/` names are a replica's own: another name that starts alike is not.
        let mut odd = state.clone();
        odd.insert("replicas/w".into(), Tensor::zeros(vec![3]));
        assert!(check_state("f", &odd, &expected).unwrap_err().to_string().contains("'replicas/w'"));
        state.insert("w".into(), Tensor::zeros(vec![4]));
        assert!(check_state("f", &state, &expected).unwrap_err().to_string().contains("shape [4]"));
        let e = check_state("f", &TensorMap::new(), &expected).unwrap_err();
        assert!(e.to_string().contains("has no 'w'"), "{e}");
    }
}

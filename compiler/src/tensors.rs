//! Named tensors and safetensors files.
//!
//! Every value the tools exchange — weights, inputs, labels, outputs, gradients — is a
//! safetensors file of tensors named after graph nodes (`conv1/kernel`, `image`, `logits`), so
//! PyTorch (`safetensors.torch.load_file`) and NumPy (`safetensors.numpy.load_file`) read them.
//! Inside Systolic every tensor is f32; files may also hold f16, bf16, f64 and integer tensors
//! (integers for labels), which are converted on load.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, View};

use crate::error::{Error, Result};

/// A dense f32 tensor in row-major (C) order.
pub type Tensor = ndarray::ArrayD<f32>;

/// Tensors by name, in name order (so files and reports are deterministic).
pub type TensorMap = BTreeMap<String, Tensor>;

fn file_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::TensorFile { path: path.to_path_buf(), reason: reason.into() }
}

/// A tensor stored in another type than f32, converted on load.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversion {
    pub name: String,
    /// The stored type, as safetensors names it (`F64`, `I32`, `F16`, ...).
    pub from: String,
    /// Whether every value survived exactly (f16, bf16 and small integers always do; f64 and
    /// 32/64-bit integers only when each value is an f32).
    pub exact: bool,
}

/// Decodes one safetensors view to f32; says what was converted.
fn decode(path: &Path, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<(Tensor, Option<Conversion>)> {
    let bad = |what: &str| file_error(path, format!("tensor '{name}': {what}"));
    let mut exact = true;
    let values: Vec<f32> = match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| {
                let v = f64::from_le_bytes(b.try_into().expect("chunk of 8"));
                exact &= v as f32 as f64 == v || v.is_nan();
                v as f32
            })
            .collect(),
        Dtype::BF16 => {
            data.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect()
        }
        Dtype::F16 => data.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| {
                let v = i64::from_le_bytes(b.try_into().expect("chunk of 8"));
                exact &= v as f32 as i64 == v;
                v as f32
            })
            .collect(),
        Dtype::I32 => data
            .chunks_exact(4)
            .map(|b| {
                let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                exact &= v as f32 as i32 == v;
                v as f32
            })
            .collect(),
        Dtype::I16 => data.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32).collect(),
        Dtype::U8 => data.iter().map(|&b| b as f32).collect(),
        Dtype::I8 => data.iter().map(|&b| b as i8 as f32).collect(),
        other => {
            return Err(bad(&format!("dtype {other:?} is not supported; store it as F32")));
        }
    };
    let tensor = Tensor::from_shape_vec(shape.to_vec(), values).map_err(|e| bad(&e.to_string()))?;
    let conversion =
        (dtype != Dtype::F32).then(|| Conversion { name: name.to_string(), from: format!("{dtype:?}"), exact });
    Ok((tensor, conversion))
}

/// IEEE half to f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: renormalise.
            let shift = f.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | ((f << shift) & 0x3ff) << 13
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// Reads every tensor of a safetensors file, converted to f32.
pub fn load(path: impl AsRef<Path>) -> Result<TensorMap> {
    Ok(load_with_metadata(path)?.0)
}

/// Reads every tensor of a safetensors file, converted to f32, and the file's metadata (the
/// header's `__metadata__` strings; empty if it has none).
pub fn load_with_metadata(path: impl AsRef<Path>) -> Result<(TensorMap, Metadata)> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(path, &bytes)
}

/// Reads every tensor of a safetensors file, converted to f32, and which were stored in
/// another type (for the note a command prints, or its refusal under `--strict`).
pub fn load_with_conversions(path: impl AsRef<Path>) -> Result<(TensorMap, Vec<Conversion>)> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (tensors, _, conversions) = decode_file(path, &bytes)?;
    Ok((tensors, conversions))
}

/// Decodes a safetensors file image (`path` names it in errors).
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<(TensorMap, Metadata)> {
    let (tensors, metadata, _) = decode_file(path, bytes)?;
    Ok((tensors, metadata))
}

fn decode_file(path: &Path, bytes: &[u8]) -> Result<(TensorMap, Metadata, Vec<Conversion>)> {
    let invalid = |e: safetensors::SafeTensorError| file_error(path, format!("not a valid safetensors file ({e})"));
    let st = SafeTensors::deserialize(bytes).map_err(invalid)?;
    let mut out = TensorMap::new();
    let mut conversions = Vec::new();
    for (name, view) in st.tensors() {
        let (t, conversion) = decode(path, &name, view.dtype(), view.shape(), view.data())?;
        conversions.extend(conversion);
        out.insert(name, t);
    }
    conversions.sort_by(|a, b| a.name.cmp(&b.name));
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let metadata = header.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    Ok((out, metadata.unwrap_or_default(), conversions))
}

/// A safetensors file's metadata: strings by key, in key order.
pub type Metadata = BTreeMap<String, String>;

struct F32View<'a>(&'a Tensor, Vec<u8>);

impl View for &F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.1)
    }
    fn data_len(&self) -> usize {
        self.1.len()
    }
}

/// Serialises tensors as an F32 safetensors file image.
pub fn to_bytes(tensors: &TensorMap) -> Vec<u8> {
    to_bytes_with_metadata(tensors, &Metadata::new())
}

/// Serialises tensors as an F32 safetensors file image with `metadata` in its header.
pub fn to_bytes_with_metadata(tensors: &TensorMap, metadata: &Metadata) -> Vec<u8> {
    let views: Vec<(String, F32View)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), F32View(t, bytes))
        })
        .collect();
    let header = (!metadata.is_empty()).then(|| metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let mut bytes = safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), header)
        .expect("f32 tensors with consistent shapes always serialise");
    sort_metadata(&mut bytes, metadata);
    bytes
}

/// Rewrites the header's `__metadata__` object with its keys in order: the safetensors crate
/// writes them in a hash map's order, which differs from run to run, so two identical
/// checkpoints would differ in bytes. The object keeps its length (the same pairs), so nothing
/// else in the file moves.
fn sort_metadata(bytes: &mut [u8], metadata: &Metadata) {
    if metadata.is_empty() || bytes.len() < 8 {
        return;
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let Some(header) = bytes.get(8..8 + header_len) else { return };
    let text = String::from_utf8_lossy(header).into_owned();
    let key = "\"__metadata__\":";
    let Some(start) = text.find(key).map(|at| at + key.len()) else { return };
    let sorted = serde_json::to_string(metadata).expect("strings serialise");
    if let Some(old) = text.get(start..start + sorted.len())
        && old.starts_with('{')
        && old.ends_with('}')
        && serde_json::from_str::<Metadata>(old).is_ok_and(|m| &m == metadata)
    {
        bytes[8 + start..8 + start + sorted.len()].copy_from_slice(sorted.as_bytes());
    }
}

/// Writes tensors as an F32 safetensors file, atomically.
pub fn save(path: impl AsRef<Path>, tensors: &TensorMap) -> Result<()> {
    write_atomically(path.as_ref(), &to_bytes(tensors))
}

/// Where a write to a path goes ([`destination`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Opened and appended to where it is: a device, a pipe or socket, or a path through
    /// `/proc` (`/dev/stdout`, a link to `/proc/self/fd/1`, redirected to a file is the file
    /// the shell opened; replacing it would lose what the program printed there).
    InPlace,
    /// This process's standard output (`/dev/stdout`, `/proc/self/fd/1`, a link to them):
    /// written through the same handle as the program's printing, so the bytes land in order
    /// with it whether stdout is a terminal, a pipe or a file the shell opened.
    Stdout,
    /// The regular file to replace atomically, symbolic links followed (even dangling ones,
    /// so a link keeps pointing where it did).
    Replace(std::path::PathBuf),
}

/// Whether a write to `path` replaces a regular file (and which) or goes in place.
pub fn destination(path: &Path) -> Destination {
    // The folder resolved (it exists when outputs were checked), so `..` or `/proc/self`
    // cannot hide where a path goes.
    let folder = |p: &Path| {
        let folder = p.parent().filter(|f| !f.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::canonicalize(folder).unwrap_or_else(|_| folder.to_path_buf())
    };
    let own_fds = Path::new("/proc").join(std::process::id().to_string()).join("fd");
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        if at.file_name().is_some_and(|n| n == "1") && folder(&at) == own_fds {
            return Destination::Stdout;
        }
        if folder(&at).starts_with("/proc") {
            return Destination::InPlace; // another descriptor: its link names no file to replace
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&at) {
                Ok(target) => at = at.parent().unwrap_or(Path::new("")).join(target),
                Err(_) => break,
            },
            _ => break,
        }
    }
    if is_special_file(&at) { Destination::InPlace } else { Destination::Replace(at) }
}

/// Writes `bytes` to a temporary file beside `path`, flushes it to the disk and renames it
/// into place (then flushes the folder, so the rename survives a crash too): an interrupted
/// or failed write never leaves a truncated file at `path`, keeps any previous file there
/// whole, and removes its temporary file.
///
/// Only regular files are replaced ([`destination`]). A device, a pipe or a path through
/// `/proc` (`/dev/null`, `/dev/stdout`, a FIFO) is appended to in place: renaming
/// over `/dev/null` would turn it into a plain file for every program on the host (run as
/// root, an earlier version did exactly that). A symbolic link keeps pointing where it did:
/// the file it names is the one replaced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let resolved = match destination(path) {
        Destination::Stdout => {
            let mut out = std::io::stdout().lock();
            return out.write_all(bytes).and_then(|_| out.flush()).map_err(|e| Error::io(path, e));
        }
        Destination::InPlace => {
            return std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(bytes))
                .map_err(|e| Error::io(path, e));
        }
        Destination::Replace(target) => target,
    };
    let path = resolved.as_path();
    let file_name = path.file_name().ok_or_else(|| file_error(path, "is not a file path"))?;
    let tmp = path.with_file_name(format!(".{}.tmp{}", file_name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // The rename is durable once the folder is (best effort: not every platform opens folders).
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(dir) = std::fs::File::open(folder) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// True when `path` exists and is neither a regular file nor a folder: a character or block
/// device, a FIFO or a socket, which is written in place and never replaced.
pub fn is_special_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

#[cfg(test)]
mod tests {
    #[test]
    fn metadata_is_written_in_key_order_so_identical_files_are_identical_bytes() {
        let tensors = TensorMap::from([("w".to_string(), Tensor::from_elem(vec![2], 1.5))]);
        let metadata: Metadata = ["format", "global_step", "input_positions", "checksum", "z", "a"]
            .iter()
            .map(|k| (k.to_string(), format!("{k}!")))
            .collect();
        let first = to_bytes_with_metadata(&tensors, &metadata);
        for _ in 0..8 {
            assert_eq!(to_bytes_with_metadata(&tensors, &metadata), first);
        }
        let header = String::from_utf8_lossy(&first[8..]).into_owned();
        assert!(header.contains(r#""__metadata__":{"a":"a!","checksum":"checksum!","format":"format!""#), "{header}");
        let (back, meta) = from_bytes(Path::new("x"), &first).unwrap();
        assert_eq!((back, meta), (tensors, metadata));
    }

    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn a_failed_write_keeps_what_was_there_and_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let file = dir.join("out.bin");
        write_atomically(&file, b"first").unwrap();
        // A folder where the file should go: the rename fails after the temporary was written.
        let blocked = dir.join("blocked");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_atomically(&blocked, b"second").is_err());
        assert!(blocked.join("inside").is_dir());
        assert_eq!(std::fs::read(&file).unwrap(), b"first");
        let left: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(left.iter().all(|n| !n.starts_with('.')), "temporaries left: {left:?}");
    }

    #[cfg(unix)]
    #[test]
    fn a_device_is_written_in_place_and_never_replaced() {
        use std::os::unix::fs::FileTypeExt;
        write_atomically(Path::new("/dev/null"), b"gone").unwrap();
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        let dev: Vec<String> =
            std::fs::read_dir("/dev").unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!dev.iter().any(|n| n.starts_with(".null")), "temporaries left in /dev: {dev:?}");
    }

    #[cfg(unix)]
    #[test]
    fn paths_through_dev_and_proc_are_written_in_place_and_links_are_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert_eq!(destination(Path::new("/dev/stdout")), Destination::Stdout);
        assert_eq!(destination(Path::new("/proc/self/fd/1")), Destination::Stdout);
        assert_eq!(destination(Path::new("/dev/stderr")), Destination::InPlace);
        assert_eq!(destination(&dir.join("../../dev/null")), Destination::InPlace);
        // A file in a tmpfs under /dev is a file like any other.
        if Path::new("/dev/shm").is_dir() {
            assert_eq!(destination(Path::new("/dev/shm/y.bin")), Destination::Replace("/dev/shm/y.bin".into()));
        }
        // A link to stdout: stdout, whatever it is (a terminal, a pipe, a file).
        std::os::unix::fs::symlink("/dev/stdout", dir.join("out")).unwrap();
        assert_eq!(destination(&dir.join("out")), Destination::Stdout);
        // A dangling relative link: the file it would name is the one written.
        std::os::unix::fs::symlink("later.bin", dir.join("dangling")).unwrap();
        assert_eq!(destination(&dir.join("dangling")), Destination::Replace(dir.join("later.bin")));
        write_atomically(&dir.join("dangling"), b"x").unwrap();
        assert_eq!(std::fs::read(dir.join("later.bin")).unwrap(), b"x");
        assert!(std::fs::symlink_metadata(dir.join("dangling")).unwrap().file_type().is_symlink());
    }

    #[cfg(unix)]
    #[test]
    fn a_symbolic_link_keeps_pointing_at_the_file_it_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (target, link) = (dir.join("target.bin"), dir.join("link.bin"));
        std::fs::write(&target, b"old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_atomically(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn round_trip_through_bytes() {
        let mut m = TensorMap::new();
        m.insert(
            "a/kernel".into(),
            Tensor::from_shape_vec(vec![2, 3], (0..6).map(|i| i as f32 * 0.5).collect()).unwrap(),
        );
        m.insert("scalar".into(), Tensor::from_elem(vec![], 3.25));
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("t.safetensors");
        save(&p, &m).unwrap();
        assert_eq!(load(&p).unwrap(), m);
    }
}

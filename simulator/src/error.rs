//! The simulator's error type. Messages name the field, instruction or file concerned and say
//! what to change.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A machine field has an impossible value.
    #[error("machine field '{field}': {reason}")]
    Config { field: String, reason: String },

    /// A machine file could not be parsed.
    #[error("{}:{line}:{col}: {reason}", path.display())]
    ConfigFile { path: PathBuf, line: usize, col: usize, reason: String },

    /// Neither a preset nor a readable file.
    #[error("unknown machine '{name}': not a file, and not a preset (presets: {})", known.join(", "))]
    UnknownMachine { name: String, known: Vec<String> },

    /// A program instruction is invalid (bounds, capacity, shapes, dependencies, races).
    #[error("instruction {index} ({op}): {reason}")]
    Program { index: usize, op: &'static str, reason: String },

    /// Data handed to the functional engine does not fit the program.
    #[error("{0}")]
    Data(String),

    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },

    /// A run would need more memory than the host may give it.
    #[error(transparent)]
    Memory(#[from] crate::host::MemoryError),
}

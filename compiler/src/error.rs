//! The compiler's one error type. Every message is a complete sentence a user can act on:
//! it names the node, file and line, or tensor concerned and says what to change.

use std::path::PathBuf;

/// Result with the compiler's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node is ill-formed: wrong number of inputs, shapes that do not fit, bad attributes.
    #[error("node '{node}' ({op}): {reason}")]
    Node { node: String, op: &'static str, reason: String },

    /// A graph-level problem that is not about one node (duplicate names, missing outputs, ...).
    #[error("graph '{graph}': {reason}")]
    Graph { graph: String, reason: String },

    /// A model file could not be parsed or does not describe a valid graph.
    #[error("{}:{line}:{col}: {reason}", path.display())]
    ModelFile { path: PathBuf, line: usize, col: usize, reason: String },

    /// A model name that is neither a zoo model nor a readable `.ron` file.
    #[error("unknown model '{name}': not a file, and not a zoo model (known: {})", known.join(", "))]
    UnknownModel { name: String, known: Vec<&'static str> },

    /// A tensor file could not be read or written, or holds a tensor we cannot use.
    #[error("{}: {reason}", path.display())]
    TensorFile { path: PathBuf, reason: String },

    /// A tensor bound to the graph (input, weight, label) does not fit the node it feeds.
    #[error("tensor '{name}': {reason}")]
    Binding { name: String, reason: String },

    /// Reading or writing a file failed.
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },

    /// A run would need more memory than the host may give it.
    #[error(transparent)]
    Memory(#[from] systolic_simulator::host::MemoryError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause }
    }

    pub(crate) fn binding(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Binding { name: name.into(), reason: reason.into() }
    }
}

//! The runtime's errors: the compiler's and the simulator's, and its own, each naming what to
//! change.

/// What can go wrong running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Compiler(#[from] systolic_compiler::Error),
    #[error(transparent)]
    Simulator(#[from] systolic_simulator::Error),
    /// A batch, a state or a setting the backend cannot use.
    #[error("{0}")]
    Input(String),
    /// A configuration TensorFlow would refuse too, naming the field and what to change.
    #[error("{field}: {reason}")]
    Config { field: String, reason: String },
    /// A configuration file that does not parse or names unknown fields.
    #[error("{path}:{line}:{col}: {reason}")]
    ConfigFile { path: String, line: usize, col: usize, reason: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

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
    /// A checkpoint that cannot be used, and why.
    #[error("{path}: {reason}")]
    Checkpoint { path: String, reason: String },
    /// Training produced a NaN or an infinity.
    #[error(
        "training stopped at global step {step}: the first non-finite tensor is '{tensor}' ({value}){}; lower the \
         learning rate or check the input",
        loss.map(|l| format!(", the loss {l}")).unwrap_or_default()
    )]
    NonFinite { step: u64, loss: Option<f32>, tensor: String, value: f32 },
    /// A step left a NaN or an infinity in the state (the estimator names the step).
    #[error("the step left a non-finite value in '{tensor}' ({value})")]
    NonFiniteState { tensor: String, value: f32 },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

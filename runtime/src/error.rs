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
}

pub type Result<T> = std::result::Result<T, Error>;

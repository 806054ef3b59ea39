//! Errors of the device runtime (engine, packages).

use std::path::PathBuf;

/// Runtime errors, each naming what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model package that is missing, corrupt or does not fit this build.
    #[error("model package {path}: {reason}")]
    Package { path: PathBuf, reason: String },
    /// A package manifest that does not parse or fails validation.
    #[error("model package {path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: pe_clip_models::package::ManifestError,
    },
    /// tract could not load or run a model.
    #[error("{context}: {message}")]
    Engine { context: String, message: String },
    /// Loading classes, clips, datasets or model weights failed (the message names the file).
    #[error(transparent)]
    Models(#[from] pe_clip_models::Error),
    /// Input of the wrong size or kind.
    #[error("{0}")]
    Input(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn package(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Package {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn engine(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Engine {
            context: context.into(),
            message: format!("{err:#}"),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

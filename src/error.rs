//! Errors of the `pe-clip` library. Every variant names what it concerns (the file, key, frame,
//! device or option); the command line prints them as they are.

use std::path::PathBuf;

/// The library's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
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
    /// Loading classes, clips, datasets or model weights failed (the message names the file).
    #[error(transparent)]
    Models(#[from] pe_clip_models::Error),
    /// A driver profile or int8 calculation refused its input (`context`: which file or step).
    #[error("{context}: {source}")]
    Calibrate {
        context: String,
        #[source]
        source: pe_clip_calibrate::Error,
    },
    /// An ONNX model whose graph or int8 layers cannot be read or rewritten.
    #[error("model package {path}: {source}")]
    Onnx {
        path: PathBuf,
        #[source]
        source: OnnxError,
    },
    /// tract could not load or run a model.
    #[error("{context}: {message}")]
    Engine { context: String, message: String },
    /// A file, clip or directory whose content cannot be used for what was asked.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// A frame of the wrong size was handed to the step model.
    #[error("a frame must be {side}x{side} RGB ({expected} bytes), got {got} bytes")]
    FrameSize {
        side: usize,
        expected: usize,
        got: usize,
    },
    /// A camera, GPIO line or other device failed.
    #[error("{device}: {reason}")]
    Device { device: String, reason: String },
    /// The system would not start a thread.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// An option, name or setting given by the user is out of range or malformed.
    #[error("{0}")]
    Usage(String),
    /// A part of a running pipeline ended without saying why (a thread that died).
    #[error("{0}")]
    Stopped(&'static str),
}

/// Why an ONNX step model cannot be read or rewritten: a tensor of the wrong type or size, or
/// an int8 layer that is not laid out as `pe_clip_calibrate::int8::quantize` writes it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OnnxError {
    #[error("the model has no graph")]
    NoGraph,
    /// A tensor of another element type, or raw data of a size the type cannot have.
    #[error("{tensor}: {reason}")]
    Tensor { tensor: String, reason: String },
    /// A `QuantizeLinear` that does not read an `.x_scale` constant: not written by pe-clip.
    #[error(
        "QuantizeLinear {node:?} does not read a `.x_scale` constant (not written by pe-clip)"
    )]
    ForeignQuantize { node: String },
    /// An int8 layer whose constants are missing, of the wrong size, or out of range.
    #[error("int8 layer {layer}: {reason}")]
    Site { layer: String, reason: String },
    /// A constant to rewrite that the model does not have, or that holds another size.
    #[error("{constant}: {reason}")]
    Constant { constant: String, reason: String },
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

    pub fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage(message.into())
    }

    pub fn device(device: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Device {
            device: device.into(),
            reason: reason.to_string(),
        }
    }

    pub fn calibrate(context: impl Into<String>, source: pe_clip_calibrate::Error) -> Self {
        Error::Calibrate {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

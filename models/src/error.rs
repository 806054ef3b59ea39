//! The one error type of `pe-clip-models`.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading models, texts or clips. Messages are lower-case and
/// name the file, key or frame at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A JSON file does not parse into what it should hold.
    #[error("{}: invalid json: {err}", path.display())]
    Json {
        path: PathBuf,
        err: serde_json::Error,
    },
    /// A file parses but its content is not acceptable.
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// The class list failed validation.
    #[error("class list {origin}: {reason}")]
    Classes { origin: String, reason: String },
    /// The tokenizer files are unusable or a text cannot be encoded.
    #[error("tokenizer ({origin}): {reason}")]
    Tokenizer { origin: String, reason: String },
    /// A tensor the model needs is absent from the weights file.
    #[error("{}: missing tensor `{key}`", path.display())]
    MissingTensor { path: PathBuf, key: String },
    /// A tensor exists but its shape disagrees with `config.json`.
    #[error("{}: tensor `{key}` has shape {found:?} but the config implies {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor has a dtype the loader does not read.
    #[error("{}: tensor `{key}` has unsupported dtype {dtype}", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    /// The weights file is not a readable safetensors file (truncated, wrong format, ...).
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    /// A clip path is neither a folder of frames nor a `.y4m` file.
    #[error("{}: not a clip (expected a folder of JPEG/PNG frames or a .y4m file)", path.display())]
    NotAClip { path: PathBuf },
    /// A clip had no frame that could be decoded.
    #[error("{}: no readable frame{}", path.display(), list_unreadable(unreadable))]
    NoReadableFrames {
        path: PathBuf,
        /// The frames that failed to decode (file names, or `file#index` for y4m).
        unreadable: Vec<String>,
    },
    /// A line of an annotation or split file is wrong.
    #[error("{}:{line}: {reason}", file.display())]
    Annotation {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An error from candle, the tensor library.
    #[cfg(feature = "train")]
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }

    /// An invalid-content error for `path`.
    pub fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// ` (unreadable: a.jpg, b.jpg, ... and N more)`, or nothing when the list is empty.
fn list_unreadable(frames: &[String]) -> String {
    const SHOWN: usize = 5;
    if frames.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = frames
        .iter()
        .take(SHOWN)
        .map(|f| {
            std::path::Path::new(f)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(f)
        })
        .collect();
    let more = frames.len().saturating_sub(SHOWN);
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(" (unreadable: {}{tail})", names.join(", "))
}

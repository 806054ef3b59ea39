//! The model package contract, shared by the exporter (host) and the runtime (device) and built
//! without candle: the manifest's types and its validation ([`manifest`]), the step model's
//! input and output names ([`io`]) and the names of an int8 layer's constants ([`int8`], owned by
//! `pe-clip-calibrate`, which writes them).
//!
//! A package is a directory: `manifest.json`, the step model `model.onnx` and, once a device
//! has calibrated it, `drivers/` (profiles) and `previous/` (the version before the last
//! rewrite). Reading and writing package directories is the binary's (`pe_clip::package`).

pub mod io;
pub mod manifest;
mod validate;

/// Names of an int8 linear layer's constants (`L.x_scale`, `L.weight_q`, ...).
pub use pe_clip_calibrate::site as int8;

pub use manifest::*;
pub use validate::{limits, ManifestError};

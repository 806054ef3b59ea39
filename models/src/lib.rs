//! # pe-clip-models
//!
//! The model contract shared by the host tools and the device runtime: the class list and its
//! action-unit texts, the CLIP tokenizer, clip input (frame folders and `.y4m`), frame sampling
//! and the one preprocessing implementation. With the `train` feature it adds the candle models:
//! the CLIP backbone loaded from an HF directory and zero-shot recognition.
#![cfg_attr(not(feature = "train"), forbid(unsafe_code))]

pub mod augment;
pub mod classes;
pub mod dataset;
pub mod error;
pub mod io;
pub mod metrics;
pub mod package;
pub mod prediction;
pub mod preprocess;
pub mod report;
pub mod rng;
pub mod sampling;
pub mod synth;
pub mod tokenizer;
pub mod video;

#[cfg(feature = "train")]
pub mod clip;
#[cfg(feature = "train")]
pub mod export;
#[cfg(feature = "train")]
pub mod peclip;
#[cfg(feature = "train")]
pub mod train;
#[cfg(feature = "train")]
pub mod zero_shot;

pub use classes::{ClassSet, ClassText};
pub use error::{Error, Result};
pub use preprocess::{PixelNorm, PreprocessSpec};

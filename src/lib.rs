//! # pe-clip
//!
//! Driver facial-expression recognition with PE-CLIP. This crate holds the command-line tool
//! (one module per subcommand); the model contract and the candle models live in
//! `pe-clip-models`.
#![forbid(unsafe_code)]

pub mod calibration;
pub mod cli;
pub mod engine;
pub mod error;
#[cfg(feature = "train")]
pub mod export;
pub mod frames;
pub mod onnx;
pub mod package;
pub mod runtime;

//! Quantization maths for pe-clip's int8 export, independent of any graph format.
//!
//! The int8 form tract runs fast uses **signed int8 activations at zero point 0** and **one scale
//! per weight tensor**: `QuantizeLinear → MatMulInteger → Add(i32 bias) → Cast → Mul(scale)`,
//! where tract folds the bias into its int8 matmul kernel and the cast and scalar rescale are cheap
//! element-wise passes (measured on this machine: a 197×768×3072 layer in 2.8 ms against 4.5 ms in
//! f32; `QLinearMatMul` followed by a float bias add took 4.8 ms, and a per-column rescale `Mul`
//! costs about as much again). This crate estimates the
//! scales and prepares weights so that per-tensor scales lose little:
//!
//! - [`observer`]: activation statistics from calibration data and the scale each observer
//!   (min/max, percentile, MSE-optimal) picks;
//! - [`quant`]: symmetric int8 quantization of tensors (per tensor and per channel, for
//!   comparison) and error measures;
//! - [`fold`]: exact rewrites (affine into the next linear, linear after linear, stacking);
//! - [`equalize`]: SmoothQuant-style per-input-channel equalization, folded exactly into the
//!   affine (LayerNorm) that feeds the matmul, so the f32 function is unchanged while the
//!   activation and weight ranges are balanced;
//! - [`requant`]: new activation ranges for an int8 layer whose f32 weights are gone (on-device
//!   re-calibration);
//! - [`profile`]: driver profiles, a small regularised correction of the video head fitted to one
//!   driver's clips.

pub mod calibrator;
pub mod equalize;
pub mod error;
pub mod fold;
pub mod graph;
pub mod int8;
pub mod observer;
pub mod profile;
pub mod quant;
pub mod requant;
pub mod site;

pub use error::{Error, Result};
pub use observer::{Observer, ObserverKind};
pub use quant::{dequantize, quantize_per_channel, quantize_per_tensor, QuantTensor};

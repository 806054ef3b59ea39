//! Frames and clips as step-model input, below both the runtime and calibration:
//!
//! - [`source`]: live and file frame sources (`FrameSource`: y4m, frame folders, synthetic;
//!   [`camera`]: V4L2), each frame with its index and time, corrupt ones reported;
//! - [`roi`]: the face region and the crop-and-resize to the model input;
//! - [`clips`]: labelled clips on disk and their test-time sampled frames, prepared as the
//!   runtime prepares camera frames;
//! - here: per-frame features of a clip through a step model.

pub mod camera;
pub mod clips;
pub mod roi;
pub mod source;

use crate::engine::StepModel;
use crate::error::Result;

/// Per-frame features of one clip, from zero state.
pub fn clip_features(step: &mut StepModel, frames: &[Vec<u8>]) -> Result<Vec<Vec<f32>>> {
    let mut state = step.zero_state();
    frames.iter().map(|f| step.step(f, &mut state)).collect()
}

//! Clips as step-model input: the test-time sampled frames of a clip (frame folder or `.y4m`)
//! resized to the model size as RGB bytes, and their per-frame features.

use std::path::Path;

use pe_clip_models::video::load_sampled_clip;
use pe_clip_models::{PixelNorm, PreprocessSpec};

use crate::engine::StepModel;
use crate::error::{Error, Result};

/// The `window` test-time frames of a clip as RGB bytes at the model size.
pub fn clip_frames(path: &Path, window: usize, image_size: usize) -> Result<Vec<Vec<u8>>> {
    Ok(clip_frames_and_length(path, window, image_size)?.0)
}

/// [`clip_frames`] and the clip's readable length.
pub fn clip_frames_and_length(
    path: &Path,
    window: usize,
    image_size: usize,
) -> Result<(Vec<Vec<u8>>, usize)> {
    let clip = load_sampled_clip(path, window)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    for s in &clip.skipped {
        log::warn!(
            "{}: skipped frame {}: {}",
            path.display(),
            s.frame,
            s.reason
        );
    }
    let spec = PreprocessSpec {
        image_size,
        pixel_norm: PixelNorm::None,
    };
    let frames = clip
        .frames
        .iter()
        .map(|f| spec.frame_to_rgb_bytes(f))
        .collect();
    Ok((frames, clip.readable_frames))
}

/// Per-frame features of one clip, from zero state.
pub fn clip_features(step: &mut StepModel, frames: &[Vec<u8>]) -> Result<Vec<Vec<f32>>> {
    let mut state = step.zero_state();
    frames.iter().map(|f| step.step(f, &mut state)).collect()
}

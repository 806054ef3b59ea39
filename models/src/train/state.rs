//! The run's training state: the hyper-parameters, one record per finished epoch and
//! `train/state.json`, the file a run commits last and `--resume` continues from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::augment::Jitter;
use crate::error::{Error, Result};

/// Format version of `train/state.json`.
pub const TRAIN_STATE_VERSION: u32 = 1;

/// Training hyper-parameters (defaults: the reference's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Clips per optimiser step (split into micro-batches of `batch_size / accumulate`).
    pub batch_size: usize,
    /// Gradient accumulation: micro-batches per step.
    pub accumulate: usize,
    /// What the backward pass recomputes (memory for time; the same update).
    pub recompute: super::step::Recompute,
    /// The dtype the frozen backbone computes in (the trainables and their optimiser stay f32).
    pub precision: super::precision::Precision,
    pub adapter_lr: f64,
    pub prompt_lr: f64,
    pub warmup_epochs: usize,
    pub warmup_lr_init: f64,
    pub seed: u64,
    /// Frames per clip.
    pub segments: usize,
    /// DFEW fold (1..5).
    pub fold: usize,
    /// Mixup / FMix per batch as the reference.
    pub mix: bool,
    /// `brightness` (DFEW), `rotation` (FERV39K) or `none`.
    pub jitter: String,
    /// Smallest random-resized-crop area as a fraction of the frame (the reference: 0.08).
    #[serde(default = "default_min_crop_area")]
    pub min_crop_area: f64,
}

fn default_min_crop_area() -> f64 {
    crate::augment::REFERENCE_MIN_CROP_AREA
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 8,
            accumulate: 1,
            recompute: super::step::Recompute::None,
            precision: super::precision::Precision::F32,
            adapter_lr: 2e-4,
            prompt_lr: 3e-5,
            warmup_epochs: 3,
            warmup_lr_init: 2e-5,
            seed: 0,
            segments: crate::sampling::NUM_SEGMENTS,
            fold: 1,
            mix: true,
            jitter: "brightness".into(),
            min_crop_area: crate::augment::REFERENCE_MIN_CROP_AREA,
        }
    }
}

impl TrainConfig {
    pub(super) fn jitter(&self) -> Result<Jitter> {
        match self.jitter.as_str() {
            "brightness" => Ok(Jitter::Brightness),
            "rotation" => Ok(Jitter::Rotation),
            "none" => Ok(Jitter::None),
            o => Err(Error::Config(format!(
                "unknown jitter {o:?} (brightness, rotation or none)"
            ))),
        }
    }

    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 || self.accumulate == 0 || self.segments == 0 {
            return Err(Error::Config(
                "epochs, batch size, accumulation and frames must be at least 1".into(),
            ));
        }
        if self.batch_size % self.accumulate != 0 {
            return Err(Error::Config(format!(
                "batch size {} is not a multiple of the accumulation steps {}",
                self.batch_size, self.accumulate
            )));
        }
        if !(self.min_crop_area > 0.0 && self.min_crop_area <= 1.0) {
            return Err(Error::Config(format!(
                "the smallest crop area {} is not in (0, 1]",
                self.min_crop_area
            )));
        }
        self.jitter().map(|_| ())
    }
}

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochRecord {
    pub epoch: usize,
    pub lr_adapters: f64,
    pub lr_prompts: f64,
    pub train_loss: f64,
    pub test_uar: f64,
    pub test_war: f64,
    pub seconds: f64,
    pub train_clips_per_second: f64,
    /// Time the model waited for data (the loader runs ahead of it).
    pub loader_wait_seconds: f64,
}

/// `train/state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    pub format_version: u32,
    pub config: TrainConfig,
    pub epochs_done: usize,
    pub adapter_steps: u64,
    pub prompt_steps: u64,
    pub best_epoch: Option<usize>,
    pub best_uar: f64,
    pub history: Vec<EpochRecord>,
    /// f16's loss scale after the last finished epoch (absent: no scaling).
    #[serde(default)]
    pub loss_scaler: super::precision::LossScaler,
}

pub(super) fn state_path(run: &Path) -> PathBuf {
    run.join("train").join("state.json")
}

/// Read `train/state.json` of a run, if it exists.
pub fn read_state(run: &Path) -> Result<Option<TrainState>> {
    let path = state_path(run);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let st: TrainState = serde_json::from_str(&text).map_err(|err| Error::Json {
        path: path.clone(),
        err,
    })?;
    if st.format_version != TRAIN_STATE_VERSION {
        return Err(Error::invalid(
            &path,
            format!("format_version {} is not supported", st.format_version),
        ));
    }
    Ok(Some(st))
}

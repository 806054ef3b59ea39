//! The training data path: the epoch's seeded shuffle, and a loader thread that reads and
//! augments each batch's clips in parallel ahead of the model.
//!
//! Every random choice is derived from (seed, epoch, purpose, position) only, so that a resumed
//! run draws what an uninterrupted one would.

use std::sync::mpsc::SyncSender;

use rayon::prelude::*;

use super::state::TrainConfig;
use crate::augment::ClipAugment;
use crate::dataset::Sample;
use crate::error::Result;
use crate::preprocess::{to_chw, PreprocessSpec};
use crate::rng::SeededRng;
use crate::sampling::train_indices;
use crate::video::load_clip_sampled_by;

/// A generator derived from (seed, epoch, purpose, position) only, so that every choice is the
/// same whether or not the run was resumed.
pub(super) fn rng_for(seed: u64, epoch: usize, what: u64, index: usize) -> SeededRng {
    let mut r = SeededRng::new(seed ^ 0x5EED_0000_0000_0000);
    let a = r.next_u64() ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let b = a
        ^ what.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ (index as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
    SeededRng::new(b)
}

/// A training clip: train-time sampling and the clip-level augmentation, as CHW floats.
fn load_train_clip(
    sample: &Sample,
    cfg: &TrainConfig,
    spec: &PreprocessSpec,
    mut rng: SeededRng,
) -> Result<Vec<f32>> {
    let segments = cfg.segments;
    let clip = load_clip_sampled_by(&sample.clip, |n| train_indices(n, segments, &mut rng))?;
    let first = &clip.frames[0];
    let aug = ClipAugment::draw_with_min_area(
        first.width(),
        first.height(),
        cfg.min_crop_area,
        cfg.jitter()?,
        &mut rng,
    );
    Ok(clip
        .frames
        .iter()
        .flat_map(|f| to_chw(&aug.apply(f, spec.image_size as u32), spec.pixel_norm))
        .collect())
}

/// A loaded batch: the clips' CHW pixels back to back, and their labels.
pub(super) type LoadedBatch = Result<(Vec<f32>, Vec<u32>)>;

/// The epoch's batches: a seeded shuffle of the training set cut into `batch_size` chunks.
pub(super) fn epoch_batches(cfg: &TrainConfig, epoch: usize, clips: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..clips).collect();
    let mut shuffle = rng_for(cfg.seed, epoch, 1, 0);
    for i in (1..order.len()).rev() {
        order.swap(i, shuffle.below(i + 1));
    }
    order
        .chunks(cfg.batch_size)
        .map(<[usize]>::to_vec)
        .collect()
}

/// The loader thread: each batch's clips loaded in parallel, sent in order; stops when the
/// model side hangs up.
pub(super) fn load_batches(
    samples: &[Sample],
    batches: &[Vec<usize>],
    cfg: &TrainConfig,
    spec: &PreprocessSpec,
    epoch: usize,
    tx: SyncSender<LoadedBatch>,
) {
    for (b, batch) in batches.iter().enumerate() {
        let loaded: Result<Vec<Vec<f32>>> = batch
            .par_iter()
            .enumerate()
            .map(|(j, &i)| {
                load_train_clip(
                    &samples[i],
                    cfg,
                    spec,
                    rng_for(cfg.seed, epoch, 2, b * 100_000 + j),
                )
            })
            .collect();
        let item = loaded.map(|clips| {
            (
                clips.concat(),
                batch.iter().map(|&i| samples[i].label as u32).collect(),
            )
        });
        if tx.send(item).is_err() {
            return;
        }
    }
}

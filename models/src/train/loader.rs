//! The training data path: the epoch's seeded shuffle, and a loader thread that reads and
//! augments each batch's clips in parallel ahead of the model, on a thread pool of its own or on
//! the shared one.
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
pub type LoadedBatch = Result<(Vec<f32>, Vec<u32>)>;

/// Where clips are decoded and augmented: rayon's global pool (shared with candle's CPU
/// kernels: on a CPU-trained run loading and compute share the cores), or a pool of its own
/// (a GPU run: the cores are the loader's; or a cap on its share).
#[derive(Debug)]
pub struct Loader {
    pool: Option<rayon::ThreadPool>,
}

impl Loader {
    /// `threads` loader threads of their own; 0: rayon's global pool.
    pub fn new(threads: usize) -> Result<Self> {
        if threads == 0 {
            return Ok(Self { pool: None });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("pe-clip-loader-{i}"))
            .build()
            .map_err(|e| crate::error::Error::Config(format!("loader threads: {e}")))?;
        Ok(Self { pool: Some(pool) })
    }

    /// The threads clips are loaded on.
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or_else(
            rayon::current_num_threads,
            rayon::ThreadPool::current_num_threads,
        )
    }

    /// Batch `b` of `epoch` (the clips `batch` of `samples`), its clips and their frames decoded
    /// in parallel: train-time sampling and augmentation drawn from (seed, epoch, position).
    pub fn load_batch(
        &self,
        samples: &[Sample],
        batch: &[usize],
        cfg: &TrainConfig,
        spec: &PreprocessSpec,
        epoch: usize,
        b: usize,
    ) -> LoadedBatch {
        let load = || -> Result<Vec<Vec<f32>>> {
            batch
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
                .collect()
        };
        let clips = match &self.pool {
            Some(pool) => pool.install(load),
            None => load(),
        }?;
        Ok((
            clips.concat(),
            batch.iter().map(|&i| samples[i].label as u32).collect(),
        ))
    }
}

/// The epoch's batches: a seeded shuffle of the training set cut into `batch_size` chunks.
pub fn epoch_batches(cfg: &TrainConfig, epoch: usize, clips: usize) -> Vec<Vec<usize>> {
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

/// The loader thread: each batch loaded by `loader`, sent in order; stops when the model side
/// hangs up.
pub(super) fn load_batches(
    loader: &Loader,
    samples: &[Sample],
    batches: &[Vec<usize>],
    cfg: &TrainConfig,
    spec: &PreprocessSpec,
    epoch: usize,
    tx: SyncSender<LoadedBatch>,
) {
    for (b, batch) in batches.iter().enumerate() {
        let item = loader.load_batch(samples, batch, cfg, spec, epoch, b);
        if tx.send(item).is_err() {
            return;
        }
    }
}

//! The PE-CLIP training loop: per-epoch learning rates, shuffled batches loaded in parallel with
//! the model (bounded prefetch), Mixup/FMix, per-epoch evaluation, atomic checkpoints and an
//! exact `--resume`.
//!
//! Run directory (beside `peclip.json` + `trainables.safetensors`, the best epoch by test UAR, as
//! the reference selects it):
//! ```text
//! train/state.json               config, finished epochs, history; written last (the commit point)
//! train/curves.svg               training loss and test UAR/WAR per epoch
//! train/last-eN.safetensors      trainables after epoch N
//! train/optim-eN.safetensors     AdamW moments after epoch N
//! ```
//! Every random choice is derived from (seed, epoch, position), so a resumed run ends exactly as
//! an uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::schedule::CosineSchedule;
use super::step::{cross_entropy, Optimizers};
use crate::augment::{draw_mix, ClipAugment, Jitter, Mix};
use crate::dataset::{self, Dataset, Sample, Split};
use crate::error::{Error, Result};
use crate::metrics::{Confusion, Metrics};
use crate::peclip::checkpoint::{save_run, RunConfig};
use crate::peclip::{GruMode, PeClip};
use crate::prediction::argmax;
use crate::preprocess::{to_chw, PreprocessSpec};
use crate::rng::SeededRng;
use crate::sampling::{test_indices, train_indices};
use crate::video::load_clip_sampled_by;
use crate::zero_shot::l2_normalize;

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
    fn jitter(&self) -> Result<Jitter> {
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
}

fn state_path(run: &Path) -> PathBuf {
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

/// A generator derived from (seed, epoch, purpose, position) only, so that every choice is the
/// same whether or not the run was resumed.
fn rng_for(seed: u64, epoch: usize, what: u64, index: usize) -> SeededRng {
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

/// A test clip: test-time sampling, no augmentation.
fn load_test_clip(sample: &Sample, segments: usize, spec: &PreprocessSpec) -> Result<Vec<f32>> {
    let clip = load_clip_sampled_by(&sample.clip, |n| test_indices(n, segments))?;
    Ok(clip
        .frames
        .iter()
        .flat_map(|f| spec.frame_to_chw(f))
        .collect())
}

/// Evaluate `model` (an inference view) on `data` with test-time sampling.
pub fn evaluate(
    model: &PeClip,
    data: &Dataset,
    segments: usize,
    spec: &PreprocessSpec,
) -> Result<Metrics> {
    let text = l2_normalize(&model.text_features()?)?;
    let mut confusion = Confusion::new(model.classes.len());
    let s = spec.image_size;
    for chunk in data.samples.chunks(4) {
        let loaded: Vec<Result<Vec<f32>>> = chunk
            .par_iter()
            .map(|x| load_test_clip(x, segments, spec))
            .collect();
        for (sample, pixels) in chunk.iter().zip(loaded) {
            let v = Tensor::from_vec(pixels?, (1, segments, 3, s, s), &model.clip.device)?;
            let logits = model
                .forward_with_text(&v, GruMode::PerVideo, &text)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            confusion.add(sample.label, argmax(&logits));
        }
    }
    Ok(confusion.metrics())
}

/// What a training run reports as it goes.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// An optimiser step finished (`batch` of `batches`, 1-based) in epoch `epoch` (1-based).
    Step {
        epoch: usize,
        batch: usize,
        batches: usize,
        /// The batch's mean loss.
        loss: f64,
    },
    /// The epoch's training part is done; the test split is being evaluated.
    Evaluating { epoch: usize },
    /// The epoch is done and checkpointed.
    Epoch(&'a EpochRecord),
}

/// The receiver of [`Progress`] reports.
pub type ProgressCallback<'a> = &'a mut dyn FnMut(Progress<'_>);

/// Where a training run reads and writes, and how far it goes.
#[derive(Debug, Clone, Copy)]
pub struct TrainJob<'a> {
    /// Dataset root.
    pub data: &'a Path,
    /// Run directory.
    pub out: &'a Path,
    /// Continue from `train/state.json`.
    pub resume: bool,
    /// Stop after this many epochs in total (the run can be resumed); `None` runs to the end.
    pub stop_after: Option<usize>,
}

/// Train `model` (whose run configuration is `run`) as `job` says.
pub fn train(
    model: &PeClip,
    run: &RunConfig,
    cfg: &TrainConfig,
    job: TrainJob<'_>,
    on_progress: ProgressCallback<'_>,
) -> Result<TrainState> {
    let (data_root, out, resume, stop_after) = (job.data, job.out, job.resume, job.stop_after);
    cfg.validate()?;
    let train_set = dataset::load(data_root, Split::Train, cfg.fold, &model.classes)?;
    let test_set = dataset::load(data_root, Split::Test, cfg.fold, &model.classes)?;
    if train_set.samples.is_empty() {
        return Err(Error::invalid(data_root, "the training split has no clip"));
    }
    let spec = run.preprocess;
    let mut opt = Optimizers::new(model, cfg.adapter_lr, cfg.prompt_lr)?;
    let mut state = TrainState {
        format_version: TRAIN_STATE_VERSION,
        config: cfg.clone(),
        epochs_done: 0,
        adapter_steps: 0,
        prompt_steps: 0,
        best_epoch: None,
        best_uar: -1.0,
        history: Vec::new(),
    };
    let train_dir = out.join("train");
    if resume {
        let st = read_state(out)?
            .ok_or_else(|| Error::invalid(out, "nothing to resume: no train/state.json"))?;
        if st.config != *cfg {
            return Err(Error::invalid(
                state_path(out),
                "the training options differ from the run being resumed",
            ));
        }
        let last = crate::clip::Weights::open(
            &train_dir.join(format!("last-e{}.safetensors", st.epochs_done)),
            &Device::Cpu,
        )?;
        for (name, var) in model.trainables.named_vars() {
            var.set(&last.get(name, var.dims())?.to_device(var.device())?)?;
        }
        let moments = candle_core::safetensors::load(
            train_dir.join(format!("optim-e{}.safetensors", st.epochs_done)),
            &model.clip.device,
        )?;
        opt.adapters.load_state(&moments, st.adapter_steps)?;
        opt.prompts.load_state(&moments, st.prompt_steps)?;
        state = st;
    } else {
        std::fs::create_dir_all(&train_dir).map_err(|e| Error::io(&train_dir, e))?;
        save_run(out, run, &model.trainables)?;
    }
    let sched_a = CosineSchedule {
        warmup_epochs: cfg.warmup_epochs,
        warmup_lr_init: cfg.warmup_lr_init,
        ..CosineSchedule::reference(cfg.adapter_lr, cfg.epochs)
    };
    let sched_p = CosineSchedule {
        warmup_epochs: cfg.warmup_epochs,
        warmup_lr_init: cfg.warmup_lr_init,
        ..CosineSchedule::reference(cfg.prompt_lr, cfg.epochs)
    };
    let s = spec.image_size;
    let micro = cfg.batch_size / cfg.accumulate;
    let end = stop_after.map_or(cfg.epochs, |n| n.min(cfg.epochs));
    for epoch in state.epochs_done..end {
        let t0 = std::time::Instant::now();
        opt.adapters.params.lr = sched_a.lr(epoch);
        opt.prompts.params.lr = sched_p.lr(epoch);
        // The epoch's order.
        let mut order: Vec<usize> = (0..train_set.samples.len()).collect();
        let mut shuffle = rng_for(cfg.seed, epoch, 1, 0);
        for i in (1..order.len()).rev() {
            order.swap(i, shuffle.below(i + 1));
        }
        let batches: Vec<Vec<usize>> = order
            .chunks(cfg.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        // The loader runs ahead of the model by at most two batches.
        let (tx, rx) = sync_channel::<Result<(Vec<f32>, Vec<u32>)>>(2);
        let mut loss_sum = 0.0f64;
        let mut loss_n = 0usize;
        let mut wait = 0.0f64;
        std::thread::scope(|scope| -> Result<()> {
            let samples = &train_set.samples;
            let batches_ref = &batches;
            scope.spawn(move || {
                for (b, batch) in batches_ref.iter().enumerate() {
                    let loaded: Result<Vec<Vec<f32>>> = batch
                        .par_iter()
                        .enumerate()
                        .map(|(j, &i)| {
                            load_train_clip(
                                &samples[i],
                                cfg,
                                &spec,
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
            });
            for b in 0..batches.len() {
                let tw = std::time::Instant::now();
                let (pixels, labels) = rx
                    .recv()
                    .map_err(|_| Error::Config("the data loader stopped".into()))??;
                wait += tw.elapsed().as_secs_f64();
                let n = labels.len();
                let videos =
                    Tensor::from_vec(pixels, (n, cfg.segments, 3, s, s), &model.clip.device)?;
                let mut mix_rng = rng_for(cfg.seed, epoch, 3, b);
                let mix = if cfg.mix && n > 1 {
                    draw_mix(s as u32, &mut mix_rng)
                } else {
                    Mix::None
                };
                // The partner of each clip for mixing: the batch reversed.
                let perm: Vec<u32> = (0..n as u32).rev().collect();
                let perm_t = Tensor::new(perm.as_slice(), &model.clip.device)?;
                let other_labels: Vec<u32> = perm.iter().map(|&i| labels[i as usize]).collect();
                let (videos, lambda) = match &mix {
                    Mix::None => (videos, 1.0),
                    Mix::Mixup { lambda } => {
                        let partner = videos.index_select(&perm_t, 0)?;
                        (
                            ((&videos * *lambda)? + (partner * (1.0 - lambda))?)?,
                            *lambda,
                        )
                    }
                    Mix::Fmix { lambda, mask } => {
                        let m =
                            Tensor::from_vec(mask.clone(), (1, 1, 1, s, s), &model.clip.device)?;
                        let partner = videos.index_select(&perm_t, 0)?;
                        let inv = (1.0 - &m)?;
                        (
                            (videos.broadcast_mul(&m)? + partner.broadcast_mul(&inv)?)?,
                            *lambda,
                        )
                    }
                };
                // Gradient accumulation over micro-batches.
                let mut grads: Option<candle_core::backprop::GradStore> = None;
                let mut batch_loss = 0.0f64;
                for start in (0..n).step_by(micro.max(1)) {
                    let len = micro.min(n - start);
                    let v = videos.narrow(0, start, len)?;
                    let logits = model.forward(&v, GruMode::PerVideo)?;
                    let ya = &labels[start..start + len];
                    let yb = &other_labels[start..start + len];
                    let loss = if lambda < 1.0 {
                        ((cross_entropy(&logits, ya)? * lambda)?
                            + (cross_entropy(&logits, yb)? * (1.0 - lambda))?)?
                    } else {
                        cross_entropy(&logits, ya)?
                    };
                    let scaled = (loss.clone() * (len as f64 / n as f64))?;
                    let value = f64::from(loss.to_scalar::<f32>()?);
                    loss_sum += value * len as f64;
                    batch_loss += value * len as f64 / n as f64;
                    loss_n += len;
                    let g = scaled.backward()?;
                    match &mut grads {
                        None => grads = Some(g),
                        Some(acc) => acc.extend(g)?,
                    }
                }
                if let Some(g) = grads {
                    opt.adapters.step(&g)?;
                    opt.prompts.step(&g)?;
                }
                on_progress(Progress::Step {
                    epoch: epoch + 1,
                    batch: b + 1,
                    batches: batches.len(),
                    loss: batch_loss,
                });
            }
            Ok(())
        })?;
        let train_seconds = t0.elapsed().as_secs_f64();
        on_progress(Progress::Evaluating { epoch: epoch + 1 });
        let view = model.with_trainables(model.trainables.clone().into_inference())?;
        let metrics = if test_set.samples.is_empty() {
            Confusion::new(model.classes.len()).metrics()
        } else {
            evaluate(&view, &test_set, cfg.segments, &spec)?
        };
        let record = EpochRecord {
            epoch: epoch + 1,
            lr_adapters: opt.adapters.params.lr,
            lr_prompts: opt.prompts.params.lr,
            train_loss: loss_sum / loss_n.max(1) as f64,
            test_uar: metrics.uar,
            test_war: metrics.war,
            seconds: t0.elapsed().as_secs_f64(),
            train_clips_per_second: train_set.samples.len() as f64 / train_seconds.max(1e-9),
            loader_wait_seconds: wait,
        };
        // Checkpoint: epoch-tagged files first, then the state that points at them.
        model
            .trainables
            .save(&train_dir.join(format!("last-e{}.safetensors", epoch + 1)))?;
        let mut moments: HashMap<String, Tensor> = opt.adapters.state();
        moments.extend(opt.prompts.state());
        crate::io::save_safetensors_atomic(
            &moments,
            &train_dir.join(format!("optim-e{}.safetensors", epoch + 1)),
        )?;
        if metrics.uar > state.best_uar {
            state.best_uar = metrics.uar;
            state.best_epoch = Some(epoch + 1);
            save_run(out, run, &model.trainables)?;
        }
        state.epochs_done = epoch + 1;
        state.adapter_steps = opt.adapters.step;
        state.prompt_steps = opt.prompts.step;
        state.history.push(record.clone());
        let json = serde_json::to_string_pretty(&state).expect("state serialises");
        crate::io::write_atomic(&state_path(out), json.as_bytes())?;
        let h = &state.history;
        let svg = crate::report::curves_svg(
            &h.iter().map(|r| r.epoch).collect::<Vec<_>>(),
            &h.iter().map(|r| r.train_loss).collect::<Vec<_>>(),
            &h.iter().map(|r| r.test_uar).collect::<Vec<_>>(),
            &h.iter().map(|r| r.test_war).collect::<Vec<_>>(),
            &format!("{}: training curves", out.display()),
        );
        crate::io::write_atomic(&train_dir.join("curves.svg"), svg.as_bytes())?;
        for old in [
            format!("last-e{epoch}.safetensors"),
            format!("optim-e{epoch}.safetensors"),
        ] {
            let _ = std::fs::remove_file(train_dir.join(old));
        }
        on_progress(Progress::Epoch(&record));
    }
    Ok(state)
}

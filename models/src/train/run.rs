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
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};

use candle_core::{Device, Tensor};

use super::eval::evaluate;
use super::loader::{epoch_batches, load_batches, rng_for, LoadedBatch, Loader};
use super::parallel::{parallel_step, shard, Reducer, ThreadReducer};
use super::precision::LossScaler;
use super::schedule::CosineSchedule;
use super::state::TRAIN_STATE_VERSION;
use super::state::{read_state, state_path, EpochRecord, TrainConfig, TrainState};
use super::step::{batch_gradients, GradientPlan, Optimizers};
use crate::augment::{draw_mix, Mix};
use crate::dataset::{self, Dataset, Split};
use crate::error::{Error, Result};
use crate::metrics::Confusion;
use crate::peclip::checkpoint::{save_run, RunConfig};
use crate::peclip::PeClip;
use crate::preprocess::PreprocessSpec;

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
    /// Threads that decode and augment clips; 0: rayon's global pool, shared with candle's CPU
    /// kernels. The batches are the same for any number.
    pub loader_threads: usize,
}

/// Train `model` (whose run configuration is `run`) as `job` says.
pub fn train(
    model: &PeClip,
    run: &RunConfig,
    cfg: &TrainConfig,
    job: TrainJob<'_>,
    on_progress: ProgressCallback<'_>,
) -> Result<TrainState> {
    train_parallel(
        std::slice::from_ref(model),
        Vec::new(),
        run,
        cfg,
        job,
        on_progress,
    )
}

/// Train data-parallel over `replicas` (one model per worker device, identical trainables), as
/// [`train`] on one: each global batch is split across the workers ([`super::parallel`]),
/// `--accumulate` splits each worker's share, and every replica applies the same update; the
/// first replica evaluates and writes the checkpoints. `reducers`: one per replica, rank
/// order; empty: an in-process [`ThreadReducer`] group.
pub fn train_parallel(
    replicas: &[PeClip],
    reducers: Vec<Box<dyn Reducer>>,
    run: &RunConfig,
    cfg: &TrainConfig,
    job: TrainJob<'_>,
    on_progress: ProgressCallback<'_>,
) -> Result<TrainState> {
    cfg.validate()?;
    let model = replicas
        .first()
        .ok_or_else(|| Error::Config("no model to train".into()))?;
    let reducers: Vec<Box<dyn Reducer>> = if reducers.is_empty() && replicas.len() > 1 {
        ThreadReducer::group(replicas.len())
            .into_iter()
            .map(|r| Box::new(r) as Box<dyn Reducer>)
            .collect()
    } else {
        reducers
    };
    if let Some(m) = replicas
        .iter()
        .find(|m| m.clip.compute_dtype() != cfg.precision.dtype())
    {
        return Err(Error::Config(format!(
            "precision {} but the backbone computes in {:?}",
            cfg.precision,
            m.clip.compute_dtype()
        )));
    }
    if replicas.len() > 1 && reducers.len() != replicas.len() {
        return Err(Error::Config(format!(
            "{} reducers for {} replicas",
            reducers.len(),
            replicas.len()
        )));
    }
    let train_set = dataset::load(job.data, Split::Train, cfg.fold, &model.classes)?;
    let test_set = dataset::load(job.data, Split::Test, cfg.fold, &model.classes)?;
    if train_set.samples.is_empty() {
        return Err(Error::invalid(job.data, "the training split has no clip"));
    }
    let mut workers = Workers {
        models: replicas,
        opts: replicas
            .iter()
            .map(|m| Optimizers::new(m, cfg.adapter_lr, cfg.prompt_lr))
            .collect::<Result<_>>()?,
        reducers,
        scaler: LossScaler::for_precision(cfg.precision),
    };
    let mut state = if job.resume {
        resume_from(replicas, cfg, job.out, &mut workers.opts)?
    } else {
        start_run(model, run, cfg, job.out)?
    };
    if job.resume {
        workers.scaler = state.loss_scaler;
    }
    let schedule = |lr: f64| CosineSchedule {
        warmup_epochs: cfg.warmup_epochs,
        warmup_lr_init: cfg.warmup_lr_init,
        ..CosineSchedule::reference(lr, cfg.epochs)
    };
    let (sched_a, sched_p) = (schedule(cfg.adapter_lr), schedule(cfg.prompt_lr));
    let spec = run.preprocess;
    let end = job.stop_after.map_or(cfg.epochs, |n| n.min(cfg.epochs));
    let loader = Loader::new(job.loader_threads)?;
    for epoch in state.epochs_done..end {
        let t0 = std::time::Instant::now();
        for opt in &mut workers.opts {
            opt.adapters.params.lr = sched_a.lr(epoch);
            opt.prompts.params.lr = sched_p.lr(epoch);
        }
        let tally = train_epoch(
            &mut workers,
            cfg,
            &spec,
            &loader,
            &train_set,
            epoch,
            on_progress,
        )?;
        let opt = &workers.opts[0];
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
            train_loss: tally.loss_sum / tally.loss_n.max(1) as f64,
            test_uar: metrics.uar,
            test_war: metrics.war,
            seconds: t0.elapsed().as_secs_f64(),
            train_clips_per_second: train_set.samples.len() as f64 / train_seconds.max(1e-9),
            loader_wait_seconds: tally.wait,
        };
        state.loss_scaler = workers.scaler;
        checkpoint(model, run, job.out, opt, &mut state, record.clone())?;
        on_progress(Progress::Epoch(&record));
    }
    Ok(state)
}

/// A fresh run: `train/` and the initial trainables, and a state with no epoch done.
fn start_run(model: &PeClip, run: &RunConfig, cfg: &TrainConfig, out: &Path) -> Result<TrainState> {
    let train_dir = out.join("train");
    std::fs::create_dir_all(&train_dir).map_err(|e| Error::io(&train_dir, e))?;
    save_run(out, run, &model.trainables)?;
    Ok(TrainState {
        format_version: TRAIN_STATE_VERSION,
        config: cfg.clone(),
        epochs_done: 0,
        adapter_steps: 0,
        prompt_steps: 0,
        best_epoch: None,
        best_uar: -1.0,
        history: Vec::new(),
        loss_scaler: LossScaler::for_precision(cfg.precision),
    })
}

/// Continue a run: the same options, the last epoch's trainables and optimiser moments (into
/// every replica).
fn resume_from(
    replicas: &[PeClip],
    cfg: &TrainConfig,
    out: &Path,
    opts: &mut [Optimizers],
) -> Result<TrainState> {
    let train_dir = out.join("train");
    let st = read_state(out)?
        .ok_or_else(|| Error::invalid(out, "nothing to resume: no train/state.json"))?;
    // Recomputation trades memory for time and gives the same update: a run may resume with
    // another choice (on a machine with less memory, say).
    let same = TrainConfig {
        recompute: cfg.recompute,
        ..st.config.clone()
    };
    if same != *cfg {
        return Err(Error::invalid(
            state_path(out),
            "the training options differ from the run being resumed",
        ));
    }
    let last = crate::clip::Weights::open(
        &train_dir.join(format!("last-e{}.safetensors", st.epochs_done)),
        &Device::Cpu,
    )?;
    let moments = candle_core::safetensors::load(
        train_dir.join(format!("optim-e{}.safetensors", st.epochs_done)),
        &Device::Cpu,
    )?;
    for (model, opt) in replicas.iter().zip(opts) {
        for (name, var) in model.trainables.named_vars() {
            var.set(&last.get(name, var.dims())?.to_device(var.device())?)?;
        }
        let device = &model.clip.device;
        let moments: HashMap<String, Tensor> = moments
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_device(device)?)))
            .collect::<Result<_>>()?;
        opt.adapters.load_state(&moments, st.adapter_steps)?;
        opt.prompts.load_state(&moments, st.prompt_steps)?;
    }
    Ok(st)
}

/// What an epoch's training part adds up.
#[derive(Debug, Default)]
struct EpochTally {
    /// Sum of per-clip losses and the clips summed.
    loss_sum: f64,
    loss_n: usize,
    /// Seconds the model waited for the loader.
    wait: f64,
}

/// The replicas a run trains: a model, an optimiser and (with more than one) a reducer per
/// worker; worker 0's are the run's.
struct Workers<'a> {
    models: &'a [PeClip],
    opts: Vec<Optimizers>,
    reducers: Vec<Box<dyn Reducer>>,
    /// f16's loss scale: one for all workers (they see the same reduced gradients, so take the
    /// same decisions).
    scaler: LossScaler,
}

/// One epoch's optimiser steps. The loader runs ahead of the model by at most two batches.
fn train_epoch(
    workers: &mut Workers<'_>,
    cfg: &TrainConfig,
    spec: &PreprocessSpec,
    loader: &Loader,
    train_set: &Dataset,
    epoch: usize,
    on_progress: ProgressCallback<'_>,
) -> Result<EpochTally> {
    let batches = epoch_batches(cfg, epoch, train_set.samples.len());
    let (tx, rx) = sync_channel::<LoadedBatch>(2);
    let mut tally = EpochTally::default();
    std::thread::scope(|scope| -> Result<()> {
        let (samples, batches_ref) = (&train_set.samples, &batches);
        scope.spawn(move || load_batches(loader, samples, batches_ref, cfg, spec, epoch, tx));
        for b in 0..batches.len() {
            let loss = train_batch(workers, cfg, spec, epoch, b, &rx, &mut tally)?;
            on_progress(Progress::Step {
                epoch: epoch + 1,
                batch: b + 1,
                batches: batches.len(),
                loss,
            });
        }
        Ok(())
    })?;
    Ok(tally)
}

/// Batch `b`: receive it, mix it, accumulate the gradients over micro-batches (and workers)
/// and step the optimisers. Returns the batch's mean loss.
fn train_batch(
    workers: &mut Workers<'_>,
    cfg: &TrainConfig,
    spec: &PreprocessSpec,
    epoch: usize,
    b: usize,
    rx: &Receiver<LoadedBatch>,
    tally: &mut EpochTally,
) -> Result<f64> {
    let model = &workers.models[0];
    let world = workers.models.len();
    // With several workers the batch is mixed on the host and each share copied to its device.
    let stage = if world == 1 {
        model.clip.device.clone()
    } else {
        Device::Cpu
    };
    let s = spec.image_size;
    let tw = std::time::Instant::now();
    let (pixels, labels) = rx
        .recv()
        .map_err(|_| Error::Config("the data loader stopped".into()))??;
    tally.wait += tw.elapsed().as_secs_f64();
    let n = labels.len();
    let videos = Tensor::from_vec(pixels, (n, cfg.segments, 3, s, s), &stage)?;
    let mut mix_rng = rng_for(cfg.seed, epoch, 3, b);
    let mix = if cfg.mix && n > 1 {
        draw_mix(s as u32, &mut mix_rng)
    } else {
        Mix::None
    };
    let (videos, other_labels, lambda) = mix_batch(videos, &labels, &mix, s, &stage)?;
    // Gradient accumulation over micro-batches.
    let mix = (lambda < 1.0).then_some((other_labels.as_slice(), lambda));
    if world > 1 {
        let loss = parallel_batch(workers, cfg, &videos, &labels, mix)?;
        tally.loss_sum += loss * n as f64;
        tally.loss_n += n;
        return Ok(loss);
    }
    let opt = &mut workers.opts[0];
    let plan = GradientPlan {
        micro: cfg.batch_size / cfg.accumulate,
        recompute: cfg.recompute,
        loss_scale: workers.scaler.scale,
    };
    let (mut grads, losses) = batch_gradients(model, &videos, &labels, mix, plan)?;
    let take_step = workers.scaler.unscale(model, &mut grads)?;
    let mut batch_loss = 0.0f64;
    for (loss, len) in losses {
        tally.loss_sum += loss * len as f64;
        tally.loss_n += len;
        batch_loss += loss * len as f64 / n as f64;
    }
    if take_step {
        opt.adapters.step(&grads)?;
        opt.prompts.step(&grads)?;
    }
    Ok(batch_loss)
}

/// A data-parallel step on a (mixed) host batch: one thread per worker takes its share to its
/// device, and [`parallel_step`] reduces and steps. Returns the batch's mean loss.
fn parallel_batch(
    workers: &mut Workers<'_>,
    cfg: &TrainConfig,
    videos: &Tensor,
    labels: &[u32],
    mix: Option<(&[u32], f64)>,
) -> Result<f64> {
    let n = labels.len();
    let world = workers.models.len();
    // Each reducer moves into its worker's thread and back: one that unwinds from a panic is
    // dropped there, which fails the others' reduction rather than leaving them waiting.
    let reducers = std::mem::take(&mut workers.reducers);
    let scaler = workers.scaler;
    type Outcome = (Option<Box<dyn Reducer>>, Result<(f64, LossScaler)>);
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .models
            .iter()
            .zip(workers.opts.iter_mut())
            .zip(reducers)
            .enumerate()
            .map(|(k, ((model, opt), mut reducer))| {
                scope.spawn(move || {
                    let r = shard(n, world, k);
                    let mut run = || -> Result<(f64, LossScaler)> {
                        let part = if r.is_empty() {
                            None
                        } else {
                            Some(
                                videos
                                    .narrow(0, r.start, r.len())?
                                    .to_device(&model.clip.device)?,
                            )
                        };
                        let plan = GradientPlan {
                            micro: r.len().div_ceil(cfg.accumulate).max(1),
                            recompute: cfg.recompute,
                            loss_scale: scaler.scale,
                        };
                        let mix = mix.map(|(other, lambda)| (&other[r.clone()], lambda));
                        let labels = &labels[r.clone()];
                        let mut scaler = scaler;
                        let loss = parallel_step(
                            model,
                            opt,
                            reducer.as_mut(),
                            &mut scaler,
                            part.as_ref(),
                            labels,
                            mix,
                            plan,
                            n,
                        )?;
                        Ok((loss, scaler))
                    };
                    let out = run();
                    if out.is_err() {
                        reducer.abort();
                    }
                    (Some(reducer), out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (
                        None,
                        Err(Error::Config("a data-parallel worker panicked".into())),
                    )
                })
            })
            .collect()
    });
    let mut loss = None;
    let mut first_error = None;
    for (reducer, out) in outcomes {
        workers.reducers.extend(reducer);
        match out {
            Ok((l, s)) => {
                loss = loss.or(Some(l));
                workers.scaler = s;
            }
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    match (first_error, loss) {
        (Some(e), _) => Err(e),
        (None, Some(l)) => Ok(l),
        (None, None) => Err(Error::Config("no data-parallel worker ran".into())),
    }
}

/// Mixup / FMix of a batch with its partner, the batch reversed: the mixed clips, the partners'
/// labels and the weight `lambda` of the clips' own labels.
fn mix_batch(
    videos: Tensor,
    labels: &[u32],
    mix: &Mix,
    s: usize,
    device: &Device,
) -> Result<(Tensor, Vec<u32>, f64)> {
    let n = labels.len();
    let perm: Vec<u32> = (0..n as u32).rev().collect();
    let perm_t = Tensor::new(perm.as_slice(), device)?;
    let other_labels: Vec<u32> = perm.iter().map(|&i| labels[i as usize]).collect();
    let (videos, lambda) = match mix {
        Mix::None => (videos, 1.0),
        Mix::Mixup { lambda } => {
            let partner = videos.index_select(&perm_t, 0)?;
            (
                ((&videos * *lambda)? + (partner * (1.0 - lambda))?)?,
                *lambda,
            )
        }
        Mix::Fmix { lambda, mask } => {
            let m = Tensor::from_vec(mask.clone(), (1, 1, 1, s, s), device)?;
            let partner = videos.index_select(&perm_t, 0)?;
            let inv = (1.0 - &m)?;
            (
                (videos.broadcast_mul(&m)? + partner.broadcast_mul(&inv)?)?,
                *lambda,
            )
        }
    };
    Ok((videos, other_labels, lambda))
}

/// Commit a finished epoch: the epoch-tagged trainables and moments first, the best run when the
/// UAR improved, then the state that points at them (the commit point) and the curves; the
/// previous epoch's files go last.
fn checkpoint(
    model: &PeClip,
    run: &RunConfig,
    out: &Path,
    opt: &Optimizers,
    state: &mut TrainState,
    record: EpochRecord,
) -> Result<()> {
    let train_dir = out.join("train");
    let epoch = record.epoch;
    model
        .trainables
        .save(&train_dir.join(format!("last-e{epoch}.safetensors")))?;
    let mut moments: HashMap<String, Tensor> = opt.adapters.state();
    moments.extend(opt.prompts.state());
    crate::io::save_safetensors_atomic(
        &moments,
        &train_dir.join(format!("optim-e{epoch}.safetensors")),
    )?;
    if record.test_uar > state.best_uar {
        state.best_uar = record.test_uar;
        state.best_epoch = Some(epoch);
        save_run(out, run, &model.trainables)?;
    }
    state.epochs_done = epoch;
    state.adapter_steps = opt.adapters.step;
    state.prompt_steps = opt.prompts.step;
    state.history.push(record);
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
    let previous = epoch - 1;
    for old in [
        format!("last-e{previous}.safetensors"),
        format!("optim-e{previous}.safetensors"),
    ] {
        let _ = std::fs::remove_file(train_dir.join(old));
    }
    Ok(())
}

//! `pe-clip train`: train PE-CLIP on a dataset, with per-epoch evaluation and resumable
//! checkpoints.

use std::path::PathBuf;

use super::peclip_args::PeClipArgs;

/// Arguments of `pe-clip train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Dataset root (DFEW, FERV39K, a manifest, or `pe-clip synth` output).
    #[arg(long)]
    data: PathBuf,
    /// Run directory to write (checkpoints, history, best model).
    #[arg(long)]
    out: PathBuf,
    /// Backbone: an HF CLIP directory (real weights), or vit-b16 / vit-b32 / tiny for a random
    /// backbone written into the run directory.
    #[arg(long, default_value = "tiny")]
    arch: String,
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Clips per optimiser step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Gradient accumulation: micro-batches per step (the batch is split into this many parts).
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// What the backward pass recomputes: none (keep every activation) or blocks (keep each
    /// vision block's input, recompute its activations in backward: far less memory, one more
    /// vision forward per step; the same update).
    #[arg(long, default_value = "none", value_parser = ["none", "blocks"])]
    recompute: String,
    /// The dtype the frozen backbone computes in: f32, bf16, or f16 (with dynamic loss
    /// scaling); the trainables, their gradients, the optimiser, LayerNorm, softmax and the
    /// loss stay f32. bf16 halves the activation memory and runs on a GPU's tensor cores.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    precision: String,
    /// Learning rate of the adapters.
    #[arg(long, default_value_t = 2e-4)]
    lr_adapters: f64,
    /// Learning rate of the prompt learner.
    #[arg(long, default_value_t = 3e-5)]
    lr_prompts: f64,
    /// Warm-up epochs (linear from 2e-5).
    #[arg(long, default_value_t = 3)]
    warmup_epochs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// DFEW fold (1..5).
    #[arg(long, default_value_t = 1)]
    fold: usize,
    /// Clip-level jitter: brightness (DFEW), rotation (FERV39K) or none.
    #[arg(long, default_value = "brightness", value_parser = ["brightness", "rotation", "none"])]
    jitter: String,
    /// Smallest random-resized-crop area, as a fraction of the frame (1 turns cropping off).
    #[arg(long, default_value_t = 0.08)]
    min_crop_area: f64,
    /// No Mixup / FMix.
    #[arg(long)]
    no_mix: bool,
    /// Continue the run in --out from its last finished epoch.
    #[arg(long)]
    resume: bool,
    /// Stop after this many epochs in total (the run can be resumed later).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    #[command(flatten)]
    peclip: PeClipArgs,
    /// Compute device: cpu, cuda or cuda:N (a build with the `cuda` feature); a comma-separated
    /// list trains data-parallel, one worker thread per device (`cuda:0,cuda:1`; `cpu,cpu`
    /// tests it), each global batch split across them, the same update as one device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How several devices sum their gradients: nccl (GPU to GPU; a build with the `nccl`
    /// feature), host (through host memory, any devices), or auto (nccl where built and every
    /// device is a GPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "host", "nccl"])]
    all_reduce: String,
    /// Threads that decode and augment clips; 0: the compute pool's (every core, shared with
    /// the CPU's kernels). On a GPU, all cores but one or two (`pe-clip bench loader` measures
    /// the rate per thread count). The batches are the same for any number.
    #[arg(long, default_value_t = 0)]
    loader_threads: usize,
}

#[cfg(feature = "train")]
pub fn run(args: Args) -> anyhow::Result<u8> {
    crate::cli::keep_large_allocations();
    use anyhow::Context;
    use pe_clip_models::peclip::checkpoint::load_backbone;
    use pe_clip_models::peclip::{trainable_specs, PeClip, RunConfig, Trainables};
    use pe_clip_models::train::{train_parallel, TrainConfig, TrainJob};

    let devices = args
        .device
        .split(',')
        .map(|d| super::zero_shot::device_from_name(d.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        accumulate: args.accumulate,
        recompute: args.recompute.parse()?,
        precision: args.precision.parse()?,
        adapter_lr: args.lr_adapters,
        prompt_lr: args.lr_prompts,
        warmup_epochs: args.warmup_epochs,
        warmup_lr_init: 2e-5,
        seed: args.seed,
        segments: pe_clip_models::sampling::NUM_SEGMENTS,
        fold: args.fold,
        mix: !args.no_mix,
        jitter: args.jitter.clone(),
        min_crop_area: args.min_crop_area,
    };
    cfg.validate()?;
    let run = if args.resume {
        RunConfig::read(&args.out).context("cannot resume")?
    } else {
        new_run(&args)?
    };
    // One replica per device, the same initial trainables on each.
    let replicas = devices
        .iter()
        .map(|device| -> anyhow::Result<PeClip> {
            let (clip, tokenizer) = load_backbone(&run, &args.out, device)?;
            let clip = clip.with_compute_dtype(cfg.precision.dtype())?;
            let specs = trainable_specs(&run.peclip, &clip.config);
            let trainables = Trainables::init(specs, args.seed, device)?;
            Ok(PeClip::new(
                run.peclip.clone(),
                clip,
                trainables,
                run.classes.clone(),
                &tokenizer,
            )?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut report = progress_reporter(cfg.epochs);
    let job = TrainJob {
        data: &args.data,
        out: &args.out,
        resume: args.resume,
        stop_after: args.stop_after,
        loader_threads: args.loader_threads,
    };
    let reducers = reducers(&args.all_reduce, &devices)?;
    let state = train_parallel(&replicas, reducers, &run, &cfg, job, &mut report)
        .context("training failed")?;
    println!(
        "{}: {} epochs done, best test UAR {:.2} % at epoch {}",
        args.out.display(),
        state.epochs_done,
        100.0 * state.best_uar.max(0.0),
        state.best_epoch.map_or("-".to_string(), |e| e.to_string())
    );
    Ok(super::EXIT_OK)
}

/// The data-parallel reducers `--all-reduce` names for `devices` (none: one device, or the
/// host's in-process reducer).
#[cfg(feature = "train")]
fn reducers(
    how: &str,
    devices: &[candle_core::Device],
) -> anyhow::Result<Vec<Box<dyn pe_clip_models::train::Reducer>>> {
    let all_gpus = devices.iter().all(|d| d.is_cuda());
    let nccl = match how {
        "nccl" if !all_gpus => anyhow::bail!("--all-reduce nccl: every --device must be a GPU"),
        "nccl" => true,
        "auto" => cfg!(feature = "nccl") && all_gpus,
        _ => false,
    };
    if devices.len() < 2 || !nccl {
        return Ok(Vec::new());
    }
    #[cfg(feature = "nccl")]
    {
        Ok(pe_clip_models::train::nccl::NcclReducer::group(devices)?
            .into_iter()
            .map(|r| Box::new(r) as Box<dyn pe_clip_models::train::Reducer>)
            .collect())
    }
    #[cfg(not(feature = "nccl"))]
    {
        anyhow::bail!("--all-reduce nccl: this binary was built without the `nccl` feature")
    }
}

/// A fresh run's configuration: the backbone (a preset written with random weights into
/// `OUT/backbone`, or an HF CLIP directory) and the PE-CLIP options of the command line.
#[cfg(feature = "train")]
fn new_run(args: &Args) -> anyhow::Result<pe_clip_models::peclip::RunConfig> {
    use anyhow::Context;
    use pe_clip_models::clip::random::write_random_model;
    use pe_clip_models::clip::{Arch, ClipConfig};
    use pe_clip_models::peclip::checkpoint::{created_by, BackboneRef, RUN_FORMAT_VERSION};
    use pe_clip_models::peclip::RunConfig;
    use pe_clip_models::{ClassSet, PixelNorm, PreprocessSpec};

    let (backbone, clip_cfg) = match args.arch.parse::<Arch>() {
        Ok(arch) => {
            let cfg = ClipConfig::preset(arch);
            let dir = args.out.join("backbone");
            write_random_model(&dir, &cfg, args.seed)?;
            (PathBuf::from("backbone"), cfg)
        }
        Err(_) => {
            let dir = std::path::absolute(&args.arch)?;
            let cfg = pe_clip_models::clip::load_config(&dir).with_context(|| {
                format!(
                    "--arch {} is neither tiny/vit-b16/vit-b32 nor an HF CLIP directory",
                    args.arch
                )
            })?;
            (dir, cfg)
        }
    };
    let peclip = args.peclip.to_config();
    peclip.validate(&clip_cfg)?;
    Ok(RunConfig {
        format_version: RUN_FORMAT_VERSION,
        backbone: BackboneRef {
            path: backbone,
            vision_heads: clip_cfg.vision_config.num_attention_heads,
            text_heads: clip_cfg.text_config.num_attention_heads,
        },
        preprocess: PreprocessSpec {
            image_size: clip_cfg.vision_config.image_size,
            pixel_norm: PixelNorm::None,
        },
        clip: clip_cfg,
        peclip,
        classes: ClassSet::default(),
        created_by: created_by(),
    })
}

/// What training shows on stderr: a progress bar per epoch on a terminal, and a line per
/// finished epoch unless quiet.
#[cfg(feature = "train")]
fn progress_reporter(epochs: usize) -> impl FnMut(pe_clip_models::train::Progress<'_>) {
    use pe_clip_models::train::Progress;

    let quiet = log::max_level() < log::LevelFilter::Warn;
    let show_bar = super::progress::want_bar_here(quiet);
    let mut bar: Option<indicatif::ProgressBar> = None;
    move |p: Progress<'_>| match p {
        Progress::Step {
            epoch,
            batch,
            batches,
            loss,
        } if show_bar => {
            let b = bar.get_or_insert_with(|| {
                super::progress::bar(batches as u64, format!("epoch {epoch}/{epochs}"))
            });
            b.set_position(batch as u64);
            b.set_message(format!("loss {loss:.4}"));
        }
        Progress::Evaluating { .. } => {
            if let Some(b) = &bar {
                b.set_message("evaluating");
            }
        }
        Progress::Epoch(r) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            if !quiet {
                eprintln!(
                    "epoch {}/{epochs}  loss {:.4}  test UAR {:.1} %  WAR {:.1} %  lr {:.1e}/{:.1e}  {:.1} s ({:.1} clips/s, waited {:.2} s for data)",
                    r.epoch,
                    r.train_loss,
                    100.0 * r.test_uar,
                    100.0 * r.test_war,
                    r.lr_adapters,
                    r.lr_prompts,
                    r.seconds,
                    r.train_clips_per_second,
                    r.loader_wait_seconds
                );
            }
        }
        Progress::Step { .. } => {}
    }
}

#[cfg(not(feature = "train"))]
pub fn run(_args: Args) -> anyhow::Result<u8> {
    Err(super::built_without_train("train"))
}

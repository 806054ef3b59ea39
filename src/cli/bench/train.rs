//! `pe-clip bench train`: training steps per second and peak memory.

#[derive(Debug, clap::Args)]
pub(super) struct TrainArgs {
    /// Backbone shape: tiny, vit-b16 or vit-b32.
    #[arg(long, default_value = "tiny")]
    arch: String,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Clips per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Gradient accumulation: micro-batches per step, as `pe-clip train --accumulate` (only
    /// one micro-batch's activations are alive at a time).
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// What the backward pass recomputes, as `pe-clip train --recompute`: none or blocks.
    #[arg(long, default_value = "none", value_parser = ["none", "blocks"])]
    recompute: String,
    /// The backbone's compute dtype, as `pe-clip train --precision`: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    precision: String,
    /// Compute device: cpu, or cuda (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "train")]
pub(super) fn run_train(a: TrainArgs) -> anyhow::Result<u8> {
    crate::cli::keep_large_allocations();
    use candle_core::Tensor;
    use pe_clip_models::clip::{Arch, ClipConfig};
    use pe_clip_models::peclip::random::{random_peclip_on, RandomPeClip};
    use pe_clip_models::peclip::PeClipConfig;
    use pe_clip_models::rng::SeededRng;
    use pe_clip_models::train::{
        batch_gradients, GradientPlan, LossScaler, Optimizers, Precision, Recompute,
    };

    if a.steps == 0 || a.batch_size == 0 || a.accumulate == 0 {
        anyhow::bail!("--steps, --batch-size and --accumulate must be at least 1");
    }
    if !a.batch_size.is_multiple_of(a.accumulate) {
        anyhow::bail!(
            "--batch-size {} is not a multiple of --accumulate {}",
            a.batch_size,
            a.accumulate
        );
    }
    let arch: Arch = a.arch.parse().map_err(anyhow::Error::msg)?;
    let cfg = ClipConfig::preset(arch);
    let dir = tempfile::tempdir()?;
    let device = crate::cli::zero_shot::device_from_name(&a.device)?;
    let model = random_peclip_on(
        dir.path(),
        &RandomPeClip {
            backbone: cfg.clone(),
            config: PeClipConfig::default(),
            seed: 0,
            inference: false,
            perturb: None,
        },
        &device,
    )?;
    let precision: Precision = a.precision.parse()?;
    let model = model.with_compute_dtype(precision.dtype())?;
    let mut scaler = LossScaler::for_precision(precision);
    let mut opt = Optimizers::new(&model, 2e-4, 3e-5)?;
    let s = cfg.vision_config.image_size;
    let mut rng = SeededRng::new(1);
    let n = a.batch_size * 16 * 3 * s * s;
    let videos = Tensor::from_vec(
        (0..n).map(|_| rng.uniform() as f32).collect::<Vec<f32>>(),
        (a.batch_size, 16, 3, s, s),
        &device,
    )?;
    let labels: Vec<u32> = (0..a.batch_size as u32).map(|i| i % 7).collect();
    let mut plan = GradientPlan {
        micro: a.batch_size / a.accumulate,
        recompute: a.recompute.parse::<Recompute>()?,
        loss_scale: 1.0,
    };
    let mut step = || -> anyhow::Result<()> {
        plan.loss_scale = scaler.scale;
        let (mut grads, _) = batch_gradients(&model, &videos, &labels, None, plan)?;
        if scaler.unscale(&model, &mut grads)? {
            opt.adapters.step(&grads)?;
            opt.prompts.step(&grads)?;
        }
        Ok(())
    };
    step()?; // warm-up
    device.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..a.steps {
        step()?;
    }
    device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let steps_per_s = a.steps as f64 / secs;
    let peak = super::peak_rss_bytes();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "train", "arch": a.arch, "device": a.device, "clips_per_step": a.batch_size,
                "micro_batches": a.accumulate, "recompute": a.recompute, "precision": a.precision,
                "skipped_steps": scaler.skipped,
                "frames_per_clip": 16, "steps": a.steps, "seconds": secs,
                "steps_per_second": steps_per_s, "peak_rss_bytes": peak,
                "threads": rayon::current_num_threads(),
                "block_kernels": pe_clip_models::clip::fused::kernels_name(),
                "machine": crate::engine::machine(),
            })
        );
    } else {
        println!("machine: {}", crate::engine::machine());
        println!(
            "train {} on {} in {} ({} block kernels): {:.3} steps/s ({:.2} s/step, {} clip(s) x 16 frames in {} micro-batch(es), recompute {}), peak RSS {}",
            a.arch,
            a.device,
            a.precision,
            pe_clip_models::clip::fused::kernels_name(),
            steps_per_s,
            secs / a.steps as f64,
            a.batch_size,
            a.accumulate,
            a.recompute,
            peak.map_or("unknown".into(), |b| format!("{:.2} GB", b as f64 / 1e9))
        );
    }
    Ok(crate::cli::EXIT_OK)
}

#[cfg(not(feature = "train"))]
pub(super) fn run_train(_a: TrainArgs) -> anyhow::Result<u8> {
    Err(crate::cli::built_without_train("bench train"))
}

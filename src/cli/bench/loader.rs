//! `pe-clip bench loader`: clips/s of the training data path (frame files decoded, 16 frames
//! sampled, augmented, batched) per loader thread count, against the clip rate a GPU trains at.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub(super) struct LoaderArgs {
    /// Dataset root, as `pe-clip train --data` (DFEW's layout: `pe-clip synth --size 224`).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Loader thread counts to measure, comma-separated (default: 1 and every core).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Clips per batch, as `pe-clip train --batch-size`.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Batches timed per thread count (after one warm-up batch).
    #[arg(long, default_value_t = 4)]
    batches: usize,
    /// Model input size in pixels (the backbone's).
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// The GPU's sustained training throughput in TFLOP/s the loader is compared against (400:
    /// an H200's 989 dense bf16 TFLOP/s at 40 % utilisation).
    #[arg(long, default_value_t = 400.0)]
    gpu_tflops: f64,
    #[arg(long)]
    json: bool,
}

/// Multiply-accumulates of one ViT-B/16 frame through the vision tower (`tokens` prompt tokens
/// in every block, an upper bound for prompts in the first blocks only): per block the four
/// attention projections, the MLP and the two attention products; and the patch embedding.
#[cfg(feature = "train")]
fn vision_macs_per_frame(v: &pe_clip_models::clip::VisionConfig, prompt_tokens: usize) -> f64 {
    let (d, i) = (v.hidden_size as f64, v.intermediate_size as f64);
    let patches = (v.image_size / v.patch_size).pow(2) as f64;
    let n = patches + 1.0 + prompt_tokens as f64;
    let block = n * (4.0 * d * d + 2.0 * d * i) + 2.0 * n * n * d;
    let embed = patches * (v.num_channels * v.patch_size * v.patch_size) as f64 * d;
    v.num_hidden_layers as f64 * block + embed
}

#[cfg(feature = "train")]
pub(super) fn run_loader(a: LoaderArgs) -> anyhow::Result<u8> {
    use anyhow::Context;
    use pe_clip_models::clip::{Arch, ClipConfig};
    use pe_clip_models::dataset::{self, Split};
    use pe_clip_models::train::{epoch_batches, Loader, TrainConfig};
    use pe_clip_models::{ClassSet, PixelNorm, PreprocessSpec};

    if a.batch_size == 0 || a.batches == 0 || a.image_size < 16 {
        anyhow::bail!("--batch-size and --batches must be at least 1, --image-size 16");
    }
    let cfg = TrainConfig {
        batch_size: a.batch_size,
        ..TrainConfig::default()
    };
    let spec = PreprocessSpec {
        image_size: a.image_size,
        pixel_norm: PixelNorm::None,
    };
    let set = dataset::load(&a.data, Split::Train, cfg.fold, &ClassSet::default())
        .with_context(|| format!("cannot read the dataset {}", a.data.display()))?;
    let mut batches = epoch_batches(&cfg, 0, set.samples.len());
    batches.retain(|b| b.len() == a.batch_size);
    if batches.is_empty() {
        anyhow::bail!(
            "{}: the training split has {} clips, fewer than one batch of {}",
            a.data.display(),
            set.samples.len(),
            a.batch_size
        );
    }
    let mut threads = a.threads.clone();
    if threads.is_empty() {
        threads = vec![
            1,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        ];
    }
    threads.dedup();
    if threads.contains(&0) {
        anyhow::bail!("--threads: a thread count is at least 1");
    }

    let vit = ClipConfig::preset(Arch::VitB16).vision_config;
    let prompts = pe_clip_models::peclip::PeClipConfig::default()
        .prompts
        .tokens;
    // Training with the backbone frozen: a forward, a backward of about the same cost (input
    // gradients only), and with --recompute blocks one forward more.
    let forward_flops_per_clip = 2.0 * vision_macs_per_frame(&vit, prompts) * cfg.segments as f64;
    let gpu_clips = |passes: f64| a.gpu_tflops * 1e12 / (passes * forward_flops_per_clip);
    let (need_none, need_blocks) = (gpu_clips(2.0), gpu_clips(3.0));

    let mut rows = Vec::new();
    for &n in &threads {
        let loader = Loader::new(n)?;
        let mut timed = 0usize;
        let mut bytes = 0usize;
        let mut secs = 0.0;
        for k in 0..=a.batches {
            let b = k % batches.len();
            let t = std::time::Instant::now();
            let (pixels, _) = loader
                .load_batch(&set.samples, &batches[b], &cfg, &spec, 0, b)
                .with_context(|| format!("batch {b}"))?;
            if k > 0 {
                secs += t.elapsed().as_secs_f64();
                timed += batches[b].len();
                bytes += pixels.len() * 4;
            }
        }
        let clips_per_s = timed as f64 / secs;
        rows.push(serde_json::json!({
            "threads": n, "clips": timed, "seconds": secs, "clips_per_second": clips_per_s,
            "megabytes_per_second": bytes as f64 / secs / 1e6,
        }));
        if !a.json {
            println!(
                "{n:>3} loader thread(s): {clips_per_s:8.1} clips/s ({:.0} frames/s, {:.0} MB/s of pixels)",
                clips_per_s * cfg.segments as f64,
                bytes as f64 / secs / 1e6
            );
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "loader", "data": a.data, "train_clips": set.samples.len(),
                "batch_size": a.batch_size, "frames_per_clip": cfg.segments,
                "image_size": a.image_size, "rows": rows,
                "gpu_tflops": a.gpu_tflops, "vit_b16_train_gflop_per_clip": 2.0 * forward_flops_per_clip / 1e9,
                "gpu_clips_per_second": {"recompute_none": need_none, "recompute_blocks": need_blocks},
                "machine": crate::engine::machine(),
            })
        );
    } else {
        println!("machine: {}", crate::engine::machine());
        println!(
            "to keep busy: a GPU at {:.0} TFLOP/s trains ViT-B/16 at {need_none:.0} clips/s ({:.0} GFLOP a clip), {need_blocks:.0} with --recompute blocks",
            a.gpu_tflops,
            2.0 * forward_flops_per_clip / 1e9
        );
    }
    Ok(crate::cli::EXIT_OK)
}

#[cfg(not(feature = "train"))]
pub(super) fn run_loader(_a: LoaderArgs) -> anyhow::Result<u8> {
    Err(crate::cli::built_without_train("bench loader"))
}

#[cfg(all(test, feature = "train"))]
mod tests {
    /// ViT-B/16 at 224 px is the well-known ~17.6 GMACs a frame (plus 4 % for the prompt
    /// tokens and the class token's row).
    #[test]
    fn vit_b16_costs_what_the_literature_says() {
        let v = pe_clip_models::clip::ClipConfig::preset(pe_clip_models::clip::Arch::VitB16)
            .vision_config;
        let g = super::vision_macs_per_frame(&v, 0) / 1e9;
        assert!((17.0..18.0).contains(&g), "{g} GMACs");
    }
}

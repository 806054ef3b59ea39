//! `pe-clip pretrain`: CLIP-style contrastive pre-training of a whole (small) CLIP backbone on
//! synthetic face frames and their action-unit captions.
//!
//! PE-CLIP adapts a *pre-trained* CLIP; a random backbone maps every face to nearly the same
//! feature and the adapters cannot learn on top of it. Where no CLIP weights exist (tests, demos,
//! this repository's learning benchmark), this trains a stand-in the way CLIP itself was trained:
//! both towers from scratch, symmetric InfoNCE between frame features and caption features
//! ([`crate::synth::caption`]), learned temperature. Frames are rendered on the fly by the synth
//! generator from fresh random identities, so no dataset is stored and none of the pre-training
//! faces is a benchmark identity. The result is an ordinary HF CLIP directory that `--arch`,
//! `--clip` and `init`-style loaders accept.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use rayon::prelude::*;
use serde::Serialize;

use super::config::ClipConfig;
use super::random::{tensor_specs_for_training, Init};
use super::weights::Weights;
use super::ClipModel;
use crate::error::{Error, Result};
use crate::preprocess::PreprocessSpec;
use crate::rng::SeededRng;
use crate::synth::{caption, random_frame, SynthOptions};
use crate::tokenizer::ClipTokenizer as Tokenizer;
use crate::train::{AdamW, AdamWParams, CosineSchedule};
use crate::zero_shot::l2_normalize;

/// The largest temperature CLIP allows: `logit_scale` is clamped to `ln 100`.
const MAX_LOGIT_SCALE: f32 = 4.605_170_2;

/// How to pre-train.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainConfig {
    pub steps: usize,
    /// Frames per step (each from a different random clip).
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub seed: u64,
    /// Size the synth generator draws frames at before the resize to the model's input.
    pub render_size: u32,
    /// Preprocessing of the frames (the model size and pixel normalisation).
    pub preprocess: PreprocessSpec,
    /// Draw blinks, speech and brief other expressions too.
    pub distractors: bool,
    pub infrared: bool,
    /// Weight of the auxiliary loss: a linear head on the image feature regresses the frame's AU
    /// intensities (and blink, speech). It gives the vision tower a dense signal from the first
    /// step, where the contrastive loss alone leaves a from-scratch tower predicting the most
    /// common caption for hundreds of steps. The head reads batch-centred features and is dropped after pre-training; 0 turns it off.
    pub au_weight: f64,
    /// Initial temperature `exp(logit_scale)` (learned, at most 100). CLIP starts at 1/0.07 and
    /// ends clamped at 100, the scale PE-CLIP's logits use; a stand-in pre-trained at 14 gives
    /// PE-CLIP cosines that are far too spread for its ×100 and its first epochs' losses are huge.
    pub temperature: f32,
}

impl PretrainConfig {
    /// Check the numbers.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size < 2 {
            return Err(Error::Config(
                "pre-training needs at least 1 step and a batch of at least 2 frames".into(),
            ));
        }
        if !self.lr.is_finite()
            || self.lr <= 0.0
            || self.weight_decay < 0.0
            || self.render_size < 16
        {
            return Err(Error::Config(
                "pre-training needs lr > 0, weight decay >= 0 and frames of >= 16 px".into(),
            ));
        }
        Ok(())
    }
}

/// One logged step.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainRecord {
    pub step: usize,
    /// The total loss (contrastive plus the weighted AU loss).
    pub loss: f32,
    /// Mean squared error of the auxiliary AU head.
    pub au_loss: f32,
    /// Frames whose own caption scored highest among the batch's captions.
    pub accuracy: f32,
    /// Distinct captions in the batch.
    pub captions: usize,
    pub lr: f64,
    pub temperature: f32,
    pub seconds: f64,
}

/// What a pre-training run did.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainReport {
    pub config: PretrainConfig,
    pub clip: ClipConfig,
    pub seconds: f64,
    /// Seconds spent rendering frames (in parallel with nothing: the model waits for them).
    pub render_seconds: f64,
    pub history: Vec<PretrainRecord>,
}

/// One batch: pixels `[B, 3, S, S]`, the distinct captions, and each frame's caption index.
struct Batch {
    pixels: Tensor,
    captions: Vec<String>,
    owner: Vec<u32>,
    /// `[B, AU_TARGETS]`: the 13 AU intensities, blink and speech.
    aus: Tensor,
}

/// Targets of the auxiliary head per frame.
const AU_TARGETS: usize = 15;

fn render_batch(seeds: &[u64], pc: &PretrainConfig, device: &Device) -> Result<Batch> {
    let opts = SynthOptions {
        infrared: pc.infrared,
        distractors: pc.distractors,
        ..SynthOptions::default()
    };
    let frames: Vec<(Vec<f32>, String, [f32; AU_TARGETS])> = seeds
        .par_iter()
        .map(|&s| {
            let (img, aus) = random_frame(&mut SeededRng::new(s), &opts, pc.render_size);
            let mut t = [0f32; AU_TARGETS];
            t[..13].copy_from_slice(&aus.au);
            t[13] = aus.blink;
            t[14] = aus.speech;
            (pc.preprocess.frame_to_chw(&img), caption(&aus), t)
        })
        .collect();
    let size = pc.preprocess.image_size;
    let mut captions: Vec<String> = Vec::new();
    let mut owner = Vec::with_capacity(frames.len());
    let mut data = Vec::with_capacity(frames.len() * 3 * size * size);
    let mut aus = Vec::with_capacity(frames.len() * AU_TARGETS);
    for (chw, cap, t) in frames {
        data.extend(chw);
        aus.extend(t);
        let i = match captions.iter().position(|c| *c == cap) {
            Some(i) => i,
            None => {
                captions.push(cap);
                captions.len() - 1
            }
        };
        owner.push(i as u32);
    }
    let pixels = Tensor::from_vec(data, (seeds.len(), 3, size, size), device)?;
    Ok(Batch {
        pixels,
        captions,
        owner,
        aus: Tensor::from_vec(aus, (seeds.len(), AU_TARGETS), device)?,
    })
}

/// Token rows of `texts`, padded to the longest (pooling is at the end-of-text token, and the
/// causal mask keeps padding from mattering).
fn token_rows(tok: &Tokenizer, texts: &[String]) -> Vec<Vec<u32>> {
    let rows: Vec<(Vec<u32>, usize)> = texts.iter().map(|t| tok.tokenize(t)).collect();
    let len = rows.iter().map(|(_, eot)| eot + 1).max().unwrap_or(2);
    rows.into_iter()
        .map(|(ids, _)| ids[..len].to_vec())
        .collect()
}

/// Symmetric contrastive loss of image features `[B, E]` and caption features `[U, E]` (both
/// normalised), where frame `b` belongs to caption `owner[b]` and a caption may own several frames
/// (its text-to-image target is uniform over them). Returns the loss and the image-to-text top-1
/// accuracy.
pub fn contrastive_loss(
    img: &Tensor,
    txt: &Tensor,
    owner: &[u32],
    scale: &Tensor,
) -> Result<(Tensor, f32)> {
    let u = txt.dim(0)?;
    let b = owner.len();
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(scale)?;
    let i2t = crate::train::cross_entropy(&logits, owner)?;
    let mut target = vec![0f32; u * b];
    let mut count = vec![0f32; u];
    for &o in owner {
        count[o as usize] += 1.0;
    }
    for (j, &o) in owner.iter().enumerate() {
        target[o as usize * b + j] = 1.0 / count[o as usize];
    }
    let target = Tensor::from_vec(target, (u, b), img.device())?;
    let logp = candle_nn::ops::log_softmax(&logits.t()?, D::Minus1)?;
    let t2i = ((target * logp)?.sum_all()? / -(u as f64))?;
    let loss = ((i2t + t2i)? * 0.5)?;
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let hits = pred.iter().zip(owner).filter(|(p, o)| p == o).count();
    Ok((loss, hits as f32 / b as f32))
}

/// The model being pre-trained: its variables, optimisers and the auxiliary AU head.
pub struct Pretrainer {
    pub model: ClipModel,
    vars: Vec<(String, Var)>,
    scale: Var,
    head_w: Var,
    head_b: Var,
    opt_decay: AdamW,
    opt_plain: AdamW,
    tokenizer: Tokenizer,
    au_weight: f64,
}

impl Pretrainer {
    /// A CLIP of shape `clip` and its optimisers: fresh ([`tensor_specs_for_training`]
    /// initialisation from `pc.seed`), or continuing from `init` (every tensor of the shape must be
    /// there; its temperature is kept and `pc.temperature` is not used).
    pub fn new(
        clip: &ClipConfig,
        pc: &PretrainConfig,
        init: Option<&Weights>,
        device: &Device,
    ) -> Result<Self> {
        clip.validate()?;
        pc.validate()?;
        if pc.preprocess.image_size != clip.vision_config.image_size {
            return Err(Error::Config(format!(
                "the preprocessing size {} is not the model's image size {}",
                pc.preprocess.image_size, clip.vision_config.image_size
            )));
        }
        let mut rng = SeededRng::new(pc.seed);
        let mut vars: Vec<(String, Var)> = Vec::new();
        for (key, shape, how) in tensor_specs_for_training(clip) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = match how {
                Init::Normal(std) => (0..n).map(|_| rng.normal() * std).collect(),
                Init::Const(c) => vec![c; n],
            };
            let t = match init {
                Some(w) => w.get(&key, &shape)?.to_device(device)?,
                None => Tensor::from_vec(data, shape, device)?,
            };
            vars.push((key, Var::from_tensor(&t)?));
        }
        let map: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let model = ClipModel::from_weights(
            clip.clone(),
            &Weights::from_tensors("<pre-training variables>", map, device),
        )?;
        let scale = vars
            .iter()
            .find(|(k, _)| k == "logit_scale")
            .map(|(_, v)| v.clone())
            .expect("logit_scale is a spec");
        if init.is_none() {
            scale.set(&Tensor::new(pc.temperature.ln(), device)?)?;
        }
        // Weight decay on matrices only (CLIP's recipe): gains, biases, embeddings and the
        // temperature are not decayed.
        let (decayed, mut plain): (Vec<_>, Vec<_>) = vars
            .iter()
            .cloned()
            .partition(|(k, v)| v.rank() >= 2 && !k.contains("embedding"));
        let e = clip.projection_dim;
        let head_w = Var::from_tensor(&Tensor::from_vec(
            (0..AU_TARGETS * e)
                .map(|_| rng.normal() * (1.0 / e as f32).sqrt())
                .collect::<Vec<f32>>(),
            (AU_TARGETS, e),
            device,
        )?)?;
        let head_b = Var::from_tensor(&Tensor::zeros(AU_TARGETS, DType::F32, device)?)?;
        plain.push(("au_head.weight".into(), head_w.clone()));
        plain.push(("au_head.bias".into(), head_b.clone()));
        let params = |wd: f64| AdamWParams {
            lr: pc.lr,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: wd,
            ..AdamWParams::default()
        };
        Ok(Self {
            model,
            vars,
            scale,
            head_w,
            head_b,
            opt_decay: AdamW::new(decayed, params(pc.weight_decay))?,
            opt_plain: AdamW::new(plain, params(0.0))?,
            tokenizer: Tokenizer::embedded()?,
            au_weight: pc.au_weight,
        })
    }

    /// The temperature `exp(logit_scale)`.
    pub fn temperature(&self) -> Result<f32> {
        Ok(self
            .scale
            .as_tensor()
            .flatten_all()?
            .to_vec1::<f32>()?
            .first()
            .map_or(0.0, |s| s.exp()))
    }

    /// One optimiser step at `lr` on `batch`: (total loss, AU loss, caption top-1).
    fn step(&mut self, batch: &Batch, lr: f64) -> Result<(f32, f32, f32)> {
        self.opt_decay.params.lr = lr;
        self.opt_plain.params.lr = lr;
        let img = l2_normalize(&self.model.image_features(&batch.pixels)?)?;
        let rows = token_rows(&self.tokenizer, &batch.captions);
        let txt = l2_normalize(&self.model.text_features(&rows)?)?;
        let scale = self.scale.as_tensor().exp()?;
        let (mut loss, accuracy) = contrastive_loss(&img, &txt, &batch.owner, &scale)?;
        let mut au_loss = 0.0;
        if self.au_weight > 0.0 {
            // The head reads the features' deviations from the batch mean, scaled to unit RMS: at
            // initialisation a ViT's class token is nearly the same for every image, and a head on
            // the raw feature learns the mean target and collapses the features further.
            let centred = img.broadcast_sub(&img.mean_keepdim(0)?)?;
            let rms = centred.sqr()?.mean_all()?.sqrt()?.affine(1.0, 1e-6)?;
            let pred = centred
                .broadcast_div(&rms)?
                .matmul(&self.head_w.as_tensor().t()?)?
                .broadcast_add(self.head_b.as_tensor())?;
            let mse = (pred - &batch.aus)?.sqr()?.mean_all()?;
            au_loss = mse.to_scalar::<f32>()?;
            loss = (loss + (mse * self.au_weight)?)?;
        }
        let grads = loss.backward()?;
        self.opt_decay.step(&grads)?;
        self.opt_plain.step(&grads)?;
        let s = self.scale.as_tensor().clamp(0f32, MAX_LOGIT_SCALE)?;
        self.scale.set(&s)?;
        Ok((loss.to_scalar::<f32>()?, au_loss, accuracy))
    }

    /// Write the backbone as an HF directory (`config.json`, tokenizer files, then
    /// `model.safetensors`; each atomically). The AU head is not part of it.
    pub fn save(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let tensors: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let cfg = &self.model.config;
        crate::io::write_atomic(&out.join(super::CONFIG_FILE), cfg.to_hf_json().as_bytes())?;
        crate::tokenizer::write_hf_tokenizer_files(out)?;
        crate::io::save_safetensors_atomic(&tensors, &out.join(super::WEIGHTS_FILE))
    }
}

/// Pre-train a CLIP of shape `clip` (from scratch, or continuing from `init`) and write it as an
/// HF directory into `out` (`config.json`, `model.safetensors`, tokenizer files, and
/// `pretrain.json` with the recipe and history; each file written atomically).
pub fn pretrain(
    clip: &ClipConfig,
    pc: &PretrainConfig,
    init: Option<&Weights>,
    out: &Path,
    device: &Device,
    on_step: &mut dyn FnMut(&PretrainRecord),
) -> Result<PretrainReport> {
    let start = Instant::now();
    let mut trainer = Pretrainer::new(clip, pc, init, device)?;
    // Frames come from their own stream, apart from the initialisation's.
    let mut rng = SeededRng::new(pc.seed ^ 0x5eed_f4a3_e5c0_ffee);
    let schedule = CosineSchedule {
        base_lr: pc.lr,
        epochs: pc.steps,
        warmup_epochs: pc.warmup_steps,
        warmup_lr_init: pc.lr * 0.01,
        min_lr: pc.lr * 0.01,
    };
    let mut history = Vec::new();
    let mut render_seconds = 0.0;
    for step in 0..pc.steps {
        let lr = schedule.lr(step);
        let seeds: Vec<u64> = (0..pc.batch_size).map(|_| rng.next_u64()).collect();
        let t0 = Instant::now();
        let batch = render_batch(&seeds, pc, device)?;
        render_seconds += t0.elapsed().as_secs_f64();
        let (loss, au_loss, accuracy) = trainer.step(&batch, lr)?;
        if !loss.is_finite() {
            return Err(Error::Config(format!(
                "pre-training diverged at step {} (loss {loss}); lower --lr",
                step + 1
            )));
        }
        let rec = PretrainRecord {
            step: step + 1,
            loss,
            au_loss,
            accuracy,
            captions: batch.captions.len(),
            lr,
            temperature: trainer.temperature()?,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_step(&rec);
        history.push(rec);
    }
    trainer.save(out)?;
    let report = PretrainReport {
        config: pc.clone(),
        clip: clip.clone(),
        seconds: start.elapsed().as_secs_f64(),
        render_seconds,
        history,
    };
    let json = serde_json::json!({
        "generator": "pe-clip pretrain",
        "format_version": 1,
        "note": "a CLIP-shaped backbone pre-trained contrastively on synthetic face frames and their action-unit captions; a stand-in for CLIP weights, not CLIP",
        "continued_from": init.map(|w| w.path().display().to_string()),
        "report": report,
    });
    crate::io::write_atomic(
        &out.join("pretrain.json"),
        serde_json::to_string_pretty(&json)
            .expect("json")
            .as_bytes(),
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::Arch;
    use crate::PixelNorm;

    #[test]
    fn contrastive_loss_prefers_matching_pairs() {
        let d = Device::Cpu;
        let img = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 0.0]], &d).unwrap();
        let txt = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &d).unwrap();
        let scale = Tensor::new(10f32, &d).unwrap();
        let (good, acc) = contrastive_loss(&img, &txt, &[0, 1, 0], &scale).unwrap();
        let (bad, acc_bad) = contrastive_loss(&img, &txt, &[1, 0, 1], &scale).unwrap();
        let (good, bad) = (
            good.to_scalar::<f32>().unwrap(),
            bad.to_scalar::<f32>().unwrap(),
        );
        assert_eq!((acc, acc_bad), (1.0, 0.0));
        assert!(bad > 5.0, "{bad}");
        // Caption 0 owns frames 0 and 2 equally: its text-to-image loss is ln 2 at best, and it
        // enters as 1/2 (mean over 2 captions) times 1/2 (the symmetric loss).
        assert!(
            (good - 0.25 * std::f32::consts::LN_2).abs() < 1e-3,
            "{good}"
        );
    }

    fn small() -> (ClipConfig, PretrainConfig) {
        let mut cfg = ClipConfig::preset(Arch::Tiny);
        cfg.vision_config.num_hidden_layers = 2;
        cfg.text_config.num_hidden_layers = 2;
        let pc = PretrainConfig {
            steps: 3,
            batch_size: 16,
            lr: 1e-3,
            weight_decay: 0.1,
            warmup_steps: 1,
            seed: 3,
            render_size: 32,
            preprocess: PreprocessSpec {
                image_size: 32,
                pixel_norm: PixelNorm::None,
            },
            distractors: true,
            infrared: false,
            au_weight: 1.0,
            temperature: 100.0,
        };
        (cfg, pc)
    }

    #[test]
    fn steps_lower_the_loss_on_a_batch() {
        let (cfg, pc) = small();
        let mut t = Pretrainer::new(&cfg, &pc, None, &Device::Cpu).unwrap();
        let seeds: Vec<u64> = (0..16).collect();
        let batch = render_batch(&seeds, &pc, &Device::Cpu).unwrap();
        let losses: Vec<f32> = (0..15).map(|_| t.step(&batch, 1e-3).unwrap().0).collect();
        assert!(
            losses[12..].iter().sum::<f32>() < 0.8 * losses[..3].iter().sum::<f32>(),
            "{losses:?}"
        );
    }

    #[test]
    fn pretraining_writes_a_loadable_clip_deterministically() {
        let (cfg, pc) = small();
        let dir = tempfile::tempdir().unwrap();
        let report = pretrain(&cfg, &pc, None, dir.path(), &Device::Cpu, &mut |_| {}).unwrap();
        assert_eq!(report.history.len(), 3);
        let back = ClipModel::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(back.config, cfg);
        assert!(dir.path().join("pretrain.json").is_file());
        let dir2 = tempfile::tempdir().unwrap();
        pretrain(&cfg, &pc, None, dir2.path(), &Device::Cpu, &mut |_| {}).unwrap();
        let a = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let b = std::fs::read(dir2.path().join("model.safetensors")).unwrap();
        assert!(a == b, "pre-training is not deterministic");
    }

    #[test]
    fn continuing_starts_from_the_given_weights_and_temperature() {
        let (cfg, pc) = small();
        let dir = tempfile::tempdir().unwrap();
        pretrain(&cfg, &pc, None, dir.path(), &Device::Cpu, &mut |_| {}).unwrap();
        let file = dir.path().join("model.safetensors");
        let w = Weights::open(&file, &Device::Cpu).unwrap();
        let other = PretrainConfig {
            seed: 99,
            temperature: 7.0,
            ..pc
        };
        let t = Pretrainer::new(&cfg, &other, Some(&w), &Device::Cpu).unwrap();
        let saved = ClipModel::load(dir.path(), &Device::Cpu).unwrap();
        assert!((t.temperature().unwrap() - saved.logit_scale.exp()).abs() < 1e-3);
        let out = tempfile::tempdir().unwrap();
        t.save(out.path()).unwrap();
        let a = std::fs::read(&file).unwrap();
        let b = std::fs::read(out.path().join("model.safetensors")).unwrap();
        assert!(
            a == b,
            "the continued model does not start from the given weights"
        );
    }
}

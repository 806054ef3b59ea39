//! The PE-CLIP model: a frozen CLIP backbone with ShA/TDA in the vision blocks, ShA/TA in the text
//! blocks and MaPLe prompts (reference sections 2 to 4).

use candle_core::{Tensor, D};

use super::adapter::{Adapter, CellState, TemporalAdapter};
use super::config::PeClipConfig;
use super::params::{trainable_specs, Trainables};
use super::prompt::PromptLearner;
use crate::classes::ClassSet;
use crate::clip::attention::causal_mask;
use crate::clip::encoder::EncoderLayer;
use crate::clip::ClipModel;
use crate::error::{Error, Result};
use crate::tokenizer::ClipTokenizer;
use crate::zero_shot::l2_normalize;

/// How the TDA recurrences run over a batch of videos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GruMode {
    /// Each video's T frames from h0 = 0 (the project's defined semantics).
    #[default]
    PerVideo,
    /// One recurrence over all B·T frames of the batch, video after video (the authors' code; for
    /// comparison only).
    BatchCarry,
}

/// Adapters of one vision block.
#[derive(Debug, Clone)]
pub struct VisionAdapters {
    pub shared: Option<Adapter>,
    pub temporal: Option<TemporalAdapter>,
}

/// Adapters of one text block.
#[derive(Debug, Clone)]
pub struct TextAdapters {
    pub shared: Option<Adapter>,
    pub text: Option<Adapter>,
}

/// PE-CLIP over a frozen backbone.
#[derive(Debug, Clone)]
pub struct PeClip {
    pub config: PeClipConfig,
    pub clip: ClipModel,
    pub trainables: Trainables,
    pub classes: ClassSet,
    pub vision_adapters: Vec<VisionAdapters>,
    pub text_adapters: Vec<TextAdapters>,
    pub prompts: Option<PromptLearner>,
    /// Token ids of the class texts, `[C][context]`, padded with 0 as OpenAI's tokenizer does.
    pub class_ids: Vec<Vec<u32>>,
    /// End-of-text row of each class text.
    pub class_eot: Vec<usize>,
}

impl PeClip {
    /// Assemble the model; `trainables` must hold exactly the tensors `config` asks for.
    pub fn new(
        config: PeClipConfig,
        clip: ClipModel,
        trainables: Trainables,
        classes: ClassSet,
        tokenizer: &ClipTokenizer,
    ) -> Result<Self> {
        config.validate(&clip.config)?;
        let (vision_adapters, text_adapters, prompts) = build_parts(&config, &clip, &trainables)?;
        let context = clip.config.text_config.max_position_embeddings;
        let (class_ids, class_eot): (Vec<_>, Vec<_>) = classes
            .descriptors()
            .iter()
            .map(|d| tokenizer.tokenize_padded(&config.class_text(d), context, 0))
            .unzip();
        Ok(Self {
            config,
            clip,
            trainables,
            classes,
            vision_adapters,
            text_adapters,
            prompts,
            class_ids,
            class_eot,
        })
    }

    /// The same model with the frozen backbone computing in `dtype` (mixed precision: bf16 or
    /// f16; the trainables stay f32, [`ClipModel::with_compute_dtype`]).
    pub fn with_compute_dtype(&self, dtype: candle_core::DType) -> Result<Self> {
        Ok(Self {
            clip: self.clip.with_compute_dtype(dtype)?,
            ..self.clone()
        })
    }

    /// The same model over `trainables` (for example an inference view of the variables being
    /// trained: `self.trainables.clone().into_inference()` shares their storage).
    pub fn with_trainables(&self, trainables: Trainables) -> Result<Self> {
        let (vision_adapters, text_adapters, prompts) =
            build_parts(&self.config, &self.clip, &trainables)?;
        Ok(Self {
            trainables,
            vision_adapters,
            text_adapters,
            prompts,
            ..self.clone()
        })
    }

    /// Projected text features of the classes `[C, E]` (not normalised).
    pub fn text_features(&self) -> Result<Tensor> {
        let text = &self.clip.text;
        let mut x = text.embed(&self.class_ids, &self.clip.device)?;
        let (c, l, d) = x.dims3()?;
        let prompts = match &self.prompts {
            Some(p) => p.text_prompts()?,
            None => Vec::new(),
        };
        let n = match &self.prompts {
            Some(p) => p.tokens()?,
            None => 0,
        };
        if let Some(ctx) = prompts.first() {
            let pos = text.position_embedding.narrow(0, 1, n)?;
            let ctx = (ctx.to_dtype(pos.dtype())? + pos)?
                .unsqueeze(0)?
                .broadcast_as((c, n, d))?;
            x = Tensor::cat(
                &[&x.narrow(1, 0, 1)?, &ctx, &x.narrow(1, 1 + n, l - 1 - n)?],
                1,
            )?;
        }
        let mask = causal_mask(l, x.device())?;
        for (i, (layer, ad)) in text.layers.iter().zip(&self.text_adapters).enumerate() {
            if i >= 1 && i < prompts.len() {
                let p = prompts[i]
                    .to_dtype(x.dtype())?
                    .unsqueeze(0)?
                    .broadcast_as((c, n, d))?;
                x = Tensor::cat(
                    &[&x.narrow(1, 0, 1)?, &p, &x.narrow(1, 1 + n, l - 1 - n)?],
                    1,
                )?;
            }
            x = text_block(layer, ad, &x, &mask)?;
        }
        text.pool(&x, &self.class_eot)
    }

    /// Number of token rows per frame in the vision stream (CLS, patches, prompt rows).
    pub fn vision_rows(&self) -> usize {
        let prompt_rows = if self.config.prompts.enabled {
            self.config.prompts.tokens
        } else {
            0
        };
        1 + self.clip.config.vision_config.num_patches() + prompt_rows
    }

    /// Tokens entering block 0: `ln_pre([CLS; patches; fp16(P_v^0)] + pos)`, `[N, L, Dv]`.
    pub fn vision_input(&self, pixels: &Tensor, vprompts: &[Tensor]) -> Result<Tensor> {
        let vision = &self.clip.vision;
        let mut x = vision.embeddings.forward(pixels)?;
        if let Some(p0) = vprompts.first() {
            let (n, _, d) = x.dims3()?;
            let rows = p0.dim(0)?;
            let p0 = p0.to_dtype(x.dtype())?;
            x = Tensor::cat(&[&x, &p0.unsqueeze(0)?.broadcast_as((n, rows, d))?], 1)?;
        }
        vision.pre_layrnorm.forward(&x)
    }

    /// Vision block `i` on `x` `[S·T, L, Dv]` (S sequences of T frames): prompt insertion,
    /// attention + ShA, MLP + TDA. `state` is the TDA state to start from (None: zeros).
    pub fn vision_block(
        &self,
        i: usize,
        x: &Tensor,
        vprompts: &[Tensor],
        sequences: usize,
        state: Option<CellState>,
    ) -> Result<(Tensor, Option<CellState>)> {
        let mut x = x.clone();
        if i >= 1 && i < vprompts.len() {
            let (n, l, d) = x.dims3()?;
            let rows = vprompts[i].dim(0)?;
            let p = vprompts[i]
                .to_dtype(x.dtype())?
                .unsqueeze(0)?
                .broadcast_as((n, rows, d))?;
            x = Tensor::cat(&[&x.narrow(1, 0, l - rows)?, &p], 1)?;
        }
        let layer = &self.clip.vision.layers[i];
        let ad = &self.vision_adapters[i];
        let a = layer.attention_branch(&x, None)?;
        let a = match &ad.shared {
            Some(s) => (&a + s.delta(&a)?)?,
            None => a,
        };
        let x = (x + a)?;
        let m = layer.mlp_branch(&x)?;
        let (m, state) = match &ad.temporal {
            Some(t) => t.forward(&m, sequences, state)?,
            None => (m, None),
        };
        Ok(((x + m)?, state))
    }

    /// The vision prompts of every depth (empty without prompts).
    pub fn vision_prompts(&self) -> Result<Vec<Tensor>> {
        match &self.prompts {
            Some(p) => p.vision_prompts(),
            None => Ok(Vec::new()),
        }
    }

    /// Projected per-frame features `[B·T, E]` of `videos` `[B, T, 3, S, S]`.
    pub fn frame_features(&self, videos: &Tensor, mode: GruMode) -> Result<Tensor> {
        let (b, t, c, h, w) = videos.dims5()?;
        let pixels = videos.reshape((b * t, c, h, w))?;
        let sequences = match mode {
            GruMode::PerVideo => b,
            GruMode::BatchCarry => 1,
        };
        let vprompts = self.vision_prompts()?;
        let mut x = self.vision_input(&pixels, &vprompts)?;
        for i in 0..self.clip.vision.layers.len() {
            x = self.vision_block(i, &x, &vprompts, sequences, None)?.0;
        }
        self.clip.vision.pool(&x)
    }

    /// `logit_scale · cos(v̂, t̂)` for video features `[B, E]` (not normalised) against
    /// normalised text features `[C, E]`.
    pub fn logits_from(&self, video: &Tensor, text_normalized: &Tensor) -> Result<Tensor> {
        let v = l2_normalize(video)?;
        Ok((v.matmul(&text_normalized.t()?)? * f64::from(self.config.logit_scale))?)
    }

    /// Logits `[B, C]` of `videos` `[B, T, 3, S, S]`: mean over frames of the projected features,
    /// L2-normalised, cosine with the normalised class features, times the logit scale.
    pub fn forward(&self, videos: &Tensor, mode: GruMode) -> Result<Tensor> {
        let text = l2_normalize(&self.text_features()?)?;
        self.forward_with_text(videos, mode, &text)
    }

    /// [`forward`](Self::forward) with the normalised class features `[C, E]` computed once by the
    /// caller (they are constant at inference).
    pub fn forward_with_text(
        &self,
        videos: &Tensor,
        mode: GruMode,
        text_normalized: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, _, _, _) = videos.dims5()?;
        let feats = self.frame_features(videos, mode)?;
        let e = feats.dim(D::Minus1)?;
        let video = feats.reshape((b, t, e))?.mean(1)?;
        self.logits_from(&video, text_normalized)
    }
}

type Parts = (
    Vec<VisionAdapters>,
    Vec<TextAdapters>,
    Option<PromptLearner>,
);

/// The adapters and prompts of `config` read from `trainables`.
fn build_parts(config: &PeClipConfig, clip: &ClipModel, trainables: &Trainables) -> Result<Parts> {
    let want = trainable_specs(config, &clip.config);
    if want != trainables.specs {
        return Err(Error::Config(
            "the trainable tensors do not match the PE-CLIP config and backbone".into(),
        ));
    }
    let a = &config.adapters;
    let vision_adapters = (0..clip.config.vision_config.num_hidden_layers)
        .map(|i| {
            let p = format!("visual.transformer.resblocks.{i}");
            Ok(VisionAdapters {
                shared: a
                    .vision_shared
                    .then(|| Adapter::new(trainables, &format!("{p}.adapter_pre_attn")))
                    .transpose()?,
                temporal: a
                    .temporal
                    .then(|| {
                        TemporalAdapter::new(
                            trainables,
                            &format!("{p}.adapter_pre_mlp"),
                            config.temporal_cell,
                            config.scale_at,
                        )
                    })
                    .transpose()?,
            })
        })
        .collect::<Result<_>>()?;
    let text_adapters = (0..clip.config.text_config.num_hidden_layers)
        .map(|i| {
            let p = format!("transformer.resblocks.{i}");
            Ok(TextAdapters {
                shared: a
                    .text_shared
                    .then(|| Adapter::new(trainables, &format!("{p}.adapter_pre_attn")))
                    .transpose()?,
                text: a
                    .text
                    .then(|| Adapter::new(trainables, &format!("{p}.adapter_pre_mlp")))
                    .transpose()?,
            })
        })
        .collect::<Result<_>>()?;
    let prompts = config
        .prompts
        .enabled
        .then(|| PromptLearner::new(trainables, config.prompts.depth))
        .transpose()?;
    Ok((vision_adapters, text_adapters, prompts))
}

/// One text block with ShA and TA (reference 3.3).
fn text_block(
    layer: &EncoderLayer,
    ad: &TextAdapters,
    x: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let a = layer.attention_branch(x, Some(mask))?;
    let a = match &ad.shared {
        Some(s) => (&a + s.delta(&a)?)?,
        None => a,
    };
    let x = (x + a)?;
    let m = layer.mlp_branch(&x)?;
    let m = match &ad.text {
        Some(t) => (&m + t.delta(&m)?)?,
        None => m,
    };
    Ok((x + m)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::clip::random::SeededNormal;
    use crate::clip::{Arch, ClipConfig};
    use candle_core::Device;

    /// A freshly initialised PE-CLIP on a random tiny backbone (the reference fixture's shape).
    pub(crate) fn tiny_model(cfg: PeClipConfig, seed: u64) -> PeClip {
        let dir = tempfile::tempdir().unwrap();
        let r = crate::peclip::random::RandomPeClip {
            backbone: ClipConfig::preset(Arch::Tiny),
            config: cfg,
            seed,
            inference: false,
            perturb: None,
        };
        crate::peclip::random::random_peclip(dir.path(), &r).unwrap()
    }

    /// Smooth random videos `[b, t, 3, 32, 32]` in [0, 1].
    pub(crate) fn videos(b: usize, t: usize, seed: u64) -> Tensor {
        let mut rng = SeededNormal::new(seed);
        let n = b * t * 3 * 32 * 32;
        let v: Vec<f32> = (0..n).map(|_| rng.uniform() as f32).collect();
        Tensor::from_vec(v, (b, t, 3, 32, 32), &Device::Cpu).unwrap()
    }

    /// Give the TDA up-projections small random values and the dynamic scales a positive bias, as
    /// after some training: with the reference init (up = 0) the TDA is inert.
    pub(crate) fn activate_tda(m: &PeClip, seed: u64) {
        let mut rng = SeededNormal::new(seed);
        for (name, var) in m.trainables.named_vars() {
            if name.starts_with("visual.") && name.ends_with("adapter_pre_mlp.up_proj.weight") {
                let n = var.elem_count();
                let v: Vec<f32> = (0..n).map(|_| rng.normal() * 0.1).collect();
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
            if name.ends_with("adapter_pre_mlp.scale.bias") {
                var.set(&Tensor::ones(1, candle_core::DType::F32, &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
    }

    /// Every ablation of paper Tables 5 to 9 builds, runs to finite logits, has exactly the
    /// counted parameters, and streams frame by frame as its batched forward.
    #[test]
    fn every_ablation_variant_runs_and_streams_exactly() {
        use crate::peclip::config::{AdapterSwitches, PromptConfig, ScaleAt, TemporalCell};
        use crate::peclip::{breakdown, StreamState, Streamer};
        let base = PeClipConfig::default();
        let variants: Vec<(&str, PeClipConfig)> = vec![
            ("reference", base.clone()),
            (
                "r4",
                PeClipConfig {
                    reduction: 4,
                    ..base.clone()
                },
            ),
            (
                "lstm",
                PeClipConfig {
                    temporal_cell: TemporalCell::Lstm,
                    ..base.clone()
                },
            ),
            (
                "rnn",
                PeClipConfig {
                    temporal_cell: TemporalCell::Rnn,
                    ..base.clone()
                },
            ),
            (
                "vanilla",
                PeClipConfig {
                    temporal_cell: TemporalCell::None,
                    ..base.clone()
                },
            ),
            (
                "scale-input",
                PeClipConfig {
                    scale_at: ScaleAt::Input,
                    ..base.clone()
                },
            ),
            (
                "scale-gru",
                PeClipConfig {
                    scale_at: ScaleAt::GruOutput,
                    ..base.clone()
                },
            ),
            (
                "ta-only",
                PeClipConfig {
                    adapters: AdapterSwitches {
                        vision_shared: false,
                        temporal: false,
                        text_shared: false,
                        text: true,
                    },
                    prompts: PromptConfig {
                        enabled: false,
                        ..PromptConfig::default()
                    },
                    ..base.clone()
                },
            ),
            (
                "shallow-prompts",
                PeClipConfig {
                    prompts: PromptConfig {
                        enabled: true,
                        depth: 3,
                        tokens: 4,
                    },
                    ..base.clone()
                },
            ),
        ];
        let v = videos(1, 5, 2);
        for (name, cfg) in variants {
            let m = tiny_model(cfg.clone(), 3);
            activate_tda(&m, 8);
            assert_eq!(
                m.trainables.numel(),
                breakdown(&cfg, &m.clip.config).trainable_total,
                "{name}"
            );
            let batched = m.frame_features(&v, GruMode::PerVideo).unwrap();
            let streamer = Streamer::new(&m).unwrap();
            let mut state = StreamState::new(&m);
            let mut stepped = Vec::new();
            for t in 0..5 {
                let (f, s) = streamer
                    .step(&v.get(0).unwrap().get(t).unwrap(), state)
                    .unwrap();
                state = s;
                stepped.push(f);
            }
            let stepped = Tensor::cat(&stepped, 0).unwrap();
            let d = crate::clip::layers::max_abs_diff(&stepped, &batched).unwrap();
            assert!(d < 1e-5, "{name}: stepped features differ by {d}");
            let logits: Vec<f32> = m
                .forward(&v, GruMode::PerVideo)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(logits.iter().all(|l| l.is_finite()), "{name}");
        }
    }

    /// After one backward pass every trainable tensor (context, couplings, deep prompts, every
    /// adapter of every block, the GRU weights) has a finite, non-zero gradient, and no backbone
    /// tensor is a variable. This checks that no path is cut (fused ops without backward, detached
    /// tensors), so two legitimate zero-gradient cases are taken out first: the TDA up-projections
    /// start at zero in the reference init (blocking every other TDA gradient at the very first
    /// step), and a dynamic scale whose ReLU is off for every token passes no gradient (block 11 is
    /// only read at the class token). Up-projections get small values, scale biases +1.
    #[test]
    fn every_trainable_tensor_receives_a_gradient() {
        let m = tiny_model(PeClipConfig::default(), 11);
        activate_tda(&m, 5);
        let logits = m.forward(&videos(2, 4, 3), GruMode::PerVideo).unwrap();
        let targets = Tensor::new(&[2u32, 4], &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for (name, var) in m.trainables.named_vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                g.iter().all(|v| v.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(g.iter().any(|&v| v != 0.0), "{name}: zero gradient");
            checked += 1;
        }
        assert_eq!(checked, m.trainables.specs.len());
        // Layer-0 context and projection, 8 deep prompts, 8 couplings, 12 x 16 vision (ShA 4,
        // TDA 12) and 12 x 8 text
        // adapter tensors.
        assert_eq!(checked, 1 + 2 + 8 + 16 + 12 * 16 + 12 * 8);
        let v = &m.clip.vision;
        let mut frozen = vec![
            &v.embeddings.patch_weight,
            &v.embeddings.class_embedding,
            &v.embeddings.position_embedding,
            &v.post_layernorm.weight,
            &v.projection.weight,
            &m.clip.text.token_embedding,
            &m.clip.text.projection.weight,
        ];
        for l in v.layers.iter().chain(&m.clip.text.layers) {
            frozen.extend([
                &l.self_attn.q_proj.weight,
                &l.self_attn.out_proj.weight,
                &l.mlp.fc1.weight,
                &l.layer_norm1.weight,
            ]);
        }
        for t in frozen {
            assert!(!t.is_variable() && grads.get(t).is_none());
        }
    }
}

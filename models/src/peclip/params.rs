//! The trainable tensors of PE-CLIP: their names (the reference checkpoint's names, so that
//! checkpoints trained with the authors' code import as they are), shapes, initialisation, and the
//! parameter-count breakdown. One list drives initialisation, loading and counting.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use serde::Serialize;

use super::config::{PeClipConfig, TemporalCell};
use crate::clip::random::SeededNormal;
use crate::clip::weights::Weights;
use crate::clip::ClipConfig;
use crate::error::{Error, Result};

/// How a trainable tensor starts.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamInit {
    /// A constant.
    Const(f32),
    /// N(0, std²).
    Normal(f32),
    /// U(-bound, bound). PyTorch's default `nn.Linear` init and `kaiming_uniform_(a=√5)` are both
    /// `1/√fan_in`; its GRU/RNN/LSTM default is `1/√hidden`.
    Uniform(f32),
    /// The same values as another tensor (MaPLe's deep projections are deep copies of one Linear).
    CopyOf(String),
}

/// Which part of the model a tensor belongs to (for the breakdown and the optimiser groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    VisionShared,
    Temporal,
    TextShared,
    Text,
    PromptContext,
    PromptProjection,
    DeepPrompts,
    DeepProjections,
}

impl Part {
    /// Adapters and prompts get different learning rates.
    pub fn is_adapter(self) -> bool {
        matches!(
            self,
            Part::VisionShared | Part::Temporal | Part::TextShared | Part::Text
        )
    }
}

/// One trainable tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: ParamInit,
    pub part: Part,
}

impl ParamSpec {
    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn linear(
    out: &mut Vec<ParamSpec>,
    name: &str,
    i: usize,
    o: usize,
    part: Part,
    w: ParamInit,
    b: ParamInit,
) {
    out.push(ParamSpec {
        name: format!("{name}.weight"),
        shape: vec![o, i],
        init: w,
        part,
    });
    out.push(ParamSpec {
        name: format!("{name}.bias"),
        shape: vec![o],
        init: b,
        part,
    });
}

/// A PyTorch-default Linear (weight and bias U(±1/√fan_in)).
fn default_linear(out: &mut Vec<ParamSpec>, name: &str, i: usize, o: usize, part: Part) {
    let bound = 1.0 / (i as f32).sqrt();
    linear(
        out,
        name,
        i,
        o,
        part,
        ParamInit::Uniform(bound),
        ParamInit::Uniform(bound),
    );
}

/// Every trainable tensor of `cfg` on a backbone of `clip`'s sizes, in a fixed order.
pub fn trainable_specs(cfg: &PeClipConfig, clip: &ClipConfig) -> Vec<ParamSpec> {
    let mut out = Vec::new();
    let (dv, dt) = (clip.vision_config.hidden_size, clip.text_config.hidden_size);
    let (bv, bt) = (cfg.vision_bottleneck(clip), cfg.text_bottleneck(clip));
    let a = &cfg.adapters;
    for i in 0..clip.vision_config.num_hidden_layers {
        let p = format!("visual.transformer.resblocks.{i}");
        if a.vision_shared {
            let ada = format!("{p}.adapter_pre_attn");
            bottleneck(&mut out, &ada, dv, bv, Part::VisionShared);
        }
        if a.temporal {
            let t = format!("{p}.adapter_pre_mlp");
            match cfg.temporal_cell {
                TemporalCell::None => bottleneck(&mut out, &t, dv, bv, Part::Temporal),
                cell => recurrent_tda(&mut out, &t, dv, bv, cell),
            }
        }
    }
    for i in 0..clip.text_config.num_hidden_layers {
        let p = format!("transformer.resblocks.{i}");
        if a.text_shared {
            let ada = format!("{p}.adapter_pre_attn");
            bottleneck(&mut out, &ada, dt, bt, Part::TextShared);
        }
        if a.text {
            bottleneck(
                &mut out,
                &format!("{p}.adapter_pre_mlp"),
                dt,
                bt,
                Part::Text,
            );
        }
    }
    if cfg.prompts.enabled {
        prompt_learner(&mut out, cfg.prompts.tokens, cfg.prompts.depth, dt, dv);
    }
    out
}

/// A bottleneck adapter `prefix.{down_proj, up_proj}`: `d -> b -> d`, default initialisation.
fn bottleneck(out: &mut Vec<ParamSpec>, prefix: &str, d: usize, b: usize, part: Part) {
    default_linear(out, &format!("{prefix}.down_proj"), d, b, part);
    default_linear(out, &format!("{prefix}.up_proj"), b, d, part);
}

/// The recurrent TDA at `t`: its LayerNorm, the dynamic scale and down-projection (Kaiming
/// uniform, zero bias), the cell in PyTorch's layout and init, and a zero up-projection (the
/// adapter starts as the identity).
fn recurrent_tda(out: &mut Vec<ParamSpec>, t: &str, dv: usize, bv: usize, cell: TemporalCell) {
    let part = Part::Temporal;
    let kaiming = ParamInit::Uniform(1.0 / (dv as f32).sqrt());
    for (name, init) in [("weight", 1.0), ("bias", 0.0)] {
        out.push(ParamSpec {
            name: format!("{t}.adapter_layer_norm_before.{name}"),
            shape: vec![dv],
            init: ParamInit::Const(init),
            part,
        });
    }
    let zero = ParamInit::Const(0.0);
    linear(
        out,
        &format!("{t}.scale"),
        dv,
        1,
        part,
        kaiming.clone(),
        zero.clone(),
    );
    linear(
        out,
        &format!("{t}.down_proj"),
        dv,
        bv,
        part,
        kaiming,
        zero.clone(),
    );
    let gates = match cell {
        TemporalCell::Gru => 3,
        TemporalCell::Lstm => 4,
        TemporalCell::Rnn | TemporalCell::None => 1,
    };
    let init = ParamInit::Uniform(1.0 / (bv as f32).sqrt());
    for (name, shape) in [
        ("weight_ih_l0", vec![gates * bv, bv]),
        ("weight_hh_l0", vec![gates * bv, bv]),
        ("bias_ih_l0", vec![gates * bv]),
        ("bias_hh_l0", vec![gates * bv]),
    ] {
        out.push(ParamSpec {
            name: format!("{t}.rnn.{name}"),
            shape,
            init: init.clone(),
            part,
        });
    }
    linear(
        out,
        &format!("{t}.up_proj"),
        bv,
        dv,
        part,
        zero.clone(),
        zero,
    );
}

/// MaPLe's prompt learner: `tokens` context vectors and their projection, and `depth - 1` deep
/// prompts with projections (all deep projections start as copies of the first).
fn prompt_learner(out: &mut Vec<ParamSpec>, tokens: usize, depth: usize, dt: usize, dv: usize) {
    out.push(ParamSpec {
        name: "prompt_learner.ctx".into(),
        shape: vec![tokens, dt],
        init: ParamInit::Normal(0.02),
        part: Part::PromptContext,
    });
    default_linear(out, "prompt_learner.proj", dt, dv, Part::PromptProjection);
    for j in 0..depth - 1 {
        out.push(ParamSpec {
            name: format!("prompt_learner.compound_prompts_text.{j}"),
            shape: vec![tokens, dt],
            init: ParamInit::Normal(0.02),
            part: Part::DeepPrompts,
        });
    }
    for j in 0..depth - 1 {
        let name = format!("prompt_learner.compound_prompt_projections.{j}");
        if j == 0 {
            default_linear(out, &name, dt, dv, Part::DeepProjections);
        } else {
            let first = "prompt_learner.compound_prompt_projections.0";
            linear(
                out,
                &name,
                dt,
                dv,
                Part::DeepProjections,
                ParamInit::CopyOf(format!("{first}.weight")),
                ParamInit::CopyOf(format!("{first}.bias")),
            );
        }
    }
}

/// Parameter counts per part and in total.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamBreakdown {
    pub parts: BTreeMap<Part, usize>,
    pub adapters: usize,
    pub prompt_learner: usize,
    pub trainable_total: usize,
    pub frozen_backbone: usize,
}

/// Count the trainable tensors of `cfg` (and the frozen backbone) without building anything.
pub fn breakdown(cfg: &PeClipConfig, clip: &ClipConfig) -> ParamBreakdown {
    let mut parts = BTreeMap::new();
    for s in trainable_specs(cfg, clip) {
        *parts.entry(s.part).or_insert(0) += s.numel();
    }
    let adapters = parts
        .iter()
        .filter(|(p, _)| p.is_adapter())
        .map(|(_, n)| n)
        .sum();
    let prompt_learner = parts
        .iter()
        .filter(|(p, _)| !p.is_adapter())
        .map(|(_, n)| n)
        .sum();
    let frozen_backbone = crate::clip::random::tensor_specs(clip)
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum();
    ParamBreakdown {
        parts,
        adapters,
        prompt_learner,
        trainable_total: adapters + prompt_learner,
        frozen_backbone,
    }
}

/// The trainable tensors as candle variables, by name.
#[derive(Debug, Clone)]
pub struct Trainables {
    pub specs: Vec<ParamSpec>,
    vars: BTreeMap<String, Var>,
    /// Hand out detached tensors: no autograd graph is recorded (inference).
    inference: bool,
}

impl Trainables {
    /// Fresh values from the reference initialisation, deterministic for `seed`.
    pub fn init(specs: Vec<ParamSpec>, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = SeededNormal::new(seed);
        let mut vars: BTreeMap<String, Var> = BTreeMap::new();
        for s in &specs {
            let n = s.numel();
            let t = match &s.init {
                ParamInit::Const(c) => Tensor::full(*c, s.shape.as_slice(), device)?,
                ParamInit::Normal(std) => {
                    let v: Vec<f32> = (0..n).map(|_| rng.normal() * std).collect();
                    Tensor::from_vec(v, s.shape.as_slice(), device)?
                }
                ParamInit::Uniform(b) => {
                    let v: Vec<f32> = (0..n)
                        .map(|_| ((rng.uniform() * 2.0 - 1.0) as f32) * b)
                        .collect();
                    Tensor::from_vec(v, s.shape.as_slice(), device)?
                }
                ParamInit::CopyOf(other) => vars
                    .get(other)
                    .ok_or_else(|| Error::Config(format!("{} copies unknown {other}", s.name)))?
                    .as_tensor()
                    .copy()?,
            };
            vars.insert(s.name.clone(), Var::from_tensor(&t)?);
        }
        Ok(Self {
            specs,
            vars,
            inference: false,
        })
    }

    /// Values read from `weights`, every spec required with its exact shape; `key` maps a
    /// trainable's name to its key in the file (identity for pe-clip's own files, a prefix such as
    /// `module.clip_model.` for the authors' checkpoints).
    pub fn from_weights(
        specs: Vec<ParamSpec>,
        weights: &Weights,
        key: impl Fn(&str) -> String,
    ) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for s in &specs {
            let t = weights.get(&key(&s.name), &s.shape)?;
            vars.insert(s.name.clone(), Var::from_tensor(&t)?);
        }
        Ok(Self {
            specs,
            vars,
            inference: false,
        })
    }

    /// Write all trainables to a safetensors file atomically (temp file + rename).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let tensors: std::collections::HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        crate::io::save_safetensors_atomic(&tensors, path)
    }

    /// The tensor of a trainable (shares storage with its variable). In inference mode it is
    /// detached, so forward passes record no autograd graph (and keep no intermediates alive).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.vars
            .get(name)
            .map(|v| {
                if self.inference {
                    v.as_tensor().detach()
                } else {
                    v.as_tensor().clone()
                }
            })
            .ok_or_else(|| Error::Config(format!("no trainable tensor named {name}")))
    }

    /// Switch to inference: models built from these trainables afterwards record no gradients.
    pub fn into_inference(mut self) -> Self {
        self.inference = true;
        self
    }

    /// Whether a trainable of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    /// All variables with their names, in name order.
    pub fn named_vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Total number of trainable values.
    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// Add `N(0, std²)` noise (deterministic for `seed`) to every trainable, and `bias` to the TDA
    /// dynamic-scale biases: a stand-in for trained values in tests and benchmarks, since the
    /// reference initialisation zeroes the up-projections and leaves every adapter inert.
    pub fn perturb(&self, seed: u64, std: f32, scale_bias: f32) -> Result<()> {
        let mut rng = SeededNormal::new(seed);
        for (name, var) in &self.vars {
            let t = var.as_tensor();
            let n = t.elem_count();
            let noise: Vec<f32> = (0..n).map(|_| rng.normal() * std).collect();
            let mut next = (t + Tensor::from_vec(noise, t.shape(), t.device())?)?;
            if name.ends_with(".scale.bias") {
                next = (next + f64::from(scale_bias))?;
            }
            var.set(&next)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::{Arch, ClipConfig};
    use crate::peclip::config::{AdapterSwitches, PromptConfig};

    fn count(edit: impl FnOnce(&mut PeClipConfig)) -> usize {
        let mut cfg = PeClipConfig::default();
        edit(&mut cfg);
        breakdown(&cfg, &ClipConfig::preset(Arch::VitB16)).trainable_total
    }

    fn adapters(
        vision_shared: bool,
        temporal: bool,
        text_shared: bool,
        text: bool,
    ) -> AdapterSwitches {
        AdapterSwitches {
            vision_shared,
            temporal,
            text_shared,
            text,
        }
    }

    const NO_PROMPTS: PromptConfig = PromptConfig {
        enabled: false,
        depth: 9,
        tokens: 2,
    };

    /// Reference section 8: the paper's model on ViT-B/16.
    #[test]
    fn vit_b16_counts_match_the_reference() {
        let b = breakdown(&PeClipConfig::default(), &ClipConfig::preset(Arch::VitB16));
        assert_eq!(b.adapters, 5_844_492);
        assert_eq!(b.prompt_learner, 3_555_072);
        assert_eq!(b.trainable_total, 9_399_564);
        assert_eq!(b.frozen_backbone, 149_620_737);
        assert_eq!(b.parts[&Part::VisionShared], 12 * 148_320);
        assert_eq!(b.parts[&Part::Temporal], 12 * 206_497);
        assert_eq!(b.parts[&Part::TextShared], 12 * 66_112);
        assert_eq!(b.parts[&Part::Text], 12 * 66_112);
        assert_eq!(b.parts[&Part::PromptContext], 1_024);
        assert_eq!(b.parts[&Part::PromptProjection], 393_984);
        assert_eq!(b.parts[&Part::DeepPrompts], 8_192);
        assert_eq!(b.parts[&Part::DeepProjections], 3_151_872);
    }

    /// Every ablation row of reference section 8 (paper Tables 5 to 9).
    #[test]
    fn ablation_counts_match_the_reference() {
        assert_eq!(count(|c| c.reduction = 4), 16_512_780);
        assert_eq!(count(|c| c.reduction = 16), 6_340_620);
        assert_eq!(
            count(|c| {
                c.adapters = adapters(false, false, false, true);
                c.prompts = NO_PROMPTS;
            }),
            793_344
        );
        assert_eq!(count(|c| c.prompts = NO_PROMPTS), 5_844_492);
        assert_eq!(
            count(|c| c.adapters = adapters(false, false, false, true)),
            4_348_416
        );
        assert_eq!(
            count(|c| c.adapters = adapters(false, false, true, true)),
            5_141_760
        );
        assert_eq!(
            count(|c| c.adapters = adapters(true, true, false, false)),
            7_812_876
        );
        assert_eq!(
            count(|c| c.adapters = adapters(true, false, true, true)),
            6_921_600
        );
        assert_eq!(count(|c| c.temporal_cell = TemporalCell::Lstm), 9_623_052);
        assert_eq!(count(|c| c.temporal_cell = TemporalCell::Rnn), 8_952_588);
        assert_eq!(count(|c| c.temporal_cell = TemporalCell::None), 8_701_440);
    }

    #[test]
    fn init_follows_the_reference() {
        let clip = ClipConfig::preset(Arch::Tiny);
        let cfg = PeClipConfig::default();
        let specs = trainable_specs(&cfg, &clip);
        let t = Trainables::init(specs, 1, &Device::Cpu).unwrap();
        assert_eq!(t.numel(), breakdown(&cfg, &clip).trainable_total);
        let vals =
            |n: &str| -> Vec<f32> { t.get(n).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
        let up = "visual.transformer.resblocks.1.adapter_pre_mlp.up_proj.weight";
        assert!(
            vals(up).iter().all(|&v| v == 0.0),
            "TDA up-projection starts at zero"
        );
        let down = vals("visual.transformer.resblocks.1.adapter_pre_mlp.down_proj.weight");
        let bound = 1.0 / (64f32).sqrt();
        assert!(down.iter().all(|v| v.abs() <= bound) && down.iter().any(|&v| v != 0.0));
        let p0 = vals("prompt_learner.compound_prompt_projections.0.weight");
        let p7 = vals("prompt_learner.compound_prompt_projections.7.weight");
        assert_eq!(p0, p7, "deep projections start as copies of one Linear");
        let ctx = vals("prompt_learner.ctx");
        let std = (ctx.iter().map(|v| v * v).sum::<f32>() / ctx.len() as f32).sqrt();
        assert!((0.01..0.03).contains(&std), "ctx ~ N(0, 0.02): std {std}");
        // Same seed, same values; another seed, other values.
        let again = Trainables::init(t.specs.clone(), 1, &Device::Cpu).unwrap();
        let other = Trainables::init(t.specs.clone(), 2, &Device::Cpu).unwrap();
        let v = |x: &Trainables| -> Vec<f32> {
            x.get("prompt_learner.ctx")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(v(&t), v(&again));
        assert_ne!(v(&t), v(&other));
    }
}

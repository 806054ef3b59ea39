//! The one recipe for a PE-CLIP on random weights, used by every benchmark and test that needs a
//! model without real CLIP weights: a random backbone of a preset shape written in the HF layout
//! (so it loads through the same path as real weights), the reference initialisation of the
//! trainables, and optionally noise that makes the adapters act as after training.

use std::path::Path;

use candle_core::Device;

use super::{trainable_specs, PeClip, PeClipConfig, Trainables};
use crate::clip::random::write_random_model;
use crate::clip::{ClipConfig, ClipModel};
use crate::error::Result;
use crate::tokenizer::ClipTokenizer;
use crate::ClassSet;

/// Stand-in for trained adapter values ([`Trainables::perturb`]): the reference initialisation
/// zeroes the up-projections, which leaves every adapter inert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perturb {
    pub seed: u64,
    pub std: f32,
    pub scale_bias: f32,
}

/// How [`random_peclip`] builds its model.
#[derive(Debug, Clone)]
pub struct RandomPeClip {
    pub backbone: ClipConfig,
    pub config: PeClipConfig,
    /// Seed of the backbone and of the trainables' initialisation.
    pub seed: u64,
    /// Build for inference (no gradients recorded), as export and the step benchmark do.
    pub inference: bool,
    pub perturb: Option<Perturb>,
}

/// Write the random backbone to `dir` (an HF-layout CLIP directory, kept for the caller) and build
/// the PE-CLIP on it, with the default classes, on the CPU.
pub fn random_peclip(dir: &Path, r: &RandomPeClip) -> Result<PeClip> {
    random_peclip_on(dir, r, &Device::Cpu)
}

/// [`random_peclip`] on `device` (the same values: the weights are drawn on the CPU).
pub fn random_peclip_on(dir: &Path, r: &RandomPeClip, device: &Device) -> Result<PeClip> {
    write_random_model(dir, &r.backbone, r.seed)?;
    let clip = ClipModel::load(dir, device)?;
    let specs = trainable_specs(&r.config, &clip.config);
    let mut trainables = Trainables::init(specs, r.seed, device)?;
    if r.inference {
        trainables = trainables.into_inference();
    }
    if let Some(p) = r.perturb {
        trainables.perturb(p.seed, p.std, p.scale_bias)?;
    }
    let tok = ClipTokenizer::from_hf_dir(dir)?;
    PeClip::new(
        r.config.clone(),
        clip,
        trainables,
        ClassSet::default(),
        &tok,
    )
}

//! One optimisation step of PE-CLIP: forward a batch of clips, cross-entropy on the logits
//! (mixed with a second label set for Mixup/FMix), backward, AdamW on two parameter groups.

use candle_core::Tensor;

use super::optim::{AdamW, AdamWParams};
use crate::error::Result;
use crate::peclip::{GruMode, PeClip};

/// The two parameter groups of the reference: adapters and the prompt learner.
#[derive(Debug)]
pub struct Optimizers {
    pub adapters: AdamW,
    pub prompts: AdamW,
}

impl Optimizers {
    /// Fresh AdamW optimisers with the given learning rates (weight decay 0.01 for both).
    pub fn new(model: &PeClip, adapter_lr: f64, prompt_lr: f64) -> Result<Self> {
        let mut adapters = Vec::new();
        let mut prompts = Vec::new();
        for spec in &model.trainables.specs {
            let var = model
                .trainables
                .named_vars()
                .find(|(n, _)| *n == spec.name)
                .map(|(_, v)| v.clone())
                .expect("every spec has a variable");
            if spec.part.is_adapter() {
                adapters.push((spec.name.clone(), var));
            } else {
                prompts.push((spec.name.clone(), var));
            }
        }
        Ok(Self {
            adapters: AdamW::new(
                adapters,
                AdamWParams {
                    lr: adapter_lr,
                    ..AdamWParams::default()
                },
            )?,
            prompts: AdamW::new(
                prompts,
                AdamWParams {
                    lr: prompt_lr,
                    ..AdamWParams::default()
                },
            )?,
        })
    }
}

/// Mean cross-entropy of `logits` `[B, C]` against `labels` `[B]`.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let targets = Tensor::new(labels, logits.device())?;
    Ok(candle_nn::loss::cross_entropy(logits, &targets)?)
}

/// One step on `videos` `[B, T, 3, S, S]`: loss `λ·CE(y_a) + (1-λ)·CE(y_b)` (plain CE when
/// `mix` is `None`), backward, both optimisers. Returns the loss value.
pub fn train_step(
    model: &PeClip,
    opt: &mut Optimizers,
    videos: &Tensor,
    labels: &[u32],
    mix: Option<(&[u32], f64)>,
) -> Result<f32> {
    let logits = model.forward(videos, GruMode::PerVideo)?;
    let loss = match mix {
        None => cross_entropy(&logits, labels)?,
        Some((other, lambda)) => {
            ((cross_entropy(&logits, labels)? * lambda)?
                + (cross_entropy(&logits, other)? * (1.0 - lambda))?)?
        }
    };
    let value = loss.to_scalar::<f32>()?;
    let grads = loss.backward()?;
    opt.adapters.step(&grads)?;
    opt.prompts.step(&grads)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peclip::model::tests::{tiny_model, videos};
    use crate::peclip::PeClipConfig;

    /// A few steps on a fixed tiny batch: the loss falls (the fast CI check of learning). Noise
    /// videos through a random backbone give similar features, so the floor is near ln 4; the
    /// run is deterministic and must fall by at least 0.1 nats.
    #[test]
    fn loss_falls_on_a_tiny_batch() {
        let m = tiny_model(PeClipConfig::default(), 21);
        let mut opt = Optimizers::new(&m, 2e-3, 2e-3).unwrap();
        let v = videos(4, 3, 5);
        let labels = [0u32, 3, 4, 6];
        let first = train_step(&m, &mut opt, &v, &labels, None).unwrap();
        let mut last = first;
        for _ in 0..15 {
            last = train_step(&m, &mut opt, &v, &labels, None).unwrap();
        }
        assert!(
            last.is_finite() && last < first - 0.1,
            "loss {first} -> {last}"
        );
        assert_eq!(opt.adapters.step, 16);
    }
}

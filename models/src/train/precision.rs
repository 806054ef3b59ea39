//! Mixed precision: the frozen backbone computes in bf16 or f16 while the trainables, their
//! gradients, the optimiser's moments, LayerNorm, softmax and the loss stay f32; f16's narrow
//! exponent range needs the loss scaled so that small activation gradients do not flush to
//! zero ([`LossScaler`]).

use candle_core::backprop::GradStore;
use candle_core::DType;

use crate::error::{Error, Result};
use crate::peclip::PeClip;

/// The dtype the frozen backbone computes in (`--precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Whether the loss is scaled (f16 only: bf16 has f32's exponent range).
    pub fn scales_loss(self) -> bool {
        self == Precision::F16
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            o => Err(Error::Config(format!(
                "unknown precision {o:?} (f32, bf16 or f16)"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

/// Dynamic loss scaling (PyTorch's `GradScaler` rule): the loss is multiplied by `scale`
/// before backward and the gradients divided by it after; a step whose gradients hold an
/// infinity or NaN is skipped and the scale halved; after `GROWTH_INTERVAL` finite steps in a
/// row it doubles. Without scaling (`scale` 1, never changed) every step is taken.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Finite steps since the last change of scale.
    pub good_steps: u64,
    /// Steps skipped for non-finite gradients.
    pub skipped: u64,
    pub dynamic: bool,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::none()
    }
}

impl LossScaler {
    pub const INITIAL_SCALE: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;

    /// No scaling.
    pub fn none() -> Self {
        Self {
            scale: 1.0,
            good_steps: 0,
            skipped: 0,
            dynamic: false,
        }
    }

    /// The scaler `precision` needs.
    pub fn for_precision(precision: Precision) -> Self {
        if precision.scales_loss() {
            Self {
                scale: Self::INITIAL_SCALE,
                dynamic: true,
                ..Self::none()
            }
        } else {
            Self::none()
        }
    }

    /// After backward on `scale · loss`: unscale the trainables' gradients in `grads` and say
    /// whether the step is to be taken (every gradient finite), updating the scale.
    pub fn unscale(&mut self, model: &PeClip, grads: &mut GradStore) -> Result<bool> {
        if !self.dynamic {
            return Ok(true);
        }
        let mut finite = true;
        for (_, var) in model.trainables.named_vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = (g / self.scale)?;
                // An infinity or NaN anywhere makes the sum of magnitudes non-finite.
                finite &= g.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite();
                grads.insert(var.as_tensor(), g);
            }
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            self.skipped += 1;
        }
        Ok(finite)
    }
}

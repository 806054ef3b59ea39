//! Small building blocks shared by both towers: LayerNorm, Linear, activations.
//!
//! candle's fused LayerNorm and softmax kernels have no backward pass: a trainable tensor upstream
//! would silently get no gradient. So these helpers use the fused kernels only when no gradient
//! can flow (no input is a variable or derived from one) and differentiable primitives otherwise.

use candle_core::{Module, Tensor, D};

use super::config::HiddenAct;
use super::weights::Vb;
use crate::error::Result;

/// `y = (x - mean) / sqrt(var + eps) * weight + bias` over the last axis, in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Load `weight` and `bias` of width `dim`.
    pub fn new(dim: usize, eps: f64, vb: &Vb<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[dim])?,
            bias: vb.get("bias", &[dim])?,
            eps,
        })
    }

    /// Normalise `x` over its last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let eps = self.eps as f32;
        if x.track_op() || self.weight.track_op() || self.bias.track_op() {
            Ok(candle_nn::ops::layer_norm_slow(
                x,
                &self.weight,
                &self.bias,
                eps,
            )?)
        } else {
            Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                eps,
            )?)
        }
    }
}

/// `y = x W^T + b` with PyTorch's `[out, in]` weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Load `weight` `[out, in]` and, if `bias`, `bias` `[out]`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: &Vb<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[out_dim, in_dim])?,
            bias: if bias {
                Some(vb.get("bias", &[out_dim])?)
            } else {
                None
            },
        })
    }

    /// Apply to `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let lin = candle_nn::Linear::new(self.weight.clone(), self.bias.clone());
        Ok(lin.forward(x)?)
    }
}

/// Apply CLIP's MLP activation.
pub fn activation(act: HiddenAct, x: &Tensor) -> Result<Tensor> {
    Ok(match act {
        HiddenAct::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        HiddenAct::Gelu => x.gelu_erf()?,
        HiddenAct::GeluNew => x.gelu()?,
    })
}

/// Softmax over the last axis (differentiable whenever `x` carries a gradient).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    }
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        return Err(crate::error::Error::Config(format!(
            "cannot compare shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn input() -> Tensor {
        let v: Vec<f32> = (0..2 * 3 * 8)
            .map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.2)
            .collect();
        Tensor::from_vec(v, (2, 3, 8), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn fused_and_differentiable_paths_agree_and_carry_gradients() {
        let w: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 * 0.1).collect();
        let ln = LayerNorm {
            weight: Tensor::from_vec(w, 8, &Device::Cpu).unwrap(),
            bias: Tensor::full(0.3f32, 8, &Device::Cpu).unwrap(),
            eps: 1e-5,
        };
        let x = input();
        let var = Var::from_tensor(&x).unwrap();
        let fused = ln.forward(&x).unwrap();
        let tracked = ln.forward(var.as_tensor()).unwrap();
        assert!(!fused.track_op() && tracked.track_op());
        assert!(max_diff(&fused, &tracked) < 1e-5);
        let sm_fused = softmax_last(&x).unwrap();
        let sm_tracked = softmax_last(var.as_tensor()).unwrap();
        assert!(max_diff(&sm_fused, &sm_tracked) < 1e-6);

        // A loss through both ops gives the variable a finite, non-zero gradient.
        let loss = (softmax_last(&tracked).unwrap() * &x)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .expect("gradient reaches the input");
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
        assert!(g.iter().any(|v| v.abs() > 1e-6));
    }
}

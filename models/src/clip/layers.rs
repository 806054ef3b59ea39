//! Small building blocks shared by both towers: LayerNorm, Linear, activations.
//!
//! candle's fused LayerNorm and softmax kernels have no backward pass: a trainable tensor upstream
//! would silently get no gradient. So these helpers use the fused kernels only when no gradient
//! can flow (no input is a variable or derived from one) and differentiable primitives otherwise.

use candle_core::{DType, Module, Tensor, D};

use super::config::HiddenAct;
use super::weights::Vb;
use crate::error::Result;

/// `y = (x - mean) / sqrt(var + eps) * weight + bias` over the last axis, in f32 whatever `x`'s
/// dtype (the result has `x`'s: a bf16 or f16 backbone normalises its activations in f32).
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
        let dt = x.dtype();
        let x = &x.to_dtype(self.weight.dtype())?;
        let y = if x.track_op() || self.weight.track_op() || self.bias.track_op() {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, eps)?
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, eps)?
        };
        Ok(y.to_dtype(dt)?)
    }
}

/// `y = x W^T + b` with PyTorch's `[out, in]` weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// The same linear with its weight and bias in `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_dtype(dtype)?,
            bias: self.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()?,
        })
    }

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
    ///
    /// A frozen weight (one that is no variable and derives from none) applied to a tensor
    /// that carries a gradient goes through [`FrozenLinear`]: candle's matmul backward would
    /// also compute the weight's gradient `x^T dy`, a second matmul of the forward's size per
    /// linear, and keep it to the end of the backward pass.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let frozen = !self.weight.track_op() && !self.bias.as_ref().is_some_and(|b| b.track_op());
        if frozen && x.track_op() {
            return FrozenLinear::apply(&self.weight, self.bias.as_ref(), x);
        }
        let lin = candle_nn::Linear::new(self.weight.clone(), self.bias.clone());
        Ok(lin.forward(x)?)
    }
}

/// `y = x W^T + b` as one custom op whose backward is only `dx = dy W`: no gradient for the
/// frozen `W` and `b`. The forward is the same matmul and broadcast add candle's `Linear` runs
/// (bit-identical outputs), on the backend's storage.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    /// `[out, in]`.
    weight: Tensor,
    /// `W^T`, `[in, out]` (a strided view of `weight`).
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// `x W^T + b` for `x` `[..., in]`, differentiable in `x` only.
    pub fn apply(weight: &Tensor, bias: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (&k, lead) = dims
            .split_last()
            .ok_or_else(|| crate::error::Error::Config("a linear of a scalar".into()))?;
        let m: usize = lead.iter().product();
        let op = FrozenLinear {
            weight: weight.clone(),
            weight_t: weight.t()?,
            bias: bias.cloned(),
        };
        let y = x.contiguous()?.reshape((m, k))?.apply_op1(op)?;
        let mut out = lead.to_vec();
        out.push(y.dim(1)?);
        Ok(y.reshape(out)?)
    }

    fn fwd<S: candle_core::backend::BackendStorage>(
        &self,
        x: &S,
        xl: &candle_core::Layout,
        pick: impl Fn(&candle_core::Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, candle_core::Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (ws, wl) = self.weight_t.storage_and_layout();
        let w = pick(&ws).ok_or_else(|| {
            candle_core::Error::Msg("frozen linear: weight on another device".into())
        })?;
        let n = wl.dims()[1];
        let y = x.matmul(w, (1, m, n, k), xl, wl)?;
        let Some(bias) = &self.bias else {
            return Ok((y, (m, n).into()));
        };
        let (bs, bl) = bias.storage_and_layout();
        let b = pick(&bs).ok_or_else(|| {
            candle_core::Error::Msg("frozen linear: bias on another device".into())
        })?;
        let y = y.binary_impl::<candle_core::op::Add>(
            b,
            &candle_core::Layout::contiguous((m, n)),
            &bl.broadcast_as((m, n))?,
        )?;
        Ok((y, (m, n).into()))
    }
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.fwd(x, layout, |s| match s {
            candle_core::Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.fwd(x, layout, |s| match s {
            candle_core::Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.weight)?))
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

/// Softmax over the last axis (differentiable whenever `x` carries a gradient), in f32 whatever
/// `x`'s dtype (the result has `x`'s).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let x = &x.to_dtype(DType::F32)?;
    let y = if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)?
    };
    Ok(y.to_dtype(dt)?)
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

    /// A frozen linear on a tracked input: the same output as candle's `Linear` (bit for bit),
    /// the same input gradient, and no gradient for the weight or bias.
    #[test]
    fn frozen_linear_differentiates_only_its_input() {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..5 * 8)
            .map(|i| ((i * 13) % 7) as f32 * 0.2 - 0.6)
            .collect();
        let lin = Linear {
            weight: Tensor::from_vec(w, (5, 8), &dev).unwrap(),
            bias: Some(Tensor::from_vec(vec![0.1f32, -0.2, 0.3, 0.0, 0.5], 5, &dev).unwrap()),
        };
        let var = Var::from_tensor(&input()).unwrap();
        let x = (var.as_tensor() * 1.5).unwrap();
        let y = lin.forward(&x).unwrap();
        let plain = candle_nn::Linear::new(lin.weight.clone(), lin.bias.clone());
        let want = candle_core::Module::forward(&plain, &x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 5]);
        assert_eq!(max_diff(&y, &want), 0.0);
        let probe = Tensor::from_vec(
            (0..30)
                .map(|i| (i as f32 * 0.37).sin())
                .collect::<Vec<f32>>(),
            (2, 3, 5),
            &dev,
        )
        .unwrap();
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_want = (&want * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = g.get(var.as_tensor()).unwrap();
        assert!(max_diff(gx, g_want.get(var.as_tensor()).unwrap()) < 1e-6);
        // What the backward pass leaves: the gradients of the input (48) and of the constant
        // probe (30, candle fills every operand's); candle's path also leaves 40 elements for
        // the transposed weight and 30 for the broadcast bias.
        let left = |g: &candle_core::backprop::GradStore| -> usize {
            let ids: Vec<_> = g.get_ids().copied().collect();
            ids.iter()
                .map(|id| g.get_id(*id).unwrap().elem_count())
                .sum()
        };
        assert_eq!(left(&g), 48 + 30);
        assert_eq!(left(&g_want), 48 + 30 + 40 + 30);
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

//! The Temporal Dynamic Adapter (TDA) after the MLP of every vision block (reference 3.1, 3.2):
//!
//! ```text
//! Z = LN_a(M);  s = ReLU(w_s Z + b_s)            # one scalar per token per frame
//! H = GRU(W_d Z + b_d)  over the frames of one video, per token row, h0 = 0
//! M' = M + s ⊙ (W_u GELU_erf(H) + b_u)           # block: X = X + M'
//! ```
//!
//! Input `M` is `[N, L, D]` with `N = B·T` frames, video-major. The cell and the position of the
//! scale are configurable (paper Tables 7, 8); with no cell the TDA is a plain bottleneck adapter.

use candle_core::{Tensor, D};

use super::super::config::{ScaleAt, TemporalCell};
use super::super::params::Trainables;
use super::shared::{trainable_linear, Adapter};
use crate::clip::layers::{LayerNorm, Linear};
use crate::error::Result;

/// PyTorch-convention recurrent weights (`weight_ih_l0` `[G·H, H]`, ..., gate blocks stacked).
#[derive(Debug, Clone)]
pub struct CellWeights {
    pub w_ih: Tensor,
    pub w_hh: Tensor,
    pub b_ih: Tensor,
    pub b_hh: Tensor,
}

/// The recurrent state of a cell: `h`, and `c` for an LSTM. Each `[.., H]`.
#[derive(Debug, Clone)]
pub struct CellState {
    pub h: Tensor,
    pub c: Option<Tensor>,
}

/// The TDA of one block.
#[derive(Debug, Clone)]
pub enum TemporalAdapter {
    /// LN, dynamic scale, down, recurrent cell, GELU, up.
    Recurrent {
        ln: LayerNorm,
        scale: Linear,
        down: Linear,
        up: Linear,
        cell: TemporalCell,
        weights: CellWeights,
        scale_at: ScaleAt,
    },
    /// `M + up(GELU(down(M)))` (Table 8's vanilla adapter).
    Plain(Adapter),
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(x)?)
}

impl CellWeights {
    /// Hidden width.
    pub fn hidden(&self) -> Result<usize> {
        Ok(self.w_hh.dim(1)?)
    }

    /// `x W_ih^T + b_ih` for all inputs at once (`[.., H] -> [.., G·H]`).
    pub fn input_gates(&self, x: &Tensor) -> Result<Tensor> {
        Linear {
            weight: self.w_ih.clone(),
            bias: Some(self.b_ih.clone()),
        }
        .forward(x)
    }

    /// One step of `cell` from precomputed input gates `gi` `[.., G·H]` and state.
    pub fn step(&self, cell: TemporalCell, gi: &Tensor, state: &CellState) -> Result<CellState> {
        let hd = self.hidden()?;
        let gh = Linear {
            weight: self.w_hh.clone(),
            bias: Some(self.b_hh.clone()),
        }
        .forward(&state.h)?;
        let chunk = |t: &Tensor, i: usize| t.narrow(D::Minus1, i * hd, hd);
        Ok(match cell {
            TemporalCell::Gru => {
                // PyTorch gate order r, z, n; the reset gate multiplies (W_hn h + b_hn).
                let r = sigmoid(&(chunk(gi, 0)? + chunk(&gh, 0)?)?)?;
                let z = sigmoid(&(chunk(gi, 1)? + chunk(&gh, 1)?)?)?;
                let n = (chunk(gi, 2)? + (r * chunk(&gh, 2)?)?)?.tanh()?;
                // h' = (1 - z) ⊙ n + z ⊙ h = n + z ⊙ (h - n)
                let h = (&n + (z * (&state.h - &n)?)?)?;
                CellState { h, c: None }
            }
            TemporalCell::Rnn => CellState {
                h: (gi + gh)?.tanh()?,
                c: None,
            },
            TemporalCell::Lstm => {
                // PyTorch gate order i, f, g, o.
                let g = (gi + gh)?;
                let i = sigmoid(&chunk(&g, 0)?)?;
                let f = sigmoid(&chunk(&g, 1)?)?;
                let c_new = chunk(&g, 2)?.tanh()?;
                let o = sigmoid(&chunk(&g, 3)?)?;
                let c_prev = match &state.c {
                    Some(c) => c.clone(),
                    None => state.h.zeros_like()?,
                };
                let c = ((f * c_prev)? + (i * c_new)?)?;
                let h = (o * c.tanh()?)?;
                CellState { h, c: Some(c) }
            }
            TemporalCell::None => state.clone(),
        })
    }
}

impl TemporalAdapter {
    /// The TDA whose tensors are under `{prefix}` (`adapter_pre_mlp` of a vision block).
    pub fn new(
        t: &Trainables,
        prefix: &str,
        cell: TemporalCell,
        scale_at: ScaleAt,
    ) -> Result<Self> {
        if cell == TemporalCell::None {
            return Ok(TemporalAdapter::Plain(Adapter::new(t, prefix)?));
        }
        Ok(TemporalAdapter::Recurrent {
            ln: LayerNorm {
                weight: t.get(&format!("{prefix}.adapter_layer_norm_before.weight"))?,
                bias: t.get(&format!("{prefix}.adapter_layer_norm_before.bias"))?,
                eps: 1e-5,
            },
            scale: trainable_linear(t, &format!("{prefix}.scale"))?,
            down: trainable_linear(t, &format!("{prefix}.down_proj"))?,
            up: trainable_linear(t, &format!("{prefix}.up_proj"))?,
            cell,
            weights: CellWeights {
                w_ih: t.get(&format!("{prefix}.rnn.weight_ih_l0"))?,
                w_hh: t.get(&format!("{prefix}.rnn.weight_hh_l0"))?,
                b_ih: t.get(&format!("{prefix}.rnn.bias_ih_l0"))?,
                b_hh: t.get(&format!("{prefix}.rnn.bias_hh_l0"))?,
            },
            scale_at,
        })
    }

    /// The zero state for `rows` token rows of `batch` sequences: `[batch, rows, H]`.
    pub fn zero_state(&self, batch: usize, rows: usize, m: &Tensor) -> Result<Option<CellState>> {
        match self {
            TemporalAdapter::Plain(_) => Ok(None),
            TemporalAdapter::Recurrent { weights, cell, .. } => {
                let hd = weights.hidden()?;
                let h = Tensor::zeros((batch, rows, hd), m.dtype(), m.device())?;
                let c = (*cell == TemporalCell::Lstm).then(|| h.clone());
                Ok(Some(CellState { h, c }))
            }
        }
    }

    /// `M'` for `m` `[S·T, L, D]` holding `S` sequences of `T` steps each (sequence-major),
    /// starting every sequence from `state` (`[S, L, H]`, zeros for h0 = 0). Returns `M'` and
    /// the state after the last step. The adapter computes in f32 (its trainables') whatever
    /// `m`'s dtype, the residual sum included; `M'` has `m`'s dtype, the state is f32.
    pub fn forward(
        &self,
        m: &Tensor,
        sequences: usize,
        state: Option<CellState>,
    ) -> Result<(Tensor, Option<CellState>)> {
        let dt = m.dtype();
        if dt != candle_core::DType::F32 {
            let (out, st) =
                self.forward(&m.to_dtype(candle_core::DType::F32)?, sequences, state)?;
            return Ok((out.to_dtype(dt)?, st));
        }
        let (n, l, _) = m.dims3()?;
        let (ln, scale, down, up, cell, weights, scale_at) = match self {
            TemporalAdapter::Plain(a) => return Ok(((m + a.delta(m)?)?, None)),
            TemporalAdapter::Recurrent {
                ln,
                scale,
                down,
                up,
                cell,
                weights,
                scale_at,
            } => (ln, scale, down, up, *cell, weights, *scale_at),
        };
        let steps = n / sequences;
        let z = ln.forward(m)?;
        let s = scale.forward(&z)?.relu()?; // [N, L, 1]
        let mut d = down.forward(&z)?; // [N, L, H]
        if scale_at == ScaleAt::Input {
            d = d.broadcast_mul(&s)?;
        }
        let hd = weights.hidden()?;
        let gi = weights.input_gates(&d)?; // [N, L, G·H]
        let g = gi.dim(D::Minus1)?;
        let gi = gi.reshape((sequences, steps, l, g))?;
        let mut st = match state {
            Some(st) => st,
            None => self
                .zero_state(sequences, l, m)?
                .expect("recurrent adapters have a state"),
        };
        let mut outs = Vec::with_capacity(steps);
        for t in 0..steps {
            let gt = gi.narrow(1, t, 1)?.squeeze(1)?;
            st = weights.step(cell, &gt, &st)?;
            outs.push(st.h.clone());
        }
        let h = Tensor::stack(&outs, 1)?.reshape((n, l, hd))?;
        let h = if scale_at == ScaleAt::GruOutput {
            h.broadcast_mul(&s)?
        } else {
            h
        };
        let u = up.forward(&h.gelu_erf()?)?;
        let u = if scale_at == ScaleAt::PostUp {
            u.broadcast_mul(&s)?
        } else {
            u
        };
        Ok(((m + u)?, Some(st)))
    }
}

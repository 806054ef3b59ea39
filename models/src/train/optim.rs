//! AdamW with PyTorch's semantics (decoupled weight decay, bias-corrected moments), with its state
//! exposed so that a checkpoint can carry it and `--resume` continues exactly.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

/// Hyper-parameters of one parameter group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// PyTorch's defaults except the reference's weight decay of 0.01.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over a named set of variables.
#[derive(Debug)]
pub struct AdamW {
    pub params: AdamWParams,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    /// A fresh optimiser (zero moments) over `vars`.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            params,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// One update from `grads`; variables without a gradient are left alone.
    ///
    /// `p ← p - lr·wd·p`, `m ← β1 m + (1-β1) g`, `v ← β2 v + (1-β2) g²`,
    /// `p ← p - lr · (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + eps)`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - p.beta1.powi(t), 1.0 - p.beta2.powi(t));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let decayed = (var.as_tensor() * (1.0 - p.lr * p.weight_decay))?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
            var.set(&(decayed - (update * p.lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments by variable name (`{name}.exp_avg`, `{name}.exp_avg_sq`), for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("{name}.exp_avg"), self.m[i].clone());
            out.insert(format!("{name}.exp_avg_sq"), self.v[i].clone());
        }
        out
    }

    /// Restore moments saved by [`state`](Self::state) and the step count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (suffix, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let key = format!("{name}.{suffix}");
                let t = state.get(&key).ok_or_else(|| {
                    crate::error::Error::Config(format!("optimizer state lacks {key}"))
                })?;
                if t.dims() != var.dims() {
                    return Err(crate::error::Error::Config(format!(
                        "optimizer state {key} has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                *slot = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps on f(p) = sum((p - 3)^2) against values computed by hand with PyTorch's formula.
    #[test]
    fn matches_the_pytorch_update() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let params = AdamWParams {
            lr: 0.1,
            weight_decay: 0.01,
            ..AdamWParams::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], params).unwrap();
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            let loss = (p.as_tensor() - 3.0)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            for i in 0..2 {
                let g = 2.0 * (want[i] - 3.0);
                want[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                want[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!(
                (f64::from(got[i]) - want[i]).abs() < 1e-5,
                "{got:?} vs {want:?}"
            );
        }
        assert_eq!(opt.step, 2);
        assert_eq!(opt.state().len(), 2);
    }
}

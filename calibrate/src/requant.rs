//! New activation ranges for an already-quantized linear layer, without its f32 weights.
//!
//! [`crate::int8::quantize`] writes each int8 layer as
//! `QuantizeLinear(s_x) → MatMulInteger(W_q) → Add(b_q) → Cast → Mul(r)` with `r = s_x·s_w` and
//! `b_q = round(b / r)`. The weights `W_q` and their scales `s_w` do not depend on the
//! activations, so a new input threshold only changes three constants:
//!
//! ```text
//! s_x' = threshold / 127,   r' = s_w·s_x' = r·s_x'/s_x,   b_q' = round(b_q·s_x/s_x')
//! ```
//!
//! which is what the device needs to re-calibrate a package for its own camera: the result
//! equals quantizing the original f32 layer at the new threshold, up to the rounding of the bias
//! already stored (at most one step of the old accumulator scale).

use serde::{Deserialize, Serialize};

use crate::quant::scale_for;

/// The activation-dependent constants of one int8 linear layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteScales {
    /// `QuantizeLinear`'s input scale `s_x`.
    pub x_scale: f32,
    /// The output rescale `s_x·s_w`: one value (per-tensor weights) or one per output column.
    pub rescale: Vec<f32>,
    /// The bias in accumulator units, when it was folded into the integer add.
    pub bias_q: Option<Vec<i32>>,
}

impl SiteScales {
    /// The weight scales `s_w = r / s_x`.
    pub fn weight_scales(&self) -> Vec<f32> {
        self.rescale.iter().map(|r| r / self.x_scale).collect()
    }

    /// The f32 bias the integer one stands for (`b = b_q·r`).
    pub fn bias(&self) -> Option<Vec<f32>> {
        self.bias_q.as_ref().map(|b| {
            b.iter()
                .enumerate()
                .map(|(j, &q)| (q as f64 * self.rescale_at(j) as f64) as f32)
                .collect()
        })
    }

    fn rescale_at(&self, column: usize) -> f32 {
        if self.rescale.len() == 1 {
            self.rescale[0]
        } else {
            self.rescale[column]
        }
    }

    /// Whether the constants are usable: positive finite scales, bias length matching a
    /// per-column rescale.
    pub fn is_valid(&self) -> bool {
        let ok = |s: &f32| s.is_finite() && *s > 0.0;
        ok(&self.x_scale)
            && !self.rescale.is_empty()
            && self.rescale.iter().all(ok)
            && match (&self.bias_q, self.rescale.len()) {
                (Some(b), n) if n > 1 => b.len() == n,
                _ => true,
            }
    }

    /// The constants for input threshold `threshold` (the largest |x| mapped to ±127).
    pub fn with_threshold(&self, threshold: f32) -> SiteScales {
        let sx = scale_for(threshold);
        let ratio = self.x_scale as f64 / sx as f64;
        SiteScales {
            x_scale: sx,
            rescale: self
                .rescale
                .iter()
                .map(|&r| (r as f64 / ratio) as f32)
                .collect(),
            bias_q: self.bias_q.as_ref().map(|b| {
                b.iter()
                    .map(|&q| {
                        (q as f64 * ratio)
                            .round()
                            .clamp(i32::MIN as f64 / 2.0, i32::MAX as f64 / 2.0)
                            as i32
                    })
                    .collect()
            }),
        }
    }

    /// The input threshold these constants encode (`127·s_x`).
    pub fn threshold(&self) -> f32 {
        self.x_scale * crate::quant::QMAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Data, ElemType, Graph, LinearOpts};
    use crate::int8::{quantize, LinearRanges};
    use std::collections::HashMap;

    fn scales_of(g: &Graph, n: &str) -> SiteScales {
        let f = |name: String| match &g.constant_named(&name).unwrap().data {
            Data::F32(v) => v.clone(),
            other => panic!("{name}: {other:?}"),
        };
        SiteScales {
            x_scale: f(format!("{n}.x_scale"))[0],
            rescale: f(format!("{n}.rescale")),
            bias_q: g
                .constant_named(&format!("{n}.bias_q"))
                .map(|c| match &c.data {
                    Data::I32(v) => v.clone(),
                    other => panic!("{other:?}"),
                }),
        }
    }

    /// Re-scaling a layer quantized at one threshold gives what quantizing the f32 layer at the
    /// new threshold gives (bias within one step), for per-tensor and per-column weights.
    #[test]
    fn rescaling_matches_quantizing_at_the_new_threshold() {
        let w: Vec<f32> = (0..12)
            .map(|k| ((k * 7 % 11) as f32 - 5.0) * 0.13)
            .collect();
        let b = [0.31f32, -1.7, 0.02];
        let mut g = Graph::new("t");
        let x = g.input("x", ElemType::F32, &[1, 4]);
        let y = g.linear(
            &x,
            "fc",
            &w,
            3,
            4,
            LinearOpts {
                bias: Some(&b),
                quantizable: true,
            },
        );
        g.output(&y, "y", ElemType::F32, Some(&[1, 3]));
        for per_channel in [false, true] {
            let at = |t: f32| {
                let r = HashMap::from([("fc".to_string(), LinearRanges { input: t })]);
                scales_of(&quantize(&g, &r, per_channel).0, "fc")
            };
            let old = at(2.5);
            assert!(old.is_valid());
            assert!((old.threshold() - 2.5).abs() < 1e-6);
            for t in [0.4f32, 2.5, 9.0, 130.0] {
                let want = at(t);
                let got = old.with_threshold(t);
                assert_eq!(got.x_scale, want.x_scale, "{per_channel} {t}");
                for (a, b) in got.rescale.iter().zip(&want.rescale) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs(),
                        "{per_channel} {t}: {a} {b}"
                    );
                }
                let (gb, wb) = (got.bias_q.clone().unwrap(), want.bias_q.unwrap());
                for (a, b) in gb.iter().zip(&wb) {
                    // The old bias was rounded at the old scale: at most one old step off.
                    let step = (2.5 / t).max(1.0).ceil() as i32;
                    assert!((a - b).abs() <= step, "{per_channel} {t}: {gb:?} vs {wb:?}");
                }
                // The f32 bias it stands for stays the layer's bias.
                for (a, b) in got.bias().unwrap().iter().zip(&b) {
                    assert!((a - b).abs() < 2.0 * got.rescale[0].max(old.rescale[0]) + 1e-6);
                }
            }
        }
    }

    #[test]
    fn invalid_constants_are_recognised() {
        let ok = SiteScales {
            x_scale: 0.1,
            rescale: vec![0.01, 0.02],
            bias_q: Some(vec![1, 2]),
        };
        assert!(ok.is_valid());
        for bad in [
            SiteScales {
                x_scale: 0.0,
                ..ok.clone()
            },
            SiteScales {
                rescale: vec![f32::NAN],
                ..ok.clone()
            },
            SiteScales {
                bias_q: Some(vec![1, 2, 3]),
                ..ok.clone()
            },
            SiteScales {
                rescale: Vec::new(),
                ..ok.clone()
            },
        ] {
            assert!(!bad.is_valid(), "{bad:?}");
        }
    }
}

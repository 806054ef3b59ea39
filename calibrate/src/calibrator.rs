//! Calibration statistics of a graph's linear layers, gathered from the values a runtime computes
//! on calibration frames ("taps": each quantizable layer's input).

use std::collections::HashMap;

use crate::equalize::smooth_factors;
use crate::graph::{Data, Graph};
use crate::int8::LinearRanges;
use crate::observer::{Observer, ObserverKind};

#[derive(Debug, Clone)]
struct LayerStats {
    name: String,
    in_dim: usize,
    x: Observer,
    x_channels: Vec<f32>,
}

/// A linear layer to observe: its name, the value that feeds it and that value's width.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerInput {
    pub layer: String,
    pub input: String,
    pub in_dim: usize,
}

/// Observers of the inputs of every quantizable linear layer of a graph (the int8 form keeps
/// outputs in f32, so only inputs need ranges).
#[derive(Debug, Clone)]
pub struct Calibrator {
    layers: Vec<LayerStats>,
    by_value: HashMap<String, Vec<usize>>,
    /// Whether per-channel input ranges are tracked (SmoothQuant needs them; re-calibration
    /// does not).
    channels: bool,
}

impl Calibrator {
    /// Observers of `kind` for the quantizable layers of `graph`.
    pub fn new(graph: &Graph, kind: ObserverKind) -> Self {
        let layers: Vec<LayerInput> = graph
            .linears
            .iter()
            .filter(|l| l.quantizable)
            .map(|l| LayerInput {
                layer: l.name.clone(),
                input: l.input.clone(),
                in_dim: l.in_dim,
            })
            .collect();
        Self::for_layers(&layers, kind)
    }

    /// Observers of `kind` for the inputs of `layers` (e.g. the int8 layers of a packaged
    /// model, whose f32 graph is gone).
    pub fn for_layers(layers: &[LayerInput], kind: ObserverKind) -> Self {
        let mut stats = Vec::new();
        let mut by_value: HashMap<String, Vec<usize>> = HashMap::new();
        for l in layers {
            by_value
                .entry(l.input.clone())
                .or_default()
                .push(stats.len());
            stats.push(LayerStats {
                name: l.layer.clone(),
                in_dim: l.in_dim,
                x: Observer::new(kind),
                x_channels: vec![0.0; l.in_dim],
            });
        }
        Self {
            layers: stats,
            by_value,
            channels: true,
        }
    }

    /// Do not track per-channel input ranges ([`Calibrator::input_channel_absmax`] stays zero):
    /// half the work per observed value.
    pub fn without_channel_ranges(mut self) -> Self {
        self.channels = false;
        self
    }

    /// The values to tap, each once.
    pub fn taps(&self) -> Vec<String> {
        let mut t: Vec<String> = self.by_value.keys().cloned().collect();
        t.sort();
        t
    }

    /// Record the value `name` computed on one frame (row-major, last axis = channels).
    pub fn observe(&mut self, name: &str, data: &[f32]) {
        let Some(targets) = self.by_value.get(name) else {
            return;
        };
        for &k in targets {
            let l = &mut self.layers[k];
            l.x.observe(data);
            if !self.channels {
                continue;
            }
            for row in data.chunks_exact(l.in_dim.max(1)) {
                for (m, v) in l.x_channels.iter_mut().zip(row) {
                    if v.is_finite() {
                        *m = m.max(v.abs());
                    }
                }
            }
        }
    }

    /// The chosen input threshold of every layer that saw data.
    pub fn ranges(&self) -> HashMap<String, LinearRanges> {
        self.layers
            .iter()
            .filter(|l| l.x.count() > 0)
            .map(|l| {
                (
                    l.name.clone(),
                    LinearRanges {
                        input: l.x.threshold(),
                    },
                )
            })
            .collect()
    }

    /// The largest |input| per input channel of every layer.
    pub fn input_channel_absmax(&self) -> HashMap<String, Vec<f32>> {
        self.layers
            .iter()
            .map(|l| (l.name.clone(), l.x_channels.clone()))
            .collect()
    }
}

/// SmoothQuant factors for the layers of `graph` that read a LayerNorm output (their norm's affine
/// can absorb them), from the calibration per-channel input ranges and the weights' per-input-row
/// ranges.
pub fn smoothing_factors(
    graph: &Graph,
    input_absmax: &HashMap<String, Vec<f32>>,
    alpha: f32,
) -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    for l in graph
        .linears
        .iter()
        .filter(|l| l.quantizable && l.after_norm)
    {
        let (Some(a), Some(Data::F32(w))) = (
            input_absmax.get(&l.name),
            graph.constant_named(&l.weight).map(|c| &c.data),
        ) else {
            continue;
        };
        // Weight stored [in, out]: input channel j is row j.
        let wmax: Vec<f32> = w
            .chunks_exact(l.out_dim.max(1))
            .map(|row| row.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        out.insert(l.name.clone(), smooth_factors(a, &wmax, alpha));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{ElemType, LinearOpts};

    #[test]
    fn calibrator_taps_layer_inputs_once_and_tracks_channel_ranges() {
        let mut g = Graph::new("t");
        let x = g.input("x", ElemType::F32, &[1, 2]);
        for name in ["a", "b"] {
            g.linear(
                &x,
                name,
                &[2.0, 0.0, 0.0, 0.5], // [out, in]
                2,
                2,
                LinearOpts {
                    quantizable: true,
                    ..LinearOpts::default()
                },
            );
        }
        let mut cal = Calibrator::new(&g, ObserverKind::MinMax);
        assert_eq!(cal.taps(), vec!["x".to_string()]);
        cal.observe("x", &[1.0, -3.0]);
        cal.observe("x", &[2.0, 0.5]);
        cal.observe("unrelated", &[100.0, 100.0]);
        let r = cal.ranges();
        assert_eq!(r["a"].input, 3.0);
        assert_eq!(r["b"].input, 3.0);
        assert_eq!(cal.input_channel_absmax()["a"], vec![2.0, 3.0]);
    }
}

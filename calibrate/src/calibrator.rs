//! Calibration statistics of a graph's linear layers, gathered from the values a runtime computes
//! on calibration frames ("taps": each layer's input and matmul output).

use std::collections::HashMap;

use crate::equalize::smooth_factors;
use crate::graph::{Data, Graph, LinearRanges};
use crate::observer::{Observer, ObserverKind};

/// Per-output-channel factors `c_j = max|W[:, j]| / max|W|` of a weight stored `[in, out]`
/// (floored at 1e-3 so a dead column stays representable). Dividing column `j` by `c_j` gives every
/// column the same range, so one per-tensor int8 scale serves them all as per-channel scales
/// would; multiplying the output by `c_j` afterwards restores the function.
pub fn column_scales(w: &[f32], in_dim: usize, out_dim: usize) -> Vec<f32> {
    assert_eq!(w.len(), in_dim * out_dim, "weight size");
    let mut col = vec![0f32; out_dim];
    for row in w.chunks_exact(out_dim.max(1)) {
        for (c, v) in col.iter_mut().zip(row) {
            *c = c.max(v.abs());
        }
    }
    let top = col.iter().fold(0f32, |m, &v| m.max(v));
    if top == 0.0 {
        return vec![1.0; out_dim];
    }
    col.iter().map(|&c| (c / top).max(1e-3)).collect()
}

#[derive(Debug, Clone)]
struct LayerStats {
    name: String,
    out_dim: usize,
    in_dim: usize,
    /// Column factors the output is observed (and later quantized) divided by.
    col: Option<Vec<f32>>,
    x: Observer,
    y: Observer,
    x_channels: Vec<f32>,
}

/// Which statistic a tapped value feeds.
#[derive(Debug, Clone, Copy)]
enum Side {
    Input,
    Output,
}

/// Observers for every quantizable linear layer of a graph.
#[derive(Debug, Clone)]
pub struct Calibrator {
    layers: Vec<LayerStats>,
    by_value: HashMap<String, Vec<(usize, Side)>>,
    frames: usize,
}

impl Calibrator {
    /// Observers of `kind` for the quantizable layers of `graph`; with `column_scaling`, outputs
    /// are observed divided by [`column_scales`] of the layer's weight.
    pub fn new(graph: &Graph, kind: ObserverKind, column_scaling: bool) -> Self {
        let mut layers = Vec::new();
        let mut by_value: HashMap<String, Vec<(usize, Side)>> = HashMap::new();
        for l in graph.linears.iter().filter(|l| l.quantizable) {
            let col = if column_scaling {
                match graph.constant_named(&l.weight).map(|c| &c.data) {
                    Some(Data::F32(w)) => Some(column_scales(w, l.in_dim, l.out_dim)),
                    _ => None,
                }
            } else {
                None
            };
            let k = layers.len();
            by_value
                .entry(l.input.clone())
                .or_default()
                .push((k, Side::Input));
            by_value
                .entry(l.matmul_out.clone())
                .or_default()
                .push((k, Side::Output));
            layers.push(LayerStats {
                name: l.name.clone(),
                out_dim: l.out_dim,
                in_dim: l.in_dim,
                col,
                x: Observer::new(kind),
                y: Observer::new(kind),
                x_channels: vec![0.0; l.in_dim],
            });
        }
        Self {
            layers,
            by_value,
            frames: 0,
        }
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
        for &(k, side) in targets {
            let l = &mut self.layers[k];
            match side {
                Side::Input => {
                    l.x.observe(data);
                    for row in data.chunks_exact(l.in_dim.max(1)) {
                        for (m, v) in l.x_channels.iter_mut().zip(row) {
                            if v.is_finite() {
                                *m = m.max(v.abs());
                            }
                        }
                    }
                }
                Side::Output => match &l.col {
                    Some(c) => {
                        let scaled: Vec<f32> = data
                            .chunks_exact(l.out_dim.max(1))
                            .flat_map(|row| row.iter().zip(c).map(|(v, c)| v / c))
                            .collect();
                        l.y.observe(&scaled);
                    }
                    None => l.y.observe(data),
                },
            }
        }
    }

    /// Count one calibration frame (for the report).
    pub fn frame_done(&mut self) {
        self.frames += 1;
    }

    /// Frames observed.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// The chosen input and output thresholds of every layer that saw data.
    pub fn ranges(&self) -> HashMap<String, LinearRanges> {
        self.layers
            .iter()
            .filter(|l| l.x.count() > 0 && l.y.count() > 0)
            .map(|l| {
                (
                    l.name.clone(),
                    LinearRanges {
                        input: l.x.threshold(),
                        output: l.y.threshold(),
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
    fn column_scales_equalise_column_ranges() {
        // [in = 2, out = 3]
        let w = [1.0, -0.1, 0.0, -4.0, 0.2, 0.0];
        let c = column_scales(&w, 2, 3);
        assert_eq!(c, vec![1.0, 0.05, 1e-3]);
    }

    #[test]
    fn calibrator_taps_inputs_and_outputs_and_scales_outputs_by_columns() {
        let mut g = Graph::new("t");
        let x = g.input("x", ElemType::F32, &[1, 2]);
        g.linear(
            &x,
            "a",
            &[2.0, 0.0, 0.0, 0.5], // [out, in]
            2,
            2,
            LinearOpts {
                quantizable: true,
                ..LinearOpts::default()
            },
        );
        let mut cal = Calibrator::new(&g, ObserverKind::MinMax, true);
        assert_eq!(cal.taps(), vec!["a.matmul".to_string(), "x".to_string()]);
        cal.observe("x", &[1.0, -3.0]);
        cal.observe("a.matmul", &[2.0, -1.5]);
        let r = cal.ranges()["a"];
        assert_eq!(r.input, 3.0);
        // Columns scale 1 and 0.25: outputs observed as 2 and -6.
        assert_eq!(r.output, 6.0);
        assert_eq!(cal.input_channel_absmax()["a"], vec![1.0, 3.0]);
    }
}

//! Symmetric int8 quantization: `q = clamp(round(x / scale), -127, 127)`, zero point 0.
//!
//! -128 is never produced, so `-q` is always representable and the range is symmetric, as
//! integer matmuls with zero point 0 expect.

use serde::{Deserialize, Serialize};

/// The largest magnitude of a quantized value.
pub const QMAX: f32 = 127.0;

/// An int8 tensor with one scale (`scales.len() == 1`) or one per output channel (row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantTensor {
    pub data: Vec<i8>,
    /// Rows (output channels) and columns of the original `[rows, cols]` matrix.
    pub shape: [usize; 2],
    pub scales: Vec<f32>,
}

/// The scale that maps `[-absmax, absmax]` onto `[-127, 127]` (a tiny floor keeps an all-zero
/// tensor valid).
pub fn scale_for(absmax: f32) -> f32 {
    (absmax / QMAX).max(f32::MIN_POSITIVE)
}

/// Quantize one value.
pub fn quantize_value(x: f32, scale: f32) -> i8 {
    (x / scale).round().clamp(-QMAX, QMAX) as i8
}

fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Quantize a row-major `[rows, cols]` matrix with one scale from its largest magnitude.
pub fn quantize_per_tensor(x: &[f32], rows: usize, cols: usize) -> QuantTensor {
    assert_eq!(x.len(), rows * cols, "matrix size");
    let scale = scale_for(absmax(x));
    QuantTensor {
        data: x.iter().map(|&v| quantize_value(v, scale)).collect(),
        shape: [rows, cols],
        scales: vec![scale],
    }
}

/// Quantize a row-major `[rows, cols]` matrix with one scale per row.
pub fn quantize_per_channel(x: &[f32], rows: usize, cols: usize) -> QuantTensor {
    assert_eq!(x.len(), rows * cols, "matrix size");
    let mut data = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(rows);
    for row in x.chunks_exact(cols.max(1)) {
        let s = scale_for(absmax(row));
        scales.push(s);
        data.extend(row.iter().map(|&v| quantize_value(v, s)));
    }
    QuantTensor {
        data,
        shape: [rows, cols],
        scales,
    }
}

/// Back to f32.
pub fn dequantize(q: &QuantTensor) -> Vec<f32> {
    let cols = q.shape[1].max(1);
    q.data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let s = if q.scales.len() == 1 {
                q.scales[0]
            } else {
                q.scales[i / cols]
            };
            f32::from(v) * s
        })
        .collect()
}

/// Signal-to-quantization-noise ratio in dB: `10 log10(|x|² / |x - y|²)` (infinite when equal).
pub fn sqnr_db(x: &[f32], y: &[f32]) -> f64 {
    let sig: f64 = x.iter().map(|&v| f64::from(v).powi(2)).sum();
    let err: f64 = x
        .iter()
        .zip(y)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    if err == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (sig / err).log10()
    }
}

/// Cosine similarity of two vectors (1 for two zero vectors).
pub fn cosine(x: &[f32], y: &[f32]) -> f64 {
    let dot: f64 = x
        .iter()
        .zip(y)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum();
    let nx: f64 = x.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
    let ny: f64 = y.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
    if nx == 0.0 && ny == 0.0 {
        1.0
    } else {
        dot / (nx * ny).max(f64::MIN_POSITIVE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_at_most_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let q = quantize_per_tensor(&x, 8, 8);
        let y = dequantize(&q);
        let step = q.scales[0];
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 0.5 * step + 1e-6, "{a} {b}");
        }
        // The largest magnitude maps to ±127 exactly.
        assert_eq!(q.data.iter().map(|v| v.unsigned_abs()).max(), Some(127));
        assert!(!q.data.contains(&-128));
    }

    #[test]
    fn per_channel_beats_per_tensor_on_unequal_rows() {
        // Row 0 is 100x larger than row 1: one scale flattens row 1 to a few levels.
        let mut x = Vec::new();
        for r in 0..2 {
            for c in 0..32 {
                let mag = if r == 0 { 10.0 } else { 0.1 };
                x.push(mag * ((c as f32) * 0.9 + r as f32).cos());
            }
        }
        let pt = sqnr_db(&x[32..], &dequantize(&quantize_per_tensor(&x, 2, 32))[32..]);
        let pc = sqnr_db(
            &x[32..],
            &dequantize(&quantize_per_channel(&x, 2, 32))[32..],
        );
        assert!(pc > pt + 20.0, "per-channel {pc} dB, per-tensor {pt} dB");
    }

    #[test]
    fn zeros_quantize_to_zeros() {
        let q = quantize_per_tensor(&[0.0; 4], 2, 2);
        assert!(q.data.iter().all(|&v| v == 0));
        assert!(q.scales[0] > 0.0);
        assert_eq!(cosine(&[0.0], &[0.0]), 1.0);
        assert!(sqnr_db(&[1.0], &[1.0]).is_infinite());
    }
}

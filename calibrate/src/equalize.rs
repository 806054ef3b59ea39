//! Per-input-channel equalization (SmoothQuant, Xiao et al. 2023) folded into the affine that
//! feeds a linear layer.
//!
//! For `y = (γ ⊙ n + β) Wᵀ` with `W` `[out, in]`, dividing input channel `j` of the affine by `s_j`
//! and multiplying column `j` of `W` by `s_j` leaves `y` unchanged, while moving range between the
//! activation (quantized per tensor at run time) and the weight (quantized per tensor once).
//! `s_j = a_j^α / w_j^(1-α)` with `a_j` the calibration max of `|x_j|` and `w_j` the max of
//! `|W[:, j]|` balances the two; α = 0.5 is the paper's default.

/// The max of `|W[:, j]|` per input column of a row-major `[rows, cols]` matrix.
pub fn column_absmax(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols, "matrix size");
    let mut m = vec![0f32; cols];
    for row in w.chunks_exact(cols.max(1)) {
        for (mj, v) in m.iter_mut().zip(row) {
            *mj = mj.max(v.abs());
        }
    }
    m
}

/// The equalization factors `s_j = a_j^α / w_j^(1-α)` (1 where either range is zero, so dead
/// channels stay put), clamped to `[1e-4, 1e4]`.
pub fn smooth_factors(act_absmax: &[f32], w_col_absmax: &[f32], alpha: f32) -> Vec<f32> {
    assert_eq!(act_absmax.len(), w_col_absmax.len(), "channel counts");
    act_absmax
        .iter()
        .zip(w_col_absmax)
        .map(|(&a, &w)| {
            if a > 0.0 && w > 0.0 {
                (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-4, 1e4)
            } else {
                1.0
            }
        })
        .collect()
}

/// Fold factors `s` in place: `γ_j /= s_j`, `β_j /= s_j`, `W[:, j] *= s_j`.
pub fn fold_into_affine(
    gamma: &mut [f32],
    beta: &mut [f32],
    w: &mut [f32],
    rows: usize,
    cols: usize,
    s: &[f32],
) {
    assert!(gamma.len() == cols && beta.len() == cols && s.len() == cols);
    assert_eq!(w.len(), rows * cols, "matrix size");
    for j in 0..cols {
        gamma[j] /= s[j];
        beta[j] /= s[j];
    }
    for row in w.chunks_exact_mut(cols.max(1)) {
        for (v, sj) in row.iter_mut().zip(s) {
            *v *= sj;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize_per_tensor, quantize_value, scale_for, sqnr_db};

    /// `(γ ⊙ n + β) Wᵀ` for rows of `n`.
    fn forward(n: &[Vec<f32>], g: &[f32], b: &[f32], w: &[f32], rows: usize) -> Vec<f32> {
        let cols = g.len();
        let mut out = Vec::new();
        for x in n {
            let a: Vec<f32> = (0..cols).map(|j| g[j] * x[j] + b[j]).collect();
            for r in 0..rows {
                out.push((0..cols).map(|j| a[j] * w[r * cols + j]).sum());
            }
        }
        out
    }

    /// The same with the affine output and `W` both quantized per tensor.
    fn forward_int8(n: &[Vec<f32>], g: &[f32], b: &[f32], w: &[f32], rows: usize) -> Vec<f32> {
        let cols = g.len();
        let acts: Vec<Vec<f32>> = n
            .iter()
            .map(|x| (0..cols).map(|j| g[j] * x[j] + b[j]).collect())
            .collect();
        let amax = acts.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let sa = scale_for(amax);
        let wq = dequantize(&quantize_per_tensor(w, rows, cols));
        let mut out = Vec::new();
        for a in &acts {
            let aq: Vec<f32> = a
                .iter()
                .map(|&v| f32::from(quantize_value(v, sa)) * sa)
                .collect();
            for r in 0..rows {
                out.push((0..cols).map(|j| aq[j] * wq[r * cols + j]).sum());
            }
        }
        out
    }

    #[test]
    fn folding_is_exact_and_helps_per_tensor_int8() {
        let (rows, cols) = (16, 32);
        let mut s = 7u64;
        let mut next = || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        // LayerNorm-like inputs; the affine has a few outlier channels, as CLIP's LayerNorms do.
        let n: Vec<Vec<f32>> = (0..64)
            .map(|_| (0..cols).map(|_| 2.0 * next()).collect())
            .collect();
        let mut g: Vec<f32> = (0..cols)
            .map(|j| if j % 11 == 3 { 30.0 } else { 1.0 })
            .collect();
        let mut b: Vec<f32> = (0..cols).map(|_| 0.1 * next()).collect();
        let mut w: Vec<f32> = (0..rows * cols).map(|_| 0.2 * next()).collect();
        let before = forward(&n, &g, &b, &w, rows);
        let before_q = forward_int8(&n, &g, &b, &w, rows);
        let acts_max: Vec<f32> = (0..cols)
            .map(|j| {
                n.iter()
                    .fold(0f32, |m, x| m.max((g[j] * x[j] + b[j]).abs()))
            })
            .collect();
        let f = smooth_factors(&acts_max, &column_absmax(&w, rows, cols), 0.5);
        fold_into_affine(&mut g, &mut b, &mut w, rows, cols, &f);
        let after = forward(&n, &g, &b, &w, rows);
        for (x, y) in before.iter().zip(&after) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{x} {y}");
        }
        let after_q = forward_int8(&n, &g, &b, &w, rows);
        let (db_before, db_after) = (sqnr_db(&before, &before_q), sqnr_db(&before, &after_q));
        assert!(
            db_after > db_before + 6.0,
            "SQNR {db_before:.1} dB -> {db_after:.1} dB"
        );
    }

    #[test]
    fn dead_channels_keep_factor_one() {
        assert_eq!(
            smooth_factors(&[0.0, 4.0], &[1.0, 0.0], 0.5),
            vec![1.0, 1.0]
        );
        assert_eq!(smooth_factors(&[4.0], &[1.0], 0.5), vec![2.0]);
    }
}

//! Exact f32 rewrites of linear algebra used when folding PE-CLIP for export: an affine
//! (LayerNorm's `γ`, `β`) into the linear layer after it, two linear layers in a row into one, and
//! linear layers that read the same input into one stacked layer. Matrices are row-major
//! `[out, in]` (PyTorch's layout); `y = W x + b`.

/// A linear layer `[out, in]` with its bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl Linear {
    pub fn new(w: Vec<f32>, b: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(w.len(), out_dim * in_dim, "weight size");
        assert_eq!(b.len(), out_dim, "bias size");
        Self {
            w,
            b,
            out_dim,
            in_dim,
        }
    }

    /// `W x + b`.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.in_dim, "input size");
        self.w
            .chunks_exact(self.in_dim)
            .zip(&self.b)
            .map(|(row, b)| row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>() + b)
            .collect()
    }

    /// `self(γ ⊙ n + β)` as one linear layer of `n`: `W diag(γ)` and `W β + b`.
    pub fn after_affine(&self, gamma: &[f32], beta: &[f32]) -> Self {
        assert!(gamma.len() == self.in_dim && beta.len() == self.in_dim);
        let w = self
            .w
            .chunks_exact(self.in_dim)
            .flat_map(|row| row.iter().zip(gamma).map(|(w, g)| w * g))
            .collect();
        let b = self
            .w
            .chunks_exact(self.in_dim)
            .zip(&self.b)
            .map(|(row, b)| {
                (row.iter()
                    .zip(beta)
                    .map(|(w, v)| f64::from(*w) * f64::from(*v))
                    .sum::<f64>()
                    + f64::from(*b)) as f32
            })
            .collect();
        Self::new(w, b, self.out_dim, self.in_dim)
    }

    /// `next(self(x))` as one linear layer: `W₂ W₁` and `W₂ b₁ + b₂` (accumulated in f64).
    pub fn then(&self, next: &Linear) -> Self {
        assert_eq!(next.in_dim, self.out_dim, "inner sizes");
        let (o, m, i) = (next.out_dim, self.out_dim, self.in_dim);
        let mut w = vec![0f32; o * i];
        let mut b = vec![0f32; o];
        for r in 0..o {
            for c in 0..i {
                let s: f64 = (0..m)
                    .map(|k| f64::from(next.w[r * m + k]) * f64::from(self.w[k * i + c]))
                    .sum();
                w[r * i + c] = s as f32;
            }
            let s: f64 = (0..m)
                .map(|k| f64::from(next.w[r * m + k]) * f64::from(self.b[k]))
                .sum();
            b[r] = (s + f64::from(next.b[r])) as f32;
        }
        Self::new(w, b, o, i)
    }

    /// Layers reading the same input, stacked into one whose output is their outputs in order.
    pub fn stack(parts: &[&Linear]) -> Self {
        let in_dim = parts.first().map_or(0, |p| p.in_dim);
        assert!(parts.iter().all(|p| p.in_dim == in_dim), "input sizes");
        let w = parts.iter().flat_map(|p| p.w.iter().copied()).collect();
        let b = parts.iter().flat_map(|p| p.b.iter().copied()).collect();
        Self::new(w, b, parts.iter().map(|p| p.out_dim).sum(), in_dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lin(out_dim: usize, in_dim: usize, seed: u64) -> Linear {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let w = (0..out_dim * in_dim).map(|_| next()).collect();
        let b = (0..out_dim).map(|_| next()).collect();
        Linear::new(w, b, out_dim, in_dim)
    }

    fn close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} {y}");
        }
    }

    #[test]
    fn rewrites_compute_the_same_function() {
        let (l1, l2, l3) = (lin(6, 5, 1), lin(4, 6, 2), lin(3, 5, 3));
        let x = [0.3f32, -1.2, 0.7, 2.0, -0.1];
        let gamma = [1.5f32, 0.2, -0.7, 1.0, 3.0];
        let beta = [0.1f32, -0.4, 0.0, 0.9, -2.0];
        let affine: Vec<f32> = (0..5).map(|j| gamma[j] * x[j] + beta[j]).collect();
        close(
            &l1.after_affine(&gamma, &beta).apply(&x),
            &l1.apply(&affine),
        );
        close(&l1.then(&l2).apply(&x), &l2.apply(&l1.apply(&x)));
        let stacked = Linear::stack(&[&l1, &l3]).apply(&x);
        close(&stacked[..6], &l1.apply(&x));
        close(&stacked[6..], &l3.apply(&x));
    }
}

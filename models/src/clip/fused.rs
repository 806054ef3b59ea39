//! The frozen halves of a CLIP block, `attn(ln1(x))` and `mlp(ln2(x))`, each one CPU op with
//! its own backward pass that returns only the input's gradient (the CLIP weights are frozen).
//!
//! Built from candle's primitives, one such half is some twenty ops: every elementwise op runs
//! on one thread, every op keeps its operands for backward, and the backward pass allocates a
//! zero tensor and an add for every operand. Here the matmuls are `gemm` calls on the rayon pool
//! (the kernels candle's CPU matmul uses), LayerNorm, softmax and QuickGELU are row loops on
//! the pool, and the op keeps only what its backward needs: LayerNorm's per-row mean and
//! 1/std, and for attention the scaled queries, keys, values and probabilities, for the MLP
//! the pre-activation. The equations are those of [`super::layers`], [`super::attention`] and
//! [`super::mlp`]; the results agree with candle's graph to f32 rounding (tests below).
//!
//! Used for f32 on the CPU with frozen weights; other devices and dtypes go through candle's
//! graph. `PE_CLIP_TRAIN_KERNELS=candle` turns these ops off (to measure against the graph).

use std::sync::{Mutex, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::config::HiddenAct;
use super::encoder::EncoderLayer;
use crate::error::Result;

/// Whether the fused ops are used where they apply (`PE_CLIP_TRAIN_KERNELS` is not `candle`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PE_CLIP_TRAIN_KERNELS").map_or(true, |v| v != "candle"))
}

/// The kernels a training step on the CPU runs, for reports: `fused` or `candle`.
pub fn kernels_name() -> &'static str {
    if enabled() {
        "fused"
    } else {
        "candle"
    }
}

/// `attn(ln1(x))` of `layer` on `x` `[B, L, D]` as one op, or `None` where it does not apply
/// (not the CPU, not f32, a weight that takes a gradient, a mask not `[L, L]`).
pub fn attention(
    layer: &EncoderLayer,
    x: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let a = &layer.self_attn;
    let ln = &layer.layer_norm1;
    let mut weights = vec![ln.weight.clone(), ln.bias.clone()];
    for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj] {
        let Some(b) = &lin.bias else { return Ok(None) };
        weights.push(lin.weight.clone());
        weights.push(b.clone());
    }
    let Ok((_, l, d)) = x.dims3() else {
        return Ok(None);
    };
    if a.heads == 0 || d % a.heads != 0 || !applies(x, &weights) {
        return Ok(None);
    }
    let mask = match mask {
        None => None,
        Some(m) => {
            if m.dims() != [l, l] || !applies(x, std::slice::from_ref(m)) {
                return Ok(None);
            }
            Some(m.contiguous()?)
        }
    };
    let op = AttentionOp {
        weights,
        eps: ln.eps as f32,
        heads: a.heads,
        mask,
        keep: x.track_op(),
        saved: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// `mlp(ln2(x))` of `layer` on `x` `[B, L, D]` as one op, or `None` where it does not apply
/// (as [`attention`], or an activation other than QuickGELU).
pub fn mlp(layer: &EncoderLayer, x: &Tensor) -> Result<Option<Tensor>> {
    let m = &layer.mlp;
    let ln = &layer.layer_norm2;
    if m.act != HiddenAct::QuickGelu {
        return Ok(None);
    }
    let (Some(b1), Some(b2)) = (&m.fc1.bias, &m.fc2.bias) else {
        return Ok(None);
    };
    let weights = vec![
        ln.weight.clone(),
        ln.bias.clone(),
        m.fc1.weight.clone(),
        b1.clone(),
        m.fc2.weight.clone(),
        b2.clone(),
    ];
    if x.rank() != 3 || !applies(x, &weights) {
        return Ok(None);
    }
    let op = MlpOp {
        weights,
        eps: ln.eps as f32,
        keep: x.track_op(),
        saved: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// f32 on the CPU, every weight frozen and contiguous, the switch on.
fn applies(x: &Tensor, weights: &[Tensor]) -> bool {
    enabled()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && weights.iter().all(|w| {
            w.dtype() == DType::F32 && w.device().is_cpu() && w.is_contiguous() && !w.track_op()
        })
}

/// A read view of a contiguous f32 CPU tensor's elements.
struct Host<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl Host<'_> {
    fn get(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            _ => unreachable!("checked in host()"),
        }
    }
}

fn host(t: &Tensor) -> candle_core::Result<Host<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let (start, len) = (layout.start_offset(), layout.shape().elem_count());
    match &*guard {
        Storage::Cpu(CpuStorage::F32(v)) if layout.is_contiguous() && start + len <= v.len() => {
            Ok(Host { guard, start, len })
        }
        _ => Err(candle_core::Error::Msg(
            "fused block op: a tensor that is not contiguous f32 on the CPU".into(),
        )),
    }
}

fn contiguous_input<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) if l.is_contiguous() => {
            let (start, n) = (l.start_offset(), l.shape().elem_count());
            v.get(start..start + n)
                .ok_or_else(|| candle_core::Error::Msg("fused block op: short storage".into()))
        }
        _ => Err(candle_core::Error::Msg(
            "fused block op: the input is not contiguous f32".into(),
        )),
    }
}

/// A raw pointer the pool's tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the raw field).
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// `dst (m x n, row stride dst_rs) = [dst +] lhs · rhs` with `lhs` `m x k` and `rhs` `k x n`
/// given by their row and column strides (in elements).
///
/// # Safety
/// Every element addressed through the three pointers and their strides must lie in its
/// allocation, and no other thread may write `dst`'s addressed elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    parallel: bool,
) {
    let threads = candle_core::utils::get_num_threads();
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// `x W^T + b` for `x` `[m, k]` and a PyTorch-layout `w` `[n, k]`: `[m, n]`.
fn linear(x: &[f32], m: usize, k: usize, w: &[f32], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    assert!(x.len() == m * k && w.len() == n * k);
    let mut y = vec![0f32; m * n];
    y.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b));
    // SAFETY: y is m x n, x is m x k (row stride k), w^T is k x n with w[j * k + i] at (i, j).
    unsafe {
        mm(
            (m, n, k),
            y.as_mut_ptr(),
            n,
            true,
            (x.as_ptr(), k, 1),
            (w.as_ptr(), 1, k),
            true,
        )
    };
    y
}

/// `dy W` for `dy` `[m, n]` and `w` `[n, k]` (the input gradient of [`linear`]): `[m, k]`,
/// added into `dx` if `accumulate`.
fn linear_back(dy: &[f32], m: usize, w: &[f32], k: usize, dx: &mut [f32], accumulate: bool) {
    let n = w.len() / k;
    assert!(dy.len() == m * n && dx.len() == m * k && w.len() == n * k);
    // SAFETY: dx is m x k, dy is m x n (row stride n), w is n x k (row stride k).
    unsafe {
        mm(
            (m, k, n),
            dx.as_mut_ptr(),
            k,
            accumulate,
            (dy.as_ptr(), n, 1),
            (w.as_ptr(), k, 1),
            true,
        )
    };
}

/// LayerNorm over rows of width `d`: the output and each row's mean and 1/std.
fn layer_norm(x: &[f32], d: usize, w: &[f32], b: &[f32], eps: f32) -> [Vec<f32>; 3] {
    let rows = x.len() / d;
    let mut y = vec![0f32; x.len()];
    let mut mean = vec![0f32; rows];
    let mut rstd = vec![0f32; rows];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((yr, xr), (mu, rs))| {
            let m = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / d as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (((o, &v), &wi), &bi) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - m) * r * wi + bi;
            }
            *mu = m;
            *rs = r;
        });
    [y, mean, rstd]
}

/// The input gradient of [`layer_norm`] from the output's `dy`:
/// `dx = r (g - mean(g) - x̂ mean(g x̂))` with `g = dy ⊙ w`, `x̂ = (x - μ) r`.
fn layer_norm_back(x: &[f32], mean: &[f32], rstd: &[f32], w: &[f32], dy: &[f32]) -> Vec<f32> {
    let d = w.len();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|((dxr, (xr, dyr)), (&mu, &r))| {
            let (mut sg, mut sgx) = (0f32, 0f32);
            for ((&v, &g), &wi) in xr.iter().zip(dyr).zip(w) {
                let g = g * wi;
                sg += g;
                sgx += g * (v - mu) * r;
            }
            let (mg, mgx) = (sg / d as f32, sgx / d as f32);
            for (((o, &v), &g), &wi) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                *o = r * (g * wi - mg - (v - mu) * r * mgx);
            }
        });
    dx
}

/// Softmax of one row in place (a `-inf` entry gets probability 0).
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// QuickGELU `x σ(1.702 x)` and its derivative `σ + 1.702 x σ (1 - σ)`.
fn quick_gelu(x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-1.702 * x).exp());
    (x * s, s + 1.702 * x * s * (1.0 - s))
}

/// What [`AttentionOp`]'s backward needs of its forward.
struct AttentionSaved {
    mean: Vec<f32>,
    rstd: Vec<f32>,
    /// `[B·L, D]`, `q` already scaled by `1/sqrt(d_h)`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[B, H, L, L]`.
    p: Vec<f32>,
}

/// `out_proj(softmax(q k^T / sqrt(d_h) + mask) v)` of `ln1(x)`; weights in the order
/// `ln1.{weight,bias}`, then `{q,k,v,out}_proj.{weight,bias}`.
struct AttentionOp {
    weights: Vec<Tensor>,
    eps: f32,
    heads: usize,
    mask: Option<Tensor>,
    /// Keep [`AttentionSaved`] for backward (the input carries a gradient).
    keep: bool,
    saved: Mutex<Option<AttentionSaved>>,
}

impl AttentionOp {
    fn run(&self, x: &[f32], shape: &Shape) -> candle_core::Result<(Vec<f32>, AttentionSaved)> {
        let (b, l, d) = shape.dims3()?;
        let ws = self
            .weights
            .iter()
            .map(host)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w: Vec<&[f32]> = ws.iter().map(Host::get).collect();
        let mask = self.mask.as_ref().map(host).transpose()?;
        let mask = mask.as_ref().map(Host::get);
        let (m, heads) = (b * l, self.heads);
        let hd = d / heads;
        let [h, mean, rstd] = layer_norm(x, d, w[0], w[1], self.eps);
        let mut q = linear(&h, m, d, w[2], w[3]);
        let k = linear(&h, m, d, w[4], w[5]);
        let v = linear(&h, m, d, w[6], w[7]);
        drop(h);
        let scale = (hd as f32).powf(-0.5);
        q.par_iter_mut().for_each(|e| *e *= scale);
        let mut p = vec![0f32; b * heads * l * l];
        let mut ctx = vec![0f32; m * d];
        let out = Shared(ctx.as_mut_ptr());
        p.par_chunks_mut(l * l).enumerate().for_each(|(task, pt)| {
            let base = (task / heads) * l * d + (task % heads) * hd;
            // SAFETY: frame task/heads, head task%heads: rows base/d.. of q, k, v, ctx, columns
            // hd wide; each task writes its own probabilities and its own ctx block.
            unsafe {
                mm(
                    (l, l, hd),
                    pt.as_mut_ptr(),
                    l,
                    false,
                    (q.as_ptr().add(base), d, 1),
                    (k.as_ptr().add(base), 1, d),
                    false,
                );
            }
            for (i, row) in pt.chunks_mut(l).enumerate() {
                if let Some(mk) = mask {
                    for (s, &a) in row.iter_mut().zip(&mk[i * l..(i + 1) * l]) {
                        *s += a;
                    }
                }
                softmax_row(row);
            }
            unsafe {
                mm(
                    (l, hd, l),
                    out.ptr().add(base),
                    d,
                    false,
                    (pt.as_ptr(), l, 1),
                    (v.as_ptr().add(base), d, 1),
                    false,
                );
            }
        });
        let y = linear(&ctx, m, d, w[8], w[9]);
        Ok((
            y,
            AttentionSaved {
                mean,
                rstd,
                q,
                k,
                v,
                p,
            },
        ))
    }

    fn backward(
        &self,
        x: &[f32],
        shape: &Shape,
        s: &AttentionSaved,
        dy: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let (b, l, d) = shape.dims3()?;
        let ws = self
            .weights
            .iter()
            .map(host)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w: Vec<&[f32]> = ws.iter().map(Host::get).collect();
        let (m, heads) = (b * l, self.heads);
        let hd = d / heads;
        let mut dctx = vec![0f32; m * d];
        linear_back(dy, m, w[8], d, &mut dctx, false);
        let mut dq = vec![0f32; m * d];
        let mut dk = vec![0f32; m * d];
        let mut dv = vec![0f32; m * d];
        let (pq, pk, pv) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        (0..b * heads).into_par_iter().for_each(|task| {
            let base = (task / heads) * l * d + (task % heads) * hd;
            let pt = &s.p[task * l * l..(task + 1) * l * l];
            let mut ds = vec![0f32; l * l];
            let (pq, pk, pv) = (pq, pk, pv);
            // SAFETY: as in the forward: each task reads and writes its own frame and head.
            unsafe {
                // dP = dctx_h v_h^T; dv_h = P^T dctx_h.
                mm(
                    (l, l, hd),
                    ds.as_mut_ptr(),
                    l,
                    false,
                    (dctx.as_ptr().add(base), d, 1),
                    (s.v.as_ptr().add(base), 1, d),
                    false,
                );
                mm(
                    (l, hd, l),
                    pv.0.add(base),
                    d,
                    false,
                    (pt.as_ptr(), 1, l),
                    (dctx.as_ptr().add(base), d, 1),
                    false,
                );
            }
            // dS = P ⊙ (dP - rowsum(dP ⊙ P)).
            for (dr, pr) in ds.chunks_mut(l).zip(pt.chunks(l)) {
                let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                for (g, &pv) in dr.iter_mut().zip(pr) {
                    *g = pv * (*g - dot);
                }
            }
            unsafe {
                // dq_h = dS k_h (for the scaled q); dk_h = dS^T q_h.
                mm(
                    (l, hd, l),
                    pq.0.add(base),
                    d,
                    false,
                    (ds.as_ptr(), l, 1),
                    (s.k.as_ptr().add(base), d, 1),
                    false,
                );
                mm(
                    (l, hd, l),
                    pk.0.add(base),
                    d,
                    false,
                    (ds.as_ptr(), 1, l),
                    (s.q.as_ptr().add(base), d, 1),
                    false,
                );
            }
        });
        drop(dctx);
        let scale = (hd as f32).powf(-0.5);
        dq.par_iter_mut().for_each(|e| *e *= scale);
        let mut dh = vec![0f32; m * d];
        linear_back(&dq, m, w[2], d, &mut dh, false);
        linear_back(&dk, m, w[4], d, &mut dh, true);
        linear_back(&dv, m, w[6], d, &mut dh, true);
        Ok(layer_norm_back(x, &s.mean, &s.rstd, w[0], &dh))
    }
}

/// What [`MlpOp`]'s backward needs of its forward.
struct MlpSaved {
    mean: Vec<f32>,
    rstd: Vec<f32>,
    /// `fc1(ln2(x))`, `[B·L, 4D]`.
    pre: Vec<f32>,
}

/// `fc2(QuickGELU(fc1(ln2(x))))`; weights `ln2.{weight,bias}`, `fc1.{weight,bias}`,
/// `fc2.{weight,bias}`.
struct MlpOp {
    weights: Vec<Tensor>,
    eps: f32,
    keep: bool,
    saved: Mutex<Option<MlpSaved>>,
}

impl MlpOp {
    fn run(&self, x: &[f32], shape: &Shape) -> candle_core::Result<(Vec<f32>, MlpSaved)> {
        let (b, l, d) = shape.dims3()?;
        let ws = self
            .weights
            .iter()
            .map(host)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w: Vec<&[f32]> = ws.iter().map(Host::get).collect();
        let (m, hidden) = (b * l, w[3].len());
        let [h, mean, rstd] = layer_norm(x, d, w[0], w[1], self.eps);
        let pre = linear(&h, m, d, w[2], w[3]);
        drop(h);
        let mut act = vec![0f32; m * hidden];
        act.par_chunks_mut(hidden)
            .zip(pre.par_chunks(hidden))
            .for_each(|(a, p)| {
                for (o, &v) in a.iter_mut().zip(p) {
                    *o = quick_gelu(v).0;
                }
            });
        let y = linear(&act, m, hidden, w[4], w[5]);
        Ok((y, MlpSaved { mean, rstd, pre }))
    }

    fn backward(
        &self,
        x: &[f32],
        shape: &Shape,
        s: &MlpSaved,
        dy: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let (b, l, d) = shape.dims3()?;
        let ws = self
            .weights
            .iter()
            .map(host)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w: Vec<&[f32]> = ws.iter().map(Host::get).collect();
        let (m, hidden) = (b * l, w[3].len());
        let mut dpre = vec![0f32; m * hidden];
        linear_back(dy, m, w[4], hidden, &mut dpre, false);
        dpre.par_chunks_mut(hidden)
            .zip(s.pre.par_chunks(hidden))
            .for_each(|(g, p)| {
                for (o, &v) in g.iter_mut().zip(p) {
                    *o *= quick_gelu(v).1;
                }
            });
        let mut dh = vec![0f32; m * d];
        linear_back(&dpre, m, w[2], d, &mut dh, false);
        Ok(layer_norm_back(x, &s.mean, &s.rstd, w[0], &dh))
    }
}

/// The forward and backward of a fused op, for the shared `CustomOp1` plumbing.
trait Fused: Send + Sync {
    type Saved: Send;
    const NAME: &'static str;
    fn run(&self, x: &[f32], shape: &Shape) -> candle_core::Result<(Vec<f32>, Self::Saved)>;
    fn backward(
        &self,
        x: &[f32],
        shape: &Shape,
        s: &Self::Saved,
        dy: &[f32],
    ) -> candle_core::Result<Vec<f32>>;
    fn keep(&self) -> bool;
    fn saved(&self) -> &Mutex<Option<Self::Saved>>;
}

impl Fused for AttentionOp {
    type Saved = AttentionSaved;
    const NAME: &'static str = "frozen-attention";
    fn run(&self, x: &[f32], shape: &Shape) -> candle_core::Result<(Vec<f32>, AttentionSaved)> {
        AttentionOp::run(self, x, shape)
    }
    fn backward(
        &self,
        x: &[f32],
        shape: &Shape,
        s: &AttentionSaved,
        dy: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        AttentionOp::backward(self, x, shape, s, dy)
    }
    fn keep(&self) -> bool {
        self.keep
    }
    fn saved(&self) -> &Mutex<Option<AttentionSaved>> {
        &self.saved
    }
}

impl Fused for MlpOp {
    type Saved = MlpSaved;
    const NAME: &'static str = "frozen-mlp";
    fn run(&self, x: &[f32], shape: &Shape) -> candle_core::Result<(Vec<f32>, MlpSaved)> {
        MlpOp::run(self, x, shape)
    }
    fn backward(
        &self,
        x: &[f32],
        shape: &Shape,
        s: &MlpSaved,
        dy: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        MlpOp::backward(self, x, shape, s, dy)
    }
    fn keep(&self) -> bool {
        self.keep
    }
    fn saved(&self) -> &Mutex<Option<MlpSaved>> {
        &self.saved
    }
}

fn fused_fwd<F: Fused>(
    op: &F,
    s: &CpuStorage,
    l: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous_input(s, l)?;
    let (y, saved) = op.run(x, l.shape())?;
    if op.keep() {
        *op.saved().lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
    }
    Ok((CpuStorage::F32(y), l.shape().clone()))
}

/// The input gradient; the saved forward is used once (candle runs backward once per graph)
/// and recomputed if it is gone.
fn fused_bwd<F: Fused>(op: &F, arg: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let x = arg.contiguous()?;
    let g = grad.contiguous()?.to_dtype(DType::F32)?;
    let xs = host(&x)?;
    let gs = host(&g)?;
    let saved = op.saved().lock().unwrap_or_else(|e| e.into_inner()).take();
    let saved = match saved {
        Some(s) => s,
        None => op.run(xs.get(), x.shape())?.1,
    };
    let dx = op.backward(xs.get(), x.shape(), &saved, gs.get())?;
    drop(saved);
    Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        <Self as Fused>::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fused_fwd(self, s, l)
    }
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        fused_bwd(self, arg, grad)
    }
}

impl CustomOp1 for MlpOp {
    fn name(&self) -> &'static str {
        <Self as Fused>::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fused_fwd(self, s, l)
    }
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        fused_bwd(self, arg, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::attention::{causal_mask, Attention};
    use crate::clip::layers::{max_abs_diff, LayerNorm, Linear};
    use crate::clip::mlp::Mlp;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u32, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.61 + seed as f32 * 1.3).sin() * amp)
            .collect()
    }

    fn tensor(shape: (usize, usize, usize), seed: u32, amp: f32) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        Tensor::from_vec(values(n, seed, amp), shape, &Device::Cpu).unwrap()
    }

    /// A block of width 16, 4 heads, MLP 64, with deterministic weights.
    fn layer(seed: u32) -> EncoderLayer {
        let dev = Device::Cpu;
        let lin = |out: usize, inp: usize, s: u32| Linear {
            weight: Tensor::from_vec(values(out * inp, seed + s, 0.4), (out, inp), &dev).unwrap(),
            bias: Some(Tensor::from_vec(values(out, seed + s + 50, 0.1), out, &dev).unwrap()),
        };
        let ln = |s: u32| LayerNorm {
            weight: (Tensor::from_vec(values(16, seed + s, 0.2), 16, &dev).unwrap() + 1.0).unwrap(),
            bias: Tensor::from_vec(values(16, seed + s + 7, 0.1), 16, &dev).unwrap(),
            eps: 1e-5,
        };
        EncoderLayer {
            layer_norm1: ln(1),
            self_attn: Attention {
                q_proj: lin(16, 16, 2),
                k_proj: lin(16, 16, 3),
                v_proj: lin(16, 16, 4),
                out_proj: lin(16, 16, 5),
                heads: 4,
            },
            layer_norm2: ln(6),
            mlp: Mlp {
                fc1: lin(64, 16, 7),
                fc2: lin(16, 64, 8),
                act: HiddenAct::QuickGelu,
            },
        }
    }

    /// Each fused half gives candle's graph's output and input gradient (the gradient of
    /// `sum(y ⊙ probe)`) within 1e-5, with and without the text tower's causal mask, and keeps
    /// nothing once backward has run.
    #[test]
    fn fused_halves_match_candles_graph_and_its_gradient() {
        let layer = layer(5);
        let shape = (3, 7, 16);
        let mask = causal_mask(7, &Device::Cpu).unwrap();
        for (name, masked) in [("attention", false), ("attention", true), ("mlp", false)] {
            let var = Var::from_tensor(&tensor(shape, 1, 1.5)).unwrap();
            let x = (var.as_tensor() * 1.0).unwrap();
            let mask = masked.then_some(&mask);
            let (fused, reference) = match name {
                "attention" => (
                    attention(&layer, &x, mask).unwrap().expect("applies"),
                    layer
                        .self_attn
                        .forward(&layer.layer_norm1.forward(&x).unwrap(), mask)
                        .unwrap(),
                ),
                _ => (
                    super::mlp(&layer, &x).unwrap().expect("applies"),
                    layer
                        .mlp
                        .forward(&layer.layer_norm2.forward(&x).unwrap())
                        .unwrap(),
                ),
            };
            let out = max_abs_diff(&fused, &reference).unwrap();
            assert!(out < 1e-5, "{name} masked {masked}: output {out}");
            let probe = tensor(shape, 2, 1.0);
            let grad = |y: &Tensor| {
                let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(var.as_tensor()).unwrap().clone()
            };
            let (gf, gr) = (grad(&fused), grad(&reference));
            let scale = gr
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(scale > 1e-3, "{name}: a vanishing reference gradient");
            let err = max_abs_diff(&gf, &gr).unwrap();
            assert!(
                err < 1e-5 * scale.max(1.0),
                "{name} masked {masked}: gradient {err}"
            );
        }
        // Without a gradient the op keeps nothing and gives the same output.
        let x = tensor(shape, 1, 1.5);
        let y = attention(&layer, &x, None).unwrap().unwrap();
        assert!(!y.track_op());
        let want = layer
            .self_attn
            .forward(&layer.layer_norm1.forward(&x).unwrap(), None)
            .unwrap();
        assert!(max_abs_diff(&y, &want).unwrap() < 1e-5);
    }

    /// A weight that takes a gradient, a non-f32 input or another activation is left to
    /// candle's graph.
    #[test]
    fn fused_halves_step_aside_where_they_do_not_apply() {
        let mut layer = layer(6);
        let x = tensor((2, 5, 16), 3, 1.0);
        assert!(attention(&layer, &x.to_dtype(DType::BF16).unwrap(), None)
            .unwrap()
            .is_none());
        let v = Var::from_tensor(&layer.mlp.fc1.weight).unwrap();
        layer.mlp.fc1.weight = v.as_tensor().clone();
        assert!(super::mlp(&layer, &x).unwrap().is_none());
        layer.mlp.fc1.weight = layer.mlp.fc1.weight.detach();
        layer.mlp.act = HiddenAct::Gelu;
        assert!(super::mlp(&layer, &x).unwrap().is_none());
    }
}

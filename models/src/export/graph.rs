//! The per-frame step model as a graph (`pe_clip_calibrate::graph`): `frame` (`u8`
//! `[1, S, S, 3]`) and the per-block recurrent states in, the projected feature and the next
//! states out. Written to ONNX by the binary; int8 export rewrites its linear layers.

use std::collections::HashMap;

use pe_clip_calibrate::fold::Linear;
use pe_clip_calibrate::graph::{Data, ElemType, Graph, LinearOpts};

use super::fold::{FoldedBlock, FoldedModel, FoldedTda, FoldedTemporal, Norm};
use crate::clip::HiddenAct;
use crate::package::io::{state_input, state_output, FEATURE_OUTPUT, FRAME_INPUT};
use crate::peclip::{ScaleAt, TemporalCell};

/// How the graph is built.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Per-input-channel equalization factors of the LayerNorm-fed layers, by layer name
    /// (`block3/qkv`): the norm's affine is divided by them and the layer's weight columns
    /// multiplied, which leaves the f32 function unchanged.
    pub smooth: HashMap<String, Vec<f32>>,
    /// Also mark the adapters' projections (ShA up, TDA in and up) quantizable, not only the
    /// backbone's (qkv, attention output, fc1, fc2).
    pub quantize_adapters: bool,
}

struct Builder<'a> {
    g: Graph,
    opts: &'a BuildOptions,
}

impl Builder<'_> {
    /// `norm` (affine folded into `lin`, equalization factors into the norm) then `lin`.
    fn norm_linear(
        &mut self,
        x: &str,
        name: &str,
        norm: &Norm,
        lin: &Linear,
        quantizable: bool,
    ) -> String {
        let full = self.g.scoped(name);
        let d = norm.gamma.len();
        let mut folded = lin.after_affine(&norm.gamma, &norm.beta);
        let gamma: Vec<f32> = match self.opts.smooth.get(&full) {
            Some(s) => {
                assert_eq!(s.len(), d, "{full}: equalization factors");
                for row in folded.w.chunks_exact_mut(d) {
                    for (v, sj) in row.iter_mut().zip(s) {
                        *v *= sj;
                    }
                }
                s.iter().map(|v| 1.0 / v).collect()
            }
            None => vec![1.0; d],
        };
        let n = self
            .g
            .layer_norm(x, &format!("{name}_norm"), &gamma, &vec![0.0; d], norm.eps);
        let y = self.linear(&n, name, &folded, quantizable);
        if let Some(l) = self.g.linears.last_mut() {
            l.after_norm = true;
        }
        y
    }

    fn linear(&mut self, x: &str, name: &str, lin: &Linear, quantizable: bool) -> String {
        let zero_bias = lin.b.iter().all(|&b| b == 0.0);
        self.g.linear(
            x,
            name,
            &lin.w,
            lin.out_dim,
            lin.in_dim,
            LinearOpts {
                bias: (!zero_bias).then_some(lin.b.as_slice()),
                quantizable,
            },
        )
    }

    fn act(&mut self, x: &str, act: HiddenAct) -> String {
        match act {
            HiddenAct::QuickGelu => self.g.quick_gelu(x),
            HiddenAct::Gelu => self.g.gelu_erf(x),
            HiddenAct::GeluNew => {
                // 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
                let c = self.g.scalar(0.044_715);
                let k = self.g.scalar((2.0 / std::f32::consts::PI).sqrt());
                let half = self.g.scalar(0.5);
                let one = self.g.scalar(1.0);
                let x2 = self.g.mul(x, x);
                let x3 = self.g.mul(&x2, x);
                let cx3 = self.g.mul(&x3, &c);
                let inner = self.g.add(x, &cx3);
                let t = self.g.mul(&inner, &k);
                let t = self.g.tanh(&t);
                let t = self.g.add(&t, &one);
                let hx = self.g.mul(x, &half);
                self.g.mul(&hx, &t)
            }
        }
    }

    fn cols(&mut self, x: &str, from: usize, to: usize) -> String {
        self.g.slice(x, 1, from, to)
    }
}

/// Build the step graph of `m`.
pub fn build_step_graph(m: &FoldedModel, opts: &BuildOptions) -> Graph {
    let mut b = Builder {
        g: Graph::new("pe-clip step"),
        opts,
    };
    let rows_all = m.rows();
    let mut x = b.embed(m);
    let mut rows = rows_all;
    let mut state_outputs: Vec<(String, String, Vec<usize>)> = Vec::new();
    for (i, blk) in m.blocks.iter().enumerate() {
        b.g.set_scope(&format!("block{i}"));
        if let Some(pr) = &blk.prompts {
            let d = m.width;
            let n = pr.len() / d;
            let keep = rows_all - n;
            let kept = if rows > keep {
                b.g.slice(&x, 0, 0, keep)
            } else {
                x.clone()
            };
            let c = b.g.constant("prompt_rows", &[n, d], Data::F32(pr.clone()));
            x = b.g.concat(&[&kept, &c], 0);
            rows = rows_all;
        }
        let r = blk.rows_out;
        let x1 = b.attention(&x, blk, m.width, rows);
        // MLP.
        let h = b.norm_linear(&x1, "fc1", &blk.ln2, &blk.fc1, true);
        let h = b.act(&h, blk.act);
        let mlp = b.linear(&h, "fc2", &blk.fc2, true);
        // TDA.
        let qa = opts.quantize_adapters;
        let m2 = match &blk.temporal {
            None => mlp,
            Some(FoldedTemporal::Plain { down, up }) => {
                let dn = b.linear(&mlp, "tda_down", down, qa);
                let dn = b.g.gelu_erf(&dn);
                let u = b.linear(&dn, "tda_up", up, qa);
                b.g.add(&mlp, &u)
            }
            Some(FoldedTemporal::Recurrent(t)) => {
                let (m2, state, width) = b.recurrent_tda(&mlp, t, i, r);
                state_outputs.push((state, state_output(i), vec![r, width]));
                m2
            }
        };
        x = b.g.add(&x1, &m2);
        rows = r;
    }
    b.g.set_scope("head");
    // The class row (the last block keeps only it), ln_post folded into the projection.
    let cls = if rows > 1 { b.g.slice(&x, 0, 0, 1) } else { x };
    let feature = b.norm_linear(&cls, "proj", &m.ln_post, &m.proj, false);
    let e = m.feature_dim();
    b.g.set_scope("");
    b.g.output(&feature, FEATURE_OUTPUT, ElemType::F32, Some(&[1, e]));
    for (value, name, dims) in state_outputs {
        b.g.output(&value, &name, ElemType::F32, Some(&dims));
    }
    b.g
}

impl Builder<'_> {
    /// Patch embedding on raw u8 values (scaling folded), positions, ln_pre; then the constant
    /// rows (class row, first-layer prompts). Returns the `[rows, width]` token matrix.
    fn embed(&mut self, m: &FoldedModel) -> String {
        let d = m.width;
        let (s, p) = (m.image_size, m.patch_size);
        let gr = s / p;
        let np = gr * gr;
        let b = self;
        let frame = b.g.input(FRAME_INPUT, ElemType::U8, &[1, s, s, 3]);
        let f = b.g.cast(&frame, ElemType::F32);
        let f =
            b.g.reshape(&f, &[gr as i64, p as i64, gr as i64, p as i64, 3]);
        let f = b.g.transpose(&f, &[0, 2, 1, 3, 4]);
        let f = b.g.reshape(&f, &[np as i64, (p * p * 3) as i64]);
        let pe = b.linear(&f, "patch", &m.patch, false);
        let pb =
            b.g.constant("patch_bias", &[np, d], Data::F32(m.patch_bias.clone()));
        let pe = b.g.add(&pe, &pb);
        let pe =
            b.g.layer_norm(&pe, "ln_pre", &m.ln_pre.gamma, &m.ln_pre.beta, m.ln_pre.eps);
        let cls =
            b.g.constant("cls_row", &[1, d], Data::F32(m.cls_row.clone()));
        let mut parts = vec![cls, pe];
        if let Some(p0) = &m.prompt0_rows {
            parts.push(b.g.constant(
                "prompt_rows.0",
                &[m.prompt_rows(), d],
                Data::F32(p0.clone()),
            ));
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        b.g.concat(&refs, 0)
    }

    /// Attention with the Shared Adapter and the residual: keys and values from all `rows`,
    /// queries only for the rows the block keeps. Returns `[rows_out, d]`.
    fn attention(&mut self, x: &str, blk: &FoldedBlock, d: usize, rows: usize) -> String {
        let b = self;
        let r = blk.rows_out;
        let heads = blk.heads as i64;
        let hd = (d / blk.heads) as i64;
        let qkv = b.norm_linear(x, "qkv", &blk.ln1, &blk.qkv, true);
        let q = b.cols(&qkv, 0, d);
        let q = if r < rows { b.g.slice(&q, 0, 0, r) } else { q };
        let k = b.cols(&qkv, d, 2 * d);
        let v = b.cols(&qkv, 2 * d, 3 * d);
        let q = b.g.reshape(&q, &[r as i64, heads, hd]);
        let q = b.g.transpose(&q, &[1, 0, 2]);
        let k = b.g.reshape(&k, &[rows as i64, heads, hd]);
        let k = b.g.transpose(&k, &[1, 2, 0]);
        let v = b.g.reshape(&v, &[rows as i64, heads, hd]);
        let v = b.g.transpose(&v, &[1, 0, 2]);
        let scores = b.g.matmul(&q, &k);
        let probs = b.g.softmax(&scores);
        let o = b.g.matmul(&probs, &v);
        let o = b.g.transpose(&o, &[1, 0, 2]);
        let o = b.g.reshape(&o, &[r as i64, d as i64]);
        let ao = b.linear(&o, "attn_out", &blk.attn_out, true);
        let a = match &blk.sha_up {
            Some(up) => {
                let a = b.cols(&ao, 0, d);
                let dn = b.cols(&ao, d, blk.attn_out.out_dim);
                let dn = b.g.gelu_erf(&dn);
                let u = b.linear(&dn, "sha_up", up, b.opts.quantize_adapters);
                b.g.add(&a, &u)
            }
            None => ao,
        };
        let xr = if r < rows {
            b.g.slice(x, 0, 0, r)
        } else {
            x.to_string()
        };
        b.g.add(&xr, &a)
    }

    /// The Temporal Dynamic Adapter of block `i` with its recurrent cell and dynamic scaling,
    /// added to `mlp` (`[r, d]`). Returns the sum, the next-state value and the state width.
    fn recurrent_tda(
        &mut self,
        mlp: &str,
        t: &FoldedTda,
        i: usize,
        r: usize,
    ) -> (String, String, usize) {
        let b = self;
        let qa = b.opts.quantize_adapters;
        let hdim = t.hidden;
        let z = b.norm_linear(mlp, "tda_in", &t.ln, &t.scale_down, qa);
        let sc = b.cols(&z, 0, 1);
        let sc = b.g.relu(&sc);
        let mut dn = b.cols(&z, 1, 1 + hdim);
        if t.scale_at == ScaleAt::Input {
            dn = b.g.mul(&dn, &sc);
        }
        let width = if t.cell == TemporalCell::Lstm {
            2 * hdim
        } else {
            hdim
        };
        let st = b.g.input(&state_input(i), ElemType::F32, &[r, width]);
        let h_prev = if t.cell == TemporalCell::Lstm {
            b.cols(&st, 0, hdim)
        } else {
            st.clone()
        };
        let gi = b.linear(&dn, "cell_ih", &t.w_ih, false);
        let gh = b.linear(&h_prev, "cell_hh", &t.w_hh, false);
        let (h_new, state) = match t.cell {
            TemporalCell::Gru => {
                let h = b.gru(&gi, &gh, &h_prev, hdim);
                (h.clone(), h)
            }
            TemporalCell::Rnn => {
                let s = b.g.add(&gi, &gh);
                let h = b.g.tanh(&s);
                (h.clone(), h)
            }
            TemporalCell::Lstm => b.lstm(&gi, &gh, &st, hdim),
            TemporalCell::None => unreachable!("a cell-less TDA folds to Plain"),
        };
        let hs = if t.scale_at == ScaleAt::GruOutput {
            b.g.mul(&h_new, &sc)
        } else {
            h_new
        };
        let hs = b.g.gelu_erf(&hs);
        let mut u = b.linear(&hs, "tda_up", &t.up, qa);
        if t.scale_at == ScaleAt::PostUp {
            u = b.g.mul(&u, &sc);
        }
        (b.g.add(mlp, &u), state, width)
    }

    /// A GRU step from the input and hidden projections `gi`, `gh` (PyTorch gate order r, z, n;
    /// the reset gate multiplies `W_hn h + b_hn`): `h' = n + z ⊙ (h - n)`.
    fn gru(&mut self, gi: &str, gh: &str, h_prev: &str, hdim: usize) -> String {
        let b = self;
        let gi_rz = b.cols(gi, 0, 2 * hdim);
        let gh_rz = b.cols(gh, 0, 2 * hdim);
        let rz = b.g.add(&gi_rz, &gh_rz);
        let rz = b.g.sigmoid(&rz);
        let rg = b.cols(&rz, 0, hdim);
        let zg = b.cols(&rz, hdim, 2 * hdim);
        let gi_n = b.cols(gi, 2 * hdim, 3 * hdim);
        let gh_n = b.cols(gh, 2 * hdim, 3 * hdim);
        let rn = b.g.mul(&rg, &gh_n);
        let n = b.g.add(&gi_n, &rn);
        let n = b.g.tanh(&n);
        let diff = b.g.sub(h_prev, &n);
        let zd = b.g.mul(&zg, &diff);
        b.g.add(&n, &zd)
    }

    /// An LSTM step (PyTorch gate order i, f, g, o) on the state `[h | c]`: returns `h'` and
    /// the next state `[h' | c']`.
    fn lstm(&mut self, gi: &str, gh: &str, st: &str, hdim: usize) -> (String, String) {
        let b = self;
        let c_prev = b.cols(st, hdim, 2 * hdim);
        let gates = b.g.add(gi, gh);
        let ig = b.cols(&gates, 0, hdim);
        let ig = b.g.sigmoid(&ig);
        let fg = b.cols(&gates, hdim, 2 * hdim);
        let fg = b.g.sigmoid(&fg);
        let gg = b.cols(&gates, 2 * hdim, 3 * hdim);
        let gg = b.g.tanh(&gg);
        let og = b.cols(&gates, 3 * hdim, 4 * hdim);
        let og = b.g.sigmoid(&og);
        let fc = b.g.mul(&fg, &c_prev);
        let ic = b.g.mul(&ig, &gg);
        let c = b.g.add(&fc, &ic);
        let tc = b.g.tanh(&c);
        let h = b.g.mul(&og, &tc);
        let state = b.g.concat(&[&h, &c], 1);
        (h, state)
    }
}

//! One int8 linear layer as one tract operator, for x86-64 CPUs without VNNI: pe-clip's
//! `QuantizeLinear → MatMulInteger → [Add bias] → Cast → Mul(rescale)` chain
//! ([`crate::onnx::fused_int8_linears`] writes it as one `PeClipInt8Linear` node) computed as
//!
//! `y[i, j] = f32(Σ_k q(x[i, k]) · W_q[k, j] + bias_q[j]) · rescale[j]`,
//! `q(x) = clamp(round_half_even(x · (1 / x_scale)), -128, 127)`,
//!
//! the same arithmetic tract's own operators do for that chain (the quantize multiplies by the
//! reciprocal scale, as tract's `QuantizeLinear` does), so the outputs are bit-identical to the
//! native and the i32-widened forms (test `fused_int8_linears_give_identical_outputs`).
//!
//! Why: tract 0.23.9's x86 i8 kernel without VNNI runs at about 0.5 G MAC/s, and its f32
//! kernels give int8 no gain over f32. Here the int8 values are widened to i16 and multiplied
//! with AVX2's `vpmaddwd` (16 products and 8 pair sums per instruction into i32, exact: |q| <=
//! 128, so no pair sum saturates and no i32 sum of up to 2^17 terms overflows), on a 6 x 16
//! register tile: one instruction does the work of two f32 FMAs. The weights are packed once, at
//! load, as i16 (half the bytes of the f32-widened form).
//!
//! On aarch64 with the dot-product extension (Armv8.2+, the Jetson Orin's Cortex-A78AE) the same
//! tile runs on `sdot` (16 i8 products and 4 sums of 4 per instruction into i32) over weights
//! packed as i8 in groups of 4 inner rows, and the quantize runs in NEON. It is chosen only by
//! `PE_CLIP_INT8_MATMUL=fused` there (tract's own SDOT kernel stays the default until a board
//! has measured which is faster; docs/device.md).

use std::sync::Arc;

use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::onnx::FUSED_OP_TYPE as OP_TYPE;

/// Columns of one packed weight panel (two AVX2 registers of eight i32 sums).
const NR: usize = 16;
/// Rows of one register tile.
const MR: usize = 6;

/// `onnx` with the fused layer registered.
pub fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert(OP_TYPE, parse);
}

fn parse(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    ensure!(
        node.input.len() == 4 || node.input.len() == 5,
        "{OP_TYPE} {}: {} inputs, expected x, x_scale, weight_q, rescale [, bias_q]",
        node.name,
        node.input.len()
    );
    let columns = match node.get_attr_opt_vec::<i64>("columns")? {
        None => Vec::new(),
        Some(c) => {
            ensure!(
                !c.is_empty() && c.len() % 2 == 0 && c.len() / 2 == node.output.len(),
                "{OP_TYPE} {}: {} column bounds for {} outputs",
                node.name,
                c.len(),
                node.output.len()
            );
            let mut ranges = Vec::new();
            for b in c.chunks_exact(2) {
                ensure!(
                    0 <= b[0] && b[0] < b[1],
                    "{OP_TYPE} {}: empty or negative column range {}..{}",
                    node.name,
                    b[0],
                    b[1]
                );
                ranges.push((b[0] as usize, b[1] as usize));
            }
            ranges
        }
    };
    let quick_gelu = node.get_attr_opt::<f32>("quick_gelu_alpha")?;
    ensure!(
        quick_gelu.is_none() || columns.is_empty(),
        "{OP_TYPE} {}: quick_gelu_alpha with column ranges",
        node.name
    );
    let quick_gelu = quick_gelu.map(f32::to_bits);
    Ok((
        expand(FusedExpansion {
            columns,
            quick_gelu,
        }),
        vec![],
    ))
}

/// The ONNX node: `columns` empty for one output of every column, else its column ranges;
/// `quick_gelu` the bits of `alpha` of `y · σ(alpha · y)` applied to the output, if any.
#[derive(Debug, Clone, Hash)]
struct FusedExpansion {
    columns: Vec<(usize, usize)>,
    quick_gelu: Option<u32>,
}

impl Expansion for FusedExpansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.columns.len().max(1))
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> TractResult<()> {
        check_output_arity(outputs, self.columns.len().max(1))?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[2].rank, 2)?;
        for o in outputs {
            s.equals(&o.datum_type, f32::datum_type())?;
            s.equals(&o.rank, &inputs[0].rank)?;
        }
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            ensure!(rank >= 1, "{OP_TYPE}: a scalar input");
            s.equals(&inputs[0].shape[rank - 1], &inputs[2].shape[0])?;
            for (i, o) in outputs.iter().enumerate() {
                for d in 0..rank - 1 {
                    s.equals(&o.shape[d], &inputs[0].shape[d])?;
                }
                match self.columns.get(i) {
                    Some(&(start, end)) => s.equals(&o.shape[rank - 1], (end - start).to_dim())?,
                    None => s.equals(&o.shape[rank - 1], &inputs[2].shape[1])?,
                }
            }
            Ok(())
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let konst = |i: usize, what: &str| -> TractResult<Arc<Tensor>> {
            model
                .outlet_fact(inputs[i])?
                .konst
                .clone()
                .with_context(|| format!("{prefix}: {what} must be a constant"))
        };
        let x_scale = konst(1, "x_scale")?;
        let weight = konst(2, "weight_q")?;
        let rescale = konst(3, "rescale")?;
        let bias = inputs.get(4).map(|_| konst(4, "bias_q")).transpose()?;
        let (k, n) = match weight.shape() {
            &[k, n] if k > 0 && n > 0 => (k, n),
            s => bail!("{prefix}: weight_q shape {s:?} is not [in, out]"),
        };
        let x_scale = x_scale.cast_to::<f32>()?;
        let x_scale = x_scale.try_as_plain_ram()?.as_slice::<f32>()?;
        ensure!(
            x_scale.len() == 1,
            "{prefix}: x_scale has {} values",
            x_scale.len()
        );
        let weight = weight.cast_to::<i8>()?;
        let rescale = rescale.cast_to::<f32>()?;
        let rescale = rescale.try_as_plain_ram()?.as_slice::<f32>()?;
        ensure!(
            rescale.len() == 1 || rescale.len() == n,
            "{prefix}: rescale has {} values for {n} columns",
            rescale.len()
        );
        let bias = match bias {
            Some(b) => {
                let b = b.cast_to::<i32>()?;
                let b = b.try_as_plain_ram()?.as_slice::<i32>()?.to_vec();
                ensure!(
                    b.len() == n,
                    "{prefix}: bias_q has {} values for {n} columns",
                    b.len()
                );
                b
            }
            None => vec![0; n],
        };
        let columns = if self.columns.is_empty() {
            vec![(0, n)]
        } else {
            self.columns.clone()
        };
        if let Some(&(start, end)) = columns.iter().find(|c| c.1 > n) {
            bail!("{prefix}: column range {start}..{end} of a layer {n} wide");
        }
        if columns.len() > 1 || columns[0] != (0, n) {
            let rank = model.outlet_fact(inputs[0])?.rank();
            ensure!(rank == 2, "{prefix}: column ranges of a rank-{rank} input");
        }
        let mut op = Int8Linear::with_columns(
            x_scale[0],
            weight.try_as_plain_ram()?.as_slice::<i8>()?,
            k,
            n,
            &bias,
            &if rescale.len() == 1 {
                vec![rescale[0]; n]
            } else {
                rescale.to_vec()
            },
            &columns,
            Kernel::best(),
        );
        if let Some(alpha) = self.quick_gelu {
            op = op.with_quick_gelu(f32::from_bits(alpha))?;
        }
        model.wire_node(prefix, op, &inputs[..1])
    }
}

/// Which matrix kernel a fused layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `vpmaddwd` on a 6 x 16 tile of i16 (x86-64 with AVX2).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// `sdot` on a 6 x 16 tile of i8 (aarch64 with the dot-product extension).
    #[cfg(target_arch = "aarch64")]
    Dot,
    /// Plain Rust loops on i16: any CPU, and the reference the others are tested against.
    Portable,
}

impl Kernel {
    /// AVX2 or the dot product where this CPU has it (and tract's probed set, `TRACT_CPU_ISA`
    /// included, has it), else portable.
    pub fn best() -> Self {
        use tract_onnx::tract_core::tract_linalg::isa::{native, Isa};
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && native().has(Isa::X86_64Avx2) {
            return Kernel::Avx2;
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") && native().has(Isa::Aarch64DotProd) {
            return Kernel::Dot;
        }
        let _ = (native, Isa::Aarch64);
        Kernel::Portable
    }

    /// Its operand forms, activations•weights, as `pe-clip info --cost` lists them.
    pub fn packing(self) -> &'static str {
        #[cfg(target_arch = "aarch64")]
        if self == Kernel::Dot {
            return "i8 rows in quads•i8 quad panels of 16";
        }
        "i8 rows as i16 pairs•i16 pair panels of 16"
    }

    /// The name `pe-clip info --cost` lists the kernel under.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "pe-clip avx2_i16_madd_6x16",
            #[cfg(target_arch = "aarch64")]
            Kernel::Dot => "pe-clip arm64_sdot_i8_6x16",
            Kernel::Portable => "pe-clip portable_i16_6x16",
        }
    }
}

/// The weights of one output in panels of [`NR`] columns, `D` inner rows per group (the
/// kernel's operand form): panel `p`, group `g`, column `c`, value `v` at `((p · G + g) · NR +
/// c) · D + v` holds `W_q[D·g + v, p·NR + c]` of the output's columns, zero past the edges
/// (`G = ceil(k / D)`); with their bias and rescale.
struct Columns<T> {
    n: usize,
    w: Vec<T>,
    bias: Vec<i32>,
    rescale: Vec<f32>,
}

/// Every output's weights in the operand form of the kernel.
enum Packed {
    /// `D = 2`, i16: [`Kernel::Avx2`] and [`Kernel::Portable`].
    Pairs(Vec<Columns<i16>>),
    /// `D = 4`, i8: `Kernel::Dot`.
    #[cfg(target_arch = "aarch64")]
    Quads(Vec<Columns<i8>>),
}

impl Packed {
    /// `w` row-major `[k, n]`; one output per column range.
    fn new(
        w: &[i8],
        k: usize,
        n: usize,
        bias: &[i32],
        rescale: &[f32],
        columns: &[(usize, usize)],
        kernel: Kernel,
    ) -> Self {
        fn each<T: From<i8> + Copy + Default>(
            w: &[i8],
            k: usize,
            n: usize,
            bias: &[i32],
            rescale: &[f32],
            columns: &[(usize, usize)],
            depth: usize,
        ) -> Vec<Columns<T>> {
            columns
                .iter()
                .map(|&(start, end)| {
                    let cols: Vec<i8> = w
                        .chunks_exact(n)
                        .flat_map(|row| row[start..end].iter().copied())
                        .collect();
                    Columns {
                        n: end - start,
                        w: pack(&cols, k, end - start, depth),
                        bias: bias[start..end].to_vec(),
                        rescale: rescale[start..end].to_vec(),
                    }
                })
                .collect()
        }
        #[cfg(target_arch = "aarch64")]
        if kernel == Kernel::Dot {
            return Packed::Quads(each(w, k, n, bias, rescale, columns, 4));
        }
        let _ = kernel;
        Packed::Pairs(each(w, k, n, bias, rescale, columns, 2))
    }

    fn widths(&self) -> Vec<usize> {
        match self {
            Packed::Pairs(c) => c.iter().map(|c| c.n).collect(),
            #[cfg(target_arch = "aarch64")]
            Packed::Quads(c) => c.iter().map(|c| c.n).collect(),
        }
    }
}

/// [`Packed`]'s layout with `depth` inner rows per group.
fn pack<T: From<i8> + Copy + Default>(w: &[i8], k: usize, n: usize, depth: usize) -> Vec<T> {
    let groups = k.div_ceil(depth);
    let mut data = vec![T::default(); n.div_ceil(NR) * groups * NR * depth];
    for (row, w_row) in w.chunks_exact(n).enumerate() {
        let (g, v) = (row / depth, row % depth);
        for (col, &x) in w_row.iter().enumerate() {
            let (p, c) = (col / NR, col % NR);
            data[((p * groups + g) * NR + c) * depth + v] = T::from(x);
        }
    }
    data
}

/// The fused int8 layer (module docs): weights packed at load, one evaluation per step; one
/// output per column range of the layer (the whole layer, or the slices that read it).
#[derive(Clone)]
pub struct Int8Linear {
    k: usize,
    inv_scale: f32,
    packed: Arc<Packed>,
    /// Each output's width.
    widths: Arc<[usize]>,
    kernel: Kernel,
    /// `y · σ(alpha · y)` on the output, with tract's sigmoid kernel for this CPU.
    quick_gelu: Option<(f32, Arc<QuickGeluSigmoid>)>,
}

type QuickGeluSigmoid =
    Box<dyn tract_onnx::tract_core::tract_linalg::element_wise::ElementWise<f32>>;

impl std::fmt::Debug for Int8Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{OP_TYPE}({} x {:?}, {:?})",
            self.k, self.widths, self.kernel
        )
    }
}

impl PartialEq for Int8Linear {
    /// Two layers are one when they share their packed weights (tract compares operators to
    /// merge duplicates; comparing megabytes of weights would buy nothing).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.packed, &other.packed)
            && self.inv_scale.to_bits() == other.inv_scale.to_bits()
            && self.kernel == other.kernel
            && self.quick_gelu.as_ref().map(|g| g.0.to_bits())
                == other.quick_gelu.as_ref().map(|g| g.0.to_bits())
    }
}
impl Eq for Int8Linear {}

impl Int8Linear {
    /// `w` is `W_q`, row-major `[k, n]`; `bias` and `rescale` have `n` values; one output per
    /// column range `start..end` of the layer (each nonempty, within `n`).
    #[allow(clippy::too_many_arguments)]
    pub fn with_columns(
        x_scale: f32,
        w: &[i8],
        k: usize,
        n: usize,
        bias: &[i32],
        rescale: &[f32],
        columns: &[(usize, usize)],
        kernel: Kernel,
    ) -> Self {
        assert!(w.len() == k * n && bias.len() == n && rescale.len() == n);
        assert!(!columns.is_empty() && columns.iter().all(|&(s, e)| s < e && e <= n));
        let packed = Packed::new(w, k, n, bias, rescale, columns, kernel);
        Self {
            k,
            inv_scale: x_scale.recip(),
            widths: packed.widths().into(),
            packed: Arc::new(packed),
            kernel,
            quick_gelu: None,
        }
    }

    /// The layer followed by CLIP's QuickGELU `y · σ(alpha · y)` (one output only), computed
    /// as tract computes `Mul → Sigmoid → Mul`: the same f32 products and tract's own sigmoid
    /// kernel for this CPU, so the values are the same bit for bit.
    pub fn with_quick_gelu(mut self, alpha: f32) -> TractResult<Self> {
        ensure!(
            self.widths.len() == 1,
            "{OP_TYPE}: QuickGELU after {} outputs",
            self.widths.len()
        );
        use tract_onnx::tract_core::tract_linalg::routines::Func;
        self.quick_gelu = Some((alpha, Arc::new(Func::Sigmoid.ew_f32()?)));
        Ok(self)
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Inner width and the sum of the outputs' widths (the columns computed).
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.widths.iter().sum())
    }

    /// `ys[i]` (`m` rows of output `i`'s width) from `x` (`m` rows of `k`). Each task of
    /// tract's pool quantizes and multiplies its own block of rows, so no pass over `x` stays
    /// on one thread.
    pub fn apply(&self, x: &[f32], ys: &mut [&mut [f32]]) {
        let m = x.len() / self.k;
        debug_assert!(x.len() == m * self.k && ys.len() == self.widths.len());
        debug_assert!(ys
            .iter()
            .zip(self.widths.iter())
            .all(|(y, n)| y.len() == m * n));
        let run = |row0: usize, ys: &mut [&mut [f32]]| {
            let rows = ys[0].len() / self.widths[0];
            self.rows(&x[row0 * self.k..(row0 + rows) * self.k], ys)
        };
        use tract_onnx::tract_core::tract_linalg::multithread::{current_tract_executor, Executor};
        match current_tract_executor() {
            Executor::MultiThread(pool) if pool.current_num_threads() > 1 && m > MR => {
                use rayon::prelude::*;
                let threads = pool.current_num_threads();
                let chunk = m.div_ceil(threads).div_ceil(MR) * MR;
                let mut tasks: Vec<Vec<&mut [f32]>> = (0..m.div_ceil(chunk))
                    .map(|_| Vec::with_capacity(ys.len()))
                    .collect();
                for (y, &n) in ys.iter_mut().zip(self.widths.iter()) {
                    for (task, part) in tasks.iter_mut().zip(y.chunks_mut(chunk * n)) {
                        task.push(part);
                    }
                }
                pool.install(|| {
                    tasks
                        .into_par_iter()
                        .enumerate()
                        .for_each(|(i, mut ys)| run(i * chunk, &mut ys))
                });
            }
            _ => run(0, ys),
        }
    }

    /// The rows of every output from the same rows of `x`, in the operand form of the kernel.
    fn rows(&self, x: &[f32], ys: &mut [&mut [f32]]) {
        let s = self.inv_scale;
        match &*self.packed {
            Packed::Pairs(outputs) => self.rows_in(
                x,
                ys,
                outputs,
                2 * self.k.div_ceil(2),
                |x, a| quantize_row(x, s, a, self.kernel),
                |a, lda, panel, rows, acc| tile(self.kernel, a, lda / 2, panel, rows, acc),
            ),
            #[cfg(target_arch = "aarch64")]
            Packed::Quads(outputs) => self.rows_in(
                x,
                ys,
                outputs,
                4 * self.k.div_ceil(4),
                |x, a| dot::quantize_row(x, s, a),
                |a, lda, panel, rows, acc| dot::tile(a, lda / 4, panel, rows, acc),
            ),
        }
    }

    /// `rows` with the packed weights of each output: `x` quantized once into a buffer of row
    /// stride `lda` (`k` rounded up to the kernel's group, zero past `k`), then each output
    /// multiplied panel by panel so a panel's weights stay in cache while every row block
    /// passes. `tile(a, lda, panel, rows, acc)` sets the first `rows` rows of `acc` from those
    /// of `a`.
    fn rows_in<T: Copy + Default>(
        &self,
        x: &[f32],
        ys: &mut [&mut [f32]],
        outputs: &[Columns<T>],
        lda: usize,
        quantize: impl Fn(&[f32], &mut [T]),
        tile: impl Fn(&[T], usize, &[T], usize, &mut [[i32; NR]; MR]),
    ) {
        let m = x.len() / self.k;
        let mut a = vec![T::default(); m * lda];
        for (a_row, x_row) in a.chunks_exact_mut(lda).zip(x.chunks_exact(self.k)) {
            quantize(x_row, &mut a_row[..self.k]);
        }
        let panel_len = lda * NR;
        let mut acc = [[0i32; NR]; MR];
        for (cols, y) in outputs.iter().zip(ys.iter_mut()) {
            let n = cols.n;
            for p in 0..n.div_ceil(NR) {
                let panel = &cols.w[p * panel_len..(p + 1) * panel_len];
                let (c0, width) = (p * NR, (n - p * NR).min(NR));
                for r0 in (0..m).step_by(MR) {
                    let rows = (m - r0).min(MR);
                    tile(&a[r0 * lda..], lda, panel, rows, &mut acc);
                    for (r, acc) in acc.iter().enumerate().take(rows) {
                        let out = &mut y[(r0 + r) * n + c0..][..width];
                        for (c, o) in out.iter_mut().enumerate() {
                            let j = c0 + c;
                            *o = acc[c].wrapping_add(cols.bias[j]) as f32 * cols.rescale[j];
                        }
                    }
                }
            }
            if let Some((alpha, sigmoid)) = &self.quick_gelu {
                // This task's rows, still in cache.
                let mut s: Vec<f32> = y.iter().map(|&v| v * alpha).collect();
                sigmoid
                    .run(&mut s)
                    .expect("tract's sigmoid kernel runs on any f32 slice");
                for (v, s) in y.iter_mut().zip(&s) {
                    *v *= s;
                }
            }
        }
    }
}

/// `q(x)` of one row into i16.
fn quantize_row(x: &[f32], inv_scale: f32, out: &mut [i16], kernel: Kernel) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 {
        return avx2::quantize_row(x, inv_scale, out);
    }
    let _ = kernel;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = quantize(v, inv_scale);
    }
}

/// tract's `QuantizeLinear` to int8 with a zero zero point: NaN gives 0.
fn quantize(x: f32, inv_scale: f32) -> i16 {
    ((x * inv_scale).round_ties_even() as i32).clamp(-128, 127) as i16
}

/// `acc[r][c] = Σ_kk a[r][2kk..2kk+2] · panel[kk][c]` for the first `rows` rows.
fn tile(
    kernel: Kernel,
    a: &[i16],
    kp: usize,
    panel: &[i16],
    rows: usize,
    acc: &mut [[i32; NR]; MR],
) {
    assert!((1..=MR).contains(&rows) && a.len() >= rows * kp * 2);
    assert_eq!(panel.len(), kp * NR * 2);
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 {
        return avx2::tile(a, kp, panel, rows, acc);
    }
    let _ = kernel;
    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
        let a = &a[r * kp * 2..][..kp * 2];
        *acc = [0; NR];
        for (pair, b) in a.chunks_exact(2).zip(panel.chunks_exact(NR * 2)) {
            for (c, s) in acc.iter_mut().enumerate() {
                *s += i32::from(pair[0]) * i32::from(b[2 * c])
                    + i32::from(pair[1]) * i32::from(b[2 * c + 1]);
            }
        }
    }
}

/// The AVX2 kernels: the only unsafe code of this crate (SIMD loads and stores through raw
/// pointers, and calls of `#[target_feature]` functions), behind safe entry points that check
/// the CPU and every bound.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    fn has_avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    /// [`super::tile`] on AVX2. Panics where the CPU lacks AVX2 or a bound does not hold.
    pub fn tile(a: &[i16], kp: usize, panel: &[i16], rows: usize, acc: &mut [[i32; NR]; MR]) {
        assert!(has_avx2(), "the AVX2 kernel on a CPU without AVX2");
        assert!((1..=MR).contains(&rows) && a.len() >= rows * kp * 2);
        assert_eq!(panel.len(), kp * NR * 2);
        let (a, b) = (a.as_ptr(), panel.as_ptr());
        // SAFETY: the CPU has AVX2 and `a` holds `rows` rows of `2 · kp`, `b` a whole panel
        // (asserted above), which is what `tile_r` reads.
        unsafe {
            match rows {
                6 => tile_r::<6>(a, kp, b, acc),
                5 => tile_r::<5>(a, kp, b, acc),
                4 => tile_r::<4>(a, kp, b, acc),
                3 => tile_r::<3>(a, kp, b, acc),
                2 => tile_r::<2>(a, kp, b, acc),
                _ => tile_r::<1>(a, kp, b, acc),
            }
        }
    }

    /// The register tile: for each pair of inner rows, two loads of the panel (16 columns x 2
    /// i16), then per row one broadcast of its i16 pair and two `vpmaddwd` + `vpaddd`.
    ///
    /// # Safety
    /// AVX2; `a` holds `R` rows of `2 · kp` i16 (stride `2 · kp`), `b` `kp · NR · 2` i16.
    #[target_feature(enable = "avx2")]
    unsafe fn tile_r<const R: usize>(
        a: *const i16,
        kp: usize,
        b: *const i16,
        out: &mut [[i32; NR]; MR],
    ) {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for kk in 0..kp {
            // SAFETY (all three reads): kk < kp and r < R are within the bounds above.
            let b0 = unsafe { _mm256_loadu_si256(b.add(kk * NR * 2) as *const __m256i) };
            let b1 = unsafe { _mm256_loadu_si256(b.add(kk * NR * 2 + 16) as *const __m256i) };
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = unsafe { (a.add(r * kp * 2 + 2 * kk) as *const i32).read_unaligned() };
                let av = _mm256_set1_epi32(pair);
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(av, b0));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(av, b1));
            }
        }
        for (o, acc) in out.iter_mut().zip(acc.iter()) {
            // SAFETY: `o` is 16 i32, two registers' worth.
            unsafe {
                _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, acc[0]);
                _mm256_storeu_si256(o.as_mut_ptr().add(8) as *mut __m256i, acc[1]);
            }
        }
    }

    /// [`super::quantize`] of `x` into `out` (their common length) on AVX2. Panics where the
    /// CPU lacks AVX2.
    pub fn quantize_row(x: &[f32], inv_scale: f32, out: &mut [i16]) {
        assert!(has_avx2(), "the AVX2 kernel on a CPU without AVX2");
        // SAFETY: the CPU has AVX2.
        unsafe { quantize_row_avx2(x, inv_scale, out) }
    }

    /// Eight at a time: NaN masked to 0, clamped in f32 (so no conversion overflows), rounded
    /// half to even by `vcvtps2dq` under the default rounding mode; the tail as the scalar.
    ///
    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_row_avx2(x: &[f32], inv_scale: f32, out: &mut [i16]) {
        let n = out.len().min(x.len());
        let (s, lo, hi) = (
            _mm256_set1_ps(inv_scale),
            _mm256_set1_ps(-128.0),
            _mm256_set1_ps(127.0),
        );
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, within both slices.
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            let v = _mm256_mul_ps(v, s);
            let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
            let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
            let q = _mm256_cvtps_epi32(v);
            let packed =
                _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            unsafe { _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, packed) };
            i += 8;
        }
        for j in i..n {
            out[j] = super::quantize(x[j], inv_scale);
        }
    }
}

/// The aarch64 dot-product kernels: unsafe code (SIMD loads and stores through raw pointers,
/// `sdot` by inline assembly since its intrinsic is unstable in Rust 1.95, and calls of
/// `#[target_feature]` functions) behind safe entry points that check the CPU and every bound.
#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod dot {
    use super::{MR, NR};
    use std::arch::aarch64::*;

    fn has_dotprod() -> bool {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }

    /// `acc[r][c] = Σ_g a[r][4g..4g+4] · panel[g][c][..4]` for the first `rows` rows; `a` has
    /// row stride `4 · kq`. Panics where the CPU lacks the dot product or a bound does not hold.
    pub fn tile(a: &[i8], kq: usize, panel: &[i8], rows: usize, acc: &mut [[i32; NR]; MR]) {
        assert!(
            has_dotprod(),
            "the SDOT kernel on a CPU without the dot product"
        );
        assert!((1..=MR).contains(&rows) && a.len() >= rows * kq * 4);
        assert_eq!(panel.len(), kq * NR * 4);
        let (a, b) = (a.as_ptr(), panel.as_ptr());
        // SAFETY: the CPU has the dot product and `a` holds `rows` rows of `4 · kq`, `b` a
        // whole panel (asserted above), which is what `tile_r` reads.
        unsafe {
            match rows {
                6 => tile_r::<6>(a, kq, b, acc),
                5 => tile_r::<5>(a, kq, b, acc),
                4 => tile_r::<4>(a, kq, b, acc),
                3 => tile_r::<3>(a, kq, b, acc),
                2 => tile_r::<2>(a, kq, b, acc),
                _ => tile_r::<1>(a, kq, b, acc),
            }
        }
    }

    /// `$acc.4s += $b.16b · $a.16b`, lane `i` gaining the dot product of the 4 bytes `4i..4i+4`
    /// of both. Only inside a `#[target_feature(enable = "dotprod")]` function, where the
    /// assembler accepts `sdot`.
    macro_rules! sdot {
        ($acc:expr, $b:expr, $a:expr) => {
            std::arch::asm!(
                "sdot {acc:v}.4s, {b:v}.16b, {a:v}.16b",
                acc = inout(vreg) $acc,
                b = in(vreg) $b,
                a = in(vreg) $a,
                options(pure, nomem, nostack)
            )
        };
    }

    /// The register tile: for each group of 4 inner rows, four loads of the panel (16 columns
    /// x 4 i8, 4 columns a register), then per row one broadcast of its 4 bytes and four
    /// `sdot`s: 4·R accumulators + 4 weight registers + 1 of NEON's 32.
    ///
    /// # Safety
    /// The dot product; `a` holds `R` rows of `4 · kq` i8 (stride `4 · kq`), `b` `kq · NR · 4`.
    #[target_feature(enable = "dotprod")]
    unsafe fn tile_r<const R: usize>(
        a: *const i8,
        kq: usize,
        b: *const i8,
        out: &mut [[i32; NR]; MR],
    ) {
        let mut acc = [[vdupq_n_s32(0); 4]; R];
        for g in 0..kq {
            // SAFETY (all reads): g < kq and r < R are within the bounds above; the 4 bytes of
            // a row's group are read unaligned.
            let bg = unsafe { b.add(g * NR * 4) };
            let bv = unsafe {
                [
                    vld1q_s8(bg),
                    vld1q_s8(bg.add(16)),
                    vld1q_s8(bg.add(32)),
                    vld1q_s8(bg.add(48)),
                ]
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let quad = unsafe { (a.add(r * kq * 4 + 4 * g) as *const i32).read_unaligned() };
                let av = vreinterpretq_s8_s32(vdupq_n_s32(quad));
                for (acc, &bq) in acc.iter_mut().zip(bv.iter()) {
                    // SAFETY: `sdot` reads and writes registers only; this function enables
                    // the dot product.
                    unsafe { sdot!(*acc, bq, av) };
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc.iter()) {
            for (q, &v) in acc.iter().enumerate() {
                // SAFETY: `o` is 16 i32, four registers' worth.
                unsafe { vst1q_s32(o.as_mut_ptr().add(4 * q), v) };
            }
        }
    }

    /// [`super::quantize`] of `x` into `out` (their common length) as i8, in NEON (baseline on
    /// aarch64): `fcvtns` rounds half to even, gives 0 for NaN and saturates, and the two
    /// saturating narrows clamp to -128..127, which is the scalar's arithmetic.
    pub fn quantize_row(x: &[f32], inv_scale: f32, out: &mut [i8]) {
        // SAFETY: Advanced SIMD is part of every aarch64 target Rust builds for.
        unsafe { quantize_row_neon(x, inv_scale, out) }
    }

    #[target_feature(enable = "neon")]
    fn quantize_row_neon(x: &[f32], inv_scale: f32, out: &mut [i8]) {
        let n = out.len().min(x.len());
        let s = vdupq_n_f32(inv_scale);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, within both slices.
            let (v0, v1) = unsafe {
                (
                    vld1q_f32(x.as_ptr().add(i)),
                    vld1q_f32(x.as_ptr().add(i + 4)),
                )
            };
            let q0 = vcvtnq_s32_f32(vmulq_f32(v0, s));
            let q1 = vcvtnq_s32_f32(vmulq_f32(v1, s));
            let q = vqmovn_s16(vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1)));
            unsafe { vst1_s8(out.as_mut_ptr().add(i), q) };
            i += 8;
        }
        for j in i..n {
            out[j] = super::quantize(x[j], inv_scale) as i8;
        }
    }
}

impl Op for Int8Linear {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} x {:?} on {}",
            self.k,
            self.widths,
            self.kernel.name()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Int8Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let x = x.cast_to::<f32>()?;
        let shape = x.shape();
        ensure!(
            shape.last() == Some(&self.k),
            "{OP_TYPE}: input shape {shape:?}, inner size {} expected",
            self.k
        );
        let rows = x.len() / self.k;
        let mut ys: Vec<Vec<f32>> = self.widths.iter().map(|&n| vec![0.0; rows * n]).collect();
        let mut slices: Vec<&mut [f32]> = ys.iter_mut().map(Vec::as_mut_slice).collect();
        self.apply(x.try_as_plain_ram()?.as_slice::<f32>()?, &mut slices);
        ys.into_iter()
            .zip(self.widths.iter())
            .map(|(y, &n)| {
                let mut out_shape: TVec<usize> = shape.into();
                *out_shape.last_mut().expect("rank checked") = n;
                let y = tract_ndarray::ArrayD::from_shape_vec(&*out_shape, y)?;
                Ok(y.into_tensor().into_tvalue())
            })
            .collect()
    }
}

impl TypedOp for Int8Linear {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(
            x.datum_type == f32::datum_type(),
            "{OP_TYPE}: input is {:?}",
            x.datum_type
        );
        ensure!(
            x.shape.last() == Some(&self.k.to_dim()),
            "{OP_TYPE}: input shape {:?}, inner size {} expected",
            x.shape,
            self.k
        );
        Ok(self
            .widths
            .iter()
            .map(|&n| {
                let mut shape: TVec<TDim> = x.shape.iter().cloned().collect();
                *shape.last_mut().expect("rank checked") = n.to_dim();
                f32::fact(shape)
            })
            .collect())
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let rows: TDim = inputs[0].shape.iter().rev().skip(1).product();
        Ok(tvec!((
            Cost::FMA(i8::datum_type()),
            rows * (self.k * self.dims().1)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{fused_int8_linears, pb, to_model_proto, widened_int8_matmuls, Widening};
    use pe_clip_calibrate::graph::{ElemType, Graph, LinearOpts};
    use pe_clip_calibrate::int8::{quantize as quantize_graph, LinearRanges};
    use pe_clip_models::rng::SeededRng;
    use std::collections::HashMap;

    /// `m`'s first output, run once through pe-clip's reader on one f32 input.
    fn run_once(m: &pb::ModelProto, shape: &[usize], x: &[f32]) -> Vec<f32> {
        crate::onnx::run_once_with(&crate::engine::onnx_reader(), m, shape, x)
    }

    /// A random layer `[k, n]`: its weights, bias and rescale.
    struct Layer {
        k: usize,
        n: usize,
        w: Vec<i8>,
        bias: Vec<i32>,
        rescale: Vec<f32>,
    }

    const X_SCALE: f32 = 0.05;

    fn layer(k: usize, n: usize, rng: &mut SeededRng) -> Layer {
        Layer {
            k,
            n,
            w: (0..k * n)
                .map(|_| (rng.below(256) as i32 - 128) as i8)
                .collect(),
            bias: (0..n).map(|_| rng.below(20_001) as i32 - 10_000).collect(),
            rescale: (0..n)
                .map(|_| 1e-4 * (1.0 + rng.uniform() as f32))
                .collect(),
        }
    }

    /// The module's formula, term by term, in i64: columns `start..end` of the layer.
    fn reference(l: &Layer, x: &[f32], (start, end): (usize, usize)) -> Vec<f32> {
        let (k, n) = (l.k, l.n);
        let inv = X_SCALE.recip();
        let mut y = Vec::new();
        for x in x.chunks_exact(k) {
            for j in start..end {
                let s: i64 = (0..k)
                    .map(|t| i64::from(quantize(x[t], inv)) * i64::from(l.w[t * n + j]))
                    .sum();
                y.push((s as i32 + l.bias[j]) as f32 * l.rescale[j]);
            }
        }
        y
    }

    #[test]
    fn both_kernels_give_the_exact_layer_at_every_edge() {
        let mut rng = SeededRng::new(3);
        // Odd inner sizes, widths off the 16-column panel, row counts off the 6-row tile, and
        // inputs far outside the int8 range (saturation) and NaN.
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 17),
            (7, 33, 16),
            (13, 64, 40),
            (197, 24, 31),
        ] {
            let l = layer(k, n, &mut rng);
            let mut x: Vec<f32> = (0..m * k)
                .map(|_| 12.0 * (rng.uniform() as f32 - 0.5))
                .collect();
            x[0] = f32::NAN;
            if x.len() > 2 {
                x[1] = 1e30;
                x[2] = -1e30;
            }
            // The whole layer, and column ranges off the panel edges that skip some columns,
            // repeat others and end at the last.
            let split = [(n / 3, n), (0, n.div_ceil(2)), (n - 1, n)];
            // On one thread, and on three (row blocks of uneven sizes over tract's pool).
            use tract_onnx::tract_core::tract_linalg::multithread::{
                multithread_tract_scope, Executor,
            };
            for columns in [&[(0, n)][..], &split] {
                for kernel in [Kernel::Portable, Kernel::best()] {
                    for threads in [1, 3] {
                        let op = Int8Linear::with_columns(
                            X_SCALE, &l.w, k, n, &l.bias, &l.rescale, columns, kernel,
                        );
                        let mut ys: Vec<Vec<f32>> = columns
                            .iter()
                            .map(|&(s, e)| vec![0.0; m * (e - s)])
                            .collect();
                        let mut out: Vec<&mut [f32]> =
                            ys.iter_mut().map(Vec::as_mut_slice).collect();
                        match threads {
                            1 => op.apply(&x, &mut out),
                            t => multithread_tract_scope(Executor::multithread(t), || {
                                op.apply(&x, &mut out)
                            }),
                        }
                        for (y, &c) in ys.iter().zip(columns) {
                            let what = format!("{m}x{k}x{n} {c:?} {kernel:?} {threads} threads");
                            assert_eq!(y, &reference(&l, &x, c), "{what}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_simd_quantizers_equal_the_scalar_one() {
        let mut rng = SeededRng::new(4);
        let mut x: Vec<f32> = (0..1000)
            .map(|_| 400.0 * (rng.uniform() as f32 - 0.5))
            .collect();
        // Ties, both signs, NaN and infinities.
        x[..8].copy_from_slice(&[
            0.5,
            1.5,
            2.5,
            -0.5,
            -2.5,
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
        ]);
        let mut fast = vec![0i16; x.len()];
        quantize_row(&x, 1.0, &mut fast, Kernel::best());
        let slow: Vec<i16> = x.iter().map(|&v| quantize(v, 1.0)).collect();
        assert_eq!(fast, slow);
        assert_eq!(&fast[..8], &[0, 2, 2, 0, -2, 0, 127, -128]);
        #[cfg(target_arch = "aarch64")]
        {
            // The i8 quantizer of the dot-product kernel, at a length off its 8-lane step.
            let mut neon = vec![0i8; x.len() - 3];
            dot::quantize_row(&x, 1.0, &mut neon);
            let slow: Vec<i8> = slow[..neon.len()].iter().map(|&v| v as i8).collect();
            assert_eq!(neon, slow);
        }
    }

    /// What the fused layer must not absorb: slices one of which is a graph output, and a
    /// QuickGELU whose input something else reads too. The values stay the chain's.
    #[test]
    fn fused_int8_linears_leave_what_others_read() {
        let (rows, inner) = (4, 6);
        let w: Vec<f32> = (0..30).map(|i| (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..rows * inner).map(|i| (i as f32 * 0.71).cos()).collect();
        let opts = LinearOpts {
            bias: None,
            quantizable: true,
        };
        let mut g = Graph::new("kept");
        let xi = g.input("x", ElemType::F32, &[rows, inner]);
        let a = g.linear(&xi, "a", &w, 5, inner, opts.clone());
        let s1 = g.slice(&a, 1, 0, 3);
        let s2 = g.slice(&a, 1, 3, 5);
        let d = g.linear(&s2, "d", &w[..6], 3, 2, opts);
        let gelu = g.quick_gelu(&d);
        let y2 = g.add(&d, &gelu);
        // Named as the slice's own output, so no `Identity` stands between.
        g.output(&s1.clone(), &s1, ElemType::F32, Some(&[rows, 3]));
        g.output(&y2, "y2", ElemType::F32, Some(&[rows, 3]));
        let ranges = HashMap::from([
            ("a".to_string(), LinearRanges { input: 1.0 }),
            ("d".to_string(), LinearRanges { input: 2.0 }),
        ]);
        let m = to_model_proto(&quantize_graph(&g, &ranges, false).0, &[]);
        let fused = fused_int8_linears(&m).unwrap();
        let g2 = fused.graph.as_ref().unwrap();
        let ops = |t: &str| g2.node.iter().filter(|n| n.op_type == t).count();
        assert_eq!((ops(OP_TYPE), ops("Slice"), ops("Sigmoid")), (2, 2, 1));
        assert!(g2
            .node
            .iter()
            .all(|n| n.op_type != OP_TYPE || n.output.len() == 1));
        let run = |m: &pb::ModelProto| run_once(m, &[rows, inner], &x);
        assert_eq!(run(&m), run(&fused));
    }

    /// Two random layers (one with a bias) at sizes off the fused kernel's 6 x 16 tile, inputs
    /// partly beyond the calibrated range: the fused operator gives the int8 chain's outputs
    /// bit for bit, per tensor and per column; a nonzero zero point is refused by name.
    #[test]
    fn fused_int8_linears_give_identical_outputs() {
        let (rows, inner, mid, out) = (13, 40, 37, 19);
        let mut seed = 5u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        let w1: Vec<f32> = (0..mid * inner).map(|_| rand()).collect();
        let w2: Vec<f32> = (0..out * 20).map(|_| rand()).collect();
        let bias: Vec<f32> = (0..mid).map(|_| rand()).collect();
        let x: Vec<f32> = (0..rows * inner).map(|_| 1.5 * rand()).collect();
        let mut g = Graph::new("fused");
        let xi = g.input("x", ElemType::F32, &[rows, inner]);
        let a = g.linear(
            &xi,
            "a",
            &w1,
            mid,
            inner,
            LinearOpts {
                bias: Some(&bias),
                quantizable: true,
            },
        );
        // `a` is read by slices of its columns only (one range twice, columns 20..25 by none):
        // the fused layer computes them as its outputs.
        let a1 = g.slice(&a, 1, 0, 20);
        let a2 = g.slice(&a, -1, 25, 37);
        let a3 = g.slice(&a, 1, 0, 20);
        let y = g.linear(
            &a1,
            "b",
            &w2,
            out,
            20,
            LinearOpts {
                bias: None,
                quantizable: true,
            },
        );
        // `b`'s QuickGELU becomes part of its fused layer.
        let y = g.quick_gelu(&y);
        let y = g.concat(&[&y, &a2, &a3], 1);
        g.output(&y, "y", ElemType::F32, Some(&[rows, out + 12 + 20]));
        let ranges = HashMap::from([
            ("a".to_string(), LinearRanges { input: 1.0 }),
            ("b".to_string(), LinearRanges { input: 2.0 }),
        ]);
        for per_channel in [false, true] {
            let m = to_model_proto(&quantize_graph(&g, &ranges, per_channel).0, &[]);
            let run = |m: &pb::ModelProto| run_once(m, &[rows, inner], &x);
            let fused = fused_int8_linears(&m).unwrap();
            let g2 = fused.graph.as_ref().unwrap();
            let nodes: Vec<_> = g2.node.iter().filter(|n| n.op_type == OP_TYPE).collect();
            assert_eq!(nodes.len(), 2);
            assert_eq!(nodes[0].output.len(), 2, "{:?}", nodes[0]);
            assert!(!g2.node.iter().any(|n| {
                ["MatMulInteger", "Slice", "Sigmoid", "Mul"].contains(&n.op_type.as_str())
            }));
            let native = run(&m);
            assert_eq!(native, run(&fused), "per_channel {per_channel}");
            assert_eq!(
                native,
                run(&widened_int8_matmuls(&m, Widening::I32).unwrap())
            );
        }
        let mut m = to_model_proto(&quantize_graph(&g, &ranges, false).0, &[]);
        let gm = m.graph.as_mut().unwrap();
        let zp = gm
            .node
            .iter()
            .find(|n| n.op_type == "QuantizeLinear")
            .and_then(|n| n.input.get(2).cloned())
            .unwrap();
        let t = gm.initializer.iter_mut().find(|t| t.name == zp).unwrap();
        t.raw_data = vec![3];
        let e = fused_int8_linears(&m).unwrap_err().to_string();
        assert!(e.contains("zero point") && e.contains("not 0"), "{e}");
    }
}

//! The step model in tract: one frame and the per-block recurrent states in, the projected
//! feature and the next states out. Shapes are pinned by the ONNX file, so the model is optimised
//! once and one spawned state is reused for every frame.

use std::sync::Arc;

use pe_clip_models::package::io::{state_input_block, state_output, FEATURE_OUTPUT, FRAME_INPUT};
use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::onnx::Widening;
use crate::package::Package;

mod cost;
mod gpu;
pub(crate) mod linear_i8;
mod pipeline;
pub use cost::{tract_isa, KernelUse, OpClass, StepCost};
pub use pipeline::{blocks_of, split_after_block, BlockPipeline, StageSplit};

/// One state input/output pair of the step model.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSlot {
    /// `state_in.<block>` / `state_out.<block>` (`pe_clip_models::package::io`).
    pub input: String,
    pub output: String,
    pub rows: usize,
    pub width: usize,
}

/// The recurrent state of one stream (zeros start a clip).
#[derive(Debug, Clone)]
pub struct StepState {
    tensors: Vec<Tensor>,
}

impl StepState {
    /// The states as f32 slices, in slot order.
    pub fn values(&self) -> Result<Vec<&[f32]>> {
        self.tensors
            .iter()
            .map(|t| plain_f32(t).map_err(|e| Error::engine("state", e)))
            .collect()
    }
}

/// A value an extra output (calibration tap) took on one frame: its shape and its floats.
pub type TapValue = (Vec<usize>, Vec<f32>);

/// A loaded, optimised step model.
pub struct StepModel {
    plan: Arc<TypedRunnableModel>,
    runner: TypedSimpleState,
    image_size: usize,
    feature_dim: usize,
    slots: Vec<StateSlot>,
    /// Outputs after the feature and the states (calibration taps), by name.
    extra: Vec<String>,
}

impl std::fmt::Debug for StepModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepModel")
            .field("image_size", &self.image_size)
            .field("feature_dim", &self.feature_dim)
            .field("slots", &self.slots)
            .field("extra", &self.extra)
            .finish()
    }
}

/// Select tract's matmul threads for this process (1: single-threaded, tract's default).
pub fn set_threads(n: usize) {
    use tract_linalg::multithread::{set_default_executor, Executor};
    if n <= 1 {
        set_default_executor(Executor::SingleThread);
    } else {
        set_default_executor(Executor::multithread(n));
    }
}

/// tract's ONNX reader with pe-clip's own operator ([`linear_i8`]) registered: every step
/// model, stage or piece of one is read through it.
pub(crate) fn onnx_reader() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    linear_i8::register(&mut onnx);
    onnx
}

fn dims_of(fact: &InferenceFact) -> Option<Vec<usize>> {
    fact.shape
        .as_concrete_finite()
        .ok()
        .flatten()
        .map(|s| s.to_vec())
}

fn plain_f32(t: &Tensor) -> TractResult<&[f32]> {
    t.try_as_plain_ram()?.as_slice::<f32>()
}

/// The recurrent state slots of a step model: every input after the frame is
/// `state_in.<block>`, 2-D and fixed, with its `state_out.<block>` among the outputs.
fn state_slots(
    model: &InferenceModel,
    input_names: &[String],
    output_names: &[String],
    context: &str,
) -> Result<Vec<StateSlot>> {
    let err = |e: TractError| Error::engine(context, e);
    let mut slots = Vec::new();
    for (k, name) in input_names.iter().enumerate().skip(1) {
        let Some(block) = state_input_block(name) else {
            return Err(Error::engine(context, format!("unexpected input {name}")));
        };
        let out = state_output(block);
        if !output_names.contains(&out) {
            return Err(Error::engine(context, format!("{name} has no {out}")));
        }
        let dims = dims_of(&model.input_fact(k).map_err(err)?.clone())
            .ok_or_else(|| Error::engine(context, format!("{name} has no fixed shape")))?;
        let [rows, width] = dims[..] else {
            return Err(Error::engine(
                context,
                format!("{name} must be 2-D, is {dims:?}"),
            ));
        };
        slots.push(StateSlot {
            input: name.clone(),
            output: out,
            rows,
            width,
        });
    }
    Ok(slots)
}

/// Where a step model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// tract on the CPU.
    Cpu,
    /// tract's CUDA runtime on an NVIDIA GPU (feature `gpu`); operators it has no GPU kernel
    /// for stay on the CPU, listed at `-v`.
    Gpu,
    /// The GPU when this build has the `gpu` feature and CUDA loads, else the CPU.
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "gpu" => Ok(Device::Gpu),
            "auto" => Ok(Device::Auto),
            _ => Err(format!("unknown device {s:?} (cpu, gpu or auto)")),
        }
    }
}

impl Device {
    /// `Cpu` or `Gpu`: `Auto` decided, and `Gpu` refused with the reason when it cannot run.
    pub fn resolve(self, context: &str) -> Result<Device> {
        match (self, gpu::available()) {
            (Device::Cpu, _) => Ok(Device::Cpu),
            (Device::Gpu, Ok(())) | (Device::Auto, Ok(())) => Ok(Device::Gpu),
            (Device::Gpu, Err(why)) => Err(Error::engine(context, format!("--device gpu: {why}"))),
            (Device::Auto, Err(why)) => {
                log::info!("{context}: on the CPU ({why})");
                Ok(Device::Cpu)
            }
        }
    }
}

/// This CPU as benchmark figures name it: model, architecture, logical CPUs, and the
/// instruction-set features tract uses (`tract_isa`).
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let model = field("model name")
        .or_else(|| field("CPU part").map(|p| format!("CPU part {p}")))
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "{model}, {}, {cpus} logical CPUs, tract ISA {}",
        std::env::consts::ARCH,
        tract_isa()
    )
}

/// How a model's int8 products run on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Form {
    /// As written: `MatMulInteger` on tract's i8 kernels (VNNI, AMX, Arm dot product).
    Native,
    /// A `MatMul` of the int8 values widened to i32 or f32 ([`crate::onnx::widened_int8_matmuls`]).
    Widened(Widening),
    /// Each int8 layer as one pe-clip operator ([`linear_i8`], [`crate::onnx::fused_int8_linears`]):
    /// the same values, on an AVX2 i16 kernel (x86-64) or an SDOT i8 one (aarch64).
    Fused,
    /// Weight-only int8: the dequantized weights in f32 products of unquantized activations
    /// ([`crate::onnx::dequantized`]); only by `PE_CLIP_INT8_MATMUL=dequantized`, as its answers
    /// are not the int8 model's (they lack its activation rounding).
    Dequantized,
}

impl Int8Form {
    /// `PE_CLIP_INT8_MATMUL=native|fused|i32|f32|dequantized` if set, else on x86-64 CPUs
    /// without AVX-512 VNNI or AVX-VNNI (as tract sees them, `TRACT_CPU_ISA` included) fused
    /// where AVX2 is (f32-widened where not), native elsewhere, aarch64 included until a board
    /// has measured the fused SDOT kernel against tract's (docs/device.md has the measurements).
    pub fn for_this_cpu() -> Self {
        if let Ok(name) = std::env::var("PE_CLIP_INT8_MATMUL") {
            match name.parse() {
                Ok(form) => return form,
                Err(e) => log::warn!("PE_CLIP_INT8_MATMUL ignored: {e}"),
            }
        }
        Self::default_for_this_cpu()
    }

    /// [`Int8Form::for_this_cpu`] without the environment's override.
    pub fn default_for_this_cpu() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // tract's probed set, so `TRACT_CPU_ISA=-avx512vnni,-avxvnni,-amx-int8` on a VNNI
            // machine picks what a machine without VNNI gets. Every AMX-INT8 CPU has AVX-512 VNNI.
            use tract_onnx::tract_core::tract_linalg::isa::{native, Isa};
            let isa = native();
            let vnni = isa.has(Isa::X86_64Avx512Vnni) || isa.has(Isa::X86_64AvxVnni);
            if !vnni {
                return match linear_i8::Kernel::best() {
                    linear_i8::Kernel::Avx2 => Int8Form::Fused,
                    linear_i8::Kernel::Portable => Int8Form::Widened(Widening::F32),
                };
            }
        }
        Int8Form::Native
    }
}

impl std::str::FromStr for Int8Form {
    type Err = String;

    /// `native`, `fused`, `i32`, `f32` or `dequantized`, as `PE_CLIP_INT8_MATMUL` names them.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "native" => Int8Form::Native,
            "fused" => Int8Form::Fused,
            "i32" => Int8Form::Widened(Widening::I32),
            "f32" => Int8Form::Widened(Widening::F32),
            "dequantized" => Int8Form::Dequantized,
            other => {
                return Err(format!(
                    "int8 form {other:?} (native, fused, i32, f32, dequantized)"
                ))
            }
        })
    }
}

impl std::fmt::Display for Int8Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Int8Form::Native => "native",
            Int8Form::Fused => "fused",
            Int8Form::Widened(Widening::I32) => "i32",
            Int8Form::Widened(Widening::F32) => "f32",
            Int8Form::Dequantized => "dequantized",
        })
    }
}

/// `bytes` with their int8 products in `form`; a model without `MatMulInteger`, or whose int8
/// layers pe-clip did not write, stays as it is.
fn in_int8_form<'a>(bytes: &'a [u8], form: Int8Form, context: &str) -> std::borrow::Cow<'a, [u8]> {
    use prost::Message;
    const OP: &[u8] = b"MatMulInteger";
    if form == Int8Form::Native || !bytes.windows(OP.len()).any(|w| w == OP) {
        return bytes.into();
    }
    let widened = crate::onnx::decode(bytes, context).and_then(|m| {
        match form {
            Int8Form::Widened(to) => crate::onnx::widened_int8_matmuls(&m, to),
            Int8Form::Fused => crate::onnx::fused_int8_linears(&m),
            _ => crate::onnx::dequantized(&m),
        }
        .map_err(|e| Error::engine(context, e))
    });
    match widened {
        Ok(m) => {
            log::info!("{context}: int8 layers as {form:?}");
            m.encode_to_vec().into()
        }
        Err(e) => {
            log::warn!("{context}: int8 layers kept as written: {e}");
            bytes.into()
        }
    }
}

/// Whether this CPU runs an f16 model's products in f16: `PE_CLIP_F16=native|f32` if set,
/// else when tract found f16 arithmetic (Armv8.2 FP16; not x86, whose tract has no fast f16
/// kernel).
pub fn f16_native_here() -> bool {
    match std::env::var("PE_CLIP_F16").as_deref() {
        Ok("native") => return true,
        Ok("f32") => return false,
        Ok(other) => log::warn!("PE_CLIP_F16={other} ignored (native or f32)"),
        Err(_) => {}
    }
    tract_onnx::tract_core::tract_linalg::isa::native().fp16_arithmetic()
}

/// An f16 model written by pe-clip ([`crate::onnx::f16_linears`]) with f32 products again when
/// this CPU has no f16 arithmetic ([`crate::onnx::widened_f16`]); any other model as it is.
fn in_f16_form_for_this_cpu<'a>(
    bytes: std::borrow::Cow<'a, [u8]>,
    context: &str,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    use prost::Message;
    const MARK: &[u8] = b".f16/cast";
    if f16_native_here() || !bytes.windows(MARK.len()).any(|w| w == MARK) {
        return Ok(bytes);
    }
    let m = crate::onnx::decode(&bytes, context)?;
    let m = crate::onnx::widened_f16(&m).map_err(|e| Error::engine(context, e))?;
    log::info!("{context}: f16 products widened to f32 for this CPU (no f16 arithmetic)");
    Ok(m.encode_to_vec().into())
}

impl StepModel {
    /// Load ONNX bytes (`context` names them in errors) on the CPU, int8 products in the form
    /// this CPU runs fastest.
    pub fn from_onnx(bytes: &[u8], context: &str) -> Result<Self> {
        Self::from_onnx_on(bytes, context, Device::Cpu)
    }

    /// Load ONNX bytes to run on `device`.
    pub fn from_onnx_on(bytes: &[u8], context: &str, device: Device) -> Result<Self> {
        Self::from_onnx_in(bytes, context, device, None)
    }

    /// Load ONNX bytes to run on `device`, the int8 products in `form` on the CPU (`None`: as
    /// [`Int8Form::for_this_cpu`] picks).
    pub fn from_onnx_in(
        bytes: &[u8],
        context: &str,
        device: Device,
        form: Option<Int8Form>,
    ) -> Result<Self> {
        let err = |e: TractError| Error::engine(context, e);
        let device = device.resolve(context)?;
        // On the GPU the int8 layers run as f32 products (tract-cuda has cuBLAS for those).
        let form = match device {
            Device::Gpu => Int8Form::Widened(Widening::F32),
            _ => form.unwrap_or_else(Int8Form::for_this_cpu),
        };
        let bytes = in_int8_form(bytes, form, context);
        let bytes = match device {
            Device::Gpu => bytes,
            _ => in_f16_form_for_this_cpu(bytes, context)?,
        };
        let model = onnx_reader().model_for_read(&mut &bytes[..]).map_err(err)?;
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(err)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(err)?
            .iter()
            .map(|&o| {
                model
                    .outlet_label(o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        if input_names.first().map(String::as_str) != Some(FRAME_INPUT)
            || output_names.first().map(String::as_str) != Some(FEATURE_OUTPUT)
        {
            return Err(Error::engine(
                context,
                format!(
                    "not a pe-clip step model (inputs {input_names:?}, outputs {output_names:?})"
                ),
            ));
        }
        let frame_dims = dims_of(&model.input_fact(0).map_err(err)?.clone())
            .ok_or_else(|| Error::engine(context, "the frame input has no fixed shape"))?;
        let image_size = match frame_dims.as_slice() {
            [1, h, w, 3] if h == w => *h,
            other => {
                return Err(Error::engine(
                    context,
                    format!("frame input must be [1, S, S, 3], found {other:?}"),
                ))
            }
        };
        let slots = state_slots(&model, &input_names, &output_names, context)?;
        // Outputs in a fixed order: feature, the states in slot order, then the rest.
        let mut outputs = vec![FEATURE_OUTPUT.to_string()];
        outputs.extend(slots.iter().map(|s| s.output.clone()));
        let extra: Vec<String> = output_names
            .iter()
            .filter(|n| !outputs.contains(n))
            .cloned()
            .collect();
        outputs.extend(extra.iter().cloned());
        let model = model.with_outputs_by_name(&outputs).map_err(err)?;
        // The CPU plan straight from the inference model (declutter and optimise once); the
        // GPU one from the decluttered model, which tract-cuda transforms before optimising.
        let typed = match device {
            Device::Gpu => model.into_typed().and_then(|m| m.into_decluttered()),
            _ => model.into_optimized(),
        }
        .map_err(err)?;
        let feature_dim = typed
            .output_fact(0)
            .map_err(err)?
            .shape
            .as_concrete()
            .and_then(|s| s.last().copied())
            .ok_or_else(|| Error::engine(context, "the feature output has no fixed shape"))?;
        let plan = match device {
            Device::Gpu => gpu::plan(typed, context)?,
            _ => typed.into_runnable().map_err(err)?,
        };
        let runner = plan.spawn().map_err(err)?;
        Ok(Self {
            plan,
            runner,
            image_size,
            feature_dim,
            slots,
            extra,
        })
    }

    /// Another runner of the same optimised plan, with its own scratch state (for stepping
    /// independent chains on another thread).
    pub fn fork(&self) -> Result<StepModel> {
        Ok(StepModel {
            plan: self.plan.clone(),
            runner: self.plan.spawn().map_err(|e| Error::engine("fork", e))?,
            image_size: self.image_size,
            feature_dim: self.feature_dim,
            slots: self.slots.clone(),
            extra: self.extra.clone(),
        })
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    pub fn slots(&self) -> &[StateSlot] {
        &self.slots
    }

    /// Names of the outputs beyond the feature and the states.
    pub fn extra_outputs(&self) -> &[String] {
        &self.extra
    }

    /// Floats of recurrent state per stream.
    pub fn state_floats(&self) -> usize {
        self.slots.iter().map(|s| s.rows * s.width).sum()
    }

    /// The state before a clip's first frame.
    pub fn zero_state(&self) -> StepState {
        StepState {
            tensors: self
                .slots
                .iter()
                .map(|s| Tensor::zero::<f32>(&[s.rows, s.width]).expect("f32 zeros"))
                .collect(),
        }
    }

    /// Run one frame (`S·S·3` RGB bytes, row-major): its feature, and `state` advanced.
    pub fn step(&mut self, frame: &[u8], state: &mut StepState) -> Result<Vec<f32>> {
        let (feature, _) = self.step_with_extra(frame, state)?;
        Ok(feature)
    }

    /// [`step`](Self::step), also returning the extra outputs (calibration taps) with their
    /// shapes.
    pub fn step_with_extra(
        &mut self,
        frame: &[u8],
        state: &mut StepState,
    ) -> Result<(Vec<f32>, Vec<TapValue>)> {
        let err = |e: TractError| Error::engine("step", e);
        let inputs = self.inputs(frame, state)?;
        let out = self.runner.run(inputs).map_err(err)?;
        let n = self.slots.len();
        let mut values = out.into_iter();
        let feature = values
            .next()
            .ok_or_else(|| Error::engine("step", "no feature output"))?;
        let feature = plain_f32(&feature).map_err(err)?.to_vec();
        state.tensors = values.by_ref().take(n).map(|v| v.into_tensor()).collect();
        let extra = values
            .map(|v| -> Result<_> {
                Ok((v.shape().to_vec(), plain_f32(&v).map_err(err)?.to_vec()))
            })
            .collect::<Result<_>>()?;
        Ok((feature, extra))
    }

    /// The frame (checked for size) and the states, taken out of `state`, as model inputs.
    fn inputs(&self, frame: &[u8], state: &mut StepState) -> Result<TVec<TValue>> {
        let s = self.image_size;
        if frame.len() != s * s * 3 {
            return Err(Error::FrameSize {
                side: s,
                expected: s * s * 3,
                got: frame.len(),
            });
        }
        let frame =
            Tensor::from_shape(&[1, s, s, 3], frame).map_err(|e| Error::engine("frame", e))?;
        let mut inputs: TVec<TValue> = tvec![frame.into()];
        inputs.extend(state.tensors.drain(..).map(TValue::from));
        Ok(inputs)
    }

    /// Run one frame timing every node: `(operator, milliseconds)` summed per operator name,
    /// slowest first (for `pe-clip bench step --profile`). `state` advances as in [`step`].
    ///
    /// [`step`]: Self::step
    pub fn profile_step(
        &mut self,
        frame: &[u8],
        state: &mut StepState,
    ) -> Result<Vec<(String, f64)>> {
        let err = |e: TractError| Error::engine("profile", e);
        let inputs = self.inputs(frame, state)?;
        let mut times: std::collections::HashMap<String, f64> = Default::default();
        let out = self
            .runner
            .run_plan_with_eval(inputs, |ctx, op_state, node, input| {
                let t = std::time::Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                *times.entry(node.op().name().to_string()).or_default() +=
                    t.elapsed().as_secs_f64() * 1e3;
                r
            })
            .map_err(err)?;
        let n = self.slots.len();
        state.tensors = out
            .into_iter()
            .skip(1)
            .take(n)
            .map(|v| v.into_tensor())
            .collect();
        let mut v: Vec<(String, f64)> = times.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }

    /// The runnable plan (for benchmarks that spawn their own state).
    pub fn plan(&self) -> &Arc<TypedRunnableModel> {
        &self.plan
    }
}

/// Loading a package's step model (here rather than in `package`, which knows nothing of tract).
impl Package {
    /// Load the step model and check it against the manifest (input size, feature width, states).
    pub fn step_model(&self) -> Result<StepModel> {
        self.step_model_on(Device::Cpu)
    }

    /// [`Package::step_model`] on `device`.
    pub fn step_model_on(&self, device: Device) -> Result<StepModel> {
        self.step_model_in(device, None)
    }

    /// [`Package::step_model_on`] with the int8 products in `form` (`None`: this CPU's).
    pub fn step_model_in(&self, device: Device, form: Option<Int8Form>) -> Result<StepModel> {
        let bytes = self.model_bytes()?;
        let context = self.model_path().display().to_string();
        self.checked(StepModel::from_onnx_in(&bytes, &context, device, form)?)
    }

    /// Load a variant of the step model (`bytes`: e.g. with calibration taps) and check it
    /// against the manifest like [`Package::step_model`].
    pub fn step_model_from(&self, bytes: &[u8], context: &str) -> Result<StepModel> {
        self.checked(StepModel::from_onnx(bytes, context)?)
    }

    fn checked(&self, model: StepModel) -> Result<StepModel> {
        let path = self.model_path();
        let m = &self.manifest;
        let mismatch = |what: String| {
            Err(Error::package(
                &path,
                format!("does not match the manifest: {what}"),
            ))
        };
        if model.image_size() != m.preprocess.image_size {
            return mismatch(format!(
                "input {} px, manifest {} px",
                model.image_size(),
                m.preprocess.image_size
            ));
        }
        if model.feature_dim() != m.head.feature_dim {
            return mismatch(format!(
                "feature width {}, manifest {}",
                model.feature_dim(),
                m.head.feature_dim
            ));
        }
        let slots: Vec<(&str, usize, usize)> = model
            .slots()
            .iter()
            .map(|s| (s.input.as_str(), s.rows, s.width))
            .collect();
        let want: Vec<(&str, usize, usize)> = m
            .state
            .iter()
            .map(|s| (s.input.as_str(), s.rows, s.width))
            .collect();
        if slots != want {
            return mismatch(format!("states {slots:?}, manifest {want:?}"));
        }
        Ok(model)
    }
}

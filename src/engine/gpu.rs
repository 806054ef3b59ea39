//! The step model on an NVIDIA GPU through tract's CUDA runtime (feature `gpu`). tract-cuda
//! loads libcuda, cudart, NVRTC, cuBLAS and cuDNN when first asked, so a build with the feature
//! runs on a machine without them and says so when a GPU is asked for.

use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::error::Result;

/// Whether the GPU can run a step model here: `Err` says why not.
#[cfg(feature = "gpu")]
pub fn available() -> std::result::Result<(), String> {
    tract_cuda::utils::ensure_cuda_runtime_dependencies("CUDA is not usable here")
        .map_err(|e| format!("{e:#}"))
}

#[cfg(not(feature = "gpu"))]
pub fn available() -> std::result::Result<(), String> {
    Err("this pe-clip was built without the `gpu` feature (cargo build --features gpu)".into())
}

/// The plan of decluttered `model` with every operator tract-cuda has a kernel for on the GPU.
/// The ones it has not stay on the CPU and are logged; the recurrent states cross to the GPU
/// and back at every step with the frame and the feature (tract's plan copies at its edges).
#[cfg(feature = "gpu")]
pub fn plan(mut model: TypedModel, context: &str) -> Result<Arc<TypedRunnableModel>> {
    use tract_onnx::tract_core::transform::ModelTransform;
    let err = |e: TractError| crate::error::Error::engine(context, e);
    tract_cuda::CudaTransform
        .transform(&mut model)
        .map_err(err)?;
    model.optimize().map_err(err)?;
    let on_cpu = cpu_nodes(&model);
    if on_cpu.is_empty() {
        log::info!("{context}: every operator on the GPU");
    } else {
        log::info!(
            "{context}: {} operators stay on the CPU: {}",
            on_cpu.len(),
            on_cpu.join(", ")
        );
    }
    let options = RunOptions {
        skip_order_opt_ram: true,
        ..Default::default()
    };
    let mut plan = TypedSimplePlan::build(model, &options).map_err(err)?;
    // Device memory per run, as tract's own CUDA runtime sets it up.
    if let Some(turns) =
        tract_gpu::turn_handler::DeviceTurnHandler::for_plan(&plan, None).map_err(err)?
    {
        plan = plan.with_turn_handler(turns);
    }
    Ok(Arc::new(plan))
}

#[cfg(not(feature = "gpu"))]
pub fn plan(_model: TypedModel, context: &str) -> Result<Arc<TypedRunnableModel>> {
    Err(crate::error::Error::engine(
        context,
        available().unwrap_err(),
    ))
}

/// `name (Op)` of the operators of a CUDA-transformed plan that are not GPU kernels or the
/// copies between the two sides.
#[cfg(feature = "gpu")]
pub fn cpu_nodes(model: &TypedModel) -> Vec<String> {
    model
        .nodes
        .iter()
        .filter(|n| !n.inputs.is_empty())
        .filter_map(|n| {
            let op = n.op().name();
            let device = ["Cuda", "Gpu", "Device"].iter().any(|p| op.starts_with(p));
            (!device).then(|| format!("{} ({op})", n.name))
        })
        .collect()
}

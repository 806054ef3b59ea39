//! Export of a trained PE-CLIP to the per-frame step model the device runs: folding into plain
//! f32 arrays ([`fold`]) and the step graph ([`graph`]); the binary writes it as ONNX, calibrates
//! and quantizes it, and packages it.

pub mod fold;
pub mod graph;

pub use fold::{FoldedModel, FoldedTemporal, Norm};
pub use graph::{build_step_graph, BuildOptions};

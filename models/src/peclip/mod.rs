//! PE-CLIP (arXiv 2503.16945) in candle: ShA, TDA and TA adapters with MaPLe prompts over a frozen
//! CLIP, exactly as pinned down in `shared/docs/peclip-reference.md`.

pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod import;
pub mod model;
pub mod params;
pub mod prompt;
pub mod random;
pub mod stream;

pub use checkpoint::{load_run, save_run, RunConfig};
pub use config::{AdapterSwitches, PeClipConfig, PromptConfig, ScaleAt, TemporalCell};
pub use model::{GruMode, PeClip};
pub use params::{breakdown, trainable_specs, ParamBreakdown, Part, Trainables};
pub use stream::{StreamState, Streamer};

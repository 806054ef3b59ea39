//! PE-CLIP's adapters: the Shared Adapter / Textual Adapter (one bottleneck form) and the Temporal
//! Dynamic Adapter.

pub mod shared;
pub mod temporal;

pub use shared::Adapter;
pub use temporal::{CellState, TemporalAdapter};

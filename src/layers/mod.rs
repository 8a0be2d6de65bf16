//! Layers that run adapters on the activation path: [`LoraLinear`], mixed batches, and the
//! LoRA-ready Burn blocks of [`nn`].

mod linear;
mod mixed;
pub mod nn;

pub use linear::{LoraLinear, LoraLinearConfig};
pub use mixed::MixedBatch;

//! LoRA variants that live beside the model rather than inside one adapter: LoRA+'s learning
//! rates and QLoRA's quantized base. (DoRA and the PiSSA/OLoRA inits change the adapter
//! itself and live in [`adapter`](crate::adapter).)

mod loraplus;
mod quantized;

pub use loraplus::LoraPlusConfig;
pub use quantized::{QuantizedMerge, QuantizedMergeReport, merge_quantized, quantize_base};

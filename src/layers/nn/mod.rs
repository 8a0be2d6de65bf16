//! LoRA-ready versions of Burn's attention and transformer blocks.
//!
//! Burn's `MultiHeadAttention`, `PositionWiseFeedForward` and `TransformerEncoder` hold plain
//! `Linear` fields. [`LoraConfig::apply`](crate::LoraConfig::apply) adapts them as they are, on
//! the dense path (`W + s·A·B` composed on every forward). The blocks here are the same blocks
//! built from [`LoraLinear`](crate::LoraLinear), so adapters run on the fast path:
//!
//! - the same parameter paths, so a checkpoint saved from Burn's block loads unchanged;
//! - `From<burn::nn::…>` for each block, so `MultiHeadAttentionConfig::new(..).init(&device).into()`
//!   builds one from Burn's own config;
//! - the same outputs as Burn's block, tested bit for bit.

mod attention;
mod encoder;
mod feed_forward;

pub use attention::{MhaInput, MultiHeadAttention};
pub use burn::nn::attention::MhaOutput;
pub use encoder::{TransformerEncoder, TransformerEncoderInput, TransformerEncoderLayer};
pub use feed_forward::PositionWiseFeedForward;

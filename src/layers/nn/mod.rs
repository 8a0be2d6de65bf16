//! LoRA-ready versions of Burn's attention and transformer blocks, and the blocks of
//! Llama-style models.
//!
//! Burn's `MultiHeadAttention`, `PositionWiseFeedForward`, `SwiGlu`, `TransformerEncoder` and
//! `TransformerDecoder` hold plain `Linear` fields.
//! [`LoraConfig::apply`](crate::LoraConfig::apply) adapts them as they are, on the dense path
//! (`W + s·A·B` composed on every forward). The blocks here are the same blocks built from
//! [`LoraLinear`](crate::LoraLinear), so adapters run on the fast path:
//!
//! - the same parameter paths, so a checkpoint saved from Burn's block loads unchanged;
//! - `From<burn::nn::…>` for each block, so `MultiHeadAttentionConfig::new(..).init(&device).into()`
//!   builds one from Burn's own config;
//! - the same outputs as Burn's block, tested bit for bit.
//!
//! [`GroupedQueryAttention`] has no Burn original with public fields: it is the self-attention
//! of Llama, Mistral and Qwen (grouped key/value heads, [`RotaryEmbedding`] in Hugging Face's
//! or Meta's pairing of features), tested against a naive reference.

mod attention;
mod decoder;
mod encoder;
mod feed_forward;
mod gqa;
mod rotary;
mod swiglu;

pub use attention::{MhaInput, MultiHeadAttention};
pub use burn::nn::attention::MhaOutput;
pub use decoder::{TransformerDecoder, TransformerDecoderInput, TransformerDecoderLayer};
pub use encoder::{TransformerEncoder, TransformerEncoderInput, TransformerEncoderLayer};
pub use feed_forward::PositionWiseFeedForward;
pub use gqa::{GroupedQueryAttention, GroupedQueryAttentionConfig};
pub use rotary::{RotaryConfig, RotaryEmbedding, RotaryLayout};
pub use swiglu::SwiGlu;

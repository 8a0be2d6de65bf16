//! What the user asks for, as data: [`LoraConfig`], [`Targets`] and the scaling rule.
//!
//! Nothing here touches a tensor or a model. The targets are compiled once into a matcher
//! (`matcher`), which both [`LoraConfig`] and PEFT's `adapter_config.json` use, so a module path
//! is selected by one rule wherever the selection comes from.

mod lora;
pub(crate) mod matcher;
pub(crate) mod scaling;
mod targets;

pub use lora::{AlphaPattern, LoraConfig, LoraInit, RankPattern, TrainableTokens};
pub use targets::{ParamLayout, Target, Targets, layer_index};

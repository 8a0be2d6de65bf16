//! Whole-model operations: the walk over a model, taking its adapters off and putting them
//! back, attaching new adapters, and the [`LoraModule`] operations on them.
//!
//! - `survey`: the one read-only walk (paths, shapes, owners' types, reparameterizations);
//! - `snapshot`: every structural change is a rebuild: take the states off, edit them as
//!   values, put them back, keeping every `ParamId`;
//! - `attach`: plan a [`LoraConfig`](crate::LoraConfig) and attach adapters, the one path that
//!   PEFT loading and combinations take too;
//! - `module`: [`LoraModule`]: merge, unmerge, unload, switch, delete, combine;
//! - `combine`: the math of weighted combinations;
//! - `report`: what a plan or an apply reports.

pub(crate) mod attach;
mod combine;
mod module;
mod report;
pub(crate) mod snapshot;
pub(crate) mod survey;

pub use attach::InitProgress;
pub use combine::{Combination, CombineReport, CombinedLayer};
pub use module::{AdapterInfo, LoraModule, SavedCopyInfo};
pub use report::{AdaptedLayer, LoraReport, SavedModule, SkippedModule, TargetMatch};

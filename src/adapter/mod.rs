//! One adapted weight: its factors, its math and where it starts. Nothing here knows a model
//! path; the layers above hand each weight in the factor layout `[d_in, d_out]`.
//!
//! - `layout`: the layer kinds and how their weights map to `[d_in, d_out]`, and the dtype
//!   helpers;
//! - `dora`: DoRA's rescaling, as tensor functions;
//! - `linalg`: host linear algebra (SVD, QR) for the inits and combinations;
//! - `merging`: PEFT's entry-wise merge rules (magnitude and DARE pruning, TIES);
//! - `weights`: [`Adapter`], one named `(A, B)`;
//! - `init`: where the factors start;
//! - `saved`: [`SavedCopy`], an adapter's full copy of a parameter (`modules_to_save`);
//! - `capture`: taking states off a model without changing a weight;
//! - `state`: [`LoraState`], the adapters of one weight as Burn's reparameterization.

pub(crate) mod capture;
mod dora;
pub(crate) mod init;
pub(crate) mod layout;
pub(crate) mod linalg;
pub(crate) mod merging;
pub(crate) mod saved;
mod state;
mod weights;

pub use layout::LayerKind;
pub use merging::MajoritySign;
pub use saved::SavedCopy;
pub use state::LoraState;
pub use weights::{Adapter, DEFAULT_ADAPTER, ResidualInit};

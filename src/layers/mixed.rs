//! Mixed batches: each sample of one batch runs through its own adapter, or through none.
//!
//! This is the core of multi-tenant serving (S-LoRA, Punica, vLLM): one frozen base, one batch,
//! many adapters. The base matmul runs once for the whole batch. The low-rank part gathers each
//! sample's `A` and `s·B` from a stack of the adapters in the batch (a zero slot serves samples
//! without adapter) and runs two batched matmuls, so its cost does not grow with the number of
//! adapters, and no activation is copied or scattered.

use burn::tensor::module::linear;
use burn::tensor::ops::PadMode;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::adapter::layout::to_f32;
use crate::adapter::{Adapter, LoraState};

/// Which adapter each sample of a batch uses, ready for
/// [`LoraLinear::forward_mixed`](crate::LoraLinear::forward_mixed).
///
/// Build it once per batch and pass it to every layer.
/// [`LoraModule::mixed_batch`](crate::LoraModule::mixed_batch) checks the names against the model;
/// [`MixedBatch::new`] does not, and a layer simply adds nothing for an adapter it lacks.
#[derive(Debug, Clone)]
pub struct MixedBatch {
    /// The distinct adapters in the batch, in order of first appearance.
    adapters: Vec<String>,
    /// Per sample, its adapter's index in `adapters`, or `adapters.len()` for none.
    slots: Tensor<1, Int>,
    batch_size: usize,
}

impl MixedBatch {
    /// Route sample `i` to adapter `adapters[i]` (`None`: the base alone).
    pub fn new(adapters: &[Option<&str>], device: &Device) -> Self {
        let mut names: Vec<String> = Vec::new();
        for name in adapters.iter().flatten() {
            if !names.iter().any(|known| known == name) {
                names.push(name.to_string());
            }
        }
        let slots: Vec<i64> = adapters
            .iter()
            .map(|adapter| match adapter {
                Some(name) => names.iter().position(|known| known == name).unwrap() as i64,
                None => names.len() as i64,
            })
            .collect();
        let batch_size = slots.len();
        Self {
            adapters: names,
            slots: Tensor::from_data(TensorData::new(slots, [batch_size]), device),
            batch_size,
        }
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.batch_size
    }

    /// Whether the batch has no sample.
    pub fn is_empty(&self) -> bool {
        self.batch_size == 0
    }

    /// The distinct adapters the batch uses.
    pub fn adapters(&self) -> &[String] {
        &self.adapters
    }

    /// 1 for the samples routed to batch slot `slot`, 0 for the others, shaped
    /// `[batch, 1, ..., 1]` to scale an output of rank `D`.
    fn mask<const D: usize>(&self, slot: usize, dtype: DType) -> Tensor<D> {
        let mut shape = [1; D];
        shape[0] = self.batch_size;
        self.slots
            .clone()
            .equal_elem(slot as i64)
            .float()
            .cast(dtype)
            .reshape(shape)
    }
}

impl LoraState {
    /// The output of a linear layer with stored weight `weight` and `bias` for a batch whose
    /// samples each run through their own adapter: `x·W + b + sᵢ·((dropout(x)·Aᵢ)·Bᵢ + b_Bᵢ)`
    /// for sample `i` (`b_Bᵢ` the bias of `Bᵢ`, if it has one), or `x·W + b` for a sample without adapter or whose adapter this layer lacks.
    ///
    /// Plain LoRA adapters share two batched matmuls (their factors stacked, padded to the
    /// largest rank, gathered per sample). A DoRA adapter's update depends on the whole weight,
    /// so it is computed for the batch and kept for its own samples only, as
    /// [`forward`](Self::forward) computes it.
    ///
    /// Activity and [`disable_adapters`](crate::LoraModule::disable_adapters) do not apply: the
    /// batch names the adapters. Dropout, in training, is that of the first adapter present.
    ///
    /// # Panics
    ///
    /// Panics if the parameter holds copies of `modules_to_save`, which a batch cannot route
    /// ([`mixed_batch`](crate::LoraModule::mixed_batch) refuses such models).
    ///
    /// # Shapes
    ///
    /// - input: `[batch, ..., d_in]`
    /// - weight: `[d_in, d_out]`
    /// - output: `[batch, ..., d_out]`
    pub fn forward_mixed<const D: usize>(
        &self,
        input: Tensor<D>,
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
        batch: &MixedBatch,
    ) -> Tensor<D> {
        assert!(
            self.copies.is_empty(),
            "a mixed batch through a module of modules_to_save: one copy of a module serves a \
             batch (LoraModule::mixed_batch refuses such models)"
        );
        let present: Vec<Option<&Adapter>> = batch
            .adapters
            .iter()
            .map(|name| self.adapter(name))
            .collect();
        let base_output = linear(input.clone(), weight.clone(), None);
        let output = match bias.clone() {
            Some(bias) => base_output.clone() + bias.unsqueeze(),
            None => base_output.clone(),
        };
        let plain: Vec<Option<&Adapter>> = present
            .iter()
            .map(|adapter| adapter.filter(|adapter| !adapter.is_dora()))
            .collect();
        let output = self.low_rank_mixed(input.clone(), output, &plain, batch);
        // Biases on B (lora_bias): each adapter's for its own samples.
        let dtype = output.dtype();
        let output = present
            .iter()
            .enumerate()
            .filter_map(|(slot, adapter)| Some((slot, adapter.as_ref()?.scaled_bias(dtype)?)))
            .fold(output, |output, (slot, bias)| {
                output + bias.unsqueeze::<D>() * batch.mask::<D>(slot, dtype)
            });
        // DoRA adapters: each one's update for the whole batch, kept for its own samples.
        let stored = to_f32(weight.clone().detach());
        present
            .iter()
            .enumerate()
            .filter_map(|(slot, adapter)| adapter.filter(|a| a.is_dora()).map(|a| (slot, a)))
            .fold(output, |output, (slot, adapter)| {
                let magnitude = adapter.magnitude.as_ref().expect("a DoRA adapter").val();
                let update = adapter.dora_output(
                    magnitude,
                    input.clone(),
                    &weight,
                    &stored,
                    base_output.clone(),
                );
                let dtype = update.dtype();
                output + update * batch.mask::<D>(slot, dtype)
            })
    }

    /// `output` plus each sample's plain low-rank update, `present` giving each batch slot's
    /// adapter (or none).
    fn low_rank_mixed<const D: usize>(
        &self,
        input: Tensor<D>,
        output: Tensor<D>,
        present: &[Option<&Adapter>],
        batch: &MixedBatch,
    ) -> Tensor<D> {
        let Some(first) = present.iter().flatten().next() else {
            return output;
        };
        let rank = present
            .iter()
            .flatten()
            .map(|a| a.rank())
            .max()
            .unwrap_or(0);
        let [d_in, _] = first.lora_a.shape().dims();
        let [_, d_out] = first.lora_b.shape().dims();
        let device = output.device();
        let dtype = first.lora_a.val().dtype();

        // One slot per adapter in the batch, padded to the largest rank (zero columns add
        // nothing), and a zero slot last for the samples without adapter.
        let mut stack_a = Vec::with_capacity(present.len() + 1);
        let mut stack_b = Vec::with_capacity(present.len() + 1);
        for adapter in present.iter().copied().map(Some).chain([None]) {
            let (a, b) = match adapter.flatten() {
                Some(adapter) => {
                    let pad = rank - adapter.rank();
                    let b = adapter.lora_b.val().mul_scalar(adapter.scale);
                    (
                        adapter
                            .lora_a
                            .val()
                            .pad((0, pad, 0, 0), PadMode::Constant(0.0)),
                        b.pad((0, 0, 0, pad), PadMode::Constant(0.0)),
                    )
                }
                None => (
                    Tensor::<2>::zeros([d_in, rank], &device).cast(dtype),
                    Tensor::<2>::zeros([rank, d_out], &device).cast(dtype),
                ),
            };
            stack_a.push(a.unsqueeze::<3>());
            stack_b.push(b.unsqueeze::<3>());
        }
        let per_sample_a = Tensor::cat(stack_a, 0).select(0, batch.slots.clone());
        let per_sample_b = Tensor::cat(stack_b, 0).select(0, batch.slots.clone());

        let shape = output.shape();
        let rows = input.shape().num_elements() / (batch.batch_size * d_in);
        let input = first
            .dropout
            .forward(input)
            .reshape([batch.batch_size, rows, d_in]);
        let delta = input.matmul(per_sample_a).matmul(per_sample_b);
        output + delta.reshape(shape)
    }
}

//! LoRA+ (Hayou et al. 2024): train `B` with a learning rate `ratio` times `A`'s.
//!
//! `B` starts at zero and `A` does not, so with one learning rate `B` learns too slowly for
//! wide layers; the paper sets `lr_B = ratio · lr_A` with a ratio around 16. PEFT builds this as
//! optimizer parameter groups (`create_loraplus_optimizer`); Burn's way is per-group learning
//! rates, [`ModuleLrScheduler::with_group`], which [`LoraPlusConfig::scheduler`] builds.

use burn::config::Config;
use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::LearningRate;
use burn::optim::lr_scheduler::composed::{ComposedLrSchedulerConfig, SchedulerReduction};
use burn::optim::lr_scheduler::module_lr_scheduler::{ModuleLrScheduler, ModuleLrSchedulerConfig};
use burn::optim::lr_scheduler::{LrScheduler, LrSchedulerConfig, LrSchedulerRecord};
use burn::tensor::Tensor;

use crate::LoraError;
use crate::adapter::LayerKind;
use crate::model::snapshot::Snapshot;

/// Configuration of LoRA+ learning rates, PEFT's `create_loraplus_optimizer` arguments.
///
/// ```
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::{AdamConfig, GradientsParams};
/// use burn::prelude::*;
/// use burn_lora::{LoraConfig, LoraPlusConfig, Targets};
///
/// # fn main() -> Result<(), burn_lora::LoraError> {
/// let device = Device::default().autodiff();
/// let model: Linear = LinearConfig::new(16, 16).init(&device);
/// let config = LoraConfig::new(4).with_targets(Targets::all_linear());
/// let (model, _) = config.apply(model)?;
///
/// // B learns at 16 × 2e-4, A (and everything else) at 2e-4.
/// let mut scheduler = LoraPlusConfig::new().scheduler(&model, 2e-4)?;
/// let mut optimizer = AdamConfig::new().init();
/// let x = Tensor::<2>::ones([2, 16], &device);
/// let loss = model.forward(x).sum();
/// let grads = GradientsParams::from_grads(loss.backward(), &model);
/// let model = optimizer.step(scheduler.step(), model, grads);
/// # let _ = model;
/// # Ok(())
/// # }
/// ```
#[derive(Config, Debug)]
pub struct LoraPlusConfig {
    /// `lr_B / lr_A`, PEFT's `loraplus_lr_ratio`. The paper finds 16 a good default for
    /// language models; it must be positive.
    #[config(default = 16.0)]
    pub lr_ratio: f64,
    /// The learning rate of embedding adapters (both factors), PEFT's `loraplus_lr_embedding`.
    /// It is constant: it does not follow the base schedule.
    #[config(default = 1e-6)]
    pub lr_embedding: f64,
}

impl LoraPlusConfig {
    /// Per-group learning rates for `model`: every parameter follows the `base` schedule, the
    /// `B` of each linear and convolution adapter follows `base` times
    /// [`lr_ratio`](Self::lr_ratio), and embedding adapters take
    /// [`lr_embedding`](Self::lr_embedding). `base` is a learning rate or any of Burn's
    /// schedule configs (`LinearLrSchedulerConfig`, `CosineAnnealingLrSchedulerConfig`...).
    /// Pass the result's `step()` to the optimizer's `step` in place of a learning rate.
    ///
    /// The groups hold parameter ids, which every burn-lora operation keeps, so the scheduler
    /// stays valid across merges and adapter switches, and the parameters' module paths, so
    /// that a run resumed from a checkpoint (which loads the saved ids into a freshly built
    /// model) still finds them. An adapter added later is not in them.
    ///
    /// # Errors
    ///
    /// [`LoraError::NoAdapters`], [`LoraError::InvalidLearningRate`] for a ratio or embedding
    /// rate that is not positive and finite, [`LoraError::InvalidSchedule`] for a schedule
    /// config Burn refuses, and [`LoraError::AlreadyAdapted`] for a foreign
    /// reparameterization.
    pub fn scheduler<M: Module>(
        &self,
        model: &M,
        base: impl Into<LrSchedulerConfig>,
    ) -> Result<ModuleLrScheduler, LoraError> {
        let (faster, embedding) = self.groups(model)?;
        let base = base.into();
        // `B`'s schedule is the base's times the ratio, step for step.
        let scaled = ComposedLrSchedulerConfig::new()
            .with_schedulers(vec![
                base.clone(),
                LrSchedulerConfig::Constant(self.lr_ratio),
            ])
            .with_reduction(SchedulerReduction::Prod);
        let mut config = ModuleLrSchedulerConfig::new(base)
            .with_group(faster, LrSchedulerConfig::Composed(scaled));
        if let Some(embedding) = embedding {
            config = config.with_group(embedding, LrSchedulerConfig::Constant(self.lr_embedding));
        }
        config.init().map_err(LoraError::InvalidSchedule)
    }

    /// [`scheduler`](Self::scheduler) for a schedule of your own: any [`LrScheduler`], such
    /// as a warmup followed by a cosine decay written for your training loop. `B`'s rate is
    /// `base`'s times [`lr_ratio`](Self::lr_ratio) at every step.
    ///
    /// # Errors
    ///
    /// As [`scheduler`](Self::scheduler).
    pub fn scheduler_from<M: Module, S: LrScheduler + Clone + 'static>(
        &self,
        model: &M,
        base: S,
    ) -> Result<ModuleLrScheduler, LoraError> {
        let (faster, embedding) = self.groups(model)?;
        let scaled = ScaledLr {
            inner: base.clone(),
            factor: self.lr_ratio,
        };
        let mut scheduler = ModuleLrScheduler::new(base).with_group(faster, scaled);
        if let Some(embedding) = embedding {
            scheduler = scheduler.with_group(embedding, self.lr_embedding);
        }
        Ok(scheduler)
    }

    /// The module paths of the parameters that learn faster (`B` of linear and convolution
    /// adapters), and of the embedding adapters' factors, after checking the settings.
    ///
    /// The groups match by `ParamId` or by path: a run resumed from a checkpoint loads the saved
    /// ids into a freshly built model, and its groups must still find `B`.
    fn groups<M: Module>(&self, model: &M) -> Result<(ParamGroup, Option<ParamGroup>), LoraError> {
        for (name, value) in [
            ("lr_ratio", self.lr_ratio),
            ("lr_embedding", self.lr_embedding),
        ] {
            if !value.is_finite() || value <= 0.0 {
                return Err(LoraError::InvalidLearningRate { name, value });
            }
        }
        let snapshot = Snapshot::take(model)?;
        if !snapshot.is_adapted() {
            return Err(LoraError::NoAdapters);
        }
        let mut faster: Vec<ParamId> = Vec::new();
        let mut embedding: Vec<ParamId> = Vec::new();
        for (path, state) in &snapshot.states {
            let kind = snapshot
                .survey
                .adaptable_weight(path)
                .and_then(|site| site.kind());
            for adapter in &state.adapters {
                match kind {
                    Some(LayerKind::Embedding) => {
                        embedding.extend([adapter.lora_a.id, adapter.lora_b.id])
                    }
                    _ => faster.push(adapter.lora_b.id),
                }
                // PEFT's LoRA+ puts lora_B's bias in B's group.
                faster.extend(adapter.lora_bias.as_ref().map(|bias| bias.id));
            }
        }
        let mut paths = ParamPaths::default();
        model.visit(&mut paths);
        // Ids or paths: ids follow a parameter through every burn-lora operation, paths find
        // it again in a resumed run.
        let group = |ids: Vec<ParamId>| -> ParamGroup {
            let named: Vec<String> = paths
                .found
                .iter()
                .filter(|(id, _)| ids.contains(id))
                .map(|(_, path)| path.clone())
                .collect();
            ParamGroup::from_ids(ids).fuse(&ParamGroup::from_paths(named))
        };
        let embedding = match embedding.is_empty() {
            true => None,
            false => Some(group(embedding)),
        };
        Ok((group(faster), embedding))
    }
}

/// Every float parameter's id and module path, as the optimizer names them.
#[derive(Default)]
struct ParamPaths {
    path: Vec<String>,
    found: Vec<(ParamId, String)>,
}

impl ModuleVisitor for ParamPaths {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.found.push((param.id, self.path.join(".")));
    }
}

/// A schedule `factor` times another's, so that `B`'s rate moves with the base schedule.
#[derive(Clone)]
struct ScaledLr<S> {
    inner: S,
    factor: f64,
}

impl<S: LrScheduler + Clone + 'static> LrScheduler for ScaledLr<S> {
    fn step(&mut self) -> LearningRate {
        self.inner.step() * self.factor
    }

    fn to_record(&self) -> LrSchedulerRecord {
        self.inner.to_record()
    }

    fn load_record(&mut self, record: LrSchedulerRecord) {
        self.inner.load_record(record)
    }
}

//! Changing a model's adapters: take every [`LoraState`] off, edit, put them back.
//!
//! Burn lets a mapper attach a reparameterization to a parameter that has none, and lets
//! `materialize` remove them all; it cannot replace one in place. So every change of adapter
//! structure or of a stored base (add, delete, activate, merge, unmerge, unload, load) is a
//! rebuild: [`Snapshot::take`] detaches the states, the caller edits them as plain values, and
//! [`Snapshot::rebuild`] attaches the result. The rebuild keeps every `ParamId` and shares every
//! tensor it does not change, so it copies no weight and optimizer state survives it.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, Reparameterizer};
use burn::tensor::Tensor;

use super::survey::{PathStack, Survey, module_path_of};
use crate::LoraError;
use crate::adapter::capture::capturing;
use crate::adapter::layout::{from_factor_layout, to_factor_layout};
use crate::adapter::{Adapter, LoraState, SavedCopy};
use crate::config::ParamLayout;

/// A model taken apart: the plain model, and its LoRA states keyed by weight path.
pub(crate) struct Snapshot<M> {
    /// The model with every state detached; each weight holds its stored base.
    pub plain: M,
    /// What the model looked like before the states were taken off.
    pub survey: Survey,
    /// `(weight path, state)` in traversal order.
    pub states: Vec<(String, LoraState)>,
}

impl<M: Module> Snapshot<M> {
    /// Take `model` apart, leaving `model` itself untouched.
    ///
    /// # Errors
    ///
    /// [`LoraError::AlreadyAdapted`] when a weight carries a reparameterization that is not
    /// ours (Burn's `apply_lora`, say): detaching would fold it into its weight for good.
    /// [`LoraError::SharedWeight`] when an adapted weight sits at several paths of the model:
    /// rebuilding would give each path its own copy.
    pub fn take(model: &M) -> Result<Self, LoraError> {
        let snapshot = Self::read(model);
        if let Some((path, kind)) = snapshot.survey.foreign_reparameterization() {
            return Err(LoraError::AlreadyAdapted {
                path: path.clone(),
                kind: kind.clone(),
            });
        }
        let adapted: Vec<&String> = snapshot.states.iter().map(|(path, _)| path).collect();
        if let Some(paths) = snapshot
            .survey
            .aliases(|site| adapted.contains(&&site.path))
            .into_iter()
            .next()
        {
            return Err(LoraError::SharedWeight { paths });
        }
        Ok(snapshot)
    }

    /// Take `model` apart to look at its adapters only. Foreign reparameterizations are folded
    /// into the copy's weights, and a shared adapted weight appears once per path, so the
    /// result must never be rebuilt: [`take`](Self::take) checks both.
    pub fn read(model: &M) -> Self {
        let survey = Survey::of(model);
        // `materialize` folds every reparameterization into its weight; with the capture on,
        // ours record themselves and return the base unchanged instead. It walks the model in
        // the survey's order, so the states pair with the survey's paths by position.
        let (plain, states) = capturing::<LoraState, _>(|| model.clone().materialize());
        debug_assert_eq!(states.len(), survey.states.len());
        let states = states
            .into_iter()
            .zip(&survey.states)
            .map(|(state, (id, path))| {
                debug_assert_eq!(state.first_param_id(), Some(*id));
                (path.clone(), state)
            })
            .collect();
        Self {
            plain,
            survey,
            states,
        }
    }

    /// Whether the model carried any adapter.
    pub fn is_adapted(&self) -> bool {
        !self.states.is_empty()
    }

    /// The distinct adapter names, in the order they first appear (an adapter's low-rank
    /// factors or its copies of `modules_to_save`).
    pub fn adapter_names(&self) -> Vec<String> {
        self.names_where(|_| true, |_| true)
    }

    /// The names of the active adapters, in the order they first appear.
    pub fn active_names(&self) -> Vec<String> {
        self.names_where(|adapter| adapter.active, |copy| copy.active)
    }

    /// The names of the adapters folded into a base weight somewhere.
    pub fn merged_names(&self) -> Vec<String> {
        self.names_where(|adapter| adapter.merged, |_| false)
    }

    /// The distinct names of the adapters for which `pick` holds, and of the copies for which
    /// `pick_copy` does, in order of first appearance.
    fn names_where(
        &self,
        pick: impl Fn(&Adapter) -> bool,
        pick_copy: impl Fn(&SavedCopy) -> bool,
    ) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (_, state) in &self.states {
            let picked = state.adapters.iter().filter(|a| pick(a)).map(|a| &a.name);
            let copies = state
                .copies
                .iter()
                .filter(|c| pick_copy(c))
                .map(|c| &c.name);
            for name in picked.chain(copies) {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        names
    }

    /// [`LoraError::UnknownAdapter`] unless some weight has an adapter called `name`.
    pub fn require_adapter(&self, name: &str) -> Result<(), LoraError> {
        let names = self.adapter_names();
        match names.iter().any(|known| known == name) {
            true => Ok(()),
            false => Err(LoraError::UnknownAdapter {
                name: name.to_string(),
                available: names,
            }),
        }
    }

    /// [`LoraError::AdapterExists`] when some weight already has an adapter called `name`.
    pub fn require_new_name(&self, name: &str) -> Result<(), LoraError> {
        match self.adapter_names().iter().any(|known| known == name) {
            true => Err(LoraError::AdapterExists {
                name: name.to_string(),
            }),
            false => Ok(()),
        }
    }

    /// [`LoraError::UnsupportedVariant`] when the model has an adapter whose init rewrote the
    /// base (PiSSA, OLoRA): `operation` (another adapter beside it, or running the base alone)
    /// would compute on the residual `W − s·A₀·B₀` instead of the model's base. `name` is the
    /// adapter the operation concerns.
    pub fn refuse_beside_residual(&self, operation: &str, name: &str) -> Result<(), LoraError> {
        for (path, state) in &self.states {
            let Some((adapter, init)) = state
                .adapters
                .iter()
                .find_map(|a| a.residual_init.as_ref().map(|init| (a, init)))
            else {
                continue;
            };
            return Err(LoraError::UnsupportedVariant {
                what: format!(
                    "{operation} on a model whose {} adapter `{}` rewrote the base (the stored \
                     weights are the residual); unload_lora gives back the original base",
                    init.method, adapter.name
                ),
                path: module_path_of(path).to_string(),
                adapter: name.to_string(),
            });
        }
        Ok(())
    }

    /// [`LoraError::AdaptersMerged`] when any adapter is folded into its weight.
    pub fn require_unmerged(&self, operation: &'static str) -> Result<(), LoraError> {
        let merged = self.merged_names();
        match merged.is_empty() {
            true => Ok(()),
            false => Err(LoraError::AdaptersMerged { operation, merged }),
        }
    }

    /// [`LoraError::UnsupportedVariant`] naming `what` for the first DoRA adapter that `pick`
    /// selects.
    pub fn refuse_dora(
        &self,
        pick: impl Fn(&Adapter) -> bool,
        what: &str,
    ) -> Result<(), LoraError> {
        for (path, state) in &self.states {
            if let Some(adapter) = state.adapters.iter().find(|a| a.is_dora() && pick(a)) {
                return Err(LoraError::UnsupportedVariant {
                    what: what.to_string(),
                    path: module_path_of(path).to_string(),
                    adapter: adapter.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// The stored values of the adaptable weights at `paths`, read from the plain model, in the
    /// factor layout `[d_in, d_out]` (a targeted raw parameter in the layout its state records).
    pub fn bases<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a String>,
    ) -> HashMap<String, Tensor<2>> {
        self.bases_in(paths, &HashMap::new())
    }

    /// [`bases`](Self::bases), with the layouts of raw parameters that carry no state yet.
    pub fn bases_in<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a String>,
        layouts: &HashMap<String, ParamLayout>,
    ) -> HashMap<String, Tensor<2>> {
        let paths: Vec<&String> = paths.into_iter().collect();
        let mut known = self.param_layouts();
        known.extend(layouts.iter().map(|(path, layout)| (path.clone(), *layout)));
        collect::<M, FactorLayout>(&self.plain, &paths, &known)
    }

    /// The layouts of the raw parameters that carry a state, by parameter path.
    fn param_layouts(&self) -> HashMap<String, ParamLayout> {
        (self.states.iter())
            .filter_map(|(path, state)| state.param_layout.map(|layout| (path.clone(), layout)))
            .collect()
    }

    /// Attach `states` (weight path → state; states without adapters are dropped) and replace
    /// the stored bases in `bases`. With `freeze_base`, every float parameter of the plain model
    /// stops taking gradients, as a first adapter requires.
    pub fn rebuild(
        self,
        states: impl IntoIterator<Item = (String, LoraState)>,
        bases: HashMap<String, Tensor<2>>,
        freeze_base: bool,
    ) -> M {
        self.rebuild_with(states, bases, HashMap::new(), freeze_base)
    }

    /// [`rebuild`](Self::rebuild), also replacing the parameters in `replacements` (parameter
    /// path → new values, flattened) whatever their rank: a `modules_to_save` copy that
    /// becomes the module's own parameter.
    pub fn rebuild_with(
        self,
        states: impl IntoIterator<Item = (String, LoraState)>,
        bases: HashMap<String, Tensor<2>>,
        replacements: HashMap<String, Tensor<1>>,
        freeze_base: bool,
    ) -> M {
        let mut layouts = self.param_layouts();
        let states: HashMap<String, LoraState> = states
            .into_iter()
            .filter(|(_, state)| !state.is_empty())
            .collect();
        layouts.extend(
            (states.iter()).filter_map(|(path, state)| {
                state.param_layout.map(|layout| (path.clone(), layout))
            }),
        );
        self.plain.apply_reparameterization(Reattach {
            states,
            layouts,
            bases,
            replacements,
            freeze_base,
        })
    }

    /// The stored values of the parameters at `paths`, whatever their rank, flattened.
    pub fn values<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a String>,
    ) -> HashMap<String, Tensor<1>> {
        let paths: Vec<&String> = paths.into_iter().collect();
        collect::<M, Flat>(&self.plain, &paths, &HashMap::new())
    }
}

/// How a collector takes the value of a parameter it was asked for.
trait Take {
    /// What it keeps.
    type Out;
    /// The kept form of `value` (`layout` when it is a targeted raw parameter), or `None` to
    /// leave the parameter out.
    fn take<const D: usize>(value: Tensor<D>, layout: Option<ParamLayout>) -> Option<Self::Out>;
}

/// Adaptable weights (2-D and 4-D, and targeted raw parameters), in the factor layout
/// `[d_in, d_out]`.
struct FactorLayout;

impl Take for FactorLayout {
    type Out = Tensor<2>;
    fn take<const D: usize>(value: Tensor<D>, layout: Option<ParamLayout>) -> Option<Tensor<2>> {
        match layout {
            Some(_) => matches!(D, 2 | 3).then(|| to_factor_layout(value, layout)),
            None => matches!(D, 2 | 4).then(|| to_factor_layout(value, None)),
        }
    }
}

/// Any parameter, flattened.
struct Flat;

impl Take for Flat {
    type Out = Tensor<1>;
    fn take<const D: usize>(value: Tensor<D>, _: Option<ParamLayout>) -> Option<Tensor<1>> {
        let count = value.shape().num_elements();
        Some(value.reshape([count]))
    }
}

/// The stored values of the parameters at `paths`, in the form `T` takes.
fn collect<M: Module, T: Take>(
    model: &M,
    paths: &[&String],
    layouts: &HashMap<String, ParamLayout>,
) -> HashMap<String, T::Out> {
    struct Collector<'a, T: Take> {
        paths: &'a [&'a String],
        layouts: &'a HashMap<String, ParamLayout>,
        stack: PathStack,
        values: HashMap<String, T::Out>,
    }
    impl<T: Take> ModuleVisitor for Collector<'_, T> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.stack.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.stack.path();
            if self.paths.contains(&&path)
                && let Some(value) = T::take(param.val(), self.layouts.get(&path).copied())
            {
                self.values.insert(path, value);
            }
        }
    }
    let mut collector = Collector::<T> {
        paths,
        layouts,
        stack: PathStack::default(),
        values: HashMap::new(),
    };
    model.visit(&mut collector);
    collector.values
}

/// Puts states and edited bases onto a model whose states were detached.
struct Reattach {
    states: HashMap<String, LoraState>,
    /// The layouts of the targeted raw parameters, for putting their bases back.
    layouts: HashMap<String, ParamLayout>,
    bases: HashMap<String, Tensor<2>>,
    replacements: HashMap<String, Tensor<1>>,
    freeze_base: bool,
}

impl Reparameterizer for Reattach {
    type Reparam = LoraState;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraState>) {
        let param = match self.freeze_base {
            true => param.set_require_grad(false),
            false => param,
        };
        let param = match self.bases.remove(path) {
            Some(base) => {
                let shape = param.shape();
                // The new base must not carry the graph that computed it.
                let layout = self.layouts.get(path).copied();
                param.map(|_| from_factor_layout(base.detach(), shape, layout))
            }
            None => param,
        };
        let param = match self.replacements.remove(path) {
            Some(values) => {
                let shape = param.shape();
                param.map(|_| values.detach().reshape(shape))
            }
            None => param,
        };
        (param, self.states.remove(path))
    }
}

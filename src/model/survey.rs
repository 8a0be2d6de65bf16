//! One read-only walk over a model: its float parameters, the owners' types, and where
//! reparameterizations (ours and others') sit.
//!
//! [`PathStack`] is the one place that turns Burn's `enter_module`/`exit_module` calls into
//! module paths; every visitor of the crate keeps its path with it.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId, Reparameterization};
use burn::tensor::{DType, Tensor};

use crate::adapter::layout::factor_dims;
use crate::adapter::{LayerKind, LoraState};

/// A float parameter of the model, as the survey saw it.
pub(crate) struct ParamSite {
    /// Full parameter path, e.g. `encoder.query.weight`.
    pub path: String,
    /// Type of the module that owns it, e.g. `Linear`.
    pub owner: String,
    pub dims: Vec<usize>,
    pub id: ParamId,
    /// Whether the stored value is quantized (a QFloat dtype).
    pub quantized: bool,
}

impl ParamSite {
    /// Path of the owning module: the parameter path without its last segment.
    pub fn module_path(&self) -> &str {
        self.path.rsplit_once('.').map_or("", |(module, _)| module)
    }

    /// The kind of layer whose weight this is, if LoRA adapts that kind.
    pub fn kind(&self) -> Option<LayerKind> {
        if self.path.rsplit('.').next() != Some("weight") {
            return None;
        }
        LayerKind::of(&self.owner, &self.dims)
    }

    /// The factor dimensions `(d_in, d_out)` of an adapter on this weight.
    pub fn factor_dims(&self) -> (usize, usize) {
        factor_dims(&self.dims)
    }
}

/// Everything one visit of the model learns.
#[derive(Default)]
pub(crate) struct Survey {
    /// Base parameters, in module order; parameters inside reparameterizations are left out.
    pub params: Vec<ParamSite>,
    /// Parameter path → name of the reparameterization it carries.
    pub reparameterized: HashMap<String, String>,
    /// `(id of the state's first parameter, path of the parameter carrying it)` for each of
    /// our states, in traversal order: the order `materialize` takes them off in.
    pub states: Vec<(ParamId, String)>,
    pub base_params: usize,
}

impl Survey {
    pub fn of<M: Module>(model: &M) -> Self {
        let mut surveyor = Surveyor::default();
        model.visit(&mut surveyor);
        surveyor.survey
    }

    /// The adaptable weight at `weight_path` (`<module>.weight`), if the model has one.
    pub fn adaptable_weight(&self, weight_path: &str) -> Option<&ParamSite> {
        self.params
            .iter()
            .find(|site| site.path == weight_path && site.kind().is_some())
    }

    /// Weights whose parameter sits at several paths (a layer shared by two places of the
    /// model), each as the list of its paths; `ids` picks which parameters to look at.
    pub fn aliases(&self, ids: impl Fn(&ParamSite) -> bool) -> Vec<Vec<String>> {
        let mut by_id: Vec<(ParamId, Vec<String>)> = Vec::new();
        for site in self.params.iter().filter(|site| ids(site)) {
            match by_id.iter_mut().find(|(id, _)| *id == site.id) {
                Some((_, paths)) => paths.push(site.path.clone()),
                None => by_id.push((site.id, vec![site.path.clone()])),
            }
        }
        by_id
            .into_iter()
            .map(|(_, paths)| paths)
            .filter(|paths| paths.len() > 1)
            .collect()
    }

    /// The first reparameterization that is not ours, as `(weight path, its name)`.
    pub fn foreign_reparameterization(&self) -> Option<(&String, &String)> {
        self.reparameterized
            .iter()
            .filter(|(_, name)| name.as_str() != LoraState::NAME)
            .min()
    }
}

/// Where a visitor is in the module tree: the segments entered, each with the container type
/// Burn named when entering it (`Struct:Linear`, `Vec`, `Reparameterization`...).
#[derive(Default)]
pub(crate) struct PathStack {
    segments: Vec<(String, String)>,
}

impl PathStack {
    /// Burn entered the field or item `name` of a container of `container_type`.
    pub fn enter(&mut self, name: &str, container_type: &str) {
        self.segments
            .push((name.to_string(), container_type.to_string()));
    }

    /// Burn left the innermost segment.
    pub fn exit(&mut self) {
        self.segments.pop();
    }

    /// The dotted path of the current position, e.g. `encoder.layers.0.query.weight`.
    pub fn path(&self) -> String {
        Self::join(&self.segments)
    }

    /// The type of the module owning the current parameter, e.g. `Linear`.
    pub fn owner(&self) -> String {
        self.segments
            .last()
            .map(|(_, container)| container.rsplit(':').next().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    /// The `(path of the carrying weight, reparameterization name)` when inside one.
    pub fn enclosing_reparameterization(&self) -> Option<(String, &str)> {
        let index = self
            .segments
            .iter()
            .position(|(_, container)| container == "Reparameterization")?;
        Some((
            Self::join(&self.segments[..index]),
            self.segments[index].0.as_str(),
        ))
    }

    fn join(segments: &[(String, String)]) -> String {
        let names: Vec<&str> = segments.iter().map(|(name, _)| name.as_str()).collect();
        names.join(".")
    }
}

#[derive(Default)]
struct Surveyor {
    survey: Survey,
    stack: PathStack,
    /// Path of the last base parameter visited outside a reparameterization.
    last_param: Option<String>,
    /// The weight path of the state whose parameters are being visited.
    current_state: Option<String>,
}

impl ModuleVisitor for Surveyor {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if container_type == "Reparameterization"
            && let Some(path) = self.last_param.take()
        {
            self.survey.reparameterized.insert(path, name.to_string());
        }
        self.stack.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.stack.path();
        if let Some((weight_path, name)) = self.stack.enclosing_reparameterization() {
            // The first parameter met inside one of our states (its first adapter's A, or its
            // first copy) identifies the state.
            if name == LoraState::NAME && self.current_state.as_ref() != Some(&weight_path) {
                self.survey.states.push((param.id, weight_path.clone()));
                self.current_state = Some(weight_path);
            }
            return;
        }
        self.current_state = None;
        let dims = param.lazy_shape().to_vec();
        self.survey.base_params += dims.iter().product::<usize>();
        // A parameter not yet initialized holds no quantized value; reading it would initialize it.
        let quantized = param.is_initialized() && matches!(param.base().dtype(), DType::QFloat(_));
        self.survey.params.push(ParamSite {
            path: path.clone(),
            owner: self.stack.owner(),
            dims,
            id: param.id,
            quantized,
        });
        self.last_param = Some(path);
    }
}

/// The path of the `weight` of the module at `module_path` (the root module's is `weight`).
pub(crate) fn weight_path_of(module_path: &str) -> String {
    match module_path.is_empty() {
        true => "weight".to_string(),
        false => format!("{module_path}.weight"),
    }
}

/// The module path of a parameter path: everything before the last segment.
pub(crate) fn module_path_of(param_path: &str) -> &str {
    param_path.rsplit_once('.').map_or("", |(module, _)| module)
}

//! Helpers shared by the integration tests: the devices to run on, naive reference math, and
//! ways to read and set parameters by path.
#![allow(dead_code)]

pub mod fixture;
pub mod shadow;

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use burn_lora::LoraLinear;

/// Every backend this build can run: flex and ndarray always, wgpu with `--features wgpu`.
#[allow(deprecated)] // ndarray is deprecated upstream, and still tested here
pub fn devices() -> Vec<(&'static str, Device)> {
    #[allow(unused_mut)] // pushed to with `--features wgpu`
    let mut devices = vec![("flex", Device::flex()), ("ndarray", Device::ndarray())];
    #[cfg(feature = "wgpu")]
    devices.push((
        "wgpu",
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    ));
    devices
}

/// Two projections of the same input side by side: `query` on the fast path (`LoraLinear`),
/// `value` a plain `Linear` that adapters compose densely. `Targets::attention_qv()` picks both.
#[derive(Module, Debug)]
pub struct Projections {
    pub query: LoraLinear,
    pub value: Linear,
}

impl Projections {
    pub fn new(d_in: usize, d_out: usize, device: &Device) -> Self {
        Self {
            query: LinearConfig::new(d_in, d_out).init(device).into(),
            value: LinearConfig::new(d_in, d_out).init(device),
        }
    }

    /// Both outputs, `(query, value)`.
    pub fn outputs<const D: usize>(&self, x: Tensor<D>) -> (Tensor<D>, Tensor<D>) {
        (self.query.forward(x.clone()), self.value.forward(x))
    }

    /// Their sum, one output that depends on both layers.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let (query, value) = self.outputs(x);
        query + value
    }
}

/// A random rank-2 change `U·V` of a `[d_in, d_out]` weight, entries of `U` and `V` drawn from
/// `N(0, std²)`: what a teacher adds, so that adapters of rank 2 or more can learn it exactly.
pub fn low_rank_change(d_in: usize, d_out: usize, std: f64, device: &Device) -> Tensor<2> {
    let u = Tensor::<2>::random([d_in, 2], Distribution::Normal(0.0, std), device);
    let v = Tensor::<2>::random([2, d_out], Distribution::Normal(0.0, std), device);
    u.matmul(v)
}

/// Every float parameter of `model`, adapter factors included: path, id and stored data.
fn params<M: Module>(model: &M) -> Vec<(String, ParamId, TensorData)> {
    struct Reader {
        stack: Vec<String>,
        params: Vec<(String, ParamId, TensorData)>,
    }
    impl ModuleVisitor for Reader {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.stack.join(".");
            self.params.push((path, param.id, param.val().into_data()));
        }
    }
    let mut reader = Reader {
        stack: Vec::new(),
        params: Vec::new(),
    };
    model.visit(&mut reader);
    reader.params
}

/// Every float parameter of `model` by path, adapter factors included, as f64 host values.
pub fn values<M: Module>(model: &M) -> BTreeMap<String, HostTensor> {
    params(model)
        .into_iter()
        .map(|(path, _, data)| (path, HostTensor::from(data)))
        .collect()
}

/// The id of every float parameter by path, adapter factors included.
pub fn param_ids<M: Module>(model: &M) -> BTreeMap<String, ParamId> {
    params(model)
        .into_iter()
        .map(|(path, id, _)| (path, id))
        .collect()
}

/// The raw data of every float parameter by path, adapter factors included, for bit-exact
/// comparisons.
pub fn raw_data<M: Module>(model: &M) -> BTreeMap<String, TensorData> {
    params(model)
        .into_iter()
        .map(|(path, _, data)| (path, data))
        .collect()
}

/// The raw data of every base parameter (adapter factors left out), for bit-exact comparisons.
pub fn base_data<M: Module>(model: &M) -> BTreeMap<String, TensorData> {
    raw_data(model)
        .into_iter()
        .filter(|(path, _)| !path.contains(".burn_lora."))
        .collect()
}

/// Replace every adapter factor whose path ends in `suffix` (`lora_a` or `lora_b`) with values
/// drawn from N(0, std²), keeping its id. Shows that Burn's mappers reach adapter state.
pub fn randomize<M: Module>(model: M, suffix: &str, std: f64) -> M {
    set_factors(model, suffix, Some(std), 0.0)
}

/// Fill every adapter factor whose path ends in `suffix` with `value`.
pub fn fill<M: Module>(model: M, suffix: &str, value: f64) -> M {
    set_factors(model, suffix, None, value)
}

fn set_factors<M: Module>(model: M, suffix: &str, std: Option<f64>, value: f64) -> M {
    struct Randomizer<'a> {
        stack: Vec<String>,
        suffix: &'a str,
        std: Option<f64>,
        value: f64,
    }
    impl ModuleMapper for Randomizer<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if self.stack.last().map(String::as_str) != Some(self.suffix) {
                return param;
            }
            let (std, value) = (self.std, self.value);
            param.map(|tensor| {
                let require_grad = tensor.is_require_grad();
                let replaced = match std {
                    Some(std) => tensor.random_like(Distribution::Normal(0.0, std)),
                    None => tensor.full_like(value),
                };
                replaced.set_require_grad(require_grad)
            })
        }
    }
    model.map(&mut Randomizer {
        stack: Vec::new(),
        suffix,
        std,
        value,
    })
}

/// A tensor copied to the host in f64, with its shape: the ground truth side of the tests.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub dims: Vec<usize>,
    pub values: Vec<f64>,
}

impl<const D: usize> From<Tensor<D>> for HostTensor {
    fn from(tensor: Tensor<D>) -> Self {
        Self::from(tensor.into_data())
    }
}

impl From<TensorData> for HostTensor {
    fn from(data: TensorData) -> Self {
        let dims = data.shape().to_vec();
        let values = data
            .convert::<f64>()
            .try_into_vec::<f64>()
            .expect("f64 data");
        Self { dims, values }
    }
}

impl HostTensor {
    /// `self · other` for `[n, k] · [k, m]`, with plain loops in f64.
    pub fn matmul(&self, other: &HostTensor) -> HostTensor {
        let (n, k) = (self.dims[0], self.dims[1]);
        let m = other.dims[1];
        assert_eq!(other.dims[0], k, "inner dims");
        let mut values = vec![0.0; n * m];
        for i in 0..n {
            for p in 0..k {
                let left = self.values[i * k + p];
                for j in 0..m {
                    values[i * m + j] += left * other.values[p * m + j];
                }
            }
        }
        HostTensor {
            dims: vec![n, m],
            values,
        }
    }

    pub fn add(&self, other: &HostTensor) -> HostTensor {
        assert_eq!(self.dims, other.dims);
        self.zip(other, |a, b| a + b)
    }

    pub fn scale(&self, factor: f64) -> HostTensor {
        HostTensor {
            dims: self.dims.clone(),
            values: self.values.iter().map(|v| v * factor).collect(),
        }
    }

    /// Add a `[m]` bias to every row of `[n, m]`.
    pub fn add_row(&self, bias: &HostTensor) -> HostTensor {
        let m = *self.dims.last().unwrap();
        assert_eq!(bias.values.len(), m);
        HostTensor {
            dims: self.dims.clone(),
            values: self
                .values
                .iter()
                .enumerate()
                .map(|(i, v)| v + bias.values[i % m])
                .collect(),
        }
    }

    fn zip(&self, other: &HostTensor, f: impl Fn(f64, f64) -> f64) -> HostTensor {
        HostTensor {
            dims: self.dims.clone(),
            values: self
                .values
                .iter()
                .zip(&other.values)
                .map(|(a, b)| f(*a, *b))
                .collect(),
        }
    }

    /// The largest `|a - b| / max(|b|, floor)`: relative error with a floor for tiny values.
    pub fn max_relative_error(&self, expected: &HostTensor, floor: f64) -> f64 {
        assert_eq!(self.dims, expected.dims, "shapes differ");
        self.values
            .iter()
            .zip(&expected.values)
            .map(|(a, b)| (a - b).abs() / b.abs().max(floor))
            .fold(0.0, f64::max)
    }

    /// `max|a - b| / max|b|`: the error measured against the output's own scale.
    pub fn error_vs_max(&self, expected: &HostTensor) -> f64 {
        assert_eq!(self.dims, expected.dims, "shapes differ");
        let worst = self
            .values
            .iter()
            .zip(&expected.values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        worst / expected.max_abs().max(f64::MIN_POSITIVE)
    }

    pub fn max_abs(&self) -> f64 {
        self.values.iter().fold(0.0, |m, v| m.max(v.abs()))
    }
}

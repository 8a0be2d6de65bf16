//! Many named adapters on one model: adding, activating (several add up), disabling, deleting,
//! training one while another stays bit-identical, and switching tasks from disk.

mod common;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_lora::peft::{load_adapter, save_adapter};
use burn_lora::{LoraConfig, LoraError, LoraLinear, LoraModule, Targets};
use common::{HostTensor, base_data, devices, param_ids, randomize, values};

#[derive(Module, Debug)]
struct Net {
    query: LoraLinear,
    value: LoraLinear,
    head: Linear,
}

impl Net {
    fn new(device: &Device) -> Self {
        Self {
            query: LinearConfig::new(8, 8).init(device).into(),
            value: LinearConfig::new(8, 8).init(device).into(),
            head: LinearConfig::new(8, 4).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.head
            .forward(self.query.forward(x.clone()) * self.value.forward(x))
    }
}

/// `net` with adapter `name` of rank `rank` on query, value and head, random `B`.
fn with_adapter(net: &Net, name: &str, rank: usize, alpha: f64) -> Net {
    let config = LoraConfig::new(rank)
        .with_alpha(Some(alpha))
        .with_targets(Targets::names(["query", "value", "head"]));
    let (net, _) = net.add_adapter(name, &config).unwrap();
    randomize(net, "lora_b", 0.3)
}

/// Naive `x·W + b + Σ s·x·A·B` on the host for one layer, from the model's own parameters.
fn naive_layer(
    params: &BTreeMap<String, HostTensor>,
    layer: &str,
    x: &HostTensor,
    adapters: &[(usize, f64)],
) -> HostTensor {
    let mut y = x
        .matmul(&params[&format!("{layer}.weight")])
        .add_row(&params[&format!("{layer}.bias")]);
    for &(index, scale) in adapters {
        let a = &params[&format!("{layer}.weight.burn_lora.adapters.{index}.lora_a")];
        let b = &params[&format!("{layer}.weight.burn_lora.adapters.{index}.lora_b")];
        y = y.add(&x.matmul(a).matmul(b).scale(scale));
    }
    y
}

fn naive_forward(net: &Net, x: &HostTensor, adapters: &[(usize, f64)]) -> HostTensor {
    let p = values(net);
    let q = naive_layer(&p, "query", x, adapters);
    let v = naive_layer(&p, "value", x, adapters);
    let h = HostTensor {
        dims: q.dims.clone(),
        values: q.values.iter().zip(&v.values).map(|(a, b)| a * b).collect(),
    };
    naive_layer(&p, "head", &h, adapters)
}

#[test]
fn active_adapters_add_up_and_inactive_ones_wait() {
    for (backend, device) in devices() {
        device.seed(1);
        let base = Net::new(&device);
        let net = with_adapter(&base, "a", 2, 4.0); // s = 2
        let net = with_adapter(&net, "b", 4, 2.0); // s = 0.5
        let x = Tensor::<2>::random([5, 8], Distribution::Default, &device);
        let host_x = HostTensor::from(x.clone());

        // `a` came first: active. `b` waits, as in PEFT.
        assert_eq!(net.adapter_names(), ["a", "b"]);
        assert_eq!(net.active_adapters(), ["a"]);
        let check = |net: &Net, adapters: &[(usize, f64)], what: &str| {
            let error = HostTensor::from(net.forward(x.clone()))
                .error_vs_max(&naive_forward(net, &host_x, adapters));
            assert!(error < 1e-5, "{backend}: {what}: error {error}");
        };
        check(&net, &[(0, 2.0)], "a alone");
        let net = net.set_active(&["b"]).unwrap();
        check(&net, &[(1, 0.5)], "b alone");
        let both = net.set_active(&["a", "b"]).unwrap();
        check(&both, &[(0, 2.0), (1, 0.5)], "a + b");

        // Merging folds every active adapter; unmerging takes both back out.
        let merged = both.merge_lora().unwrap();
        assert!(merged.lora_adapters().iter().all(|info| info.merged));
        check(
            &merged.unmerge_lora().unwrap(),
            &[(0, 2.0), (1, 0.5)],
            "a + b after unmerge",
        );
        let error = HostTensor::from(merged.forward(x.clone())).error_vs_max(&naive_forward(
            &both,
            &host_x,
            &[(0, 2.0), (1, 0.5)],
        ));
        assert!(error < 1e-5, "{backend}: merged a + b: error {error}");
        assert!(matches!(
            merged.set_active(&["a"]),
            Err(LoraError::AdaptersMerged { .. })
        ));

        // Disabled: the base alone, exactly; enabled again: as before.
        let disabled = both.disable_adapters().unwrap();
        let plain = HostTensor::from(base.forward(x.clone()));
        assert_eq!(HostTensor::from(disabled.forward(x.clone())), plain);
        assert!(disabled.lora_adapters().iter().all(|info| !info.active));
        assert!(matches!(
            disabled.merge_lora(),
            Err(LoraError::AdaptersDisabled)
        ));
        check(
            &disabled.enable_adapters().unwrap(),
            &[(0, 2.0), (1, 0.5)],
            "enabled",
        );
    }
}

#[test]
fn deleting_removes_one_adapter_and_refuses_the_active_one() {
    let device = Device::flex();
    let base = Net::new(&device);
    let net = with_adapter(&with_adapter(&base, "a", 2, 2.0), "b", 2, 2.0);
    assert_eq!(
        net.delete_adapter("a").unwrap_err(),
        LoraError::DeleteActive { name: "a".into() }
    );
    assert!(matches!(
        net.delete_adapter("zzz"),
        Err(LoraError::UnknownAdapter { name, available }) if name == "zzz" && available == ["a", "b"]
    ));
    let deleted = net.delete_adapter("b").unwrap();
    assert_eq!(deleted.adapter_names(), ["a"]);
    let x = Tensor::<2>::random([3, 8], Distribution::Default, &device);
    assert_eq!(
        HostTensor::from(deleted.forward(x.clone())),
        HostTensor::from(net.forward(x))
    );
    assert!(!param_ids(&deleted).keys().any(|p| p.contains("adapters.1")));

    assert_eq!(
        net.add_adapter(
            "a",
            &LoraConfig::new(2).with_targets(Targets::names(["query"]))
        )
        .unwrap_err(),
        LoraError::AdapterExists { name: "a".into() }
    );
    assert_eq!(net.set_active(&[]).unwrap_err(), LoraError::NoAdapterNamed);
    assert_eq!(base.set_active(&["a"]).unwrap_err(), LoraError::NoAdapters);
}

#[test]
fn training_one_adapter_leaves_the_other_bit_identical() {
    for (backend, device) in devices() {
        let device = device.autodiff();
        device.seed(3);
        let net = with_adapter(&with_adapter(&Net::new(&device), "a", 2, 2.0), "b", 2, 2.0);
        // Both active, only `b` trains: `a` shapes the output but must not move.
        let mut net = net
            .set_active(&["a", "b"])
            .unwrap()
            .set_trainable(&["b"])
            .unwrap();
        let info: Vec<(String, bool)> = net
            .lora_adapters()
            .into_iter()
            .map(|i| (i.name, i.trainable))
            .collect();
        assert!(
            info.iter()
                .all(|(name, trainable)| *trainable == (name == "b"))
        );

        let factors = |net: &Net, index: usize| -> Vec<(String, burn::tensor::TensorData)> {
            common::raw_data(net)
                .into_iter()
                .filter(|(p, _)| p.contains(&format!("adapters.{index}.")))
                .collect()
        };
        let (a_before, b_before, base_before) =
            (factors(&net, 0), factors(&net, 1), base_data(&net));
        let x = Tensor::<2>::random([16, 8], Distribution::Default, &device);
        let target = Tensor::<2>::random([16, 4], Distribution::Default, &device);
        let mut optimizer = AdamWConfig::new().init();
        for _ in 0..5 {
            let loss = (net.forward(x.clone()) - target.clone())
                .powi_scalar(2)
                .mean();
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optimizer.step(1e-2, net, grads);
        }
        assert_eq!(factors(&net, 0), a_before, "{backend}: adapter a moved");
        assert_ne!(
            factors(&net, 1),
            b_before,
            "{backend}: adapter b did not train"
        );
        assert_eq!(base_data(&net), base_before, "{backend}: the base moved");
    }
}

#[test]
fn task_switching_from_disk_matches_single_adapter_models() {
    let device = Device::flex();
    device.seed(5);
    let base = Net::new(&device);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("task_switching");
    let tasks = ["sentiment", "topic", "language"];
    // Three adapters trained elsewhere (random here), each saved on its own.
    for (i, task) in tasks.iter().enumerate() {
        let net = with_adapter(&base, task, 2 + i, 4.0);
        save_adapter(&net, root.join(task), task).unwrap();
    }

    // Load the base once and the three adapters from disk.
    let mut serving = base.clone();
    for task in tasks {
        serving = load_adapter(&serving, root.join(task), task).unwrap().0;
    }
    assert_eq!(serving.adapter_names(), tasks);
    let base_ids: Vec<_> = param_ids(&base).into_values().collect();
    let x = Tensor::<2>::random([4, 8], Distribution::Default, &device);
    for task in tasks {
        let switched = serving.set_active(&[task]).unwrap();
        let alone = load_adapter(&base, root.join(task), task).unwrap().0;
        assert_eq!(
            HostTensor::from(switched.forward(x.clone())),
            HostTensor::from(alone.forward(x.clone())),
            "{task}"
        );
        // Switching reattaches the same base parameters; nothing is re-created.
        let ids = param_ids(&switched);
        assert!(
            base_ids
                .iter()
                .all(|id| ids.values().any(|known| known == id))
        );
    }
}

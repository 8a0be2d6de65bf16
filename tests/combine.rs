//! Weighted combinations of adapters, against the dense `Σ wᵢ·sᵢ·Aᵢ·Bᵢ` computed on the host.

mod common;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::prelude::*;
use burn_lora::{Combination, LoraConfig, LoraError, LoraLinear, LoraModule, Targets};
use common::{HostTensor, devices, randomize, values};

#[derive(Module, Debug)]
struct Net {
    proj: LoraLinear,
}

/// `a` (rank 3, s = 2), `b` (rank 3, s = 0.5) and `c` (rank 2, s = 1) on a 10×7 weight.
fn adapted(device: &Device) -> Net {
    let net = Net {
        proj: LinearConfig::new(10, 7).init(device).into(),
    };
    let targets = Targets::names(["proj"]);
    let mut net = net;
    for (name, rank, alpha) in [("a", 3, 6.0), ("b", 3, 1.5), ("c", 2, 2.0)] {
        let config = LoraConfig::new(rank)
            .with_alpha(Some(alpha))
            .with_targets(targets.clone());
        net = net.add_adapter(name, &config).unwrap().0;
    }
    randomize(net, "lora_b", 0.5)
}

/// `scale·A·B` of the adapter at `index`, on the host.
fn delta(params: &BTreeMap<String, HostTensor>, index: usize, scale: f64) -> HostTensor {
    let a = &params[&format!("proj.weight.burn_lora.adapters.{index}.lora_a")];
    let b = &params[&format!("proj.weight.burn_lora.adapters.{index}.lora_b")];
    a.matmul(b).scale(scale)
}

fn frobenius(t: &HostTensor) -> f64 {
    t.values.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn dot(a: &HostTensor, b: &HostTensor) -> f64 {
    a.values.iter().zip(&b.values).map(|(x, y)| x * y).sum()
}

#[test]
fn cat_and_full_rank_svd_are_exact_and_truncated_svd_is_optimal() {
    for (backend, device) in devices() {
        device.seed(21);
        let net = adapted(&device);
        let sources = [("a", 0.7), ("b", -1.3), ("c", 0.4)];
        let params = values(&net);
        let exact = delta(&params, 0, 2.0 * 0.7)
            .add(&delta(&params, 1, 0.5 * -1.3))
            .add(&delta(&params, 2, 0.4));

        for (combination, rank) in [
            (Combination::Cat, 8),
            (Combination::Svd { rank: 7 }, 7),
            (Combination::Svd { rank: 3 }, 3),
        ] {
            let (combined, report) = net
                .add_weighted_adapter(&sources, "mix", combination)
                .unwrap();
            let info = combined.lora_adapters();
            let mix = info.iter().find(|i| i.name == "mix").unwrap();
            assert_eq!((mix.rank, mix.scale, mix.active), (rank, 1.0, false));

            let new = delta(&values(&combined), 3, 1.0);
            let residual = exact.add(&new.scale(-1.0));
            let relative = frobenius(&residual) / frobenius(&exact);
            assert!(
                (report.max_relative_error() - relative).abs() < 1e-5,
                "{backend} {combination:?}: reported {} measured {relative}",
                report.max_relative_error()
            );
            if rank >= 7 {
                // Cat keeps every direction; rank 7 = min(d_in, d_out) loses none.
                assert!(relative < 1e-5, "{backend} {combination:?}: {relative}");
            } else {
                // The best rank-k approximation leaves a residual orthogonal to itself.
                assert!(relative > 1e-3, "{backend}: truncation must lose something");
                let cosine = dot(&residual, &new) / (frobenius(&residual) * frobenius(&new));
                assert!(
                    cosine.abs() < 1e-4,
                    "{backend}: residual not orthogonal: {cosine}"
                );
            }
        }
    }
}

#[test]
fn linear_follows_peft_and_needs_equal_ranks() {
    let device = Device::flex();
    device.seed(22);
    let net = adapted(&device);
    let params = values(&net);

    // One source: exactly w·s·A·B.
    let (one, report) = net
        .add_weighted_adapter(&[("a", 0.5)], "half_a", Combination::Linear)
        .unwrap();
    let error = delta(&values(&one), 3, 1.0).error_vs_max(&delta(&params, 0, 2.0 * 0.5));
    assert!(error < 1e-5, "{error}");
    assert!(report.max_relative_error() < 1e-5);

    // Two sources: (Σ ±√|c|·A)(Σ √|c|·B), cross terms included, as PEFT does.
    let (two, report) = net
        .add_weighted_adapter(&[("a", 1.0), ("b", 2.0)], "ab", Combination::Linear)
        .unwrap();
    let (ca, cb) = (2.0f64 * 1.0, 0.5f64 * 2.0);
    let a = params["proj.weight.burn_lora.adapters.0.lora_a"]
        .scale(ca.sqrt())
        .add(&params["proj.weight.burn_lora.adapters.1.lora_a"].scale(cb.sqrt()));
    let b = params["proj.weight.burn_lora.adapters.0.lora_b"]
        .scale(ca.sqrt())
        .add(&params["proj.weight.burn_lora.adapters.1.lora_b"].scale(cb.sqrt()));
    let error = delta(&values(&two), 3, 1.0).error_vs_max(&a.matmul(&b));
    assert!(error < 1e-5, "{error}");
    assert!(
        report.max_relative_error() > 1e-3,
        "cross terms make it inexact"
    );

    assert!(matches!(
        net.add_weighted_adapter(&[("a", 1.0), ("c", 1.0)], "x", Combination::Linear),
        Err(LoraError::IncompatibleRanks { path, .. }) if path == "proj"
    ));
}

#[test]
fn bad_combinations_are_typed_errors() {
    let device = Device::flex();
    let net = adapted(&device);
    let svd = Combination::Svd { rank: 2 };
    assert_eq!(
        net.add_weighted_adapter(&[], "x", svd).unwrap_err(),
        LoraError::NoAdapterNamed
    );
    assert!(matches!(
        net.add_weighted_adapter(&[("zz", 1.0)], "x", svd),
        Err(LoraError::UnknownAdapter { .. })
    ));
    assert_eq!(
        net.add_weighted_adapter(&[("a", 1.0)], "b", svd)
            .unwrap_err(),
        LoraError::AdapterExists { name: "b".into() }
    );
    assert!(matches!(
        net.add_weighted_adapter(&[("a", f64::NAN)], "x", svd),
        Err(LoraError::InvalidWeight { .. })
    ));
    assert_eq!(
        net.add_weighted_adapter(&[("a", 1.0)], "x", Combination::Svd { rank: 0 })
            .unwrap_err(),
        LoraError::ZeroRank
    );
}

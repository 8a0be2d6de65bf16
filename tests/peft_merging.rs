//! `add_weighted_adapter` against PEFT's own: three adapters saved by PEFT 0.21.2 are combined
//! by burn-lora with every deterministic combination PEFT offers (`linear`, `svd`, `ties`,
//! `ties_svd`, `magnitude_prune`, `magnitude_prune_svd`, and `dare_ties` at density 1), and the
//! combined adapter must equal PEFT's (`tests/fixtures/gen_peft_merging.py`): the factors
//! entry by entry where PEFT combines factors, `B·A` where it truncates an SVD (whose factors
//! are fixed only up to the sign of each singular pair), and the model's outputs unmerged and
//! merged, within 1e-5. DARE is random: its masks are checked by their statistics and their
//! seed.
//!
//! The same fixtures prove hot-swapping (PEFT's `hotswap_adapter`): PEFT's adapters replace one
//! another's weights in one adapter slot, padded to one rank, with every `ParamId` kept, and the
//! outputs are PEFT's.
//!
//! `combined_adapters_are_written_for_peft_to_verify` leaves the combined adapters under
//! `target/tmp/peft_merging/`; `python tests/fixtures/gen_peft_merging.py --verify <dir>` loads
//! them with PEFT and compares its outputs with burn-lora's.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn_lora::peft::{
    LoadOptions, SaveOptions, hotswap_adapter, load_adapter_with, save_adapter_with,
};
use burn_lora::{Combination, LoraError, LoraModule, MajoritySign};
use common::fixture::{
    Case, FixtureModel, key_map, load_case_from, max_abs_diff, read_safetensors, write_safetensors,
};
use common::{devices, param_ids};

/// PEFT computes in f32 with another summation order; the issue's bar.
const TOLERANCE: f64 = 1e-5;

/// The fixture's sources and their weights.
const SOURCES: [(&str, f64); 3] = [("a", 1.0), ("b", 0.5), ("c", -0.7)];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_merging")
}

/// The deterministic cases: (fixture case, burn-lora's combination, whether PEFT truncates an
/// SVD).
fn cases() -> Vec<(&'static str, Combination, bool)> {
    use MajoritySign::{Frequency, Total};
    vec![
        ("linear", Combination::Linear, false),
        ("svd", Combination::Svd { rank: 6 }, true),
        ("svd_default_rank", Combination::Svd { rank: 4 }, true),
        (
            "ties",
            Combination::Ties {
                density: 0.5,
                majority_sign: Total,
            },
            false,
        ),
        (
            "ties_frequency",
            Combination::Ties {
                density: 0.3,
                majority_sign: Frequency,
            },
            false,
        ),
        (
            "ties_svd",
            Combination::TiesSvd {
                rank: 6,
                density: 0.5,
                majority_sign: Total,
            },
            true,
        ),
        (
            "magnitude_prune",
            Combination::MagnitudePrune { density: 0.5 },
            false,
        ),
        (
            "magnitude_prune_svd",
            Combination::MagnitudePruneSvd {
                rank: 6,
                density: 0.3,
            },
            true,
        ),
        (
            "dare_ties_density1",
            Combination::DareTies {
                density: 1.0,
                majority_sign: Total,
                seed: 0,
            },
            false,
        ),
    ]
}

fn options() -> LoadOptions {
    LoadOptions::new().with_key_map(key_map())
}

/// The fixture's base with PEFT's three sources loaded as `a`, `b` and `c`.
fn with_sources(device: &Device) -> (Case, FixtureModel) {
    let case = load_case_from(&root(), device);
    let mut model = case.model.clone();
    for (name, _) in SOURCES {
        let dir = root().join("sources").join(name);
        let (loaded, report) = load_adapter_with(&model, &dir, name, &options())
            .unwrap_or_else(|e| panic!("source {name}: {e}"));
        assert!(report.is_clean(), "source {name}: {report}");
        model = loaded;
    }
    (case, model)
}

/// A case's stored outputs.
fn outputs(case: &str, device: &Device) -> (Tensor<3>, Tensor<3>) {
    let io = read_safetensors(&root().join(case).join("io.safetensors"));
    let tensor = |name: &str| {
        let (shape, values) = io[name].clone();
        Tensor::<3>::from_data(TensorData::new(values, shape), device)
    };
    (tensor("lora_output"), tensor("merged_output"))
}

/// `(shape, values)` of each `lora_A`/`lora_B` of an adapter file, by module.
type Factors = BTreeMap<String, ((Vec<usize>, Vec<f32>), (Vec<usize>, Vec<f32>))>;

fn factors(file: &Path) -> Factors {
    let tensors = read_safetensors(file);
    let mut modules = BTreeMap::new();
    for (key, tensor) in &tensors {
        if let Some(module) = key.strip_suffix(".lora_A.weight") {
            let b = tensors[&format!("{module}.lora_B.weight")].clone();
            modules.insert(module.to_string(), (tensor.clone(), b));
        }
    }
    modules
}

/// `B·A` (`[out, r]·[r, in]`) in f64.
fn product(a: &(Vec<usize>, Vec<f32>), b: &(Vec<usize>, Vec<f32>)) -> Vec<f64> {
    let (r, d_in) = (a.0[0], a.0[1]);
    let d_out = b.0[0];
    assert_eq!(b.0[1], r);
    let mut out = vec![0.0; d_out * d_in];
    for i in 0..d_out {
        for j in 0..d_in {
            out[i * d_in + j] = (0..r)
                .map(|k| b.1[i * r + k] as f64 * a.1[k * d_in + j] as f64)
                .sum();
        }
    }
    out
}

fn max_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn as_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|v| *v as f64).collect()
}

fn saved_factors(model: &FixtureModel, name: &str, dir: &Path) -> Factors {
    let _ = std::fs::remove_dir_all(dir);
    let save = SaveOptions::new().with_key_map(key_map());
    save_adapter_with(model, dir, name, &save).unwrap();
    factors(&dir.join("adapter_model.safetensors"))
}

#[test]
fn deterministic_combinations_equal_peft() {
    for (backend, device) in devices() {
        let (case, model) = with_sources(&device);
        for (name, combination, svd) in cases() {
            let (combined, report) = model
                .add_weighted_adapter(&SOURCES, "merged", combination)
                .unwrap_or_else(|e| panic!("{backend}/{name}: {e}"));
            // q and v in both layers hold all three sources; o only b and c.
            assert_eq!(report.layers.len(), 6, "{backend}/{name}");
            let o = report
                .layers
                .iter()
                .find(|l| l.path.ends_with("out"))
                .unwrap();
            assert_eq!(o.sources, ["b", "c"], "{backend}/{name}");

            // The factors, against PEFT's file.
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join("peft_merging_factors")
                .join(format!("{backend}_{name}"));
            let ours = saved_factors(&combined, "merged", &dir);
            let peft = factors(&root().join(name).join("adapter/adapter_model.safetensors"));
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                peft.keys().collect::<Vec<_>>(),
                "{backend}/{name}: the modules"
            );
            for (module, (a, b)) in &peft {
                let (our_a, our_b) = &ours[module];
                assert_eq!(
                    (&our_a.0, &our_b.0),
                    (&a.0, &b.0),
                    "{name}/{module}: shapes"
                );
                let error = match svd {
                    // Singular pairs are fixed up to their sign: compare B·A.
                    true => max_difference(&product(our_a, our_b), &product(a, b)),
                    false => max_difference(&as_f64(&our_a.1), &as_f64(&a.1))
                        .max(max_difference(&as_f64(&our_b.1), &as_f64(&b.1))),
                };
                assert!(
                    error <= TOLERANCE,
                    "{backend}/{name}/{module}: factors differ by {error}"
                );
            }
            // The combined adapter's config: r = lora_alpha = rank, scale 1.
            let config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            let peft_config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(root().join(name).join("adapter/adapter_config.json"))
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(config["r"], peft_config["r"], "{name}: r");
            assert_eq!(
                config["lora_alpha"].as_f64(),
                peft_config["lora_alpha"].as_f64(),
                "{name}: lora_alpha"
            );

            // The outputs, unmerged and merged.
            let (lora_output, merged_output) = outputs(name, &device);
            let active = combined.set_active(&["merged"]).unwrap();
            let output = active.forward(case.input.clone());
            let error = max_abs_diff(output.clone(), lora_output);
            assert!(
                error <= TOLERANCE,
                "{backend}/{name}: unmerged differs by {error}"
            );
            assert!(
                max_abs_diff(output, case.base_output.clone()) > 1e-2,
                "{name}: the combined adapter changes the output"
            );
            let merged = active.merge_lora().unwrap();
            let error = max_abs_diff(merged.forward(case.input.clone()), merged_output);
            assert!(
                error <= TOLERANCE,
                "{backend}/{name}: merged differs by {error}"
            );
        }
    }
}

/// Every entry of the flattened factors of `merged`, in one list.
fn entries(model: &FixtureModel, name: &str, tag: &str) -> Vec<f64> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("peft_merging_dare")
        .join(tag);
    saved_factors(model, name, &dir)
        .values()
        .flat_map(|(a, b)| as_f64(&a.1).into_iter().chain(as_f64(&b.1)))
        .collect()
}

#[test]
fn dare_keeps_a_density_share_rescaled_reproducibly_and_is_unbiased() {
    let device = Device::flex();
    let (_, model) = with_sources(&device);
    let density = 0.5;
    let dare = |seed| Combination::DareLinear { density, seed };

    // One source: each entry is either dropped or `√c·t / density`, with c = w·s = 2·1.0.
    let one = [("a", 1.0)];
    let (linear, _) = model
        .add_weighted_adapter(&one, "linear", Combination::Linear)
        .unwrap();
    let (pruned, _) = model.add_weighted_adapter(&one, "dare", dare(7)).unwrap();
    let full = entries(&linear, "linear", "one_linear");
    let kept = entries(&pruned, "dare", "one_dare");
    assert_eq!(full.len(), kept.len());
    let mut count = 0;
    for (value, original) in kept.iter().zip(&full) {
        if *value != 0.0 {
            count += 1;
            let expected = original / density;
            assert!((value - expected).abs() <= 1e-6 * expected.abs().max(1.0));
        }
    }
    // 256 Bernoulli(0.5) draws: within 5 standard deviations (σ ≈ 0.031) of the density.
    let share = count as f64 / full.len() as f64;
    assert!((share - density).abs() < 0.16, "kept share {share}");

    // The same seed draws the same masks; another seed others.
    let again = entries(
        &model.add_weighted_adapter(&one, "dare", dare(7)).unwrap().0,
        "dare",
        "one_again",
    );
    assert_eq!(again, kept);
    let other = entries(
        &model.add_weighted_adapter(&one, "dare", dare(8)).unwrap().0,
        "dare",
        "one_other",
    );
    assert_ne!(other, kept);

    // Unbiased: over many seeds, the mean of DARE's factors tends to `linear`'s.
    let (linear, _) = model
        .add_weighted_adapter(&SOURCES, "linear", Combination::Linear)
        .unwrap();
    let target = entries(&linear, "linear", "three_linear");
    let draws = 200;
    let mut mean = vec![0.0; target.len()];
    for seed in 0..draws {
        let (combined, _) = model
            .add_weighted_adapter(&SOURCES, "dare", dare(seed))
            .unwrap();
        for (m, v) in mean
            .iter_mut()
            .zip(entries(&combined, "dare", "three_dare"))
        {
            *m += v / draws as f64;
        }
    }
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let gap: Vec<f64> = mean.iter().zip(&target).map(|(m, t)| m - t).collect();
    // Each draw's relative spread is about 1 (density 0.5), so the mean of 200 sits about
    // 1/√200 ≈ 0.07 away; 0.15 leaves room.
    let relative = norm(&gap) / norm(&target);
    assert!(
        relative < 0.15,
        "mean of {draws} DARE draws is {relative} from linear"
    );
}

#[test]
fn bad_arguments_are_typed_errors() {
    let device = Device::flex();
    let (_, model) = with_sources(&device);
    let density = |combination| match model.add_weighted_adapter(&SOURCES, "x", combination) {
        Err(LoraError::InvalidDensity { .. }) => true,
        other => panic!("{combination:?}: {other:?}"),
    };
    assert!(density(Combination::MagnitudePrune { density: 1.5 }));
    assert!(density(Combination::MagnitudePrune { density: -0.1 }));
    assert!(density(Combination::Ties {
        density: f64::NAN,
        majority_sign: MajoritySign::Total
    }));
    assert!(density(Combination::DareLinear {
        density: 0.0,
        seed: 1
    }));
    assert!(matches!(
        model.add_weighted_adapter(
            &SOURCES,
            "x",
            Combination::TiesSvd {
                rank: 0,
                density: 0.5,
                majority_sign: MajoritySign::Total
            }
        ),
        Err(LoraError::ZeroRank)
    ));
    assert!(matches!(
        model.add_weighted_adapter(
            &SOURCES,
            "x",
            Combination::MagnitudePruneSvd {
                rank: 17,
                density: 0.5
            }
        ),
        Err(LoraError::RankTooLarge { .. })
    ));
    // A source that diverged (NaN) is refused by every way, the SVD forms included.
    let diverged = common::fill(model.clone(), "lora_a", f64::NAN);
    for combination in [
        Combination::Svd { rank: 6 },
        Combination::TiesSvd {
            rank: 6,
            density: 0.5,
            majority_sign: MajoritySign::Total,
        },
        Combination::Linear,
    ] {
        assert!(
            matches!(
                diverged.add_weighted_adapter(&SOURCES, "x", combination),
                Err(LoraError::NonFiniteCombination { .. })
            ),
            "{combination:?}"
        );
    }
    // Factor-wise rules need one rank: a rank-6 SVD combination beside a rank-4 source.
    let (mixed, _) = model
        .add_weighted_adapter(&SOURCES, "wide", Combination::Svd { rank: 6 })
        .unwrap();
    assert!(matches!(
        mixed.add_weighted_adapter(
            &[("a", 1.0), ("wide", 1.0)],
            "x",
            Combination::Ties {
                density: 0.5,
                majority_sign: MajoritySign::Total
            }
        ),
        Err(LoraError::IncompatibleRanks { .. })
    ));
}

/// Each combined adapter, written by burn-lora with Hugging Face names, plus the files PEFT
/// needs to check it; `gen_peft_merging.py --verify` checks PEFT's outputs against ours. Here
/// our own reader must give back the same outputs.
#[test]
fn combined_adapters_are_written_for_peft_to_verify() {
    let device = Device::flex();
    let (case, model) = with_sources(&device);
    let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    for (name, combination, _) in cases() {
        let (combined, _) = model
            .add_weighted_adapter(&SOURCES, "merged", combination)
            .unwrap();
        let output = combined
            .set_active(&["merged"])
            .unwrap()
            .forward(case.input.clone());
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("peft_merging")
            .join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let save = SaveOptions::new().with_key_map(key_map());
        save_adapter_with(&combined, dir.join("adapter"), "merged", &save).unwrap();
        write_safetensors(
            &dir.join("io.safetensors"),
            &[
                (
                    "input",
                    case.input.dims().to_vec(),
                    host(case.input.clone()),
                ),
                ("lora_output", output.dims().to_vec(), host(output.clone())),
            ],
        );
        // The fixture's model description, and which of PEFT's cases to compare with.
        let mut meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root().join("meta.json")).unwrap())
                .unwrap();
        meta["case"] = serde_json::json!(name);
        std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
        let (reloaded, report) =
            load_adapter_with(&case.model, dir.join("adapter"), "merged", &options()).unwrap();
        assert!(report.is_clean(), "{name}: {report}");
        let error = max_abs_diff(reloaded.forward(case.input.clone()), output);
        assert!(error <= TOLERANCE, "{name}: reloaded differs by {error}");
    }
}

/// A tensor of the fixture root's `io.safetensors` (`output.a`, `output.b`, `output.c`: the
/// model with that source alone).
fn root_output(name: &str, device: &Device) -> Tensor<3> {
    let (shape, values) = read_safetensors(&root().join("io.safetensors"))[name].clone();
    Tensor::<3>::from_data(TensorData::new(values, shape), device)
}

/// The rank of the `query` adapter named `name` in the first block, from its saved file.
fn saved_rank(model: &FixtureModel, name: &str, tag: &str) -> usize {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("peft_hotswap")
        .join(tag);
    let factors = saved_factors(model, name, &dir);
    factors["base_model.model.layers.0.self_attn.q_proj"].0.0[0]
}

#[test]
fn hotswap_replaces_weights_in_place_with_peft_outputs() {
    for (backend, device) in devices() {
        let case = load_case_from(&root(), &device);
        let source = |name: &str| root().join("sources").join(name);
        let (model, _) = load_adapter_with(&case.model, source("b"), "task", &options()).unwrap();
        let ids = param_ids(&model);
        let close = |model: &FixtureModel, expected: Tensor<3>, what: &str| {
            let error = max_abs_diff(model.forward(case.input.clone()), expected);
            assert!(error <= TOLERANCE, "{backend}: {what} differs by {error}");
        };
        close(&model, root_output("output.b", &device), "b");

        // c adapts the same layers at the same rank with another alpha: its weights and scale
        // replace b's, no parameter changes id, and the old model is untouched.
        let (swapped, report) = hotswap_adapter(&model, source("c"), "task", &options()).unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(
            param_ids(&swapped),
            ids,
            "{backend}: a hot-swap keeps every ParamId"
        );
        close(&swapped, root_output("output.c", &device), "c swapped in");
        close(
            &model,
            root_output("output.b", &device),
            "the model swapped from",
        );
        assert_eq!(swapped.active_adapters(), ["task"]);

        // a adapts q and v only: the o layers do not fit, and nothing changes.
        match hotswap_adapter(&swapped, source("a"), "task", &options()) {
            Err(LoraError::HotswapMismatch { problems, .. }) => {
                assert_eq!(problems.len(), 2, "{problems:?}");
                assert!(
                    problems.iter().all(|p| p.contains(".attn.out`")),
                    "{problems:?}"
                );
            }
            other => panic!("{backend}: {other:?}"),
        }
        // The rank-6 SVD combination does not fit rank-4 slots ...
        let wide = root().join("svd").join("adapter");
        match hotswap_adapter(&swapped, &wide, "task", &options()) {
            Err(LoraError::HotswapMismatch { problems, .. }) => {
                assert_eq!(problems.len(), 6, "{problems:?}");
                assert!(problems[0].contains("rank 6 in the file, 4 in the model"));
            }
            other => panic!("{backend}: {other:?}"),
        }
        // ... until the slots are padded to rank 6, which changes no output and no id.
        let padded = swapped.prepare_hotswap(6).unwrap();
        assert_eq!(
            param_ids(&padded),
            ids,
            "{backend}: padding keeps every ParamId"
        );
        close(&padded, root_output("output.c", &device), "padded");
        let padded_ids = param_ids(&padded);
        let (svd, _) = hotswap_adapter(&padded, &wide, "task", &options()).unwrap();
        let (svd_output, _) = outputs("svd", &device);
        close(&svd, svd_output, "the SVD combination swapped in");
        // A rank-4 file goes into the rank-6 slots zero-padded; the shapes stay.
        let (back, _) = hotswap_adapter(&svd, source("b"), "task", &options()).unwrap();
        assert_eq!(param_ids(&back), padded_ids);
        close(&back, root_output("output.b", &device), "b swapped back in");
        assert_eq!(saved_rank(&back, "task", &format!("{backend}_back")), 6);
        // Saved padded, the adapter reloads with its scale (alpha restated for rank 6).
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("peft_hotswap")
            .join(format!("{backend}_reload"));
        let _ = std::fs::remove_dir_all(&dir);
        let save = SaveOptions::new().with_key_map(key_map());
        save_adapter_with(&back, &dir, "task", &save).unwrap();
        let (reloaded, _) = load_adapter_with(&case.model, &dir, "task", &options()).unwrap();
        close(
            &reloaded,
            root_output("output.b", &device),
            "the padded adapter reloaded",
        );
        // For `gen_peft_merging.py --verify`: the padded adapter and burn-lora's output.
        if backend == "flex" {
            let verify = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join("peft_merging")
                .join("hotswap_padded");
            let _ = std::fs::remove_dir_all(&verify);
            save_adapter_with(&back, verify.join("adapter"), "task", &save).unwrap();
            let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            let output = back.forward(case.input.clone());
            write_safetensors(
                &verify.join("io.safetensors"),
                &[
                    (
                        "input",
                        case.input.dims().to_vec(),
                        host(case.input.clone()),
                    ),
                    ("lora_output", output.dims().to_vec(), host(output)),
                ],
            );
        }

        // Padding below an adapter's rank, or to rank 0, is refused.
        assert!(matches!(
            back.prepare_hotswap(4),
            Err(LoraError::HotswapMismatch { .. })
        ));
        assert!(matches!(back.prepare_hotswap(0), Err(LoraError::ZeroRank)));
        assert!(matches!(
            back.prepare_hotswap(17),
            Err(LoraError::RankTooLarge { .. })
        ));
        // A swap into an adapter the model does not have, or into a merged one, is refused.
        assert!(matches!(
            hotswap_adapter(&back, source("c"), "other", &options()),
            Err(LoraError::UnknownAdapter { .. })
        ));
        let merged = back.merge_lora().unwrap();
        assert!(matches!(
            hotswap_adapter(&merged, source("c"), "task", &options()),
            Err(LoraError::AdaptersMerged { .. })
        ));
    }
}

//! burn-lora against PEFT itself: adapters saved by PEFT 0.21.2 (`tests/fixtures/gen_peft.py`)
//! load into a Burn port of the same model and give PEFT's outputs, unmerged and merged, within
//! 1e-5; and adapters burn-lora writes load back bit for bit.
//!
//! `writes_adapters_for_peft_to_verify` leaves burn-lora-written adapters under
//! `target/tmp/peft_roundtrip/`; `python tests/fixtures/gen_peft.py --verify <dir>` loads them
//! with PEFT and compares (see tests/fixtures/README.md).

mod common;

use burn::prelude::*;
use burn_lora::peft::{
    LoadOptions, PeftAdapter, SaveOptions, load_adapter_with, save_adapter_with,
};
use burn_lora::{AlphaPattern, LoraConfig, LoraInit, LoraModule, RankPattern, Target, Targets};
use common::fixture::{FixtureModel, key_map, load_case, max_abs_diff, write_safetensors};
use common::{devices, randomize, values};

/// PEFT computes in f32 with another summation order; the bar.
const TOLERANCE: f64 = 1e-5;

const CASES: [&str; 7] = [
    "bias",
    "no_bias",
    "rslora",
    "rank_pattern",
    "half",
    "named_keys",
    "lora_bias",
];

fn options() -> LoadOptions {
    LoadOptions::new().with_key_map(key_map())
}

#[test]
fn peft_adapters_give_peft_outputs_unmerged_and_merged() {
    for (backend, device) in devices() {
        for case in CASES {
            let fixture = load_case(case, &device);
            let base = fixture.model.forward(fixture.input.clone());
            let error = max_abs_diff(base, fixture.base_output.clone());
            assert!(
                error <= TOLERANCE,
                "{backend}/{case}: base differs by {error}"
            );

            let dir = common::fixture::fixture_dir(case).join("adapter");
            let (model, report) = load_adapter_with(&fixture.model, &dir, "task", &options())
                .unwrap_or_else(|e| panic!("{backend}/{case}: {e}"));
            assert!(report.is_clean(), "{backend}/{case}: {report}");
            assert!(!report.loaded.is_empty());

            let lora = model.forward(fixture.input.clone());
            let error = max_abs_diff(lora.clone(), fixture.lora_output.clone());
            assert!(
                error <= TOLERANCE,
                "{backend}/{case}: unmerged differs by {error}"
            );
            // The adapter matters: the outputs moved far more than the tolerance.
            assert!(max_abs_diff(lora, fixture.base_output.clone()) > 1e-2);

            let merged = model.merge_lora().unwrap();
            let error = max_abs_diff(
                merged.forward(fixture.input.clone()),
                fixture.merged_output.clone(),
            );
            assert!(
                error <= TOLERANCE,
                "{backend}/{case}: merged differs by {error}"
            );
        }
    }
}

#[test]
fn ranks_and_scales_are_resolved_as_peft_resolves_them() {
    let device = Device::flex();
    let fixture = load_case("rank_pattern", &device);
    let dir = common::fixture::fixture_dir("rank_pattern").join("adapter");
    let (_, report) = load_adapter_with(&fixture.model, dir, "task", &options()).unwrap();
    // PEFT 0.21.2's own resolution of this config (printed by gen_peft.py).
    for module in &report.loaded {
        let (rank, scale) = match module.peft_path.as_str() {
            p if p.ends_with("v_proj") => (2, 4.0),
            p if p.ends_with("o_proj") => (4, 0.75),
            "layers.1.mlp.down_proj" => (6, 8.0 / 6.0),
            _ => (4, 2.0),
        };
        assert_eq!(module.rank, rank, "{}", module.peft_path);
        assert!(
            (module.scale - scale).abs() < 1e-12,
            "{}: {}",
            module.peft_path,
            module.scale
        );
    }
    assert_eq!(report.loaded.len(), 12);

    let fixture = load_case("rslora", &device);
    let dir = common::fixture::fixture_dir("rslora").join("adapter");
    let (_, report) = load_adapter_with(&fixture.model, dir, "task", &options()).unwrap();
    for module in &report.loaded {
        assert!((module.scale - 4.0 / 8f64.sqrt()).abs() < 1e-12);
    }
}

#[test]
fn half_precision_files_are_converted_and_reported() {
    let device = Device::flex();
    let fixture = load_case("half", &device);
    let dir = common::fixture::fixture_dir("half").join("adapter");
    let (_, report) = load_adapter_with(&fixture.model, dir, "task", &options()).unwrap();
    let stored: Vec<&str> = report
        .conversions
        .iter()
        .map(|c| c.stored.as_str())
        .collect();
    assert_eq!(
        stored.iter().filter(|s| **s == "F16").count(),
        4,
        "{report}"
    );
    assert_eq!(
        stored.iter().filter(|s| **s == "BF16").count(),
        4,
        "{report}"
    );
}

#[test]
fn saved_adapters_load_back_bit_for_bit() {
    let device = Device::flex();
    for case in ["bias", "rslora", "rank_pattern", "half"] {
        let fixture = load_case(case, &device);
        let dir = common::fixture::fixture_dir(case).join("adapter");
        let (model, _) = load_adapter_with(&fixture.model, &dir, "task", &options()).unwrap();

        let out = tempdir(&format!("saved_{case}"));
        let save = SaveOptions::new().with_key_map(key_map());
        let saved = save_adapter_with(&model, &out, "task", &save).unwrap();
        let original = PeftAdapter::read(&dir).unwrap();
        assert_eq!(saved.config.r, original.config().r, "{case}");
        assert_eq!(
            saved.config.use_rslora,
            original.config().use_rslora,
            "{case}"
        );
        assert_eq!(
            PeftAdapter::read(&out).unwrap().keys(),
            original.keys(),
            "{case}"
        );

        let (reloaded, report) =
            load_adapter_with(&fixture.model, &out, "task", &options()).unwrap();
        assert!(report.is_clean(), "{case}: {report}");
        // Same factors, bit for bit, and the same scales.
        let factors = |m: &FixtureModel| {
            values(m)
                .into_iter()
                .filter(|(path, _)| path.contains(".burn_lora."))
                .collect::<Vec<_>>()
        };
        assert_eq!(factors(&model), factors(&reloaded), "{case}");
        let scales = |m: &FixtureModel| {
            m.lora_adapters()
                .into_iter()
                .map(|a| (a.path, a.rank, a.scale))
                .collect::<Vec<_>>()
        };
        assert_eq!(scales(&model), scales(&reloaded), "{case}");
    }
}

/// Adapters with mixed ranks, a per-layer alpha, rsLoRA and random non-zero `B`, written by
/// burn-lora with Hugging Face names, plus the files PEFT needs to check them. The test checks
/// our own reload; `gen_peft.py --verify` checks PEFT's.
#[test]
fn writes_adapters_for_peft_to_verify() {
    let device = Device::flex();
    device.seed(7);
    let cases = [
        (
            "rank_pattern_rslora",
            "rank_pattern",
            LoraConfig::new(4)
                .with_alpha(Some(6.0))
                .with_use_rslora(true)
                .with_targets(Targets::names(["query", "value", "out", "down"]))
                .with_rank_pattern(vec![RankPattern {
                    target: Target::Name("value".into()),
                    rank: 2,
                }])
                .with_alpha_pattern(vec![AlphaPattern {
                    target: Target::Name("blocks.1.attn.out".into()),
                    alpha: 2.5,
                }]),
        ),
        (
            "all_linear_no_bias",
            "no_bias",
            LoraConfig::new(3)
                .with_alpha(Some(5.0))
                .with_targets(Targets::all_linear()),
        ),
        (
            "one_layer",
            "bias",
            LoraConfig::new(2)
                .with_targets(Targets::names(["blocks.1.attn.query", "blocks.0.ff.up"])),
        ),
        (
            "dora_fast_and_dense",
            "bias",
            LoraConfig::new(3)
                .with_alpha(Some(5.0))
                .with_use_dora(true)
                .with_targets(Targets::names(["query", "value", "up"])),
        ),
        (
            "lora_bias_trained",
            "bias",
            LoraConfig::new(3)
                .with_alpha(Some(5.0))
                .with_lora_bias(true)
                .with_targets(Targets::names(["query", "value", "out"])),
        ),
        (
            "pissa_converted",
            "no_bias",
            LoraConfig::new(2)
                .with_alpha(Some(4.0))
                .with_init(LoraInit::Pissa)
                .with_targets(Targets::names(["query", "out"])),
        ),
    ];
    for (name, case, config) in cases {
        let fixture = load_case(case, &device);
        let (model, _) = config.apply(fixture.model).unwrap();
        let model = randomize(model, "lora_b", 0.2);
        let model = randomize(model, "magnitude", 1.0);
        let model = randomize(model, "lora_bias", 0.3);
        let output = model.forward(fixture.input.clone());

        let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("peft_roundtrip")
            .join(name);
        let _ = std::fs::remove_dir_all(&root);
        let save = SaveOptions::new().with_key_map(key_map());
        save_adapter_with(&model, root.join("adapter"), "default", &save).unwrap();
        let source = common::fixture::fixture_dir(case);
        std::fs::copy(
            source.join("base.safetensors"),
            root.join("base.safetensors"),
        )
        .unwrap();
        std::fs::copy(source.join("meta.json"), root.join("meta.json")).unwrap();
        let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        write_safetensors(
            &root.join("io.safetensors"),
            &[
                (
                    "input",
                    fixture.input.dims().to_vec(),
                    host(fixture.input.clone()),
                ),
                ("lora_output", output.dims().to_vec(), host(output.clone())),
            ],
        );

        // Our own reader gives back the same model.
        let fresh = load_case(case, &device).model;
        let (reloaded, report) =
            load_adapter_with(&fresh, root.join("adapter"), "default", &options()).unwrap();
        assert!(report.is_clean(), "{name}: {report}");
        let error = max_abs_diff(reloaded.forward(fixture.input.clone()), output);
        assert!(error <= TOLERANCE, "{name}: reloaded differs by {error}");
    }
}

/// A fresh directory under Cargo's per-target temporary folder.
fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

//! Several adapters in one directory, in the layout of PEFT's `save_pretrained`: the adapter
//! `default` at the root, every other adapter in the subdirectory of its name. Checked against
//! PEFT 0.21.2 itself: the directory `tests/fixtures/gen_peft_dirs.py` saved with PEFT loads
//! with PEFT's outputs for each adapter within 1e-5, and `save_adapters` writes PEFT's layout,
//! which loads back to the same model.
//!
//! `writes_adapter_dirs_for_peft_to_verify` leaves directories written by burn-lora under
//! `target/tmp/peft_dirs_roundtrip/`; `python tests/fixtures/gen_peft_dirs.py --verify <dir>`
//! loads them with PEFT and compares (see tests/fixtures/README.md).

mod common;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use burn_lora::peft::{
    AdapterConfig, LoadOptions, PeftAdapter, SaveOptions, TargetModules, adapter_dirs,
    load_adapters, save_adapters,
};
use burn_lora::{LoraConfig, LoraError, LoraModule, Targets};
use common::fixture::{
    FixtureModel, key_map, load_case_from, max_abs_diff, read_safetensors, write_safetensors,
};
use common::{devices, randomize, values};

/// PEFT computes in f32 with another summation order; the bar of the other PEFT fixtures.
const TOLERANCE: f64 = 1e-5;

/// The fixture: the base model, its input and PEFT's outputs, and `adapters/`.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_dirs")
}

/// The directory PEFT's `save_pretrained` wrote: `default` at the root, `second/` below.
fn peft_adapters() -> PathBuf {
    fixture_dir().join("adapters")
}

fn options() -> LoadOptions {
    LoadOptions::new().with_key_map(key_map())
}

fn save_options() -> SaveOptions {
    SaveOptions::new().with_key_map(key_map())
}

/// One of PEFT's outputs in the fixture's `io.safetensors`.
fn peft_output(name: &str, device: &Device) -> Tensor<3> {
    let (shape, values) = read_safetensors(&fixture_dir().join("io.safetensors"))
        .remove(name)
        .unwrap_or_else(|| panic!("the fixture has no `{name}`"));
    Tensor::<3>::from_data(TensorData::new(values, shape), device)
}

/// A fresh, absent directory under Cargo's per-target temporary folder.
fn tempdir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every file under `dir`, as sorted paths relative to it with `/` between parts.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, files: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            match entry.file_type().unwrap().is_dir() {
                true => walk(&entry.path(), &format!("{name}/"), files),
                false => files.push(name),
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, "", &mut files);
    files.sort();
    files
}

/// `target_modules` as a sorted list of names.
fn target_names(config: &AdapterConfig) -> Vec<String> {
    match &config.target_modules {
        Some(TargetModules::Names(names)) => {
            let mut names = names.clone();
            names.sort();
            names
        }
        other => panic!("target_modules {other:?}"),
    }
}

#[test]
fn a_peft_directory_loads_every_adapter_with_peft_outputs() {
    for (backend, device) in devices() {
        let case = load_case_from(&fixture_dir(), &device);
        let (model, reports) = load_adapters(&case.model, peft_adapters(), None, &options())
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
        let loaded: Vec<&str> = reports.iter().map(|r| r.adapter.as_str()).collect();
        assert_eq!(loaded, ["default", "second"], "{backend}");
        for report in &reports {
            assert!(report.is_clean(), "{backend}: {report}");
        }
        // default: q_proj and v_proj; second: q_proj, o_proj and down_proj; two layers each.
        assert_eq!(reports[0].loaded.len(), 4, "{backend}");
        assert_eq!(reports[1].loaded.len(), 6, "{backend}");
        // As with PEFT's from_pretrained and load_adapter, the root's adapter is the active one.
        assert_eq!(model.active_adapters(), ["default"], "{backend}");

        let check = |model: &FixtureModel, expected: &str| {
            let output = model.forward(case.input.clone());
            let error = max_abs_diff(output, peft_output(expected, &device));
            assert!(
                error <= TOLERANCE,
                "{backend}/{expected}: differs by {error}"
            );
        };
        check(&model, "output.default");
        check(&model.set_active(&["second"]).unwrap(), "output.second");
        check(
            &model.set_active(&["default", "second"]).unwrap(),
            "both_output",
        );
        check(&model.merge_lora().unwrap(), "merged_output");
        // Switching matters: the adapters' outputs are far apart.
        let apart = max_abs_diff(
            peft_output("output.default", &device),
            peft_output("output.second", &device),
        );
        assert!(apart > 1e-2, "{apart}");
    }
}

#[test]
fn named_adapters_load_alone_and_in_the_order_asked() {
    let device = Device::flex();
    let case = load_case_from(&fixture_dir(), &device);

    let (model, reports) =
        load_adapters(&case.model, peft_adapters(), Some(&["second"]), &options()).unwrap();
    assert_eq!(model.adapter_names(), ["second"]);
    assert_eq!(reports.len(), 1);
    let error = max_abs_diff(
        model.forward(case.input.clone()),
        peft_output("output.second", &device),
    );
    assert!(error <= TOLERANCE, "second alone differs by {error}");

    // `default` is the root's adapter.
    let (model, _) =
        load_adapters(&case.model, peft_adapters(), Some(&["default"]), &options()).unwrap();
    assert_eq!(model.adapter_names(), ["default"]);

    // The first one asked for is the active one.
    let (model, reports) = load_adapters(
        &case.model,
        peft_adapters(),
        Some(&["second", "default"]),
        &options(),
    )
    .unwrap();
    let loaded: Vec<&str> = reports.iter().map(|r| r.adapter.as_str()).collect();
    assert_eq!(loaded, ["second", "default"]);
    assert_eq!(model.active_adapters(), ["second"]);
}

#[test]
fn the_directory_lists_default_first_then_the_subdirectories() {
    let found = adapter_dirs(peft_adapters()).unwrap();
    let expected = vec![
        ("default".to_string(), peft_adapters()),
        ("second".to_string(), peft_adapters().join("second")),
    ];
    assert_eq!(found, expected);
}

#[test]
fn saving_two_adapters_writes_peft_layout_and_loads_back() {
    let device = Device::flex();
    let case = load_case_from(&fixture_dir(), &device);
    let (model, _) = load_adapters(&case.model, peft_adapters(), None, &options()).unwrap();

    let out = tempdir("peft_dirs_saved");
    let saved = save_adapters(&model, &out, None, &save_options()).unwrap();
    // PEFT's layout, and nothing else: no temporary file, no `default/`.
    assert_eq!(
        files_under(&out),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "second/adapter_config.json",
            "second/adapter_model.safetensors",
        ]
    );
    assert_eq!(saved.len(), 2);
    assert_eq!(saved[0].weights_path, out.join("adapter_model.safetensors"));
    assert_eq!(saved[0].config_path, out.join("adapter_config.json"));
    assert_eq!(
        saved[1].weights_path,
        out.join("second").join("adapter_model.safetensors")
    );
    assert_eq!(
        saved[1].config_path,
        out.join("second").join("adapter_config.json")
    );

    // Each pair holds PEFT's keys and config.
    for (name, ours, peft) in [
        ("default", out.clone(), peft_adapters()),
        ("second", out.join("second"), peft_adapters().join("second")),
    ] {
        let ours = PeftAdapter::read(&ours).unwrap();
        let peft = PeftAdapter::read(&peft).unwrap();
        assert_eq!(ours.keys(), peft.keys(), "{name}");
        let (a, b) = (ours.config(), peft.config());
        assert_eq!(a.r, b.r, "{name}");
        assert_eq!(a.lora_alpha, b.lora_alpha, "{name}");
        assert_eq!(a.use_rslora, b.use_rslora, "{name}");
        assert_eq!(target_names(a), target_names(b), "{name}");
    }
    assert_eq!(saved[1].config.r, 2);
    assert!(saved[1].config.use_rslora);

    // And the directory loads back to the same model: the same factors, bit for bit, and the
    // same outputs with each adapter.
    let (reloaded, reports) = load_adapters(&case.model, &out, None, &options()).unwrap();
    assert!(reports.iter().all(|r| r.is_clean()));
    assert_eq!(reloaded.adapter_names(), model.adapter_names());
    let factors = |m: &FixtureModel| {
        values(m)
            .into_iter()
            .filter(|(path, _)| path.contains(".burn_lora."))
            .collect::<Vec<_>>()
    };
    assert_eq!(factors(&reloaded), factors(&model));
    for active in [vec!["default"], vec!["second"], vec!["default", "second"]] {
        let before = model.set_active(&active).unwrap();
        let after = reloaded.set_active(&active).unwrap();
        let error = max_abs_diff(
            after.forward(case.input.clone()),
            before.forward(case.input.clone()),
        );
        assert_eq!(error, 0.0, "{active:?}");
    }

    // `Some` saves the adapters named, `second` alone in its subdirectory.
    let out = tempdir("peft_dirs_saved_second");
    save_adapters(&model, &out, Some(&["second"]), &save_options()).unwrap();
    assert_eq!(
        files_under(&out),
        [
            "second/adapter_config.json",
            "second/adapter_model.safetensors"
        ]
    );
}

#[test]
fn names_that_cannot_be_directories_are_refused_before_any_write() {
    let device = Device::flex();
    let case = load_case_from(&fixture_dir(), &device);
    let config = LoraConfig::new(2).with_targets(Targets::names(["query"]));
    let (model, _) = case.model.add_adapter("default", &config).unwrap();
    let (escaping, _) = model.add_adapter("../x", &config).unwrap();

    let out = tempdir("peft_dirs_bad_name");
    let outside = out.parent().unwrap().join("x");
    let _ = std::fs::remove_dir_all(&outside);
    // Every adapter, `default` first; and the bad one named after a good one.
    for names in [None, Some(&["default", "../x"][..])] {
        let error = save_adapters(&escaping, &out, names, &SaveOptions::new()).unwrap_err();
        assert!(
            matches!(&error, LoraError::InvalidAdapterName { name, .. } if name == "../x"),
            "{error}"
        );
        assert!(!out.exists(), "{names:?}: {} was written", out.display());
        assert!(
            !outside.exists(),
            "{names:?}: {} was written",
            outside.display()
        );
    }
    for bad in ["", ".", "..", ".hidden", "a/b", "a\\b"] {
        let error =
            save_adapters(&model, &out, Some(&["default", bad]), &SaveOptions::new()).unwrap_err();
        assert!(
            matches!(&error, LoraError::InvalidAdapterName { name, .. } if name == bad),
            "{bad:?}: {error}"
        );
        assert!(!out.exists(), "{bad:?}: {} was written", out.display());
    }

    // An adapter the model lacks, or none at all, is refused before any write too.
    let error = save_adapters(
        &model,
        &out,
        Some(&["default", "missing"]),
        &SaveOptions::new(),
    )
    .unwrap_err();
    assert!(
        matches!(&error, LoraError::UnknownAdapter { name, .. } if name == "missing"),
        "{error}"
    );
    let error = save_adapters(&model, &out, Some(&[]), &SaveOptions::new()).unwrap_err();
    assert_eq!(error, LoraError::NoAdapterNamed);
    let error = save_adapters(&case.model, &out, None, &SaveOptions::new()).unwrap_err();
    assert_eq!(error, LoraError::NoAdapters);
    assert!(!out.exists());

    // Loading refuses the same names, before looking for them.
    let error =
        load_adapters(&case.model, peft_adapters(), Some(&["../x"]), &options()).unwrap_err();
    assert!(
        matches!(error, LoraError::InvalidAdapterName { .. }),
        "{error}"
    );
}

#[test]
fn a_missing_adapter_fails_the_whole_load() {
    let device = Device::flex();
    let case = load_case_from(&fixture_dir(), &device);
    let not_found = |error: &LoraError| {
        matches!(
            error,
            LoraError::Io {
                kind: ErrorKind::NotFound,
                ..
            }
        )
    };

    let error = load_adapters(
        &case.model,
        peft_adapters(),
        Some(&["default", "third"]),
        &options(),
    )
    .unwrap_err();
    assert!(not_found(&error), "{error}");
    assert!(error.to_string().contains("third"), "{error}");

    // A directory with `second/` only has no `default`.
    let only_second = tempdir("peft_dirs_only_second");
    std::fs::create_dir_all(only_second.join("second")).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            peft_adapters().join("second").join(file),
            only_second.join("second").join(file),
        )
        .unwrap();
    }
    let error =
        load_adapters(&case.model, &only_second, Some(&["default"]), &options()).unwrap_err();
    assert!(not_found(&error), "{error}");
    let (model, _) = load_adapters(&case.model, &only_second, None, &options()).unwrap();
    assert_eq!(model.adapter_names(), ["second"]);

    // A broken second adapter: nothing is loaded, and the caller's model has no adapter.
    let broken = tempdir("peft_dirs_broken");
    std::fs::create_dir_all(broken.join("second")).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(peft_adapters().join(file), broken.join(file)).unwrap();
        std::fs::copy(
            peft_adapters().join("second").join(file),
            broken.join("second").join(file),
        )
        .unwrap();
    }
    std::fs::write(
        broken.join("second").join("adapter_model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let error = load_adapters(&case.model, &broken, None, &options()).unwrap_err();
    assert!(
        matches!(
            error,
            LoraError::InvalidSafetensors { .. } | LoraError::TornAdapter { .. }
        ),
        "{error}"
    );
    assert!(case.model.adapter_names().is_empty());
}

#[test]
fn a_directory_without_adapters_is_an_error() {
    let device = Device::flex();
    let case = load_case_from(&fixture_dir(), &device);
    let not_found = |error: &LoraError| {
        matches!(
            error,
            LoraError::Io {
                kind: ErrorKind::NotFound,
                ..
            }
        )
    };

    let empty = tempdir("peft_dirs_empty");
    std::fs::create_dir_all(empty.join("not_an_adapter")).unwrap();
    let error = load_adapters(&case.model, &empty, None, &options()).unwrap_err();
    assert!(not_found(&error), "{error}");
    assert!(adapter_dirs(&empty).unwrap().is_empty());

    let absent = tempdir("peft_dirs_absent");
    let error = load_adapters(&case.model, &absent, None, &options()).unwrap_err();
    assert!(not_found(&error), "{error}");
    assert!(matches!(adapter_dirs(&absent), Err(LoraError::Io { .. })));

    let error = load_adapters(&case.model, peft_adapters(), Some(&[]), &options()).unwrap_err();
    assert_eq!(error, LoraError::NoAdapterNamed);
}

/// Adapters created by burn-lora (random non-zero `B`, ranks, alphas, rsLoRA and exact-path
/// targets that differ), saved with Hugging Face names in PEFT's layout, once with a `default`
/// adapter and once without, plus the files PEFT needs to check them. The test checks our own
/// reload; `gen_peft_dirs.py --verify` checks PEFT's.
#[test]
fn writes_adapter_dirs_for_peft_to_verify() {
    let device = Device::flex();
    device.seed(11);
    let cases: [(&str, Vec<(&str, LoraConfig)>); 2] = [
        (
            "with_default",
            vec![
                (
                    "default",
                    LoraConfig::new(3)
                        .with_alpha(Some(5.0))
                        .with_targets(Targets::names(["query", "value", "up"])),
                ),
                (
                    "second",
                    LoraConfig::new(2)
                        .with_alpha(Some(4.0))
                        .with_use_rslora(true)
                        .with_targets(Targets::names(["query", "out", "down"])),
                ),
                (
                    "third-task",
                    LoraConfig::new(4).with_targets(Targets::names(["blocks.1.attn.key"])),
                ),
            ],
        ),
        (
            "without_default",
            vec![
                (
                    "alpha",
                    LoraConfig::new(2)
                        .with_alpha(Some(3.0))
                        .with_targets(Targets::names(["key", "down"])),
                ),
                (
                    "beta",
                    LoraConfig::new(4)
                        .with_alpha(Some(8.0))
                        .with_targets(Targets::names(["query", "value", "out"])),
                ),
            ],
        ),
    ];
    for (case_name, adapters) in cases {
        let case = load_case_from(&fixture_dir(), &device);
        let mut model = case.model.clone();
        for (name, config) in &adapters {
            model = model.add_adapter(name, config).unwrap().0;
        }
        let model = randomize(model, "lora_b", 0.2);

        let root = tempdir(&format!("peft_dirs_roundtrip/{case_name}"));
        let saved = save_adapters(&model, root.join("adapters"), None, &save_options()).unwrap();
        assert_eq!(saved.len(), adapters.len(), "{case_name}");
        assert_eq!(
            root.join("adapters/adapter_config.json").is_file(),
            case_name == "with_default",
            "{case_name}"
        );
        for file in ["base.safetensors", "meta.json"] {
            std::fs::copy(fixture_dir().join(file), root.join(file)).unwrap();
        }
        let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let mut io = vec![(
            "input".to_string(),
            case.input.dims().to_vec(),
            host(case.input.clone()),
        )];
        for (name, _) in &adapters {
            let output = model
                .set_active(&[*name])
                .unwrap()
                .forward(case.input.clone());
            io.push((
                format!("output.{name}"),
                output.dims().to_vec(),
                host(output),
            ));
        }
        let io: Vec<(&str, Vec<usize>, Vec<f32>)> = io
            .iter()
            .map(|(key, shape, values)| (key.as_str(), shape.clone(), values.clone()))
            .collect();
        write_safetensors(&root.join("io.safetensors"), &io);

        // Our own reader gives back every adapter.
        let (reloaded, reports) =
            load_adapters(&case.model, root.join("adapters"), None, &options()).unwrap();
        assert_eq!(reports.len(), adapters.len(), "{case_name}");
        for (name, _) in &adapters {
            let before = model.set_active(&[*name]).unwrap();
            let after = reloaded.set_active(&[*name]).unwrap();
            let error = max_abs_diff(
                after.forward(case.input.clone()),
                before.forward(case.input.clone()),
            );
            assert!(
                error <= TOLERANCE,
                "{case_name}/{name}: reloaded differs by {error}"
            );
        }
    }
}

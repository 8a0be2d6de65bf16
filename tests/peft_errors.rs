//! Bad adapter files and bad saves: each gives a typed error and no panic, and a seeded
//! property test feeds thousands of mutated files to the loader.

mod common;

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use burn::prelude::*;
use burn_lora::peft::{
    CONFIG_FILE, LoadOptions, LoadReport, PeftAdapter, WEIGHTS_FILE, load_adapter_with,
    save_adapter,
};
use burn_lora::{LoraError, LoraModule};
use common::fixture::{
    FixtureModel, fixture_dir, key_map, load_case, read_safetensors, safetensors_bytes,
};
use common::{fill, values};

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

struct Fixture {
    model: FixtureModel,
    tensors: Tensors,
    weights: Vec<u8>,
    config: String,
}

fn fixture() -> Fixture {
    let device = Device::flex();
    let dir = fixture_dir("bias").join("adapter");
    Fixture {
        model: load_case("bias", &device).model,
        tensors: read_safetensors(&dir.join(WEIGHTS_FILE)),
        weights: std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(),
        config: std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap(),
    }
}

fn options(strict: bool) -> LoadOptions {
    LoadOptions::new()
        .with_key_map(key_map())
        .with_strict(strict)
}

fn bytes(tensors: &Tensors) -> Vec<u8> {
    let list: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(k, (s, v))| (k.as_str(), s.clone(), v.clone()))
        .collect();
    safetensors_bytes(&list)
}

fn load(
    f: &Fixture,
    weights: &[u8],
    config: &str,
    strict: bool,
) -> Result<(FixtureModel, LoadReport), LoraError> {
    PeftAdapter::from_bytes(weights, config, "test")?.load_into(&f.model, "task", &options(strict))
}

/// The report of a strict load that must fail with [`LoraError::AdapterMismatch`].
fn mismatch(f: &Fixture, tensors: &Tensors, config: &str) -> LoadReport {
    match load(f, &bytes(tensors), config, true) {
        Err(LoraError::AdapterMismatch { report, .. }) => *report,
        other => panic!("expected AdapterMismatch, got {:?}", other.map(|(_, r)| r)),
    }
}

const Q_A: &str = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight";
const Q_B: &str = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight";

#[test]
fn missing_files_are_io_errors() {
    let f = fixture();
    let error =
        load_adapter_with(&f.model, "/nonexistent/adapter", "task", &options(true)).unwrap_err();
    assert!(
        matches!(error, LoraError::Io { kind: ErrorKind::NotFound, ref path, .. } if path.ends_with(CONFIG_FILE))
    );

    let dir = temp("config_only");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), &f.config).unwrap();
    let error = load_adapter_with(&f.model, &dir, "task", &options(true)).unwrap_err();
    assert!(
        matches!(error, LoraError::Io { kind: ErrorKind::NotFound, ref path, .. } if path.ends_with(WEIGHTS_FILE))
    );
}

#[test]
fn truncated_and_corrupt_safetensors_are_refused() {
    let f = fixture();
    for cut in [0, 5, 8, 100, f.weights.len() / 2, f.weights.len() - 1] {
        let error = load(&f, &f.weights[..cut], &f.config, true).unwrap_err();
        assert!(
            matches!(error, LoraError::InvalidSafetensors { .. }),
            "cut {cut}: {error}"
        );
    }
    let mut corrupt = f.weights.clone();
    corrupt[8..24].copy_from_slice(b"#not json header");
    assert!(matches!(
        load(&f, &corrupt, &f.config, true),
        Err(LoraError::InvalidSafetensors { .. })
    ));
    let mut huge = f.weights.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        load(&f, &huge, &f.config, true),
        Err(LoraError::InvalidSafetensors { .. })
    ));
}

#[test]
fn configs_with_wrong_types_name_the_field() {
    let f = fixture();
    for (from, to, field) in [
        ("\"r\": 4", "\"r\": \"four\"", "`r`"),
        ("\"lora_alpha\": 8", "\"lora_alpha\": [8]", "`lora_alpha`"),
        (
            "\"use_rslora\": false",
            "\"use_rslora\": \"no\"",
            "`use_rslora`",
        ),
        (
            "\"rank_pattern\": {}",
            "\"rank_pattern\": {\"v_proj\": -2}",
            "rank_pattern",
        ),
        (
            "\"target_modules\": [",
            "\"target_modules\": 7, \"x\": [",
            "`target_modules`",
        ),
    ] {
        assert!(f.config.contains(from), "fixture config lacks {from}");
        let config = f.config.replacen(from, to, 1);
        let error = load(&f, &f.weights, &config, true).unwrap_err();
        assert!(
            matches!(&error, LoraError::InvalidConfig { message, .. } if message.contains(field)),
            "{to}: {error}"
        );
    }
    assert!(matches!(
        load(&f, &f.weights, "{ not json", true),
        Err(LoraError::InvalidConfig { .. })
    ));
    let error = load(&f, &f.weights, "[1, 2]", true).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("expected a JSON object, found a list"),
        "{error}"
    );
}

#[test]
fn shapes_ranks_and_values_are_checked_per_tensor() {
    let f = fixture();

    let mut wide = f.tensors.clone();
    wide.insert(Q_A.into(), (vec![4, 12], vec![0.1; 48]));
    let report = mismatch(&f, &wide, &f.config);
    assert_eq!(report.shape_mismatches.len(), 1, "{report}");
    let m = &report.shape_mismatches[0];
    assert_eq!(
        (m.key.as_str(), m.expected.clone(), m.found.clone()),
        (Q_A, vec![4, 16], vec![4, 12])
    );
    assert!(m.reason.contains("d_in = 16"), "{}", m.reason);

    // The config says r = 8, the tensors have rank 4.
    let report = mismatch(
        &f,
        &f.tensors,
        &f.config.replacen("\"r\": 4", "\"r\": 8", 1),
    );
    assert_eq!(report.shape_mismatches.len(), f.tensors.len());
    assert!(
        report.shape_mismatches[0]
            .reason
            .contains("rank 4 disagrees: config r = 8")
    );

    let mut nan = f.tensors.clone();
    nan.get_mut(Q_B).unwrap().1[3] = f32::NAN;
    let report = mismatch(&f, &nan, &f.config);
    assert_eq!(report.non_finite, [Q_B]);

    let mut empty = f.tensors.clone();
    empty.insert(Q_A.into(), (vec![0, 16], vec![]));
    assert_eq!(mismatch(&f, &empty, &f.config).empty, [Q_A]);
}

#[test]
fn missing_and_unexpected_keys_are_listed() {
    let f = fixture();
    let mut tensors = f.tensors.clone();
    tensors.remove(Q_B);
    tensors.insert(
        "base_model.model.layers.0.self_attn.q_proj.weight".into(),
        (vec![2], vec![0.0; 2]),
    );
    tensors.insert(
        "base_model.model.layers.9.self_attn.q_proj.lora_A.weight".into(),
        (vec![4, 16], vec![0.0; 64]),
    );
    tensors.insert(
        "base_model.model.layers.9.self_attn.q_proj.lora_B.weight".into(),
        (vec![16, 4], vec![0.0; 64]),
    );
    // Both factors of one targeted module gone: the config's target_modules still names it.
    tensors.remove("base_model.model.layers.1.self_attn.v_proj.lora_A.weight");
    tensors.remove("base_model.model.layers.1.self_attn.v_proj.lora_B.weight");
    let report = mismatch(&f, &tensors, &f.config);
    assert_eq!(report.missing.len(), 2, "{report}");
    assert_eq!(report.missing[0], Q_B);
    assert!(
        report.missing[1].contains("layers.1.self_attn.v_proj"),
        "{report}"
    );
    assert_eq!(report.unexpected.len(), 3, "{report}");
    assert!(
        report
            .unexpected
            .iter()
            .any(|k| k.contains("no linear, embedding or conv2d layer `blocks.9.attn.query`"))
    );

    // Non-strict: what is sound loads, the report still lists the rest.
    let (model, report) = load(&f, &bytes(&tensors), &f.config, false).unwrap();
    assert_eq!(report.loaded.len(), 2, "{report}");
    assert_eq!(report.problem_count(), 5);
    assert_eq!(model.lora_adapters().len(), 2);
}

#[test]
fn unsupported_adapters_are_refused_whole() {
    let f = fixture();
    // DoRA loads, but its magnitudes and `use_dora` must agree.
    let q_magnitude = "base_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    let mut dora = f.tensors.clone();
    dora.insert(q_magnitude.into(), (vec![16], vec![1.0; 16]));
    let report = mismatch(&f, &dora, &f.config);
    assert_eq!(report.unexpected.len(), 1, "{report}");
    assert!(
        report.unexpected[0].contains("use_dora = false"),
        "{report}"
    );
    let config = f
        .config
        .replacen("\"use_dora\": false", "\"use_dora\": true", 1);
    assert_ne!(config, f.config);
    let report = mismatch(&f, &f.tensors, &config);
    assert_eq!(
        report.missing.len(),
        4,
        "one magnitude per module: {report}"
    );
    assert!(
        report.missing.contains(&q_magnitude.to_string()),
        "{report}"
    );
    dora.insert(q_magnitude.into(), (vec![15], vec![1.0; 15]));
    let report = mismatch(&f, &dora, &config);
    assert!(
        report
            .shape_mismatches
            .iter()
            .any(|m| m.key == q_magnitude && m.expected == [16]),
        "{report}"
    );
    let config = f
        .config
        .replacen("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\"", 1);
    assert!(matches!(
        load(&f, &f.weights, &config, false),
        Err(LoraError::UnsupportedAdapter { .. })
    ));
}

#[test]
fn an_existing_name_is_refused() {
    let f = fixture();
    let (model, _) = load(&f, &f.weights, &f.config, true).unwrap();
    let again = PeftAdapter::from_bytes(&f.weights, &f.config, "t")
        .unwrap()
        .load_into(&model, "task", &options(true));
    assert_eq!(
        again.unwrap_err(),
        LoraError::AdapterExists {
            name: "task".into()
        }
    );
}

#[test]
fn a_failed_save_leaves_the_previous_files_intact() {
    let f = fixture();
    let (model, _) = load(&f, &f.weights, &f.config, true).unwrap();
    let dir = temp("failed_save");
    save_adapter(&model, &dir, "task").unwrap();
    let before: Vec<Vec<u8>> = [WEIGHTS_FILE, CONFIG_FILE]
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect();

    let poisoned = fill(model, "lora_b", f64::NAN);
    assert_eq!(
        save_adapter(&poisoned, &dir, "task").unwrap_err(),
        LoraError::NonFiniteAdapter {
            path: "blocks.0.attn.query".into(),
            adapter: "task".into()
        }
    );
    assert!(matches!(
        save_adapter(&poisoned, &dir, "other"),
        Err(LoraError::UnknownAdapter { .. })
    ));
    let after: Vec<Vec<u8>> = [WEIGHTS_FILE, CONFIG_FILE]
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect();
    assert_eq!(before, after);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file left: {names:?}");

    // A directory that cannot be created: an I/O error, nothing written.
    let blocker = temp("blocker");
    std::fs::write(&blocker, b"a file").unwrap();
    let model = load(&f, &f.weights, &f.config, true).unwrap().0;
    assert!(matches!(
        save_adapter(&model, blocker.join("adapter"), "task"),
        Err(LoraError::Io { .. })
    ));
}

/// A small seeded generator (xorshift64*), so the property test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random mutation of `bytes`: flipped bits, overwritten bytes, a cut, an insertion, or a
/// copied slice.
fn mutate(bytes: &mut Vec<u8>, rng: &mut Rng, focus: usize) {
    let len = bytes.len().max(1);
    // Half the mutations hit the first `focus` bytes (the safetensors header, where the
    // interesting failures live).
    let at = |rng: &mut Rng| {
        if rng.below(2) == 0 {
            rng.below(focus.min(len))
        } else {
            rng.below(len)
        }
    };
    match rng.below(5) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let i = at(rng);
                if i < bytes.len() {
                    bytes[i] ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            let i = at(rng);
            if i < bytes.len() {
                bytes[i] = b"0123456789-.,:\"[]{}eE \x00\xff"[rng.below(24)];
            }
        }
        2 => bytes.truncate(rng.below(len)),
        3 => {
            let i = at(rng).min(bytes.len());
            let insert: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
            bytes.splice(i..i, insert);
        }
        _ => {
            let (from, to) = (rng.below(len), at(rng));
            let n = rng.below(16).min(bytes.len().saturating_sub(from.max(to)));
            let slice = bytes[from..from + n].to_vec();
            bytes[to..to + n].copy_from_slice(&slice);
        }
    }
}

#[test]
fn mutated_files_never_panic_and_accepted_ones_are_valid() {
    let f = fixture();
    let header = 8 + u64::from_le_bytes(f.weights[..8].try_into().unwrap()) as usize;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..3000 {
        let mut weights = f.weights.clone();
        let mut config = f.config.clone().into_bytes();
        for _ in 0..1 + rng.below(3) {
            match rng.below(3) {
                0 => {
                    let len = config.len();
                    mutate(&mut config, &mut rng, len)
                }
                _ => mutate(&mut weights, &mut rng, header),
            }
        }
        let config = String::from_utf8_lossy(&config).into_owned();
        let strict = case % 2 == 0;
        let outcome = catch_unwind(AssertUnwindSafe(|| load(&f, &weights, &config, strict)));
        let Ok(result) = outcome else {
            panic!("case {case}: the loader panicked");
        };
        let Ok((model, report)) = result else {
            refused += 1;
            continue;
        };
        accepted += 1;
        // Accepted means valid: every loaded adapter is attached, finite, and shaped for its
        // layer.
        assert!(!report.loaded.is_empty(), "case {case}");
        assert!(!strict || report.is_clean(), "case {case}: {report}");
        let infos = model.lora_adapters();
        assert_eq!(infos.len(), report.loaded.len(), "case {case}");
        for (path, tensor) in values(&model)
            .iter()
            .filter(|(p, _)| p.contains(".burn_lora."))
        {
            assert!(
                tensor.values.iter().all(|v| v.is_finite()),
                "case {case}: {path}"
            );
            let rank = infos
                .iter()
                .find(|i| path.starts_with(&format!("{}.", i.path)))
                .unwrap()
                .rank;
            let expected = match path.ends_with("lora_a") {
                true => [16, rank],
                false => [rank, 16],
            };
            assert_eq!(tensor.dims, expected, "case {case}: {path}");
        }
    }
    println!("mutated adapters: {accepted} accepted, {refused} refused");
    assert!(
        refused > 1000 && accepted > 50,
        "{accepted} accepted, {refused} refused"
    );
}

fn temp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("peft_errors")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    dir
}

//! The fine-tuning study (`examples/finetune_study`) in miniature: a few steps of a tiny model,
//! through the whole pipeline (pretraining, every variant in a process of its own, adapter and
//! model files, table, plot, bars), twice, to check that it works and is deterministic.
//!
//! This test has its own `main` (harness = false): the study starts its runs as child
//! processes of the running program, and here that program is this test.

#[path = "../examples/finetune_study/study/mod.rs"]
mod study;

use std::path::{Path, PathBuf};

use study::corpus::{self, Rng, Vocab};
use study::preset::Preset;
use study::rouge::rouge1;
use study::run::{read_json, result_path};
use study::variant::{RunResult, Variant};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|arg| arg == "--child") {
        return study::main(args);
    }
    // The study checks the pipeline, not a backend: backend parity has its own tests. It runs on
    // the default CPU backend unless BURN_DEVICE says otherwise, also in a `--features wgpu`
    // build, where a software GPU would take an hour over it. The child processes inherit this.
    if std::env::var_os("BURN_DEVICE").is_none() {
        // SAFETY: set at the top of main, before this process starts any thread.
        unsafe { std::env::set_var("BURN_DEVICE", "flex") };
    }
    rouge_matches_hand_counts();
    corpus_is_deterministic_and_summaries_follow_the_dialogue();
    miniature_study_runs_end_to_end_and_reruns_identically();
    miniature_variants_comparison_runs_every_variant();
    println!("finetune_study: 4 tests passed");
    std::process::ExitCode::SUCCESS
}

/// ROUGE-1 against counts worked out by hand.
fn rouge_matches_hand_counts() {
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    // 2 of 3 words shared each way.
    let r = rouge1(&["the", "cat", "sat"], &["the", "cat", "ran"]);
    assert!(close(r.precision, 2.0 / 3.0) && close(r.recall, 2.0 / 3.0) && close(r.f1, 2.0 / 3.0));
    // Clipped counts: "the" twice in the candidate matches one "the"; punctuation is ignored.
    let r = rouge1(&["the", "the", "dog", "."], &["the", "dog", "barks", "!"]);
    assert!(close(r.precision, 2.0 / 3.0), "{r:?}");
    assert!(close(r.recall, 2.0 / 3.0), "{r:?}");
    // `'s` counts as `s`; case does not matter.
    let r = rouge1(&["Bob", "'s"], &["bob", "s", "bike"]);
    assert!(close(r.precision, 1.0) && close(r.recall, 2.0 / 3.0) && close(r.f1, 0.8));
    // Nothing shared, and nothing at all.
    assert_eq!(rouge1(&["a"], &["b"]).f1, 0.0);
    assert_eq!(rouge1(&[], &[]).f1, 0.0);
}

fn corpus_is_deterministic_and_summaries_follow_the_dialogue() {
    let draw = |seed| {
        let mut rng = Rng::new(seed);
        (0..200)
            .map(|_| corpus::example(&mut rng))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7), "the same seed gives the same corpus");
    assert_ne!(draw(7), draw(8), "another seed gives another corpus");

    let vocab = Vocab::new();
    for example in draw(7) {
        // Every name, day, place, item, price and event of a summary comes from its dialogue.
        for word in &example.summary {
            let is_content = word.chars().all(|c| c.is_ascii_alphanumeric())
                && ![
                    "and", "will", "meet", "on", "at", "the", "buy", "for", "dollars", "go", "to",
                    "cannot", "with",
                ]
                .contains(word);
            assert!(
                !is_content || example.dialogue.contains(word),
                "`{word}` of {:?} is not in {:?}",
                example.summary,
                example.dialogue
            );
        }
        // Task B predicts the summary and the end token, and nothing of the dialogue.
        let sequence = corpus::summarisation_sequence(&vocab, &example);
        let predicted = sequence.targets.iter().filter(|t| **t).count();
        assert_eq!(predicted, example.summary.len() + 1);
        let prompt = corpus::prompt(&vocab, &example);
        assert_eq!(&sequence.tokens[..prompt.len()], prompt.as_slice());
    }
}

/// The fine-tuning seeds of the miniature studies here (the study's default is 3; 2 keep the
/// test short and still have a spread).
const SEEDS: [u64; 2] = [42, 43];

/// The variant a run name stands for: `<variant>_seed<N>`, `<variant>_repeat` or `base`.
fn variant_of(name: &str) -> Variant {
    let id = match name.rsplit_once("_seed") {
        Some((id, seed)) if seed.parse::<u64>().is_ok() => id,
        _ => name.trim_end_matches("_repeat"),
    };
    Variant::parse(id).expect("a variant")
}

/// The naive mean ± sample standard deviation, as the table prints it.
fn mean_pm_std(values: &[f64], digits: usize) -> String {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    format!("{mean:.digits$} ± {:.digits$}", var.sqrt())
}

fn miniature_study_runs_end_to_end_and_reruns_identically() {
    let root = std::env::temp_dir().join(format!("burn-lora-study-test-{}", std::process::id()));
    let first = run_miniature(&root.join("first"));
    let second = run_miniature(&root.join("second"));
    let preset = Preset::miniature();
    let d = preset.d_model;
    for name in run_names() {
        let a = &first[&name];
        let b = &second[&name];
        assert_eq!(a.outcome(), b.outcome(), "run `{name}` differs on a rerun");

        let variant = variant_of(&name);
        // Trainable parameters, counted independently of the library's report.
        let expected = match variant {
            Variant::Base => 0,
            Variant::Full => a.total_params,
            Variant::LoraQv(r) => preset.n_layers * 2 * r * (d + d),
            Variant::LoraQkvo(r) => preset.n_layers * 4 * r * (d + d),
            other => unreachable!("the study does not run {other:?}"),
        };
        assert_eq!(
            a.trainable_params, expected,
            "trainable parameters of `{name}`"
        );
        // Step 0 and every eval_every steps up to the last.
        let steps: Vec<usize> = a.curve.iter().map(|(s, _)| *s).collect();
        match variant {
            Variant::Base => assert_eq!(steps, vec![0]),
            _ => assert_eq!(steps, vec![0, 2, 3], "validation points of `{name}`"),
        }
        assert!(
            a.curve
                .iter()
                .all(|(_, loss)| loss.is_finite() && *loss > 0.0)
        );
        assert!((0.0..=1.0).contains(&a.rouge1));
        if variant != Variant::Base {
            // Every step was timed, and the run went through burn-train's Learner, which logs
            // its metrics per epoch into the run's directory.
            assert!(
                a.train_seconds > 0.0 && a.step_ms > 0.0,
                "`{name}` timed its steps"
            );
            let learner = root
                .join("first")
                .join("work")
                .join(format!("{name}.learner"));
            assert!(
                learner.join("train").is_dir(),
                "`{name}` has no Learner logs"
            );
        }
        // What each variant ships: the model, or PEFT's two adapter files, far smaller.
        let shipped = root.join("first").join("work").join(&name);
        if variant.lora().is_some() {
            for file in ["adapter_model.safetensors", "adapter_config.json"] {
                assert!(shipped.join(file).is_file(), "`{name}` lacks {file}");
            }
            assert!(a.disk_bytes < first["full_seed42"].disk_bytes / 2);
        } else {
            assert!(
                shipped.join("model.bpk").is_file(),
                "`{name}` lacks model.bpk"
            );
        }
    }
    // Full fine-tuning moves the validation loss from the base's (a few steps do that much).
    let base_loss = first["base"].final_val_loss();
    assert_ne!(first["full_seed42"].final_val_loss(), base_loss);
    for seed in SEEDS {
        assert_eq!(
            first[&format!("full_seed{seed}")].curve[0].1,
            base_loss,
            "every run starts from the same base"
        );
        assert_eq!(
            first[&format!("lora_qv_r8_seed{seed}")].curve[0].1,
            base_loss,
            "LoRA starts exactly at the base"
        );
    }
    // Another fine-tuning seed is another run: other data, initialisation and dropout.
    for id in ["full", "lora_qv_r8", "lora_qkvo_r8", "lora_qv_r1"] {
        let [a, b] = SEEDS.map(|seed| &first[&format!("{id}_seed{seed}")]);
        assert_ne!(
            a.outcome(),
            b.outcome(),
            "`{id}` gives the same run for both seeds"
        );
    }
    // The repeat reruns the first seed.
    assert_eq!(
        first["lora_qkvo_r8_repeat"].outcome(),
        first["lora_qkvo_r8_seed42"].outcome()
    );

    for dir in ["first", "second"] {
        let out = root.join(dir).join("out");
        let table =
            std::fs::read_to_string(out.join("finetune_study_miniature.md")).expect("table");
        for label in [
            "base (no fine-tuning)",
            "full fine-tuning",
            "LoRA Q,V r=8",
            "LoRA Q,K,V,O r=8",
        ] {
            assert!(
                table.contains(&format!("| {label} |")),
                "the table lacks `{label}`"
            );
        }
        assert!(table.contains("| 1 | 16.000 |"), "the sweep lacks rank 1");
        // Mean ± standard deviation over the seeds, against a naive computation.
        let runs = if dir == "first" { &first } else { &second };
        let of = |id: &str, value: fn(&RunResult) -> f64| -> Vec<f64> {
            SEEDS
                .iter()
                .map(|seed| value(&runs[&format!("{id}_seed{seed}")]))
                .collect()
        };
        for (id, label) in [
            ("full", "full fine-tuning"),
            ("lora_qv_r8", "LoRA Q,V r=8"),
            ("lora_qkvo_r8", "LoRA Q,K,V,O r=8"),
        ] {
            let row = format!("| {label} | {} |", mean_pm_std(&of(id, |r| r.rouge1), 3));
            assert!(table.contains(&row), "the table lacks `{row}`");
            let loss = mean_pm_std(&of(id, |r| r.final_val_loss()), 3);
            assert!(
                table.contains(&loss),
                "the table lacks {label}'s loss `{loss}`"
            );
        }
        let rank_one = mean_pm_std(&of("lora_qv_r1", |r| r.final_val_loss()), 4);
        assert!(table.contains(&rank_one), "the sweep lacks `{rank_one}`");
        assert!(
            table.contains("pass: deterministic"),
            "the determinism bar holds"
        );
        let png = std::fs::read(out.join("finetune_study_miniature.png")).expect("plot");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the plot is a PNG");
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!((width, height), (1500, 460));
    }
    // A second study in the same work directory clears it (it is the study's own) ...
    run_miniature(&root.join("first"));
    // ... but a directory holding someone else's files is refused, and left as it was.
    let foreign = root.join("foreign");
    std::fs::create_dir_all(&foreign).expect("a directory");
    std::fs::write(foreign.join("notes.txt"), "keep me").expect("a file");
    let args: Vec<String> = ["finetune_study", "--miniature", "--work", path(&foreign)]
        .map(String::from)
        .to_vec();
    let refused = study::run(&args).expect_err("a foreign work directory is refused");
    assert!(refused.contains("not a work directory"), "{refused}");
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "keep me"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// `--variants` in miniature: every variant runs in its own process, starts where it should,
/// trains the parameters it should, saves PEFT files, and lands in the table.
fn miniature_variants_comparison_runs_every_variant() {
    let root = std::env::temp_dir().join(format!("burn_lora_variants_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (work, out) = (root.join("work"), root.join("out"));
    let args = study_args(&["--variants", "--miniature"], &out, &work);
    assert!(study::run(&args).expect("the variants comparison runs"));
    let result = |variant: Variant| {
        let value = read_json(&result_path(&work, &variant.id())).expect("results");
        RunResult::from_json(&value).expect("complete results")
    };
    let preset = Preset::miniature();
    let lora = result(Variant::LoraQkvo(8));
    // Q, K, V and O of each layer, r = 8, d_in = d_out = d_model.
    let adapters = preset.n_layers * 4 * 8 * 2 * preset.d_model;
    assert_eq!(lora.trainable_params, adapters);
    let start = |r: &RunResult| r.curve[0].1;
    let table = std::fs::read_to_string(out.join("variants_miniature.md")).expect("the table");
    for variant in Variant::beyond_lora() {
        let run = result(variant);
        let magnitudes = match variant {
            Variant::DoraQkvo(_) => preset.n_layers * 4 * preset.d_model,
            _ => 0,
        };
        assert_eq!(run.trainable_params, adapters + magnitudes, "{variant:?}");
        assert!(
            table.contains(&variant.label()),
            "{variant:?} is in the table"
        );
        assert!(run.curve.len() >= 2 && run.curve.iter().all(|(_, loss)| loss.is_finite()));
        let config = work.join(variant.id()).join(burn_lora::peft::CONFIG_FILE);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(config).expect("adapter files"))
                .expect("JSON");
        match variant {
            // DoRA and LoRA+ start exactly at the base, as LoRA does.
            Variant::DoraQkvo(_) | Variant::LoraPlusQkvo(_) => {
                assert_eq!(start(&run).to_bits(), start(&lora).to_bits(), "{variant:?}");
                let dora = matches!(variant, Variant::DoraQkvo(_));
                assert_eq!(config["use_dora"], serde_json::json!(dora));
            }
            // PiSSA starts at the base up to rounding, and saves a rank-2r plain delta.
            Variant::PissaQkvo(_) => {
                assert!((start(&run) - start(&lora)).abs() < 1e-4, "{variant:?}");
                assert_eq!(config["r"], serde_json::json!(16));
                assert_eq!(config["init_lora_weights"], serde_json::json!(true));
            }
            _ => {}
        }
    }
    // A quantized base moves the start a little, 4 bits more than 8.
    let shift = |bits| (start(&result(Variant::QloraQkvo { bits, rank: 8 })) - start(&lora)).abs();
    assert!(
        shift(8) < shift(4),
        "8-bit {} vs 4-bit {}",
        shift(8),
        shift(4)
    );
    assert!(shift(8) < 1e-2 * start(&lora), "8-bit shift {}", shift(8));
    let _ = std::fs::remove_dir_all(&root);
}

/// Every run of a miniature study.
fn run_names() -> Vec<String> {
    let mut names = vec!["base".to_string(), "lora_qkvo_r8_repeat".to_string()];
    for seed in SEEDS {
        for id in ["full", "lora_qv_r8", "lora_qkvo_r8", "lora_qv_r1"] {
            names.push(format!("{id}_seed{seed}"));
        }
    }
    names
}

/// Runs the miniature study in `dir` (work and out inside) and reads back each run's results.
fn run_miniature(dir: &Path) -> std::collections::HashMap<String, RunResult> {
    let work: PathBuf = dir.join("work");
    let out = dir.join("out");
    let args = study_args(&["--miniature", "--seeds", "2"], &out, &work);
    let passed = study::run(&args).expect("the miniature study runs");
    assert!(passed, "a miniature study holds its determinism bar");
    run_names()
        .into_iter()
        .map(|name| {
            let value = read_json(&result_path(&work, &name)).expect("results");
            let result = RunResult::from_json(&value).expect("complete results");
            (name, result)
        })
        .collect()
}

/// The study's command line with `flags`, writing to `out` and working in `work`.
fn study_args(flags: &[&str], out: &Path, work: &Path) -> Vec<String> {
    let mut args = vec!["finetune_study".to_string()];
    args.extend(flags.iter().map(|flag| flag.to_string()));
    args.extend(["--out", path(out), "--work", path(work)].map(String::from));
    args
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

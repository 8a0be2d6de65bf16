//! The fine-tuning study: pretrain a small transformer on task A, adapt it to task B (dialogue
//! summarisation) with full fine-tuning and with LoRA, sweep LoRA's rank, and check the
//! quality bars. Each run is a process of its own, so each peak memory is its own.

pub mod corpus;
pub mod memory;
pub mod model;
pub mod plot;
pub mod preset;
pub mod report;
pub mod rouge;
pub mod run;
pub mod train;
pub mod variant;
pub mod variants;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use burn::prelude::Device;

use preset::Preset;
use report::Study;
use variant::{RunResult, Variant};

const USAGE: &str =
    "usage: finetune_study [--quick | --miniature] [--seed N] [--out DIR] [--work DIR]

  --quick      fewer and smaller steps, no rank sweep: under 2 minutes on 2 cores
  --miniature  a few steps of a tiny model: checks the pipeline, not the quality
  --seed N     the seed of the base (its pretraining) and of the held-out dialogues (default 42)
  --seeds K    fine-tune every variant K times, with seeds N, N+1, ...: the fine-tuning data
               stream, the adapters' initialisation and dropout (default 3; mean ± std)
  --full-lr X  full fine-tuning's peak learning rate (default 0.004)
  --lora-lr X  LoRA's peak learning rate (default 0.02)
  --loraplus-lr X, --pissa-lr X, --qlora-lr X
               the peak learning rates of LoRA+'s A (default 0.002), of PiSSA (0.01) and of
               QLoRA (0.01); DoRA takes LoRA's
  --variants   compare DoRA, LoRA+, PiSSA and QLoRA (8- and 4-bit base) with LoRA and
               full fine-tuning instead (docs/results/variants.md)
  --out DIR    where the table and plot go (default docs/results)
  --work DIR   where models, adapters and per-run results go, cleared at the start
               (default $CARGO_TARGET_DIR/finetune_study, else target/finetune_study);
               a non-empty directory that an earlier study did not make is refused";

/// The study's command line. Exits non-zero when a quality bar is missed or a run fails.
pub fn main(args: Vec<String>) -> ExitCode {
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// Runs the study (or, with `--child`, one of its runs) as the command line says. Ok(false)
/// when a quality bar is missed.
pub fn run(args: &[String]) -> Result<bool, String> {
    Options::parse(args).and_then(|options| options.execute())
}

/// The file that marks a directory as this study's own, safe to clear.
const WORK_MARKER: &str = ".finetune_study";

#[derive(Clone, Debug)]
struct Options {
    preset: Preset,
    seed: u64,
    /// How many fine-tuning seeds each variant runs with.
    seeds: usize,
    /// Set in a child process: the fine-tuning seed.
    finetune_seed: Option<u64>,
    out: PathBuf,
    work: PathBuf,
    /// Set in a child process: the task (`pretrain` or a variant id) and the run's name.
    child: Option<(String, String)>,
    /// Whether a child draws its progress bar.
    progress: bool,
    /// `--variants`: the comparison of LoRA variants instead of the study.
    variants: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut preset = Preset::full();
        let mut seed = 42;
        let mut seeds = 3;
        let mut finetune_seed = None;
        let mut out = PathBuf::from("docs/results");
        let mut work = None;
        let mut task = None;
        let mut run = None;
        let (mut full_lr, mut lora_lr) = (None, None);
        let (mut loraplus_lr, mut pissa_lr, mut qlora_lr) = (None, None, None);
        let mut progress = true;
        let mut variants = false;
        let mut args = args.iter().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .cloned()
                    .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
            };
            match arg.as_str() {
                "--quick" => preset = Preset::quick(),
                "--miniature" => preset = Preset::miniature(),
                "--preset" => {
                    let name = value()?;
                    preset = Preset::by_name(&name).ok_or(format!("unknown preset `{name}`"))?;
                }
                "--seed" => {
                    seed = value()?
                        .parse()
                        .map_err(|_| format!("--seed takes a whole number\n{USAGE}"))?
                }
                "--seeds" => {
                    seeds = value()?
                        .parse()
                        .ok()
                        .filter(|k| *k >= 1)
                        .ok_or(format!("--seeds takes a whole number ≥ 1\n{USAGE}"))?
                }
                "--finetune-seed" => {
                    finetune_seed =
                        Some(value()?.parse().map_err(|_| {
                            format!("--finetune-seed takes a whole number\n{USAGE}")
                        })?)
                }
                "--full-lr" => full_lr = Some(learning_rate(arg, value()?)?),
                "--lora-lr" => lora_lr = Some(learning_rate(arg, value()?)?),
                "--loraplus-lr" => loraplus_lr = Some(learning_rate(arg, value()?)?),
                "--pissa-lr" => pissa_lr = Some(learning_rate(arg, value()?)?),
                "--qlora-lr" => qlora_lr = Some(learning_rate(arg, value()?)?),
                "--out" => out = PathBuf::from(value()?),
                "--work" => work = Some(PathBuf::from(value()?)),
                "--child" => task = Some(value()?),
                "--run" => run = Some(value()?),
                "--no-progress" => progress = false,
                "--variants" => variants = true,
                "-h" | "--help" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
            }
        }
        // Applied after the preset, whichever order the flags came in.
        preset.full_lr = full_lr.unwrap_or(preset.full_lr);
        preset.lora_lr = lora_lr.unwrap_or(preset.lora_lr);
        preset.loraplus_lr = loraplus_lr.unwrap_or(preset.loraplus_lr);
        preset.pissa_lr = pissa_lr.unwrap_or(preset.pissa_lr);
        preset.qlora_lr = qlora_lr.unwrap_or(preset.qlora_lr);
        let work = work.unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or("target".into());
            PathBuf::from(target).join("finetune_study")
        });
        let child = match (task, run) {
            (Some(task), run) => Some((task.clone(), run.unwrap_or(task))),
            (None, None) => None,
            (None, Some(_)) => return Err("--run needs --child".into()),
        };
        Ok(Self {
            preset,
            seed,
            seeds,
            finetune_seed,
            out,
            work,
            child,
            progress,
            variants,
        })
    }

    /// Runs the study, or one child's task. Ok(false) when a quality bar is missed.
    fn execute(&self) -> Result<bool, String> {
        match &self.child {
            Some((task, run)) if task == "pretrain" => {
                run::pretrain(&self.preset, self.seed, &self.work, self.progress).map(|_| true)
            }
            Some((task, run_name)) => {
                let variant = Variant::parse(task).ok_or(format!("unknown variant `{task}`"))?;
                run::finetune(
                    &self.preset,
                    self.seed,
                    self.finetune_seed.unwrap_or(self.seed),
                    variant,
                    &self.work,
                    run_name,
                    self.progress,
                )
                .map(|_| true)
            }
            None if self.variants => self.variants_study(),
            None => self.study(),
        }
    }

    /// Prepares the work and output directories: the work directory starts empty, so that no
    /// result of an earlier study can leak in. Only a directory a study made (it holds the
    /// marker) is cleared, never a user's files.
    fn prepare_directories(&self) -> Result<(), String> {
        // Start from an empty work directory: no result of an earlier study can leak in. Only
        // a directory this study made (it holds the marker) is cleared, never a user's files.
        let marker = self.work.join(WORK_MARKER);
        let is_empty = |dir: &std::path::Path| {
            std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
        };
        if self.work.exists() && !is_empty(&self.work) {
            if !marker.is_file() {
                return Err(format!(
                    "{} is not empty and is not a work directory of this study; pass another \
                     --work",
                    self.work.display()
                ));
            }
            std::fs::remove_dir_all(&self.work)
                .map_err(|e| format!("cannot clear {}: {e}", self.work.display()))?;
        }
        std::fs::create_dir_all(&self.work)
            .and_then(|_| std::fs::write(&marker, "burn-lora finetune_study work directory\n"))
            .map_err(|e| format!("cannot create {}: {e}", self.work.display()))?;
        std::fs::create_dir_all(&self.out)
            .map_err(|e| format!("cannot create {}: {e}", self.out.display()))
    }

    /// Runs `variant` alone in a child process, with the study's seed, and reads its result
    /// back.
    fn run_one(&self, variant: Variant) -> Result<RunResult, String> {
        let name = variant.id();
        self.spawn_all(&[Job::new(variant, &name, self.seed)])?;
        let value = run::read_json(&run::result_path(&self.work, &name))?;
        RunResult::from_json(&value).ok_or(format!("the results of run `{name}` are incomplete"))
    }

    /// `--variants`: base, full fine-tuning, LoRA and each variant beyond it, one process at a
    /// time, with the same data, steps and evaluation; a table of quality and costs.
    fn variants_study(&self) -> Result<bool, String> {
        let start = Instant::now();
        self.prepare_directories()?;
        let mut runs = vec![Variant::Base, Variant::Full, Variant::LoraQkvo(8)];
        runs.extend(Variant::beyond_lora());
        let total = runs.len() + 1;
        eprintln!("[1/{total}] pretraining the base on task A");
        self.spawn_all(&[Job::pretrain()])?;
        let mut results = Vec::new();
        for (index, variant) in runs.iter().enumerate() {
            eprintln!("[{}/{total}] {}", index + 2, variant.label());
            let result = self.run_one(*variant)?;
            eprintln!(
                "      ROUGE-1 {:.3}, validation loss {:.4}, step {:.0} ms",
                result.rouge1,
                result.final_val_loss(),
                result.step_ms
            );
            results.push((*variant, result));
        }
        let comparison = variants::Comparison {
            preset: self.preset.clone(),
            command: self.command(),
            machine: machine(),
            backend: format!("{:?}", Device::default()),
            wall_seconds: start.elapsed().as_secs_f64(),
            results,
        };
        let markdown = comparison.markdown();
        let stem = match self.preset.name {
            "full" => "variants".to_string(),
            other => format!("variants_{other}"),
        };
        let table = self.out.join(format!("{stem}.md"));
        std::fs::write(&table, &markdown)
            .map_err(|e| format!("cannot write {}: {e}", table.display()))?;
        println!("{markdown}");
        println!("wrote {}", table.display());
        Ok(true)
    }

    fn study(&self) -> Result<bool, String> {
        let start = Instant::now();
        self.prepare_directories()?;

        let seeds: Vec<u64> = (0..self.seeds as u64).map(|k| self.seed + k).collect();
        let comparison = [
            Variant::Base,
            Variant::Full,
            Variant::LoraQv(8),
            Variant::LoraQkvo(8),
        ];
        let sweep: Vec<usize> = self.preset.ranks.to_vec();
        // The comparison runs one process at a time, so that their step times and peak memory
        // are measured on a quiet machine. The base only evaluates, which no seed changes. The
        // sweep reports neither time nor memory, so its runs share the cores, a process per
        // core (each run's numbers do not depend on what runs beside it).
        let mut stages: Vec<Vec<Job>> = vec![vec![Job::new(Variant::Base, "base", seeds[0])]];
        for seed in &seeds {
            for variant in &comparison[1..] {
                stages.push(vec![Job::new(*variant, &run_name(*variant, *seed), *seed)]);
            }
        }
        let extra_ranks: Vec<Job> = sweep
            .iter()
            .map(|r| Variant::LoraQv(*r))
            .filter(|v| !comparison.contains(v))
            .flat_map(|v| seeds.iter().map(move |s| Job::new(v, &run_name(v, *s), *s)))
            .collect();
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        stages.extend(extra_ranks.chunks(jobs).map(<[_]>::to_vec));
        let repeat = "lora_qkvo_r8_repeat";
        stages.push(vec![Job::new(Variant::LoraQkvo(8), repeat, seeds[0])]);
        let total = stages.iter().map(Vec::len).sum::<usize>() + 1;

        eprintln!("[1/{total}] pretraining the base on task A");
        self.spawn_all(&[Job::pretrain()])?;
        let pretrain = run::read_json(&run::result_path(&self.work, "pretrain"))?;
        let mut results = Vec::new();
        for stage in &stages {
            let names: Vec<String> = stage
                .iter()
                .map(|job| format!("{} ({})", job.variant_label(), job.run))
                .collect();
            let first = results.len() + 2;
            let last = first + stage.len() - 1;
            match stage.len() {
                1 => eprintln!("[{first}/{total}] {}", names[0]),
                _ => eprintln!(
                    "[{first}-{last}/{total}] side by side: {}",
                    names.join(", ")
                ),
            }
            self.spawn_all(stage)?;
            for job in stage {
                let value = run::read_json(&run::result_path(&self.work, &job.run))?;
                let result = RunResult::from_json(&value)
                    .ok_or(format!("the results of run `{}` are incomplete", job.run))?;
                let trained = match job.task.as_str() {
                    "base" => "no training".to_string(),
                    _ => format!("{:.1} s of training", result.train_seconds),
                };
                eprintln!(
                    "      {}: ROUGE-1 {:.3}, validation loss {:.4}, {trained}",
                    job.run,
                    result.rouge1,
                    result.final_val_loss(),
                );
                results.push((job.run.clone(), result));
            }
        }
        let find = |name: &str| {
            results
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, r)| r.clone())
                .expect("every run has a result")
        };
        let per_seed = |variant: Variant| -> Vec<RunResult> {
            match variant {
                Variant::Base => vec![find("base")],
                _ => seeds.iter().map(|s| find(&run_name(variant, *s))).collect(),
            }
        };
        let study = Study {
            preset: self.preset.clone(),
            seed: self.seed,
            seeds: seeds.clone(),
            command: self.command(),
            machine: machine(),
            backend: format!("{:?}", Device::default()),
            wall_seconds: start.elapsed().as_secs_f64(),
            pretrain_seconds: pretrain["seconds"].as_f64().unwrap_or(f64::NAN),
            base_params: pretrain["params"].as_u64().unwrap_or(0) as usize,
            pretrain_loss: pretrain["curve"]
                .as_array()
                .and_then(|c| c.last())
                .and_then(|p| p[1].as_f64())
                .unwrap_or(f64::NAN),
            comparison: comparison.iter().map(|v| (*v, per_seed(*v))).collect(),
            sweep: sweep
                .iter()
                .map(|r| (*r, per_seed(Variant::LoraQv(*r))))
                .collect(),
            repeat: find(repeat),
        };
        let bars = study.bars();
        let stem = match self.preset.name {
            "full" => "finetune_study".to_string(),
            other => format!("finetune_study_{other}"),
        };
        let markdown = study
            .markdown(&bars)
            .replace("(finetune_study.png)", &format!("({stem}.png)"));
        let table = self.out.join(format!("{stem}.md"));
        std::fs::write(&table, &markdown)
            .map_err(|e| format!("cannot write {}: {e}", table.display()))?;
        let figure = self.out.join(format!("{stem}.png"));
        plot::draw(&study, &figure)?;
        println!("{markdown}");
        println!("wrote {} and {}", table.display(), figure.display());

        // A miniature run is too short to learn: only determinism is held to its bar there.
        let enforced: Vec<_> = bars
            .iter()
            .filter(|bar| self.preset.checks_quality() || bar.name.starts_with("deterministic"))
            .collect();
        let missed: Vec<_> = enforced
            .iter()
            .filter(|b| b.passed == Some(false))
            .collect();
        for bar in &missed {
            eprintln!("quality bar missed: {} ({})", bar.name, bar.detail);
        }
        Ok(missed.is_empty())
    }

    /// Runs each job in a fresh process of this same program, all at once, and waits for
    /// them. Several at once draw no progress bars, which would overwrite each other.
    fn spawn_all(&self, jobs: &[Job]) -> Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let mut children = Vec::new();
        for job in jobs {
            let mut command = Command::new(&exe);
            command
                .args(["--child", &job.task, "--run", &job.run])
                .args(["--preset", self.preset.name])
                .args(["--seed", &self.seed.to_string()])
                .args(["--finetune-seed", &job.finetune_seed.to_string()])
                .args(["--full-lr", &self.preset.full_lr.to_string()])
                .args(["--lora-lr", &self.preset.lora_lr.to_string()])
                .args(["--loraplus-lr", &self.preset.loraplus_lr.to_string()])
                .args(["--pissa-lr", &self.preset.pissa_lr.to_string()])
                .args(["--qlora-lr", &self.preset.qlora_lr.to_string()])
                .arg("--work")
                .arg(&self.work);
            if jobs.len() > 1 {
                command.arg("--no-progress");
            }
            let child = command
                .spawn()
                .map_err(|e| format!("cannot start the `{}` run: {e}", job.run))?;
            children.push((&job.run, child));
        }
        let mut failures = Vec::new();
        for (run, mut child) in children {
            match child.wait() {
                Ok(status) if status.success() => {}
                Ok(status) => failures.push(format!("the `{run}` run failed ({status})")),
                Err(e) => failures.push(format!("the `{run}` run was lost: {e}")),
            }
        }
        match failures.is_empty() {
            true => Ok(()),
            false => Err(failures.join("; ")),
        }
    }

    fn command(&self) -> String {
        let mut command = "cargo run --release --example finetune_study".to_string();
        let default = Preset::by_name(self.preset.name).expect("a known preset");
        let mut flags = Vec::new();
        if self.variants {
            flags.push("--variants".to_string());
        }
        if self.preset.name != "full" {
            flags.push(format!("--{}", self.preset.name));
        }
        if self.seed != 42 {
            flags.push(format!("--seed {}", self.seed));
        }
        if self.seeds != 3 && !self.variants {
            flags.push(format!("--seeds {}", self.seeds));
        }
        if self.preset.full_lr != default.full_lr {
            flags.push(format!("--full-lr {}", self.preset.full_lr));
        }
        if self.preset.lora_lr != default.lora_lr {
            flags.push(format!("--lora-lr {}", self.preset.lora_lr));
        }
        if self.variants && self.preset.loraplus_lr != default.loraplus_lr {
            flags.push(format!("--loraplus-lr {}", self.preset.loraplus_lr));
        }
        if self.variants && self.preset.pissa_lr != default.pissa_lr {
            flags.push(format!("--pissa-lr {}", self.preset.pissa_lr));
        }
        if self.variants && self.preset.qlora_lr != default.qlora_lr {
            flags.push(format!("--qlora-lr {}", self.preset.qlora_lr));
        }
        if !flags.is_empty() {
            command += &format!(" -- {}", flags.join(" "));
        }
        command
    }
}

/// One child process: a task (`pretrain` or a variant id), the name of its run, and its
/// fine-tuning seed.
#[derive(Clone, Debug)]
struct Job {
    task: String,
    run: String,
    finetune_seed: u64,
}

impl Job {
    fn new(variant: Variant, run: &str, finetune_seed: u64) -> Self {
        Self {
            task: variant.id(),
            run: run.to_string(),
            finetune_seed,
        }
    }

    fn pretrain() -> Self {
        Self {
            task: "pretrain".into(),
            run: "pretrain".into(),
            finetune_seed: 0,
        }
    }

    fn variant_label(&self) -> String {
        Variant::parse(&self.task).map_or(self.task.clone(), |v| v.label())
    }
}

/// The name of `variant`'s run with fine-tuning seed `seed`.
pub fn run_name(variant: Variant, seed: u64) -> String {
    format!("{}_seed{seed}", variant.id())
}

fn learning_rate(flag: &str, value: String) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|lr| lr.is_finite() && *lr > 0.0)
        .ok_or(format!("{flag} takes a positive number, not `{value}`"))
}

/// The CPU, its cores and the OS, as far as this system says.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|release| {
            release
                .lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|name| name.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    format!("{cpu}, {cores} cores, {os}")
}

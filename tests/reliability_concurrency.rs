//! Reliability under concurrency: four writer threads, each with its own model and its own
//! adapter (every `A` and `B` value equal to its writer id, 1 to 4), save that adapter 10 times
//! each into ONE shared directory, while two reader threads load from that directory in a loop.
//! It proves that nothing panics, every save returns `Ok`, every load returns `Ok` (a missing
//! file is accepted only for a load that started before the first save had completed), every
//! loaded adapter is exactly one writer's (all of its `A` and `B` values equal one writer id,
//! never a mix of two saves), and that the directory ends with the two PEFT files and at most a
//! hidden lock file: no temporary leftovers.

mod common;

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use burn::prelude::Device;
use burn_lora::peft::{CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter};
use burn_lora::{LoraConfig, LoraError, LoraModule, Targets};
use common::{Projections, fill, values};

const WRITERS: usize = 4;
const SAVES_PER_WRITER: usize = 10;
const READERS: usize = 2;
/// Each reader goes on loading until the writers are done and it has this many good loads.
const MIN_LOADS_PER_READER: usize = 20;
/// A reader that takes longer than this reports a failure instead of hanging the suite.
const READER_DEADLINE: Duration = Duration::from_secs(120);
const D_IN: usize = 6;
const D_OUT: usize = 5;
const RANK: usize = 2;
const ALPHA: f64 = 4.0;

/// A unique directory under the system's temporary directory.
fn unique_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    std::env::temp_dir().join(format!(
        "burn_lora_concurrency_{}_{nanos}",
        std::process::id()
    ))
}

/// Writer `id`'s model: adapter "default" of rank `RANK` on query and value, every factor
/// value equal to `id`.
fn writer_model(id: usize) -> Projections {
    let device = Device::flex();
    let config = LoraConfig::new(RANK)
        .with_alpha(Some(ALPHA))
        .with_targets(Targets::attention_qv());
    let (model, _) = config
        .apply(Projections::new(D_IN, D_OUT, &device))
        .expect("the adapter applies");
    fill(fill(model, "lora_a", id as f64), "lora_b", id as f64)
}

/// The writer whose adapter `model` carries as its only adapter `name`: every `A` and `B`
/// value of both layers must be that writer's id, exactly.
fn writer_of(model: &Projections, name: &str) -> Result<usize, String> {
    let infos = model.lora_adapters();
    let expected_scale = ALPHA / RANK as f64;
    if infos.len() != 2
        || infos.iter().any(|info| {
            info.name != name
                || info.rank != RANK
                || (info.scale - expected_scale).abs() > 1e-12 * expected_scale
        })
    {
        return Err(format!(
            "expected one adapter `{name}` of rank {RANK} and scale {expected_scale} on each \
             layer, found {infos:?}"
        ));
    }
    let params = values(model);
    let mut ids = Vec::new();
    for layer in ["query", "value"] {
        for (factor, dims) in [("lora_a", [D_IN, RANK]), ("lora_b", [RANK, D_OUT])] {
            let path = format!("{layer}.weight.burn_lora.adapters.0.{factor}");
            let tensor = params
                .get(&path)
                .ok_or_else(|| format!("no parameter `{path}`"))?;
            if tensor.dims != dims {
                return Err(format!("`{path}` has shape {:?}", tensor.dims));
            }
            // Compared bit for bit: the values are small integers, exact in f32 and f64.
            let first = tensor.values[0].to_bits();
            if tensor.values.iter().any(|value| value.to_bits() != first) {
                return Err(format!(
                    "`{path}` mixes the values of several writers: {:?}",
                    tensor.values
                ));
            }
            ids.push(tensor.values[0]);
        }
    }
    let writer = (1..=WRITERS).find(|&id| (id as f64).to_bits() == ids[0].to_bits());
    match writer {
        Some(id) if ids.iter().all(|value| value.to_bits() == ids[0].to_bits()) => Ok(id),
        _ => Err(format!(
            "the factors (query A, query B, value A, value B) hold {ids:?}: not one writer's"
        )),
    }
}

/// What one writer saw: its failed saves.
fn write(id: usize, dir: &Path, first_save_done: &AtomicBool) -> Vec<String> {
    let model = writer_model(id);
    let mut failures = Vec::new();
    // The factors really carry the id, or the reader's check would prove nothing.
    match writer_of(&model, "default") {
        Ok(found) if found == id => {}
        other => failures.push(format!("writer {id}'s own model reads as {other:?}")),
    }
    for save in 0..SAVES_PER_WRITER {
        match save_adapter(&model, dir, "default") {
            Ok(saved) if saved.modules == 2 => first_save_done.store(true, Ordering::SeqCst),
            Ok(saved) => failures.push(format!(
                "writer {id}, save {save}: wrote {} modules, expected 2",
                saved.modules
            )),
            Err(error) => failures.push(format!("writer {id}, save {save}: {error:?}")),
        }
    }
    failures
}

/// What one reader saw.
#[derive(Debug, Default)]
struct ReaderReport {
    /// Good loads, by writer id (index 0 unused).
    by_writer: [usize; WRITERS + 1],
    /// Good loads that started while some writer was still saving.
    during_writes: usize,
    /// Loads that found no file, having started before the first save completed.
    early_missing: usize,
    failures: Vec<String>,
}

impl ReaderReport {
    fn loads(&self) -> usize {
        self.by_writer.iter().sum()
    }
}

fn read(dir: &Path, first_save_done: &AtomicBool, writers_done: &AtomicUsize) -> ReaderReport {
    let base = Projections::new(D_IN, D_OUT, &Device::flex());
    let mut report = ReaderReport::default();
    let deadline = Instant::now() + READER_DEADLINE;
    loop {
        // Read both flags before the load: they describe the moment it started.
        let finished = writers_done.load(Ordering::SeqCst) == WRITERS;
        let saved = first_save_done.load(Ordering::SeqCst);
        match load_adapter(&base, dir, "loaded") {
            Ok((model, _)) => match writer_of(&model, "loaded") {
                Ok(id) => {
                    report.by_writer[id] += 1;
                    if !finished {
                        report.during_writes += 1;
                    }
                }
                Err(error) => report.failures.push(error),
            },
            Err(LoraError::Io {
                kind: ErrorKind::NotFound,
                ..
            }) if !saved => report.early_missing += 1,
            Err(error) => report.failures.push(format!(
                "load (first save done: {saved}, writers done: {finished}): {error:?}"
            )),
        }
        if finished && (report.loads() >= MIN_LOADS_PER_READER || !saved) {
            break;
        }
        if report.failures.len() >= 10 {
            break;
        }
        if Instant::now() > deadline {
            report.failures.push(format!(
                "gave up after {READER_DEADLINE:?} with {} good loads",
                report.loads()
            ));
            break;
        }
    }
    report
}

/// A hidden lock file, the one file allowed beside the adapter's two.
fn is_lock_file(name: &str) -> bool {
    name.starts_with('.') && name.contains("lock") && !name.ends_with(".tmp")
}

/// Counts a writer as done when it ends, even by a panic, so the readers never wait forever.
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn concurrent_saves_into_one_directory_never_tear_an_adapter() {
    let dir = unique_dir();
    let first_save_done = AtomicBool::new(false);
    let writers_done = AtomicUsize::new(0);

    let (writers, readers) = thread::scope(|scope| {
        let (dir, first_save_done, writers_done) = (&dir, &first_save_done, &writers_done);
        // The readers start first: their first loads find no file yet.
        let readers: Vec<_> = (0..READERS)
            .map(|_| scope.spawn(move || read(dir, first_save_done, writers_done)))
            .collect();
        let writers: Vec<_> = (1..=WRITERS)
            .map(|id| {
                scope.spawn(move || {
                    let _done = Done(writers_done);
                    write(id, dir, first_save_done)
                })
            })
            .collect();
        let writers: Vec<_> = writers.into_iter().map(|handle| handle.join()).collect();
        let readers: Vec<_> = readers.into_iter().map(|handle| handle.join()).collect();
        (writers, readers)
    });

    // No thread panicked; every save succeeded.
    let mut save_failures = Vec::new();
    for (index, writer) in writers.into_iter().enumerate() {
        match writer {
            Ok(failures) => save_failures.extend(failures),
            Err(_) => save_failures.push(format!("writer {} panicked", index + 1)),
        }
    }
    let mut load_failures = Vec::new();
    let mut by_writer = [0; WRITERS + 1];
    let (mut during_writes, mut early_missing) = (0, 0);
    for (index, reader) in readers.into_iter().enumerate() {
        match reader {
            Ok(report) => {
                for (total, count) in by_writer.iter_mut().zip(report.by_writer) {
                    *total += count;
                }
                during_writes += report.during_writes;
                early_missing += report.early_missing;
                if report.loads() < MIN_LOADS_PER_READER {
                    load_failures.push(format!(
                        "reader {index} made {} good loads, expected at least \
                         {MIN_LOADS_PER_READER}",
                        report.loads()
                    ));
                }
                load_failures.extend(report.failures);
            }
            Err(_) => load_failures.push(format!("reader {index} panicked")),
        }
    }
    println!(
        "reliability_concurrency: {WRITERS} writers × {SAVES_PER_WRITER} saves, {READERS} \
         readers: good loads by writer {:?} ({during_writes} while saves were running), \
         {early_missing} loads before the first save",
        &by_writer[1..]
    );
    assert!(save_failures.is_empty(), "saves failed: {save_failures:#?}");
    assert!(load_failures.is_empty(), "loads failed: {load_failures:#?}");

    // The directory holds the two files, at most a hidden lock file, no temporary file.
    let entries: Vec<String> = fs::read_dir(&dir)
        .expect("the adapter directory exists")
        .map(|entry| {
            entry
                .expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for file in [WEIGHTS_FILE, CONFIG_FILE] {
        assert!(
            entries.iter().any(|entry| entry == file),
            "{file} is missing: {entries:?}"
        );
    }
    let others: Vec<&String> = entries
        .iter()
        .filter(|entry| *entry != WEIGHTS_FILE && *entry != CONFIG_FILE)
        .collect();
    assert!(
        others.len() <= 1 && others.iter().all(|name| is_lock_file(name.as_str())),
        "leftovers beside the adapter files (at most one hidden lock file allowed): {others:?}"
    );
    assert!(
        !entries.iter().any(|entry| entry.ends_with(".tmp")),
        "temporary files left: {entries:?}"
    );

    // What is left is one writer's adapter, whole.
    let base = Projections::new(D_IN, D_OUT, &Device::flex());
    let (last, _) = load_adapter(&base, &dir, "loaded").expect("the final adapter loads");
    let id = writer_of(&last, "loaded").expect("the final adapter is one writer's");
    println!("reliability_concurrency: the directory ends with writer {id}'s adapter");
    let _ = fs::remove_dir_all(dir);
}

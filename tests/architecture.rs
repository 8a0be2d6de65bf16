//! The crate's modules are layers, and code imports only downward: `error` and `ops` (the
//! fused backend operations, which know nothing of each other) → `config` →
//! `adapter` → `layers` → `model` → `variants` and `peft` (which know nothing of each other) →
//! `store` and `train`.
//! This test reads `src/` and fails on any path to a module of a higher layer, or of the same
//! layer's other top module. Doc comments and the `#[cfg(test)]` modules at the bottom of each
//! file are not imports and are skipped.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The top modules and their layers, bottom first.
const LAYERS: [(&str, usize); 10] = [
    ("error", 0),
    ("ops", 0),
    ("config", 1),
    ("adapter", 2),
    ("layers", 3),
    ("model", 4),
    ("variants", 5),
    ("peft", 5),
    ("store", 6),
    ("train", 6),
];

fn layer(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, layer)| *layer)
}

fn source_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            source_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// The code of a file: no comment lines, and nothing from its `#[cfg(test)]` module on.
fn code(text: &str) -> String {
    text.lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every item a `crate::` path names: `crate::a::b` gives `a`, and
/// `crate::{a::b, C}` gives `a` and `C`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(index) = rest.find("crate::") {
        rest = &rest[index + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.push(first_segment(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    item.push(c);
                }
                found.push(first_segment(&item));
            }
            None => found.push(first_segment(rest)),
        }
    }
    found.retain(|segment| !segment.is_empty());
    found
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Each name `lib.rs` re-exports at the crate root, with the top module it comes from.
fn root_names(lib: &str) -> HashMap<String, String> {
    let mut names = HashMap::new();
    for statement in code(lib).split(';') {
        let statement = statement.trim();
        let Some(path) = statement.strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = path.split_once("::") else {
            continue;
        };
        let items = items.trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.rsplit("::").next().unwrap_or("").trim();
            if !name.is_empty() {
                names.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    names
}

#[test]
fn imports_point_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let roots = root_names(&fs::read_to_string(src.join("lib.rs")).expect("lib.rs"));
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut checked = 0;
    let mut violations = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src/");
        let top = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a file name")
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" {
            continue;
        }
        let own = layer(&top).unwrap_or_else(|| panic!("{top}: a top module with no layer"));
        let text = fs::read_to_string(&file).expect("a readable source file");
        for segment in crate_paths(&code(&text)) {
            let module = roots.get(&segment).cloned().unwrap_or(segment.clone());
            let Some(target) = layer(&module) else {
                panic!(
                    "{}: `crate::{segment}` names no known module",
                    relative.display()
                );
            };
            checked += 1;
            if module != top && target >= own {
                violations.push(format!(
                    "{} (layer {top}) imports crate::{segment} (layer {module})",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} imports found: the parser is broken"
    );
    assert!(
        violations.is_empty(),
        "upward imports:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_parser_sees_groups_and_nested_paths() {
    let paths = crate_paths(
        "use crate::{LoraError, adapter::{Adapter, LoraState}};\nlet x = crate::model::survey::walk();",
    );
    assert_eq!(paths, ["LoraError", "adapter", "model"]);
    let roots = root_names(
        "pub use model::{\n    LoraModule,\n    LoraReport,\n};\npub use layers::{LoraLinear, nn};",
    );
    assert_eq!(roots["LoraReport"], "model");
    assert_eq!(roots["nn"], "layers");
}

//! The lowering's modules import only downward: `training` < `kernel`/`options` < `emitter` <
//! `blocks` < `kernels` < `passes` < `pipeline` < the module root, with no import circles
//! between modules of one layer and no `super::` paths (every import names its module in
//! full, so this test sees it). Checked on the source, so a change that breaks the layering
//! fails here with the offending file and import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of a top-level lowering module.
fn layer(top: &str) -> usize {
    match top {
        "training" => 0,
        "kernel" | "options" => 1,
        "emitter" => 2,
        "blocks" => 3,
        "kernels" => 4,
        "passes" => 5,
        "pipeline" => 6,
        "" => 7,
        other => panic!("a lowering module with no layer: {other}; give it one in this test"),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `blocks/matmul.rs` -> `blocks::matmul`; `kernels/conv/mod.rs` -> `kernels::conv`.
fn module_of(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).filter(|p| *p != "mod").collect();
    parts.join("::")
}

/// The lowering modules a file's code (not its comments) names through `crate::lower::`.
fn imports(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        assert!(!line.contains("super::"), "use `crate::lower::...` paths, not `super::`: {line}");
        let mut rest = line;
        while let Some(at) = rest.find("crate::lower::") {
            rest = &rest[at + "crate::lower::".len()..];
            let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            // The longest prefix that is a module; `use crate::lower::a::{b, c}` names `a` (and
            // whichever of b, c are modules).
            let mut found = None;
            for n in (1..=segments.len()).rev() {
                let m = segments[..n].join("::");
                if modules.contains(&m) {
                    found = Some(m);
                    break;
                }
            }
            let base = found.unwrap_or_else(|| panic!("`crate::lower::{path}` names no lowering module"));
            if rest[path.len()..].starts_with('{') {
                let group: String = rest[path.len() + 1..].chars().take_while(|&c| c != '}').collect();
                for item in group.split(',').map(str::trim) {
                    let m = format!("{base}::{item}");
                    if modules.contains(&m) {
                        out.insert(m);
                        continue;
                    }
                }
            }
            out.insert(base);
        }
    }
    out
}

#[test]
fn lowering_imports_point_down_and_never_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lower");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&root, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&root, file);
        let text = std::fs::read_to_string(file).unwrap();
        let top = |m: &str| m.split("::").next().unwrap_or("").to_string();
        for target in imports(&text, &modules) {
            if target == module {
                continue;
            }
            let (from, to) = (layer(&top(&module)), layer(&top(&target)));
            assert!(
                to < from || (to == from && top(&module) == top(&target)),
                "{} (layer {from}) imports {target} (layer {to}): imports must point down",
                file.display()
            );
            edges.entry(module.clone()).or_default().insert(target);
        }
        // A module uses the children it declares (the dispatcher calls its families so), so a
        // child that imports its parent closes a circle.
        for line in text.lines() {
            let decl = line.trim_start().trim_start_matches("pub(crate) ").trim_start_matches("pub ");
            if let Some(child) = decl.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                let child = if module.is_empty() { child.to_string() } else { format!("{module}::{child}") };
                edges.entry(module.clone()).or_default().insert(child);
            }
        }
    }
    // No circles: a depth-first search finds no module on its own path.
    fn visit(m: &str, edges: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("an import circle: {} -> {m}", path[at..].join(" -> "));
        }
        path.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            visit(next, edges, path, done);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in &modules {
        visit(m, &edges, &mut Vec::new(), &mut done);
    }
    // Every lowering source file stays reviewable.
    for file in &files {
        let lines = std::fs::read_to_string(file).unwrap().lines().count();
        assert!(
            lines <= 600,
            "{} has {lines} lines; split it by job (the lowering keeps files under ~600)",
            file.display()
        );
    }
    // The layering is really exercised: the dispatcher reaches every family.
    assert!(edges["kernels"].len() >= 9, "the dispatcher imports its families: {:?}", edges["kernels"]);
}

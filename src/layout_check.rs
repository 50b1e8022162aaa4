//! Tests only: no module imports one that imports it back, so that each can
//! be read, and changed, without the others. Tests count too: a test that
//! needs another module's helper takes it from a module below its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module (`kinds`, `worker::queue`, ...) and the modules it names as
/// `crate::x` (or `super::x` inside `worker`).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap().with_extension("");
        let mut name = rel.to_string_lossy().replace('/', "::");
        if let Some(parent) = name.strip_suffix("::mod") {
            name = parent.to_string();
        }
        if name == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut deps = BTreeSet::new();
        for (prefix, base) in [("crate::", ""), ("super::", "worker::")] {
            if prefix == "super::" && !name.starts_with("worker::") {
                continue;
            }
            for (at, _) in text.match_indices(prefix) {
                let rest = &text[at + prefix.len()..];
                let first: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                let second: String = rest[first.len()..]
                    .strip_prefix("::")
                    .map(|r| r.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect())
                    .unwrap_or_default();
                let dep = match (base, first.as_str()) {
                    ("", "worker") if !second.is_empty() => format!("worker::{second}"),
                    ("", _) => first,
                    (_, "super") | (_, "") => continue,
                    (base, _) => format!("{base}{first}"),
                };
                if dep != name {
                    deps.insert(dep);
                }
            }
        }
        modules.insert(name, deps);
    }
    modules
}

/// A path from `from` back to itself through `modules`, if there is one.
fn cycle_from(from: &str, modules: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![(from.to_string(), vec![from.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in modules.get(&at).into_iter().flatten() {
            if next == from {
                return Some([path.clone(), vec![next.clone()]].concat());
            }
            if modules.contains_key(next) && seen.insert(next.clone()) {
                stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let modules = imports();
    assert!(modules.contains_key("worker::queue") && modules.len() > 20, "{:?}", modules.keys());
    let cycles: Vec<String> = modules.keys().filter_map(|m| cycle_from(m, &modules)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn a_cycle_is_found() {
    let modules: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .map(|(m, d)| (m.to_string(), BTreeSet::from([d.to_string()])))
        .collect();
    assert_eq!(cycle_from("a", &modules).unwrap().join(" -> "), "a -> b -> c -> a");
    assert_eq!(cycle_from("d", &modules), None);
}

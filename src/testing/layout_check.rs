//! Tests only: no module imports one that imports it back, so that each can
//! be read, and changed, without the others; and nothing is `pub` that no
//! other module uses. Tests count too: a test that
//! needs another module's helper takes it from a module below its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every source file, with its module's path (`pg::errors`, `worker`, ...).
fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    let mut files: Vec<PathBuf> = vec![src.clone()];
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
        // Comments name modules without depending on them.
        let text = std::fs::read_to_string(&path).unwrap();
        let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
        found.push((name, code.join("\n")));
    }
    found
}

/// The identifiers of a path that starts at `text`: `a::b::{c, d::e}` gives
/// `[[a, b, c], [a, b, d, e]]`.
fn paths(text: &str) -> Vec<Vec<String>> {
    let ident = |t: &str| -> String { t.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut head = Vec::new();
    let mut rest = text;
    loop {
        let id = ident(rest);
        if id.is_empty() {
            break;
        }
        rest = &rest[id.len()..];
        head.push(id);
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => return vec![head],
        }
    }
    if let Some(group) = rest.strip_prefix('{') {
        let group = &group[..group.find('}').unwrap_or(group.len())];
        return group
            .split(',')
            .map(|item| [head.clone(), paths(item.trim()).into_iter().next().unwrap_or_default()].concat())
            .collect();
    }
    vec![head]
}

/// The longest module that `path` (from the crate's root) starts with.
fn module_of(path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| modules.contains(m))
}

/// Each module and the modules it names as `crate::...` or `super::...`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).filter(|m| m != "lib").collect();
    let mut graph = BTreeMap::new();
    for (name, text) in files.iter().filter(|(m, _)| m != "lib") {
        let own: Vec<String> = name.split("::").map(String::from).collect();
        let mut deps = BTreeSet::new();
        for (at, _) in text.match_indices("crate::") {
            for path in paths(&text[at + "crate::".len()..]) {
                deps.extend(module_of(&path, &modules));
            }
        }
        for (at, _) in text.match_indices("super::") {
            if text[..at].ends_with("super::") {
                continue;
            }
            let mut rest = &text[at..];
            let mut ups = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                rest = r;
                ups += 1;
            }
            // `super` from the file's own module, or from a `mod tests` inside it.
            for up in [ups, ups - 1] {
                if up > own.len() {
                    continue;
                }
                let base = &own[..own.len() - up];
                let found: Vec<String> =
                    paths(rest).iter().filter_map(|p| module_of(&[base.to_vec(), p.clone()].concat(), &modules)).collect();
                if !found.is_empty() {
                    deps.extend(found);
                    break;
                }
            }
        }
        deps.remove(name);
        graph.insert(name.clone(), deps);
    }
    graph
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
    assert!(modules.len() > 30, "{:?}", modules.keys());
    // The parser sees nested paths, groups and `super::` alike.
    assert!(modules["worker::launcher"].contains("pg::shmem"), "{:?}", modules["worker::launcher"]);
    assert!(modules["worker::render"].contains("worker::queue"), "{:?}", modules["worker::render"]);
    assert!(modules["worker::queue"].contains("worker::plans"), "{:?}", modules["worker::queue"]);
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

/// `pub` items (outside tests) whose name no other file mentions: they
/// should be private. Functions that Postgres calls (`#[pg_extern]`, ...)
/// are public for it, not for other modules.
fn needlessly_public() -> Vec<String> {
    let files = sources();
    let mut found = Vec::new();
    for (name, text) in &files {
        let body = text.split("#[cfg(any(test, feature = \"pg_test\"))]").next().unwrap();
        let body = body.split("#[cfg(test)]").next().unwrap();
        let lines: Vec<&str> = body.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim_start();
            let Some(item) = line.strip_prefix("pub ").or_else(|| line.strip_prefix("pub(crate) ")) else { continue };
            let item = item.trim_start_matches("unsafe ");
            let Some(rest) = ["fn ", "const ", "static ", "struct ", "enum ", "type ", "trait "].iter().find_map(|k| item.strip_prefix(k)) else {
                continue;
            };
            let ident: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let for_postgres = lines[i.saturating_sub(3)..i].iter().any(|l| l.contains("#[pg_") || l.contains("no_mangle"));
            if ident.is_empty() || for_postgres || item.starts_with("extern") {
                continue;
            }
            let word = |t: &str| t.match_indices(ident.as_str()).any(|(at, _)| {
                let before = t[..at].chars().last().map_or(true, |c| !(c.is_ascii_alphanumeric() || c == '_'));
                let after = t[at + ident.len()..].chars().next().map_or(true, |c| !(c.is_ascii_alphanumeric() || c == '_'));
                before && after
            });
            // A type in a public signature (or a trait's) is public with it.
            let is_type = ["struct ", "enum ", "type ", "trait "].iter().any(|k| item.starts_with(k));
            let in_signature = |l: &&str| {
                let l = l.trim_start();
                (l.starts_with("pub ") || l.starts_with("type ")) && !l.contains(&format!(" {ident} ")) && word(l)
            };
            if is_type && lines.iter().any(in_signature) {
                continue;
            }
            if !files.iter().any(|(other, t)| other != name && word(t)) {
                found.push(format!("{name}::{ident}"));
            }
        }
    }
    found
}

#[test]
fn nothing_is_public_that_no_other_module_uses() {
    let found = needlessly_public();
    assert!(found.is_empty(), "make these private:\n{}", found.join("\n"));
}

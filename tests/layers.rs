//! The layers of `docs/architecture.md` and their nevers, checked from the `use` lines (and
//! `crate::` paths) of the production code under `src/` (test modules are left out):
//!
//! - `protocol/` imports neither `ws/` nor `http/`; `ws/` does not import `http/`;
//! - the router does not import `shard/`; `hub/` does not import the router;
//! - a connection (`conn/`) imports neither the router nor the hub, mail or broker;
//! - the store answers through a sink: it imports neither `hub/` nor `router/` nor `shard/`;
//! - `tls/` is a byte pipe: it imports nothing of HTTP, WebSocket or the router;
//! - metric names (`"switchboard_…"`) are spelled only in `metrics/`;
//! - no import circles between top-level modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layer rules: (module, modules it must never import).
const NEVER: &[(&str, &[&str])] = &[
    ("protocol", &["ws", "http", "router", "shard"]),
    ("ws", &["http", "router", "shard"]),
    ("http", &["router", "shard"]),
    // The hub answers who is where; the mail it routes (and the store and broker answers
    // that ride in it) live in `mail/`.
    ("hub", &["router", "shard", "mail", "store", "broker"]),
    ("mail", &["router", "shard", "server", "hub"]),
    ("timer", &["router", "shard", "hub"]),
    ("router", &["shard", "server"]),
    // A connection is its own state: it knows bytes, frames and its cursors, never who
    // else is connected or where mail goes.
    (
        "conn",
        &["router", "shard", "server", "hub", "mail", "broker", "sim"],
    ),
    ("sim", &["shard", "server"]),
    ("testkit", &["router", "shard", "server", "sim"]),
    // TLS is a byte pipe: it knows sockets and rustls, nothing of HTTP or sessions.
    (
        "tls",
        &["router", "shard", "server", "http", "ws", "hub", "store"],
    ),
    ("store", &["router", "shard", "server", "hub", "sim"]),
    (
        "broker",
        &["router", "shard", "server", "hub", "store", "sim"],
    ),
    (
        "ids",
        &[
            "router", "shard", "server", "hub", "store", "protocol", "ws", "http",
        ],
    ),
];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`""` for lib.rs / main.rs).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    match first.strip_suffix(".rs") {
        Some("lib") | Some("main") => String::new(),
        Some(m) => m.to_owned(),
        None => first.into_owned(),
    }
}

/// Production code only: a file's text up to its `#[cfg(test)]` module; test files skipped.
fn production_text(file: &Path) -> Option<String> {
    if file.file_name().is_some_and(|n| n == "tests.rs") {
        return None;
    }
    let text = std::fs::read_to_string(file).unwrap();
    Some(match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_owned(),
        None => text,
    })
}

/// How the production code names a top-level module: `crate::x`, or `switchboard::x` in the
/// binary.
const ROOTS: &[&str] = &["crate::", "switchboard::"];

/// The modules in `known` named right after one of `prefixes` (`crate::x`, `super::x`,
/// `crate::{x, y}`), with the lines that name them. Comments are skipped.
fn imports(text: &str, prefixes: &[&str], known: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for &prefix in prefixes {
            let mut rest = code;
            while let Some(i) = rest.find(prefix) {
                rest = &rest[i + prefix.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if known.contains(&name) {
                    out.entry(name).or_insert_with(|| line.trim().to_owned());
                }
                // `use crate::{a, b}` names several.
                if let Some(group) = rest.strip_prefix('{') {
                    for part in group.split([',', '}']) {
                        let n = part.trim().split("::").next().unwrap_or("").trim();
                        if known.contains(n) {
                            out.entry(n.to_owned())
                                .or_insert_with(|| line.trim().to_owned());
                        }
                    }
                }
            }
        }
    }
    out
}

/// The module graph: module → (imported module → an example line).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn graph(src: &Path) -> (Graph, Vec<String>) {
    let mut files = Vec::new();
    rs_files(src, &mut files);
    files.sort();
    let known: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(src, f))
        .filter(|m| !m.is_empty())
        .collect();
    let mut g: Graph = BTreeMap::new();
    let mut metric_names = Vec::new();
    for f in &files {
        let m = module_of(src, f);
        let Some(text) = production_text(f) else {
            continue;
        };
        if m != "metrics" && text.contains("\"switchboard_") {
            metric_names.push(format!("{}", f.display()));
        }
        if m.is_empty() {
            continue;
        }
        let entry = g.entry(m.clone()).or_default();
        for (to, line) in imports(&text, ROOTS, &known) {
            if to != m {
                entry
                    .entry(to)
                    .or_insert_with(|| format!("{}: {line}", f.display()));
            }
        }
    }
    (g, metric_names)
}

/// Every import circle, as the list of modules around it (empty when none).
fn circles(g: &Graph) -> Vec<Vec<String>> {
    // Tarjan's strongly connected components; a component of two or more is a circle.
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        if let Some(edges) = t.g.get(v) {
            for w in edges.keys() {
                let w = w.as_str();
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// Every rule broken in `g`.
fn violations(g: &Graph) -> Vec<String> {
    let mut v = Vec::new();
    for (from, nevers) in NEVER {
        if let Some(edges) = g.get(*from) {
            for n in *nevers {
                if let Some(line) = edges.get(*n) {
                    v.push(format!("{from}/ must not import {n}/ — {line}"));
                }
            }
        }
    }
    for c in circles(g) {
        let lines: Vec<String> = c
            .iter()
            .flat_map(|a| {
                c.iter()
                    .filter_map(move |b| g.get(a).and_then(|e| e.get(b)).map(|l| format!("  {l}")))
            })
            .collect();
        v.push(format!(
            "import circle between {}:\n{}",
            c.join(", "),
            lines.join("\n")
        ));
    }
    v
}

#[test]
fn layers_keep_their_nevers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (g, metric_files) = graph(&src);
    assert!(
        g.contains_key("router") && g["router"].contains_key("hub"),
        "{g:?}"
    );
    let v = violations(&g);
    assert!(v.is_empty(), "layer rules broken:\n{}", v.join("\n"));
    assert!(
        metric_files.is_empty(),
        "metric names spelled outside src/metrics: {metric_files:?}"
    );
}

/// The imports between the files of one folder (`mod.rs` left out: it declares the others,
/// which use its types): file → (sibling it imports → an example line). `prefix` is how the
/// folder is named from the crate root (`crate::router::`, or `crate::` for the root
/// folder), so that both `super::x` and `crate::<folder>::x` count.
fn file_graph(dir: &Path, prefix: &str) -> Graph {
    let mut g: Graph = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    let stem = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
    let siblings: BTreeSet<String> = files
        .iter()
        .map(|f| stem(f))
        .chain(
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_dir())
                .map(|p| stem(&p)),
        )
        .filter(|n| !matches!(n.as_str(), "mod" | "lib" | "main" | "tests"))
        .collect();
    let root = prefix == "crate::";
    for f in &files {
        let me = stem(f);
        if !siblings.contains(&me) {
            continue;
        }
        let Some(text) = production_text(f) else {
            continue;
        };
        // A child module's own `super::` is this file, not the folder: only files count.
        let prefixes: &[&str] = if root {
            &[prefix]
        } else {
            &[prefix, "super::"]
        };
        let entry = g.entry(me.clone()).or_default();
        for (to, line) in imports(&text, prefixes, &siblings) {
            if to != me {
                entry
                    .entry(to)
                    .or_insert_with(|| format!("{}: {line}", f.display()));
            }
        }
    }
    g
}

/// Every folder under `dir` (itself included) with the prefix that names it from the root.
fn folders(dir: &Path, prefix: &str, out: &mut Vec<(PathBuf, String)>) {
    out.push((dir.to_owned(), prefix.to_owned()));
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            folders(&p, &format!("{prefix}{name}::"), out);
        }
    }
}

#[test]
fn no_import_circle_between_the_files_of_a_folder() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    for crate_src in [base.join("src"), base.join("loadgen/src")] {
        folders(&crate_src, "crate::", &mut all);
    }
    let mut found = Vec::new();
    for (dir, prefix) in &all {
        let g = file_graph(dir, prefix);
        let g = &g;
        for c in circles(g) {
            let lines: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    c.iter().filter_map(move |b| {
                        g.get(a).and_then(|e| e.get(b)).map(|l| format!("  {l}"))
                    })
                })
                .collect();
            found.push(format!(
                "import circle in {} between {}:\n{}",
                dir.display(),
                c.join(", "),
                lines.join("\n")
            ));
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_check_finds_a_circle_and_a_forbidden_import() {
    let edge = |a: &str, b: &str, g: &mut Graph| {
        g.entry(a.into())
            .or_default()
            .insert(b.into(), format!("{a} → {b}"));
    };
    let mut g = Graph::new();
    edge("router", "hub", &mut g);
    edge("hub", "timer", &mut g);
    assert!(violations(&g).is_empty());
    edge("timer", "router", &mut g);
    let v = violations(&g);
    assert!(
        v.iter()
            .any(|x| x.contains("import circle between hub, router, timer")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|x| x.contains("timer/ must not import router/")),
        "{v:?}"
    );
    let known: BTreeSet<String> = ["ws", "http", "hub"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let found = imports(
        "use crate::{ws::frame, http};\n// use crate::hub;\n",
        ROOTS,
        &known,
    );
    assert_eq!(found.keys().collect::<Vec<_>>(), vec!["http", "ws"]);
}

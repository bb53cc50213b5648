//! The crate's import graph against the layers declared once, in `src/layers.toml`.
//!
//! The graph is read from the source as text: every path that starts at `crate::`,
//! `super::`, `self::` or a child module's name, in `use` trees (a `pub use` counts) and in
//! code, with comments, string literals and `#[cfg(test)]` modules (not part of the library
//! as built) left out. A path's target is the deepest
//! module file it names. Three checks follow:
//!
//! - across the crate, each top-level module imports only modules of layers below its own;
//! - inside `relay/`, the same for its parts (its `mod.rs` is the top);
//! - no cycle among files anywhere.
//!
//! A probe edge added on purpose to a copy of the source must make the checks fail, so
//! that a reader that found nothing cannot pass them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path from the crate root (`[]` is `lib.rs`).
type Module = Vec<String>;

/// Every module file of the library crate under `src`, by its module path. The binary's
/// own files (`main.rs` and what it declares) are not part of the library.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut found = BTreeMap::new();
    found.insert(Vec::new(), src.join("lib.rs"));
    let binary = ["main.rs", "commands.rs"];
    fn walk(
        dir: &Path,
        at: &[String],
        top: bool,
        binary: &[&str],
        found: &mut BTreeMap<Module, PathBuf>,
    ) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if path.is_dir() {
                let mut here = at.to_vec();
                here.push(name.clone());
                if path.join("mod.rs").is_file() {
                    found.insert(here.clone(), path.join("mod.rs"));
                }
                walk(&path, &here, false, binary, found);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                if stem == "mod" || (top && (stem == "lib" || binary.contains(&name.as_str()))) {
                    continue;
                }
                let mut here = at.to_vec();
                here.push(stem.to_owned());
                found.insert(here, path);
            }
        }
    }
    walk(src, &[], true, &binary, &mut found);
    found
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Sep,
    Punct(char),
}

/// The tokens that matter for paths: identifiers, `::` and punctuation. Comments, string,
/// byte-string, raw-string and character literals, lifetimes and numbers are dropped.
fn tokens(text: &str) -> Vec<Tok> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied().unwrap_or('\0');
        if ch == '/' && next == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if (ch == 'r' || (ch == 'b' && next == 'r')) && {
            let start = if ch == 'b' { i + 2 } else { i + 1 };
            let mut j = start;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            c.get(j) == Some(&'"') && (i == 0 || !ident_char(c[i - 1]))
        } {
            let start = if ch == 'b' { i + 2 } else { i + 1 };
            let mut j = start;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            let hashes = j - start;
            i = j + 1;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
        } else if ch == 'b' && next == '"' && (i == 0 || !ident_char(c[i - 1])) {
            i += 1;
        } else if ch == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == '\\' {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
            }
        } else if ch.is_ascii_digit() {
            while i < c.len()
                && (ident_char(c[i]) || c[i] == '.')
                && !(c[i] == '.' && c.get(i + 1) == Some(&'.'))
            {
                i += 1;
            }
        } else if ident_char(ch) {
            let start = i;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else if ch == ':' && next == ':' {
            out.push(Tok::Sep);
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(Tok::Punct(ch));
            }
            i += 1;
        }
    }
    out
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

/// The full paths of a `use` tree starting at `toks[*i]`, with `prefix` before it.
fn use_tree(toks: &[Tok], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        match toks.get(*i) {
            Some(Tok::Ident(s)) if s == "as" => {
                *i += 2;
                break;
            }
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                *i += 1;
            }
            Some(Tok::Sep) => *i += 1,
            Some(Tok::Punct('{')) => {
                *i += 1;
                loop {
                    match toks.get(*i) {
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        None => return,
                        _ => use_tree(toks, i, path.clone(), out),
                    }
                }
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                break;
            }
            _ => break,
        }
    }
    out.push(path);
}

/// The modules `module` (in `file`'s text) reaches, each once.
fn imports(module: &Module, text: &str, all: &BTreeMap<Module, PathBuf>) -> BTreeSet<Module> {
    let toks = tokens(text);
    let children: BTreeSet<&str> = all
        .keys()
        .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
        .map(|m| m.last().unwrap().as_str())
        .collect();
    // Inline modules (`mod tests { … }`) change what `self` and `super` mean.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut found = BTreeSet::new();
    let mut i = 0;
    while i < toks.len() {
        let here: Vec<String> = module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(n, _)| n.clone()))
            .collect();
        match &toks[i] {
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
                continue;
            }
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                i += 1;
                continue;
            }
            Tok::Ident(s) if s == "mod" => {
                if let (Some(name), Some(Tok::Punct('{'))) =
                    (ident(toks.get(i + 1)), toks.get(i + 2))
                {
                    inline.push((name.to_owned(), depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            _ => {}
        }
        // A `#[cfg(test)] mod … { … }` is not part of the library as built: skipped.
        let cfg_test = [
            Tok::Punct('#'),
            Tok::Punct('['),
            Tok::Ident("cfg".into()),
            Tok::Punct('('),
            Tok::Ident("test".into()),
            Tok::Punct(')'),
            Tok::Punct(']'),
            Tok::Ident("mod".into()),
        ];
        if toks[i..].starts_with(&cfg_test) && toks.get(i + 9) == Some(&Tok::Punct('{')) {
            let mut open = 0usize;
            i += 9;
            while i < toks.len() {
                match toks[i] {
                    Tok::Punct('{') => open += 1,
                    Tok::Punct('}') => {
                        open -= 1;
                        if open == 0 {
                            i += 1;
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            continue;
        }
        let mut paths = Vec::new();
        if ident(toks.get(i)) == Some("use") {
            i += 1;
            use_tree(&toks, &mut i, Vec::new(), &mut paths);
        } else if let Some(first) = ident(toks.get(i)) {
            let continues = i > 0 && matches!(toks[i - 1], Tok::Sep | Tok::Punct('$'));
            if !continues && toks.get(i + 1) == Some(&Tok::Sep) {
                let mut path = vec![first.to_owned()];
                let mut j = i + 1;
                while toks.get(j) == Some(&Tok::Sep) {
                    match ident(toks.get(j + 1)) {
                        Some(s) => path.push(s.to_owned()),
                        None => break,
                    }
                    j += 2;
                }
                paths.push(path);
                i = j;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
        for path in paths {
            let Some(absolute) = absolute(&path, &here, module, &children) else {
                continue;
            };
            // The deepest module file the path names.
            let target = (0..=absolute.len())
                .rev()
                .map(|n| absolute[..n].to_vec())
                .find(|m| all.contains_key(m))
                .unwrap();
            if &target != module && !target.is_empty() {
                found.insert(target);
            }
        }
    }
    found
}

/// `path` from the crate root, if it names something of this crate.
fn absolute(
    path: &[String],
    here: &[String],
    file: &Module,
    children: &BTreeSet<&str>,
) -> Option<Vec<String>> {
    let mut at: Vec<String>;
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => {
            at = Vec::new();
            rest = &path[1..];
        }
        Some("self") => {
            at = here.to_vec();
            rest = &path[1..];
        }
        Some("super") => {
            at = here.to_vec();
            while rest.first().map(String::as_str) == Some("super") {
                at.pop()?;
                rest = &rest[1..];
            }
        }
        Some(first) if here == file.as_slice() && children.contains(first) => {
            at = file.clone();
        }
        _ => return None,
    }
    at.extend(rest.iter().cloned());
    Some(at)
}

/// The import graph of the library under `src`: module → the modules it reaches.
fn graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let all = modules(src);
    all.iter()
        .map(|(module, file)| {
            let text = std::fs::read_to_string(file).unwrap();
            (module.clone(), imports(module, &text, &all))
        })
        .collect()
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// The layers as `src/layers.toml` declares them.
#[derive(serde::Deserialize)]
struct Declared {
    #[serde(rename = "crate")]
    krate: Layers,
    relay: Layers,
}

#[derive(serde::Deserialize)]
struct Layers {
    layers: Vec<Vec<String>>,
}

impl Layers {
    fn of(&self, part: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.iter().any(|p| p == part))
    }

    /// Every part named once, and nothing named that is not there.
    fn check_names(&self, what: &str, parts: &BTreeSet<String>, problems: &mut Vec<String>) {
        let mut named = BTreeMap::<&str, usize>::new();
        for part in self.layers.iter().flatten() {
            *named.entry(part).or_default() += 1;
        }
        for (part, n) in &named {
            if *n > 1 {
                problems.push(format!("{what}: {part} is named in {n} layers"));
            }
            if !parts.contains(*part) {
                problems.push(format!(
                    "{what}: {part} is declared but there is no such module"
                ));
            }
        }
        for part in parts {
            if !named.contains_key(part.as_str()) {
                problems.push(format!("{what}: the module {part} is in no layer"));
            }
        }
    }
}

/// An import between two parts that is not downward: `from` on `lf`, `to` on `lt`.
fn upward(layers: &Layers, what: &str, from: &str, to: &str) -> Option<String> {
    let (lf, lt) = (layers.of(from)?, layers.of(to)?);
    (lf >= lt).then(|| {
        let how = if lf == lt {
            "within layer"
        } else {
            "up from layer"
        };
        format!(
            "{what}: {from} (layer {}) imports {to} ({how} {})",
            lf + 1,
            lt + 1
        )
    })
}

/// What is wrong with `graph` against `declared`: undeclared parts, edges that are not
/// downward (by edge, `from -> to`), and cycles among files.
fn problems(
    graph: &BTreeMap<Module, BTreeSet<Module>>,
    declared: &Declared,
) -> (Vec<String>, BTreeMap<String, String>, Vec<String>) {
    let mut names = Vec::new();
    let tops: BTreeSet<String> = graph.keys().filter_map(|m| m.first().cloned()).collect();
    declared.krate.check_names("crate", &tops, &mut names);
    let parts: BTreeSet<String> = graph
        .keys()
        .filter(|m| m.first().map(String::as_str) == Some("relay"))
        .map(|m| m.get(1).cloned().unwrap_or_else(|| "relay".into()))
        .collect();
    declared.relay.check_names("relay", &parts, &mut names);

    let mut wrong = BTreeMap::new();
    for (from, tos) in graph {
        let Some(top_from) = from.first() else {
            continue;
        };
        for to in tos {
            let edge = format!("{} -> {}", name(from), name(to));
            let top_to = &to[0];
            if top_from != top_to {
                if let Some(why) = upward(&declared.krate, "crate", top_from, top_to) {
                    wrong.insert(edge.clone(), why);
                }
            } else if top_from == "relay" {
                let part = |m: &Module| m.get(1).cloned().unwrap_or_else(|| "relay".into());
                let (pf, pt) = (part(from), part(to));
                if pf != pt {
                    if let Some(why) = upward(&declared.relay, "relay", &pf, &pt) {
                        wrong.insert(edge, why);
                    }
                }
            }
        }
    }
    // Each cycle as its members and the imports among them.
    let cycles = cycles(graph)
        .into_iter()
        .map(|set| {
            let edges: Vec<String> = set
                .iter()
                .flat_map(|from| {
                    graph[from]
                        .iter()
                        .filter(|to| set.contains(to))
                        .map(move |to| format!("{} -> {}", name(from), name(to)))
                })
                .collect();
            format!(
                "{}: {}",
                set.iter().map(name).collect::<Vec<_>>().join(", "),
                edges.join("; ")
            )
        })
        .collect();
    (names, wrong, cycles)
}

/// The strongly connected sets of more than one module (Tarjan), each as a path around.
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a Module) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.graph.contains_key(w) {
                    continue;
                }
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut set = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    set.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if set.len() > 1 {
                    set.sort();
                    self.found.push(set);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}

fn declared(src: &Path) -> Declared {
    let text = std::fs::read_to_string(src.join("layers.toml")).expect("src/layers.toml");
    toml::from_str(&text).unwrap_or_else(|e| panic!("src/layers.toml: {e}"))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_imports_follow_the_declared_layers() {
    let src = src();
    let declared = declared(&src);
    let graph = graph(&src);
    // The reader found the crate's imports at all: the relay's root imports its parts.
    assert!(
        graph.values().map(BTreeSet::len).sum::<usize>() > 100,
        "{graph:?}"
    );
    let (names, wrong, remaining) = problems(&graph, &declared);
    let mut failures = names;
    failures.extend(wrong.iter().map(|(edge, why)| format!("{edge}: {why}")));
    failures.extend(remaining.iter().map(|c| format!("a cycle: {c}")));
    assert!(
        failures.is_empty(),
        "src/layers.toml:\n{}",
        failures.join("\n")
    );
}

/// Copies `from` (a source tree) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn append(file: &Path, text: &str) {
    let mut s = std::fs::read_to_string(file).unwrap();
    s.push_str(text);
    std::fs::write(file, s).unwrap();
}

/// Each kind of wrong import, added on purpose to a copy of the source, makes the check
/// fail and is named: one up the crate's layers, one within a layer, one up relay's
/// layers, a cycle among files of one part, and a module in no layer.
#[test]
fn probe_imports_added_on_purpose_fail_the_check() {
    let src = src();
    let clean = graph(&src);
    // Two sibling files of one part where the first imports the second: the probe adds
    // the way back.
    let (a, b) = clean
        .iter()
        .flat_map(|(a, tos)| tos.iter().map(move |b| (a, b)))
        .find(|(a, b)| {
            a.len() == 3
                && b.len() == 3
                && a[..2] == b[..2]
                && a[0] == "relay"
                && !clean[*b].contains(*a)
        })
        .expect("two sibling files of a relay part, one importing the other");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("src");
    copy_tree(&src, &copy);
    append(&copy.join("proto/mod.rs"), "\nuse crate::relay::Relay;\n");
    append(
        &copy.join("cli/mod.rs"),
        "\nfn probe() { let _ = crate::agent::run; }\n",
    );
    append(
        &copy.join("relay/datadir.rs"),
        "\nuse super::state::Shared;\n",
    );
    let b_file = copy.join(modules(&src)[b].strip_prefix(&src).unwrap());
    append(&b_file, &format!("\nuse crate::{};\n", a.join("::")));
    std::fs::write(copy.join("newthing.rs"), "//! Not declared.\n").unwrap();

    let (names, wrong, cycles) = problems(&graph(&copy), &declared(&copy));
    assert!(
        names.iter().any(|n| n.contains("newthing is in no layer")),
        "{names:?}"
    );
    let expect = |edge: &str, says: &str| {
        let why = wrong
            .get(edge)
            .unwrap_or_else(|| panic!("{edge} not reported: {wrong:#?}"));
        assert!(why.contains(says), "{edge}: {why}");
    };
    expect("proto -> relay", "up from layer");
    expect("cli -> agent", "within layer");
    expect("relay::datadir -> relay::state", "relay: datadir");
    let (a, b) = (name(a), name(b));
    assert!(
        cycles.iter().any(|c| c.contains(&format!("{b} -> {a}"))),
        "the cycle {a} <-> {b} is not reported: {cycles:#?}"
    );
    // And the clean tree reports none of these.
    let (_, clean_wrong, clean_cycles) = problems(&clean, &declared(&src));
    assert!(
        !clean_wrong.contains_key("proto -> relay") && !clean_wrong.contains_key("cli -> agent")
    );
    assert!(!clean_cycles
        .iter()
        .any(|c| c.contains(&format!("{b} -> {a}"))));
}

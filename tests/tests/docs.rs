//! `docs/` cannot drift from the code.
//!
//! - `docs/configuration.md` against each binary's `--help`: every leaf
//!   subcommand has a table; every flag it prints is a row with the same
//!   variable, default, required-ness and possible values, and every row is a
//!   flag the binary has.
//! - `docs/metrics.md` against the registries: every family each binary
//!   registers (`Metrics::describe()`) has a section under its binary with
//!   its type and its labels in order, and every closed label lists exactly
//!   the values of its `ALL` set.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
};

use palisade_runtime::metrics::{Family, Kind, LabelValue};
use palisade_tests::bin;

const BINARIES: [&str; 2] = ["palisade-control-plane", "palisade-sidecar"];

fn doc(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The backticked text of `cell` when the cell is exactly one code span.
fn code(cell: &str) -> Option<&str> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    (!inner.contains('`')).then_some(inner)
}

/// The cells of a Markdown table row, or `None` for other lines and the
/// separator row.
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    // `\|` is a pipe inside a cell (a PromQL regex, say).
    let cells: Vec<String> = inner
        .replace("\\|", "\u{0}")
        .split('|')
        .map(|c| c.trim().replace('\u{0}', "|"))
        .collect();
    (!cells.iter().all(|c| c.chars().all(|ch| ch == '-'))).then_some(cells)
}

// === configuration.md ===

/// A flag as `--help` prints it.
#[derive(Debug, Default)]
struct HelpFlag {
    env: Option<String>,
    default: Option<String>,
    required: bool,
    values: Vec<String>,
}

/// A row of a flag table in configuration.md.
#[derive(Debug)]
struct DocFlag {
    env: Option<String>,
    default: String,
    row: String,
}

/// `bin args... --help` with no `PALISADE_*` variable set (clap prints a
/// variable's current value into the help).
fn help(bin_name: &str, args: &[&str]) -> String {
    let out = Command::new(bin(bin_name))
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{bin_name} {args:?} --help failed");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// Every leaf command of `bin_name` ("palisade-sidecar run", ...) with its help.
fn leaves(bin_name: &str) -> Vec<(String, String)> {
    let mut leaves = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(bin_name, &args);
        let subcommands = section(&text, "Commands:")
            .iter()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| *name != "help")
            .map(str::to_owned)
            .collect::<Vec<_>>();
        if subcommands.is_empty() {
            leaves.push((
                std::iter::once(bin_name)
                    .chain(args)
                    .collect::<Vec<_>>()
                    .join(" "),
                text,
            ));
        }
        for sub in subcommands {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
    }
    leaves
}

/// The lines of a help section ("Options:", "Commands:"), up to the next one.
fn section<'t>(help: &'t str, heading: &str) -> Vec<&'t str> {
    help.lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// The text after `[tag: ` up to its closing bracket.
fn bracket(text: &str, tag: &str) -> Option<String> {
    let start = text.find(&format!("[{tag}: "))? + tag.len() + 3;
    let rest = &text[start..];
    // A value may hold brackets ([::1]:15001): the tag closes at "]" before
    // the end of the line or before the next " [".
    let end = rest
        .find("] [")
        .or_else(|| rest.find("]\n"))
        .or_else(|| rest.strip_suffix(']').map(str::len))?;
    Some(rest[..end].to_owned())
}

/// The flags of one command's `--help`, by long name.
fn help_flags(help: &str) -> BTreeMap<String, HelpFlag> {
    let usage = help
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .expect("help has a usage line");
    let mut flags = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut finish = |current: Option<(String, String)>| {
        if let Some((name, text)) = current {
            let mut flag = HelpFlag {
                env: bracket(&text, "env").map(|e| e.trim_end_matches('=').to_owned()),
                default: bracket(&text, "default"),
                required: usage
                    .split_whitespace()
                    .any(|w| w == format!("--{name}") || w == format!("<--{name}>")),
                values: bracket(&text, "possible values")
                    .map(|v| v.split(", ").map(str::to_owned).collect())
                    .unwrap_or_default(),
            };
            // The long form: "Possible values:" then "- value: what it does".
            if let Some(list) = text.split("Possible values:").nth(1) {
                flag.values = list
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("- "))
                    .map(|v| v.split(':').next().unwrap_or(v).trim().to_owned())
                    .collect();
            }
            if flag.values == ["true", "false"] {
                flag.values.clear();
            }
            flags.insert(name, flag);
        }
    };
    for line in section(help, "Options:") {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim_start();
        let long = trimmed
            .strip_prefix("--")
            .or_else(|| trimmed.split_once(", --").map(|(_, l)| l));
        match long {
            Some(long) if indent <= 6 && trimmed.starts_with('-') => {
                finish(current.take());
                let name = long
                    .split(|c: char| c.is_whitespace() || c == '=')
                    .next()
                    .unwrap_or(long)
                    .to_owned();
                current = Some((name, format!("{line}\n")));
            }
            _ => {
                if let Some((_, text)) = &mut current {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    }
    finish(current);
    flags.remove("help");
    flags.remove("version");
    flags
}

/// The flag tables of configuration.md, by the command in their heading.
fn documented_flags(md: &str) -> BTreeMap<String, BTreeMap<String, DocFlag>> {
    let mut tables: BTreeMap<String, BTreeMap<String, DocFlag>> = BTreeMap::new();
    let mut command: Option<String> = None;
    for line in md.lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            command = heading
                .strip_prefix('`')
                .and_then(|h| h.split('`').next())
                .filter(|c| c.starts_with("palisade"))
                .map(str::to_owned);
            continue;
        }
        if line.starts_with("## ") {
            command = None;
        }
        let (Some(command), Some(cells)) = (&command, cells(line)) else {
            continue;
        };
        if cells.len() != 4 || cells[0] == "flag" {
            continue;
        }
        let flag = code(&cells[0])
            .and_then(|f| f.strip_prefix("--"))
            .unwrap_or_else(|| panic!("{command}: the first cell of {line:?} is no `--flag`"));
        let name = flag.split(' ').next().unwrap_or(flag).to_owned();
        let row = DocFlag {
            env: code(&cells[1]).map(str::to_owned),
            default: cells[2].clone(),
            row: line.to_owned(),
        };
        let previous = tables.entry(command.clone()).or_default().insert(name, row);
        assert!(previous.is_none(), "{command}: {flag} is documented twice");
    }
    tables
}

/// Checks one documented row against the flag `--help` printed.
fn check_row(
    command: &str,
    name: &str,
    doc: &DocFlag,
    help: &HelpFlag,
    problems: &mut Vec<String>,
) {
    if doc.env != help.env {
        problems.push(format!(
            "{command} --{name}: the docs say variable {:?}, --help says {:?}",
            doc.env, help.env
        ));
    }
    match (&help.default, code(&doc.default)) {
        (Some(default), Some(documented)) if default == documented => {}
        (Some(default), _) => problems.push(format!(
            "{command} --{name}: the default is `{default}`, the docs say {:?}",
            doc.default
        )),
        (None, Some(documented)) => problems.push(format!(
            "{command} --{name}: the docs give the default `{documented}`, --help has none"
        )),
        (None, None) => {}
    }
    if help.required != (doc.default == "(required)") {
        problems.push(format!(
            "{command} --{name}: required is {}, the docs' default cell says {:?}",
            help.required, doc.default
        ));
    }
    for value in &help.values {
        if !doc.row.contains(&format!("`{value}`")) {
            problems.push(format!(
                "{command} --{name}: the possible value `{value}` is not in the docs"
            ));
        }
    }
}

#[test]
fn configuration_md_lists_every_flag_of_every_subcommand_as_help_prints_it() {
    let documented = documented_flags(&doc("configuration.md"));
    let mut problems = Vec::new();
    let mut covered = BTreeSet::new();
    for binary in BINARIES {
        let leaves = leaves(binary);
        assert!(!leaves.is_empty(), "{binary} has subcommands");
        // Flags of the binary itself (global ones), documented once for all
        // subcommands; every subcommand must print them.
        let global = documented.get(binary);
        if global.is_some() {
            covered.insert(binary.to_owned());
        }
        for (command, text) in &leaves {
            let flags = help_flags(text);
            let own = documented.get(command);
            // A subcommand with only the binary's global flags needs no table.
            let only_global = flags
                .keys()
                .all(|name| global.is_some_and(|t| t.contains_key(name)));
            if own.is_none() && !only_global {
                problems.push(format!("{command} has no table in docs/configuration.md"));
            }
            covered.insert(command.clone());
            for (name, flag) in &flags {
                let in_own = own.and_then(|t| t.get(name));
                let in_global = global.and_then(|t| t.get(name));
                match (in_own, in_global) {
                    (Some(doc), None) | (None, Some(doc)) => {
                        check_row(command, name, doc, flag, &mut problems);
                    }
                    (Some(_), Some(_)) => problems.push(format!(
                        "{command} --{name} is documented both for {binary} and for {command}"
                    )),
                    (None, None) => problems.push(format!(
                        "{command} --{name} is not in docs/configuration.md"
                    )),
                }
            }
            for name in own.into_iter().flat_map(|t| t.keys()) {
                if !flags.contains_key(name) {
                    problems.push(format!(
                        "docs/configuration.md documents {command} --{name}, which --help does not have"
                    ));
                }
            }
            for name in global.into_iter().flat_map(|t| t.keys()) {
                if !flags.contains_key(name) {
                    problems.push(format!(
                        "docs/configuration.md documents --{name} for every {binary} subcommand, but {command} --help does not have it"
                    ));
                }
            }
        }
    }
    for command in documented.keys() {
        if !covered.contains(command) {
            problems.push(format!(
                "docs/configuration.md has a table for `{command}`, which is no command"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md is out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_help_parser_reads_what_clap_prints() {
    // The test above is only as good as this parser: check it on a binary
    // whose flags are known.
    let flags = help_flags(&help("palisade-sidecar", &["run"]));
    let mode = &flags["inbound-mode"];
    assert_eq!(mode.env.as_deref(), Some("PALISADE_INBOUND_MODE"));
    assert_eq!(mode.default.as_deref(), Some("permissive"));
    assert_eq!(mode.values, ["permissive", "strict"]);
    assert!(flags.contains_key("log-format") && flags.contains_key("log-level"));
    assert!(
        !flags.contains_key("log-json"),
        "a hidden alias is not in --help, so not in the docs' tables"
    );
    assert!(!flags["cert-dir"].required);
    let certify = help_flags(&help("palisade-sidecar", &["certify"]));
    assert!(certify["bundle"].required && certify["out"].required);
    assert_eq!(
        certify["control-plane"].default.as_deref(),
        Some("https://localhost:15012")
    );
    let leaves: Vec<String> = leaves("palisade-control-plane")
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    assert!(leaves.contains(&"palisade-control-plane ca init".to_owned()));
}

// === metrics.md ===

/// A metric section of metrics.md.
#[derive(Debug)]
struct DocFamily {
    binary: String,
    kind: String,
    /// Label names in order, each with its values (`None`: documented open).
    labels: Vec<(String, Option<Vec<String>>)>,
}

fn documented_families(md: &str) -> BTreeMap<String, DocFamily> {
    let mut families = BTreeMap::new();
    let mut binary = String::new();
    let mut current: Option<(String, DocFamily)> = None;
    let mut label: Option<String> = None;
    for line in md.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            families.extend(current.take());
            binary = heading.to_lowercase();
            continue;
        }
        if let Some(heading) = line.strip_prefix("### ") {
            families.extend(current.take());
            label = None;
            if let Some((name, kind)) = heading
                .strip_prefix('`')
                .and_then(|h| h.split_once("` ("))
                .filter(|(name, _)| name.starts_with("palisade_"))
            {
                current = Some((
                    name.to_owned(),
                    DocFamily {
                        binary: binary.clone(),
                        kind: kind.trim_end_matches(')').to_owned(),
                        labels: Vec::new(),
                    },
                ));
            }
            continue;
        }
        let (Some((name, family)), Some(cells)) = (&mut current, cells(line)) else {
            continue;
        };
        if cells.len() != 3 || cells[0] == "label" {
            continue;
        }
        if let Some(new) = code(&cells[0]) {
            label = Some(new.to_owned());
            let values = (cells[1] != "(open)").then(Vec::new);
            family.labels.push((new.to_owned(), values));
        } else if !cells[0].is_empty() {
            panic!("{name}: {line:?} names no `label`");
        }
        let Some(values) = family.labels.last_mut().and_then(|(_, v)| v.as_mut()) else {
            continue;
        };
        let value =
            code(&cells[1]).unwrap_or_else(|| panic!("{name} {label:?}: {line:?} has no `value`"));
        values.push(value.to_owned());
    }
    families.extend(current);
    families
}

fn kind_name(kind: Kind) -> &'static str {
    kind.as_str()
}

fn check_families(
    binary: &str,
    families: &[Family],
    documented: &BTreeMap<String, DocFamily>,
    problems: &mut Vec<String>,
) {
    for family in families {
        let Some(doc) = documented.get(family.name) else {
            problems.push(format!(
                "{} ({binary}) is not in docs/metrics.md",
                family.name
            ));
            continue;
        };
        if doc.binary != binary {
            problems.push(format!(
                "{} is documented under \"{}\", but {binary} registers it",
                family.name, doc.binary
            ));
        }
        if doc.kind != kind_name(family.kind) {
            problems.push(format!(
                "{} is a {}, the docs say {}",
                family.name,
                kind_name(family.kind),
                doc.kind
            ));
        }
        let names: Vec<&str> = family.labels.iter().map(|l| l.name).collect();
        let doc_names: Vec<&str> = doc.labels.iter().map(|(n, _)| n.as_str()).collect();
        if names != doc_names {
            problems.push(format!(
                "{}: the labels are {names:?}, the docs say {doc_names:?}",
                family.name
            ));
            continue;
        }
        for (label, (_, doc_values)) in family.labels.iter().zip(&doc.labels) {
            match (&label.values, doc_values) {
                (Some(values), Some(doc_values)) => {
                    let code: BTreeSet<&str> = values.iter().copied().collect();
                    let docs: BTreeSet<&str> = doc_values.iter().map(String::as_str).collect();
                    for missing in code.difference(&docs) {
                        problems.push(format!(
                            "{}{{{}=\"{missing}\"}} is not in docs/metrics.md",
                            family.name, label.name
                        ));
                    }
                    for extra in docs.difference(&code) {
                        problems.push(format!(
                            "docs/metrics.md lists {}{{{}=\"{extra}\"}}, which the code does not have",
                            family.name, label.name
                        ));
                    }
                    if doc_values.len() != docs.len() {
                        problems.push(format!(
                            "docs/metrics.md lists a value of {} {} twice",
                            family.name, label.name
                        ));
                    }
                }
                (None, None) => {}
                (Some(_), None) => problems.push(format!(
                    "{} {}: a closed set in the code, documented as open",
                    family.name, label.name
                )),
                (None, Some(_)) => problems.push(format!(
                    "{} {}: open in the code, but the docs list values",
                    family.name, label.name
                )),
            }
        }
    }
}

#[test]
fn metrics_md_lists_every_family_label_and_value_the_binaries_register() {
    let documented = documented_families(&doc("metrics.md"));
    let sidecar = palisade_sidecar::metrics::Metrics::describe().expect("sidecar metrics");
    let control_plane =
        palisade_control_plane::metrics::Metrics::describe().expect("control-plane metrics");
    assert!(
        sidecar.len() >= 10 && control_plane.len() >= 9,
        "the catalogues are filled"
    );

    let mut problems = Vec::new();
    check_families("sidecar", &sidecar, &documented, &mut problems);
    check_families("control plane", &control_plane, &documented, &mut problems);
    let registered: BTreeSet<&str> = sidecar
        .iter()
        .chain(&control_plane)
        .map(|f| f.name)
        .collect();
    for name in documented.keys() {
        if !registered.contains(name.as_str()) {
            problems.push(format!(
                "docs/metrics.md documents {name}, which no binary registers"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/metrics.md is out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_metric_catalogue_is_built_from_the_label_enums() {
    // The catalogue is what the test above trusts: its closed sets must be
    // the enums' ALL, not a copy.
    use palisade_control_plane::{authn, inject, service};
    use palisade_sidecar::metrics::{Direction, HandshakeFailure};

    let sidecar = palisade_sidecar::metrics::Metrics::describe().expect("sidecar metrics");
    let handshakes = sidecar
        .iter()
        .find(|f| f.name == "palisade_tls_handshakes_total")
        .expect("the handshake counter");
    let reasons = handshakes.labels[2].values.clone().expect("closed");
    assert_eq!(reasons.len(), 1 + HandshakeFailure::ALL.len());
    assert!(
        HandshakeFailure::ALL
            .iter()
            .all(|r| reasons.contains(&r.as_str()))
    );
    assert_eq!(handshakes.labels[0].values, Some(Direction::names()));

    let control_plane =
        palisade_control_plane::metrics::Metrics::describe().expect("control-plane metrics");
    let find = |name: &str| {
        control_plane
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    let issued = find("palisade_ca_certificates_issued_total");
    assert_eq!(
        issued.labels[1].values.as_ref().map(Vec::len),
        Some(1 + service::Reason::ALL.len())
    );
    let authn = find("palisade_ca_authentication_failures_total");
    assert_eq!(authn.labels[1].values, Some(authn::Reason::names()));
    let reviews = find("palisade_webhook_reviews_total");
    assert_eq!(
        reviews.labels[1].values,
        Some(inject::ReviewReason::names())
    );
}

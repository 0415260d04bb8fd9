//! The JSON of the admin socket, as docs/admin-socket.md documents it, is
//! what a running node answers: every field the docs list for a command is
//! in the real answer (a documented field that disappears fails here), every
//! answer is the documented envelope (`ok`, `api_version`), and every number
//! in any answer follows the documented rule "units are in the names"
//! (durations `_secs`/`_ms`, instants `_unix_ms`, sizes `bytes`), digests
//! are lower-case hex, and no object hides behind a positional array.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use drmesh_tests::{drmesh, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};
use serde_json::Value;

/// Field names at the top level of the first `{...}` of `text`: the words
/// right after `{` or `,` at depth 1, outside parentheses (prose).
fn documented_fields(text: &str) -> Vec<String> {
    let text = text.replace('`', "");
    let Some(start) = text.find('{') else { return vec![] };
    let mut names = Vec::new();
    let (mut depth, mut parens, mut expect_name) = (0usize, 0usize, false);
    let mut chars = text[start..].char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        match c {
            '(' => parens += 1,
            ')' => parens = parens.saturating_sub(1),
            _ if parens > 0 => {}
            '{' => {
                depth += 1;
                expect_name = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' => expect_name = depth == 1,
            // Quoted names (`{"reports": ...}`) count as names.
            c if c.is_whitespace() || c == '"' => {}
            c if expect_name && (c.is_ascii_lowercase() || c == '_') => {
                let mut name = String::from(c);
                while let Some(&(_, n)) = chars.peek() {
                    if n.is_ascii_lowercase() || n.is_ascii_digit() || n == '_' {
                        name.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                names.push(name);
                expect_name = false;
            }
            _ => expect_name = false,
        }
    }
    names
}

/// The data-plane table of docs/admin-socket.md: (cmd, data column) per row.
fn documented_commands(doc: &str) -> Vec<(String, String)> {
    doc.lines()
        .filter(|l| l.starts_with("| `{\"cmd\":\""))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let cmd = l.split("\"cmd\":\"").nth(1)?.split('"').next()?.to_string();
            Some((cmd, cells.last()?.trim_end_matches(" |").trim_end_matches('|').to_string()))
        })
        .collect()
}

/// The object a documented field list describes: the answer itself, or the
/// first element of a list answer.
fn described(answer: &Value) -> &Value {
    match answer {
        Value::Array(items) => items.first().unwrap_or(&Value::Null),
        other => other,
    }
}

fn check_documented(what: &str, doc_text: &str, answer: &Value) {
    let names = documented_fields(doc_text);
    assert!(!names.is_empty(), "{what}: no field list found in the docs: {doc_text}");
    let object = described(answer);
    let keys: BTreeSet<&str> = object.as_object().unwrap_or_else(|| panic!("{what}: the answer is not an object: {answer}")).keys().map(String::as_str).collect();
    for name in &names {
        assert!(keys.contains(name.as_str()), "{what}: docs/admin-socket.md documents `{name}`, the node's answer has no such field; it has {keys:?}");
    }
    eprintln!("{what}: {} documented fields present", names.len());
}

/// Instants, durations and sizes must say their unit (docs/admin-socket.md,
/// "Units are in the names"); digests are lower-case hex; no positional tuples.
fn check_rule(path: &str, v: &Value, problems: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                let here = format!("{path}.{key}");
                if value.is_number() {
                    let words: Vec<&str> = key.split('_').collect();
                    let has = |list: &[&str]| words.iter().any(|w| list.contains(w));
                    let last = words.last().copied().unwrap_or_default();
                    if has(&["unix"]) && !key.ends_with("_unix_ms") {
                        problems.push(format!("{here}: an instant must be `_unix_ms`"));
                    } else if has(&["rate", "bandwidth", "cap"]) && !(last == "bps" || key.ends_with("_per_sec")) {
                        problems.push(format!("{here}: a rate must end in `_bps` or `_bytes_per_sec`"));
                    } else if has(&["time", "at", "age", "duration", "elapsed", "uptime", "since", "eta", "rtt", "next", "retry", "learned", "heard", "finished", "started", "timeout", "interval", "rpo"])
                        && !matches!(last, "secs" | "ms")
                    {
                        problems.push(format!("{here}: a duration must end in `_secs` or `_ms`"));
                    } else if has(&["size", "length", "stored", "freed"]) && !has(&["bytes", "blocks", "blobs"]) {
                        problems.push(format!("{here}: a size must say `bytes` (or count blocks, blobs)"));
                    }
                }
                if key.contains("merkle_root") || key.ends_with("_hash") {
                    if let Some(s) = value.as_str() {
                        if !s.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
                            problems.push(format!("{here}: a digest must be lower-case hex, is {s:?}"));
                        }
                    }
                }
                check_rule(&here, value, problems);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if item.is_array() {
                    problems.push(format!("{path}[{i}]: a positional tuple; objects have named fields"));
                }
                check_rule(&format!("{path}[{i}]"), item, problems);
            }
        }
        _ => {}
    }
}

/// The envelope of a `--json` output: `ok`, `api_version`, and its data.
fn envelope(what: &str, stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>();
    // ctl pretty-prints; restore prints progress lines, then the one-line envelope.
    let v: Value = serde_json::from_str(&text).or_else(|_| serde_json::from_str(last.last().copied().unwrap_or(""))).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
    assert_eq!(v["api_version"], 1, "{what}: {v}");
    assert!(v["ok"].is_boolean(), "{what}: {v}");
    v
}

#[test]
fn documented_json_fields_exist_and_follow_the_units_rule() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/admin-socket.md")).unwrap();
    let mut mesh = TestMesh::new(&["src", "dst"]);
    let image = mesh.dir.path().join("db.img");
    let mut data = vec![0u8; 2 << 20];
    Rng::new(0xd0c5_0001).fill(&mut data);
    write_image_atomic(&image, &data);
    let text = mesh.replication_topology(1, &["src", "dst"], &[VolumeSpec::new("db", "src", &["dst"], &image, "p")], &[PolicySpec::new("p", "256KiB")]);
    mesh.write_file("topology.toml", &text);
    mesh.start("dst", "topology.toml");
    mesh.start("src", "topology.toml");
    mesh.wait_connected("src", &["dst"]);
    wait_until("the first RP", Duration::from_secs(60), || !mesh.rp_seqs("dst", "db").is_empty());

    // Every answer used below, as (what, node, ctl args).
    let asks: &[(&str, &str, &[&str])] = &[
        ("status", "src", &["status"]),
        ("peers", "src", &["peers"]),
        ("sync-now", "src", &["sync-now", "db"]),
        ("volumes", "src", &["volumes"]),
        ("rps", "dst", &["rps"]),
        ("gc", "dst", &["gc", "--dry-run"]),
        ("store", "dst", &["store"]),
        ("retention", "dst", &["retention"]),
        ("scrub", "dst", &["scrub"]),
        ("scrubs", "dst", &["scrubs"]),
        ("drills", "dst", &["drills"]),
        ("mesh", "src", &["mesh"]),
        ("catalog", "src", &["catalog"]),
        ("pause", "src", &["pause", "db"]),
        ("resume", "src", &["resume", "db"]),
    ];
    let mut answers: Vec<(String, Value)> = Vec::new();
    for (what, node, args) in asks {
        let mut all = args.to_vec();
        all.push("--json");
        let out = mesh.ctl(node, &all);
        let v = envelope(what, &out.stdout);
        assert_eq!(v["ok"], true, "{what}: {v}");
        answers.push((what.to_string(), v["data"].clone()));
    }
    let restored = mesh.dir.path().join("restored.img");
    let state_dst = mesh.node("dst").state_dir.to_str().unwrap().to_string();
    for (what, args) in [
        ("restore", vec!["restore", "--state-dir", &state_dst, "--json", "db@latest", "--to", restored.to_str().unwrap()]),
        ("verify", vec!["verify", "--state-dir", &state_dst, "--json", "db@latest"]),
    ] {
        let out = drmesh(&args);
        let v = envelope(what, &out.stdout);
        assert_eq!(v["ok"], true, "{what}: {v}");
        answers.push((what.to_string(), v["data"].clone()));
    }
    let answer = |what: &str| -> &Value { &answers.iter().find(|(w, _)| w == what).unwrap_or_else(|| panic!("no answer {what}")).1 };

    // The data-plane table: every documented top-level field is there.
    let rows = documented_commands(&doc);
    let mut checked = 0;
    for (cmd, data_doc) in &rows {
        let Some((_, v)) = answers.iter().find(|(w, _)| w == cmd) else { continue };
        if !data_doc.contains('{') || data_doc.starts_with("see ") {
            continue;
        }
        check_documented(cmd, data_doc, v);
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} commands of the table checked: {rows:?}");
    // CycleReport, the status fields table.
    let cycle_doc = doc.split("A CycleReport is ").nth(1).expect("the CycleReport paragraph");
    check_documented("CycleReport", cycle_doc, &answer("sync-now")["reports"][0]);
    let status = answer("status");
    let status_table = doc.split("Fields of `data`:").nth(1).expect("status fields table").split("\n\n").nth(1).unwrap_or_default();
    let status_fields: Vec<&str> = status_table.lines().filter_map(|l| l.strip_prefix("| `")?.split('`').next()).collect();
    assert!(status_fields.len() >= 8, "{status_fields:?}");
    for f in status_fields {
        assert!(status.get(f).is_some(), "status: docs/admin-socket.md documents `{f}`, the answer has none: {status}");
    }

    // The rule, on every answer.
    let mut problems = Vec::new();
    for (what, v) in &answers {
        check_rule(what, v, &mut problems);
    }
    assert!(problems.is_empty(), "JSON answers break the documented rule:\n{}", problems.join("\n"));

    // A node that cannot be asked: the envelope on stdout all the same.
    assert!(mesh.stop("dst"));
    let out = mesh.ctl("dst", &["store", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = envelope("ctl of a stopped node", &out.stdout);
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| e.starts_with("no drmesh node is running here")), "{v}");
}

/// The rule checker itself catches what it is for (the shapes this project
/// had before the rule: seconds instants, bare timeline seconds, tuples).
#[test]
fn the_rule_checker_flags_unitless_numbers_tuples_and_upper_case_digests() {
    let bad = serde_json::json!({
        "at_unix_secs": 1_795_307_094,
        "timeline": { "started": 0.5, "committed_secs": 1.0 },
        "last_ok": [[1_795_307_094_000_u64, { "seq": 3 }]],
        "merkle_root": "ABCDEF",
        "volume_bytes": 4096,
        "offered_blocks": 3,
    });
    let mut problems = Vec::new();
    check_rule("x", &bad, &mut problems);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    for (needle, problem) in ["x.at_unix_secs", "x.last_ok[0]", "x.merkle_root", "x.timeline.started"].iter().zip(problems.iter().map(String::as_str).collect::<BTreeSet<_>>()) {
        assert!(problem.starts_with(needle), "{problem} / {needle}");
    }
    let fields = documented_fields("list of `{volume, last_ok: {finished_unix_ms, report} or null, queued (due, waiting), \"errors\": [...]}` (note)");
    assert_eq!(fields, ["volume", "last_ok", "queued", "errors"]);
}

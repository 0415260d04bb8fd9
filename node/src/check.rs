//! `drmesh ctl check`: one verdict for monitoring systems, in the Nagios
//! plugin convention (exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; one line
//! of summary with performance data, then a line per problem), from the
//! node's own replica of the mesh-wide catalog and membership.
//!
//! CRITICAL: a volume whose newest RP anywhere in the mesh is older than its
//! RPO. WARNING: a volume without any RP yet, a volume whose source's last
//! cycle failed, a volume whose drills are overdue, a member gossip says is
//! down. UNKNOWN: the node cannot be asked.

use serde::Serialize;
use serde_json::Value;

/// The four states of the Nagios plugin convention, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Everything is within its objectives.
    Ok,
    /// Something needs a look; recovery points are still within their RPO.
    Warning,
    /// A recovery point objective is missed.
    Critical,
    /// The node could not be asked.
    Unknown,
}

impl Status {
    /// The exit status of the convention.
    pub fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Warning => 1,
            Status::Critical => 2,
            Status::Unknown => 3,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
            Status::Unknown => "UNKNOWN",
        }
    }
}

/// One thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// How bad it is.
    pub status: Status,
    /// What it is about: a volume or a node name.
    pub subject: String,
    /// What is wrong, for people.
    pub text: String,
}

/// The verdict: the worst status found, a summary line, every problem, and
/// the age of each volume's newest RP against its RPO.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// The worst status found.
    pub status: Status,
    /// The exit status (`status`'s code).
    pub exit_code: u8,
    /// One line for people.
    pub summary: String,
    /// Every problem, worst first.
    pub problems: Vec<Problem>,
    /// Per volume: (name, newest RP's age in seconds, RPO in seconds).
    pub ages: Vec<(String, Option<u64>, Option<u64>)>,
}

/// "1 volume", "3 volumes", "2 policies": `n` and the word for that many.
pub(crate) fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn secs(s: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(s)).to_string()
}

/// Judges the answers of `catalog` and `mesh` (their `data`).
pub fn evaluate(catalog: &Value, mesh: &Value) -> Verdict {
    let mut problems = Vec::new();
    let mut ages = Vec::new();
    let volumes: Vec<&Value> = catalog["volumes"].as_array().into_iter().flatten().collect();
    for v in &volumes {
        let name = v["volume"].as_str().unwrap_or("?").to_string();
        let (age, rpo) = (v["last_rp_age_secs"].as_u64(), v["rpo_secs"].as_u64());
        ages.push((name.clone(), age, rpo));
        let mut add = |status, text: String| problems.push(Problem { status, subject: name.clone(), text });
        match (v["rpo_met"].as_bool(), age, rpo) {
            (Some(false), Some(age), Some(rpo)) => add(Status::Critical, format!("{name}: RPO missed: the newest RP is {} old, the RPO is {}", secs(age), secs(rpo))),
            _ if v["rp_count"].as_u64() == Some(0) => add(Status::Warning, format!("{name}: no recovery point yet")),
            _ => {}
        }
        if let Some(error) = v["last_error"].as_str() {
            add(Status::Warning, format!("{name}: the last cycle failed: {error}"));
        }
        let verification = &v["verification"];
        if verification["overdue"] == true {
            let (unverified, limit) = (verification["unverified_secs"].as_u64().unwrap_or(0), verification["max_unverified_age_secs"].as_u64().unwrap_or(0));
            add(Status::Warning, format!("{name}: drills overdue: unverified for {}, the policy allows {}", secs(unverified), secs(limit)));
        }
    }
    let members: Vec<&Value> = mesh["members"].as_array().into_iter().flatten().collect();
    for m in members.iter().filter(|m| m["state"] == "down" && m["is_self"] != true) {
        let name = m["name"].as_str().map_or_else(|| m["id"].as_str().unwrap_or("?").to_string(), str::to_string);
        problems.push(Problem { status: Status::Warning, subject: name.clone(), text: format!("node {name} is down (gossip)") });
    }
    problems.sort_by_key(|p| std::cmp::Reverse(p.status));
    let status = problems.first().map_or(Status::Ok, |p| p.status);
    let alive = members.iter().filter(|m| m["state"] == "alive").count();
    let summary = match status {
        Status::Ok => format!("{} within RPO, {alive} of {} alive", count(volumes.len(), "volume", "volumes"), count(members.len(), "node", "nodes")),
        _ => {
            let missed = problems.iter().filter(|p| p.status == Status::Critical).count();
            let head = match missed {
                0 => count(problems.len(), "warning", "warnings"),
                1 => format!("1 of {} misses its RPO", count(volumes.len(), "volume", "volumes")),
                n => format!("{n} of {} miss their RPO", count(volumes.len(), "volume", "volumes")),
            };
            format!("{head}: {}", problems[0].text)
        }
    };
    Verdict { status, exit_code: status.code(), summary, problems, ages }
}

/// The plugin output: `DRMESH STATUS - summary | perfdata`, then a line per problem.
pub fn render(v: &Verdict) -> String {
    let perf: Vec<String> = v
        .ages
        .iter()
        .filter_map(|(name, age, rpo)| age.map(|a| format!("{name}_rp_age={a}s;;{}", rpo.map(|r| r.to_string()).unwrap_or_default())))
        .collect();
    let mut out = format!("DRMESH {} - {}", v.status.word(), v.summary);
    if !perf.is_empty() {
        out.push_str(" | ");
        out.push_str(&perf.join(" "));
    }
    out.push('\n');
    for p in &v.problems {
        out.push_str(&format!("{}: {}\n", p.status.word(), p.text));
    }
    out
}

/// The verdict when the node cannot be asked.
pub fn unknown(why: &str) -> Verdict {
    Verdict {
        status: Status::Unknown,
        exit_code: Status::Unknown.code(),
        summary: why.to_string(),
        problems: vec![Problem { status: Status::Unknown, subject: String::new(), text: why.to_string() }],
        ages: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mesh(states: &[(&str, &str)]) -> Value {
        json!({ "members": states.iter().enumerate().map(|(i, (n, s))| json!({ "name": n, "state": s, "is_self": i == 0 })).collect::<Vec<_>>() })
    }

    #[test]
    fn all_within_their_rpo_is_ok() {
        let catalog = json!({ "volumes": [
            { "volume": "db", "rpo_secs": 300, "last_rp_age_secs": 20, "rpo_met": true, "rp_count": 3, "last_error": null, "verification": null },
        ]});
        let v = evaluate(&catalog, &mesh(&[("a", "alive"), ("hq", "alive")]));
        assert_eq!((v.status, v.exit_code), (Status::Ok, 0));
        assert_eq!(render(&v), "DRMESH OK - 1 volume within RPO, 2 of 2 nodes alive | db_rp_age=20s;;300\n");
    }

    #[test]
    fn a_missed_rpo_is_critical_and_comes_first() {
        let catalog = json!({ "volumes": [
            { "volume": "db", "rpo_secs": 300, "last_rp_age_secs": 750, "rpo_met": false, "rp_count": 3, "last_error": "to hq: target hq is not connected" },
            { "volume": "web", "rpo_secs": 3600, "last_rp_age_secs": null, "rpo_met": null, "rp_count": 0 },
        ]});
        let v = evaluate(&catalog, &mesh(&[("a", "alive"), ("hq", "down")]));
        assert_eq!((v.status, v.exit_code), (Status::Critical, 2));
        let text = render(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "DRMESH CRITICAL - 1 of 2 volumes misses its RPO: db: RPO missed: the newest RP is 12m 30s old, the RPO is 5m | db_rp_age=750s;;300");
        assert_eq!(lines[1], "CRITICAL: db: RPO missed: the newest RP is 12m 30s old, the RPO is 5m");
        assert!(lines.contains(&"WARNING: web: no recovery point yet"), "{text}");
        assert!(lines.contains(&"WARNING: db: the last cycle failed: to hq: target hq is not connected"), "{text}");
        assert!(lines.contains(&"WARNING: node hq is down (gossip)"), "{text}");
    }

    #[test]
    fn warnings_alone_are_a_warning() {
        let catalog = json!({ "volumes": [
            { "volume": "db", "rpo_secs": 300, "last_rp_age_secs": 10, "rpo_met": true, "rp_count": 3,
              "verification": { "overdue": true, "unverified_secs": 864000, "max_unverified_age_secs": 604800 } },
        ]});
        let v = evaluate(&catalog, &mesh(&[("a", "alive")]));
        assert_eq!((v.status, v.exit_code), (Status::Warning, 1));
        assert_eq!(v.summary, "1 warning: db: drills overdue: unverified for 10days, the policy allows 7days");
        // This node's own row never counts as down.
        let v = evaluate(&json!({ "volumes": [] }), &mesh(&[("a", "down")]));
        assert_eq!(v.status, Status::Ok);
    }

    #[test]
    fn a_node_that_cannot_be_asked_is_unknown() {
        let v = unknown("no drmesh node is running here: there is no admin socket at /x/admin.sock");
        assert_eq!(v.exit_code, 3);
        assert!(render(&v).starts_with("DRMESH UNKNOWN - no drmesh node is running here"), "{}", render(&v));
    }
}

//! Drills: proving that a recovery point recovers.
//!
//! A drill runs a policy's checks ([`checks`]) on one RP, each on a fresh
//! export of it with a temporary copy-on-write overlay, so neither the RP nor
//! production is ever written. The node's [`runner`] schedules drills and runs
//! each in a `drmesh drill-worker` child process at low CPU and I/O priority,
//! under the policy's time limit; the child works in
//! `STATE_DIR/drills/VOLUME@SEQ-PID/` (mounts, sockets, pid files), which
//! [`cleanup`] releases if it was killed. `drmesh drill` asks the node for a
//! drill and follows it; with no node running it runs the checks itself and
//! says the result is not recorded.

pub mod checks;
pub mod cleanup;
pub mod runner;

use std::io::Write as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use drmesh_actors::blob::{RpSeq, VolumeName};
use drmesh_actors::drill::{tail, CheckReport, DrillReport, OUTPUT_TAIL_BYTES};
use drmesh_topology::{Drill, DrillBoot, DrillCheck, DrillSchedule, Topology};
use serde_json::{json, Value};

use crate::admin::{Request, SOCKET_FILE};
use crate::export::{serve, ExportRequest};
use crate::recover::{node_running, offline_topology, parse_rp, RpArgs};

/// Folder of drill runs inside a state dir.
pub const RUNS_DIR: &str = "drills";

/// The NIC name a drilled VM's guest sees (as `recover --boot`).
const VM_NIC: &str = "ens3";

/// Arguments of `drmesh drill`.
#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    #[command(flatten)]
    rp: RpArgs,
    /// Checks to run, comma-separated (fsck, boot, postgres, script); default
    /// the checks of the volume's policy (fsck when it has no drill table).
    #[arg(long, value_delimiter = ',')]
    checks: Vec<String>,
}

/// Arguments of the hidden `drmesh drill-worker` (run by the node).
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    rp: RpArgs,
    /// Checks to run, comma-separated.
    #[arg(long, value_delimiter = ',')]
    checks: Vec<String>,
    /// Seconds all checks together may take.
    #[arg(long)]
    time_limit_secs: u64,
}

/// Parses check names; an empty list is the `default`.
pub fn parse_checks(names: &[String], default: &[DrillCheck]) -> anyhow::Result<Vec<DrillCheck>> {
    if names.is_empty() {
        return Ok(default.to_vec());
    }
    let mut out = Vec::new();
    for n in names {
        let Some(c) = DrillCheck::parse(n.trim()) else { bail!("unknown check \"{}\"; expected fsck, boot, postgres or script", n.trim().escape_debug()) };
        if !out.contains(&c) {
            out.push(c);
        }
    }
    // Cheap checks first, the boot last.
    out.sort_by_key(|c| DrillCheck::ALL.iter().position(|a| a == c));
    Ok(out)
}

/// The drill settings of `volume`'s policy, or defaults (fsck, daily) when it has none.
pub fn settings_of(topology: Option<&Topology>, volume: &str) -> Drill {
    topology
        .and_then(|t| t.volume_by_name(volume).and_then(|v| t.policies.get(&v.policy)))
        .and_then(|p| p.drill.clone())
        .unwrap_or_else(|| Drill {
            schedule: DrillSchedule::Every(Duration::from_secs(86_400)),
            checks: vec![DrillCheck::Fsck],
            nodes: Vec::new(),
            max_unverified_age: Duration::from_secs(2 * 86_400),
            time_limit: Duration::from_secs(3600),
            boot: DrillBoot::default(),
            postgres: None,
            script: None,
        })
}

/// Whether `check` can run with `drill`'s settings (postgres and script need their tables).
pub fn check_configured(check: DrillCheck, drill: &Drill, policy: &str) -> anyhow::Result<()> {
    match check {
        DrillCheck::Postgres if drill.postgres.is_none() => bail!("the postgres check needs a [policy.{policy}.drill.postgres] table (the data directory's path)"),
        DrillCheck::Script if drill.script.is_none() => bail!("the script check needs a [policy.{policy}.drill.script] table (the command)"),
        _ => Ok(()),
    }
}

/// Makes `dir` (mode 0700, parents too) if missing.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// One drill's fixed inputs: which RP, from where, with which settings, until when.
pub struct Plan<'a> {
    /// How the RP is reached (state dir, node or store, keys).
    pub args: &'a RpArgs,
    /// Volume name.
    pub volume: &'a VolumeName,
    /// The RP.
    pub seq: RpSeq,
    /// The policy's drill settings.
    pub drill: &'a Drill,
    /// When every check must be over.
    pub deadline: Instant,
}

/// Runs one check on a fresh export of the plan's RP in `dir`.
fn one_check(plan: &Plan<'_>, check: DrillCheck, dir: &Path) -> checks::Outcome {
    let Plan { args, volume, seq, drill, deadline } = *plan;
    let failed = |summary: String| checks::Outcome { passed: false, summary, output: String::new() };
    if let Err(e) = private_dir(dir) {
        return failed(format!("cannot make the drill's folder {}: {e}", dir.display()));
    }
    let request = ExportRequest { volume: volume.clone(), seq: Some(seq), from: None, socket: Some(dir.join("nbd.sock")), listen: None, overlay: None, read_only: false };
    let served = match serve(args, &request) {
        Ok(s) => s,
        Err(e) => return failed(format!("cannot export {volume}@{seq}: {e:#}")),
    };
    let uri = served.info()["uri"].as_str().unwrap_or_default().to_string();
    let outcome = match check {
        DrillCheck::Boot => {
            if drill.boot.adapt {
                if let Err(e) = crate::adapt::adapt_export(&uri, &dir.join("adapt"), &drill.boot.source_disk, VM_NIC) {
                    return failed(format!("boot adaptation failed: {e:#}"));
                }
            }
            let drive = served.info()["qemu_drive"].as_str().unwrap_or_default().to_string();
            checks::boot(&drive, dir, &drill.boot, deadline)
        }
        _ => {
            let (fuse, file) = match crate::mounts::fuse_file(&uri, &dir.join("fuse")) {
                Ok(f) => f,
                Err(e) => return failed(format!("cannot open the export as a file: {e:#}")),
            };
            let disk = checks::Disk { file: &file, work: dir };
            let outcome = match check {
                DrillCheck::Fsck => checks::fsck(&disk, deadline),
                DrillCheck::Postgres => match &drill.postgres {
                    Some(cfg) => checks::postgres(&disk, cfg, deadline),
                    None => failed("no postgres settings in the policy's drill table".into()),
                },
                DrillCheck::Script => match &drill.script {
                    Some(cfg) => checks::script(&disk, cfg, deadline),
                    None => failed("no script settings in the policy's drill table".into()),
                },
                DrillCheck::Boot => unreachable_boot(),
            };
            drop(fuse);
            outcome
        }
    };
    drop(served);
    outcome
}

/// Boot is handled before the file-based checks; kept apart so the match above stays total.
fn unreachable_boot() -> checks::Outcome {
    checks::Outcome { passed: false, summary: "internal: boot handled elsewhere".into(), output: String::new() }
}

/// Runs `list` on `volume@seq`, one after the other, in `run_dir`, until one
/// fails (the rest are not run: the RP is not verified either way, and a boot
/// of a disk whose filesystem is broken would only wait for its timeout);
/// `emit` gets a progress value as each check starts and ends.
pub fn run_checks(plan: &Plan<'_>, list: &[DrillCheck], run_dir: &Path, mut emit: impl FnMut(Value)) -> Vec<CheckReport> {
    let mut out: Vec<CheckReport> = Vec::new();
    for &check in list {
        if let Some(failed) = out.iter().find(|c| !c.passed) {
            emit(json!({ "phase": "drill", "check": check.name(), "state": "skipped", "summary": format!("not run: {} failed", failed.check) }));
            continue;
        }
        emit(json!({ "phase": "drill", "check": check.name(), "state": "running" }));
        let started = Instant::now();
        let outcome = if Instant::now() >= plan.deadline {
            checks::Outcome { passed: false, summary: "time limit reached before this check could start".into(), output: String::new() }
        } else {
            one_check(plan, check, &run_dir.join(check.name()))
        };
        let report = CheckReport {
            check: check.name().to_string(),
            passed: outcome.passed,
            summary: outcome.summary,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            output: tail(&outcome.output, OUTPUT_TAIL_BYTES),
        };
        emit(json!({ "phase": "drill", "check": check.name(), "state": if report.passed { "passed" } else { "failed" }, "summary": report.summary, "duration_ms": report.duration_ms }));
        out.push(report);
    }
    out
}

/// A run folder, released (mounts, loops, processes) and removed when dropped.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        cleanup::release(&self.0);
    }
}

/// `STATE_DIR/drills/VOLUME@SEQ-PID`, made private, after cleaning up runs
/// whose process is gone.
fn make_run_dir(state_dir: &Path, volume: &str, seq: RpSeq) -> anyhow::Result<RunDir> {
    let runs = state_dir.join(RUNS_DIR);
    private_dir(&runs).with_context(|| format!("making {}", runs.display()))?;
    for dir in cleanup::clean_stale_runs(&runs) {
        tracing::info!(path = %dir.display(), "cleaned up after an interrupted drill");
    }
    let dir = runs.join(format!("{}@{seq}-{}", volume.replace('/', "_"), std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("making {}", dir.display()))?;
    Ok(RunDir(dir))
}

/// Runs `drmesh drill-worker`: the checks of one drill, as JSON lines on
/// stdout (progress, then `{"ok":true,"data":{"checks":[...]}}`).
pub fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let (volume, seq) = parse_rp(&args.rp.rp)?;
    let Some(seq) = seq else { bail!("the worker needs VOLUME@SEQ") };
    let deadline = Instant::now() + Duration::from_secs(args.time_limit_secs);
    let topology = offline_topology(&args.rp)?;
    let drill = settings_of(topology.as_ref(), &volume);
    let list = parse_checks(&args.checks, &drill.checks)?;
    let run = make_run_dir(&args.rp.state_dir, &volume, seq)?;
    let plan = Plan { args: &args.rp, volume: &volume, seq, drill: &drill, deadline };
    let reports = run_checks(&plan, &list, &run.0, |p| {
        println!("{}", json!({ "progress": p }));
        let _ = std::io::stdout().flush();
    });
    drop(run);
    println!("{}", crate::admin::Response::data(json!({ "checks": reports })).line());
    Ok(ExitCode::SUCCESS)
}

/// Prints a progress value of a drill for people.
fn print_progress(p: &Value) {
    if let Some(q) = p.get("queued") {
        eprintln!("queued behind {} drill(s) on this node", q);
        return;
    }
    if p["phase"] != "drill" {
        return;
    }
    match p["state"].as_str() {
        Some("running") => eprintln!("{}: running...", p["check"].as_str().unwrap_or("?")),
        Some("skipped") => eprintln!("{}: {}", p["check"].as_str().unwrap_or("?"), p["summary"].as_str().unwrap_or("not run")),
        Some(state) => eprintln!("{}: {} in {:.1} s: {}", p["check"].as_str().unwrap_or("?"), state, p["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0, p["summary"].as_str().unwrap_or("")),
        None => {}
    }
}

/// Prints a drill report for people.
pub fn print_report(r: &Value) {
    let verdict = if r["verified"] == true {
        "VERIFIED"
    } else if r["passed"] == true {
        "passed (not every check of the policy ran: not verified)"
    } else {
        "FAILED"
    };
    println!("drill of {}@{} on {}: {verdict}", r["volume"].as_str().unwrap_or("?"), r["seq"], r["node"].as_str().unwrap_or("this machine"));
    if let Some(e) = r["error"].as_str() {
        println!("  error: {e}");
    }
    for c in r["checks"].as_array().into_iter().flatten() {
        println!(
            "  {:<9} {:<7} {:>7.1} s  {}",
            c["check"].as_str().unwrap_or("?"),
            if c["passed"] == true { "passed" } else { "FAILED" },
            c["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            c["summary"].as_str().unwrap_or("")
        );
        if c["passed"] != true {
            for line in c["output"].as_str().unwrap_or("").lines().rev().take(15).collect::<Vec<_>>().into_iter().rev() {
                println!("      | {line}");
            }
        }
    }
}

/// Runs `drmesh drill`.
pub fn run(args: DrillArgs) -> anyhow::Result<ExitCode> {
    let (volume, seq) = parse_rp(&args.rp.rp)?;
    if args.rp.from.is_some() {
        bail!("a drill runs on a node that holds the recovery point; run `drmesh drill` with that node's --state-dir instead of --from");
    }
    if !args.rp.offline && node_running(&args.rp.state_dir)? {
        let socket = args.rp.state_dir.join(SOCKET_FILE);
        let req = Request::Drill { volume, seq, checks: args.checks.clone() };
        let json_out = args.rp.json;
        let response = crate::ctl::request_with_progress(&socket, &req, |p| {
            if json_out {
                println!("{}", json!({ "progress": p }));
            } else {
                print_progress(p);
            }
        })?;
        if json_out {
            println!("{}", serde_json::to_string(&response)?);
        } else if let Some(data) = &response.data {
            print_report(data);
        } else {
            eprintln!("error: {}", response.error.as_deref().unwrap_or("the drill failed"));
        }
        let passed = response.ok && response.data.as_ref().is_some_and(|d| d["passed"] == true);
        return Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    // No node: the checks run here, on the store read directly; nothing is recorded.
    let store = drmesh_actors::store::Store::open_read_only(&args.rp.state_dir.join("store"))?;
    let seq = match seq {
        Some(s) => s,
        None => store.latest_rp(&volume)?.map(|m| m.seq).with_context(|| format!("the store in {} holds no recovery point of {volume}", args.rp.state_dir.display()))?,
    };
    drop(store);
    let topology = offline_topology(&args.rp)?;
    let drill = settings_of(topology.as_ref(), &volume);
    let list = parse_checks(&args.checks, &drill.checks)?;
    let policy = topology.as_ref().and_then(|t| t.volume_by_name(&volume)).map(|v| v.policy.clone()).unwrap_or_default();
    for c in &list {
        check_configured(*c, &drill, &policy)?;
    }
    if !args.rp.json {
        eprintln!("no node answers on {}: the drill runs here on its store; the result is not recorded", args.rp.state_dir.display());
    }
    let started_unix_ms = unix_ms();
    let run_dir = make_run_dir(&args.rp.state_dir, &volume, seq)?;
    let json_out = args.rp.json;
    let plan = Plan { args: &args.rp, volume: &volume, seq, drill: &drill, deadline: Instant::now() + drill.time_limit };
    let checks = run_checks(&plan, &list, &run_dir.0, |p| {
        if json_out {
            println!("{}", json!({ "progress": p }));
        } else {
            print_progress(&p);
        }
    });
    drop(run_dir);
    let mut report = DrillReport {
        volume,
        seq,
        node: String::new(),
        started_unix_ms,
        finished_unix_ms: unix_ms(),
        software_version: env!("CARGO_PKG_VERSION").to_string(),
        trigger: "request".into(),
        checks,
        passed: false,
        verified: false,
        error: None,
    };
    let required: Vec<&str> = drill.checks.iter().map(|c| c.name()).collect();
    report.settle(&required);
    let value = serde_json::to_value(&report)?;
    if json_out {
        let mut envelope = serde_json::to_value(crate::admin::Response::data(value))?;
        envelope["recorded"] = false.into();
        println!("{envelope}");
    } else {
        print_report(&value);
        println!("(not recorded: no node runs on {})", args.rp.state_dir.display());
    }
    Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Now, Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

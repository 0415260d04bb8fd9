//! `drmesh ctl`: the admin socket client. Prints tables for people, `--json` for scripts.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde_json::Value;

use drmesh_actors::blob::VolumeName;

use crate::admin::{GossipRequest, Request, Response, SOCKET_FILE};

/// Arguments of `drmesh ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// State directory of the node to talk to (its admin socket is STATE_DIR/admin.sock).
    #[arg(long, env = "DRMESH_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// Path of the admin socket, instead of --state-dir.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print the raw JSON answer.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CtlCommand {
    /// Node id, uptime, topology in force, peers.
    Status,
    /// Peers with connection state and round-trip time.
    Peers,
    /// Re-read the topology file now; prints what changed or every error.
    Reload,
    /// Replicate a volume now (on its source node) and print what the cycle did.
    SyncNow {
        /// Volume name.
        volume: VolumeName,
    },
    /// Replication status of the volumes this node is the source of.
    Volumes,
    /// Stop replicating volumes until `resume`: a running cycle stops, none starts (kept across restarts).
    Pause {
        /// Volume names (this node must be their source).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        volumes: Vec<VolumeName>,
        /// Every volume this node is the source of.
        #[arg(long)]
        all: bool,
    },
    /// Resume paused volumes: a cycle starts at once and resends nothing the target holds.
    Resume {
        /// Volume names (this node must be their source).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        volumes: Vec<VolumeName>,
        /// Every volume this node is the source of.
        #[arg(long)]
        all: bool,
    },
    /// Recovery points held by this node.
    Rps {
        /// Only this volume.
        volume: Option<VolumeName>,
    },
    /// Recovery points of consistency groups held by this node: each group
    /// RP's members (restore each `VOLUME@SEQ`), whether it is complete and
    /// whether its members' views were of one instant.
    Groups {
        /// Only this group.
        group: Option<String>,
    },
    /// Garbage-collect blobs no retained recovery point needs (also run on
    /// the node's own schedule, `gc_every`).
    Gc {
        /// Keep blobs younger than this many seconds.
        #[arg(long, default_value_t = 60)]
        grace_secs: u64,
        /// Only say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// What retention keeps and would delete now, per volume held here (a dry
    /// run: nothing is deleted; retention itself runs after each commit).
    Retention {
        /// Only this volume.
        volume: Option<VolumeName>,
        /// Judge by the policies of this topology file instead of the one in
        /// force: what an edit of `retention` would delete.
        #[arg(long)]
        topology: Option<PathBuf>,
    },
    /// Store figures.
    Store,
    /// Scrub the store now: read every blob again (or a sample) and check
    /// every recovery point's block map; prints what was found.
    Scrub {
        /// Read only this share of the blobs ("10%"); successive sampled
        /// scrubs read the other blobs in turn.
        #[arg(long, value_parser = drmesh_topology::units::parse_percent)]
        sample: Option<u32>,
    },
    /// The newest scrub verdict of each recovery point of this node.
    Scrubs {
        /// Only this volume.
        volume: Option<VolumeName>,
    },
    /// The kernel module's view of this node's `kmod` volumes: attached devices,
    /// bitmap size, COW store use, changes not yet committed per target.
    AgentStatus,
    /// Drills of this node: reports kept with its recovery points (newest
    /// last), drills running and waiting, when the next scheduled ones are due.
    Drills {
        /// Only this volume.
        volume: Option<VolumeName>,
    },
    /// Every node of the mesh as gossip sees it: alive/suspect/down, last heard, site, version, topology.
    Mesh,
    /// The mesh-wide recovery-point catalog (local replica): holders, freshness, RPO per volume.
    Catalog {
        /// Only this volume.
        volume: Option<VolumeName>,
    },
    /// One verdict for monitoring (Nagios plugin convention): exit 0 OK, 1
    /// WARNING (a failed cycle, no RP yet, drills overdue, a node down), 2
    /// CRITICAL (an RPO missed), 3 UNKNOWN (the node cannot be asked).
    Check {
        /// Only this volume.
        volume: Option<VolumeName>,
    },
}

/// Sends one request to the admin socket at `socket` and returns the answer.
pub fn request(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    request_with_progress(socket, req, |_| {})
}

/// Connects to the admin socket at `socket` and sends `request`; the stream
/// then carries the answer (and any progress lines before it).
pub fn send_request(socket: &Path, request: &impl serde::Serialize) -> anyhow::Result<UnixStream> {
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        ErrorKind::NotFound => anyhow::anyhow!("no drmesh node is running here: there is no admin socket at {}", socket.display()),
        ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "the admin socket {} is stale: the node that made it is not running (start it with `drmesh run`)",
            socket.display()
        ),
        ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on {}: the admin socket is mode 0600, run ctl as the user that runs the node",
            socket.display()
        ),
        _ => anyhow::anyhow!("cannot connect to admin socket {}: {e}", socket.display()),
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).with_context(|| format!("writing to {}", socket.display()))?;
    Ok(stream)
}

/// Like [`request`], calling `on_progress` with each progress line that precedes the answer.
pub fn request_with_progress(socket: &Path, request: &impl serde::Serialize, mut on_progress: impl FnMut(&Value)) -> anyhow::Result<Response> {
    let stream = send_request(socket, request)?;
    // Long commands (sync-now of a big volume, restore) send progress or take a while.
    stream.set_read_timeout(Some(Duration::from_secs(24 * 3600)))?;
    let mut reader = BufReader::new(&stream);
    loop {
        let value = read_line(&mut reader, socket)?;
        if let Some(p) = value.get("progress") {
            on_progress(p);
            continue;
        }
        return serde_json::from_value(value).context("bad answer from the node");
    }
}

/// The next line the node sent on an admin connection, parsed.
pub fn read_line(reader: &mut impl BufRead, socket: &Path) -> anyhow::Result<Value> {
    let mut answer = String::new();
    reader.read_line(&mut answer).with_context(|| format!("reading from {}", socket.display()))?;
    if answer.is_empty() {
        bail!("the node closed the admin connection without answering");
    }
    serde_json::from_str(&answer).with_context(|| format!("bad answer from the node: {answer}"))
}

/// The arguments of `drmesh ctl --state-dir DIR agent-status` (`drmesh agent status`).
pub fn agent_status_args(state_dir: PathBuf, json: bool) -> CtlArgs {
    CtlArgs { state_dir: Some(state_dir), socket: None, json, command: CtlCommand::AgentStatus }
}

/// Runs `drmesh ctl`.
pub fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let socket = match (&args.socket, &args.state_dir) {
        (Some(s), _) => s.clone(),
        (None, Some(dir)) => dir.join(SOCKET_FILE),
        (None, None) => {
            // A bad command line, as clap's own refusals: exit 2.
            eprintln!("error: which node? give --state-dir DIR (or set DRMESH_STATE_DIR) or --socket PATH, before or after the command");
            return Ok(ExitCode::from(2));
        }
    };
    let req = match args.command {
        CtlCommand::Status => Request::Status,
        CtlCommand::Peers => Request::Peers,
        CtlCommand::Reload => Request::Reload,
        CtlCommand::SyncNow { volume } => Request::SyncNow { volume },
        CtlCommand::Volumes => Request::Volumes,
        CtlCommand::Pause { volumes, all } => Request::Pause { volumes, all },
        CtlCommand::Resume { volumes, all } => Request::Resume { volumes, all },
        CtlCommand::Rps { volume } => Request::Rps { volume },
        CtlCommand::Groups { group } => Request::Groups { group },
        CtlCommand::Gc { grace_secs, dry_run } => Request::Gc { grace_secs: Some(grace_secs), dry_run },
        CtlCommand::Retention { volume, topology } => Request::Retention {
            volume,
            topology: match topology.map(|t| std::path::absolute(&t).map_err(|e| (t, e))).transpose() {
                Ok(t) => t,
                Err((t, e)) => anyhow::bail!("cannot resolve {}: {e}", t.display()),
            },
        },
        CtlCommand::Store => Request::Store,
        CtlCommand::Scrub { sample } => Request::Scrub { sample_percent: sample },
        CtlCommand::Scrubs { volume } => Request::Scrubs { volume },
        CtlCommand::AgentStatus => Request::AgentStatus,
        CtlCommand::Drills { volume } => Request::Drills { volume },
        CtlCommand::Mesh => return run_gossip(&socket, args.json, GossipRequest::Mesh),
        CtlCommand::Catalog { volume } => return run_gossip(&socket, args.json, GossipRequest::Catalog { volume }),
        CtlCommand::Check { volume } => return Ok(run_check(&socket, args.json, volume)),
    };
    let show_progress = !args.json && matches!(req, Request::Scrub { .. } | Request::SyncNow { .. } | Request::Gc { .. });
    let mut sync_line = SyncProgressLine::new();
    // Under --json, progress events as JSON lines on stderr (stdout keeps the
    // one envelope): each one on a terminal, one per 10 s into a pipe or file.
    let stderr_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_event: Option<std::time::Instant> = None;
    let response = request_with_progress(&socket, &req, |p| {
        if args.json && (stderr_terminal || last_event.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))) {
            eprintln!("{}", serde_json::json!({ "progress": p }));
            last_event = Some(std::time::Instant::now());
        }
        if show_progress {
            if let Some(sc) = p.get("scrub") {
                eprintln!("scrub: {} of {} blobs read ({})", s(&sc["blobs_read"]), s(&sc["blobs_total"]), bytes(sc["bytes_read"].as_u64().unwrap_or(0)));
            }
            if let Some(gc) = p.get("gc") {
                eprintln!("gc: {} {} of {}", s(&gc["phase"]), s(&gc["done"]), s(&gc["total"]));
            }
            if let Some(sync) = p.get("sync") {
                sync_line.show(sync);
            }
        }
    });
    sync_line.finish();
    let response = match response {
        Ok(response) => response,
        Err(e) if args.json => return Ok(print_json_failure(&e)),
        Err(e) => return Err(e),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(if response.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    if !response.ok {
        eprintln!("error: {}", response.error.as_deref().unwrap_or("unknown error"));
        for line in &response.details {
            eprintln!("  {line}");
        }
        return Ok(ExitCode::FAILURE);
    }
    let data = response.data.unwrap_or(Value::Null);
    match req {
        Request::Status => print_status(&data),
        Request::Peers => println!("{}", peers_table(&data)),
        Request::Reload => print_reload(&data),
        Request::SyncNow { .. } => {
            println!("{}", cycles_table(data["reports"].as_array().map(Vec::as_slice).unwrap_or_default()));
            for r in data["reports"].as_array().into_iter().flatten().filter(|r| r["read_plan"].is_string()) {
                println!("{} to {}: read {}", s(&r["volume"]), s(&r["target"]), s(&r["read_plan"]));
                match r["free_skipped_bytes"].as_u64() {
                    Some(n) if n > 0 => println!("{} to {}: free space {} ({} not read or zeroed)", s(&r["volume"]), s(&r["target"]), s(&r["free_space"]), bytes(n)),
                    _ => println!("{} to {}: free space {}", s(&r["volume"]), s(&r["target"]), s(&r["free_space"])),
                }
            }
            // A group's views are told once per target.
            let mut told = std::collections::BTreeSet::new();
            for r in data["reports"].as_array().into_iter().flatten().filter(|r| r["group"].is_object()) {
                if told.insert((s(&r["group"]["name"]), s(&r["target"]))) {
                    println!("group {} to {}: {}", s(&r["group"]["name"]), s(&r["target"]), s(&r["group"]["how"]));
                }
            }
            for e in data["errors"].as_array().into_iter().flatten() {
                println!("failed: {}", s(e));
            }
        }
        Request::Volumes => {
            println!("{}", volumes_table(&data));
            for note in view_notes(&data) {
                println!("{note}");
            }
        }
        Request::Pause { .. } => print_pause(&data),
        Request::Resume { .. } => print_resume(&data),
        Request::Rps { .. } => println!("{}", rps_table(&data)),
        Request::Groups { .. } => println!("{}", groups_table(&data)),
        Request::Gc { .. } => println!(
            "scanned {} blobs, {} {} ({}), kept {} pinned by running cycles and {} within the grace window, in {} ms",
            s(&data["blobs_scanned"]),
            if data["dry_run"] == true { "would delete (dry run, nothing deleted)" } else { "deleted" },
            s(&data["blobs_deleted"]),
            bytes(data["bytes_freed"].as_u64().unwrap_or(0)),
            s(&data["blobs_kept_pinned"]),
            s(&data["blobs_kept_grace"]),
            s(&data["duration_ms"])
        ),
        Request::Scrub { .. } => print_scrub(&data),
        Request::Retention { .. } => print_retention(&data),
        Request::Scrubs { .. } => println!("{}", scrubs_table(&data)),
        Request::Store => {
            for (k, v) in data.as_object().into_iter().flatten() {
                println!("{k:<16} {}", s(v));
            }
        }
        Request::Restore { .. } | Request::Verify { .. } | Request::Export { .. } => println!("{}", s(&data)),
        Request::AgentStatus => print_agent_status(&data),
        Request::Drills { .. } => print_drills(&data),
        Request::Drill { .. } => crate::drill::print_report(&data),
    }
    Ok(ExitCode::SUCCESS)
}

/// `drmesh ctl check`: the verdict on stdout (text or JSON), its exit status.
fn run_check(socket: &Path, json: bool, volume: Option<VolumeName>) -> ExitCode {
    let ask = |req: GossipRequest| -> Result<Value, String> {
        let response = request_with_progress(socket, &req, |_| {}).map_err(|e| e.to_string())?;
        match response.ok {
            true => Ok(response.data.unwrap_or(Value::Null)),
            false => Err(format!("the node refused: {}", response.error.as_deref().unwrap_or("unknown error"))),
        }
    };
    let verdict = match (ask(GossipRequest::Catalog { volume }), ask(GossipRequest::Mesh)) {
        (Ok(catalog), Ok(mesh)) => crate::check::evaluate(&catalog, &mesh),
        (Err(e), _) | (_, Err(e)) => crate::check::unknown(&e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&verdict).unwrap_or_default());
    } else {
        print!("{}", crate::check::render(&verdict));
    }
    ExitCode::from(verdict.exit_code)
}

/// `drmesh ctl retention`: per volume, the rules and what they keep and would delete.
fn print_retention(list: &Value) {
    let seqs = |v: &Value| -> String {
        let list: Vec<String> = v.as_array().into_iter().flatten().map(|s| format!("@{}", s)).collect();
        if list.is_empty() {
            "none".to_string()
        } else {
            list.join(" ")
        }
    };
    let rows = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        println!("no recovery points held here");
    }
    for r in rows {
        let volume = s(&r["volume"]);
        if r["policy"].is_null() {
            println!("{volume}: no volume of this name in the topology: all kept ({})", seqs(&r["kept"]));
            continue;
        }
        let mut rules = vec![format!("keep_last {}", s(&r["keep_last"]))];
        for key in ["hourly", "daily", "weekly"] {
            if r[key].as_u64().unwrap_or(0) > 0 {
                rules.push(format!("{key} {}", s(&r[key])));
            }
        }
        if r["coalesce_unchanged"] == true {
            rules.push("coalesce_unchanged".into());
        }
        println!("{volume} (policy {}: {})", s(&r["policy"]), rules.join(", "));
        println!("  keeps         {}", seqs(&r["kept"]));
        if let Some(good) = r["kept_as_last_known_good"].as_u64() {
            println!("                (@{good} only as the newest verified RP, the last known-good)");
        }
        println!("  would delete  {}", seqs(&r["would_delete"]));
    }
    if !rows.is_empty() {
        println!("(dry run: nothing was deleted; retention runs after each committed RP)");
    }
}

/// Under `--json`, a node that cannot be asked still gets an envelope on
/// stdout (`ok: false` with the reason), and the reason on stderr: exit 1.
fn print_json_failure(e: &anyhow::Error) -> ExitCode {
    let text = crate::error_chain(e);
    println!("{}", serde_json::to_string_pretty(&Response::error(text.clone(), vec![])).unwrap_or_default());
    eprintln!("error: {text}");
    ExitCode::FAILURE
}

/// `drmesh ctl mesh` and `drmesh ctl catalog`.
fn run_gossip(socket: &Path, json: bool, req: GossipRequest) -> anyhow::Result<ExitCode> {
    let response = match request_with_progress(socket, &req, |_| {}) {
        Ok(response) => response,
        Err(e) if json => return Ok(print_json_failure(&e)),
        Err(e) => return Err(e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(if response.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    if !response.ok {
        eprintln!("error: {}", response.error.as_deref().unwrap_or("unknown error"));
        return Ok(ExitCode::FAILURE);
    }
    let data = response.data.unwrap_or(Value::Null);
    if data["replica_restored"] == true && data["uptime_secs"].as_u64().unwrap_or(0) < 60 {
        println!("(replica restored from gossip.redb at start {} ago; catching up)", duration(data["uptime_secs"].as_u64().unwrap_or(0)));
    }
    match req {
        GossipRequest::Mesh => println!("{}", mesh_table(&data)),
        GossipRequest::Catalog { .. } => {
            println!("{}", catalog_volumes_table(&data));
            println!("{}", catalog_rps_table(&data));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ago(v: &Value) -> String {
    v.as_f64().map(|secs| format!("{} ago", duration(secs as u64))).unwrap_or_else(|| "-".into())
}

fn mesh_table(data: &Value) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["NODE", "NODE ID", "STATE", "GEN", "LAST HEARD", "SITE", "VERSION", "TOPOLOGY", "STATUS LEARNED"]);
    for m in data["members"].as_array().into_iter().flatten() {
        let id = s(&m["id"]);
        let short_id = id.split('-').next().unwrap_or_default().to_string();
        let name = if m["is_self"] == true { format!("{} (this node)", s(&m["name"])) } else { s(&m["name"]) };
        let topology = match (&m["topology_version"], &m["topology_matches"]) {
            (Value::Null, _) => "-".to_string(),
            (v, Value::Bool(true)) => format!("v{} same", s(v)),
            (v, _) => format!("v{} DIFFERENT ({})", s(v), s(&m["topology_hash"])),
        };
        let heard = if m["is_self"] == true { "-".to_string() } else { ago(&m["last_heard_secs"]) };
        table.add_row(vec![name, short_id, s(&m["state"]), s(&m["generation"]), heard, s(&m["site"]), s(&m["software_version"]), topology, ago(&m["status_age_secs"])]);
    }
    table
}

fn catalog_volumes_table(data: &Value) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["VOLUME", "SOURCE", "RPO", "LAST RP", "HELD BY", "AGE", "RPO STATE", "VERIFIED", "RPS", "LAST ERROR"]);
    for v in data["volumes"].as_array().into_iter().flatten() {
        let rpo = v["rpo_secs"].as_u64().map(duration).unwrap_or_else(|| "-".into());
        let last = v["last_seq"].as_u64().map(|seq| format!("{}@{seq}", s(&v["volume"]))).unwrap_or_else(|| "none".into());
        let holders: Vec<String> = v["last_holders"].as_array().into_iter().flatten().map(s).collect();
        let age = v["last_rp_age_secs"].as_u64().map(duration).unwrap_or_else(|| "-".into());
        let state = match (&v["rpo_met"], v["rpo_missed_by_secs"].as_u64()) {
            (Value::Bool(true), _) => "RPO met".to_string(),
            (Value::Bool(false), Some(by)) => format!("RPO missed by {}", duration(by)),
            _ if v["last_seq"].is_null() => "no recovery point".to_string(),
            _ => "-".to_string(),
        };
        let error = v["last_error"].as_str().map(|e| e.chars().take(60).collect()).unwrap_or_else(|| "-".into());
        let ver = &v["verification"];
        let verified = if ver.is_null() {
            "no drills".to_string()
        } else {
            let age = ver["unverified_secs"].as_u64().map(duration).unwrap_or_else(|| "-".into());
            let state = match ver["verified_seq"].as_u64() {
                Some(seq) => format!("@{seq}, taken {age} ago"),
                None if ver["unverified_secs"].is_null() => "no recovery point".into(),
                None => format!("never, RPs for {age}"),
            };
            if ver["overdue"] == true {
                format!("OVERDUE: {state} (max {})", duration(ver["max_unverified_age_secs"].as_u64().unwrap_or(0)))
            } else {
                state
            }
        };
        table.add_row(vec![s(&v["volume"]), s(&v["source"]), rpo, last, holders.join(", "), age, state, verified, s(&v["rp_count"]), error]);
    }
    table
}

fn catalog_rps_table(data: &Value) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["RECOVERY POINT", "HOLDER", "TIME (UTC)", "SIZE", "CONSISTENCY", "DRILL", "SCRUB (UTC)", "MERKLE ROOT", "LEARNED"]);
    for r in data["rps"].as_array().into_iter().flatten() {
        let drill = drill_state(&r["drill"]);
        let scrub = &r["scrub"];
        let scrub = if scrub.is_null() {
            "never scrubbed".to_string()
        } else {
            let percent = scrub["sample_percent"].as_u64().unwrap_or(100);
            format!(
                "{}{} {}",
                if scrub["sound"] == true { "sound" } else { "DAMAGED" },
                if percent < 100 { format!(" ({percent}% read)") } else { String::new() },
                time_ms(scrub["finished_unix_ms"].as_u64().unwrap_or(0))
            )
        };
        table.add_row(vec![
            format!("{}@{}", s(&r["volume"]), s(&r["seq"])),
            s(&r["holder"]),
            time_ms(r["snapshot_unix_ms"].as_u64().unwrap_or(0)),
            bytes(r["size_bytes"].as_u64().unwrap_or(0)),
            s(&r["consistency"]),
            drill,
            scrub,
            s(&r["merkle_root"]),
            ago(&r["learned_secs"]),
        ]);
    }
    table
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A span of seconds for people: 42s, 3m05s, 2h10m, 4d03h.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

pub fn print_status(data: &Value) {
    let peers = data["peers"].as_array().cloned().unwrap_or_default();
    let connected = peers.iter().filter(|p| p["state"] == "connected").count();
    println!("node      {} ({})", s(&data["name"]), s(&data["node_id"]));
    println!("version   drmesh {}", s(&data["software_version"]));
    println!("uptime    {}", duration(data["uptime_secs"].as_u64().unwrap_or(0)));
    println!("listen    {}", s(&data["listen"]));
    println!(
        "topology  mesh {} version {} (hash {}) from {}",
        s(&data["mesh"]),
        s(&data["topology_version"]),
        s(&data["topology_hash"]),
        s(&data["topology_path"])
    );
    let reload = &data["last_reload"];
    if !reload.is_null() {
        let state = if reload["ok"] == true { "ok" } else { "REJECTED" };
        println!("reload    {state} ({}): {}", s(&reload["trigger"]), s(&reload["message"]));
        for line in reload["details"].as_array().into_iter().flatten() {
            println!("          {}", s(line));
        }
    }
    println!("peers     {connected} of {} connected", peers.len());
    if !peers.is_empty() {
        println!("{}", peers_table(&data["peers"]));
    }
}

fn peers_table(peers: &Value) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["PEER", "NODE ID", "STATE", "DIR", "REMOTE", "RTT", "UP", "TOPOLOGY", "LAST ERROR"]);
    for p in peers.as_array().into_iter().flatten() {
        let id = s(&p["id"]);
        let short_id = id.split('-').next().unwrap_or_default().to_string();
        let state = match p["state"].as_str() {
            Some("backoff") => format!("retry in {:.1}s", p["retry_in_secs"].as_f64().unwrap_or(0.0)),
            Some(other) => other.to_string(),
            None => "-".into(),
        };
        let rtt = p["rtt_ms"].as_f64().map(|ms| format!("{ms:.1} ms")).unwrap_or_else(|| "-".into());
        let up = p["connected_secs"].as_u64().map(duration).unwrap_or_else(|| "-".into());
        let topology = match (&p["topology_version"], &p["topology_matches"]) {
            (Value::Null, _) => "-".to_string(),
            (v, Value::Bool(true)) => format!("v{} same", s(v)),
            (v, _) => format!("v{} DIFFERENT ({})", s(v), s(&p["topology_hash"])),
        };
        let dir = s(&p["direction"]);
        let error = p["last_error"].as_str().map(|e| e.chars().take(60).collect::<String>()).unwrap_or_else(|| "-".into());
        table.add_row(vec![s(&p["name"]), short_id, state, dir, s(&p["remote"]), rtt, up, topology, error]);
    }
    table
}

fn print_reload(data: &Value) {
    if data["changed"] == true {
        println!("applied topology version {} (hash {})", s(&data["topology_version"]), s(&data["topology_hash"]));
        for line in data["summary"].as_array().into_iter().flatten() {
            println!("  {}", s(line));
        }
    } else {
        println!("topology unchanged (version {}, hash {})", s(&data["topology_version"]), s(&data["topology_hash"]));
    }
}

/// Human size: 1.5 GiB, 300 MiB, 12 KiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A Unix time in milliseconds as UTC RFC 3339 to the second.
pub fn time_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `drmesh ctl agent-status`: one row per `kmod` volume, then any error reading its state.
fn print_agent_status(list: &Value) {
    let devices = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if devices.is_empty() {
        println!("this node is the source of no volume of kind \"kmod\"");
        return;
    }
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["VOLUME", "DEVICE", "STATE", "GRANULE", "BITMAP", "DIRTY NOW", "HAND-OVERS", "SNAPSHOT", "COW STORE USE", "KEPT ACROSS REBOOT", "PENDING PER TARGET"]);
    for d in devices {
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        let state = match (d["error"].as_str(), d["attached"] == true, d["device_gone"] == true) {
            (Some(_), _, _) => "error".to_string(),
            (None, true, true) => "attached, device gone".to_string(),
            (None, true, false) => "attached".to_string(),
            (None, false, _) => "not attached (the next cycle attaches)".to_string(),
        };
        let gran = u(&d["granularity_bytes"]);
        let snapshot = match (d["snapshot"].as_str(), d["snapshot_error"].as_str()) {
            (Some(p), Some(e)) => format!("{p} INVALID: {e}"),
            (Some(p), None) => p.to_string(),
            (None, _) => "-".into(),
        };
        let cow_total = u(&d["cow_total_bytes"]);
        let cow = if cow_total > 0 {
            format!("{} of {} ({})", bytes(u(&d["cow_used_bytes"])), bytes(cow_total), s(&d["cow_store"]))
        } else {
            format!("- ({})", s(&d["cow_store"]))
        };
        let kept = match (d["state_store"].as_str(), d["persist_error"].as_str(), d["persistent"] == true) {
            (None, _, _) => "no (memory only)".to_string(),
            (Some(p), Some(e), _) => format!("FAILED: {e} ({p})"),
            (Some(p), None, true) => format!(
                "yes ({p}; log {} of {} extents)",
                u(&d["log_extents"]),
                u(&d["log_slots"])
            ),
            (Some(p), None, false) => format!("- ({p})"),
        };
        let pending: Vec<String> = d["pending_bits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| match p[1].as_u64() {
                Some(bits) => format!("{}: {}", s(&p[0]), bytes(bits * gran)),
                None => format!("{}: everything", s(&p[0])),
            })
            .collect();
        table.add_row(vec![
            s(&d["volume"]),
            format!("{} ({})", s(&d["device"]), bytes(u(&d["device_bytes"]))),
            state,
            if gran > 0 { bytes(gran) } else { "-".into() },
            bytes(u(&d["bitmap_bytes"])),
            format!("{} ({} bits)", bytes(u(&d["bits_set"]) * gran), u(&d["bits_set"])),
            s(&d["handovers"]),
            snapshot,
            cow,
            kept,
            if pending.is_empty() { "-".into() } else { pending.join(", ") },
        ]);
    }
    println!("{table}");
    for d in devices {
        if let Some(e) = d["error"].as_str() {
            println!("{}: {e}", s(&d["volume"]));
        }
    }
}

/// One row per cycle report (as answered by sync-now).
pub fn cycles_table(reports: &[Value]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["VOLUME", "TARGET", "RP", "SCANNED", "OFFERED", "SENT", "DEDUPED", "FULL/DELTA", "RATIO", "TIME", "MB/s"]);
    for r in reports {
        let st = &r["stats"];
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        let secs = r["duration_secs"].as_f64().unwrap_or(0.0);
        let plain = u(&st["sent_plain_bytes"]);
        let payload = u(&st["sent_payload_bytes"]);
        let ratio = if payload > 0 { format!("{:.2}", plain as f64 / payload as f64) } else { "-".into() };
        let speed = if secs > 0.0 { format!("{:.0}", u(&r["scanned_bytes"]) as f64 / 1e6 / secs) } else { "-".into() };
        table.add_row(vec![
            s(&r["volume"]),
            s(&r["target"]),
            format!("@{}", s(&r["seq"])),
            bytes(u(&r["scanned_bytes"])),
            format!("{} blk / {}", u(&st["offered_blocks"]), bytes(u(&st["offered_bytes"]))),
            bytes(payload),
            format!("{} blk", u(&st["present_blocks"])),
            format!("{}/{}", u(&st["full_blocks"]), u(&st["delta_blocks"])),
            ratio,
            format!("{secs:.2}s"),
            speed,
        ]);
    }
    table
}

/// `VERIFIED`, `passed`, `FAILED (check)` or `never drilled`, from a drill report value.
fn drill_state(d: &Value) -> String {
    if d.is_null() {
        return "never drilled".into();
    }
    if d["verified"] == true {
        return "VERIFIED".into();
    }
    if d["passed"] == true {
        return "passed (partial)".into();
    }
    let failed = d["checks"].as_array().into_iter().flatten().find(|c| c["passed"] == false).and_then(|c| c["check"].as_str().map(str::to_string));
    match failed {
        Some(c) => format!("FAILED ({c})"),
        None => "FAILED".into(),
    }
}

fn groups_table(groups: &Value) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["GROUP RP", "INSTANT (UTC)", "MEMBERS", "STATE"]);
    for g in groups.as_array().into_iter().flatten() {
        let members: Vec<String> = g["rps"].as_array().into_iter().flatten().map(|r| format!("{}@{} ({})", s(&r["volume"]), s(&r["seq"]), s(&r["consistency"]))).collect();
        let state = match (g["complete"] == true, g["one_instant"] == true) {
            (true, true) => "complete, one instant".to_string(),
            (true, false) => "complete, views taken one after another".to_string(),
            (false, _) => format!("incomplete: no RP of {}", list(&g["missing"])),
        };
        // GROUP@INSTANT is what `drmesh restore-group` takes.
        table.add_row(vec![format!("{}@{}", s(&g["group"]), s(&g["time_unix_ms"])), time_ms(g["time_unix_ms"].as_u64().unwrap_or(0)), members.join("\n"), state]);
    }
    table
}

fn rps_table(rps: &Value) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["RECOVERY POINT", "TIME (UTC)", "SIZE", "CHANGED", "STORED", "SOURCE", "ENCRYPTED", "GROUP", "DRILL", "MERKLE ROOT"]);
    for r in rps.as_array().into_iter().flatten() {
        let root: String = r["merkle_root"].as_str().unwrap_or_default().chars().take(12).collect();
        let mut drill = drill_state(&r["drill"]);
        if r["last_known_good"] == true {
            drill.push_str(", last known-good: kept by retention");
        }
        table.add_row(vec![
            format!("{}@{}", s(&r["volume"]), s(&r["seq"])),
            time_ms(r["time_unix_ms"].as_u64().unwrap_or(0)),
            bytes(r["volume_bytes"].as_u64().unwrap_or(0)),
            format!("{} blk", s(&r["changed_blocks"])),
            bytes(r["bytes_stored"].as_u64().unwrap_or(0)),
            s(&r["source_node"]),
            if r["encrypted"] == true { "yes".into() } else { "no".into() },
            if r["group"].is_object() { s(&r["group"]["name"]) } else { "-".into() },
            drill,
            root,
        ]);
    }
    table
}

fn print_drills(data: &Value) {
    for j in data["running"].as_array().into_iter().flatten() {
        println!("running: {} ({}), checks {}", rp_of(j), s(&j["trigger"]), list(&j["checks"]));
    }
    for j in data["waiting"].as_array().into_iter().flatten() {
        println!("waiting: {} ({}), checks {}", rp_of(j), s(&j["trigger"]), list(&j["checks"]));
    }
    for n in data["schedule"].as_array().into_iter().flatten() {
        println!("next scheduled drill of {}: {}", s(&n["volume"]), time_ms(n["next_unix_ms"].as_u64().unwrap_or(0)));
    }
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["RECOVERY POINT", "FINISHED (UTC)", "TRIGGER", "RESULT", "CHECKS", "SUMMARY"]);
    let reports = data["reports"].as_array().map(Vec::as_slice).unwrap_or_default();
    for r in reports {
        let checks: Vec<String> = r["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| format!("{} {} {:.1}s", s(&c["check"]), if c["passed"] == true { "ok" } else { "FAILED" }, c["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0))
            .collect();
        let summary = match (r["error"].as_str(), r["checks"].as_array().and_then(|c| c.iter().find(|c| c["passed"] == false))) {
            (Some(e), _) => e.to_string(),
            (None, Some(c)) => format!("{}: {}", s(&c["check"]), s(&c["summary"])),
            (None, None) => r["checks"].as_array().and_then(|c| c.last()).map(|c| s(&c["summary"])).unwrap_or_default(),
        };
        table.add_row(vec![
            format!("{}@{}", s(&r["volume"]), s(&r["seq"])),
            time_ms(r["finished_unix_ms"].as_u64().unwrap_or(0)),
            s(&r["trigger"]),
            drill_state(r),
            checks.join(", "),
            summary.chars().take(100).collect(),
        ]);
    }
    if reports.is_empty() {
        println!("no drill report kept on this node");
    } else {
        println!("{table}");
    }
}

fn rp_of(j: &Value) -> String {
    match j["seq"].as_u64() {
        Some(seq) => format!("{}@{seq}", s(&j["volume"])),
        None => format!("{} (newest)", s(&j["volume"])),
    }
}

fn list(v: &Value) -> String {
    v.as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(",")
}

fn print_pause(list: &Value) {
    let list = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        println!("this node is the source of no volume: nothing to pause");
    }
    for v in list {
        let mut line = format!("{}: {}", s(&v["volume"]), if v["already_paused"] == true { "was already paused" } else { "paused" });
        let stopped: Vec<String> = v["cycles_stopped"].as_array().into_iter().flatten().map(s).collect();
        if !stopped.is_empty() {
            line.push_str(&format!("; stopped the cycle to {} (nothing committed, the baseline is unchanged)", stopped.join(", ")));
        }
        let committed: Vec<String> = v["cycles_committed"].as_array().into_iter().flatten().map(s).collect();
        if !committed.is_empty() {
            line.push_str(&format!("; the cycle to {} was already committing and finished", committed.join(", ")));
        }
        println!("{line}");
    }
}

fn print_resume(list: &Value) {
    let list = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        println!("this node is the source of no volume: nothing to resume");
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    for v in list {
        match v["paused_since_unix_ms"].as_u64() {
            Some(since) => println!(
                "{}: resumed after {} paused; a cycle is starting",
                s(&v["volume"]),
                duration(now.saturating_sub(since) / 1000)
            ),
            None => println!("{}: was not paused", s(&v["volume"])),
        }
    }
}

/// A line per volume whose last RP is not from a point-in-time view, with why.
fn view_notes(list: &Value) -> Vec<String> {
    let mut notes = Vec::new();
    for v in list.as_array().into_iter().flatten() {
        let report = &v["last_ok"]["report"];
        if report["consistency"] == "inconsistent" {
            notes.push(format!("{}@{} to {} is inconsistent: {}", s(&v["volume"]), s(&report["seq"]), s(&v["target"]), s(&report["view"])));
        }
    }
    notes
}

/// How `ctl sync-now` shows its cycles' progress on stderr: one line
/// rewritten in place on a terminal; elsewhere (a log, a pipe) a plain line
/// every 10 seconds.
struct SyncProgressLine {
    terminal: bool,
    shown: bool,
    last: Option<std::time::Instant>,
}

impl SyncProgressLine {
    fn new() -> SyncProgressLine {
        SyncProgressLine { terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()), shown: false, last: None }
    }

    fn show(&mut self, sync: &Value) {
        let parts: Vec<String> = sync["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| format!("to {}: {}", s(&t["target"]), running_text(&t["progress"]).trim_start_matches("cycle running: ")))
            .collect();
        let line = format!("sync {} {}", s(&sync["volume"]), parts.join("; "));
        if self.terminal {
            // Back to the line's start, the line, the rest of the old one cleared.
            eprint!("\r{line}\x1b[K");
            self.shown = true;
        } else if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            eprintln!("{line}");
            self.last = Some(std::time::Instant::now());
        }
    }

    fn finish(&self) {
        if self.shown {
            eprintln!();
        }
    }
}

/// "cycle running: read 25% of 2.0 GiB, sent 120 MiB, 30s left" (what is known so far).
fn running_text(p: &Value) -> String {
    let total = p["volume_bytes"].as_u64().unwrap_or(0);
    if total == 0 {
        return "cycle running: opening the volume".into();
    }
    let left = p["eta_secs"].as_f64().map(|s| format!(", {} left", duration(s.round() as u64))).unwrap_or_default();
    format!(
        "cycle running: read {:.0}% of {}, sent {}{left}",
        p["percent"].as_f64().unwrap_or(0.0),
        bytes(total),
        bytes(p["sent_payload_bytes"].as_u64().unwrap_or(0))
    )
}

fn volumes_table(list: &Value) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["VOLUME", "TARGET", "RPO", "LAST RP", "STATE", "BANDWIDTH", "LAST ERROR"]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    for v in list.as_array().into_iter().flatten() {
        let last = match v["last_ok"].as_object() {
            Some(last) => format!(
                "@{} ({} ago, {})",
                s(&last["report"]["seq"]),
                duration(now.saturating_sub(last["finished_unix_ms"].as_u64().unwrap_or(0)) / 1000),
                s(&last["report"]["consistency"])
            ),
            None => "-".into(),
        };
        let state = if let Some(since) = v["paused_since_unix_ms"].as_u64() {
            let running = if v["running"] == true { ", cycle stopping" } else { "" };
            format!("paused {} ago{running}", duration(now.saturating_sub(since) / 1000))
        } else if v["running"] == true {
            running_text(&v["running_progress"])
        } else if v["proxy"].is_object() && v["proxy"]["reads_here"] != true {
            format!("standby: proxy {} reads it", v["proxy"]["reader"].as_str().unwrap_or("?"))
        } else if v["proxy"].is_object() && v["proxy"]["lease_secs"].as_f64().unwrap_or(0.0) <= 0.0 {
            format!("waiting for the lease ({})", v["proxy"]["lease_refusal"].as_str().unwrap_or("asked"))
        } else if v["queued"] == true {
            "queued (node's cycle memory budget or max_cycles)".to_string()
        } else {
            format!("next in {}", duration(v["next_in_secs"].as_f64().unwrap_or(0.0) as u64))
        };
        let error = v["last_error"]["reason"].as_str().map(|e| e.chars().take(60).collect()).unwrap_or_else(|| "-".into());
        let bandwidth = v["bandwidth"]["reason"].as_str().unwrap_or("-").to_string();
        table.add_row(vec![s(&v["volume"]), s(&v["target"]), duration(v["rpo_secs"].as_u64().unwrap_or(0)), last, state, bandwidth, error]);
    }
    table
}

fn print_scrub(data: &Value) {
    for p in data["problems"].as_array().into_iter().flatten() {
        println!("DAMAGED {}: {}", s(&p["object"]), s(&p["problem"]));
    }
    let share = data["share"].as_f64().unwrap_or(1.0);
    println!(
        "scrub read {} of {} blobs ({}{}) at {}/s, checked {} recovery points: {} blobs failed, {} RPs damaged{}, in {:.1} s",
        s(&data["blobs_read"]),
        s(&data["blobs_total"]),
        bytes(data["bytes_read"].as_u64().unwrap_or(0)),
        if share < 1.0 { format!(", a {:.0}% sample", share * 100.0) } else { String::new() },
        bytes(data["bytes_per_sec"].as_u64().unwrap_or(0)),
        s(&data["rps_checked"]),
        s(&data["blobs_bad"]),
        s(&data["rps_damaged"]),
        if data["repaired"].as_u64().unwrap_or(0) > 0 { " after repair" } else { "" },
        data["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
    );
    let (authenticated, without_key) = (data["blobs_authenticated"].as_u64().unwrap_or(0), data["blobs_without_key"].as_u64().unwrap_or(0));
    if authenticated + without_key > 0 {
        println!(
            "encrypted blobs: {authenticated} passed their AES-GCM tag check under a policy key held here{}",
            if without_key > 0 { format!("; {without_key} checked by checksum only (their policy's key is not on this node)") } else { String::new() }
        );
    }
    let (repaired, unrepairable) = (data["repaired"].as_u64().unwrap_or(0), data["unrepairable"].as_u64().unwrap_or(0));
    if repaired + unrepairable > 0 {
        println!("repair: {repaired} blocks fetched again from another holder and stored; {unrepairable} no other holder could give");
    }
    let damaged: Vec<String> = data["rps"].as_array().into_iter().flatten().filter(|r| r["ok"] == false).map(|r| s(&r["rp"])).collect();
    if !damaged.is_empty() {
        println!("damaged recovery points now: {} (`drmesh ctl scrubs` says why)", damaged.join(", "));
    }
}

fn scrubs_table(data: &Value) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(vec!["RECOVERY POINT", "SCRUBBED (UTC)", "BLOBS READ", "VERDICT"]);
    for r in data.as_array().into_iter().flatten() {
        let verdict = if r["ok"] == true { "sound".to_string() } else { format!("DAMAGED: {}", s(&r["problem"])) };
        table.add_row(vec![
            s(&r["rp"]),
            time_ms(r["finished_unix_ms"].as_u64().unwrap_or(0)),
            format!("{:.0}%", r["share"].as_f64().unwrap_or(1.0) * 100.0),
            verdict,
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The volumes table reads the documented shape of `volumes` (named fields).
    #[test]
    fn the_volumes_table_shows_the_last_rp_and_the_last_error() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let list = serde_json::json!([{
            "volume": "db", "target": "hq", "rpo_secs": 300, "running": false, "queued": false, "next_in_secs": 42.0,
            "last_ok": { "finished_unix_ms": now - 90_000, "report": { "seq": 7, "consistency": "inconsistent", "view": "live read, no point-in-time view: /dev/sdb is not a regular file" } },
            "last_error": { "at_unix_ms": now, "reason": "target hq is not connected" },
            "bandwidth": { "reason": "unlimited" }, "paused_since_unix_ms": null,
        }]);
        let text = volumes_table(&list).to_string();
        assert!(text.contains("@7 (1m30s ago, inconsistent)") || text.contains("@7 (1m31s ago, inconsistent)"), "{text}");
        assert!(text.contains("target hq is not connected"), "{text}");
        assert!(text.contains("next in 42s"), "{text}");
        assert_eq!(view_notes(&list), vec!["db@7 to hq is inconsistent: live read, no point-in-time view: /dev/sdb is not a regular file".to_string()]);
        let progress = serde_json::json!({ "volume_bytes": 2u64 << 30, "percent": 25.0, "sent_payload_bytes": 120u64 << 20, "eta_secs": 30.2 });
        assert_eq!(running_text(&progress), format!("cycle running: read 25% of {}, sent {}, 30s left", bytes(2 << 30), bytes(120 << 20)));
        assert_eq!(running_text(&serde_json::json!({ "volume_bytes": 0 })), "cycle running: opening the volume");
    }

    /// A platform volume says which proxy reads it, or that this one waits for its lease.
    #[test]
    fn the_volumes_table_says_which_proxy_reads_a_platform_volume() {
        let row = |proxy: serde_json::Value| {
            serde_json::json!([{
                "volume": "vm01", "target": "hq", "rpo_secs": 60, "running": false, "queued": false, "next_in_secs": 0.0,
                "last_ok": null, "last_error": null, "bandwidth": { "reason": "unlimited" }, "paused_since_unix_ms": null, "proxy": proxy,
            }])
        };
        let text = volumes_table(&row(serde_json::json!({ "platform": "hv", "reader": "p2", "reads_here": false, "lease_secs": 0.0, "lease_refusal": null }))).to_string();
        assert!(text.contains("standby: proxy p2 reads it"), "{text}");
        let text = volumes_table(&row(serde_json::json!({ "platform": "hv", "reader": "p1", "reads_here": true, "lease_secs": 0.0, "lease_refusal": "held by p2 for 3000 ms more" }))).to_string();
        assert!(text.contains("waiting for the lease (held by p2 for 3000 ms more)"), "{text}");
        let text = volumes_table(&row(serde_json::json!({ "platform": "hv", "reader": "p1", "reads_here": true, "lease_secs": 4.2, "lease_refusal": null }))).to_string();
        assert!(text.contains("next in 0s"), "{text}");
    }
}

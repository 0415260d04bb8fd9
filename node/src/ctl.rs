//! `drmesh ctl`: the admin socket client. Prints tables for people, `--json` for scripts.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde_json::Value;

use crate::admin::{Request, Response, SOCKET_FILE};

/// Arguments of `drmesh ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// State directory of the node to talk to (its admin socket is STATE_DIR/admin.sock).
    #[arg(long, env = "DRMESH_STATE_DIR", required_unless_present = "socket")]
    state_dir: Option<PathBuf>,
    /// Path of the admin socket, instead of --state-dir.
    #[arg(long)]
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
}

/// Sends one request to the admin socket at `socket` and returns the answer.
pub fn request(socket: &Path, request: &Request) -> anyhow::Result<Response> {
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
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).with_context(|| format!("writing to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).with_context(|| format!("reading from {}", socket.display()))?;
    if answer.is_empty() {
        bail!("the node closed the admin connection without answering");
    }
    serde_json::from_str(&answer).with_context(|| format!("bad answer from the node: {answer}"))
}

/// Runs `drmesh ctl`.
pub fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let socket = match (&args.socket, &args.state_dir) {
        (Some(s), _) => s.clone(),
        (None, Some(dir)) => dir.join(SOCKET_FILE),
        (None, None) => bail!("give --state-dir or --socket"),
    };
    let req = match args.command {
        CtlCommand::Status => Request::Status,
        CtlCommand::Peers => Request::Peers,
        CtlCommand::Reload => Request::Reload,
    };
    let response = request(&socket, &req)?;
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
    }
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn duration(secs: u64) -> String {
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

//! `drmesh agent`: the Linux agent's own commands, for the `kmod` volumes this
//! node is the source of.
//!
//! `agent attach` runs at boot, before the filesystems mount (see
//! docs/kmod-source.md for a systemd unit): it attaches every `kmod` volume
//! with its state store, so the tracking saved at shutdown, or left by a
//! crash, carries on. A node attaches by itself at its first cycle too, but by
//! then a mount has written the device and the module must start afresh.
//! `agent status` is `drmesh ctl agent-status`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use drmesh_actors::source::kmod::{attach_at_boot, KmodSpec};
use drmesh_transport::Identity;

use crate::ctl;
use crate::reload::{absolute, load_topology};

/// Arguments of `drmesh agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(clap::Subcommand, Debug)]
enum AgentCommand {
    /// Attach this node's `kmod` volumes to the kernel module now (at boot, before
    /// the filesystems mount), restoring the tracking their state stores kept.
    Attach {
        /// The node's state directory, made by `drmesh init`.
        #[arg(long, env = "DRMESH_STATE_DIR")]
        state_dir: PathBuf,
        /// The topology file.
        #[arg(long)]
        topology: PathBuf,
        /// Print one JSON object per volume.
        #[arg(long)]
        json: bool,
    },
    /// The kernel module's view of this node's `kmod` volumes (the running
    /// node's `ctl agent-status`).
    Status {
        /// The node's state directory.
        #[arg(long, env = "DRMESH_STATE_DIR")]
        state_dir: PathBuf,
        /// Print the raw JSON answer.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `drmesh agent`.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AgentCommand::Status { state_dir, json } => ctl::run(ctl::agent_status_args(state_dir, json)),
        AgentCommand::Attach { state_dir, topology, json } => attach(state_dir, topology, json),
    }
}

fn attach(state_dir: PathBuf, topology: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let identity = Identity::load(&state_dir)?;
    let path = absolute(&topology);
    let topology = load_topology(&path, &identity.node_id())?;
    let me = topology
        .node_by_id(&identity.node_id())
        .map(|n| n.name.clone())
        .ok_or_else(|| anyhow!("this node ({}) is not in topology file {}", identity.node_id(), path.display()))?;
    let mut failed = false;
    let mut any = false;
    for v in topology.volumes.iter().filter(|v| v.source == me) {
        let Some(spec) = KmodSpec::of(v) else { continue };
        any = true;
        match attach_at_boot(&v.name, &spec) {
            Ok(r) if json => println!("{}", serde_json::to_string(&r)?),
            Ok(r) if r.already_attached => println!("{}: {} is attached already; nothing done", r.volume, r.device),
            Ok(r) => println!("{}: attached {}; {}", r.volume, r.device, describe(&r, &spec)),
            Err(e) => {
                failed = true;
                eprintln!("{}: {e}", v.name);
            }
        }
    }
    if !any {
        println!("node \"{me}\" is the source of no volume of kind \"kmod\"");
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// What the module did with the state store, for people.
fn describe(r: &drmesh_actors::source::kmod::BootAttach, spec: &KmodSpec) -> String {
    let store = spec.state_store.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    match r.restore.as_str() {
        "none" => "no state_store: the first cycle reads the whole device".into(),
        "clean" => format!("tracking restored from {store} (clean shutdown): {} bytes changed since the last cycle", r.restored_bytes),
        "crash" => format!(
            "tracking restored from {store} after a crash: {} bytes to read, {} activity-log extents included whole",
            r.restored_bytes, r.log_extents
        ),
        "fresh" => format!("{store} held no tracking state: the first cycle reads the whole device"),
        "written_before_attach" => {
            "the device was written after boot before this attach (attach before mounting): the first cycle reads the whole device".into()
        }
        "detached" => "the tracking was detached before (writes after that were not seen): the first cycle reads the whole device".into(),
        "geometry" => format!("{store} holds the state of another device size or granularity: the first cycle reads the whole device"),
        "no_iostat" => "the device keeps no I/O counters (queue/iostats is 0), so earlier writes cannot be ruled out: the first cycle reads the whole device".into(),
        other => format!("restore result {other}"),
    }
}

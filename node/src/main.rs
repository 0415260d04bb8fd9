//! `drmesh`: the one binary every node of the mesh runs.
//!
//! It owns the command line (clap), node start-up, the admin socket and its
//! `drmesh ctl` client, topology checking and hot reload, logging and the demo.

mod adapt;
mod admin;
mod agent;
mod ctl;
mod data;
mod boot;
mod check;
mod demo;
mod drill;
mod export;
mod gc;
mod http;
mod init;
mod logging;
mod metrics;
mod manpages;
mod mounts;
mod recover;
mod restore_group;
mod readiness;
mod reload;
mod run;
mod scrub;
mod status_page;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// drmesh: disaster-recovery block replication between the sites of a mesh.
#[derive(Parser, Debug)]
#[command(name = "drmesh", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text, help_heading = "Logging (any command)")]
    log_format: logging::LogFormat,
    /// Log filter, RUST_LOG syntax (e.g. "info", "drmesh_actors=debug"); RUST_LOG wins if set.
    #[arg(long, global = true, default_value = "info", help_heading = "Logging (any command)")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create this node's identity (key pair and certificate) and print its [[node]] block.
    Init(init::InitArgs),
    /// Run the node: join the mesh described by the topology file.
    Run(run::RunArgs),
    /// Talk to a running node through its admin socket.
    Ctl(ctl::CtlArgs),
    /// The Linux agent: attach `kmod` volumes at boot, show the kernel module's view.
    Agent(agent::AgentArgs),
    /// Topology file tools.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Restore a recovery point to a raw image file (checks every block and the Merkle root).
    Restore(recover::RestoreArgs),
    /// Restore every member of a consistency group's recovery point, one raw
    /// image per member into a folder.
    RestoreGroup(restore_group::RestoreGroupArgs),
    /// Re-read and check every block of a recovery point.
    Verify(recover::RpArgs),
    /// Serve a recovery point as a disk over NBD, writes to an overlay (instant recovery).
    Export(export::ExportArgs),
    /// Boot a recovery point in a VM before any restore (instant recovery), with boot
    /// adaptation and live restore to a device.
    Recover(boot::RecoverArgs),
    /// Drill a recovery point: prove it recovers (fsck, boot, PostgreSQL, a
    /// script), on an overlay, never touching the RP; the node keeps the result.
    Drill(drill::DrillArgs),
    /// Runs the checks of one drill for the node (not for people).
    #[command(hide = true)]
    DrillWorker(drill::WorkerArgs),
    /// Replicate a real ext4 image between two local nodes, restore it and check it.
    Demo(demo::DemoArgs),
    /// A stopped node's store: check it, or rebuild its catalog from the RP
    /// manifests and blobs.
    Store {
        #[command(subcommand)]
        command: store::StoreCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, ...) on stdout.
    Completions(manpages::CompletionsArgs),
    /// Write the manual pages (drmesh.1 and one per subcommand) into a folder.
    #[command(hide = true)]
    Man(manpages::ManArgs),
}

#[derive(Subcommand, Debug)]
enum TopologyCommand {
    /// Validate a topology file and list every error with file:line:column.
    Check {
        /// The topology file.
        file: PathBuf,
    },
    /// Write a first topology file: this node (from `drmesh init`), a policy,
    /// and every other table commented out with what it is for.
    Init(init::TopologyInitArgs),
}

fn main() -> ExitCode {
    drmesh_actors::memory::tune_allocator();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_) | Command::Demo(_)) {
        restore_sigpipe();
    }
    // `ctl` and `topology check` print for people; only the node and demo log by default.
    logging::init(cli.log_format, &cli.log);
    let result = match cli.command {
        Command::Init(args) => init::run(args),
        Command::Run(args) => run::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Topology { command: TopologyCommand::Check { file } } => check_topology(&file),
        Command::Topology { command: TopologyCommand::Init(args) } => init::topology_init(args),
        Command::Restore(args) => recover::restore(args),
        Command::RestoreGroup(args) => restore_group::restore_group(args),
        Command::Verify(args) => recover::verify(args),
        Command::Export(args) => export::run(args),
        Command::Recover(args) => boot::run(args),
        Command::Drill(args) => drill::run(args),
        Command::DrillWorker(args) => drill::worker(args),
        Command::Demo(args) => demo::run(args),
        Command::Store { command } => store::run(command),
        Command::Completions(args) => manpages::completions(args),
        Command::Man(args) => manpages::man(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// A drill schedule as written in topology files.
fn schedule_text(s: &drmesh_topology::DrillSchedule) -> String {
    use drmesh_topology::DrillSchedule;
    match s {
        DrillSchedule::Daily { at } => format!("daily {at}"),
        DrillSchedule::Weekly { day, at } => format!("weekly {} {at}", day.name()),
        DrillSchedule::Every(d) => format!("every {}", humantime::format_duration(*d)),
    }
}

fn check_topology(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    match drmesh_topology::Topology::load(file) {
        Ok(t) => {
            println!(
                "{}: ok (mesh {:?} version {}, {}, {}, {}, hash {})",
                file.display(),
                t.mesh.name,
                t.mesh.version,
                check::count(t.nodes.len(), "node", "nodes"),
                check::count(t.volumes.len(), "volume", "volumes"),
                check::count(t.policies.len(), "policy", "policies"),
                t.hash_short()
            );
            for v in &t.volumes {
                let Some(drill) = t.policies.get(&v.policy).and_then(|p| p.drill.as_ref()) else { continue };
                let on: Vec<&String> = v.targets.iter().filter(|n| drill.nodes.is_empty() || drill.nodes.contains(n)).collect();
                let checks: Vec<&str> = drill.checks.iter().map(|c| c.name()).collect();
                println!(
                    "drills of {}: {} on {}, checks {}, time limit {}, OVERDUE after {} unverified",
                    v.name,
                    schedule_text(&drill.schedule),
                    on.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                    checks.join(", "),
                    humantime::format_duration(drill.time_limit),
                    humantime::format_duration(drill.max_unverified_age)
                );
            }
            for v in &t.volumes {
                let Some(hooks) = &v.hooks else { continue };
                let command = |c: &Option<Vec<String>>| c.as_ref().map_or("none".to_string(), |c| c.join(" "));
                println!(
                    "hooks of {} (run on node {} around each cycle's view): pre {}, post {}, timeout {}",
                    v.name,
                    v.source,
                    command(&hooks.pre),
                    command(&hooks.post),
                    humantime::format_duration(hooks.timeout)
                );
            }
            for p in &t.platforms {
                println!(
                    "platform {}: proxies {}; each of its volumes is read by one live proxy (rendezvous hashing over the proxies gossip reports alive), under a lease of {} from the volume's first target",
                    p.name,
                    p.proxies.join(", "),
                    humantime::format_duration(p.lease)
                );
            }
            for v in &t.volumes {
                let drmesh_topology::SourceKind::Qemu { monitor, node, fleece_dir, fleece_guard, guest_agent, tls, nbd } = &v.kind else { continue };
                let reader = match t.platform_of(v) {
                    Some(p) => format!("a proxy of platform {}", p.name),
                    None => format!("node {}", v.source),
                };
                let fleece = match fleece_guard {
                    drmesh_topology::FleeceGuard::Reserve(bytes) => format!("fleece in {} (keeping {} MiB free)", fleece_dir.display(), bytes >> 20),
                    drmesh_topology::FleeceGuard::Max(bytes) => format!("fleece in {} on the monitor's machine (at most {} MiB per view)", fleece_dir.display(), bytes >> 20),
                };
                let over = match tls {
                    Some(tls) => format!(", over TCP with TLS (credentials in {}), NBD at {nbd}", tls.dir.display()),
                    None => String::new(),
                };
                println!(
                    "agentless {}: {} reads block node {} through the qemu monitor {}{over}, {fleece}, {}",
                    v.name,
                    reader,
                    node,
                    monitor,
                    guest_agent.as_ref().map_or("no guest agent (RPs crash consistent)".to_string(), |g| format!("guest agent {g} (filesystems frozen)"))
                );
            }
            for g in &t.groups {
                let source = t.volumes.iter().find(|v| g.volumes.first() == Some(&v.name)).map_or("?", |v| v.source.as_str());
                let command = |c: &Option<Vec<String>>| c.as_ref().map_or("none".to_string(), |c| c.join(" "));
                let hooks = g.hooks.as_ref().map_or(String::new(), |h| {
                    format!(", hooks once per group cycle: pre {}, post {}, timeout {}", command(&h.pre), command(&h.post), humantime::format_duration(h.timeout))
                });
                println!(
                    "consistency group {}: volumes {} of node {}, their views taken together each cycle (one instant when every member's filesystem can be frozen: a loop-mounted image file, a VM with a guest agent; or for a VM's disks, one qemu transaction){hooks}; `drmesh ctl groups` on a target lists its group RPs",
                    g.name,
                    g.volumes.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                    source
                );
            }
            // Parsed and checked, but no reader in this build: say so, a node will not replicate them.
            for v in &t.volumes {
                if let Err(why) = drmesh_actors::source::change::of_volume(v) {
                    println!("NOT BUILT: {why}; node {} will not replicate it (its cycles fail with this reason)", v.source);
                }
            }
            // Scrubs matter on the nodes that hold RPs: the volumes' targets.
            let mut scrubbed: Vec<String> = Vec::new();
            for n in t.nodes.iter().filter(|n| t.volumes.iter().any(|v| v.targets.contains(&n.name))) {
                scrubbed.push(match n.scrub_every {
                    Some(every) => format!("{} every {} ({}% of blobs)", n.name, humantime::format_duration(every), n.scrub_sample_percent),
                    None => format!("{} off (only `drmesh ctl scrub`)", n.name),
                });
            }
            if !scrubbed.is_empty() {
                println!("store scrubs: {}", scrubbed.join("; "));
            }
            let collected: Vec<String> = t
                .nodes
                .iter()
                .filter(|n| t.volumes.iter().any(|v| v.targets.contains(&n.name)))
                .map(|n| match n.gc_every {
                    Some(every) => format!("{} every {}", n.name, humantime::format_duration(every)),
                    None => format!("{} off (only `drmesh ctl gc`)", n.name),
                })
                .collect();
            if !collected.is_empty() {
                println!("store garbage collection: {}", collected.join("; "));
            }
            for n in &t.nodes {
                if let Some(addr) = n.metrics {
                    println!("metrics of {}: http://{addr}/metrics", n.name);
                }
                if let Some(addr) = n.status_page {
                    println!("status page of {}: http://{addr}/", n.name);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            // At most MAX_DIAGNOSTICS lines and a count of the rest, however broken the file.
            for line in diagnostics.lines() {
                println!("{line}");
            }
            let n = diagnostics.len();
            eprintln!("{}: {n} error{}", file.display(), if n == 1 { "" } else { "s" });
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the
/// message before it already quotes (our error types name their cause).
pub(crate) fn error_chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Lets one-shot commands die quietly when their output pipe closes
/// (`drmesh ctl peers | head`) instead of panicking on the write. Not for
/// `run`: a node must survive clients that hang up.
fn restore_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: called first thing in main, before any other thread exists;
    // SIG_DFL installs no handler code, so no async-signal-safety concern.
    #[allow(unsafe_code)]
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

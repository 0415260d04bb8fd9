//! `drmesh restore` and `drmesh verify`: rebuild or check a recovery point,
//! through the running node's admin socket, or with no node running straight
//! from the state dir's store (opened read-only), with progress.

use std::io::{ErrorKind, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use drmesh_actors::actor::volumes::policy_codec;
use drmesh_actors::blob::{RpSeq, VolumeName};
use drmesh_actors::codec::BlockCodec;
use drmesh_actors::restore::dest::StagedFile;
use drmesh_actors::restore::{restore as run_restore, Journal, Progress, ProgressSnapshot, RestoreReport, RpSource, Rules, Target};
use drmesh_actors::store::Store;
use drmesh_topology::Topology;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::admin::{Request, SOCKET_FILE};
use crate::ctl::{bytes, request_with_progress};
use crate::data::PROGRESS_EVERY;

/// File in the state dir that names the topology file the node last ran with.
pub const TOPOLOGY_NOTE: &str = "topology.path";

/// Arguments shared by restore and verify.
#[derive(clap::Args, Debug, Clone)]
pub struct RpArgs {
    /// The recovery point: VOLUME@SEQ, or VOLUME for the newest.
    pub(crate) rp: String,
    /// State directory of the local node: its admin socket does the work, or,
    /// when no node runs there, its store is read directly (read-only).
    #[arg(long, env = "DRMESH_STATE_DIR")]
    pub(crate) state_dir: PathBuf,
    /// Read the RP from this node instead of the local store (needs a running node).
    #[arg(long, conflicts_with = "offline")]
    pub(crate) from: Option<String>,
    /// Read the state dir's store directly even if a node is running there.
    #[arg(long)]
    pub(crate) offline: bool,
    /// Topology file for a restore without a node (policy key files, protected
    /// sources); default: the one the node last ran with.
    #[arg(long)]
    pub(crate) topology: Option<PathBuf>,
    /// Key file of the RP's policy, for a restore without a node (instead of
    /// the topology's `encryption_key_file`).
    #[arg(long)]
    pub(crate) key_file: Option<PathBuf>,
    /// Print progress events and the result as JSON lines.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Arguments of `drmesh restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    rp: RpArgs,
    /// Where to write: a new image file (raw, mode 0600), or a block device
    /// written in place.
    #[arg(long)]
    to: PathBuf,
    /// Replace an existing file, or overwrite a device that holds a filesystem
    /// or partition table. Never allows writing a protected volume's source or
    /// a mounted device.
    #[arg(long)]
    force: bool,
    /// Image format of a file destination: raw, or qcow2 (written by qemu-img
    /// from an export); default raw, or qcow2 when the name ends in .qcow2.
    #[arg(long)]
    format: Option<String>,
}

impl RestoreArgs {
    /// Restores `rp` to the raw image file `to` (replacing one there with `force`).
    pub(crate) fn new(rp: RpArgs, to: PathBuf, force: bool) -> RestoreArgs {
        RestoreArgs { rp, to, force, format: Some("raw".into()) }
    }
}

/// Splits VOLUME@SEQ.
pub fn parse_rp(text: &str) -> anyhow::Result<(VolumeName, Option<RpSeq>)> {
    let (volume, seq) = match text.split_once('@') {
        None => (text, None),
        Some((v, "latest")) => (v, None),
        Some((v, seq)) => (v, Some(seq.parse().with_context(|| format!("{text}: the part after @ must be a sequence number (or \"latest\")"))?)),
    };
    let volume = VolumeName::new(volume).with_context(|| format!("{text}: expected VOLUME, VOLUME@SEQ or VOLUME@latest"))?;
    Ok((volume, seq))
}

/// Notes in `state_dir` which topology file the node runs with (best effort).
pub fn remember_topology_path(state_dir: &Path, topology: &Path) {
    let note = state_dir.join(TOPOLOGY_NOTE);
    if let Err(e) = std::fs::write(&note, topology.as_os_str().as_encoded_bytes()) {
        tracing::warn!(file = %note.display(), error = %e, "cannot note the topology path for restores without a node");
    }
}

/// Shows progress: a bar on a terminal, a plain line when a phase begins and every 10 s on stderr
/// when it is not one (a log, a pipe), JSON lines with `--json`.
struct ProgressView {
    json: bool,
    bar: ProgressBar,
    phase: &'static str,
    phase_started: Instant,
    verb: &'static str,
    /// Plain lines instead of the bar: stderr is not a terminal.
    plain: bool,
    last_line: Option<Instant>,
    /// Whether any plain line was printed.
    printed: bool,
}

impl ProgressView {
    fn new(json: bool, verb: &'static str, rp: &str) -> ProgressView {
        let bar = if json { ProgressBar::hidden() } else { ProgressBar::new(0) };
        bar.set_style(
            ProgressStyle::with_template("{msg:24} [{bar:30}] {bytes}/{total_bytes} {percent:>3}% {binary_bytes_per_sec} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(format!("{verb} {rp}"));
        let plain = !json && !std::io::IsTerminal::is_terminal(&std::io::stderr());
        ProgressView { json, bar, phase: "", phase_started: Instant::now(), verb, plain, last_line: None, printed: false }
    }

    fn update(&mut self, p: ProgressSnapshot) {
        if p.phase != self.phase {
            self.phase = p.phase;
            self.phase_started = Instant::now();
            // Each phase gets its first plain line when it begins.
            self.last_line = None;
            self.bar.reset();
            let label = if p.phase == "restoring" { self.verb } else { p.phase };
            self.bar.set_message(label.to_string());
        }
        self.bar.set_length(p.total_bytes);
        self.bar.set_position(p.done_bytes);
        let secs = self.phase_started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { p.done_bytes as f64 / secs } else { 0.0 };
        let eta = if rate > 0.0 { Some((p.total_bytes.saturating_sub(p.done_bytes)) as f64 / rate) } else { None };
        if self.plain && p.total_bytes > 0 && p.phase != "done" && self.last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(10) || (p.done_bytes == p.total_bytes && secs > 10.0)) {
            let label = if p.phase == "restoring" { self.verb } else { p.phase };
            let left = eta.map_or_else(String::new, |e| format!(", {} left", crate::ctl::duration(e.ceil() as u64)));
            eprintln!(
                "{label}: {} of {} ({:.0}%), {}/s{left}",
                crate::ctl::bytes(p.done_bytes),
                crate::ctl::bytes(p.total_bytes),
                p.done_bytes as f64 * 100.0 / p.total_bytes as f64,
                crate::ctl::bytes(rate as u64)
            );
            self.last_line = Some(Instant::now());
            self.printed = true;
        }
        if self.json {
            let line = json!({ "progress": { "phase": p.phase, "done_bytes": p.done_bytes, "total_bytes": p.total_bytes, "rate_bytes_per_sec": rate.round(), "eta_secs": eta.map(|e| e.ceil()) } });
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
    }

    fn update_json(&mut self, v: &Value) {
        let phase = match v["phase"].as_str().unwrap_or("") {
            "checking block map" => "checking block map",
            "restoring" => "restoring",
            "syncing" => "syncing",
            "done" => "done",
            _ => "starting",
        };
        self.update(ProgressSnapshot { phase, done_bytes: v["done_bytes"].as_u64().unwrap_or(0), total_bytes: v["total_bytes"].as_u64().unwrap_or(0) });
    }
}

/// Prints the result (or the failure) and gives the exit code.
fn conclude(view: ProgressView, verb: &str, rp: &str, result: anyhow::Result<Value>) -> anyhow::Result<ExitCode> {
    view.bar.finish_and_clear();
    // An operation done before the first progress report printed no plain
    // line: one for the whole of it, in the same form.
    if let (true, false, Ok(data)) = (view.plain, view.printed, &result) {
        let total = data["rp"]["volume_bytes"].as_u64().unwrap_or(0);
        if total > 0 {
            eprintln!("{verb}: {} of {} (100%), {}/s", bytes(total), bytes(total), bytes(data["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) as u64));
        }
    }
    match (result, view.json) {
        (Ok(data), true) => {
            println!("{}", crate::admin::Response::data(&data).line());
            Ok(ExitCode::SUCCESS)
        }
        (Err(e), true) => {
            let text = crate::error_chain(&e);
            println!("{}", crate::admin::Response::error(text.clone(), vec![]).line());
            eprintln!("error: {verb} {rp} failed: {text}");
            Ok(ExitCode::FAILURE)
        }
        (Ok(data), false) if data["output_kind"] == "qcow2" => {
            let r = &data["rp"];
            println!(
                "{verb} {}@{} OK: {} in {:.1}s ({}/s), Merkle root and every block verified as read",
                r["volume"].as_str().unwrap_or_default(),
                r["seq"],
                bytes(r["volume_bytes"].as_u64().unwrap_or(0)),
                data["duration_secs"].as_f64().unwrap_or(0.0),
                bytes(data["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) as u64),
            );
            println!("written to {} (qcow2 image file, mode 0600)", data["output"].as_str().unwrap_or(""));
            Ok(ExitCode::SUCCESS)
        }
        (Ok(data), false) => {
            let r = &data["rp"];
            println!(
                "{verb} {}@{} OK: {} in {} blocks ({} zero), {} read in {:.1}s ({}/s), Merkle root and every block verified",
                r["volume"].as_str().unwrap_or_default(),
                r["seq"],
                bytes(r["volume_bytes"].as_u64().unwrap_or(0)),
                data["blocks"],
                data["zero_blocks"],
                bytes(data["payload_bytes"].as_u64().unwrap_or(0)),
                data["duration_secs"].as_f64().unwrap_or(0.0),
                bytes(data["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) as u64),
            );
            if let Some(out) = data["output"].as_str() {
                let what = if data["output_kind"] == "device" { "device written in place" } else { "image file, mode 0600" };
                println!("written to {out} ({what})");
            }
            Ok(ExitCode::SUCCESS)
        }
        (Err(e), false) => Err(e.context(format!("{verb} {rp} failed"))),
    }
}

/// Whether a node answers on the state dir's admin socket.
pub(crate) fn node_running(state_dir: &Path) -> anyhow::Result<bool> {
    let socket = state_dir.join(SOCKET_FILE);
    match UnixStream::connect(&socket) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => Ok(false),
        Err(e) => bail!("cannot reach the admin socket {}: {e}", socket.display()),
    }
}

fn through_node(args: &RpArgs, request: Request, view: &mut ProgressView) -> anyhow::Result<Value> {
    let response = request_with_progress(&args.state_dir.join(SOCKET_FILE), &request, |p| view.update_json(p))?;
    if !response.ok {
        bail!("{}", response.error.unwrap_or_default());
    }
    Ok(response.data.unwrap_or_default())
}

/// The topology for a restore without a node: `--topology`, else the one the node noted.
pub(crate) fn offline_topology(args: &RpArgs) -> anyhow::Result<Option<Topology>> {
    let path = match &args.topology {
        Some(p) => Some(p.clone()),
        None => std::fs::read(args.state_dir.join(TOPOLOGY_NOTE)).ok().map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned())),
    };
    let Some(path) = path else { return Ok(None) };
    match Topology::load(&path) {
        Ok(t) => Ok(Some(t)),
        Err(diagnostics) => {
            let lines: Vec<String> = diagnostics.lines();
            bail!("topology file {} is not valid:\n{}", path.display(), lines.join("\n"))
        }
    }
}

/// The codec that reads `volume`'s RP without a node: no key for an unencrypted
/// RP; `--key-file`, else the policy's key file from the topology.
pub(crate) fn offline_codec(args: &RpArgs, topology: Option<&Topology>, volume: &str, encrypted: bool) -> anyhow::Result<BlockCodec> {
    if !encrypted {
        return Ok(BlockCodec::new(None, None));
    }
    if let Some(file) = &args.key_file {
        let key = drmesh_topology::read_key_file(file).map_err(anyhow::Error::msg)?;
        return Ok(BlockCodec::new(None, Some(key.as_bytes())));
    }
    let Some(topology) = topology else {
        bail!("{volume}'s recovery points are encrypted: give --key-file, or --topology naming the policy's encryption_key_file");
    };
    let vol = topology.volumes.iter().find(|v| v.name == volume).with_context(|| format!("volume {volume} is not in the topology; give --key-file"))?;
    let policy = topology.policies.get(&vol.policy).with_context(|| format!("policy {} is not in the topology", vol.policy))?;
    policy_codec(policy).map_err(|e| anyhow::anyhow!("reading {volume} needs the policy's key file: {e}"))
}

/// What a restore in this process may overwrite: the sources of the volumes that
/// the node of `state_dir` protects in `topology` are refused (none known
/// without a topology).
pub(crate) fn local_rules(state_dir: &Path, topology: Option<&Topology>, force: bool) -> Rules {
    let me = drmesh_transport::Identity::load(state_dir).ok().and_then(|id| topology.and_then(|t| t.node_by_id(&id.node_id()).map(|n| n.name.clone())));
    match (topology, me) {
        (Some(t), Some(me)) => Rules::for_node(t, &me, force),
        _ => Rules { force, protected: Vec::new() },
    }
}

/// Restores `volume@seq` to a qcow2 file: the RP is exported read-only (its
/// block map checked against the Merkle root, every block verified as served)
/// and `qemu-img convert` reads it into a private folder beside the
/// destination; the file gets mode 0600 and its name only when qemu-img succeeded.
fn restore_qcow2(args: &RpArgs, volume: &VolumeName, seq: Option<RpSeq>, to: &Path, force: bool, view: &mut ProgressView) -> anyhow::Result<Value> {
    let started = Instant::now();
    let rules = local_rules(&args.state_dir, offline_topology(args).ok().flatten().as_ref(), force);
    let journal = Journal::new(&args.state_dir);
    journal.clean();
    let staged = StagedFile::new(to, &rules, Some(&journal))?;
    let request = crate::export::ExportRequest { volume: volume.clone(), seq, from: args.from.clone(), socket: None, listen: None, overlay: None, read_only: true };
    let served = crate::export::serve(args, &request)?;
    let info = served.info().clone();
    let size = info["size_bytes"].as_u64().unwrap_or(0);
    let mut child = std::process::Command::new("qemu-img")
        .args(["convert", "-p", "-f", "raw", "-O", "qcow2", "-m", "8", "-W"])
        .arg(info["uri"].as_str().unwrap_or(""))
        .arg(staged.inner_path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| if e.kind() == ErrorKind::NotFound { anyhow::anyhow!("qemu-img is not installed (Debian package qemu-utils); it writes qcow2") } else { e.into() })?;
    // qemu-img -p prints "    (12.34/100%)" with carriage returns.
    if let Some(out) = child.stdout.take() {
        let mut word = Vec::new();
        for byte in std::io::Read::bytes(out).map_while(Result::ok) {
            if byte == b'\r' || byte == b'\n' {
                let text = String::from_utf8_lossy(&word).trim().trim_start_matches('(').to_string();
                if let Some(pct) = text.split('/').next().and_then(|p| p.parse::<f64>().ok()) {
                    view.update(ProgressSnapshot { phase: "restoring", done_bytes: (size as f64 * pct / 100.0) as u64, total_bytes: size });
                }
                word.clear();
            } else {
                word.push(byte);
            }
        }
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("qemu-img convert failed (a block that cannot be read or verified fails it; the node's log names it): {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    drop(served);
    let path = staged.finish()?;
    let duration_secs = started.elapsed().as_secs_f64();
    Ok(json!({
        "rp": info["rp"],
        "blocks": info["rp"]["block_count"],
        "zero_blocks": Value::Null,
        "payload_bytes": Value::Null,
        "duration_secs": duration_secs,
        "rate_bytes_per_sec": size as f64 / duration_secs.max(1e-9),
        "output": path,
        "output_kind": "qcow2",
    }))
}

/// Restores (`to` Some) or verifies straight from the state dir's store.
fn offline(args: &RpArgs, volume: &VolumeName, seq: Option<RpSeq>, to: Option<(PathBuf, bool)>, view: &mut ProgressView) -> anyhow::Result<Value> {
    let store = Arc::new(Store::open_read_only(&args.state_dir.join("store"))?);
    let topology = offline_topology(args)?;
    let encrypted = match seq {
        Some(s) => store.rp(volume, s)?,
        None => store.latest_rp(volume)?,
    }
    .map(|m| m.encrypted)
    .unwrap_or(false);
    let codec = offline_codec(args, topology.as_ref(), volume, encrypted)?;
    let target = to.map(|(path, force)| Target { path, rules: local_rules(&args.state_dir, topology.as_ref(), force), journal: Some(Journal::new(&args.state_dir)) });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let progress = Arc::new(Progress::default());
    let report: RestoreReport = runtime.block_on(async {
        let mut source = RpSource::Local(store);
        let work = run_restore(&mut source, volume, seq, &codec, target.as_ref(), &progress);
        tokio::pin!(work);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                result = &mut work => break result,
                _ = tick.tick() => view.update(progress.snapshot()),
            }
        }
    })?;
    Ok(serde_json::to_value(report)?)
}

fn run(args: &RpArgs, to: Option<(PathBuf, bool)>, verb: &'static str) -> anyhow::Result<ExitCode> {
    let mut view = ProgressView::new(args.json, verb, &args.rp);
    let result = (|| {
        let (volume, seq) = parse_rp(&args.rp)?;
        if args.offline || !node_running(&args.state_dir)? {
            if args.from.is_some() {
                bail!("--from reads over the mesh and needs a node running on {}", args.state_dir.display());
            }
            if !args.json {
                eprintln!("no node answers on {}: reading its store directly (read-only)", args.state_dir.display());
            }
            return offline(args, &volume, seq, to, &mut view);
        }
        let request = match to {
            Some((to, force)) => Request::Restore { volume: volume.clone(), seq, to, from: args.from.clone(), force },
            None => Request::Verify { volume: volume.clone(), seq, from: args.from.clone() },
        };
        through_node(args, request, &mut view)
    })();
    conclude(view, verb, &args.rp, result)
}

/// Runs `drmesh restore`.
pub fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let to = std::path::absolute(&args.to).with_context(|| format!("resolving {}", args.to.display()))?;
    let qcow2 = match args.format.as_deref() {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => bail!("--format {other}: expected raw or qcow2"),
        None => to.extension().is_some_and(|e| e == "qcow2"),
    };
    if qcow2 {
        let (volume, seq) = parse_rp(&args.rp.rp)?;
        let mut view = ProgressView::new(args.rp.json, "restore", &args.rp.rp);
        let result = restore_qcow2(&args.rp, &volume, seq, &to, args.force, &mut view);
        return conclude(view, "restore", &args.rp.rp, result);
    }
    run(&args.rp, Some((to, args.force)), "restore")
}

/// Runs `drmesh verify`.
pub fn verify(args: RpArgs) -> anyhow::Result<ExitCode> {
    run(&args, None, "verify")
}

//! Topology hot reload: on a change of the file (notify) or `drmesh ctl reload`,
//! the file is read and validated in full before any of it is applied. A bad
//! edit is rejected with one log line (the error count and the first errors)
//! and its first errors kept for the admin socket, and the node keeps running
//! on the last good topology.
//!
//! What a reload keeps and logs is bounded, whatever the file: a file over
//! `MAX_TOPOLOGY_BYTES` is refused unread, at most `MAX_DIAGNOSTICS` errors (and
//! a count of the rest) are kept, and one line is logged per rejected reload.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use drmesh_actors::actor::applier::DataPlane;
use drmesh_actors::actor::mesh::{ApplyTopology, MeshActor};
use drmesh_actors::actor::volumes::{SetTopology, VolumeScheduler};
use drmesh_topology::{NodeId, Topology, TopologyDiff, MAX_DIAGNOSTICS};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use serde::Serialize;

/// Editors write a file in several steps; wait this long after the last event.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Errors or changes quoted in the one log line of a reload.
const LOGGED_LINES: usize = 3;

/// What asked for a reload.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadTrigger {
    /// The file changed on disk.
    File,
    /// `drmesh ctl reload`.
    Admin,
}

/// A successful reload (or a check that found the file unchanged).
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    /// Whether a new topology was applied.
    pub changed: bool,
    /// `[mesh] version` now in force.
    pub topology_version: u64,
    /// Short hash of the file now in force.
    pub topology_hash: String,
    /// What changed, one line per item.
    pub summary: Vec<String>,
}

/// A rejected reload; the previous topology stays in force.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadFailure {
    /// One-line reason.
    pub error: String,
    /// The first errors (at most `MAX_DIAGNOSTICS`), `file:line:column: message`,
    /// then `... and N more errors` if there were more.
    pub details: Vec<String>,
}

/// The last reload attempt, as shown by `drmesh ctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct LastReload {
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// What asked for it.
    pub trigger: ReloadTrigger,
    /// Whether it was applied (or the file was unchanged).
    pub ok: bool,
    /// One-line outcome.
    pub message: String,
    /// Errors or changes, one per line: at most `MAX_DIAGNOSTICS`, then a
    /// line saying how many more there were.
    pub details: Vec<String>,
}

/// Keeps the topology in force and reloads it.
pub struct Reloader {
    path: PathBuf,
    local: NodeId,
    current: Arc<Topology>,
    mesh: Addr<MeshActor>,
    scheduler: Addr<VolumeScheduler>,
    data: Arc<DataPlane>,
    last: Option<LastReload>,
    debounce: Option<SpawnHandle>,
    watcher: Option<RecommendedWatcher>,
}

impl Reloader {
    /// A reloader for `current`, read from `path`, applying to the mesh, the scheduler and the data plane.
    pub fn new(
        path: PathBuf,
        local: NodeId,
        current: Arc<Topology>,
        mesh: Addr<MeshActor>,
        scheduler: Addr<VolumeScheduler>,
        data: Arc<DataPlane>,
    ) -> Self {
        Reloader { path, local, current, mesh, scheduler, data, last: None, debounce: None, watcher: None }
    }

    fn reload(&mut self, trigger: ReloadTrigger) -> Result<ReloadOutcome, ReloadFailure> {
        let result = self.try_reload();
        let at_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).ok().and_then(|d| u64::try_from(d.as_millis()).ok()).unwrap_or(0);
        match &result {
            Ok(outcome) if outcome.changed => {
                let (count, first_changes) = (outcome.summary.len(), head(&outcome.summary));
                tracing::info!(version = outcome.topology_version, hash = %outcome.topology_hash, changes = count, %first_changes, "topology reloaded");
            }
            Ok(_) => tracing::debug!("topology file unchanged"),
            Err(failure) => {
                // One line per rejected reload, however many errors: `drmesh ctl status` lists more.
                let first_errors = head(&failure.details);
                tracing::error!(error = %failure.error, %first_errors, "topology edit rejected; keeping the last good topology");
            }
        }
        if result.is_err() {
            release_freed_memory();
        }
        // An unchanged file after a file event is noise; keep the previous record.
        if !matches!((&result, trigger), (Ok(o), ReloadTrigger::File) if !o.changed) {
            self.last = Some(match &result {
                Ok(o) => LastReload {
                    at_unix_ms,
                    trigger,
                    ok: true,
                    message: if o.changed { format!("applied version {}", o.topology_version) } else { "unchanged".into() },
                    details: capped(&o.summary, "changes"),
                },
                Err(f) => LastReload { at_unix_ms, trigger, ok: false, message: f.error.clone(), details: capped(&f.details, "errors") },
            });
        }
        result
    }

    fn try_reload(&mut self) -> Result<ReloadOutcome, ReloadFailure> {
        let new = Topology::load_for(&self.path, Some(&self.local)).map_err(|diagnostics| ReloadFailure {
            error: format!(
                "{} has {} error(s); the node keeps running on version {} (hash {})",
                self.path.display(),
                diagnostics.len(),
                self.current.mesh.version,
                self.current.hash_short()
            ),
            details: diagnostics.lines(),
        })?;
        if new.hash() == self.current.hash() {
            return Ok(ReloadOutcome {
                changed: false,
                topology_version: new.mesh.version,
                topology_hash: new.hash_short(),
                summary: vec![],
            });
        }
        if new.node_by_id(&self.local).is_none() {
            return Err(ReloadFailure {
                error: format!("the new topology does not list this node ({}); keeping version {}", self.local, self.current.mesh.version),
                details: vec![],
            });
        }
        let diff = TopologyDiff::between(&self.current, &new);
        let mut summary = describe(&diff, &self.current, &new);
        if new.mesh.version <= self.current.mesh.version {
            summary.push(format!(
                "warning: [mesh] version is {} but was {}; bump it on every edit so nodes can tell files apart",
                new.mesh.version, self.current.mesh.version
            ));
        }
        let new = Arc::new(new);
        self.mesh.do_send(ApplyTopology(new.clone()));
        self.scheduler.do_send(SetTopology(new.clone()));
        self.data.set_topology(new.clone());
        self.current = new;
        Ok(ReloadOutcome {
            changed: true,
            topology_version: self.current.mesh.version,
            topology_hash: self.current.hash_short(),
            summary,
        })
    }

    fn watch(&mut self, ctx: &mut Context<Self>) -> notify::Result<()> {
        // Watch the directory: editors often replace the file by renaming a new one over it.
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self.path.file_name().map(|n| n.to_os_string());
        let me = ctx.address();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() {
                return;
            }
            if event.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name) {
                me.do_send(FileEvent);
            }
        })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        self.watcher = Some(watcher);
        Ok(())
    }
}

/// Gives memory freed by a rejected parse back to the system. A file just
/// under the size limit takes a few hundred MB to parse, in many small
/// allocations that glibc's malloc would otherwise keep in the node for good.
fn release_freed_memory() {
    drmesh_actors::memory::give_back_freed();
}

/// The first `LOGGED_LINES` of `lines` on one line (`" | ..."` when there are more).
fn head(lines: &[String]) -> String {
    let mut text = lines.iter().take(LOGGED_LINES).map(String::as_str).collect::<Vec<_>>().join(" | ");
    if lines.len() > LOGGED_LINES {
        text.push_str(" | ...");
    }
    text
}

/// At most `MAX_DIAGNOSTICS + 1` of `lines`: the first ones and a count of the
/// rest, so what the reloader keeps does not grow with the file.
fn capped(lines: &[String], what: &str) -> Vec<String> {
    if lines.len() <= MAX_DIAGNOSTICS + 1 {
        return lines.to_vec();
    }
    let mut kept = lines[..MAX_DIAGNOSTICS].to_vec();
    kept.push(format!("... and {} more {what}", lines.len() - MAX_DIAGNOSTICS));
    kept
}

fn describe(diff: &TopologyDiff, old: &Topology, new: &Topology) -> Vec<String> {
    // Maps, not `node_by_id` per line: a reload may add thousands of nodes.
    let names = |t: &Topology| -> HashMap<NodeId, String> { t.nodes.iter().map(|n| (n.id, n.name.clone())).collect() };
    let (old_names, new_names) = (names(old), names(new));
    let name = |names: &HashMap<NodeId, String>, id: &NodeId| names.get(id).cloned().unwrap_or_else(|| id.short());
    let mut lines = Vec::new();
    for id in &diff.added_nodes {
        lines.push(format!("node added: {}", name(&new_names, id)));
    }
    for id in &diff.removed_nodes {
        lines.push(format!("node removed: {}", name(&old_names, id)));
    }
    for id in &diff.changed_nodes {
        lines.push(format!("node changed: {}", name(&new_names, id)));
    }
    for v in &diff.added_volumes {
        lines.push(format!("volume added: {v}"));
    }
    for v in &diff.removed_volumes {
        lines.push(format!("volume removed: {v}"));
    }
    for v in &diff.changed_volumes {
        lines.push(format!("volume changed: {v}"));
    }
    for p in &diff.changed_policies {
        lines.push(format!("policy changed: {p}"));
    }
    for l in &diff.changed_links {
        lines.push(format!("link changed: {l}"));
    }
    for g in &diff.changed_groups {
        lines.push(format!("consistency group changed: {g}"));
    }
    for p in &diff.changed_platforms {
        lines.push(format!("platform changed: {p}"));
    }
    for site in &diff.changed_sites {
        let uplink = |t: &Topology| t.sites.iter().find(|s| &s.name == site).map(|s| s.uplink_bps);
        let show = |u: Option<Option<u64>>| match u {
            None => "absent".to_string(),
            Some(None) => "no uplink".to_string(),
            Some(Some(bps)) => format!("uplink {bps} bit/s"),
        };
        lines.push(format!("site changed: {site} ({} -> {})", show(uplink(old)), show(uplink(new))));
    }
    if old.mesh.version != new.mesh.version {
        lines.push(format!("mesh version {} -> {}", old.mesh.version, new.mesh.version));
    }
    lines
}

impl Actor for Reloader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Err(e) = self.watch(ctx) {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot watch the topology file; use `drmesh ctl reload` after edits");
        }
    }
}

/// Re-read the topology now.
#[derive(Message)]
#[rtype(result = "Result<ReloadOutcome, ReloadFailure>")]
pub struct Reload(pub ReloadTrigger);

impl Handler<Reload> for Reloader {
    type Result = Result<ReloadOutcome, ReloadFailure>;

    fn handle(&mut self, msg: Reload, _ctx: &mut Context<Self>) -> Self::Result {
        self.reload(msg.0)
    }
}

/// The file changed on disk (sent by the watcher thread).
#[derive(Message)]
#[rtype(result = "()")]
struct FileEvent;

impl Handler<FileEvent> for Reloader {
    type Result = ();

    fn handle(&mut self, _msg: FileEvent, ctx: &mut Context<Self>) {
        // Restart the quiet period on every event, so the reload reads the finished file.
        if let Some(handle) = self.debounce.take() {
            ctx.cancel_future(handle);
        }
        self.debounce = Some(ctx.run_later(DEBOUNCE, |act, _ctx| {
            act.debounce = None;
            let _ = act.reload(ReloadTrigger::File);
        }));
    }
}

/// Asks for the last reload's outcome.
#[derive(Message)]
#[rtype(result = "Option<LastReload>")]
pub struct GetLastReload;

impl Handler<GetLastReload> for Reloader {
    type Result = Option<LastReload>;

    fn handle(&mut self, _msg: GetLastReload, _ctx: &mut Context<Self>) -> Self::Result {
        self.last.clone()
    }
}

/// The path as given, made absolute so the watcher and messages agree after a `cd`.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Loads the topology file at `path` (absolute) for node `me`, its errors
/// listed with file:line:column in one message (the first `MAX_DIAGNOSTICS`,
/// then how many more).
pub fn load_topology(path: &Path, me: &NodeId) -> anyhow::Result<Topology> {
    Topology::load_for(path, Some(me)).map_err(|diagnostics| {
        anyhow::anyhow!("topology file {} is not valid:\n{}", path.display(), diagnostics.lines().join("\n"))
    })
}

//! Admin commands of the data plane: sync-now, volumes, rps, gc, restore, verify, store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drmesh_actors::actor::fetch::{FetchClient, FetchReply, FetchRequest};
use drmesh_actors::actor::mesh::GetConnection;
use drmesh_actors::actor::volumes::{policy_codec, GetAgentStatus, GetReplications, Pause, Resume, SyncNow, VolumeSelection};
use drmesh_actors::blob::{RpSeq, VolumeName};
use drmesh_actors::codec::BlockCodec;
use drmesh_actors::export::fetcher::Connect;
use drmesh_actors::export::{open_disk, start as start_export};
use drmesh_actors::restore::{restore, Journal, Progress, RpSource, Rules, Target};

use crate::export::ExportRequest;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::admin::{AdminContext, Request};

/// Default grace window of `ctl gc`: blobs younger than this are kept.
pub(crate) const DEFAULT_GC_GRACE: Duration = Duration::from_secs(60);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())
}

/// Handles the data-plane requests of the admin socket.
pub async fn handle(request: Request, ctx: &AdminContext, progress: mpsc::Sender<Value>) -> Result<Value, String> {
    let store = ctx.data.store().clone();
    match request {
        Request::SyncNow { volume } => {
            // Progress lines, once a second, while the cycles run.
            let cycles = ctx.scheduler.send(SyncNow(volume.clone()));
            tokio::pin!(cycles);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let results = loop {
                tokio::select! {
                    r = &mut cycles => break r.map_err(|e| e.to_string())??,
                    _ = tick.tick() => {
                        let Ok(list) = ctx.scheduler.send(GetReplications).await else { continue };
                        let running: Vec<Value> = list
                            .into_iter()
                            .filter(|r| r.volume == volume)
                            .filter_map(|r| r.running_progress.map(|p| json!({ "target": r.target, "progress": p })))
                            .collect();
                        if !running.is_empty() {
                            let _ = progress.try_send(json!({ "sync": { "volume": volume, "targets": running } }));
                        }
                    }
                }
            };
            let mut reports = Vec::new();
            let mut errors = Vec::new();
            for r in results {
                match r {
                    Ok(report) => reports.push(report),
                    Err(e) => errors.push(e),
                }
            }
            if reports.is_empty() {
                return Err(format!("sync of {volume} failed: {}", errors.join("; ")));
            }
            Ok(json!({ "reports": reports, "errors": errors }))
        }
        Request::AgentStatus => {
            let devices = ctx.scheduler.send(GetAgentStatus).await.map_err(|e| e.to_string())??;
            Ok(serde_json::to_value(devices).map_err(|e| e.to_string())?)
        }
        Request::Volumes => Ok(serde_json::to_value(ctx.scheduler.send(GetReplications).await.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?),
        Request::Pause { volumes, all } => {
            let outcome = ctx.scheduler.send(Pause(selection(volumes, all)?)).await.map_err(|e| e.to_string())??;
            Ok(serde_json::to_value(outcome).map_err(|e| e.to_string())?)
        }
        Request::Resume { volumes, all } => {
            let outcome = ctx.scheduler.send(Resume(selection(volumes, all)?)).await.map_err(|e| e.to_string())??;
            Ok(serde_json::to_value(outcome).map_err(|e| e.to_string())?)
        }
        Request::Rps { volume } => {
            let rps = blocking(move || -> Result<Vec<_>, String> {
                let volumes = match volume {
                    Some(v) => vec![v],
                    None => store.volumes().map_err(|e| e.to_string())?,
                };
                let mut all = Vec::new();
                for v in volumes {
                    let drills = store.latest_drills(&v).map_err(|e| e.to_string())?;
                    let good = drills.iter().rev().find(|(_, r)| r.verified).map(|(seq, _)| *seq);
                    for meta in store.rps(&v).map_err(|e| e.to_string())? {
                        let mut row = serde_json::to_value(&meta).map_err(|e| e.to_string())?;
                        // The newest report, without its output tails (`ctl drills` has them).
                        let drill = drills.get(&meta.seq).map(|r| {
                            let mut r = r.clone();
                            for c in &mut r.checks {
                                c.output.clear();
                            }
                            r
                        });
                        row["drill"] = serde_json::to_value(drill).map_err(|e| e.to_string())?;
                        row["last_known_good"] = json!(good == Some(meta.seq));
                        all.push(row);
                    }
                }
                Ok(all)
            })
            .await??;
            Ok(serde_json::to_value(rps).map_err(|e| e.to_string())?)
        }
        Request::Groups { group } => {
            let groups = blocking(move || -> Result<Vec<_>, String> {
                let mut rps = Vec::new();
                for v in store.volumes().map_err(|e| e.to_string())? {
                    rps.extend(store.rps(&v).map_err(|e| e.to_string())?.into_iter().filter(|r| r.group.is_some()));
                }
                let mut groups = drmesh_actors::store::group_rps(&rps);
                if let Some(name) = &group {
                    groups.retain(|g| g.group == *name);
                }
                Ok(groups)
            })
            .await??;
            Ok(serde_json::to_value(groups).map_err(|e| e.to_string())?)
        }
        Request::Gc { grace_secs, dry_run } => {
            let grace = grace_secs.map_or(DEFAULT_GC_GRACE, Duration::from_secs);
            // Progress lines `{"gc": {phase, done, total}}`, at most one a second.
            let tx = progress.clone();
            let report = blocking(move || {
                let mut last: Option<std::time::Instant> = None;
                store.gc_with_progress(grace, dry_run, &mut |p| {
                    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        last = Some(std::time::Instant::now());
                        let _ = tx.try_send(json!({ "gc": p }));
                    }
                })
            })
            .await?
            .map_err(|e| e.to_string())?;
            if !dry_run {
                tracing::info!(deleted = report.blobs_deleted, freed = report.bytes_freed, "garbage collection done");
            }
            Ok(serde_json::to_value(report).map_err(|e| e.to_string())?)
        }
        Request::Scrub { sample_percent } => {
            let percent = sample_percent.unwrap_or(100);
            if !(1..=100).contains(&percent) {
                return Err(format!("scrub sample {percent}% is out of range: give 1% to 100%"));
            }
            let report = crate::scrub::scrub_and_repair(ctx.data.clone(), ctx.mesh.clone(), ctx.gossip.clone(), f64::from(percent) / 100.0, "asked for", Some(progress.clone())).await?;
            Ok(serde_json::to_value(report).map_err(|e| e.to_string())?)
        }
        Request::Scrubs { volume } => Ok(serde_json::to_value(blocking(move || store.scrubs(volume.as_deref())).await?.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?),
        Request::Retention { volume, topology } => retention_plan(ctx, volume, topology).await,
        Request::Store => Ok(serde_json::to_value(blocking(move || store.stats()).await?.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?),
        Request::Restore { volume, seq, to, from, force } => {
            if !to.is_absolute() {
                return Err(format!("restore destination {} must be an absolute path", to.display()));
            }
            let topology = ctx.data.topology();
            let me = topology.node_by_id(&ctx.data.local()).map(|n| n.name.clone()).unwrap_or_default();
            let target = Target { path: to, rules: Rules::for_node(&topology, &me, force), journal: Some(Journal::new(&ctx.state_dir)) };
            let report = read_rp(ctx, &volume, seq, from, Some(&target), progress).await?;
            Ok(serde_json::to_value(report).map_err(|e| e.to_string())?)
        }
        Request::Export { volume, seq, from, socket, listen, overlay, read_only } => {
            let request = ExportRequest { volume, seq, from, socket, listen, overlay, read_only };
            serve_export(ctx, request, progress).await
        }
        Request::Verify { volume, seq, from } => {
            let report = read_rp(ctx, &volume, seq, from, None, progress).await?;
            Ok(serde_json::to_value(report).map_err(|e| e.to_string())?)
        }
        Request::Drill { volume, seq, checks } => {
            let runner = crate::drill::runner::RequestDrill { volume, seq, checks, progress: progress.clone() };
            let (position, done) = ctx.drills.send(runner).await.map_err(|e| e.to_string())??;
            if position > 0 {
                let _ = progress.send(json!({ "queued": position })).await;
            }
            let report = done.await.map_err(|_| "the node stopped before the drill ended".to_string())??;
            Ok(serde_json::to_value(report).map_err(|e| e.to_string())?)
        }
        Request::Drills { volume } => ctx.drills.send(crate::drill::runner::GetDrills(volume)).await.map_err(|e| e.to_string())?,
        Request::Status | Request::Peers | Request::Reload => Err("not a data-plane command".into()),
    }
}

/// The volumes of a pause or resume: named ones, or `all`, not both.
fn selection(volumes: Vec<VolumeName>, all: bool) -> Result<VolumeSelection, String> {
    match (all, volumes.is_empty()) {
        (true, true) => Ok(VolumeSelection::All),
        (true, false) => Err("give volume names or `all`, not both".into()),
        (false, true) => Err("name a volume, or give `all`".into()),
        (false, false) => Ok(VolumeSelection::Named(volumes)),
    }
}

/// How often a running restore or verify reports progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Where an RP's blocks come from on this node: its own store when it holds the
/// RP (and no other node was named), else the first reachable of the named node
/// or the volume's other targets. For a remote source, the holder's name and a
/// connector to the others (for an export that must survive a holder's loss).
async fn rp_source(ctx: &AdminContext, volume: &VolumeName, seq: Option<RpSeq>, from: Option<String>) -> Result<(RpSource, Option<(String, Connect)>), String> {
    let topology = ctx.data.topology();
    let vol = topology.volumes.iter().find(|v| v.name == *volume).ok_or_else(|| format!("volume {volume} is not in the topology"))?;
    let me = topology.node_by_id(&ctx.data.local()).map(|n| n.name.clone()).unwrap_or_default();
    let store = ctx.data.store().clone();
    let (v, s) = (volume.to_string(), seq);
    let held_here = blocking(move || match s {
        Some(seq) => store.rp(&v, seq).map(|r| r.is_some()),
        None => store.latest_rp(&v).map(|r| r.is_some()),
    })
    .await?
    .map_err(|e| e.to_string())?;
    let rp_name = format!("{volume}@{}", seq.map_or("latest".to_string(), |s| s.to_string()));
    let candidates = remote_holders(&me, &vol.targets, from.as_deref(), held_here);
    if candidates.is_empty() && held_here {
        return Ok((RpSource::Local(ctx.data.store().clone()), None));
    }
    let mut tried = Vec::new();
    if !candidates.is_empty() {
        let mesh = ctx.mesh.clone();
        let holders = Arc::new(candidates.clone());
        let connect: Connect = Arc::new(move |i: usize| {
            let (mesh, holders) = (mesh.clone(), holders.clone());
            Box::pin(async move {
                let name = holders.get(i)?.clone();
                let opened = match mesh.send(GetConnection(name.clone())).await {
                    Ok(Some((_, conn))) => FetchClient::open(&conn).await,
                    Ok(None) => Err("not connected".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                Some((name, opened))
            })
        });
        for (i, node) in candidates.iter().enumerate() {
            match connect(i).await {
                // A holder that lacks the RP is no source; the next one may have it.
                Some((name, Ok(mut client))) => match ask_for_rp(&mut client, volume, seq).await {
                    Ok(()) => return Ok((RpSource::Remote(client), Some((name, connect.clone())))),
                    Err(why) => tried.push(Tried { name, why, reached: true }),
                },
                Some((name, Err(why))) => tried.push(Tried { name, why, reached: false }),
                None => tried.push(Tried { name: node.clone(), why: "not connected".into(), reached: false }),
            }
        }
    }
    let here = if held_here {
        LocalHoldings::Rp
    } else {
        // Only on this error path: what the node holds instead, so the message can say.
        let (store, v) = (ctx.data.store().clone(), volume.to_string());
        let rps = blocking(move || store.rps(&v)).await?.map_err(|e| e.to_string())?;
        match (rps.iter().map(|r| r.seq).min(), rps.iter().map(|r| r.seq).max()) {
            (Some(first), Some(last)) => LocalHoldings::Others { first, last },
            _ => LocalHoldings::Nothing,
        }
    };
    Err(no_source_message(&rp_name, volume, &me, &here, from.as_deref(), &tried))
}

/// Asks a holder for the RP on a fresh fetch stream; `Err` says why it cannot
/// serve it. The restore or export asks again on the same stream.
async fn ask_for_rp(client: &mut FetchClient, volume: &VolumeName, seq: Option<RpSeq>) -> Result<(), String> {
    client.request(&FetchRequest::Rp { volume: volume.clone(), seq }).await?;
    match client.reply().await? {
        FetchReply::Rp(_) => Ok(()),
        FetchReply::Error(e) => Err(e),
        _ => Err("it answered out of turn".to_string()),
    }
}

/// A holder asked for an RP that could not serve it.
#[derive(Debug, Clone)]
struct Tried {
    /// Its node name.
    name: String,
    /// Why: its own answer, or why it could not be reached.
    why: String,
    /// Whether it answered (it was reachable, but lacks the RP).
    reached: bool,
}

/// What this node's store holds of the volume an RP was asked of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalHoldings {
    /// The RP asked for.
    Rp,
    /// Other RPs of the volume, seqs `first..=last`, but not the one asked for.
    Others { first: RpSeq, last: RpSeq },
    /// No RP of the volume at all.
    Nothing,
}

/// The holders to ask over the mesh, in order: the node named by `--from`, or,
/// when this node lacks the RP, the volume's other targets. Never this node
/// (`me`): its own store is read directly, never through the mesh.
fn remote_holders(me: &str, targets: &[String], from: Option<&str>, held_here: bool) -> Vec<String> {
    match from {
        Some(node) if node == me => Vec::new(),
        Some(node) => vec![node.to_string()],
        None if held_here => Vec::new(),
        None => targets.iter().filter(|t| *t != me).cloned().collect(),
    }
}

/// Why no node can serve `rp_name` (of `volume`): what this node (`me`) holds,
/// then the other holders `tried` and why each could not (unreachable, or
/// without that RP). This node is never named as an unreachable holder: what
/// it holds is said plainly instead.
fn no_source_message(rp_name: &str, volume: &str, me: &str, here: &LocalHoldings, from: Option<&str>, tried: &[Tried]) -> String {
    let others: Vec<&Tried> = tried.iter().filter(|t| t.name != me).collect();
    let local = match here {
        LocalHoldings::Rp => format!("this node holds {rp_name} itself: leave out --from to read it here"),
        LocalHoldings::Others { first, last } => {
            let range = if first == last { format!("{volume}@{first} only") } else { format!("{volume}@{first}..{volume}@{last}") };
            format!("no such RP here (this node holds {range}; `drmesh ctl rps {volume}` lists them)")
        }
        LocalHoldings::Nothing => format!("this node holds no RP of {volume}"),
    };
    let remote = match (from, others.as_slice()) {
        // --from named this node (its store was the only place to look), or
        // named a node that was not even tried.
        (Some(_), []) => None,
        (None, []) => Some(format!("no other node holds {volume}")),
        (Some(_), [t, ..]) => Some(format!("{} (named by --from) cannot serve it: {}", t.name, t.why)),
        (None, list) => {
            let list: Vec<String> = list.iter().map(|t| format!("{} ({})", t.name, t.why)).collect();
            Some(format!("no other holder can serve it: {}", list.join(", ")))
        }
    };
    let hint = if others.iter().all(|t| t.reached) { "" } else { "; `drmesh ctl peers` shows the links" };
    match remote {
        None => format!("{rp_name}: {local}"),
        Some(remote) if *here == LocalHoldings::Rp => format!("{rp_name}: {remote}; {local}{hint}"),
        Some(remote) => format!("{rp_name}: {local}, and {remote}{hint}"),
    }
}

/// The codec of `volume`'s policy (its key file when the policy encrypts).
fn volume_codec(ctx: &AdminContext, volume: &str) -> Result<BlockCodec, String> {
    let topology = ctx.data.topology();
    let vol = topology.volumes.iter().find(|v| v.name == volume).ok_or_else(|| format!("volume {volume} is not in the topology"))?;
    let policy = topology.policies.get(&vol.policy).ok_or_else(|| format!("policy {} is not in the topology", vol.policy))?;
    policy_codec(policy).map_err(|e| format!("reading {volume} needs the policy's key file: {e}"))
}

/// Restores or verifies an RP from this node's store or from a peer that holds it.
async fn read_rp(
    ctx: &AdminContext,
    volume: &VolumeName,
    seq: Option<RpSeq>,
    from: Option<String>,
    target: Option<&Target>,
    progress: mpsc::Sender<Value>,
) -> Result<drmesh_actors::restore::RestoreReport, String> {
    let codec = volume_codec(ctx, volume)?;
    let (mut source, _) = rp_source(ctx, volume, seq, from).await?;
    let state = Arc::new(Progress::default());
    let work = restore(&mut source, volume, seq, &codec, target, &state);
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let report = loop {
        tokio::select! {
            result = &mut work => break result,
            _ = tick.tick() => {
                let _ = progress.try_send(json!(state.snapshot()));
            }
        }
    };
    report.map_err(|e| e.to_string())
}

/// Serves an RP over NBD until the admin client hangs up (this future is then dropped).
async fn serve_export(ctx: &AdminContext, request: ExportRequest, progress: mpsc::Sender<Value>) -> Result<Value, String> {
    let codec = volume_codec(ctx, &request.volume)?;
    let (source, failover) = rp_source(ctx, &request.volume, request.seq, request.from.clone()).await?;
    let exports_dir = crate::export::exports_dir(&ctx.state_dir).map_err(|e| e.to_string())?;
    let overlay = request.overlay_choice(&exports_dir);
    let disk = open_disk(source, &request.volume, request.seq, codec, &overlay, failover).await.map_err(|e| e.to_string())?;
    let endpoint = request.endpoint(&exports_dir, disk.name())?;
    let running = start_export(disk.clone(), endpoint).await.map_err(|e| e.to_string())?;
    let info = crate::export::describe(&disk, running.endpoint());
    tracing::info!(rp = %disk.name(), uri = %running.endpoint().uri(disk.name()), "export started");
    progress.send(json!({ "export": info })).await.map_err(|e| e.to_string())?;
    // Serves until the client hangs up; dropping `running` stops the server.
    std::future::pending::<()>().await;
    Ok(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn this_node_is_never_a_remote_holder() {
        let targets = names(&["b1", "b2", "b3"]);
        assert_eq!(remote_holders("b2", &targets, None, false), names(&["b1", "b3"]));
        assert!(remote_holders("b2", &targets, None, true).is_empty());
        assert!(remote_holders("b2", &targets, Some("b2"), false).is_empty());
        assert_eq!(remote_holders("b2", &targets, Some("b3"), true), names(&["b3"]));
    }

    fn tried(name: &str, why: &str, reached: bool) -> Tried {
        Tried { name: name.to_string(), why: why.to_string(), reached }
    }

    #[test]
    fn a_missing_seq_on_a_holder_is_said_plainly_without_naming_the_node() {
        let held = LocalHoldings::Others { first: RpSeq(1), last: RpSeq(7) };
        let down = vec![tried("b1", "not connected", false)];
        let lacking = vec![tried("b1", "no such recovery point there", true)];
        let cases = [
            // The report's case: b2 holds v2, the other target is down.
            (
                no_source_message("v2@999", "v2", "b2", &held, None, &down),
                vec!["no such RP here (this node holds v2@1..v2@7; `drmesh ctl rps v2` lists them)", "b1 (not connected)", "ctl peers"],
            ),
            // The other target is up but lacks it too.
            (no_source_message("v2@999", "v2", "b2", &held, None, &lacking), vec!["no such RP here", "no other holder can serve it: b1 (no such recovery point there)"]),
            // b2 is the only holder.
            (no_source_message("v2@999", "v2", "b2", &held, None, &[]), vec!["no such RP here", "no other node holds v2"]),
            // --from named b2 itself.
            (no_source_message("v2@999", "v2", "b2", &held, Some("b2"), &[]), vec!["no such RP here"]),
            // A tried list that somehow names this node still does not show it.
            (no_source_message("v2@999", "v2", "b2", &held, None, &[tried("b2", "not connected", false)]), vec!["no such RP here", "no other node holds v2"]),
            (no_source_message("v2@3", "v2", "b2", &LocalHoldings::Others { first: RpSeq(4), last: RpSeq(4) }, None, &[]), vec!["this node holds v2@4 only"]),
            (no_source_message("v2@latest", "v2", "b2", &LocalHoldings::Nothing, None, &down), vec!["this node holds no RP of v2", "no other holder can serve it: b1 (not connected)"]),
            (no_source_message("v2@5", "v2", "b2", &LocalHoldings::Rp, Some("b1"), &down), vec!["b1 (named by --from) cannot serve it: not connected", "leave out --from"]),
        ];
        for (message, wanted) in cases {
            assert!(message.starts_with("v2@"), "{message}");
            for w in wanted {
                assert!(message.contains(w), "{message:?} lacks {w:?}");
            }
            assert!(!message.contains("b2"), "the message names the node itself: {message}");
        }
        assert!(!no_source_message("v2@999", "v2", "b2", &held, None, &lacking).contains("ctl peers"), "every holder answered: no link to look at");
    }
}

/// One volume's retention dry run, as `drmesh ctl retention` shows it.
#[derive(serde::Serialize)]
struct VolumeRetention {
    volume: VolumeName,
    /// The policy judged by, or null when the topology has no such volume
    /// (its RPs are then kept: retention runs only at a commit).
    policy: Option<String>,
    keep_last: Option<u32>,
    hourly: Option<u32>,
    daily: Option<u32>,
    weekly: Option<u32>,
    coalesce_unchanged: Option<bool>,
    #[serde(flatten)]
    plan: drmesh_actors::store::RetentionPlan,
}

/// `retention`: for each volume held here (or one), the seqs retention keeps
/// and would delete now under the topology in force or the given file.
async fn retention_plan(ctx: &AdminContext, volume: Option<VolumeName>, topology: Option<PathBuf>) -> Result<Value, String> {
    let topology = match topology {
        None => ctx.data.topology(),
        Some(path) if !path.is_absolute() => return Err(format!("topology file {} must be an absolute path", path.display())),
        Some(path) => {
            let loaded = blocking(move || drmesh_topology::Topology::load(&path).map_err(|d| (path, d))).await?;
            match loaded {
                Ok(t) => Arc::new(t),
                Err((path, diagnostics)) => {
                    let lines = diagnostics.lines();
                    let first = lines.first().cloned().unwrap_or_default();
                    return Err(format!("{} is not a valid topology ({} errors; `drmesh topology check` lists them): {first}", path.display(), diagnostics.len()));
                }
            }
        }
    };
    let store = ctx.data.store().clone();
    let now = crate::drill::unix_ms();
    blocking(move || {
        let held = store.volumes().map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for name in held.into_iter().filter(|v| volume.as_ref().is_none_or(|w| w == v)) {
            let policy = topology.volumes.iter().find(|v| v.name == name).and_then(|v| topology.policies.get(&v.policy).map(|p| (v.policy.clone(), p.retention)));
            let row = match policy {
                Some((policy, r)) => {
                    let plan = store.prune_dry_run(&name, &drmesh_actors::actor::applier::retention_of(&r), now).map_err(|e| e.to_string())?;
                    VolumeRetention {
                        volume: name,
                        policy: Some(policy),
                        keep_last: Some(r.keep_last),
                        hourly: Some(r.hourly),
                        daily: Some(r.daily),
                        weekly: Some(r.weekly),
                        coalesce_unchanged: Some(r.coalesce_unchanged),
                        plan,
                    }
                }
                None => {
                    let kept = store.rps(&name).map_err(|e| e.to_string())?.iter().map(|m| m.seq).collect();
                    VolumeRetention {
                        volume: name,
                        policy: None,
                        keep_last: None,
                        hourly: None,
                        daily: None,
                        weekly: None,
                        coalesce_unchanged: None,
                        plan: drmesh_actors::store::RetentionPlan { kept, would_delete: vec![], kept_as_last_known_good: None },
                    }
                }
            };
            out.push(row);
        }
        serde_json::to_value(out).map_err(|e| e.to_string())
    })
    .await?
}

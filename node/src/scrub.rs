//! The node's scrubs and repairs: every `scrub_every` (a `[[node]]` key,
//! default weekly) the store is scrubbed at idle I/O priority, reading
//! `scrub_sample` of the blobs; `drmesh ctl scrub` runs one at once. A content
//! that a damaged RP cannot materialize is fetched again from another target of
//! the volume and stored; the RPs are then checked again and their verdicts kept.
//! An RP left damaged gets a failed `scrub` check in its drill reports, kept
//! with the RP and gossiped like a drill's verdict: every node's `ctl catalog`
//! shows it FAILED (scrub), and it no longer counts as verified.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use drmesh_actors::actor::applier::DataPlane;
use drmesh_actors::actor::fetch::{FetchClient, FetchReply, FetchRequest};
use drmesh_actors::actor::gossip::{GossipActor, PublishDrill, PublishScrub};
use drmesh_actors::blob::{RpSeq, VolumeName};
use drmesh_actors::proto::gossip::catalog::ScrubResult;
use drmesh_actors::drill::{CheckReport, DrillReport};
use drmesh_actors::actor::mesh::{GetConnection, MeshActor};
use drmesh_actors::content::ContentId;
use drmesh_actors::store::{RepairNeeds, ScrubKeys, ScrubOptions, ScrubReport};

/// The keys of the policies whose `encryption_key_file` this node can read,
/// with their volumes: a scrub checks encrypted blobs' AES-GCM tags with them.
/// A policy whose key file is not here (a target that never sees plaintext)
/// is left out; its blobs get their checksums checked only.
pub fn held_keys(topology: &drmesh_topology::Topology) -> ScrubKeys {
    let mut keys = ScrubKeys::default();
    for (name, policy) in &topology.policies {
        if policy.encryption_key_file.is_none() {
            continue;
        }
        match drmesh_actors::actor::volumes::policy_codec(policy) {
            Ok(codec) => {
                let volumes = topology.volumes.iter().filter(|v| v.policy == *name).map(|v| v.name.to_string());
                keys.add_policy(codec, volumes);
            }
            Err(e) => tracing::debug!(policy = %name, error = %e, "scrub: this policy's key is not held here; its blobs' tags are not checked"),
        }
    }
    keys
}

/// How often the scheduler looks whether a scrub is due.
const TICK: Duration = Duration::from_secs(5);

/// Scrubs the store with `share` of its blobs at low priority, repairs what
/// another holder can give, and logs the outcome.
/// `progress`, when given, gets `{"scrub": {blobs_read, blobs_total, bytes_read}}`
/// lines now and then (at most one a second).
pub async fn scrub_and_repair(
    data: Arc<DataPlane>,
    mesh: Addr<MeshActor>,
    gossip: Addr<GossipActor>,
    share: f64,
    why: &'static str,
    progress: Option<tokio::sync::mpsc::Sender<serde_json::Value>>,
) -> Result<ScrubReport, String> {
    tracing::info!(share, why, "scrub started");
    let started_ms = now_ms();
    let store = data.store().clone();
    let keys = held_keys(&data.topology());
    let scrub_keys = keys.clone();
    let mut report = tokio::task::spawn_blocking(move || {
        let stop = AtomicBool::new(false);
        let blobs_total = store.stats().map(|s| s.blob_count).unwrap_or(0);
        let last = std::sync::Mutex::new(Instant::now());
        let tell = |blobs_read: u64, bytes_read: u64| {
            let Some(tx) = &progress else { return };
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= Duration::from_secs(1) {
                *last = Instant::now();
                let _ = tx.try_send(serde_json::json!({ "scrub": { "blobs_read": blobs_read, "blobs_total": blobs_total, "bytes_read": bytes_read } }));
            }
        };
        store.scrub(ScrubOptions { share, threads: 2, low_priority: true, keys: scrub_keys }, &stop, &tell)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    for p in &report.problems {
        tracing::error!(object = %p.object, problem = %p.problem, "scrub found damage");
    }
    if !report.needs.contents.is_empty() {
        let (repaired, unrepairable) = repair(&data, &mesh, &report.needs, &keys).await;
        report.repaired = repaired;
        report.unrepairable = unrepairable;
        if repaired > 0 {
            let store = data.store().clone();
            let bad = report.needs.bad_blobs.clone();
            let keys = keys.clone();
            let verdicts = tokio::task::spawn_blocking(move || store.recheck_rps(&bad, &keys, share)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            report.rps_damaged = verdicts.iter().filter(|v| !v.ok).count() as u64;
            report.rps = verdicts;
        }
    }
    publish_damage(&data, &gossip, &report, started_ms).await;
    publish_results(&gossip, &report);
    if report.rps_damaged > 0 || report.blobs_bad > 0 {
        tracing::error!(
            blobs_read = report.blobs_read,
            blobs_bad = report.blobs_bad,
            repaired = report.repaired,
            unrepairable = report.unrepairable,
            rps_damaged = report.rps_damaged,
            "scrub done: damage found (`drmesh ctl scrubs` lists the RPs)"
        );
    } else {
        tracing::info!(blobs_read = report.blobs_read, bytes_read = report.bytes_read, rps = report.rps_checked, ms = report.duration_ms, "scrub done: every blob read and every RP sound");
    }
    Ok(report)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Each RP the scrub left damaged gets a drill report with one failed `scrub`
/// check (unless its newest report says so already): kept with the RP and
/// published by gossip, so every node sees it failed and not verified. An RP
/// whose newest report is such a failure and that is sound now (repaired) gets
/// a passed `scrub` check the same way.
async fn publish_damage(data: &Arc<DataPlane>, gossip: &Addr<GossipActor>, report: &ScrubReport, started_ms: u64) {
    let verdicts = report.rps.clone();
    let topology = data.topology();
    let me = topology.node_by_id(&data.local()).map(|n| n.name.clone()).unwrap_or_default();
    let store = data.store().clone();
    let reports = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for v in verdicts {
            let Some((volume, seq)) = v.rp.rsplit_once('@').and_then(|(vol, s)| Some((VolumeName::new(vol).ok()?, s.parse::<RpSeq>().ok()?))) else { continue };
            let summary = v.problem.clone().unwrap_or_else(|| "every blob of the RP read again and sound".into());
            let newest = store.latest_drills(&volume).ok().and_then(|d| d.get(&seq).cloned());
            let scrub_failed = newest.as_ref().is_some_and(|r| r.trigger == "scrub" && !r.passed);
            let publish = if v.ok { scrub_failed } else { !(scrub_failed && newest.as_ref().is_some_and(|r| r.checks.first().is_some_and(|c| c.summary == summary))) };
            if !publish {
                continue;
            }
            let drill = DrillReport {
                volume,
                seq,
                node: me.clone(),
                started_unix_ms: started_ms,
                finished_unix_ms: v.finished_unix_ms,
                software_version: env!("CARGO_PKG_VERSION").to_string(),
                trigger: "scrub".into(),
                checks: vec![CheckReport { check: "scrub".into(), passed: v.ok, summary, duration_ms: v.finished_unix_ms.saturating_sub(started_ms), output: String::new() }],
                passed: v.ok,
                verified: false,
                error: None,
            };
            match store.record_drill(&drill) {
                Ok(()) => out.push(drill),
                Err(e) => tracing::warn!(rp = %drill.rp(), error = %e, "cannot keep the scrub's verdict with the RP"),
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    for drill in reports {
        if drill.passed {
            tracing::info!(rp = %drill.rp(), "scrub: RP sound again; published as a passed scrub check");
        } else {
            tracing::error!(rp = %drill.rp(), "scrub: RP damaged beyond repair here; published as a failed scrub check");
        }
        gossip.do_send(PublishDrill(drill));
    }
}

/// Publishes what the scrub found, one result per volume (the range of seqs
/// it checked and the damaged ones): every node's catalog then shows each RP
/// of this holder sound or damaged by the scrub, and when.
fn publish_results(gossip: &Addr<GossipActor>, report: &ScrubReport) {
    let mut by_volume: BTreeMap<VolumeName, ScrubResult> = BTreeMap::new();
    let sample_percent = (report.share * 100.0).round().clamp(1.0, 100.0) as u8;
    for v in &report.rps {
        let Some((volume, seq)) = v.rp.rsplit_once('@').and_then(|(vol, s)| Some((VolumeName::new(vol).ok()?, s.parse::<RpSeq>().ok()?))) else { continue };
        let r = by_volume.entry(volume).or_insert(ScrubResult {
            finished_unix_ms: v.finished_unix_ms,
            sample_percent,
            first_seq: seq,
            last_seq: seq,
            damaged: Vec::new(),
            damaged_cut: false,
        });
        r.first_seq = r.first_seq.min(seq);
        r.last_seq = r.last_seq.max(seq);
        r.finished_unix_ms = r.finished_unix_ms.max(v.finished_unix_ms);
        if !v.ok {
            r.damaged.push(seq);
        }
    }
    for (volume, result) in by_volume {
        gossip.do_send(PublishScrub { volume, result });
    }
}

/// Fetches each content of `needs` from another target of its volume and
/// stores it. Returns (repaired, unrepairable).
async fn repair(data: &Arc<DataPlane>, mesh: &Addr<MeshActor>, needs: &RepairNeeds, keys: &ScrubKeys) -> (u64, u64) {
    let topology = data.topology();
    let me = topology.node_by_id(&data.local()).map(|n| n.name.clone()).unwrap_or_default();
    let mut by_volume: BTreeMap<VolumeName, Vec<ContentId>> = BTreeMap::new();
    for (volume, _, content) in &needs.contents {
        // The store's names keep the rule; a damaged row's cannot be asked for.
        let Ok(volume) = VolumeName::new(volume.as_str()) else { continue };
        by_volume.entry(volume).or_default().push(*content);
    }
    let (mut repaired, mut unrepairable) = (0, 0);
    // Files to rewrite even where they read back intact (a failed tag check).
    let rewrite = Arc::new(needs.bad_blobs.clone());
    for (volume, mut remaining) in by_volume {
        let holders: Vec<String> = topology.volumes.iter().filter(|v| v.name == volume).flat_map(|v| v.targets.iter()).filter(|t| **t != me).cloned().collect();
        for holder in &holders {
            if remaining.is_empty() {
                break;
            }
            let mut client = match mesh.send(GetConnection(holder.clone())).await {
                Ok(Some((_, conn))) => match FetchClient::open(&conn).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(holder = %holder, error = %e, "repair: cannot open a fetch stream");
                        continue;
                    }
                },
                _ => {
                    tracing::warn!(holder = %holder, "repair: holder not connected");
                    continue;
                }
            };
            // The holder serves contents to a target of a volume it holds.
            let asked = client.request(&FetchRequest::Rp { volume: volume.clone(), seq: None }).await;
            match (asked, client.reply().await) {
                (Ok(()), Ok(FetchReply::Rp(_))) => {}
                (_, Ok(FetchReply::Error(e))) | (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(holder = %holder, %volume, error = %e, "repair: holder cannot serve the volume");
                    continue;
                }
                (_, Ok(_)) => continue,
            }
            let mut left = Vec::new();
            for content in remaining {
                let chain = match client.request(&FetchRequest::Content(content)).await {
                    Ok(()) => client.reply().await.and_then(FetchClient::chain),
                    Err(e) => Err(e),
                };
                let stored = match chain {
                    Ok(chain) => {
                        let store = data.store().clone();
                        let (keys, rewrite, volume) = (keys.clone(), rewrite.clone(), volume.to_string());
                        tokio::task::spawn_blocking(move || store.repair_content(&volume, &content, &chain, &keys, &rewrite)).await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()))
                    }
                    Err(e) => Err(e),
                };
                match stored {
                    Ok(()) => {
                        tracing::info!(content = %content, holder = %holder, %volume, "repair: content fetched again and stored");
                        repaired += 1;
                    }
                    Err(e) => {
                        tracing::warn!(content = %content, holder = %holder, error = %e, "repair: this holder could not give the content");
                        left.push(content);
                    }
                }
            }
            remaining = left;
        }
        for content in &remaining {
            tracing::error!(content = %content, %volume, holders = ?holders, "repair: no other holder could give the content; the RPs that use it stay damaged");
        }
        unrepairable += remaining.len() as u64;
    }
    (repaired, unrepairable)
}

/// Starts the scheduled scrubs of this node.
pub fn start(data: Arc<DataPlane>, mesh: Addr<MeshActor>, gossip: Addr<GossipActor>) {
    actix_rt::spawn(async move {
        // Due one interval after the last scrub (recorded in the store when the
        // node started, then run by this process), or after the start when there
        // was none; never sooner than 10 minutes (or one interval) after a start.
        let started = Instant::now();
        let store = data.store().clone();
        let recorded_ms = tokio::task::spawn_blocking(move || store.scrubs(None))
            .await
            .ok()
            .and_then(|r| r.ok())
            .and_then(|v| v.iter().map(|r| r.finished_unix_ms).max());
        // How long before the start the last recorded scrub ended.
        let recorded_age = recorded_ms.map(|ms| Duration::from_millis(now_ms().saturating_sub(ms)));
        let mut last_run: Option<Instant> = None;
        loop {
            tokio::time::sleep(TICK).await;
            let topology = data.topology();
            let Some(me) = topology.node_by_id(&data.local()) else { continue };
            let Some(every) = me.scrub_every else { continue };
            let share = f64::from(me.scrub_sample_percent) / 100.0;
            let since = match last_run {
                Some(t) => t.elapsed(),
                None => recorded_age.unwrap_or_default() + started.elapsed(),
            };
            if since >= every && started.elapsed() >= every.min(Duration::from_secs(600)) {
                if let Err(e) = scrub_and_repair(data.clone(), mesh.clone(), gossip.clone(), share, "scheduled", None).await {
                    tracing::warn!(error = %e, "scheduled scrub failed; the next one is due one interval later");
                }
                last_run = Some(Instant::now());
            }
        }
    });
}

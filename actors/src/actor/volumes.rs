//! The volume scheduler: runs a replication cycle of every volume this node is
//! the source of, to each of its targets, once per RPO of its policy, and on
//! demand (`drmesh ctl sync-now VOLUME`). It keeps each (volume, target)'s last
//! outcome for status. One cycle per (volume, target) runs at a time; a failed
//! cycle is retried after a short backoff, never later than the RPO.
//!
//! It also keeps the bandwidth limits ([`crate::proto::bandwidth`]): every tick
//! it evaluates each policy's cap at the node's local time, publishes what its
//! running cycles want from the site uplink (gossip), computes this node's
//! share from what the site's other nodes publish, and sets the pacers that
//! running cycles share, so a window opening, a topology reload or a new
//! share changes the rate of cycles already running.
//!
//! A volume can be paused (`drmesh ctl pause`): its running cycles are cancelled
//! (they fail with the reason "paused"; the baseline stays where it was) and no
//! cycle starts until it is resumed. The paused set lives in the source's redb
//! ([`Baselines::paused`]), so it survives restarts. Resuming starts a cycle at
//! once; blobs the interrupted cycle had stored on the target are answered
//! present and not sent again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use drmesh_topology::{Compression, Topology};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::actor::gossip::{DemandNews, GetLiveNodes, GossipActor, SetDemandSink, SiteDemands, VolumeNews};
use crate::actor::platform::{LeaseAction, Platforms, ProxyRole};
use crate::proto::lease::{LeaseReply, LeaseRequest};
use crate::actor::mesh::{GetConnection, MeshActor};
use crate::proto::bandwidth::{effective_cap, policy_cap, site_share, Demand, LocalTime, Pacer, PolicyCap};
use crate::proto::gossip::catalog::VolumeHealth;
use crate::actor::pacing::{LinkPacers, Pacing};
use crate::actor::replicate::{run_cycle, run_group_cycle, CycleConfig, CycleError, CycleReport, ReadProgress};
use crate::store::VolumeName;
use crate::codec::BlockCodec;
use crate::source::baseline::Baselines;
use crate::source::kmod::{device_report, KmodDeviceReport, KmodSpec};

/// How often due cycles are looked for.
const TICK: Duration = Duration::from_millis(500);
/// Retry delay after a failed cycle (capped by the RPO).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);
/// Memory the cycles of this node may hold at once, by the bound of each
/// ([`cycle_bound`]); due cycles beyond it wait their turn, oldest due first.
/// One cycle always runs, whatever its bound.
pub const CYCLE_MEMORY_BUDGET: u64 = 320 << 20;
/// Most a cycle holds, whatever its volume: the reader's batch and read-ahead
/// and the blobs offered, compressed and in flight to the target.
const CYCLE_WINDOW_BYTES: u64 = 256 << 20;
/// What every cycle holds beyond its data (its reader thread, session, buffers).
const CYCLE_FIXED_BYTES: u64 = 4 << 20;

/// The memory a cycle of a volume of `volume_bytes` (None: not known) can
/// hold: its data windows never exceed the volume, nor [`CYCLE_WINDOW_BYTES`].
fn cycle_bound(volume_bytes: Option<u64>) -> u64 {
    volume_bytes.unwrap_or(CYCLE_WINDOW_BYTES).min(CYCLE_WINDOW_BYTES) + CYCLE_FIXED_BYTES
}

/// Frees the pooled read buffers and gives the memory glibc's allocator keeps
/// after `free` back to the system (a node that ran 200 cycles at once
/// otherwise idles near the peak's size). Called when no cycle runs.
fn give_back_freed_memory() {
    crate::source::file::release_pooled_buffers();
    crate::memory::give_back_freed();
}

type Key = (VolumeName, String);

struct Plan {
    rpo: Duration,
    next_due: Instant,
    /// When the running cycle started (the RPO counts from there).
    started_at: Option<Instant>,
    running: bool,
    again: bool,
    waiters: Vec<oneshot::Sender<Result<CycleReport, String>>>,
    /// Stops the running cycle (see [`run_cycle`]).
    cancel: Option<oneshot::Sender<String>>,
    last_ok: Option<LastCycle>,
    last_error: Option<LastFailure>,
    /// The running cycle's payload bytes sent so far and its reader's position.
    progress: Option<(Arc<AtomicU64>, Arc<ReadProgress>)>,
    /// Snapshot instant of the newest RP the target committed, Unix ms (from
    /// the baseline at start, then from each committed cycle).
    newest_rp_unix_ms: Option<u64>,
    /// When this plan began, Unix ms (a volume without an RP counts from here).
    since_unix_ms: u64,
    /// Whether the RPO was missed at the last look (`None`: not looked yet).
    rpo_missed: Option<bool>,
    /// What its cycles did since the node started.
    totals: ReplicationTotals,
}

/// What the cycles of one (volume, target) replication did since the node
/// started (monotonic while it runs: the counters of the metrics endpoint).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ReplicationTotals {
    /// Cycles that committed an RP.
    pub cycles_ok: u64,
    /// Cycles that failed.
    pub cycles_failed: u64,
    /// Bytes read from the source by committed cycles.
    pub read_bytes: u64,
    /// Blob payload bytes sent to the target, by all cycles (failed ones too).
    pub sent_payload_bytes: u64,
    /// Bytes of free filesystem space committed cycles did not read or zeroed.
    pub free_skipped_bytes: u64,
}

/// Whether the RPO of a replication is missed at `now_ms`: its newest RP is
/// older than `rpo`, or it has none and began more than `rpo` ago. Also how
/// old that is, in ms.
fn rpo_missed(newest_rp_unix_ms: Option<u64>, since_unix_ms: u64, rpo: Duration, now_ms: u64) -> (bool, u64) {
    let age = now_ms.saturating_sub(newest_rp_unix_ms.unwrap_or(since_unix_ms));
    (age > u64::try_from(rpo.as_millis()).unwrap_or(u64::MAX), age)
}

/// Status of one (volume, target) replication, for `drmesh ctl volumes`.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicationStatus {
    /// Volume name.
    pub volume: VolumeName,
    /// Target node.
    pub target: String,
    /// Policy RPO in seconds.
    pub rpo_secs: u64,
    /// Whether a cycle is running now.
    pub running: bool,
    /// Whether a cycle is due but waits for running ones to end (the node's
    /// cycle memory budget, [`CYCLE_MEMORY_BUDGET`], or its `max_cycles` is taken).
    pub queued: bool,
    /// Seconds until the next scheduled cycle.
    pub next_in_secs: f64,
    /// Last successful cycle and when it ended.
    pub last_ok: Option<LastCycle>,
    /// Last failure and when, if after the last success.
    pub last_error: Option<LastFailure>,
    /// The bandwidth cap the volume's transfers run under now.
    pub bandwidth: BandwidthStatus,
    /// Blob payload bytes the running cycle has sent so far (`None`: no cycle running).
    pub running_sent_payload_bytes: Option<u64>,
    /// How far the running cycle is (`None`: no cycle running).
    pub running_progress: Option<RunningProgress>,
    /// When the volume was paused (Unix ms); null when it is not paused.
    pub paused_since_unix_ms: Option<u64>,
    /// What its cycles did since the node started.
    pub totals: ReplicationTotals,
    /// For a volume of a `[[platform]]`: which proxy reads it and this
    /// node's lease (null for a volume read by one node).
    pub proxy: Option<ProxyRole>,
}

/// How far a running cycle is.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunningProgress {
    /// Seconds since it started.
    pub elapsed_secs: f64,
    /// Bytes of the volume the reader has gone past (read, or skipped as unchanged).
    pub position_bytes: u64,
    /// The volume's size (0 until the view is open).
    pub volume_bytes: u64,
    /// `position_bytes` of `volume_bytes`, percent.
    pub percent: f64,
    /// Blob payload bytes sent so far.
    pub sent_payload_bytes: u64,
    /// Seconds until the reader is through the volume at the pace so far
    /// (`None` before 1% or 1 s); the commit follows once the target has
    /// stored what is still on the way.
    pub eta_secs: Option<f64>,
}

impl RunningProgress {
    /// The progress of a cycle `elapsed` in, from its counters.
    fn of(elapsed: Duration, sent: u64, read: &ReadProgress) -> RunningProgress {
        let (done, count, block) = (read.blocks_done.load(Ordering::Relaxed), read.block_count.load(Ordering::Relaxed), read.block_bytes.load(Ordering::Relaxed));
        let fraction = if count == 0 { 0.0 } else { done.min(count) as f64 / count as f64 };
        let elapsed_secs = elapsed.as_secs_f64();
        let eta_secs = (fraction >= 0.01 && elapsed_secs >= 1.0).then(|| elapsed_secs * (1.0 - fraction) / fraction);
        RunningProgress {
            elapsed_secs,
            position_bytes: done.min(count).saturating_mul(block),
            volume_bytes: count.saturating_mul(block),
            percent: fraction * 100.0,
            sent_payload_bytes: sent,
            eta_secs,
        }
    }
}

/// The last cycle of a (volume, target) that committed.
#[derive(Debug, Clone, Serialize)]
pub struct LastCycle {
    /// When it ended (Unix ms).
    pub finished_unix_ms: u64,
    /// What it did.
    pub report: CycleReport,
}

/// The last failed cycle of a (volume, target).
#[derive(Debug, Clone, Serialize)]
pub struct LastFailure {
    /// When it failed (Unix ms).
    pub at_unix_ms: u64,
    /// Why, as logged.
    pub reason: String,
}

/// A node's share of its site's uplink (bits per second).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SiteShare {
    /// This node's share now.
    pub share_bps: u64,
    /// The site's uplink.
    pub uplink_bps: u64,
}

/// The cap a replication runs under now, for `drmesh ctl volumes`.
#[derive(Debug, Clone, Serialize)]
pub struct BandwidthStatus {
    /// Effective cap in bits per second; `None`: unlimited.
    pub cap_bps: Option<u64>,
    /// Why, e.g. "capped 50 Mbit/s by policy window 08:00-18:00" or
    /// "site share 100 Mbit/s of 200 Mbit/s".
    pub reason: String,
    /// The policy's cap alone, bits per second; `None`: unlimited.
    pub policy_cap_bps: Option<u64>,
    /// This node's share of its site uplink and the uplink, if the site
    /// declares an uplink.
    pub site_share: Option<SiteShare>,
    /// The cap of the `[[link]]` to the target, bits per second, if one is
    /// declared and limits now (shared by every transfer to that target).
    pub link_cap_bps: Option<u64>,
}

/// The node's local time now (time zone from `TZ` or `/etc/localtime`).
fn local_time_now() -> LocalTime {
    local_time_of(&jiff::Zoned::now())
}

/// Day of the week and minute of the day of a zoned time, as policy windows see it.
fn local_time_of(at: &jiff::Zoned) -> LocalTime {
    let day = usize::try_from(at.weekday().to_monday_zero_offset()).unwrap_or(0) % 7;
    let minute = u16::try_from(i32::from(at.hour()) * 60 + i32::from(at.minute())).unwrap_or(0);
    LocalTime { weekday: drmesh_topology::Weekday::ALL[day], minute }
}

fn lock(pacer: &Mutex<Pacer>) -> std::sync::MutexGuard<'_, Pacer> {
    // A poisoned pacer only means a panic elsewhere mid-update; its numbers are still usable.
    pacer.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bandwidth state of the node: pacers shared with running cycles, and what
/// gossip says the site's other nodes want.
struct Limits {
    policy_pacers: BTreeMap<String, Arc<Mutex<Pacer>>>,
    node_pacer: Arc<Mutex<Pacer>>,
    policy_caps: BTreeMap<String, PolicyCap>,
    /// One pacer per peer with a `[[link]]` to this node, shared by every
    /// cycle to it and by the fetch replies served to it.
    link_pacers: Arc<LinkPacers>,
    link_caps: BTreeMap<String, PolicyCap>,
    site_share: Option<(u64, u64)>,
    site_demands: Vec<Demand>,
    published: Option<Demand>,
}

/// What `pause` did to one volume.
#[derive(Debug, Clone, Serialize)]
pub struct PauseOutcome {
    /// Volume name.
    pub volume: VolumeName,
    /// When the volume was paused (Unix ms); the first pause's time if it already was.
    pub paused_since_unix_ms: u64,
    /// Whether it was paused already.
    pub already_paused: bool,
    /// Targets whose running cycle was stopped (it failed; nothing was committed).
    pub cycles_stopped: Vec<String>,
    /// Targets whose running cycle had already sent its commit and was let finish.
    pub cycles_committed: Vec<String>,
}

/// What `resume` did to one volume.
#[derive(Debug, Clone, Serialize)]
pub struct ResumeOutcome {
    /// Volume name.
    pub volume: VolumeName,
    /// Whether it was paused (a resume of a running volume changes nothing).
    pub was_paused: bool,
    /// When it had been paused (Unix ms).
    pub paused_since_unix_ms: Option<u64>,
}

/// The reason a cycle stopped by `pause` fails with.
pub const PAUSED_REASON: &str = "paused by `drmesh ctl pause`; the baseline is unchanged and what the target stored is kept";

/// The scheduler actor.
pub struct VolumeScheduler {
    local: drmesh_topology::NodeId,
    topology: Arc<Topology>,
    mesh: Addr<MeshActor>,
    baselines: Arc<Baselines>,
    plans: BTreeMap<Key, Plan>,
    gossip: Option<Addr<GossipActor>>,
    limits: Limits,
    /// Paused volumes and since when (Unix ms); mirrors the baseline database.
    paused: BTreeMap<String, u64>,
    /// Memory budget held by the running cycles (sum of their [`cycle_bound`]s;
    /// a cycle of a plan the topology dropped holds its share until it ends).
    reserved: u64,
    /// Which platform volumes this node reads now, and their leases.
    platforms: Platforms,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The codec of a policy; reads its key file if it encrypts.
pub fn policy_codec(policy: &drmesh_topology::Policy) -> Result<BlockCodec, String> {
    let level = match policy.compression {
        Compression::Off => None,
        Compression::Zstd { level } => Some(level),
    };
    let key = match &policy.encryption_key_file {
        Some(path) => Some(drmesh_topology::read_key_file(path)?),
        None => None,
    };
    Ok(BlockCodec::new(level, key.as_ref().map(|k| k.as_bytes())))
}

impl VolumeScheduler {
    /// A scheduler for the node `local`. It sets the rates of `link_pacers`,
    /// which the node's data plane also uses for what it serves to peers.
    pub fn new(
        local: drmesh_topology::NodeId,
        topology: Arc<Topology>,
        mesh: Addr<MeshActor>,
        baselines: Arc<Baselines>,
        link_pacers: Arc<LinkPacers>,
    ) -> Self {
        let limits = Limits {
            policy_pacers: BTreeMap::new(),
            node_pacer: Arc::new(Mutex::new(Pacer::new(Duration::ZERO, None))),
            policy_caps: BTreeMap::new(),
            link_pacers,
            link_caps: BTreeMap::new(),
            site_share: None,
            site_demands: Vec::new(),
            published: None,
        };
        let paused = baselines.paused().unwrap_or_else(|e| {
            // Without the list no volume can be known to be paused; say so loudly.
            tracing::error!(error = %e, "cannot read the paused volumes; every volume runs");
            BTreeMap::new()
        });
        let mut s = VolumeScheduler { local, topology, mesh, baselines, plans: BTreeMap::new(), gossip: None, limits, paused, reserved: 0, platforms: Platforms::new() };
        s.replan(true);
        s.update_limits();
        for (volume, since) in &s.paused {
            tracing::info!(%volume, since_unix_ms = since, "volume is paused; resume it with `drmesh ctl resume`");
        }
        s
    }

    /// Re-evaluates every limit now: policy caps at the local time, this
    /// node's demand (published by gossip when it changed) and its site share;
    /// sets the pacers running cycles share.
    fn update_limits(&mut self) {
        let local = local_time_now();
        // Every pacer shares the link pacers' time base (`Pacing` reads it there).
        let now = self.limits.link_pacers.origin().elapsed();
        let me = self.local_name();
        let mut caps = BTreeMap::new();
        for volume in self.topology.readable_by(&me) {
            if let Some(policy) = self.topology.policies.get(&volume.policy) {
                caps.insert(volume.policy.clone(), policy_cap(policy.bandwidth.as_ref(), local));
            }
        }
        self.limits.policy_pacers.retain(|name, _| caps.contains_key(name));
        for (name, cap) in &caps {
            let pacer = self.limits.policy_pacers.entry(name.clone()).or_insert_with(|| Arc::new(Mutex::new(Pacer::new(now, None))));
            lock(pacer).set_rate(now, cap.bps);
        }
        let mut link_caps = BTreeMap::new();
        for link in &self.topology.links {
            if let Some(peer) = link.nodes.iter().find(|n| **n != me).filter(|_| link.nodes.contains(&me)) {
                link_caps.insert(peer.clone(), policy_cap(Some(&link.bandwidth), local));
            }
        }
        self.limits.link_pacers.set(now, &link_caps.iter().map(|(peer, cap)| (peer.clone(), cap.bps)).collect());
        // What the running cycles want: each running policy's cap once (its
        // pacer is shared by its cycles), unlimited if any policy is; and no
        // more than the caps of the links they run over.
        let running: BTreeSet<&str> = self
            .plans
            .iter()
            .filter(|(_, p)| p.running)
            .filter_map(|((v, _), _)| self.topology.volumes.iter().find(|x| x.name == *v).map(|x| x.policy.as_str()))
            .collect();
        let by_policy = running
            .iter()
            .filter_map(|p| caps.get(*p))
            .fold(Demand::Idle, |d, cap| d.plus(cap.bps.map_or(Demand::Unlimited, Demand::Bps)));
        let running_targets: BTreeSet<&str> = self.plans.iter().filter(|(_, p)| p.running).map(|((_, t), _)| t.as_str()).collect();
        let by_link = running_targets.iter().fold(Demand::Idle, |d, t| {
            d.plus(link_caps.get(*t).and_then(|c| c.bps).map_or(Demand::Unlimited, Demand::Bps))
        });
        let demand = by_policy.min(by_link);
        self.limits.link_caps = link_caps;
        if self.limits.published != Some(demand) {
            if let Some(gossip) = &self.gossip {
                gossip.do_send(DemandNews(demand));
                self.limits.published = Some(demand);
            }
        }
        let uplink = self.topology.node_by_id(&self.local).and_then(|n| self.topology.sites.iter().find(|s| s.name == n.site)).and_then(|s| s.uplink_bps);
        self.limits.site_share = uplink.map(|up| (site_share(up, demand, &self.limits.site_demands), up));
        lock(&self.limits.node_pacer).set_rate(now, self.limits.site_share.map(|(share, _)| share));
        self.limits.policy_caps = caps;
    }

    fn pacing(&self, policy: &str, target: &str) -> Pacing {
        let mut pacing = self.limits.link_pacers.pacing_to(target);
        pacing.pacers.push(self.limits.node_pacer.clone());
        pacing.pacers.extend(self.limits.policy_pacers.get(policy).cloned());
        pacing
    }

    fn bandwidth_status(&self, volume: &str, target: &str) -> BandwidthStatus {
        let policy = self.topology.volumes.iter().find(|v| v.name == volume).map(|v| v.policy.as_str()).unwrap_or_default();
        let cap = self.limits.policy_caps.get(policy).copied().unwrap_or(PolicyCap { bps: None, window: None });
        let link = self.limits.link_caps.get(target).copied().unwrap_or(PolicyCap { bps: None, window: None });
        let effective = effective_cap(cap, self.limits.site_share).with_link(link);
        BandwidthStatus {
            cap_bps: effective.bps,
            reason: effective.to_string(),
            policy_cap_bps: cap.bps,
            site_share: self.limits.site_share.map(|(share_bps, uplink_bps)| SiteShare { share_bps, uplink_bps }),
            link_cap_bps: link.bps,
        }
    }

    /// Checks that this node is the source of `volume`; the error names it.
    fn check_source(&self, volume: &VolumeName) -> Result<(), String> {
        let me = self.local_name();
        match self.topology.volumes.iter().find(|v| v.name == *volume) {
            Some(v) if self.topology.may_read(v, &me) => Ok(()),
            Some(v) => Err(format!(
                "volume \"{volume}\" is replicated by node {}, not by this node ({me}); pause and resume act on the source node",
                v.source
            )),
            None => Err(format!("volume \"{volume}\" is not in the topology")),
        }
    }

    /// Every volume this node is the source of.
    fn own_volumes(&self) -> Vec<VolumeName> {
        let me = self.local_name();
        self.topology.readable_by(&me).map(|v| v.name.clone()).collect()
    }

    fn local_name(&self) -> String {
        self.topology.node_by_id(&self.local).map(|n| n.name.clone()).unwrap_or_default()
    }

    /// Rebuilds the plan list from the topology, keeping the state of plans that stay.
    fn replan(&mut self, at_startup: bool) {
        let me = self.local_name();
        let mut plans = BTreeMap::new();
        for volume in self.topology.readable_by(&me) {
            let rpo = self.topology.policies.get(&volume.policy).map_or(Duration::from_secs(3600), |p| p.rpo);
            for target in &volume.targets {
                let key = (volume.name.clone(), target.clone());
                let plan = match self.plans.remove(&key) {
                    Some(mut p) => {
                        p.rpo = rpo;
                        p
                    }
                    None => Plan {
                        rpo,
                        // The first cycle waits briefly so connections can come up.
                        next_due: Instant::now() + if at_startup { Duration::from_secs(2) } else { Duration::ZERO },
                        started_at: None,
                        running: false,
                        again: false,
                        waiters: Vec::new(),
                        cancel: None,
                        last_ok: None,
                        last_error: None,
                        progress: None,
                        newest_rp_unix_ms: self.baselines.meta(&volume.name, target).ok().flatten().map(|m| m.time_unix_ms),
                        since_unix_ms: now_ms(),
                        rpo_missed: None,
                        totals: ReplicationTotals::default(),
                    },
                };
                plans.insert(key, plan);
            }
        }
        for (key, plan) in std::mem::take(&mut self.plans) {
            for w in plan.waiters {
                let _ = w.send(Err(format!("volume {} is no longer replicated to {}", key.0, key.1)));
            }
        }
        self.plans = plans;
        // A volume that is no longer replicated from here forgets its pause.
        let own = self.own_volumes();
        let gone: Vec<String> = self.paused.keys().filter(|v| !own.iter().any(|o| o == *v)).cloned().collect();
        for volume in gone {
            if let Err(e) = self.baselines.set_paused(&volume, None) {
                tracing::warn!(%volume, error = %e, "cannot forget the pause of a removed volume");
                continue;
            }
            self.paused.remove(&volume);
        }
    }

    fn cycle_config(&mut self, volume: &VolumeName, target: &str) -> Result<CycleConfig, String> {
        let fence = self.platforms.fence(&self.topology, volume);
        let v = self.topology.volumes.iter().find(|v| v.name == *volume).ok_or_else(|| format!("volume {volume} is not in the topology"))?;
        let policy = self.topology.policies.get(&v.policy).ok_or_else(|| format!("policy {:?} is not in the topology", v.policy))?;
        let source = crate::source::change::of_volume_fenced(v, fence)?;
        Ok(CycleConfig {
            volume: volume.clone(),
            target: target.to_string(),
            source_node: self.local_name(),
            source,
            block_bytes: u32::try_from(policy.block_bytes).map_err(|_| "block size too large".to_string())?,
            codec: policy_codec(policy)?,
            pacing: self.pacing(&v.policy, target),
            progress: Arc::default(),
            free_space: v.free_space,
            group: None,
        })
    }

    /// Starts a cycle of `key` if the node's cycle memory budget has room for
    /// it (or no cycle runs); otherwise it stays due and starts when running
    /// cycles end, in the order the queued ones fell due. Returns whether it started.
    fn start(&mut self, key: Key, ctx: &mut Context<Self>) -> bool {
        if !self.plans.contains_key(&key) {
            return false;
        }
        if let Some(group) = self.topology.group_of(&key.0) {
            let group = group.clone();
            return self.start_group(&group, &key.1, ctx);
        }
        // A platform's volume runs where it is read, under its lease.
        if self.platforms.held_back(&self.topology, self.local, &key.0).is_some() {
            return false;
        }
        self.update_limits();
        let config = self.cycle_config(&key.0, &key.1);
        let bound = cycle_bound(config.as_ref().ok().and_then(|c| self.volume_bytes(c)));
        let full = self.at_capacity(1);
        let Some(plan) = self.plans.get_mut(&key) else { return false };
        if full || (self.reserved > 0 && self.reserved + bound > CYCLE_MEMORY_BUDGET) {
            let now = Instant::now();
            if plan.next_due > now {
                plan.next_due = now;
            }
            tracing::debug!(volume = %key.0, target = %key.1, bound, reserved = self.reserved, "cycle queued: the node's cycle memory budget or its max_cycles is taken");
            return false;
        }
        plan.running = true;
        plan.started_at = Some(Instant::now());
        plan.again = false;
        self.reserved += bound;
        let (cancel_tx, cancel_rx) = oneshot::channel();
        plan.cancel = Some(cancel_tx);
        if let Ok(c) = &config {
            plan.progress = Some((c.pacing.sent_payload_bytes.clone(), c.progress.clone()));
        }
        let (mesh, baselines, me) = (self.mesh.clone(), self.baselines.clone(), ctx.address());
        actix_rt::spawn(async move {
            let mut cancel_rx = cancel_rx;
            let result = async {
                let config = config?;
                let conn = wait_for_connection(&mesh, &config.target).await?;
                match run_cycle(conn, config.clone(), baselines.clone(), &mut cancel_rx).await {
                    // The connection died before the target said anything: most
                    // often the target restarted and the mesh had not noticed
                    // yet. Nothing of the cycle reached it; once more on the
                    // new connection (the mesh hands out no closed one).
                    Err(CycleError::Unanswered(reason)) => {
                        tracing::info!(volume = %config.volume, target = %config.target, %reason, "connection lost before the target answered; starting the cycle again on a new connection");
                        let conn = wait_for_connection(&mesh, &config.target).await?;
                        run_cycle(conn, config, baselines, &mut cancel_rx).await.map_err(|e| e.to_string())
                    }
                    other => other.map_err(|e| e.to_string()),
                }
            }
            .await;
            me.do_send(CycleDone { key, result, reserved: bound });
        });
        true
    }

    /// The size of `config`'s volume as far as known before its view is
    /// open: an image file's size, else the size its baseline RP had (a
    /// block device, a VM disk behind qemu); `None` for a volume never copied.
    fn volume_bytes(&self, config: &CycleConfig) -> Option<u64> {
        regular_file_bytes(config.source.volume_path())
            .or_else(|| self.baselines.meta(&config.volume, &config.target).ok().flatten().map(|m| m.volume_bytes))
    }

    /// Whether `adding` more cycles would pass the node's `max_cycles` (one
    /// cycle, or one group, always runs when none does).
    fn at_capacity(&self, adding: usize) -> bool {
        let max = self.topology.node_by_id(&self.local).map_or(drmesh_topology::DEFAULT_MAX_CYCLES, |n| n.max_cycles) as usize;
        let running = self.plans.values().filter(|p| p.running).count();
        running > 0 && running + adding > max
    }

    /// Whether `key`'s volume is in a consistency group one of whose other
    /// members runs a cycle to the same target or is paused.
    fn group_held_back(&self, key: &Key) -> bool {
        self.topology.group_of(&key.0).is_some_and(|g| {
            g.volumes.iter().any(|m| self.paused.contains_key(m.as_str()) || self.plans.get(&(m.clone(), key.1.clone())).is_some_and(|p| p.running))
        })
    }

    /// Starts a cycle of consistency group `group` (every member) towards
    /// `target`: every member's plan runs in it. Not while any member's cycle
    /// runs or any member is paused (a paused member holds the group back).
    /// The memory budget is as for one cycle: the members' cycles run one
    /// after another, the largest's bound is reserved.
    fn start_group(&mut self, group: &drmesh_topology::Group, target: &str, ctx: &mut Context<Self>) -> bool {
        let name = group.name.as_str();
        let keys: Vec<Key> = group.volumes.iter().map(|m| (m.clone(), target.to_string())).collect();
        if keys.iter().any(|k| self.plans.get(k).is_none_or(|p| p.running) || self.paused.contains_key(k.0.as_str())) {
            return false;
        }
        // A platform's group runs when this node reads it and holds every member's lease.
        if keys.iter().any(|k| self.platforms.held_back(&self.topology, self.local, &k.0).is_some()) {
            return false;
        }
        self.update_limits();
        let configs: Vec<Result<CycleConfig, String>> = keys.iter().map(|k| self.cycle_config(&k.0, &k.1)).collect();
        let bound = configs
            .iter()
            .map(|c| cycle_bound(c.as_ref().ok().and_then(|c| self.volume_bytes(c))))
            .max()
            .unwrap_or(0);
        if self.at_capacity(keys.len()) || (self.reserved > 0 && self.reserved + bound > CYCLE_MEMORY_BUDGET) {
            let now = Instant::now();
            for k in &keys {
                if let Some(plan) = self.plans.get_mut(k) {
                    plan.next_due = plan.next_due.min(now);
                }
            }
            tracing::debug!(group = name, %target, bound, reserved = self.reserved, "group cycle queued: the node's cycle memory budget or its max_cycles is taken");
            return false;
        }
        self.reserved += bound;
        let mut cancels = Vec::with_capacity(keys.len());
        for (k, config) in keys.iter().zip(&configs) {
            let Some(plan) = self.plans.get_mut(k) else { continue };
            plan.running = true;
            plan.started_at = Some(Instant::now());
            plan.again = false;
            let (cancel_tx, cancel_rx) = oneshot::channel();
            plan.cancel = Some(cancel_tx);
            cancels.push(cancel_rx);
            if let Ok(c) = config {
                plan.progress = Some((c.pacing.sent_payload_bytes.clone(), c.progress.clone()));
            }
        }
        let (mesh, baselines, me, name, target, hooks) = (self.mesh.clone(), self.baselines.clone(), ctx.address(), name.to_string(), target.to_string(), group.hooks.clone());
        actix_rt::spawn(async move {
            let results: Vec<Result<CycleReport, String>> = match configs.into_iter().collect::<Result<Vec<_>, String>>() {
                Err(e) => keys.iter().map(|_| Err(e.clone())).collect(),
                Ok(configs) => match wait_for_connection(&mesh, &target).await {
                    Err(e) => keys.iter().map(|_| Err(e.clone())).collect(),
                    Ok(conn) => run_group_cycle(conn, &name, hooks, configs, baselines, &mut cancels).await.into_iter().map(|r| r.map_err(|e| e.to_string())).collect(),
                },
            };
            // The whole reservation goes back with the first member's outcome.
            let mut reserved = bound;
            for (key, result) in keys.into_iter().zip(results) {
                me.do_send(CycleDone { key, result, reserved: std::mem::take(&mut reserved) });
            }
        });
        true
    }

    /// Logs once when a replication starts missing its RPO (WARN) and once
    /// when it meets it again (INFO).
    fn watch_rpo(&mut self) {
        let now = now_ms();
        for ((volume, target), plan) in &mut self.plans {
            // A platform volume another proxy reads: its RPO is that proxy's
            // to keep; here the clock starts again when it moves here.
            if !self.platforms.reads_here(&self.topology, self.local, volume) {
                plan.since_unix_ms = now;
                plan.newest_rp_unix_ms = None;
                plan.rpo_missed = None;
                continue;
            }
            let (missed, age_ms) = rpo_missed(plan.newest_rp_unix_ms, plan.since_unix_ms, plan.rpo, now);
            // Tenths of a second: "10s 400ms old, the RPO is 10s", not "10s old".
            let (age, rpo) = (humantime::format_duration(Duration::from_millis(age_ms / 100 * 100)), humantime::format_duration(plan.rpo));
            let paused = if self.paused.contains_key(volume.as_str()) { " (the volume is paused)" } else { "" };
            match (plan.rpo_missed, missed) {
                (Some(false) | None, true) => match plan.newest_rp_unix_ms {
                    Some(_) => tracing::warn!(%volume, %target, "RPO missed: the newest RP on {target} is {age} old, the RPO is {rpo}{paused}"),
                    None => tracing::warn!(%volume, %target, "RPO missed: no RP on {target} yet after {age}, the RPO is {rpo}{paused}"),
                },
                (Some(true), false) => tracing::info!(%volume, %target, "RPO met again: the newest RP on {target} is {age} old, the RPO is {rpo}"),
                _ => {}
            }
            plan.rpo_missed = Some(missed);
        }
    }

    /// The platform volumes' upkeep: who is up (asked of gossip for the
    /// next look), lease requests sent, cycles of volumes that moved or whose
    /// lease ran low stopped.
    fn platform_upkeep(&mut self, ctx: &mut Context<Self>) {
        if self.topology.platforms.is_empty() {
            return;
        }
        if let Some(gossip) = &self.gossip {
            gossip.send(GetLiveNodes).into_actor(self).map(|live, act, _| {
                if let Ok(live) = live {
                    act.platforms.set_live(live);
                }
            }).spawn(ctx);
        }
        let me = self.local_name();
        let plans = &self.plans;
        let running = |v: &VolumeName| plans.iter().any(|((pv, _), p)| pv == v && p.running);
        for action in self.platforms.upkeep(&self.topology, self.local, &me, running) {
            match action {
                LeaseAction::Send { volume, target, request, sent } => {
                    let (mesh, addr) = (self.mesh.clone(), ctx.address());
                    actix_rt::spawn(async move {
                        let reply = match mesh.send(GetConnection(target.clone())).await {
                            Ok(Some((_, conn))) if conn.close_reason().is_none() => crate::actor::applier::request_lease(&conn, &request).await,
                            _ => Err(format!("target {target} is not connected")),
                        };
                        addr.do_send(LeaseAnswer { volume, request, sent, reply });
                    });
                }
                LeaseAction::Stop { volume, reason } => {
                    for ((v, target), plan) in self.plans.iter_mut().filter(|((v, _), p)| *v == volume && p.running) {
                        if let Some(cancel) = plan.cancel.take() {
                            tracing::warn!(volume = %v, %target, %reason, "stopping the cycle");
                            let _ = cancel.send(reason.clone());
                        }
                    }
                }
            }
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.update_limits();
        self.platform_upkeep(ctx);
        self.watch_rpo();
        let now = Instant::now();
        let (topology, me, platforms) = (&self.topology, self.local, &self.platforms);
        let mut due: Vec<(Instant, Key)> = self
            .plans
            .iter()
            .filter(|((volume, _), p)| !p.running && (p.again || p.next_due <= now) && !self.paused.contains_key(volume.as_str()))
            .filter(|((volume, _), _)| platforms.held_back(topology, me, volume).is_none())
            .map(|(k, p)| (p.next_due, k.clone()))
            .collect();
        // Oldest due first; one that the memory budget cannot take yet holds
        // the ones behind it (no cycle is passed over for ever by smaller ones).
        due.sort();
        for (_, key) in due {
            // Started just now with its group, or held back by a member of its group.
            if self.plans.get(&key).is_some_and(|p| p.running) || self.group_held_back(&key) {
                continue;
            }
            if !self.start(key, ctx) {
                break;
            }
        }
    }
}

/// When the next cycle is due after one that started at `started` and ended
/// at `finished`. An RP shows the instant its cycle started and exists once
/// its cycle ends, so the newest RP is as old as `rpo` plus the next cycle's
/// length just before that cycle commits: the next cycle starts early by
/// [`rpo_lead`] of this one's length, so the newest RP stays within `rpo` while
/// cycles keep their pace (a cycle that took longer than that is followed at
/// once). After a failure, a retry [`RETRY_AFTER_FAILURE`] after the end (at
/// most `rpo`).
fn next_due(started: Instant, finished: Instant, rpo: Duration, ok: bool) -> Instant {
    if ok {
        (started + rpo - rpo_lead(finished.saturating_duration_since(started), rpo)).max(finished)
    } else {
        finished + RETRY_AFTER_FAILURE.min(rpo)
    }
}

/// How much earlier than `rpo` after the last start the next cycle starts,
/// for a last cycle of length `took`: its length plus a quarter and a second
/// (the next may be a little slower, and the target's catalog and gossip
/// learn of the RP a moment later), at most half the RPO (so RPs never come
/// more often than twice per RPO).
fn rpo_lead(took: Duration, rpo: Duration) -> Duration {
    (took + took / 4 + Duration::from_secs(1)).min(rpo / 2)
}

/// How long a cycle waits for its target's connection before it fails. Covers a
/// `sync-now` right after start-up and a cycle that falls due while a peer is
/// reconnecting (a restarted node is back within a second or two).
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// The live connection to `target`, waiting up to [`CONNECT_WAIT`] for it to
/// come up. A connection that has closed (the peer restarted and answered our
/// packets with a reset) is never returned: the wait goes on for the new one.
async fn wait_for_connection(mesh: &Addr<MeshActor>, target: &str) -> Result<quinn::Connection, String> {
    let deadline = Instant::now() + CONNECT_WAIT;
    loop {
        let offered = mesh.send(GetConnection(target.to_string())).await.map_err(|e| e.to_string())?;
        // One that closed since the mesh handed it out is skipped: its close is on its way to the mesh.
        if let Some((_, conn)) = offered.filter(|(_, c)| c.close_reason().is_none()) {
            return Ok(conn);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "target {target} is not connected (waited {} s; `drmesh ctl mesh` shows the peers this node reaches)",
                CONNECT_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Actor for VolumeScheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct CycleDone {
    key: Key,
    result: Result<CycleReport, String>,
    /// The memory budget the cycle held (given back even if its plan is gone).
    reserved: u64,
}

impl Handler<CycleDone> for VolumeScheduler {
    type Result = ();

    fn handle(&mut self, msg: CycleDone, ctx: &mut Context<Self>) {
        self.reserved = self.reserved.saturating_sub(msg.reserved);
        let Some(plan) = self.plans.get_mut(&msg.key) else { return };
        plan.running = false;
        match &msg.result {
            Ok(report) => {
                plan.totals.cycles_ok += 1;
                plan.totals.read_bytes += report.scanned_bytes;
                plan.totals.sent_payload_bytes += report.stats.sent_payload_bytes;
                plan.totals.free_skipped_bytes += report.free_skipped_bytes;
            }
            Err(_) => {
                plan.totals.cycles_failed += 1;
                plan.totals.sent_payload_bytes += plan.progress.as_ref().map_or(0, |(sent, _)| sent.load(Ordering::Relaxed));
            }
        }
        plan.progress = None;
        plan.cancel = None;
        let now = Instant::now();
        match &msg.result {
            Ok(report) => {
                tracing::info!(
                    volume = %report.volume, target = %report.target, seq = %report.seq,
                    offered = report.stats.offered_blocks, sent_bytes = report.stats.sent_payload_bytes,
                    secs = format!("{:.2}", report.duration_secs), "cycle committed"
                );
                plan.last_ok = Some(LastCycle { finished_unix_ms: now_ms(), report: report.clone() });
                plan.newest_rp_unix_ms = Some(report.snapshot_unix_ms);
                plan.last_error = None;
            }
            Err(reason) => {
                tracing::warn!(volume = %msg.key.0, target = %msg.key.1, %reason, "cycle failed; the baseline is unchanged");
                plan.last_error = Some(LastFailure { at_unix_ms: now_ms(), reason: reason.clone() });
            }
        }
        plan.next_due = next_due(plan.started_at.take().unwrap_or(now), now, plan.rpo, msg.result.is_ok());
        // Started when due, not at the next look (see `next_due`).
        ctx.run_later(plan.next_due.saturating_duration_since(now), |act, ctx| act.tick(ctx));
        if let Some(gossip) = &self.gossip {
            let health = VolumeHealth {
                last_rp_unix_ms: plan.last_ok.as_ref().map(|last| last.report.snapshot_unix_ms),
                rpo_ms: u64::try_from(plan.rpo.as_millis()).unwrap_or(u64::MAX),
                last_cycle_unix_ms: Some(now_ms()),
                last_error: msg.result.as_ref().err().map(|e| format!("to {}: {e}", msg.key.1)),
            };
            gossip.do_send(VolumeNews { volume: msg.key.0.clone(), health });
        }
        // Waiters that arrived while this cycle ran asked for a fresh one.
        let waiters = std::mem::take(&mut plan.waiters);
        if plan.again && !self.paused.contains_key(msg.key.0.as_str()) {
            plan.waiters = waiters;
            self.start(msg.key, ctx);
        } else {
            for w in waiters {
                let _ = w.send(msg.result.clone());
            }
        }
        // Queued cycles take the budget this one gave back.
        self.tick(ctx);
        if self.reserved == 0 {
            actix_rt::spawn(async {
                let _ = tokio::task::spawn_blocking(give_back_freed_memory).await;
            });
        }
        self.update_limits();
    }
}

/// The size of `path` when it is a regular file (a file volume); None for a
/// block device or what cannot be read (the cycle's bound is then its largest).
fn regular_file_bytes(path: &std::path::Path) -> Option<u64> {
    std::fs::metadata(path).ok().filter(|m| m.is_file()).map(|m| m.len())
}

/// Where cycle outcomes and uplink demands are published, and where site
/// demands come from (the gossip actor).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetGossip(pub Addr<GossipActor>);

impl Handler<SetGossip> for VolumeScheduler {
    type Result = ();

    fn handle(&mut self, msg: SetGossip, ctx: &mut Context<Self>) {
        msg.0.do_send(SetDemandSink(ctx.address().recipient()));
        self.gossip = Some(msg.0);
        self.limits.published = None;
        self.update_limits();
    }
}

impl Handler<SiteDemands> for VolumeScheduler {
    type Result = ();

    fn handle(&mut self, msg: SiteDemands, _ctx: &mut Context<Self>) {
        self.limits.site_demands = msg.0;
        self.update_limits();
    }
}

/// Applies a new topology (volumes added, removed, policies changed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetTopology(pub Arc<Topology>);

impl Handler<SetTopology> for VolumeScheduler {
    type Result = ();

    fn handle(&mut self, msg: SetTopology, _ctx: &mut Context<Self>) {
        self.topology = msg.0;
        self.replan(false);
        self.update_limits();
    }
}

/// Runs a cycle of `volume` to every target now; answers with each target's outcome.
#[derive(Message)]
#[rtype(result = "Result<Vec<Result<CycleReport, String>>, String>")]
pub struct SyncNow(pub VolumeName);

impl Handler<SyncNow> for VolumeScheduler {
    type Result = ResponseFuture<Result<Vec<Result<CycleReport, String>>, String>>;

    fn handle(&mut self, msg: SyncNow, ctx: &mut Context<Self>) -> Self::Result {
        let keys: Vec<Key> = self.plans.keys().filter(|(v, _)| *v == msg.0).cloned().collect();
        if keys.is_empty() {
            let me = self.local_name();
            let reason = match self.topology.volumes.iter().find(|v| v.name == msg.0) {
                Some(v) => format!("volume \"{}\" is replicated by node {}, not by this node ({me})", msg.0, v.source),
                None => format!("volume \"{}\" is not in the topology", msg.0),
            };
            return Box::pin(async move { Err(reason) });
        }
        if let Some(reason) = self.platforms.held_back(&self.topology, self.local, &msg.0) {
            return Box::pin(async move { Err(format!("{reason}; run sync-now on the proxy that reads it (`drmesh ctl volumes` there says so)")) });
        }
        if let Some(since) = self.paused.get(msg.0.as_str()) {
            let reason = format!(
                "volume \"{}\" is paused (since {} UTC); `drmesh ctl resume {}` starts a cycle",
                msg.0,
                utc_text(*since),
                msg.0
            );
            return Box::pin(async move { Err(reason) });
        }
        // A group member's cycle is its group's: every member's outcome is reported.
        let keys = match self.topology.group_of(&msg.0) {
            None => keys,
            Some(group) => {
                if let Some(paused) = group.volumes.iter().find(|m| self.paused.contains_key(m.as_str())) {
                    let reason = format!(
                        "volume \"{}\" is in consistency group \"{}\", whose member \"{paused}\" is paused; `drmesh ctl resume {paused}` lets the group run",
                        msg.0, group.name
                    );
                    return Box::pin(async move { Err(reason) });
                }
                self.plans.keys().filter(|(v, _)| group.volumes.contains(v)).cloned().collect()
            }
        };
        let mut receivers = Vec::new();
        // Running before this call: a cycle started by this call (a group's) is the fresh one.
        let was_running: BTreeSet<Key> = keys.iter().filter(|k| self.plans.get(*k).is_some_and(|p| p.running)).cloned().collect();
        for key in keys {
            let (tx, rx) = oneshot::channel();
            let start = {
                let Some(plan) = self.plans.get_mut(&key) else { continue };
                plan.waiters.push(tx);
                if plan.running && !was_running.contains(&key) {
                    false
                } else if plan.running {
                    plan.again = true;
                    false
                } else {
                    true
                }
            };
            if start {
                self.start(key, ctx);
            }
            receivers.push(rx);
        }
        Box::pin(async move {
            let mut out = Vec::new();
            for rx in receivers {
                out.push(rx.await.unwrap_or_else(|_| Err("the scheduler stopped".into())));
            }
            Ok(out)
        })
    }
}

/// The answer to a lease request of a platform volume.
#[derive(Message)]
#[rtype(result = "()")]
struct LeaseAnswer {
    volume: VolumeName,
    request: LeaseRequest,
    /// When it was sent.
    sent: crate::proto::time::Millis,
    reply: Result<LeaseReply, String>,
}

impl Handler<LeaseAnswer> for VolumeScheduler {
    type Result = ();

    fn handle(&mut self, msg: LeaseAnswer, ctx: &mut Context<Self>) {
        let waited = self.platforms.held_back(&self.topology, self.local, &msg.volume).is_some();
        self.platforms.handle_reply(&msg.volume, &msg.request, msg.sent, msg.reply);
        if waited && self.platforms.held_back(&self.topology, self.local, &msg.volume).is_none() {
            // A volume that waited for its lease starts now, not at the next look.
            self.tick(ctx);
        }
    }
}

/// Asks for every replication's status.
#[derive(Message)]
#[rtype(result = "Vec<ReplicationStatus>")]
pub struct GetReplications;

impl Handler<GetReplications> for VolumeScheduler {
    type Result = MessageResult<GetReplications>;

    fn handle(&mut self, _msg: GetReplications, _ctx: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        let any_running = self.plans.values().any(|p| p.running);
        MessageResult(
            self.plans
                .iter()
                .map(|((volume, target), p)| ReplicationStatus {
                    volume: volume.clone(),
                    target: target.clone(),
                    rpo_secs: p.rpo.as_secs(),
                    running: p.running,
                    queued: !p.running
                        && (p.again || p.next_due <= now)
                        && !self.paused.contains_key(volume.as_str())
                        && any_running
                        && self.platforms.held_back(&self.topology, self.local, volume).is_none(),
                    next_in_secs: p.next_due.saturating_duration_since(now).as_secs_f64(),
                    last_ok: p.last_ok.clone(),
                    last_error: p.last_error.clone(),
                    bandwidth: self.bandwidth_status(volume, target),
                    running_sent_payload_bytes: p.progress.as_ref().map(|(sent, _)| sent.load(Ordering::Relaxed)),
                    running_progress: p.progress.as_ref().map(|(sent, read)| {
                        RunningProgress::of(p.started_at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)), sent.load(Ordering::Relaxed), read)
                    }),
                    paused_since_unix_ms: self.paused.get(volume.as_str()).copied(),
                    totals: p.totals,
                    proxy: self.platforms.role(&self.topology, self.local, volume),
                })
                .collect(),
        )
    }
}

/// Asks for the kernel module's view of the `kmod` volumes this node is the
/// source of (`drmesh ctl agent-status`): attached devices, bitmap size, COW
/// store use, changes pending per target.
#[derive(Message)]
#[rtype(result = "Result<Vec<KmodDeviceReport>, String>")]
pub struct GetAgentStatus;

impl Handler<GetAgentStatus> for VolumeScheduler {
    type Result = ResponseFuture<Result<Vec<KmodDeviceReport>, String>>;

    fn handle(&mut self, _msg: GetAgentStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let me = self.local_name();
        let specs: Vec<(VolumeName, KmodSpec)> = self
            .topology
            .volumes
            .iter()
            .filter(|v| v.source == me)
            .filter_map(|v| KmodSpec::of(v).map(|spec| (v.name.clone(), spec)))
            .collect();
        let baselines = self.baselines.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || specs.iter().map(|(v, s)| device_report(&baselines, v, s)).collect())
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// `2026-11-22 04:05:06` for a Unix time in ms (UTC), for messages.
fn utc_text(unix_ms: u64) -> String {
    i64::try_from(unix_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| format!("{unix_ms} ms after 1970"), |t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
}

/// Which volumes a pause or resume acts on.
#[derive(Debug, Clone)]
pub enum VolumeSelection {
    /// These volumes (this node must be the source of each).
    Named(Vec<VolumeName>),
    /// Every volume this node is the source of.
    All,
}

impl VolumeScheduler {
    fn select(&self, selection: VolumeSelection) -> Result<Vec<VolumeName>, String> {
        match selection {
            VolumeSelection::All => Ok(self.own_volumes()),
            VolumeSelection::Named(names) => {
                if names.is_empty() {
                    return Err("name a volume, or give --all".into());
                }
                let errors: Vec<String> = names.iter().filter_map(|v| self.check_source(v).err()).collect();
                if errors.is_empty() {
                    Ok(names)
                } else {
                    Err(errors.join("; "))
                }
            }
        }
    }
}

/// Pauses volumes: stops their running cycles and starts none until `Resume`.
/// Answers once every stopped cycle has ended.
#[derive(Message)]
#[rtype(result = "Result<Vec<PauseOutcome>, String>")]
pub struct Pause(pub VolumeSelection);

impl Handler<Pause> for VolumeScheduler {
    type Result = ResponseFuture<Result<Vec<PauseOutcome>, String>>;

    fn handle(&mut self, msg: Pause, _ctx: &mut Context<Self>) -> Self::Result {
        let volumes = match self.select(msg.0) {
            Ok(v) => v,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let now = now_ms();
        let mut pending = Vec::new();
        for volume in volumes {
            let already = self.paused.get(volume.as_str()).copied();
            let since = already.unwrap_or(now);
            if already.is_none() {
                if let Err(e) = self.baselines.set_paused(&volume, Some(since)) {
                    let reason = format!("cannot record the pause of {volume}: {e}");
                    return Box::pin(async move { Err(reason) });
                }
                self.paused.insert(volume.to_string(), since);
                tracing::info!(%volume, "volume paused");
            }
            let mut running = Vec::new();
            for ((v, target), plan) in self.plans.iter_mut().filter(|((v, _), _)| *v == volume) {
                plan.again = false;
                if !plan.running {
                    continue;
                }
                if let Some(cancel) = plan.cancel.take() {
                    let _ = cancel.send(PAUSED_REASON.to_string());
                }
                let (tx, rx) = oneshot::channel();
                plan.waiters.push(tx);
                running.push((target.clone(), rx));
                tracing::info!(volume = %v, %target, "stopping the running cycle: paused");
            }
            pending.push((volume, since, already.is_some(), running));
        }
        Box::pin(async move {
            let mut out = Vec::new();
            for (volume, since, already_paused, running) in pending {
                let mut outcome = PauseOutcome {
                    volume,
                    paused_since_unix_ms: since,
                    already_paused,
                    cycles_stopped: Vec::new(),
                    cycles_committed: Vec::new(),
                };
                for (target, rx) in running {
                    match rx.await {
                        Ok(Ok(_)) => outcome.cycles_committed.push(target),
                        _ => outcome.cycles_stopped.push(target),
                    }
                }
                out.push(outcome);
            }
            Ok(out)
        })
    }
}

/// Resumes paused volumes: a cycle of each starts at once.
#[derive(Message)]
#[rtype(result = "Result<Vec<ResumeOutcome>, String>")]
pub struct Resume(pub VolumeSelection);

impl Handler<Resume> for VolumeScheduler {
    type Result = Result<Vec<ResumeOutcome>, String>;

    fn handle(&mut self, msg: Resume, ctx: &mut Context<Self>) -> Self::Result {
        let volumes = self.select(msg.0)?;
        let mut out = Vec::new();
        for volume in volumes {
            let since = self.paused.get(volume.as_str()).copied();
            if since.is_some() {
                self.baselines.set_paused(&volume, None).map_err(|e| format!("cannot record the resume of {volume}: {e}"))?;
                self.paused.remove(volume.as_str());
                tracing::info!(%volume, "volume resumed");
                let keys: Vec<Key> = self.plans.keys().filter(|(v, _)| *v == volume).cloned().collect();
                for key in keys {
                    let Some(plan) = self.plans.get_mut(&key) else { continue };
                    plan.next_due = Instant::now();
                    if plan.running {
                        // A stopped cycle is still ending: the next one follows it at once.
                        plan.again = true;
                    } else {
                        self.start(key, ctx);
                    }
                }
            }
            out.push(ResumeOutcome { volume, was_paused: since.is_some(), paused_since_unix_ms: since });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drmesh_topology::Weekday;
    use jiff::tz::{Offset, TimeZone};

    #[test]
    fn a_cycle_is_bounded_by_its_volume_and_the_windows() {
        assert_eq!(cycle_bound(Some(16 << 20)), (16 << 20) + CYCLE_FIXED_BYTES);
        assert_eq!(cycle_bound(Some(8 << 30)), CYCLE_WINDOW_BYTES + CYCLE_FIXED_BYTES);
        assert_eq!(cycle_bound(None), CYCLE_WINDOW_BYTES + CYCLE_FIXED_BYTES);
        // The budget takes one cycle of any size, and many small ones.
        assert!(cycle_bound(None) <= CYCLE_MEMORY_BUDGET);
        assert!(CYCLE_MEMORY_BUDGET / cycle_bound(Some(16 << 20)) >= 10);
    }

    #[test]
    fn progress_says_how_far_and_how_long_still() {
        let read = ReadProgress::default();
        // Before the view is open.
        let p = RunningProgress::of(Duration::from_secs(3), 0, &read);
        assert_eq!((p.volume_bytes, p.percent, p.eta_secs), (0, 0.0, None));
        read.block_bytes.store(1 << 20, Ordering::Relaxed);
        read.block_count.store(2048, Ordering::Relaxed);
        read.blocks_done.store(512, Ordering::Relaxed);
        let p = RunningProgress::of(Duration::from_secs(10), 123, &read);
        assert_eq!((p.position_bytes, p.volume_bytes, p.percent, p.sent_payload_bytes), (512 << 20, 2048 << 20, 25.0, 123));
        assert_eq!(p.eta_secs, Some(30.0));
        // Too early to say.
        assert_eq!(RunningProgress::of(Duration::from_millis(500), 0, &read).eta_secs, None);
    }

    #[test]
    fn the_rpo_is_missed_when_the_newest_rp_is_older_than_it() {
        let rpo = Duration::from_secs(60);
        assert_eq!(rpo_missed(Some(1_000_000), 0, rpo, 1_060_000), (false, 60_000));
        assert_eq!(rpo_missed(Some(1_000_000), 0, rpo, 1_060_001), (true, 60_001));
        // No RP yet: counted from when the replication began.
        assert_eq!(rpo_missed(None, 1_000_000, rpo, 1_030_000), (false, 30_000));
        assert_eq!(rpo_missed(None, 1_000_000, rpo, 1_090_000), (true, 90_000));
        // A clock that went back: not missed.
        assert_eq!(rpo_missed(Some(2_000_000), 0, rpo, 1_000_000), (false, 0));
    }

    #[test]
    fn the_next_cycle_starts_early_enough_to_keep_the_newest_rp_within_the_rpo() {
        let t0 = Instant::now();
        let rpo = Duration::from_secs(60);
        // A 4 s cycle: the next one starts 60 - (4 + 1 + 1) = 54 s after this one
        // started, so its RP exists ~58 s after this one's instant, within the RPO.
        assert_eq!(next_due(t0, t0 + Duration::from_secs(4), rpo, true), t0 + Duration::from_secs(54));
        // A short RPO: never sooner than half the RPO after the start.
        let rpo = Duration::from_secs(5);
        assert_eq!(next_due(t0, t0 + Duration::from_millis(1200), rpo, true), t0 + Duration::from_millis(2500));
        assert_eq!(next_due(t0, t0 + Duration::from_millis(100), rpo, true), t0 + Duration::from_millis(5000 - 1125));
        // A cycle longer than the RPO: the next one at once.
        let late = t0 + Duration::from_secs(7);
        assert_eq!(next_due(t0, late, rpo, true), late);
        // A failure: a retry 10 s after the end, or sooner when the RPO is shorter.
        assert_eq!(next_due(t0, t0 + Duration::from_secs(1), Duration::from_secs(60), false), t0 + Duration::from_secs(11));
        assert_eq!(next_due(t0, t0 + Duration::from_secs(1), rpo, false), t0 + Duration::from_secs(6));
    }

    #[test]
    fn local_time_is_the_zone_wall_clock() {
        // Friday 23:30 at UTC+2 is Friday 21:30 UTC: windows follow the local wall clock.
        let zone = TimeZone::fixed(Offset::from_hours(2).expect("valid offset"));
        let at = jiff::civil::date(2026, 11, 20).at(23, 30, 0, 0).to_zoned(zone).expect("valid time");
        assert_eq!(local_time_of(&at), LocalTime { weekday: Weekday::Fri, minute: 23 * 60 + 30 });
        let utc = at.with_time_zone(TimeZone::UTC);
        assert_eq!(local_time_of(&utc), LocalTime { weekday: Weekday::Fri, minute: 21 * 60 + 30 });
        let sunday = jiff::civil::date(2026, 11, 22).at(0, 0, 0, 0).to_zoned(TimeZone::UTC).expect("valid time");
        assert_eq!(local_time_of(&sunday), LocalTime { weekday: Weekday::Sun, minute: 0 });
    }

    #[test]
    fn utc_text_formats_civil_time() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00");
        assert_eq!(utc_text(1_795_307_094_000), "2026-11-22 00:24:54");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29 00:00:00");
    }
}

//! Gossip core (sans-IO): mesh membership, node health and the recovery-point
//! catalog, replicated on every node.
//!
//! - **Membership** is SWIM, run by [foca]: probes, indirect probes, suspicion,
//!   down. foca is sans-IO, takes its RNG at construction and reports timers
//!   through a runtime trait, so it runs unchanged under real time (the actor)
//!   and virtual time (simnet).
//! - **Catalog** ([`catalog`]) is a state-based CRDT owned per holder, with
//!   low-water marks and expiring tombstones for deletions.
//! - **Dissemination**: each local write rides foca packets as a custom
//!   broadcast (epidemic, a few hops per gossip period), and a periodic
//!   anti-entropy round (digest → detail → items, see [`wire::SyncMsg`]) with a
//!   random member repairs whatever the epidemic missed, including after a
//!   partition of hours.
//!
//! Driving it: feed `handle_*` with the current [`Millis`] and inputs, then drain
//! [`GossipNode::poll_transmit`] (datagrams to send, ≤ 1200 bytes),
//! [`GossipNode::poll_timer`] (call [`GossipNode::handle_timer`] at each
//! deadline) and [`GossipNode::poll_event`]. Nothing here reads a clock, does
//! I/O or iterates a hash map, so a run is reproducible from its seed.

pub mod catalog;
pub mod wire;

use std::collections::VecDeque;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use drmesh_topology::NodeId;
use foca::{BroadcastHandler, Foca, Notification, PostcardCodec, Runtime};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use catalog::{
    cut_text, prefix_of, Catalog, Item, ItemKey, ItemValue, Merge, NodeStatus, RpInfo, ScrubResult, ScrubVerdict, VolumeHealth,
    VolumeName, BUCKETS, DRILL_CHECKS_MAX, SCRUB_DAMAGED_MAX,
};
use crate::bandwidth::Demand;
use crate::blob::RpSeq;
use wire::{encode_sync, Delta, DeltaKey, DetailEntry, SyncMsg, DATAGRAM_BYTES_MAX, TAG_FOCA, TAG_SYNC};

pub use crate::time::Millis;

/// A node as foca sees it: the node id plus a generation that grows at each
/// restart (and at each automatic rejoin after being declared down), so a
/// restarted node wins over the memory of its previous life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberId {
    /// The node.
    pub node: NodeId,
    /// Restart generation; the higher one wins.
    pub generation: u32,
}

impl foca::Identity for MemberId {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(MemberId { node: self.node, generation: self.generation.wrapping_add(1) })
    }

    fn addr(&self) -> NodeId {
        self.node
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// Tunables of one gossip node. [`GossipConfig::for_cluster`] gives sane values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipConfig {
    /// SWIM probe period.
    pub probe_period: Duration,
    /// Wait for a direct ack before indirect probes.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a suspect member has to refute before it is declared down.
    pub suspect_to_down_after: Duration,
    /// How long a down identity is remembered.
    pub remove_down_after: Duration,
    /// Times each update / catalog delta is piggybacked.
    pub max_transmissions: u8,
    /// Period of the epidemic push of pending updates.
    pub gossip_period: Duration,
    /// Members pushed to per gossip period.
    pub gossip_fanout: usize,
    /// Period of the anti-entropy round with one random member.
    pub anti_entropy_period: Duration,
    /// Most datagrams one anti-entropy message may trigger in reply.
    pub sync_datagrams_max: usize,
    /// How long a tombstone is kept after this node learned it.
    pub tombstone_ttl: Duration,
    /// Period of the tombstone sweep.
    pub sweep_period: Duration,
}

impl GossipConfig {
    /// Defaults for a mesh of about `cluster_size` nodes over WAN-ish links.
    pub fn for_cluster(cluster_size: u32) -> Self {
        let size = f64::from(cluster_size.max(2));
        let probe_period = Duration::from_secs(1);
        // foca's / memberlist's suspicion scaling: a few probe periods × log10(n).
        let suspect_ms = (4.0 * size.log10().max(1.0) * 1000.0) as u64;
        GossipConfig {
            probe_period,
            probe_rtt: Duration::from_millis(400),
            indirect_probes: 3,
            suspect_to_down_after: Duration::from_millis(suspect_ms),
            remove_down_after: Duration::from_secs(6 * 3600),
            max_transmissions: (4.0 * (size + 1.0).log10()).clamp(4.0, 20.0) as u8,
            gossip_period: Duration::from_millis(200),
            gossip_fanout: 3,
            anti_entropy_period: Duration::from_secs(5),
            sync_datagrams_max: 64,
            tombstone_ttl: Duration::from_secs(7 * 24 * 3600),
            sweep_period: Duration::from_secs(60),
        }
    }

    fn foca(&self) -> foca::Config {
        let mut c = foca::Config::new_wan(NonZeroU32::MIN);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.num_indirect_probes = NonZeroUsize::new(self.indirect_probes.max(1)).unwrap_or(NonZeroUsize::MIN);
        c.suspect_to_down_after = self.suspect_to_down_after;
        c.remove_down_after = self.remove_down_after;
        c.max_transmissions = NonZeroU8::new(self.max_transmissions.max(1)).unwrap_or(NonZeroU8::MIN);
        c.max_packet_size = NonZeroUsize::new(DATAGRAM_BYTES_MAX - 1).unwrap_or(NonZeroUsize::MIN);
        c.notify_down_members = true;
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_period,
            num_members: NonZeroUsize::new(self.gossip_fanout.max(1)).unwrap_or(NonZeroUsize::MIN),
        });
        c
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TimerKind {
    Foca(foca::Timer<MemberId>),
    AntiEntropy,
    Sweep,
}

/// A timer the driver must fire back through [`GossipNode::handle_timer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipTimer(TimerKind);

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination node.
    pub to: NodeId,
    /// Payload, at most [`wire::DATAGRAM_BYTES_MAX`] bytes.
    pub bytes: Vec<u8>,
}

/// Something the node (or simnet) may want to react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipEvent {
    /// A member became active (joined, or came back).
    MemberUp(NodeId),
    /// A member was declared down.
    MemberDown(NodeId),
    /// This node's replica changed under `key` of `holder` (new, updated or removed item).
    CatalogChanged {
        /// The node the item belongs to.
        holder: NodeId,
        /// Which item.
        key: ItemKey,
    },
    /// The cluster had declared this node down; it rejoined under a new generation.
    Rejoined {
        /// The new generation.
        generation: u32,
    },
}

/// Membership state of a member, as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Answers probes.
    Alive,
    /// Someone failed to reach it; it has a while to refute.
    Suspect,
    /// Declared down.
    Down,
}

/// One row of `drmesh ctl mesh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// The member.
    pub node: NodeId,
    /// Its generation as last seen.
    pub generation: u32,
    /// Alive / suspect / down.
    pub state: MemberState,
    /// Last local time a datagram came straight from it.
    pub last_heard: Option<Millis>,
    /// Its self-description and when this node learned it.
    pub status: Option<(NodeStatus, Millis)>,
}

/// One row of `drmesh ctl rps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpView {
    /// Node holding the RP.
    pub holder: NodeId,
    /// Volume.
    pub volume: VolumeName,
    /// Sequence number.
    pub seq: RpSeq,
    /// What is known about it.
    pub info: RpInfo,
    /// What the holder's newest scrub said of it, if it checked it.
    pub scrub: Option<ScrubVerdict>,
    /// When this node learned the current value (freshness).
    pub learned_at: Millis,
}

/// Replication health of one volume, as published by its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthView {
    /// The source node.
    pub source: NodeId,
    /// Volume.
    pub volume: VolumeName,
    /// The published health.
    pub health: VolumeHealth,
    /// When this node learned it.
    pub learned_at: Millis,
}

/// Errors of the gossip core. None of them changes the replica.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// An empty datagram; dropped.
    #[error("empty gossip datagram")]
    Empty,
    /// A datagram over the size limit; dropped.
    #[error("gossip datagram of {0} bytes exceeds {DATAGRAM_BYTES_MAX}")]
    TooBig(usize),
    /// A datagram with an unknown first byte; dropped.
    #[error("gossip datagram with unknown tag {0:#04x}")]
    UnknownTag(u8),
    /// foca rejected a packet or an input; the membership state is unchanged.
    #[error("membership (foca): {0}")]
    Membership(String),
    /// An anti-entropy message did not decode; dropped.
    #[error("anti-entropy message does not decode: {0}")]
    Sync(#[from] postcard::Error),
    /// A replica snapshot that is not ours or not this version; nothing restored.
    #[error("replica snapshot has a bad magic or version")]
    SnapshotHeader,
}

/// Error of the catalog broadcast handler (a delta that does not decode).
#[derive(Debug, thiserror::Error)]
#[error("catalog delta does not decode: {0}")]
pub struct DeltaError(String);

type Shared = Arc<Mutex<Catalog>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Catalog> {
    // The lock is never held across a panic point that leaves the catalog torn.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// foca's view of the catalog: merges deltas piggybacked on SWIM packets and
/// tells foca to pass on the ones that were news.
struct CatalogBroadcasts {
    shared: Shared,
}

impl BroadcastHandler<MemberId> for CatalogBroadcasts {
    type Key = DeltaKey;
    type Error = DeltaError;

    fn receive_item(&mut self, data: &[u8], sender: Option<&MemberId>) -> Result<Option<DeltaKey>, DeltaError> {
        let delta: Delta = postcard::from_bytes(data).map_err(|e| DeltaError(e.to_string()))?;
        let key = DeltaKey { holder: delta.holder, key: delta.item.key.clone(), version: delta.item.version };
        if sender.is_none() {
            // Our own write, already in the catalog: always broadcast it.
            return Ok(Some(key));
        }
        let mut catalog = lock(&self.shared);
        let merged = catalog.merge(delta.holder, delta.item);
        // Relay RP news epidemically; status and health only travel from their
        // owner's own pushes and anti-entropy (they change rarely and a cold
        // start of n nodes would otherwise queue n statuses on every node).
        let relay = catalog.relay_open && matches!(key.key, ItemKey::Rp(..) | ItemKey::Lwm(_));
        Ok((merged == Merge::Changed && relay).then_some(key))
    }
}

/// Collects what foca wants done during one call.
struct Outputs<'a> {
    now: Millis,
    transmits: &'a mut VecDeque<Transmit>,
    timers: &'a mut VecDeque<(Millis, GossipTimer)>,
    events: &'a mut VecDeque<GossipEvent>,
}

impl Runtime<MemberId> for Outputs<'_> {
    fn notify(&mut self, notification: Notification<'_, MemberId>) {
        match notification {
            Notification::MemberUp(m) => self.events.push_back(GossipEvent::MemberUp(m.node)),
            Notification::MemberDown(m) => self.events.push_back(GossipEvent::MemberDown(m.node)),
            Notification::Rejoin(m) => self.events.push_back(GossipEvent::Rejoined { generation: m.generation }),
            _ => {}
        }
    }

    fn send_to(&mut self, to: MemberId, data: &[u8]) {
        let mut bytes = Vec::with_capacity(data.len() + 1);
        bytes.push(TAG_FOCA);
        bytes.extend_from_slice(data);
        self.transmits.push_back(Transmit { to: to.node, bytes });
    }

    fn submit_after(&mut self, event: foca::Timer<MemberId>, after: Duration) {
        self.timers.push_back((self.now.after(after), GossipTimer(TimerKind::Foca(event))));
    }
}

/// Received deltas are relayed only while foca's broadcast queue is shorter
/// than this; beyond it anti-entropy carries them (bounds CPU and memory).
pub const RELAY_BACKLOG_MAX: usize = 128;

/// Magic and version at the head of a replica snapshot.
const SNAPSHOT_MAGIC: &[u8; 6] = b"DRMG\x00\x01";

/// One node's gossip state machine.
pub struct GossipNode {
    me: NodeId,
    generation: u32,
    config: GossipConfig,
    foca: Foca<MemberId, PostcardCodec, SmallRng, CatalogBroadcasts>,
    shared: Shared,
    rng: SmallRng,
    transmits: VecDeque<Transmit>,
    timers: VecDeque<(Millis, GossipTimer)>,
    events: VecDeque<GossipEvent>,
}

impl std::fmt::Debug for GossipNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipNode").field("me", &self.me).field("generation", &self.generation).finish_non_exhaustive()
    }
}

impl GossipNode {
    /// A node with an empty replica. `generation` must grow across restarts of
    /// the same node id (a persisted boot counter, or Unix seconds at start);
    /// `seed` drives every random choice.
    pub fn new(now: Millis, me: NodeId, generation: u32, config: GossipConfig, seed: u64) -> Self {
        Self::with_catalog(now, Catalog::new(me), generation, config, seed)
    }

    /// A node whose replica comes from [`GossipNode::snapshot`] (taken by a
    /// previous run of the same node).
    pub fn restore(
        now: Millis,
        me: NodeId,
        generation: u32,
        config: GossipConfig,
        seed: u64,
        snapshot: &[u8],
    ) -> Result<Self, GossipError> {
        let body = snapshot.strip_prefix(SNAPSHOT_MAGIC.as_slice()).ok_or(GossipError::SnapshotHeader)?;
        let mut catalog: Catalog = postcard::from_bytes(body)?;
        if catalog.me != me {
            return Err(GossipError::SnapshotHeader);
        }
        catalog.rebuild_buckets();
        // Learned-at times belong to the previous run's clock.
        for state in catalog.holders.values_mut() {
            state.last_heard = None;
            for stored in state.items.values_mut() {
                stored.learned_at = now;
            }
        }
        Ok(Self::with_catalog(now, catalog, generation, config, seed))
    }

    fn with_catalog(now: Millis, mut catalog: Catalog, generation: u32, config: GossipConfig, seed: u64) -> Self {
        catalog.now = now;
        let me = catalog.me;
        let shared = Arc::new(Mutex::new(catalog));
        let foca = Foca::with_custom_broadcast(
            MemberId { node: me, generation },
            config.foca(),
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
            CatalogBroadcasts { shared: shared.clone() },
        );
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let mut timers = VecDeque::new();
        let ae_first = rng.random_range(0..config.anti_entropy_period.as_millis().max(1) as u64);
        timers.push_back((Millis(now.0 + ae_first), GossipTimer(TimerKind::AntiEntropy)));
        timers.push_back((now.after(config.sweep_period), GossipTimer(TimerKind::Sweep)));
        GossipNode {
            me,
            generation,
            config,
            foca,
            shared,
            rng,
            transmits: VecDeque::new(),
            timers,
            events: VecDeque::new(),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// Current generation (grows on automatic rejoin).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Serializes the replica (magic + version + postcard), for redb.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = SNAPSHOT_MAGIC.to_vec();
        // Encoding into a Vec cannot fail for these plain types.
        out.extend(postcard::to_allocvec(&*lock(&self.shared)).unwrap_or_default());
        out
    }

    fn begin(&mut self, now: Millis) {
        let open = self.foca.custom_broadcast_backlog() < RELAY_BACKLOG_MAX;
        let mut catalog = lock(&self.shared);
        catalog.now = now;
        catalog.relay_open = open;
    }

    /// Moves catalog changes into the event queue.
    fn finish(&mut self) {
        let changes = std::mem::take(&mut lock(&self.shared).changes);
        self.events.extend(changes.into_iter().map(|(holder, key)| GossipEvent::CatalogChanged { holder, key }));
        for event in &self.events {
            if let GossipEvent::Rejoined { generation } = event {
                self.generation = *generation;
            }
        }
    }

    /// Asks `peers` (e.g. a few topology nodes) to let this node in.
    pub fn handle_join(&mut self, now: Millis, peers: &[NodeId]) -> Result<(), GossipError> {
        self.begin(now);
        let mut result = Ok(());
        for &node in peers.iter().filter(|&&n| n != self.me) {
            let mut out = Outputs { now, transmits: &mut self.transmits, timers: &mut self.timers, events: &mut self.events };
            if let Err(e) = self.foca.announce(MemberId { node, generation: 0 }, &mut out) {
                result = Err(GossipError::Membership(e.to_string()));
            }
        }
        self.finish();
        result
    }

    /// A datagram arrived from `from` (the peer's pinned node id).
    pub fn handle_datagram(&mut self, now: Millis, from: NodeId, bytes: &[u8]) -> Result<(), GossipError> {
        let (&tag, body) = bytes.split_first().ok_or(GossipError::Empty)?;
        if bytes.len() > DATAGRAM_BYTES_MAX {
            return Err(GossipError::TooBig(bytes.len()));
        }
        self.begin(now);
        if let Some(h) = lock(&self.shared).holders.get_mut(&from) {
            h.last_heard = Some(now);
        }
        let result = match tag {
            TAG_FOCA => {
                let mut out = Outputs { now, transmits: &mut self.transmits, timers: &mut self.timers, events: &mut self.events };
                self.foca.handle_data(body, &mut out).map_err(|e| GossipError::Membership(e.to_string()))
            }
            TAG_SYNC => match postcard::from_bytes::<SyncMsg>(body) {
                Ok(msg) => {
                    self.handle_sync(from, msg);
                    Ok(())
                }
                Err(e) => Err(GossipError::Sync(e)),
            },
            other => Err(GossipError::UnknownTag(other)),
        };
        self.finish();
        result
    }

    /// A timer from [`GossipNode::poll_timer`] is due.
    pub fn handle_timer(&mut self, now: Millis, timer: GossipTimer) -> Result<(), GossipError> {
        self.begin(now);
        let result = match timer.0 {
            TimerKind::Foca(t) => {
                let mut out = Outputs { now, transmits: &mut self.transmits, timers: &mut self.timers, events: &mut self.events };
                self.foca.handle_timer(t, &mut out).map_err(|e| GossipError::Membership(e.to_string()))
            }
            TimerKind::AntiEntropy => {
                self.start_sync_round(now);
                let period = self.config.anti_entropy_period.as_millis().max(1) as u64;
                let next = period - period / 10 + self.rng.random_range(0..=period / 5);
                self.timers.push_back((Millis(now.0 + next), GossipTimer(TimerKind::AntiEntropy)));
                Ok(())
            }
            TimerKind::Sweep => {
                let ttl = u64::try_from(self.config.tombstone_ttl.as_millis()).unwrap_or(u64::MAX);
                lock(&self.shared).sweep(now, ttl);
                self.timers.push_back((now.after(self.config.sweep_period), GossipTimer(TimerKind::Sweep)));
                Ok(())
            }
        };
        self.finish();
        result
    }

    fn write_local(&mut self, now: Millis, key: ItemKey, value: ItemValue) {
        self.begin(now);
        let item = lock(&self.shared).write_local(key, value);
        let delta = Delta { holder: self.me, item };
        // Encoding into a Vec cannot fail for these plain types.
        let data = postcard::to_allocvec(&delta).unwrap_or_default();
        // Items are bounded (names and texts are cut), so this fits; if foca
        // refused it, anti-entropy still carries the write.
        let _ = self.foca.add_broadcast(&data);
        self.finish();
    }

    /// This node committed (or updated, e.g. a drill result) RP `volume@seq`.
    pub fn handle_local_rp(&mut self, now: Millis, volume: &VolumeName, seq: RpSeq, mut info: RpInfo) -> Result<(), GossipError> {
        if let Some(d) = info.drill.as_mut() {
            d.detail = cut_text(&d.detail);
            d.software_version = cut_text(&d.software_version);
            d.checks.truncate(DRILL_CHECKS_MAX);
            for c in &mut d.checks {
                c.check = c.check.chars().take(32).collect();
            }
        }
        self.write_local(now, ItemKey::Rp(volume.clone(), seq), ItemValue::Rp(info));
        Ok(())
    }

    /// This node deleted RP `volume@seq` out of order (a tombstone is gossiped).
    /// Prefer [`GossipNode::handle_rps_expired_below`] when retention removes
    /// the oldest RPs: it needs no tombstone.
    pub fn handle_rp_expired(&mut self, now: Millis, volume: &VolumeName, seq: RpSeq, expired_unix_ms: u64) -> Result<(), GossipError> {
        if seq < lock(&self.shared).lwm(&self.me, volume) {
            return Ok(());
        }
        self.write_local(now, ItemKey::Rp(volume.clone(), seq), ItemValue::RpGone { expired_unix_ms });
        Ok(())
    }

    /// Every RP of `volume` on this node with `seq < below` is gone (retention).
    pub fn handle_rps_expired_below(&mut self, now: Millis, volume: &VolumeName, below: RpSeq) -> Result<(), GossipError> {
        if below <= lock(&self.shared).lwm(&self.me, volume) {
            return Ok(());
        }
        self.write_local(now, ItemKey::Lwm(volume.clone()), ItemValue::Lwm(below));
        Ok(())
    }

    /// This node's self-description changed (start-up, topology reload, upgrade).
    pub fn handle_status(&mut self, now: Millis, mut status: NodeStatus) {
        status.site = cut_text(&status.site);
        status.software_version = cut_text(&status.software_version);
        self.write_local(now, ItemKey::Status, ItemValue::Status(status));
    }

    /// What this node's running transfers want from its site's uplink changed
    /// (a cycle started or ended, a policy window opened or closed).
    pub fn handle_demand(&mut self, now: Millis, demand: Demand) {
        self.write_local(now, ItemKey::Demand, ItemValue::Demand(demand));
    }

    /// A scrub of this node's store checked `volume`'s RPs; publish its result
    /// (its list of damaged RPs sorted and cut to [`SCRUB_DAMAGED_MAX`]).
    pub fn handle_scrub(&mut self, now: Millis, volume: &VolumeName, mut result: ScrubResult) -> Result<(), GossipError> {
        result.damaged.sort_unstable();
        result.damaged.dedup();
        if result.damaged.len() > SCRUB_DAMAGED_MAX {
            result.damaged.truncate(SCRUB_DAMAGED_MAX);
            result.damaged_cut = true;
        }
        result.sample_percent = result.sample_percent.clamp(1, 100);
        self.write_local(now, ItemKey::Scrub(volume.clone()), ItemValue::Scrub(result));
        Ok(())
    }

    /// A cycle of `volume` (sourced here) ended; publish its health.
    pub fn handle_volume_health(&mut self, now: Millis, volume: &VolumeName, mut health: VolumeHealth) -> Result<(), GossipError> {
        health.last_error = health.last_error.as_deref().map(cut_text);
        self.write_local(now, ItemKey::Health(volume.clone()), ItemValue::Health(health));
        Ok(())
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next timer to arm: call [`GossipNode::handle_timer`] with it at the given time.
    pub fn poll_timer(&mut self) -> Option<(Millis, GossipTimer)> {
        self.timers.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<GossipEvent> {
        self.events.pop_front()
    }

    /// Membership and health of every member this node knows (its newest
    /// generation), sorted by node id.
    pub fn members(&self) -> Vec<MemberView> {
        let catalog = lock(&self.shared);
        let mut out: Vec<MemberView> = self
            .foca
            .iter_membership_state()
            .map(|m| {
                let holder = catalog.holders.get(&m.id().node);
                MemberView {
                    node: m.id().node,
                    generation: m.id().generation,
                    state: match m.state() {
                        foca::State::Alive => MemberState::Alive,
                        foca::State::Suspect => MemberState::Suspect,
                        foca::State::Down => MemberState::Down,
                    },
                    last_heard: holder.and_then(|h| h.last_heard),
                    status: holder.and_then(|h| match h.items.get(&ItemKey::Status) {
                        Some(s) => match &s.value {
                            ItemValue::Status(st) => Some((st.clone(), s.learned_at)),
                            _ => None,
                        },
                        None => None,
                    }),
                }
            })
            .collect();
        // After a rejoin, foca still remembers the previous generation as down
        // for a while: show each node once, as its newest generation.
        out.sort_by_key(|m| (m.node, std::cmp::Reverse(m.generation)));
        out.dedup_by_key(|m| m.node);
        out
    }

    /// The uplink demands of the active members (alive or suspect, self
    /// excluded) that published one, sorted by node id.
    pub fn demands(&self) -> Vec<(NodeId, Demand)> {
        let catalog = lock(&self.shared);
        let mut out: Vec<(NodeId, Demand)> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() != foca::State::Down)
            .filter_map(|m| {
                let holder = catalog.holders.get(&m.id().node)?;
                match holder.items.get(&ItemKey::Demand).map(|s| &s.value) {
                    Some(ItemValue::Demand(d)) => Some((m.id().node, *d)),
                    _ => None,
                }
            })
            .collect();
        out.sort_by_key(|(node, _)| *node);
        out
    }

    /// Number of members foca considers active (alive or suspect), self excluded.
    pub fn active_members(&self) -> usize {
        self.foca.num_members()
    }

    /// Every live RP in the replica, sorted by (holder, volume, seq).
    pub fn rps(&self) -> Vec<RpView> {
        let catalog = lock(&self.shared);
        let mut out = Vec::new();
        for (holder, state) in &catalog.holders {
            for (key, stored) in state.items.iter() {
                if let (ItemKey::Rp(volume, seq), ItemValue::Rp(info)) = (key, &stored.value) {
                    let scrub = match state.items.get(&ItemKey::Scrub(volume.clone())).map(|s| &s.value) {
                        Some(ItemValue::Scrub(result)) => result.verdict(*seq),
                        _ => None,
                    };
                    out.push(RpView {
                        holder: *holder,
                        volume: volume.clone(),
                        seq: *seq,
                        info: info.clone(),
                        scrub,
                        learned_at: stored.learned_at,
                    });
                }
            }
        }
        out
    }

    /// Whether the replica holds RP `volume@seq` of `holder` as live.
    pub fn has_rp(&self, holder: &NodeId, volume: &VolumeName, seq: RpSeq) -> bool {
        lock(&self.shared).holders.get(holder).is_some_and(|h| {
            matches!(h.items.get(&ItemKey::Rp(volume.clone(), seq)), Some(s) if matches!(s.value, ItemValue::Rp(_)))
        })
    }

    /// Published health of every volume, sorted by (source, volume).
    pub fn volume_health(&self) -> Vec<HealthView> {
        let catalog = lock(&self.shared);
        let mut out = Vec::new();
        for (holder, state) in &catalog.holders {
            for (key, stored) in state.items.iter() {
                if let (ItemKey::Health(volume), ItemValue::Health(health)) = (key, &stored.value) {
                    out.push(HealthView { source: *holder, volume: volume.clone(), health: health.clone(), learned_at: stored.learned_at });
                }
            }
        }
        out
    }

    /// Number of holders and items in the replica (for metrics).
    pub fn replica_size(&self) -> (usize, usize) {
        let catalog = lock(&self.shared);
        (catalog.holders.len(), catalog.holders.values().map(|h| h.items.len()).sum())
    }

    // ---- anti-entropy ----

    fn send_sync(&mut self, to: NodeId, msg: &SyncMsg) {
        let bytes = encode_sync(msg);
        debug_assert!(bytes.len() <= DATAGRAM_BYTES_MAX, "sync message of {} bytes", bytes.len());
        self.transmits.push_back(Transmit { to, bytes });
    }

    /// Picks a random known member (alive, suspect or down: down ones help a
    /// healed partition converge before SWIM notices) and sends our digest.
    fn start_sync_round(&mut self, now: Millis) {
        let n = self.foca.iter_membership_state().len();
        if n == 0 {
            return;
        }
        let pick = self.rng.random_range(0..n);
        let Some((peer, down)) = self.foca.iter_membership_state().nth(pick).map(|m| (m.id().node, m.state() == foca::State::Down)) else {
            return;
        };
        if down {
            // SWIM never probes a down member. After a partition in which both
            // sides declared each other down, nobody would speak first: an
            // announce does. If the peer thinks we are down too, it answers
            // "turn undead", we rejoin under a new generation, and both sides
            // learn each other again.
            let mut out = Outputs { now, transmits: &mut self.transmits, timers: &mut self.timers, events: &mut self.events };
            let _ = self.foca.announce(MemberId { node: peer, generation: 0 }, &mut out);
        }
        let buckets: Vec<u8> = lock(&self.shared).buckets.iter().flat_map(|h| h.to_le_bytes()).collect();
        self.send_sync(peer, &SyncMsg::Digest { buckets });
    }

    fn handle_sync(&mut self, from: NodeId, msg: SyncMsg) {
        match msg {
            SyncMsg::Digest { buckets } => {
                if buckets.len() != BUCKETS * 4 {
                    return;
                }
                let differing: Vec<usize> = {
                    let catalog = lock(&self.shared);
                    (0..BUCKETS)
                        .filter(|&i| {
                            let theirs = u32::from_le_bytes([buckets[4 * i], buckets[4 * i + 1], buckets[4 * i + 2], buckets[4 * i + 3]]);
                            theirs != catalog.buckets[i]
                        })
                        .collect()
                };
                if differing.is_empty() {
                    return;
                }
                // Start at a random differing bucket so capped rounds cover everything over time.
                let start = self.rng.random_range(0..differing.len());
                let mut budget = self.config.sync_datagrams_max;
                for k in 0..differing.len() {
                    let b = differing[(start + k) % differing.len()] as u8;
                    let lo = [b, 0, 0, 0, 0, 0, 0, 0];
                    let hi = [b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
                    if !self.send_detail(from, true, lo, hi, &mut budget) {
                        break;
                    }
                }
            }
            SyncMsg::Detail { reply, lo, hi, entries } => {
                if lo > hi {
                    return;
                }
                let mut budget = self.config.sync_datagrams_max;
                if reply {
                    self.send_detail(from, false, lo, hi, &mut budget);
                }
                let theirs: std::collections::BTreeMap<[u8; 8], u64> = entries.into_iter().collect();
                let ahead: Vec<(NodeId, u64)> = {
                    let catalog = lock(&self.shared);
                    catalog
                        .holders
                        .range(prefix_range(lo, hi))
                        .filter_map(|(h, s)| {
                            let their = theirs.get(&prefix_of(h)).copied();
                            match their {
                                Some(c) if c >= s.contig => None,
                                _ => Some((*h, their.unwrap_or(0))),
                            }
                        })
                        .collect()
                };
                for (holder, their) in ahead {
                    if budget == 0 {
                        break;
                    }
                    self.push_items(from, holder, their, &mut budget);
                }
            }
            SyncMsg::Items { holder, from: start, upto, items } => {
                let mut catalog = lock(&self.shared);
                for item in items {
                    catalog.merge(holder, item);
                }
                if holder != self.me && catalog.holders.get(&holder).map_or(0, |h| h.contig) >= start {
                    catalog.set_contig(holder, upto);
                }
            }
        }
    }

    /// Sends our `(prefix, contig)` entries in `lo..=hi`, chunked. Returns false when the budget ran out.
    fn send_detail(&mut self, to: NodeId, reply: bool, lo: [u8; 8], hi: [u8; 8], budget: &mut usize) -> bool {
        const PER_CHUNK: usize = 60;
        let entries: Vec<DetailEntry> = lock(&self.shared)
            .holders
            .range(prefix_range(lo, hi))
            .map(|(h, s)| (prefix_of(h), s.contig))
            .collect();
        let mut chunk_lo = lo;
        let mut chunks = entries.chunks(PER_CHUNK).peekable();
        if entries.is_empty() {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            self.send_sync(to, &SyncMsg::Detail { reply, lo, hi, entries: Vec::new() });
            return true;
        }
        while let Some(chunk) = chunks.next() {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            let last = chunks.peek().is_none();
            let chunk_hi = if last { hi } else { chunk[chunk.len() - 1].0 };
            self.send_sync(to, &SyncMsg::Detail { reply, lo: chunk_lo, hi: chunk_hi, entries: chunk.to_vec() });
            chunk_lo = (u64::from_be_bytes(chunk_hi).saturating_add(1)).to_be_bytes();
        }
        true
    }

    /// Sends `holder`'s items newer than `their` contig, chunked to datagrams.
    fn push_items(&mut self, to: NodeId, holder: NodeId, their: u64, budget: &mut usize) {
        const OVERHEAD: usize = 1 + 1 + 32 + 10 + 10 + 3;
        let (mine, encoded): (u64, Vec<(u64, usize, Item)>) = {
            let catalog = lock(&self.shared);
            let mine = catalog.holders.get(&holder).map_or(0, |h| h.contig);
            let encoded = catalog
                .items_after(&holder, their)
                .into_iter()
                .map(|item| {
                    let size = postcard::experimental::serialized_size(&item).unwrap_or(DATAGRAM_BYTES_MAX);
                    (item.version, size, item)
                })
                .collect();
            (mine, encoded)
        };
        let mut from = their;
        let mut items = Vec::new();
        let mut size = OVERHEAD;
        let mut last_version = their;
        for (version, item_size, item) in encoded {
            if size + item_size > DATAGRAM_BYTES_MAX && !items.is_empty() {
                if *budget == 0 {
                    return;
                }
                *budget -= 1;
                let upto = last_version.min(mine).max(from);
                self.send_sync(to, &SyncMsg::Items { holder, from, upto, items: std::mem::take(&mut items) });
                from = upto;
                size = OVERHEAD;
            }
            size += item_size;
            last_version = version;
            items.push(item);
        }
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        self.send_sync(to, &SyncMsg::Items { holder, from, upto: mine.max(from), items });
    }
}

/// Node ids whose 8-byte prefix is in `lo..=hi`.
fn prefix_range(lo: [u8; 8], hi: [u8; 8]) -> std::ops::RangeInclusive<NodeId> {
    let mut a = [0u8; 32];
    a[..8].copy_from_slice(&lo);
    let mut b = [0xffu8; 32];
    b[..8].copy_from_slice(&hi);
    NodeId::from_bytes(a)..=NodeId::from_bytes(b)
}

#[cfg(test)]
mod tests;

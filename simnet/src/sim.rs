//! The event loop, the network model and the checkers.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use drmesh_actors::blob::{RpSeq, VolumeName};
use drmesh_actors::proto::gossip::catalog::{Consistency, ItemKey, NodeStatus, RpInfo};
use drmesh_actors::proto::gossip::{GossipConfig, GossipEvent, GossipNode, GossipTimer, MemberState, Millis};
use drmesh_topology::NodeId;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::scenario::{Op, Scenario};

/// Link model. Nodes live in sites (node `i` in site `i % sites`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    /// One-way latency between two nodes of the same site.
    pub latency_ms: u64,
    /// One-way latency between sites.
    pub wan_latency_ms: u64,
    /// Extra one-way delay, uniform in `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Egress bandwidth of each node, bytes per second (0 = unlimited).
    pub bandwidth_bytes_per_s: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { latency_ms: 2, wan_latency_ms: 40, jitter_ms: 10, loss: 0.0, bandwidth_bytes_per_s: 12_500_000 }
    }
}

/// Everything a run needs besides the scenario.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Number of sites.
    pub sites: usize,
    /// Seed of every random choice (network and nodes).
    pub seed: u64,
    /// Links.
    pub net: NetConfig,
    /// Gossip tunables used by every node.
    pub gossip: GossipConfig,
}

impl SimConfig {
    /// Defaults for `nodes` nodes in 4 sites.
    pub fn new(nodes: usize, seed: u64) -> Self {
        SimConfig {
            nodes,
            sites: 4,
            seed,
            net: NetConfig::default(),
            gossip: GossipConfig::for_cluster(u32::try_from(nodes).unwrap_or(u32::MAX)),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Nodes simulated.
    pub nodes: usize,
    /// Simulated time.
    pub sim_ms: u64,
    /// Events processed.
    pub events: u64,
    /// Datagrams sent (before loss).
    pub messages: u64,
    /// Bytes sent (before loss).
    pub bytes: u64,
    /// Datagrams lost to loss or partitions.
    pub dropped: u64,
    /// RPs committed.
    pub rps_committed: usize,
    /// Of those, RPs expired by the scenario.
    pub rps_expired: usize,
    /// Convergence time of each RP that reached every eligible node, sorted (ms).
    pub convergence_ms: Vec<u64>,
    /// (RP, live node) pairs where the live node never learned a non-expired RP.
    pub unconverged: usize,
    /// Times a node saw an RP live again after it had seen it expire.
    pub resurrections: usize,
    /// Expired RPs still live on some live node at the end.
    pub expired_alive_at_end: usize,
    /// Per crashed node: time until the first live node declared it down (ms).
    pub detect_first_ms: Vec<u64>,
    /// Per crashed node: time until every live node declared it down (ms), when all did.
    pub detect_all_ms: Vec<u64>,
    /// (live node, other live node) pairs where the first does not see the
    /// second as alive at the end: membership that did not heal.
    pub membership_unhealed: usize,
    /// blake3 of the event log.
    pub trace_hash: [u8; 32],
    /// Largest number of pending events.
    pub queue_peak: usize,
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx.min(sorted.len() - 1)).copied()
}

impl Report {
    /// p-quantile (0..=1) of RP convergence, ms.
    pub fn convergence_quantile(&self, p: f64) -> Option<u64> {
        percentile(&self.convergence_ms, p)
    }

    /// Datagrams per node per simulated second.
    pub fn messages_per_node_s(&self) -> f64 {
        self.messages as f64 / self.nodes.max(1) as f64 / (self.sim_ms.max(1) as f64 / 1000.0)
    }

    /// Bytes per node per simulated second.
    pub fn bytes_per_node_s(&self) -> f64 {
        self.bytes as f64 / self.nodes.max(1) as f64 / (self.sim_ms.max(1) as f64 / 1000.0)
    }

    /// Hex of the trace hash.
    pub fn trace_hex(&self) -> String {
        self.trace_hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Human summary, one figure per line.
    pub fn summary(&self) -> String {
        let q = |v: Option<u64>| v.map_or("-".to_string(), |ms| format!("{:.2} s", ms as f64 / 1000.0));
        let mut det_first = self.detect_first_ms.clone();
        det_first.sort_unstable();
        let mut det_all = self.detect_all_ms.clone();
        det_all.sort_unstable();
        format!(
            "scenario {} | {} nodes | {:.0} s simulated | {} events\n\
             RP convergence ({} of {} RPs): p50 {}  p99 {}  max {}\n\
             unconverged (rp, node) pairs: {}  resurrections: {}  expired still alive: {}\n\
             traffic: {:.1} msgs/node/s  {:.0} bytes/node/s  ({} msgs, {} dropped)\n\
             failure detection ({} crashed): first p50 {} max {} | all live nodes p50 {} max {} ({} fully detected)\n\
             trace hash {}  (event queue peak {})",
            self.scenario,
            self.nodes,
            self.sim_ms as f64 / 1000.0,
            self.events,
            self.convergence_ms.len(),
            self.rps_committed,
            q(self.convergence_quantile(0.5)),
            q(self.convergence_quantile(0.99)),
            q(self.convergence_quantile(1.0)),
            self.unconverged,
            self.resurrections,
            self.expired_alive_at_end,
            self.messages_per_node_s(),
            self.bytes_per_node_s(),
            self.messages,
            self.dropped,
            self.detect_first_ms.len(),
            q(percentile(&det_first, 0.5)),
            q(percentile(&det_first, 1.0)),
            q(percentile(&det_all, 0.5)),
            q(percentile(&det_all, 1.0)),
            det_all.len(),
            self.trace_hex(),
            self.queue_peak,
        )
    }
}

/// Peak resident set size of this process (VmHWM), bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

enum EvKind {
    Deliver { to: u32, from: u32, bytes: Vec<u8> },
    Timer { node: u32, epoch: u32, timer: GossipTimer },
    Join { node: u32, epoch: u32 },
    Op(usize),
}

struct Ev {
    at: Millis,
    seq: u64,
    kind: EvKind,
}

impl PartialEq for Ev {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ev {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct SimNode {
    id: NodeId,
    site: usize,
    gossip: Option<GossipNode>,
    epoch: u32,
    saved: Option<Vec<u8>>,
    egress_free_us: u64,
    up_since: Millis,
    next_seq: BTreeMap<VolumeName, RpSeq>,
}

const NEVER: u32 = u32::MAX;

struct RpTrack {
    holder: u32,
    volume: VolumeName,
    seq: RpSeq,
    committed_at: Millis,
    /// Committed while some partition was in place.
    during_partition: bool,
    expired: bool,
    /// Per node: first local time it held the RP live (ms), or `NEVER`.
    learned: Vec<u32>,
    /// Per node: saw it expire.
    gone_seen: Vec<bool>,
}

struct CrashTrack {
    at: Millis,
    detected: BTreeSet<u32>,
    first: Option<Millis>,
    last: Option<Millis>,
}

/// The simulator: nodes, the event queue and the checkers.
pub struct Simulator {
    config: SimConfig,
    scenario: Scenario,
    nodes: Vec<SimNode>,
    index: BTreeMap<NodeId, u32>,
    queue: BinaryHeap<Reverse<Ev>>,
    seq: u64,
    now: Millis,
    rng: SmallRng,
    cut_sites: BTreeSet<usize>,
    last_heal: Millis,
    rps: Vec<RpTrack>,
    rp_index: BTreeMap<(u32, VolumeName, RpSeq), usize>,
    crashes: BTreeMap<u32, CrashTrack>,
    trace: blake3::Hasher,
    report: Report,
}

fn node_id(i: usize) -> NodeId {
    NodeId::from_bytes(*blake3::hash(format!("simnet node {i}").as_bytes()).as_bytes())
}

fn node_seed(seed: u64, node: usize, epoch: u32) -> u64 {
    let h = blake3::hash(format!("{seed}/{node}/{epoch}").as_bytes());
    let b = h.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

impl Simulator {
    /// Builds the mesh; nodes join during the first two simulated seconds.
    pub fn new(config: SimConfig, scenario: Scenario) -> Self {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let mut nodes = Vec::with_capacity(config.nodes);
        let mut index = BTreeMap::new();
        for i in 0..config.nodes {
            let id = node_id(i);
            index.insert(id, i as u32);
            let gossip = GossipNode::new(Millis(0), id, 1, config.gossip.clone(), node_seed(config.seed, i, 1));
            nodes.push(SimNode {
                id,
                site: i % config.sites.max(1),
                gossip: Some(gossip),
                epoch: 1,
                saved: None,
                egress_free_us: 0,
                up_since: Millis(0),
                next_seq: BTreeMap::new(),
            });
        }
        let mut sim = Simulator {
            report: Report { scenario: scenario.name.clone(), nodes: config.nodes, ..Report::default() },
            config,
            scenario,
            nodes,
            index,
            queue: BinaryHeap::new(),
            seq: 0,
            now: Millis(0),
            rng: SmallRng::seed_from_u64(0),
            cut_sites: BTreeSet::new(),
            last_heal: Millis(0),
            rps: Vec::new(),
            rp_index: BTreeMap::new(),
            crashes: BTreeMap::new(),
            trace: blake3::Hasher::new(),
        };
        for i in 0..sim.nodes.len() {
            let at = Millis(rng.random_range(0..2000));
            sim.push(at, EvKind::Join { node: i as u32, epoch: 1 });
            sim.drain(i);
        }
        for k in 0..sim.scenario.ops.len() {
            let at = sim.scenario.ops[k].0;
            sim.push(at, EvKind::Op(k));
        }
        sim.rng = rng;
        sim
    }

    fn push(&mut self, at: Millis, kind: EvKind) {
        self.seq += 1;
        self.queue.push(Reverse(Ev { at, seq: self.seq, kind }));
    }

    /// Runs the scenario to its end and returns the report.
    pub fn run(mut self) -> Report {
        let end = self.scenario.duration;
        while let Some(Reverse(ev)) = self.queue.pop() {
            self.report.queue_peak = self.report.queue_peak.max(self.queue.len() + 1);
            if ev.at > end {
                break;
            }
            self.now = ev.at;
            self.report.events += 1;
            self.trace.update(&ev.at.0.to_le_bytes());
            match ev.kind {
                EvKind::Deliver { to, from, bytes } => {
                    self.trace.update(&[1]);
                    self.trace.update(&to.to_le_bytes());
                    self.trace.update(&from.to_le_bytes());
                    self.trace.update(&bytes);
                    let from_id = self.nodes[from as usize].id;
                    if let Some(g) = self.nodes[to as usize].gossip.as_mut() {
                        // Malformed or stale packets are the node's business; it never panics on them.
                        let _ = g.handle_datagram(ev.at, from_id, &bytes);
                        self.drain(to as usize);
                    }
                }
                EvKind::Timer { node, epoch, timer } => {
                    self.trace.update(&[2]);
                    self.trace.update(&node.to_le_bytes());
                    let n = &mut self.nodes[node as usize];
                    if n.epoch == epoch {
                        if let Some(g) = n.gossip.as_mut() {
                            let _ = g.handle_timer(ev.at, timer);
                            self.drain(node as usize);
                        }
                    }
                }
                EvKind::Join { node, epoch } => {
                    self.trace.update(&[3]);
                    self.trace.update(&node.to_le_bytes());
                    if self.nodes[node as usize].epoch == epoch {
                        self.join(node as usize);
                    }
                }
                EvKind::Op(k) => {
                    self.trace.update(&[4]);
                    self.trace.update(&(k as u64).to_le_bytes());
                    let op = self.scenario.ops[k].1.clone();
                    self.apply(op);
                }
            }
        }
        self.now = end;
        self.finish()
    }

    fn join(&mut self, i: usize) {
        let n = self.config.nodes;
        let mut seeds: Vec<NodeId> = (0..3.min(n)).filter(|&s| s != i).map(|s| self.nodes[s].id).collect();
        if n > 1 {
            let r = self.rng.random_range(0..n);
            if r != i {
                seeds.push(self.nodes[r].id);
            }
        }
        let now = self.now;
        let site = format!("site-{}", self.nodes[i].site);
        if let Some(g) = self.nodes[i].gossip.as_mut() {
            let _ = g.handle_join(now, &seeds);
            g.handle_status(
                now,
                NodeStatus { site, software_version: "0.1.0".into(), topology_version: 1, topology_hash: [0; 32] },
            );
        }
        self.drain(i);
    }

    fn apply(&mut self, op: Op) {
        let now = self.now;
        match op {
            Op::CommitRp { node, volume } => {
                let Some(n) = self.nodes.get_mut(node) else { return };
                let Some(g) = n.gossip.as_mut() else { return };
                let seq = n.next_seq.entry(volume.clone()).or_insert(RpSeq(0));
                *seq = seq.next();
                let seq = *seq;
                let info = RpInfo {
                    snapshot_unix_ms: now.0,
                    size_bytes: 1 << 30,
                    merkle_root: drmesh_actors::content::MerkleRoot(*blake3::hash(format!("{node}/{volume}/{seq}").as_bytes()).as_bytes()),
                    consistency: Consistency::Crash,
                    drill: None,
                };
                if g.handle_local_rp(now, &volume, seq, info).is_ok() {
                    let total = self.config.nodes;
                    let mut learned = vec![NEVER; total];
                    learned[node] = now.0 as u32;
                    self.rp_index.insert((node as u32, volume.clone(), seq), self.rps.len());
                    self.rps.push(RpTrack {
                        holder: node as u32,
                        volume,
                        seq,
                        committed_at: now,
                        during_partition: !self.cut_sites.is_empty(),
                        expired: false,
                        learned,
                        gone_seen: vec![false; total],
                    });
                    self.report.rps_committed += 1;
                }
                self.drain(node);
            }
            Op::ExpireBelow { node, volume, below } => {
                for t in self.rps.iter_mut() {
                    if t.holder as usize == node && t.volume == volume && t.seq < below {
                        t.expired = true;
                    }
                }
                if let Some(g) = self.nodes.get_mut(node).and_then(|n| n.gossip.as_mut()) {
                    let _ = g.handle_rps_expired_below(now, &volume, below);
                }
                self.drain(node);
            }
            Op::ExpireOne { node, volume, seq } => {
                if let Some(&k) = self.rp_index.get(&(node as u32, volume.clone(), seq)) {
                    self.rps[k].expired = true;
                }
                if let Some(g) = self.nodes.get_mut(node).and_then(|n| n.gossip.as_mut()) {
                    let _ = g.handle_rp_expired(now, &volume, seq, now.0);
                }
                self.drain(node);
            }
            Op::PartitionSite { site } => {
                self.cut_sites.insert(site);
            }
            Op::Heal => {
                self.cut_sites.clear();
                self.last_heal = now;
            }
            Op::Crash { nodes } => {
                for i in nodes {
                    let Some(n) = self.nodes.get_mut(i) else { continue };
                    if let Some(g) = n.gossip.take() {
                        n.saved = Some(g.snapshot());
                        n.epoch += 1;
                        self.crashes.insert(i as u32, CrashTrack { at: now, detected: BTreeSet::new(), first: None, last: None });
                    }
                }
            }
            Op::Restart { nodes } => {
                for i in nodes {
                    let Some(n) = self.nodes.get_mut(i) else { continue };
                    if n.gossip.is_some() {
                        continue;
                    }
                    n.epoch += 1;
                    let seed = node_seed(self.config.seed, i, n.epoch);
                    let cfg = self.config.gossip.clone();
                    let restored = n
                        .saved
                        .as_deref()
                        .and_then(|s| GossipNode::restore(now, n.id, n.epoch, cfg.clone(), seed, s).ok())
                        .unwrap_or_else(|| GossipNode::new(now, n.id, n.epoch, cfg, seed));
                    n.gossip = Some(restored);
                    n.up_since = now;
                    let epoch = n.epoch;
                    self.push(now, EvKind::Join { node: i as u32, epoch });
                }
            }
        }
    }

    /// Moves a node's outputs into the queue and its events into the checkers.
    fn drain(&mut self, i: usize) {
        let now = self.now;
        let Some(g) = self.nodes[i].gossip.as_mut() else { return };
        let mut transmits = Vec::new();
        while let Some(t) = g.poll_transmit() {
            transmits.push(t);
        }
        let mut timers = Vec::new();
        while let Some(t) = g.poll_timer() {
            timers.push(t);
        }
        let mut events = Vec::new();
        while let Some(e) = g.poll_event() {
            events.push(e);
        }
        let epoch = self.nodes[i].epoch;
        for (at, timer) in timers {
            self.push(at.max(now), EvKind::Timer { node: i as u32, epoch, timer });
        }
        for t in transmits {
            let Some(&to) = self.index.get(&t.to) else { continue };
            self.send(i, to as usize, t.bytes);
        }
        for e in events {
            self.observe(i, e);
        }
    }

    fn send(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        self.report.messages += 1;
        self.report.bytes += bytes.len() as u64;
        let net = &self.config.net;
        let (sa, sb) = (self.nodes[from].site, self.nodes[to].site);
        let cut = sa != sb && (self.cut_sites.contains(&sa) || self.cut_sites.contains(&sb));
        let lost = net.loss > 0.0 && self.rng.random_bool(net.loss.min(1.0));
        if cut || lost {
            self.report.dropped += 1;
            return;
        }
        let now_us = self.now.0 * 1000;
        let mut depart_us = now_us;
        if let Some(tx_us) = (bytes.len() as u64 * 1_000_000).checked_div(net.bandwidth_bytes_per_s) {
            let n = &mut self.nodes[from];
            n.egress_free_us = n.egress_free_us.max(now_us) + tx_us;
            depart_us = n.egress_free_us;
        }
        let latency = if sa == sb { net.latency_ms } else { net.wan_latency_ms };
        let jitter = if net.jitter_ms > 0 { self.rng.random_range(0..=net.jitter_ms) } else { 0 };
        let at = Millis(depart_us.div_ceil(1000) + latency + jitter);
        self.push(at, EvKind::Deliver { to: to as u32, from: from as u32, bytes });
    }

    fn observe(&mut self, i: usize, event: GossipEvent) {
        let now = self.now;
        match event {
            GossipEvent::CatalogChanged { holder, key: ItemKey::Rp(volume, seq) } => {
                let Some(&h) = self.index.get(&holder) else { return };
                let Some(&k) = self.rp_index.get(&(h, volume.clone(), seq)) else { return };
                let live = self.nodes[i].gossip.as_ref().is_some_and(|g| g.has_rp(&holder, &volume, seq));
                let t = &mut self.rps[k];
                if live {
                    if t.gone_seen[i] {
                        self.report.resurrections += 1;
                    } else if t.learned[i] == NEVER {
                        t.learned[i] = now.0 as u32;
                    }
                } else if t.expired {
                    t.gone_seen[i] = true;
                }
            }
            GossipEvent::MemberDown(node) => {
                let Some(&x) = self.index.get(&node) else { return };
                if let Some(c) = self.crashes.get_mut(&x) {
                    if self.nodes[x as usize].gossip.is_none() && c.detected.insert(i as u32) {
                        c.first.get_or_insert(now);
                        c.last = Some(now);
                    }
                }
            }
            _ => {}
        }
    }

    fn finish(mut self) -> Report {
        let end = self.now;
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].gossip.is_some()).collect();
        for t in &self.rps {
            let holder_id = self.nodes[t.holder as usize].id;
            if t.expired {
                self.report.rps_expired += 1;
                for &i in &live {
                    if self.nodes[i].gossip.as_ref().is_some_and(|g| g.has_rp(&holder_id, &t.volume, t.seq)) {
                        self.report.expired_alive_at_end += 1;
                    }
                }
                continue;
            }
            let mut worst = 0u64;
            let mut complete = true;
            for &i in &live {
                if t.learned[i] == NEVER {
                    complete = false;
                    self.report.unconverged += 1;
                    continue;
                }
                // Measured from when the node could have learned it: commit,
                // its own restart, or the heal of a partition in place at commit.
                let mut origin = t.committed_at.max(self.nodes[i].up_since);
                if t.during_partition {
                    origin = origin.max(self.last_heal);
                }
                worst = worst.max(u64::from(t.learned[i]).saturating_sub(origin.0));
            }
            if complete {
                self.report.convergence_ms.push(worst);
            }
        }
        self.report.convergence_ms.sort_unstable();
        for &i in &live {
            let Some(g) = self.nodes[i].gossip.as_ref() else { continue };
            let alive: std::collections::HashSet<NodeId> =
                g.members().into_iter().filter(|m| m.state == MemberState::Alive).map(|m| m.node).collect();
            self.report.membership_unhealed += live.iter().filter(|&&j| j != i && !alive.contains(&self.nodes[j].id)).count();
        }
        let live_count = live.len();
        for c in self.crashes.values() {
            if let Some(first) = c.first {
                self.report.detect_first_ms.push(first.since(c.at).as_millis() as u64);
            }
            // Every node alive at the end, minus the crashed ones themselves.
            let observers = live_count.saturating_sub(self.crashes.len());
            if c.detected.len() >= observers {
                if let Some(last) = c.last {
                    self.report.detect_all_ms.push(last.since(c.at).as_millis() as u64);
                }
            }
        }
        self.report.sim_ms = end.0;
        self.report.trace_hash = *self.trace.finalize().as_bytes();
        self.report
    }
}

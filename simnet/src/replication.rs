//! A replication world: the real session cores ([`SourceSession`],
//! [`TargetSession`]) of one source and one target, cycle after cycle, under
//! virtual time with seeded faults, and checkers that watch from outside.
//!
//! The source is a volume of 4 KiB blocks that changes between cycles and a
//! baseline (what it believes the target committed). The target's store is
//! the in-memory backend ([`MemoryStore`]) driven through the same
//! [`SessionStore`] seam the applier uses: a lookup pins what it reports
//! present for the session, blobs become durable only when their batch write
//! completes, a crash loses everything not durable (writes in progress, staged
//! block-map rows, pins), GC deletes every blob that no committed RP references
//! and no live session pinned or wrote.
//!
//! Faults, each drawn per step or per write from the seed: message latency,
//! a batch write that fails (full disk), a torn batch (some blobs land, the
//! write reports an error), a crash of the target or of the source at any
//! step, and GC runs racing the cycle. A last cycle without faults must bring
//! the target to the source's exact data.
//!
//! Checked from outside, after every event that could break them:
//! 1. a committed RP references only durable blobs, and its block map is the
//!    source's data at that cycle's snapshot;
//! 2. the source's baseline is always an RP the target committed, with the
//!    same block map (the baseline never runs ahead);
//! 3. no blob is sent for content the target held, durable and referenced by
//!    a committed RP, when the cycle started;
//! 6. no committed RP ever loses a blob to GC, and a blob a running session
//!    was told is present survives until that session ends.
//!
//! [`ReplConfig::broken_applier`] makes the target's driver acknowledge a batch
//! as soon as it is handed out, before it is durable (the bug promise 1 rules
//! out); the checkers must catch it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use drmesh_actors::blob::{EncodedBlob, RpMeta, RpSeq};
use drmesh_actors::codec::BlockCodec;
use drmesh_actors::content::{ContentId, MerkleBuilder, MerkleRoot};
use drmesh_actors::proto::session::{OfferEntry, SourceEvent, SourceMsg, SourceSession, TargetEvent, TargetMsg, TargetSession};
use drmesh_actors::proto::time::Millis;
use drmesh_actors::store::{MemoryStore, SessionStore};
use drmesh_topology::{NodeId, Topology};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;

/// One run's settings.
#[derive(Debug, Clone)]
pub struct ReplConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Blocks in the volume.
    pub blocks: usize,
    /// Cycles with faults before the last, fault-free one.
    pub cycles: usize,
    /// Largest one-way latency, ms.
    pub max_latency_ms: u64,
    /// Largest time a batch write takes, ms.
    pub max_write_ms: u64,
    /// Chance per batch write that it fails (full disk).
    pub p_write_fail: f64,
    /// Chance per batch write that it is torn (some blobs land, it fails).
    pub p_torn: f64,
    /// Chance per step that the target crashes.
    pub p_target_crash: f64,
    /// Chance per step that the source crashes.
    pub p_source_crash: f64,
    /// Chance per step that GC runs on the target.
    pub p_gc: f64,
    /// The target's driver acknowledges batches before they are durable.
    pub broken_applier: bool,
}

impl ReplConfig {
    /// The settings the test swarm uses for `seed`: every fault enabled.
    pub fn swarm(seed: u64) -> ReplConfig {
        ReplConfig {
            seed,
            blocks: 48,
            cycles: 4,
            max_latency_ms: 8,
            max_write_ms: 6,
            p_write_fail: 0.04,
            p_torn: 0.04,
            p_target_crash: 0.004,
            p_source_crash: 0.004,
            p_gc: 0.02,
            broken_applier: false,
        }
    }
}

/// What a run did and what the checkers found.
#[derive(Debug, Clone, Default)]
pub struct ReplReport {
    /// The run's seed.
    pub seed: u64,
    /// Cycles the source saw committed.
    pub committed: usize,
    /// Cycles that failed.
    pub failed: usize,
    /// Target and source crashes.
    pub crashes: usize,
    /// GC runs.
    pub gc_runs: usize,
    /// Blobs sent over all cycles.
    pub blobs_sent: usize,
    /// Promise violations, each naming the promise; empty when all held.
    pub violations: Vec<String>,
    /// blake3 over every event processed: the same seed gives the same hash.
    pub trace_hash: String,
}

fn node(n: u8) -> NodeId {
    NodeId::from_bytes([n; 32])
}

fn topology() -> Arc<Topology> {
    let text = format!(
        "[mesh]\nname = \"sim\"\nversion = 1\n\n\
         [[node]]\nname = \"src\"\nid = \"{}\"\naddresses = [\"127.0.0.1:7001\"]\nsite = \"a\"\n\n\
         [[node]]\nname = \"dst\"\nid = \"{}\"\naddresses = [\"127.0.0.1:7002\"]\nsite = \"a\"\n\n\
         [policy.p]\nrpo = \"1h\"\nretention = {{ keep_last = 1000 }}\n\n\
         [[volume]]\nname = \"vol\"\nsource = \"src\"\nkind = \"file\"\npath = \"/srv/vol.img\"\ntargets = [\"dst\"]\npolicy = \"p\"\n",
        node(1),
        node(2)
    );
    match Topology::parse(&text, std::path::Path::new("sim.toml")) {
        Ok(t) => Arc::new(t),
        Err(d) => panic!("the simulation's topology does not parse: {d:?}"),
    }
}

/// The source's baseline: the RP it believes the target committed.
#[derive(Debug, Clone)]
struct Rp {
    seq: RpSeq,
    root: MerkleRoot,
    map: Vec<ContentId>,
}

struct Write {
    due: Millis,
    batch: u64,
    blobs: Vec<EncodedBlob>,
    torn: Option<usize>,
    fail: bool,
}

fn root_of(map: &[ContentId]) -> MerkleRoot {
    let mut m = MerkleBuilder::new();
    for c in map {
        m.push(c);
    }
    m.finish()
}

/// One run of the world.
pub struct ReplWorld {
    cfg: ReplConfig,
    rng: SmallRng,
    now: Millis,
    codec: BlockCodec,
    topology: Arc<Topology>,
    volume: Vec<Vec<u8>>,
    /// The source's baseline: (seq, root, map), moved only on `Committed`.
    baseline: Option<Rp>,
    store: MemoryStore,
    /// Contents the live session was told are present (promise 6's watch list).
    told_present: HashSet<ContentId>,
    /// The live session's id in the store.
    session: u64,
    report: ReplReport,
    trace: blake3::Hasher,
}

/// One cycle in flight.
struct Cycle {
    src: SourceSession,
    tgt: TargetSession,
    snapshot: Vec<Vec<u8>>,
    map: Vec<ContentId>,
    offer: Vec<usize>,
    next: usize,
    full_offer: bool,
    started: bool,
    to_tgt: VecDeque<(Millis, SourceMsg)>,
    to_src: VecDeque<(Millis, TargetMsg)>,
    writes: Vec<Write>,
    /// Content durable and referenced when the cycle started (promise 3).
    held_at_start: HashSet<ContentId>,
    source_end: Option<Result<RpSeq, String>>,
    target_end: Option<Result<RpSeq, String>>,
    target_alive: bool,
    /// Whether this cycle draws faults (the last one does not).
    faults: bool,
}

impl ReplWorld {
    /// A world for `cfg`.
    pub fn new(cfg: ReplConfig) -> ReplWorld {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let volume = (0..cfg.blocks).map(|i| block(&mut rng, i as u64)).collect();
        ReplWorld {
            rng,
            now: Millis(0),
            codec: BlockCodec::new(Some(1), None),
            topology: topology(),
            volume,
            baseline: None,
            store: MemoryStore::new(),
            told_present: HashSet::new(),
            session: 0,
            report: ReplReport { seed: cfg.seed, ..ReplReport::default() },
            trace: blake3::Hasher::new(),
            cfg,
        }
    }

    /// Runs every cycle and returns the report.
    pub fn run(mut self) -> ReplReport {
        for cycle in 0..=self.cfg.cycles {
            let faults = cycle < self.cfg.cycles;
            // The volume changes between cycles: a few blocks rewritten, some zeroed.
            for _ in 0..self.rng.random_range(0..=self.cfg.blocks / 4) {
                let i = self.rng.random_range(0..self.cfg.blocks);
                self.volume[i] = if self.rng.random_bool(0.1) { vec![0; BLOCK] } else { block(&mut self.rng, 1000 + i as u64) };
            }
            self.cycle(faults);
            self.check_baseline();
        }
        // After the fault-free cycle the target holds the source's data exactly.
        let map: Vec<ContentId> = self.volume.iter().map(|b| self.codec.ids().content_id(b)).collect();
        let newest = self.newest().map(|(seq, _)| seq).and_then(|seq| self.store.block_map("vol", seq));
        match (&self.baseline, newest) {
            (Some(b), Some(n)) if b.map == map && n == map => {}
            _ => self.violation("2: after a fault-free cycle the target's newest RP is not the source's data"),
        }
        self.report.trace_hash = self.trace.finalize().to_hex()[..16].to_string();
        self.report
    }

    fn violation(&mut self, what: &str) {
        let line = format!("seed {} at {} ms: promise {what}", self.cfg.seed, self.now.0);
        if !self.report.violations.contains(&line) {
            self.report.violations.push(line);
        }
    }

    fn latency(&mut self) -> u64 {
        self.rng.random_range(0..=self.cfg.max_latency_ms)
    }

    fn cycle(&mut self, faults: bool) {
        let snapshot = self.volume.clone();
        let map: Vec<ContentId> = snapshot.iter().map(|b| self.codec.ids().content_id(b)).collect();
        let base = self.baseline.as_ref().map(|b| (b.seq, b.root));
        self.session += 1;
        let held_at_start = self.store.referenced().into_iter().filter(|c| self.store.has_content(c)).collect();
        let mut c = Cycle {
            src: SourceSession::new(&drmesh_topology::VolumeName::from_static("vol"), base, false, BLOCK as u32),
            tgt: TargetSession::new(self.topology.clone(), node(2), node(1)),
            snapshot,
            map,
            offer: Vec::new(),
            next: 0,
            full_offer: true,
            started: false,
            to_tgt: VecDeque::new(),
            to_src: VecDeque::new(),
            writes: Vec::new(),
            held_at_start,
            source_end: None,
            target_end: None,
            target_alive: true,
            faults,
        };
        for _ in 0..200_000 {
            self.settle(&mut c);
            if c.source_end.is_some() && (c.target_end.is_some() || !c.target_alive) && c.writes.is_empty() {
                break;
            }
            if faults && c.source_end.is_none() {
                if self.rng.random_bool(self.cfg.p_target_crash) {
                    self.crash_target(&mut c);
                } else if self.rng.random_bool(self.cfg.p_source_crash) {
                    self.trace.update(b"source crash");
                    self.report.crashes += 1;
                    c.source_end = Some(Err("source crashed".into()));
                    // The target sees the connection go.
                    c.to_tgt.clear();
                    c.tgt.handle_disconnect("connection reset");
                }
            }
            if faults && self.rng.random_bool(self.cfg.p_gc) {
                self.gc();
            }
            self.settle(&mut c);
            if !self.advance(&mut c) && c.source_end.is_some() {
                break;
            }
        }
        if c.source_end.is_none() {
            self.violation("liveness: the source never ended its cycle");
        }
        match c.source_end {
            Some(Ok(seq)) => {
                self.report.committed += 1;
                // Only now does the baseline move (promise 2).
                self.baseline = Some(Rp { seq, root: root_of(&c.map), map: c.map.clone() });
            }
            _ => self.report.failed += 1,
        }
        // The session is over: its pins and staged rows go.
        self.store.release_session(self.session);
        self.told_present.clear();
    }

    fn newest(&self) -> Option<(RpSeq, MerkleRoot)> {
        self.store.newest_rp("vol").ok().flatten().map(|m| (m.seq, m.merkle_root))
    }

    /// Lets both sides act until neither has anything more to do at this instant.
    fn settle(&mut self, c: &mut Cycle) {
        loop {
            let before = (c.to_tgt.len(), c.to_src.len(), c.writes.len(), c.next, c.source_end.is_some(), c.target_end.is_some());
            self.drive_source(c);
            self.drive_target(c);
            if before == (c.to_tgt.len(), c.to_src.len(), c.writes.len(), c.next, c.source_end.is_some(), c.target_end.is_some()) {
                return;
            }
        }
    }

    fn crash_target(&mut self, c: &mut Cycle) {
        self.trace.update(b"target crash");
        self.report.crashes += 1;
        c.target_alive = false;
        // Everything not durable is lost: writes in progress, staged rows, pins.
        c.writes.clear();
        self.store.release_session(self.session);
        self.told_present.clear();
        c.to_src.clear();
        c.to_tgt.clear();
        c.src.handle_disconnect("connection reset".into());
    }

    fn gc(&mut self) {
        self.report.gc_runs += 1;
        self.trace.update(b"gc");
        self.store.gc();
        // Promise 6 from outside.
        if self.told_present.iter().any(|c| !self.store.has_content(c)) {
            self.violation("6: GC deleted a blob a running session was told is present");
        }
        if self.store.referenced().iter().any(|c| !self.store.has_content(c)) {
            self.violation("6: GC deleted a blob a committed RP references");
        }
    }

    fn check_baseline(&mut self) {
        if let Some(b) = &self.baseline {
            let matches = self.store.block_map("vol", b.seq).is_some_and(|map| map == b.map && root_of(&map) == b.root);
            if !matches {
                let what = format!("2: the source's baseline (RP {}) is not an RP the target committed with that block map", b.seq);
                self.violation(&what);
            }
        }
    }

    fn drive_source(&mut self, c: &mut Cycle) {
        if c.source_end.is_some() {
            return;
        }
        while let Some(e) = c.src.poll_event() {
            match e {
                SourceEvent::Start { full_offer } => {
                    c.started = true;
                    c.full_offer = full_offer;
                    let base = if full_offer { None } else { self.baseline.as_ref().map(|b| b.map.clone()) };
                    c.offer = (0..c.map.len()).filter(|&i| base.as_ref().is_none_or(|m| m.get(i) != Some(&c.map[i]))).collect();
                }
                SourceEvent::Encode { index, .. } => {
                    let data = &c.snapshot[index as usize];
                    let blob = self.codec.encode_full(c.map[index as usize], data);
                    c.src.handle_encoded(index, blob);
                }
                SourceEvent::Release { .. } => {}
                SourceEvent::Committed { seq } => c.source_end = Some(Ok(seq)),
                SourceEvent::Failed { reason } => c.source_end = Some(Err(reason)),
            }
        }
        if c.source_end.is_some() {
            return;
        }
        while c.started && c.src.wants_block() && c.next < c.offer.len() {
            let i = c.offer[c.next];
            c.src.handle_block(OfferEntry { index: i as u64, content: c.map[i], base: None }, BLOCK as u64);
            c.next += 1;
        }
        if c.started && c.next == c.offer.len() {
            c.next += 1;
            let mut meta = meta();
            meta.block_count = c.map.len() as u64;
            meta.volume_bytes = (c.map.len() * BLOCK) as u64;
            meta.merkle_root = root_of(&c.map);
            meta.changed_blocks = c.offer.len() as u64;
            c.src.handle_reader_done(meta);
        }
        while let Some(m) = c.src.poll_transmit() {
            if let SourceMsg::Blob(b) = &m {
                self.report.blobs_sent += 1;
                if c.held_at_start.contains(&b.content) {
                    self.violation("3: a blob was sent for content the target held durably and referenced");
                }
            }
            let at = Millis(self.now.0 + self.latency());
            let at = c.to_tgt.back().map_or(at, |(last, _)| at.max(*last));
            c.to_tgt.push_back((at, m));
        }
    }

    fn drive_target(&mut self, c: &mut Cycle) {
        if !c.target_alive {
            return;
        }
        loop {
            while let Some(m) = c.tgt.poll_transmit() {
                let at = Millis(self.now.0 + self.latency());
                let at = c.to_src.back().map_or(at, |(last, _)| at.max(*last));
                c.to_src.push_back((at, m));
            }
            let Some(e) = c.tgt.poll_event() else { return };
            self.trace.update(event_tag(&e).as_bytes());
            match e {
                TargetEvent::Newest { .. } => {
                    let newest = self.newest();
                    c.tgt.handle_newest(Ok(newest));
                }
                TargetEvent::Lookup { contents, bases, changes } => {
                    let session = self.session;
                    let result = self.store.lookup_and_pin(session, &contents).and_then(|present| {
                        let bases = self.store.lookup_and_pin(session, &bases)?;
                        self.store.stage(session, "vol", &changes)?;
                        Ok((present, bases))
                    });
                    if let Ok((present, _)) = &result {
                        self.told_present.extend(contents.iter().zip(present).filter(|(_, p)| p.is_some()).map(|(c, _)| *c));
                    }
                    c.tgt.handle_lookup(result.map_err(|e| e.to_string()));
                }
                TargetEvent::Write { batch, blobs } => {
                    let due = Millis(self.now.0 + self.rng.random_range(0..=self.cfg.max_write_ms));
                    let fail = c.faults && self.rng.random_bool(self.cfg.p_write_fail);
                    let torn = (c.faults && !fail && self.rng.random_bool(self.cfg.p_torn)).then(|| self.rng.random_range(0..blobs.len()));
                    if self.cfg.broken_applier {
                        // The bug: acknowledged before it is durable.
                        c.tgt.handle_written(batch, Ok(blobs.iter().map(|b| b.payload.len() as u64).sum()));
                    }
                    c.writes.push(Write { due, batch, blobs, torn, fail });
                }
                TargetEvent::Commit { meta } => {
                    // Promise 1 from outside, before the store is asked: every block durable.
                    if c.map.iter().any(|m| !m.is_zero() && !self.store.has_content(m)) {
                        self.violation("1: a commit was asked for while a block's blob is not durable");
                    }
                    let result = self.store.commit_rp(self.session, &meta);
                    if result.is_ok() && self.store.block_map("vol", meta.seq).as_ref() != Some(&c.map) {
                        self.violation("1: a committed RP's block map is not the source's data at the snapshot");
                    }
                    c.tgt.handle_committed(result.map_err(|e| e.to_string()));
                }
                TargetEvent::Prune { .. } => c.tgt.handle_pruned(Vec::new()),
                TargetEvent::Announce(_) => {}
                TargetEvent::Finished { outcome } => c.target_end = Some(outcome),
            }
        }
    }

    /// Moves virtual time to the next thing due and does it; false when nothing is left.
    fn advance(&mut self, c: &mut Cycle) -> bool {
        let next = [
            c.to_tgt.front().map(|(t, _)| *t),
            c.to_src.front().map(|(t, _)| *t),
            c.writes.iter().map(|w| w.due).min(),
            if c.target_alive { c.tgt.poll_timeout() } else { None },
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else { return false };
        self.now = self.now.max(next);
        if let Some(i) = c.writes.iter().position(|w| w.due <= self.now) {
            let w = c.writes.remove(i);
            let landed = if w.fail { 0 } else { w.torn.unwrap_or(w.blobs.len()) };
            let stored = self.store.put_blobs(self.session, &w.blobs[..landed]);
            let result = if let Err(e) = stored {
                Err(e.to_string())
            } else if w.fail {
                Err("target disk full".to_string())
            } else if w.torn.is_some() {
                Err("write torn: input/output error".to_string())
            } else {
                Ok(w.blobs.iter().map(|b| b.payload.len() as u64).sum())
            };
            self.trace.update(format!("written {} {}", w.batch, result.is_ok()).as_bytes());
            if !self.cfg.broken_applier {
                c.tgt.handle_written(w.batch, result);
            }
            return true;
        }
        if c.to_tgt.front().is_some_and(|(t, _)| *t <= self.now) {
            if let Some((_, m)) = c.to_tgt.pop_front() {
                if c.target_alive {
                    c.tgt.handle_message(self.now, m);
                }
            }
        } else if c.to_src.front().is_some_and(|(t, _)| *t <= self.now) {
            if let Some((_, m)) = c.to_src.pop_front() {
                if c.source_end.is_none() {
                    c.src.handle_message(m);
                }
            }
        } else if c.target_alive {
            c.tgt.handle_timeout(self.now);
        }
        true
    }
}

fn meta() -> RpMeta {
    RpMeta {
        volume: drmesh_topology::VolumeName::from_static("vol"),
        seq: RpSeq(0),
        time_unix_ms: 1,
        source_node: "src".into(),
        volume_bytes: 0,
        block_bytes: BLOCK as u32,
        block_count: 0,
        changed_blocks: 0,
        bytes_stored: 0,
        merkle_root: MerkleRoot([0; 32]),
        encrypted: false,
        consistency: "crash".into(),
        group: None,
    }
}

/// A block of the volume: mostly text-like bytes, distinct per `tag`.
fn block(rng: &mut SmallRng, tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    let fill: u8 = rng.random_range(b'a'..=b'z');
    b.iter_mut().for_each(|x| *x = fill);
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b[8..16].copy_from_slice(&rng.random::<u64>().to_le_bytes());
    b
}

/// A short, cheap description of a target event for the trace hash.
fn event_tag(e: &TargetEvent) -> String {
    match e {
        TargetEvent::Newest { .. } => "newest".into(),
        TargetEvent::Lookup { contents, .. } => format!("lookup {}", contents.len()),
        TargetEvent::Write { batch, blobs } => format!("write {batch} {}", blobs.len()),
        TargetEvent::Commit { meta } => format!("commit {}", meta.seq),
        TargetEvent::Prune { .. } => "prune".into(),
        TargetEvent::Announce(_) => "announce".into(),
        TargetEvent::Finished { outcome } => format!("finished {}", outcome.is_ok()),
    }
}

/// Runs the world for `cfg`.
pub fn run(cfg: ReplConfig) -> ReplReport {
    ReplWorld::new(cfg).run()
}

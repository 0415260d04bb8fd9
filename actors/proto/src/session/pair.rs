//! A source and a target session wired together under virtual time (after
//! quinn's test `Pair`): messages take a seeded latency each way, the target's
//! store work is done by an in-memory store whose durable writes take a seeded
//! time and can fail, and the stream can break at a chosen step. The pair
//! records what a checker from outside needs: what the store holds, in what
//! order the target asked for things, and how each side ended.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use drmesh_topology::{NodeId, Topology};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::blob::{BlobLoc, EncodedBlob, RpMeta, RpSeq};
use crate::codec::{page_hashes, BlockCodec};
use crate::content::{BlobId, ContentId};
use crate::time::Millis;

/// The nodes of [`topology`]: `src` replicates `vol` to `dst`.
pub fn node(n: u8) -> NodeId {
    NodeId::from_bytes([n; 32])
}

/// A topology where node 1 (`src`) replicates `vol` to node 2 (`dst`) with
/// `keep_last` retention, and node 3 (`other`) is listed but not involved.
pub fn topology(keep_last: u32) -> Arc<Topology> {
    let text = format!(
        "[mesh]\nname = \"t\"\nversion = 1\n\n\
         [[node]]\nname = \"src\"\nid = \"{}\"\naddresses = [\"127.0.0.1:7001\"]\nsite = \"lab\"\n\n\
         [[node]]\nname = \"dst\"\nid = \"{}\"\naddresses = [\"127.0.0.1:7002\"]\nsite = \"lab\"\n\n\
         [[node]]\nname = \"other\"\nid = \"{}\"\naddresses = [\"127.0.0.1:7003\"]\nsite = \"lab\"\n\n\
         [policy.p]\nrpo = \"1h\"\nretention = {{ keep_last = {keep_last} }}\n\n\
         [[volume]]\nname = \"vol\"\nsource = \"src\"\nkind = \"file\"\npath = \"/srv/vol.img\"\ntargets = [\"dst\"]\npolicy = \"p\"\n",
        node(1),
        node(2),
        node(3)
    );
    Arc::new(Topology::parse(&text, std::path::Path::new("pair.toml")).unwrap_or_else(|d| panic!("test topology: {d:?}")))
}

/// An RP's metadata as a source reader fills it in.
pub fn meta(volume: &'static str) -> RpMeta {
    RpMeta {
        volume: crate::blob::VolumeName::from_static(volume),
        seq: RpSeq(0),
        time_unix_ms: 1,
        source_node: "src".into(),
        volume_bytes: 0,
        block_bytes: 4096,
        block_count: 0,
        changed_blocks: 0,
        bytes_stored: 0,
        merkle_root: crate::content::MerkleRoot([0; 32]),
        encrypted: false,
        consistency: "crash".into(),
        group: None,
    }
}

/// Faults and delays of one run.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Largest one-way latency, ms (each message draws 0..=this).
    pub max_latency_ms: u64,
    /// Largest time a durable batch write takes, ms.
    pub max_write_ms: u64,
    /// The write of this batch fails (e.g. disk full).
    pub fail_write: Option<u64>,
    /// The stream breaks after this many messages were delivered (both ways).
    pub break_after: Option<usize>,
}

/// The in-memory store the target's events are carried out on.
#[derive(Debug, Default)]
pub struct MemStore {
    /// Durable blobs: content -> where.
    pub blobs: HashMap<ContentId, BlobLoc>,
    /// Durable blob ids.
    pub durable: HashSet<BlobId>,
    /// Committed RPs with their block maps (index -> content).
    pub rps: Vec<(RpMeta, BTreeMap<u64, ContentId>)>,
    /// Changes the session staged.
    pub staged: BTreeMap<u64, ContentId>,
    /// Batches handed out and not finished.
    pub writing: usize,
}

/// A source and a target session under virtual time.
pub struct Pair {
    /// Virtual now.
    pub now: Millis,
    rng: SmallRng,
    faults: Faults,
    codec: BlockCodec,
    blocks: Vec<Vec<u8>>,
    next_block: usize,
    /// The source side.
    pub src: SourceSession,
    /// The target side.
    pub tgt: TargetSession,
    to_tgt: VecDeque<(Millis, SourceMsg)>,
    to_src: VecDeque<(Millis, TargetMsg)>,
    writes: Vec<(Millis, u64, Vec<EncodedBlob>)>,
    delivered: usize,
    broken: bool,
    /// The target's store.
    pub store: MemStore,
    /// Blobs that crossed the wire.
    pub blobs_sent: usize,
    /// How the source ended: `Ok(seq)` or `Err(reason)`.
    pub source_end: Option<Result<RpSeq, String>>,
    /// How the target ended.
    pub target_end: Option<Result<RpSeq, String>>,
    /// What the target announced.
    pub announced: Vec<Announcement>,
    /// Violations seen from outside (empty when every promise held).
    pub violations: Vec<String>,
}

impl Pair {
    /// A pair syncing `blocks` (4 KiB each) of volume `vol` from node 1 to node 2,
    /// the target's store already holding `stored`, under `faults` with `seed`.
    pub fn new(seed: u64, blocks: Vec<Vec<u8>>, stored: &[Vec<u8>], faults: Faults, topology: Arc<Topology>) -> Pair {
        let codec = BlockCodec::new(Some(1), None);
        let mut store = MemStore::default();
        for b in stored {
            let id = codec.ids().content_id(b);
            store.blobs.insert(id, BlobLoc { blob: id, depth: 0 });
            store.durable.insert(id);
        }
        Pair {
            now: Millis(0),
            rng: SmallRng::seed_from_u64(seed),
            faults,
            codec,
            blocks,
            next_block: 0,
            src: SourceSession::new(&crate::blob::VolumeName::from_static("vol"), None, false, 4096),
            tgt: TargetSession::new(topology, node(2), node(1)),
            to_tgt: VecDeque::new(),
            to_src: VecDeque::new(),
            writes: Vec::new(),
            delivered: 0,
            broken: false,
            store,
            blobs_sent: 0,
            source_end: None,
            target_end: None,
            announced: Vec::new(),
            violations: Vec::new(),
        }
    }

    fn latency(&mut self) -> u64 {
        self.rng.random_range(0..=self.faults.max_latency_ms)
    }

    /// Runs until both sides ended (or nothing more can happen); returns the steps taken.
    pub fn run(&mut self) -> usize {
        for step in 0..1_000_000 {
            // Until neither side has anything more to say or do at this instant.
            loop {
                let before = (self.to_tgt.len(), self.to_src.len(), self.writes.len(), self.next_block);
                self.drive_source();
                self.drive_target();
                if before == (self.to_tgt.len(), self.to_src.len(), self.writes.len(), self.next_block) {
                    break;
                }
            }
            if self.source_end.is_some() && self.target_end.is_some() && self.writes.is_empty() {
                return step;
            }
            if !self.advance() {
                return step;
            }
        }
        panic!("the pair did not settle");
    }

    fn drive_source(&mut self) {
        while let Some(e) = self.src.poll_event() {
            match e {
                SourceEvent::Start { .. } | SourceEvent::Release { .. } => {}
                SourceEvent::Encode { index, want } => {
                    let data = &self.blocks[index as usize];
                    let id = self.codec.ids().content_id(data);
                    let blob = match want {
                        Want::Delta { base, depth } => {
                            let base_data = self.blocks.iter().find(|b| self.codec.ids().content_id(b) == base).cloned();
                            match base_data {
                                Some(old) => {
                                    let (mut oh, mut nh) = (Vec::new(), Vec::new());
                                    page_hashes(&old, &mut oh);
                                    page_hashes(data, &mut nh);
                                    self.codec.encode_delta(id, data, &nh, base, depth, &oh).unwrap_or_else(|| self.codec.encode_full(id, data))
                                }
                                None => self.codec.encode_full(id, data),
                            }
                        }
                        _ => self.codec.encode_full(id, data),
                    };
                    self.src.handle_encoded(index, blob);
                }
                SourceEvent::Committed { seq } => self.source_end = Some(Ok(seq)),
                SourceEvent::Failed { reason } => self.source_end = Some(Err(reason)),
            }
        }
        while self.src.wants_block() && self.next_block < self.blocks.len() {
            let data = &self.blocks[self.next_block];
            let content = self.codec.ids().content_id(data);
            self.src.handle_block(OfferEntry { index: self.next_block as u64, content, base: None }, data.len() as u64);
            self.next_block += 1;
            if self.next_block == self.blocks.len() {
                self.src.handle_reader_done(meta("vol"));
            }
        }
        while let Some(m) = self.src.poll_transmit() {
            if matches!(m, SourceMsg::Blob(_)) {
                self.blobs_sent += 1;
            }
            let at = Millis(self.now.0 + self.latency());
            // A stream is ordered: a message never overtakes the one before it.
            let at = self.to_tgt.back().map_or(at, |(last, _)| at.max(*last));
            self.to_tgt.push_back((at, m));
        }
    }

    fn drive_target(&mut self) {
        loop {
            while let Some(m) = self.tgt.poll_transmit() {
                let at = Millis(self.now.0 + self.latency());
                let at = self.to_src.back().map_or(at, |(last, _)| at.max(*last));
                self.to_src.push_back((at, m));
            }
            let Some(e) = self.tgt.poll_event() else { return };
            match e {
                TargetEvent::Newest { .. } => {
                    let newest = self.store.rps.last().map(|(m, _)| (m.seq, m.merkle_root));
                    self.tgt.handle_newest(Ok(newest));
                }
                TargetEvent::Lookup { contents, bases, changes } => {
                    let present = contents.iter().map(|c| self.store.blobs.get(c).copied()).collect();
                    let bases = bases.iter().map(|c| self.store.blobs.get(c).copied()).collect();
                    self.store.staged.extend(changes);
                    self.tgt.handle_lookup(Ok((present, bases)));
                }
                TargetEvent::Write { batch, blobs } => {
                    let took = self.rng.random_range(0..=self.faults.max_write_ms);
                    self.store.writing += 1;
                    self.writes.push((Millis(self.now.0 + took), batch, blobs));
                }
                TargetEvent::Commit { meta } => {
                    // Promise 1 from outside: every block of the RP is durable now.
                    if self.store.writing > 0 {
                        self.violations.push(format!("commit asked while {} batches were being written", self.store.writing));
                    }
                    for (index, content) in &self.store.staged {
                        if !content.is_zero() && !self.store.blobs.contains_key(content) {
                            self.violations.push(format!("commit of block {index} whose content is not durable"));
                        }
                    }
                    let map = std::mem::take(&mut self.store.staged);
                    self.store.rps.push((meta, map));
                    self.tgt.handle_committed(Ok(()));
                }
                TargetEvent::Prune { retention, .. } => {
                    let keep = retention.keep_last.max(1) as usize;
                    let n = self.store.rps.len();
                    let pruned: Vec<RpSeq> = self.store.rps.drain(..n.saturating_sub(keep)).map(|(m, _)| m.seq).collect();
                    self.tgt.handle_pruned(pruned);
                }
                TargetEvent::Announce(a) => self.announced.push(a),
                TargetEvent::Finished { outcome } => {
                    if outcome.is_err() {
                        self.store.staged.clear();
                    }
                    self.target_end = Some(outcome);
                }
            }
        }
    }

    /// Moves virtual time to the next thing due and does it; false when nothing is left.
    fn advance(&mut self) -> bool {
        let next = [
            self.to_tgt.front().map(|(t, _)| *t),
            self.to_src.front().map(|(t, _)| *t),
            self.writes.iter().map(|(t, _, _)| *t).min(),
            self.tgt.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else { return false };
        self.now = self.now.max(next);
        if let Some(i) = self.writes.iter().position(|(t, _, _)| *t <= self.now) {
            let (_, batch, blobs) = self.writes.remove(i);
            self.store.writing -= 1;
            if self.faults.fail_write == Some(batch) {
                self.tgt.handle_written(batch, Err(format!("target disk full writing batch {batch}")));
            } else {
                let mut bytes = 0;
                for b in &blobs {
                    self.store.blobs.insert(b.content, BlobLoc { blob: b.id, depth: b.depth });
                    self.store.durable.insert(b.id);
                    bytes += b.payload.len() as u64;
                }
                self.tgt.handle_written(batch, Ok(bytes));
            }
            return true;
        }
        if self.broken {
            self.to_tgt.clear();
            self.to_src.clear();
        }
        if self.to_tgt.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, m) = self.to_tgt.pop_front().unwrap_or_else(|| unreachable!());
            self.deliver_counted();
            self.tgt.handle_message(self.now, m);
        } else if self.to_src.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, m) = self.to_src.pop_front().unwrap_or_else(|| unreachable!());
            self.deliver_counted();
            self.src.handle_message(m);
        } else {
            self.tgt.handle_timeout(self.now);
        }
        true
    }

    fn deliver_counted(&mut self) {
        self.delivered += 1;
        if self.faults.break_after == Some(self.delivered) && !self.broken {
            self.broken = true;
            self.src.handle_disconnect("connection reset".into());
            self.tgt.handle_disconnect("connection reset");
        }
    }

    /// Checks the promises from outside once the run ended; returns the violations.
    pub fn check(&mut self) -> Vec<String> {
        let mut v = std::mem::take(&mut self.violations);
        match (&self.source_end, &self.target_end) {
            (Some(Ok(seq)), t) => {
                if t != &Some(Ok(*seq)) {
                    v.push(format!("the source saw RP {seq} committed, the target ended {t:?}"));
                }
                if !self.store.rps.iter().any(|(m, _)| m.seq == *seq) {
                    v.push(format!("the source saw RP {seq} committed; the store does not hold it"));
                }
            }
            (None, _) => v.push("the source never ended".into()),
            (Some(Err(_)), _) => {}
        }
        if self.target_end.is_none() {
            v.push("the target never ended".into());
        }
        // The runs start from an empty catalog: a session that failed committed nothing.
        if matches!(self.target_end, Some(Err(_))) && !self.store.rps.is_empty() {
            v.push("the target failed but the store holds an RP of this session".into());
        }
        v
    }
}

//! The target side of a session: who may replicate what, what to ask for,
//! that exactly that arrives, blobs made durable in batches and acknowledged
//! (`Stored`) before the one-transaction commit, retention before `Committed`.
//!
//! The driver (the applier) does the store work the core asks for with
//! [`TargetEvent`]s and reports back; the core decides everything else. The
//! order of its outputs carries the promises: `Commit` is asked for only once
//! every batch is reported durable and every wanted blob arrived (promise 1),
//! lookups pin what they report present until the session ends (promise 6),
//! and `Committed` goes out only after the commit and retention are done.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use drmesh_topology::{NodeId, Retention, Topology};

use super::msg::{OfferEntry, SourceMsg, TargetMsg, Want};
use crate::blob::{BlobFlags, BlobLoc, EncodedBlob, RpMeta, RpSeq, VolumeName};
use crate::codec::MAX_DELTA_DEPTH;
use crate::content::{BlobId, ContentId};
use crate::time::Millis;

/// Blobs gathered before one durable write (below the source's credit window,
/// so a full window always fills a batch).
pub const BATCH_BLOBS: usize = 32;
/// Payload bytes gathered before one durable write.
pub const BATCH_BYTES: usize = 32 << 20;
/// A partial batch is written when the stream has been quiet this long and no
/// batch is being written (the source may be waiting for exactly these acks).
pub const BATCH_IDLE: Duration = Duration::from_millis(3);

/// Why a target session refused a source's message. The session fails; nothing is committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// A message arrived in a state where it makes no sense.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer may not replicate this volume to this node.
    #[error("{0}")]
    Refused(String),
}

/// What a lookup found: per offered entry, where its content is stored and
/// where its delta base is (`None`: not here).
pub type Found = (Vec<Option<BlobLoc>>, Vec<Option<BlobLoc>>);

/// What the mesh should hear about once a session ends well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// A new RP is committed here.
    Committed(RpMeta),
    /// Retention expired these RPs of `volume`.
    Pruned {
        /// The volume.
        volume: VolumeName,
        /// Their sequence numbers.
        seqs: Vec<RpSeq>,
    },
}

/// Store work the driver must do for the session, each reported back with the
/// matching `handle_*` call, in the order the events came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetEvent {
    /// Find the newest RP of `volume` here: [`TargetSession::handle_newest`].
    Newest {
        /// The volume.
        volume: VolumeName,
    },
    /// Look up where each content and each base is stored, pinning what is found
    /// for this session; stage the block-map changes `(index, content)`:
    /// [`TargetSession::handle_lookup`]. A base of [`ContentId::ZERO`] means none.
    Lookup {
        /// Contents offered.
        contents: Vec<ContentId>,
        /// Their delta base candidates.
        bases: Vec<ContentId>,
        /// Block-map changes to stage.
        changes: Vec<(u64, ContentId)>,
    },
    /// Write these blobs durably (one batch): [`TargetSession::handle_written`].
    /// Batches may be written while the stream is read on.
    Write {
        /// Batch number, to report back.
        batch: u64,
        /// The blobs.
        blobs: Vec<EncodedBlob>,
    },
    /// Commit the RP with the staged changes in one transaction:
    /// [`TargetSession::handle_committed`].
    Commit {
        /// The RP, complete.
        meta: RpMeta,
    },
    /// Apply the policy's retention to `volume`: [`TargetSession::handle_pruned`].
    Prune {
        /// The volume.
        volume: VolumeName,
        /// The policy's retention.
        retention: Retention,
    },
    /// Tell the mesh.
    Announce(Announcement),
    /// The session ended: release what it pinned and staged. `Ok(seq)` when it
    /// committed, `Err(reason)` when not (nothing of it was committed).
    Finished {
        /// The outcome.
        outcome: Result<RpSeq, String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for `Open`.
    Idle,
    /// `Newest` asked for.
    Opening,
    /// Offers and blobs flow.
    Streaming,
    /// `Commit` arrived; waiting for the last batches to be durable.
    Flushing,
    /// `Commit` asked of the store.
    Committing,
    /// `Prune` asked of the store.
    Pruning,
    Done,
    Failed,
}

/// The volume as the topology in force at `Open` allows it.
#[derive(Debug, Clone)]
struct Opened {
    volume: VolumeName,
    source_name: String,
    encrypted: bool,
    retention: Option<Retention>,
    seq: RpSeq,
}

/// Target half of a session.
#[derive(Debug)]
pub struct TargetSession {
    topology: Arc<Topology>,
    local: NodeId,
    peer: NodeId,
    state: State,
    opened: Option<Opened>,
    /// Messages that arrived while the core waited for the store (kept in order).
    inbox: VecDeque<SourceMsg>,
    /// Offers whose lookups are out, oldest first.
    lookups: VecDeque<Vec<OfferEntry>>,
    /// Blobs asked for, by content (a delta's id is unknown until it arrives).
    wanted: BTreeMap<ContentId, Want>,
    received: HashSet<ContentId>,
    batch: Vec<EncodedBlob>,
    batch_bytes: usize,
    next_batch: u64,
    /// Batches handed out and not yet reported: batch -> blob ids.
    writing: BTreeMap<u64, Vec<BlobId>>,
    written_bytes: u64,
    last_input: Millis,
    commit: Option<RpMeta>,
    pruned: Vec<RpSeq>,
    outbox: VecDeque<TargetMsg>,
    events: VecDeque<TargetEvent>,
}

impl TargetSession {
    /// A session on a stream `peer` opened to `local`, judged by `topology`
    /// (the one in force when the stream opened).
    pub fn new(topology: Arc<Topology>, local: NodeId, peer: NodeId) -> Self {
        TargetSession {
            topology,
            local,
            peer,
            state: State::Idle,
            opened: None,
            inbox: VecDeque::new(),
            lookups: VecDeque::new(),
            wanted: BTreeMap::new(),
            received: HashSet::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            next_batch: 0,
            writing: BTreeMap::new(),
            written_bytes: 0,
            last_input: Millis(0),
            commit: None,
            pruned: Vec::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The volume, once `Open` arrived.
    pub fn volume(&self) -> Option<&str> {
        self.opened.as_ref().map(|o| o.volume.as_str())
    }

    /// Whether the session has ended (the `Finished` event is out).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    /// Next message for the source.
    pub fn poll_transmit(&mut self) -> Option<TargetMsg> {
        self.outbox.pop_front()
    }

    /// Next store work or news for the driver.
    pub fn poll_event(&mut self) -> Option<TargetEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due: a partial batch
    /// goes to disk once the stream has been quiet for [`BATCH_IDLE`] and no
    /// batch is being written.
    pub fn poll_timeout(&self) -> Option<Millis> {
        (self.state == State::Streaming && !self.batch.is_empty() && self.writing.is_empty()).then(|| self.last_input.after(BATCH_IDLE))
    }

    /// The time came (see [`poll_timeout`](Self::poll_timeout)).
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.poll_timeout().is_some_and(|due| now >= due) {
            self.write_batch();
        }
    }

    /// A message from the source.
    pub fn handle_message(&mut self, now: Millis, msg: SourceMsg) {
        self.last_input = now;
        if self.is_finished() {
            return;
        }
        self.inbox.push_back(msg);
        self.drain_inbox();
    }

    /// The stream from the source ended or broke.
    pub fn handle_disconnect(&mut self, reason: &str) {
        match self.state {
            // The store is doing the commit or retention: it finishes, and the
            // session ends with it (the source learns from the catalog next time).
            State::Committing | State::Pruning => {}
            State::Done | State::Failed => {}
            _ => self.end(Err(format!("source closed the session before committing ({reason})")), false),
        }
    }

    /// The newest RP of the volume here (seq and Merkle root), or the store's error.
    pub fn handle_newest(&mut self, newest: Result<Option<(RpSeq, crate::content::MerkleRoot)>, String>) {
        if self.state != State::Opening {
            return;
        }
        let newest = match newest {
            Ok(n) => n,
            Err(reason) => return self.end(Err(reason), true),
        };
        let Some(SourceMsg::Open { base, .. }) = self.inbox.pop_front() else {
            return self.end(Err("internal: Open lost".into()), true);
        };
        let seq = newest.map_or(RpSeq::FIRST, |(s, _)| s.next());
        if let Some(o) = self.opened.as_mut() {
            o.seq = seq;
        }
        self.outbox.push_back(TargetMsg::Opened { seq, base_ok: base.is_some() && base == newest });
        self.state = State::Streaming;
        self.drain_inbox();
    }

    /// Results of the oldest outstanding `Lookup`: where each content is stored
    /// and where each base is, or the store's error.
    pub fn handle_lookup(&mut self, result: Result<Found, String>) {
        if self.is_finished() {
            return;
        }
        let Some(entries) = self.lookups.pop_front() else {
            return self.end(Err("internal: a lookup result nobody asked for".into()), true);
        };
        let (present, bases) = match result {
            Ok(r) => r,
            Err(reason) => return self.end(Err(reason), true),
        };
        match self.answer(&entries, &present, &bases) {
            Ok(wants) => self.outbox.push_back(TargetMsg::Answer { wants }),
            Err(e) => return self.end(Err(e.to_string()), true),
        }
        if self.state == State::Flushing {
            self.finish_flush();
        }
    }

    /// Batch `batch` is durable (`Ok(bytes written)`) or failed.
    pub fn handle_written(&mut self, batch: u64, result: Result<u64, String>) {
        let Some(ids) = self.writing.remove(&batch) else { return };
        if self.is_finished() {
            return;
        }
        match result {
            Ok(bytes) => {
                self.written_bytes += bytes;
                self.outbox.push_back(TargetMsg::Stored { blobs: ids });
                if self.state == State::Flushing {
                    self.finish_flush();
                }
            }
            Err(reason) => self.end(Err(reason), true),
        }
    }

    /// The store committed the RP (or failed to: nothing of it is committed).
    pub fn handle_committed(&mut self, result: Result<(), String>) {
        if self.state != State::Committing {
            return;
        }
        if let Err(reason) = result {
            return self.end(Err(reason), true);
        }
        let retention = self.opened.as_ref().and_then(|o| o.retention);
        match (retention, self.opened.as_ref()) {
            (Some(retention), Some(o)) => {
                self.state = State::Pruning;
                self.events.push_back(TargetEvent::Prune { volume: o.volume.clone(), retention });
            }
            _ => self.succeed(),
        }
    }

    /// Retention ran and expired these RPs. (A failed retention is the
    /// driver's to log; it reports none pruned: the commit stands.)
    pub fn handle_pruned(&mut self, seqs: Vec<RpSeq>) {
        if self.state != State::Pruning {
            return;
        }
        self.pruned = seqs;
        self.succeed();
    }

    fn succeed(&mut self) {
        let Some(meta) = self.commit.take() else {
            return self.end(Err("internal: commit lost".into()), true);
        };
        let seq = meta.seq;
        self.outbox.push_back(TargetMsg::Committed { seq });
        let volume = meta.volume.clone();
        self.events.push_back(TargetEvent::Announce(Announcement::Committed(meta)));
        if !self.pruned.is_empty() {
            self.events.push_back(TargetEvent::Announce(Announcement::Pruned { volume, seqs: std::mem::take(&mut self.pruned) }));
        }
        self.state = State::Done;
        self.events.push_back(TargetEvent::Finished { outcome: Ok(seq) });
    }

    /// Ends the session; with `tell`, the source hears why.
    fn end(&mut self, outcome: Result<RpSeq, String>, tell: bool) {
        if self.is_finished() {
            return;
        }
        if let Err(reason) = &outcome {
            if tell {
                self.outbox.push_back(TargetMsg::Failed { reason: reason.clone() });
            }
        }
        self.state = if outcome.is_ok() { State::Done } else { State::Failed };
        self.batch.clear();
        self.inbox.clear();
        self.events.push_back(TargetEvent::Finished { outcome });
    }

    fn fail(&mut self, e: SessionError) {
        self.end(Err(e.to_string()), true);
    }

    /// Handles queued messages while the state allows.
    fn drain_inbox(&mut self) {
        while !self.is_finished() {
            match (self.state, self.inbox.front()) {
                (_, None) | (State::Opening, Some(_)) => return,
                (State::Idle, Some(SourceMsg::Open { .. })) => {
                    // Open stays queued until `Newest` is answered.
                    let Some(SourceMsg::Open { volume, encrypted, .. }) = self.inbox.front().cloned() else { return };
                    match self.admit(&volume, encrypted) {
                        Ok(opened) => {
                            self.opened = Some(opened);
                            self.state = State::Opening;
                            self.events.push_back(TargetEvent::Newest { volume });
                        }
                        Err(e) => self.fail(e),
                    }
                }
                (State::Idle, Some(_)) => return self.fail(SessionError::Protocol("the session did not start with Open".into())),
                (State::Streaming, Some(_)) => {
                    let Some(msg) = self.inbox.pop_front() else { return };
                    self.streaming(msg);
                }
                // The store is committing (or applying retention): the RP is whole
                // whatever the source says now; what it sent after `Commit` is
                // dropped with the session rather than failing a commit in flight.
                (State::Committing | State::Pruning, Some(_)) => return,
                (_, Some(msg)) => {
                    let what = kind(msg);
                    return self.fail(SessionError::Protocol(format!("{what} after Commit")));
                }
            }
        }
    }

    fn streaming(&mut self, msg: SourceMsg) {
        match msg {
            SourceMsg::Open { .. } => self.fail(SessionError::Protocol("a second Open in one session".into())),
            SourceMsg::Offer { entries } => {
                let contents = entries.iter().map(|e| e.content).collect();
                let bases = entries.iter().map(|e| e.base.unwrap_or(ContentId::ZERO)).collect();
                let changes = entries.iter().map(|e| (e.index, e.content)).collect();
                self.lookups.push_back(entries);
                self.events.push_back(TargetEvent::Lookup { contents, bases, changes });
            }
            SourceMsg::Blob(wire) => {
                let blob: EncodedBlob = wire.into();
                if let Err(e) = self.check_blob(&blob) {
                    return self.fail(e);
                }
                self.batch_bytes += blob.payload.len();
                self.batch.push(blob);
                if self.batch.len() >= BATCH_BLOBS || self.batch_bytes >= BATCH_BYTES {
                    self.write_batch();
                }
            }
            SourceMsg::Commit { meta } => {
                self.write_batch();
                self.commit = Some(meta);
                self.state = State::Flushing;
                self.finish_flush();
            }
        }
    }

    /// Hands the gathered blobs to the driver as one batch.
    fn write_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let blobs = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let batch = self.next_batch;
        self.next_batch += 1;
        self.writing.insert(batch, blobs.iter().map(|b| b.id).collect());
        self.events.push_back(TargetEvent::Write { batch, blobs });
    }

    /// After `Commit`: once every lookup is answered and every batch durable,
    /// checks that every wanted blob arrived and asks for the commit.
    fn finish_flush(&mut self) {
        if !self.writing.is_empty() || !self.lookups.is_empty() {
            return;
        }
        let missing = self.wanted.keys().filter(|c| !self.received.contains(c)).count();
        if missing > 0 {
            return self.fail(SessionError::Protocol(format!("commit while {missing} wanted blocks never arrived")));
        }
        let (Some(opened), Some(meta)) = (self.opened.as_ref(), self.commit.as_mut()) else {
            return self.end(Err("internal: commit lost".into()), true);
        };
        if meta.seq != opened.seq {
            let msg = format!("commit of seq {} where the session opened seq {}", meta.seq, opened.seq);
            return self.fail(SessionError::Protocol(msg));
        }
        meta.volume = opened.volume.clone();
        meta.source_node = opened.source_name.clone();
        meta.bytes_stored = self.written_bytes;
        meta.encrypted = opened.encrypted;
        let meta = meta.clone();
        self.state = State::Committing;
        self.events.push_back(TargetEvent::Commit { meta });
    }

    /// Only the volume's source node (or a proxy of its platform) may
    /// replicate it, and only to its targets.
    fn admit(&self, volume: &VolumeName, encrypted: bool) -> Result<Opened, SessionError> {
        let t = &self.topology;
        let peer_name = t.node_by_id(&self.peer).map(|n| n.name.clone()).unwrap_or_else(|| self.peer.short());
        let local_name = t.node_by_id(&self.local).map(|n| n.name.clone()).unwrap_or_default();
        let Some(vol) = t.volumes.iter().find(|v| v.name == *volume) else {
            return Err(SessionError::Refused(format!("volume \"{volume}\" is not in this node's topology")));
        };
        if !t.may_read(vol, &peer_name) {
            return Err(SessionError::Refused(match t.platform_of(vol) {
                Some(p) => format!("node {peer_name} is not a proxy of platform {}, which reads volume \"{volume}\" (its proxies: {})", p.name, p.proxies.join(", ")),
                None => format!("node {peer_name} is not the source of volume \"{volume}\" (the topology says {})", vol.source),
            }));
        }
        if !vol.targets.contains(&local_name) {
            return Err(SessionError::Refused(format!("this node ({local_name}) is not a target of volume \"{volume}\"")));
        }
        Ok(Opened {
            volume: volume.clone(),
            source_name: peer_name,
            encrypted,
            retention: t.policies.get(&vol.policy).map(|p| p.retention),
            seq: RpSeq(0),
        })
    }

    /// Decides the answer to an offer, given where each entry's content and base are stored.
    fn answer(&mut self, entries: &[OfferEntry], present: &[Option<BlobLoc>], bases: &[Option<BlobLoc>]) -> Result<Vec<Want>, SessionError> {
        if present.len() != entries.len() || bases.len() != entries.len() {
            return Err(SessionError::Protocol("lookup results do not match the offer".into()));
        }
        let mut wants = Vec::with_capacity(entries.len());
        for ((entry, here), base) in entries.iter().zip(present).zip(bases) {
            let want = if entry.content.is_zero() || here.is_some() || self.wanted.contains_key(&entry.content) {
                // Stored already, or offered twice in one cycle (two identical blocks): send once.
                Want::Present
            } else {
                match base {
                    Some(loc) if loc.depth < MAX_DELTA_DEPTH => Want::Delta { base: loc.blob, depth: loc.depth },
                    _ => Want::Full,
                }
            };
            if want != Want::Present {
                self.wanted.insert(entry.content, want);
            }
            wants.push(want);
        }
        Ok(wants)
    }

    /// Checks an arriving blob against what was asked for.
    fn check_blob(&mut self, blob: &EncodedBlob) -> Result<(), SessionError> {
        let Some(want) = self.wanted.get(&blob.content) else {
            return Err(SessionError::Protocol(format!("blob {} for content that was not asked for", blob.id)));
        };
        match (want, blob.flags.has(BlobFlags::DELTA), blob.base) {
            (Want::Full, false, None) if blob.id == blob.content && blob.depth == 0 => {}
            (Want::Delta { base, depth }, true, Some(b)) if b == *base && blob.depth == *depth + 1 => {}
            // A source may always fall back from a delta to a full block.
            (Want::Delta { .. }, false, None) if blob.id == blob.content && blob.depth == 0 => {}
            _ => {
                let asked = match want {
                    Want::Present => "nothing: it is stored already".to_string(),
                    Want::Full => "a full block".to_string(),
                    Want::Delta { base, depth } => format!("a delta of depth {} on {base}", depth + 1),
                };
                return Err(SessionError::Protocol(format!("blob {} is not in the form asked for ({asked})", blob.id)));
            }
        }
        if !self.received.insert(blob.content) {
            return Err(SessionError::Protocol(format!("blob {} sent twice", blob.id)));
        }
        Ok(())
    }
}

fn kind(msg: &SourceMsg) -> &'static str {
    match msg {
        SourceMsg::Open { .. } => "Open",
        SourceMsg::Offer { .. } => "Offer",
        SourceMsg::Blob(_) => "Blob",
        SourceMsg::Commit { .. } => "Commit",
    }
}

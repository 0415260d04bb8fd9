//! The seams between storage and the rest: what a target's sessions need of a
//! store ([`SessionStore`]) and what reading recovery points back needs
//! ([`ReadStore`]: restores, exports and fetches served to peers), both
//! implemented by the local store ([`Store`]: blob files, manifests, a redb
//! catalog) and by [`MemoryStore`] (everything in memory, for simulation and
//! tests). A new backend (an S3-compatible bucket with pack files) implements
//! the same traits and passes the same contract tests (`backend::tests`); the
//! applier, restore, export and fetch drive any of them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::retention::{select_keep, unchanged_predecessors};
use crate::content::MerkleRoot;
use super::{BlobId, BlobLoc, ContentId, EncodedBlob, Retention, RpMeta, RpSeq, Store, StoreError, VolumeName};

/// What a replication session does to a store, in the order the target's core
/// asks for it. Every call either does all it says or nothing, and says why.
pub trait SessionStore: Send + Sync + 'static {
    /// The newest RP of `volume`, if any.
    fn newest_rp(&self, volume: &str) -> Result<Option<RpMeta>, StoreError>;
    /// Where each content can be materialized from (`None`: not here, or
    /// ZERO); pins what is found for `session` so GC keeps it (promise 6).
    fn lookup_and_pin(&self, session: u64, contents: &[ContentId]) -> Result<Vec<Option<BlobLoc>>, StoreError>;
    /// Records block-map changes `(index, content)` of `volume` for `session`'s commit.
    fn stage(&self, session: u64, volume: &str, changes: &[(u64, ContentId)]) -> Result<(), StoreError>;
    /// Stores blobs durably (all of them or, on an error, possibly some: never
    /// a partial blob); returns the bytes written. They stay pinned for `session`.
    fn put_blobs(&self, session: u64, blobs: &[EncodedBlob]) -> Result<u64, StoreError>;
    /// Commits `meta` with `session`'s staged changes of its volume, atomically.
    /// Refused, changing nothing, when a staged content is not materializable,
    /// the RP exists, its seq is not newer than the newest, or a staged index
    /// is past `block_count`.
    fn commit_rp(&self, session: u64, meta: &RpMeta) -> Result<(), StoreError>;
    /// Applies `retention` to `volume` at `now_unix_ms`; returns the deleted seqs.
    fn prune(&self, volume: &str, retention: &Retention, now_unix_ms: u64) -> Result<Vec<RpSeq>, StoreError>;
    /// Drops `session`'s pins and staged changes.
    fn release_session(&self, session: u64);
}

impl SessionStore for Store {
    fn newest_rp(&self, volume: &str) -> Result<Option<RpMeta>, StoreError> {
        self.latest_rp(volume)
    }
    fn lookup_and_pin(&self, session: u64, contents: &[ContentId]) -> Result<Vec<Option<BlobLoc>>, StoreError> {
        Store::lookup_and_pin(self, session, contents)
    }
    fn stage(&self, session: u64, volume: &str, changes: &[(u64, ContentId)]) -> Result<(), StoreError> {
        Store::stage(self, session, volume, changes)
    }
    fn put_blobs(&self, session: u64, blobs: &[EncodedBlob]) -> Result<u64, StoreError> {
        Store::put_blobs(self, session, blobs)
    }
    fn commit_rp(&self, session: u64, meta: &RpMeta) -> Result<(), StoreError> {
        Store::commit_rp(self, session, meta)
    }
    fn prune(&self, volume: &str, retention: &Retention, now_unix_ms: u64) -> Result<Vec<RpSeq>, StoreError> {
        Store::prune(self, volume, retention, now_unix_ms)
    }
    fn release_session(&self, session: u64) {
        Store::release_session(self, session)
    }
}

/// What reading a recovery point back needs of a store: its metadata, its
/// block map page by page, and the blobs that materialize a content. Reads
/// never change the store; every error names what it could not read.
pub trait ReadStore: Send + Sync + 'static {
    /// `volume@seq`, if committed and not pruned.
    fn rp(&self, volume: &str, seq: RpSeq) -> Result<Option<RpMeta>, StoreError>;
    /// The newest RP of `volume`, if any.
    fn latest_rp(&self, volume: &str) -> Result<Option<RpMeta>, StoreError>;
    /// The contents of blocks `start .. start + count` of `volume@seq` (clamped
    /// to its block count), ZERO for blocks never written; `RpNotFound` when
    /// the RP is not here.
    fn block_ids(&self, volume: &str, seq: RpSeq, start: u64, count: u64) -> Result<Vec<ContentId>, StoreError>;
    /// The blob that holds `content` and its delta depth (`None`: not here).
    fn locate(&self, content: &ContentId) -> Result<Option<BlobLoc>, StoreError>;
    /// Blob `id`, checked, its payload read into `buffer` (capacity reused).
    fn read_blob_into(&self, id: &BlobId, buffer: Vec<u8>) -> Result<EncodedBlob, StoreError>;
}

impl ReadStore for Store {
    fn rp(&self, volume: &str, seq: RpSeq) -> Result<Option<RpMeta>, StoreError> {
        Store::rp(self, volume, seq)
    }
    fn latest_rp(&self, volume: &str) -> Result<Option<RpMeta>, StoreError> {
        Store::latest_rp(self, volume)
    }
    fn block_ids(&self, volume: &str, seq: RpSeq, start: u64, count: u64) -> Result<Vec<ContentId>, StoreError> {
        Store::block_ids(self, volume, seq, start, count)
    }
    fn locate(&self, content: &ContentId) -> Result<Option<BlobLoc>, StoreError> {
        Store::locate(self, content)
    }
    fn read_blob_into(&self, id: &BlobId, buffer: Vec<u8>) -> Result<EncodedBlob, StoreError> {
        Store::read_blob_into(self, id, buffer)
    }
}

#[derive(Default)]
struct Memory {
    blobs: HashMap<BlobId, EncodedBlob>,
    /// content -> the blob that materializes it.
    contents: HashMap<ContentId, BlobId>,
    /// volume -> seq -> (RP, block map).
    rps: BTreeMap<VolumeName, BTreeMap<RpSeq, (RpMeta, Vec<ContentId>)>>,
    staged: HashMap<(u64, String), BTreeMap<u64, ContentId>>,
    pins: HashMap<u64, HashSet<BlobId>>,
}

/// A store held entirely in memory: the same rules as the local store
/// (durable means "in the map", pins, staged changes, atomic commits with the
/// same refusals, retention by the same selection) without files.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Memory> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The block map of `volume@seq` (content per block), if that RP exists.
    pub fn block_map(&self, volume: &str, seq: RpSeq) -> Option<Vec<ContentId>> {
        self.lock().rps.get(volume)?.get(&seq).map(|(_, map)| map.clone())
    }

    /// Whether `content` can be materialized (its blob and base chain are here).
    pub fn has_content(&self, content: &ContentId) -> bool {
        MemoryStore::locate(&self.lock(), content).is_some()
    }

    /// Every content some RP references.
    pub fn referenced(&self) -> HashSet<ContentId> {
        let m = self.lock();
        m.rps.values().flat_map(BTreeMap::values).flat_map(|(_, map)| map.iter().copied()).filter(|c| !c.is_zero()).collect()
    }

    /// The blob stored under `id`.
    pub fn blob(&self, id: &BlobId) -> Option<EncodedBlob> {
        self.lock().blobs.get(id).cloned()
    }

    /// Deletes every blob no RP references and no session pinned; returns how many.
    pub fn gc(&self) -> usize {
        let mut m = self.lock();
        let referenced: HashSet<ContentId> = m.rps.values().flat_map(BTreeMap::values).flat_map(|(_, map)| map.iter().copied()).collect();
        let mut keep: HashSet<BlobId> = m.pins.values().flatten().copied().collect();
        keep.extend(m.contents.iter().filter(|(c, _)| referenced.contains(c)).map(|(_, blob)| *blob));
        // A kept delta keeps its base chain.
        let mut todo: Vec<BlobId> = keep.iter().copied().collect();
        while let Some(id) = todo.pop() {
            if let Some(base) = m.blobs.get(&id).and_then(|b| b.base) {
                if keep.insert(base) {
                    todo.push(base);
                }
            }
        }
        let before = m.blobs.len();
        m.blobs.retain(|id, _| keep.contains(id));
        let Memory { blobs, contents, .. } = &mut *m;
        contents.retain(|_, blob| blobs.contains_key(blob));
        before - blobs.len()
    }

    /// Whether `content` can be materialized: its blob and the whole base chain are here.
    fn locate(m: &Memory, content: &ContentId) -> Option<BlobLoc> {
        let blob = *m.contents.get(content)?;
        let b = m.blobs.get(&blob)?;
        let mut base = b.base;
        while let Some(id) = base {
            base = m.blobs.get(&id)?.base;
        }
        Some(BlobLoc { blob, depth: b.depth })
    }
}

impl SessionStore for MemoryStore {
    fn newest_rp(&self, volume: &str) -> Result<Option<RpMeta>, StoreError> {
        Ok(self.lock().rps.get(volume).and_then(|r| r.values().next_back()).map(|(m, _)| m.clone()))
    }

    fn lookup_and_pin(&self, session: u64, contents: &[ContentId]) -> Result<Vec<Option<BlobLoc>>, StoreError> {
        let mut m = self.lock();
        let found: Vec<Option<BlobLoc>> = contents.iter().map(|c| if c.is_zero() { None } else { MemoryStore::locate(&m, c) }).collect();
        m.pins.entry(session).or_default().extend(found.iter().flatten().map(|l| l.blob));
        Ok(found)
    }

    fn stage(&self, session: u64, volume: &str, changes: &[(u64, ContentId)]) -> Result<(), StoreError> {
        self.lock().staged.entry((session, volume.to_string())).or_default().extend(changes.iter().copied());
        Ok(())
    }

    fn put_blobs(&self, session: u64, blobs: &[EncodedBlob]) -> Result<u64, StoreError> {
        let mut m = self.lock();
        let mut bytes = 0;
        for b in blobs {
            if let Some(base) = b.base.filter(|base| !m.blobs.contains_key(base)) {
                return Err(StoreError::MissingBase { blob: b.id.to_hex(), base: base.to_hex() });
            }
            bytes += b.payload.len() as u64;
            m.contents.insert(b.content, b.id);
            m.blobs.insert(b.id, b.clone());
            m.pins.entry(session).or_default().insert(b.id);
        }
        Ok(bytes)
    }

    fn commit_rp(&self, session: u64, meta: &RpMeta) -> Result<(), StoreError> {
        let mut m = self.lock();
        let rp = meta.name();
        let existing = m.rps.get(&meta.volume);
        if existing.is_some_and(|r| r.contains_key(&meta.seq)) {
            return Err(StoreError::RpExists { rp });
        }
        let newest = existing.and_then(|r| r.iter().next_back()).map(|(s, (_, map))| (*s, map.clone()));
        if let Some((newest, _)) = newest.as_ref().filter(|(n, _)| *n >= meta.seq) {
            return Err(StoreError::SeqNotNewer { rp, newest: *newest });
        }
        let mut map = newest.map(|(_, map)| map).unwrap_or_default();
        map.resize(usize::try_from(meta.block_count).unwrap_or(usize::MAX), ContentId::ZERO);
        let staged = m.staged.get(&(session, meta.volume.to_string())).cloned().unwrap_or_default();
        for (&index, content) in &staged {
            if index >= meta.block_count {
                return Err(StoreError::InvalidRp { rp, cause: format!("staged block {index} is past the RP's {} blocks", meta.block_count) });
            }
            if !content.is_zero() && MemoryStore::locate(&m, content).is_none() {
                return Err(StoreError::MissingContent { rp, index, content: content.to_hex() });
            }
            map[index as usize] = *content;
        }
        m.staged.remove(&(session, meta.volume.to_string()));
        m.rps.entry(meta.volume.clone()).or_default().insert(meta.seq, (meta.clone(), map));
        Ok(())
    }

    fn prune(&self, volume: &str, retention: &Retention, now_unix_ms: u64) -> Result<Vec<RpSeq>, StoreError> {
        let mut m = self.lock();
        let Some(rps) = m.rps.get_mut(volume) else { return Ok(Vec::new()) };
        let all: Vec<(RpSeq, u64)> = rps.values().map(|(meta, _)| (meta.seq, meta.time_unix_ms)).collect();
        let roots: Vec<(RpSeq, MerkleRoot)> = rps.values().map(|(meta, _)| (meta.seq, meta.merkle_root)).collect();
        let unchanged = if retention.coalesce_unchanged { unchanged_predecessors(&roots) } else { Default::default() };
        let distinct: Vec<(RpSeq, u64)> = all.iter().copied().filter(|(s, _)| !unchanged.contains(s)).collect();
        let keep = select_keep(&distinct, retention, now_unix_ms);
        let deleted: Vec<RpSeq> = all.iter().map(|(s, _)| *s).filter(|s| !keep.contains(s)).collect();
        rps.retain(|s, _| keep.contains(s));
        Ok(deleted)
    }

    fn release_session(&self, session: u64) {
        let mut m = self.lock();
        m.pins.remove(&session);
        m.staged.retain(|(s, _), _| *s != session);
    }
}

impl ReadStore for MemoryStore {
    fn rp(&self, volume: &str, seq: RpSeq) -> Result<Option<RpMeta>, StoreError> {
        Ok(self.lock().rps.get(volume).and_then(|r| r.get(&seq)).map(|(m, _)| m.clone()))
    }

    fn latest_rp(&self, volume: &str) -> Result<Option<RpMeta>, StoreError> {
        self.newest_rp(volume)
    }

    fn block_ids(&self, volume: &str, seq: RpSeq, start: u64, count: u64) -> Result<Vec<ContentId>, StoreError> {
        let m = self.lock();
        let (_, map) = m.rps.get(volume).and_then(|r| r.get(&seq)).ok_or_else(|| StoreError::RpNotFound { rp: super::rp_name(volume, seq) })?;
        let start = usize::try_from(start).unwrap_or(usize::MAX).min(map.len());
        let end = start.saturating_add(usize::try_from(count).unwrap_or(usize::MAX)).min(map.len());
        Ok(map[start..end].to_vec())
    }

    fn locate(&self, content: &ContentId) -> Result<Option<BlobLoc>, StoreError> {
        Ok(MemoryStore::locate(&self.lock(), content))
    }

    fn read_blob_into(&self, id: &BlobId, mut buffer: Vec<u8>) -> Result<EncodedBlob, StoreError> {
        let m = self.lock();
        let blob = m.blobs.get(id).ok_or_else(|| StoreError::BlobMissing { blob: id.to_hex(), path: "(memory)".into() })?;
        buffer.clear();
        buffer.extend_from_slice(&blob.payload);
        Ok(EncodedBlob { id: blob.id, content: blob.content, flags: blob.flags, plain_len: blob.plain_len, base: blob.base, depth: blob.depth, payload: buffer })
    }
}

#[cfg(test)]
mod tests {
    //! The contract every backend keeps, run against each.

    use super::*;
    use crate::codec::BlockCodec;

    fn meta(seq: u64, blocks: u64, time: u64) -> RpMeta {
        RpMeta {
            volume: crate::store::VolumeName::from_static("vol"),
            seq: RpSeq(seq),
            time_unix_ms: time,
            source_node: "src".into(),
            volume_bytes: blocks * 4096,
            block_bytes: 4096,
            block_count: blocks,
            changed_blocks: blocks,
            bytes_stored: 0,
            merkle_root: crate::content::MerkleRoot([0; 32]),
            encrypted: false,
            consistency: "crash".into(),
            group: None,
        }
    }

    fn contract<S: SessionStore + ReadStore>(store: &S) {
        let block_map = |seq: RpSeq| ReadStore::block_ids(store, "vol", seq, 0, u64::MAX).ok();
        let codec = BlockCodec::new(Some(1), None);
        let data: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![i; 4096]).collect();
        let ids: Vec<ContentId> = data.iter().map(|d| codec.ids().content_id(d)).collect();
        assert_eq!(store.newest_rp("vol").expect("newest"), None);
        assert_eq!(store.lookup_and_pin(1, &[ids[0], ContentId::ZERO]).expect("lookup"), vec![None, None]);

        // A commit whose staged content never arrived is refused, nothing committed.
        store.stage(1, "vol", &[(0, ids[0]), (1, ContentId::ZERO)]).expect("stage");
        let refused = store.commit_rp(1, &meta(1, 2, 1_000)).expect_err("commit without the blob");
        assert!(matches!(refused, StoreError::MissingContent { index: 0, .. }), "{refused}");
        assert_eq!(store.newest_rp("vol").expect("newest"), None);

        // The blob arrives: the same staged rows commit.
        let written = store.put_blobs(1, &[codec.encode_full(ids[0], &data[0])]).expect("put");
        assert!(written > 0);
        store.commit_rp(1, &meta(1, 2, 1_000)).expect("commit");
        store.release_session(1);
        assert_eq!(store.newest_rp("vol").expect("newest").map(|m| m.seq), Some(RpSeq(1)));
        assert_eq!(block_map(RpSeq(1)), Some(vec![ids[0], ContentId::ZERO]));

        // A second session: block 1 changes, block 0 is present (pinned), the map carries over.
        let found = store.lookup_and_pin(2, &[ids[0], ids[1]]).expect("lookup");
        assert_eq!(found[0].map(|l| l.blob), Some(ids[0]));
        assert_eq!(found[1], None);
        store.put_blobs(2, &[codec.encode_full(ids[1], &data[1])]).expect("put");
        store.stage(2, "vol", &[(1, ids[1])]).expect("stage");
        assert!(matches!(store.commit_rp(2, &meta(1, 2, 2_000)), Err(StoreError::RpExists { .. })));
        store.commit_rp(2, &meta(2, 2, 2_000)).expect("commit");
        assert!(matches!(store.commit_rp(2, &meta(2, 2, 2_000)), Err(StoreError::RpExists { .. })));
        store.release_session(2);
        assert_eq!(block_map(RpSeq(2)), Some(vec![ids[0], ids[1]]));

        // Past the end of the volume: refused.
        store.put_blobs(3, &[codec.encode_full(ids[2], &data[2])]).expect("put");
        store.stage(3, "vol", &[(5, ids[2])]).expect("stage");
        assert!(matches!(store.commit_rp(3, &meta(3, 2, 3_000)), Err(StoreError::InvalidRp { .. })));
        store.release_session(3);

        // Retention keep_last 1: RP 1 goes, RP 2 stays.
        let keep_one = Retention { keep_last: 1, ..Retention::default() };
        assert_eq!(store.prune("vol", &keep_one, 10_000).expect("prune"), vec![RpSeq(1)]);
        assert_eq!(store.newest_rp("vol").expect("newest").map(|m| m.seq), Some(RpSeq(2)));
        assert_eq!(store.prune("other", &keep_one, 10_000).expect("prune of no volume"), Vec::<RpSeq>::new());

        // Reading back: metadata, pages of the block map, chains.
        assert_eq!(ReadStore::rp(store, "vol", RpSeq(1)).expect("rp"), None, "pruned");
        assert_eq!(ReadStore::rp(store, "vol", RpSeq(2)).expect("rp").map(|m| m.time_unix_ms), Some(2_000));
        assert_eq!(ReadStore::latest_rp(store, "vol").expect("latest").map(|m| m.seq), Some(RpSeq(2)));
        assert_eq!(ReadStore::block_ids(store, "vol", RpSeq(2), 1, 5).expect("page past the end is clamped"), vec![ids[1]]);
        assert_eq!(ReadStore::block_ids(store, "vol", RpSeq(2), 7, 1).expect("page after the end"), Vec::<ContentId>::new());
        let gone = ReadStore::block_ids(store, "vol", RpSeq(1), 0, 1).expect_err("pruned RP");
        assert!(matches!(gone, StoreError::RpNotFound { .. }), "{gone}");
        let chain = super::super::blob_chain(store, &ids[1]).expect("chain");
        assert_eq!((chain.len(), chain[0].content, chain[0].base), (1, ids[1], None));
        let (mut head, mut block) = (chain[0].clone(), vec![0; 4096]);
        codec.open_into(&mut head, &mut block).expect("open");
        assert_eq!(block, data[1]);
        let missing = super::super::blob_chain(store, &codec.ids().content_id(&[9; 4096])).expect_err("never stored");
        assert!(matches!(missing, StoreError::ContentNotFound { .. }), "{missing}");
    }

    #[test]
    fn the_local_store_keeps_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        contract(&store);
    }

    #[test]
    fn the_memory_store_keeps_the_contract() {
        let store = MemoryStore::new();
        contract(&store);
    }

    #[test]
    fn memory_gc_keeps_referenced_and_pinned_blobs() {
        let codec = BlockCodec::new(None, None);
        let store = MemoryStore::new();
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        let (ia, ib) = (codec.ids().content_id(&a), codec.ids().content_id(&b));
        store.put_blobs(1, &[codec.encode_full(ia, &a), codec.encode_full(ib, &b)]).expect("put");
        store.stage(1, "vol", &[(0, ia)]).expect("stage");
        store.commit_rp(1, &meta(1, 1, 1)).expect("commit");
        assert_eq!(store.gc(), 0, "session 1 still pins both");
        store.release_session(1);
        assert_eq!(store.gc(), 1, "b is unreferenced and unpinned");
        assert!(store.blob(&ia).is_some() && store.blob(&ib).is_none());
        store.lookup_and_pin(2, &[ia]).expect("lookup");
        assert_eq!(store.gc(), 0);
    }
}

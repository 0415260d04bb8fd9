//! The source's baseline: per (volume, target), the block ids and page hashes of
//! the last RP that target committed.
//!
//! During a cycle the new entries of changed blocks are staged (written without
//! forcing them to disk); when the target acknowledges the commit, one durable
//! transaction promotes them and records the new RP. A cycle that fails leaves
//! the staged rows behind, and the next cycle clears them first: the baseline
//! itself only ever moves forward to an RP the target has committed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::SourceError;
use crate::content::ContentId;
use crate::store::RpSeq;

/// (volume, target) -> postcard(BaselineMeta).
const META: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("baseline_meta");
/// (volume, target, block index) -> content id (32 bytes) followed by page hashes.
const BLOCKS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("baseline_blocks");
/// Staged entries of the cycle in flight, same layout as BLOCKS.
const STAGED: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("baseline_staged");
/// Volumes paused by `drmesh ctl pause`: volume -> when (Unix ms).
const PAUSED: TableDefinition<&str, u64> = TableDefinition::new("paused_volumes");
/// State a source kind keeps between cycles: (volume, key) -> bytes (the kind's own encoding).
const SOURCE_STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("source_state");

/// What the baseline RP was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineMeta {
    /// RP sequence number on the target.
    pub seq: RpSeq,
    /// Its Merkle root.
    pub merkle_root: crate::content::MerkleRoot,
    /// Block size of the volume then.
    pub block_bytes: u32,
    /// Blocks in the volume then.
    pub block_count: u64,
    /// Bytes in the volume then.
    pub volume_bytes: u64,
    /// When the RP's snapshot was taken.
    pub time_unix_ms: u64,
}

/// One block's entry in a baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBlock {
    /// Content id then.
    pub content: ContentId,
    /// Page hashes then (may be empty for zero blocks).
    pub page_hashes: Vec<u8>,
}

fn encode_block(content: &ContentId, page_hashes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + page_hashes.len());
    v.extend_from_slice(&content.0);
    v.extend_from_slice(page_hashes);
    v
}

fn decode_block(bytes: &[u8]) -> BaseBlock {
    let mut id = [0u8; 32];
    let n = bytes.len().min(32);
    id[..n].copy_from_slice(&bytes[..n]);
    BaseBlock { content: ContentId(id), page_hashes: bytes.get(32..).unwrap_or_default().to_vec() }
}

/// Page cache of the baseline database redb keeps in memory. Its default (1 GiB)
/// let a source's memory grow with its volumes: a baseline holds a row of page
/// hashes per non-zero block (~8 KiB per 1 MiB block), and a cycle's staged
/// rows stay in redb's write buffer (half the cache) until the commit. A cycle
/// reads the baseline in order, window by window, so a small cache costs it
/// nothing; `scripts/bench-sizes` shows the peaks at 2, 8 and 16 GiB.
pub const BASELINE_CACHE_BYTES: usize = 32 << 20;

/// Staged rows moved per step of a promotion (one transaction all the same).
const PROMOTE_CHUNK: usize = 256;

/// The source node's baseline database.
pub struct Baselines {
    db: Database,
    path: PathBuf,
}

impl Baselines {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let db = redb::Builder::new().set_cache_size(BASELINE_CACHE_BYTES).create(path).map_err(|e| SourceError::Baseline { path: path.display().to_string(), reason: e.to_string() })?;
        let this = Baselines { db, path: path.to_path_buf() };
        let txn = this.db.begin_write().map_err(|e| this.err(e))?;
        {
            txn.open_table(META).map_err(|e| this.err(e))?;
            txn.open_table(BLOCKS).map_err(|e| this.err(e))?;
            txn.open_table(STAGED).map_err(|e| this.err(e))?;
            txn.open_table(PAUSED).map_err(|e| this.err(e))?;
            txn.open_table(SOURCE_STATE).map_err(|e| this.err(e))?;
        }
        txn.commit().map_err(|e| this.err(e))?;
        Ok(this)
    }

    /// The database file; its folder is the node's state folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> SourceError {
        SourceError::Baseline { path: self.path.display().to_string(), reason: e.to_string() }
    }

    /// The baseline of `volume` towards `target`, if any cycle committed.
    pub fn meta(&self, volume: &str, target: &str) -> Result<Option<BaselineMeta>, SourceError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(META).map_err(|e| self.err(e))?;
        let value = table.get((volume, target)).map_err(|e| self.err(e))?;
        match value {
            Some(v) => postcard::from_bytes(v.value()).map(Some).map_err(|e| self.err(e)),
            None => Ok(None),
        }
    }

    /// Baseline blocks `start..start+count` of `volume` towards `target`, in order;
    /// `None` where the baseline has no entry (never written, or zero).
    pub fn blocks(&self, volume: &str, target: &str, start: u64, count: u64) -> Result<Vec<Option<BaseBlock>>, SourceError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BLOCKS).map_err(|e| self.err(e))?;
        let mut out = vec![None; count as usize];
        for item in table.range((volume, target, start)..(volume, target, start + count)).map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let index = k.value().2;
            out[(index - start) as usize] = Some(decode_block(v.value()));
        }
        Ok(out)
    }

    /// Drops what an earlier, unfinished cycle staged.
    pub fn clear_staged(&self, volume: &str, target: &str) -> Result<(), SourceError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::None).map_err(|e| self.err(e))?;
        {
            let mut staged = txn.open_table(STAGED).map_err(|e| self.err(e))?;
            staged.retain_in((volume, target, 0)..=(volume, target, u64::MAX), |_, _| false).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Stages new entries of changed blocks for the cycle in flight (not durable by itself).
    pub fn stage(&self, volume: &str, target: &str, entries: &[(u64, ContentId, Vec<u8>)]) -> Result<(), SourceError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::None).map_err(|e| self.err(e))?;
        {
            let mut staged = txn.open_table(STAGED).map_err(|e| self.err(e))?;
            for (index, content, hashes) in entries {
                staged.insert((volume, target, *index), encode_block(content, hashes).as_slice()).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The target committed `meta`: promote the staged entries, drop entries past
    /// the end of the volume, and record the new baseline, in one durable transaction.
    pub fn promote(&self, volume: &str, target: &str, meta: &BaselineMeta) -> Result<u64, SourceError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut promoted = 0;
        {
            let mut staged = txn.open_table(STAGED).map_err(|e| self.err(e))?;
            let mut blocks = txn.open_table(BLOCKS).map_err(|e| self.err(e))?;
            // In chunks, so memory stays bounded whatever the volume's size.
            let mut from = 0u64;
            loop {
                let mut moved = Vec::with_capacity(PROMOTE_CHUNK);
                for item in staged.range((volume, target, from)..=(volume, target, u64::MAX)).map_err(|e| self.err(e))?.take(PROMOTE_CHUNK) {
                    let (k, v) = item.map_err(|e| self.err(e))?;
                    moved.push((k.value().2, v.value().to_vec()));
                }
                let Some(&(last, _)) = moved.last() else { break };
                for (index, value) in &moved {
                    if value.len() >= 32 && value[..32] == [0u8; 32] {
                        blocks.remove((volume, target, *index)).map_err(|e| self.err(e))?;
                    } else {
                        blocks.insert((volume, target, *index), value.as_slice()).map_err(|e| self.err(e))?;
                    }
                    promoted += 1;
                }
                if last == u64::MAX {
                    break;
                }
                from = last + 1;
            }
            staged.retain_in((volume, target, 0)..=(volume, target, u64::MAX), |_, _| false).map_err(|e| self.err(e))?;
            blocks.retain_in((volume, target, meta.block_count)..=(volume, target, u64::MAX), |_, _| false).map_err(|e| self.err(e))?;
            let mut metas = txn.open_table(META).map_err(|e| self.err(e))?;
            let bytes = postcard::to_allocvec(meta).map_err(|e| self.err(e))?;
            metas.insert((volume, target), bytes.as_slice()).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(promoted)
    }

    /// The paused volumes and since when (Unix ms).
    pub fn paused(&self) -> Result<BTreeMap<String, u64>, SourceError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(PAUSED).map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for item in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.insert(k.value().to_string(), v.value());
        }
        Ok(out)
    }

    /// Records `volume` as paused since `since_unix_ms` (`Some`) or not paused (`None`),
    /// durably: a restart keeps the volume paused.
    pub fn set_paused(&self, volume: &str, since_unix_ms: Option<u64>) -> Result<(), SourceError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(PAUSED).map_err(|e| self.err(e))?;
            match since_unix_ms {
                Some(at) => table.insert(volume, at).map(|_| ()),
                None => table.remove(volume).map(|_| ()),
            }
            .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The source kind's state `key` of `volume`, if recorded.
    pub fn source_state(&self, volume: &str, key: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(SOURCE_STATE).map_err(|e| self.err(e))?;
        let value = table.get((volume, key)).map_err(|e| self.err(e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Sets (`Some`) or removes (`None`) source kind states of `volume`, all in
    /// one durable transaction: after a crash either every entry changed or none.
    pub fn set_source_state(&self, volume: &str, entries: &[(String, Option<Vec<u8>>)]) -> Result<(), SourceError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(SOURCE_STATE).map_err(|e| self.err(e))?;
            for (key, value) in entries {
                match value {
                    Some(bytes) => table.insert((volume, key.as_str()), bytes.as_slice()).map(|_| ()),
                    None => table.remove((volume, key.as_str())).map(|_| ()),
                }
                .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Forgets the baseline (the next cycle offers every block).
    pub fn reset(&self, volume: &str, target: &str) -> Result<(), SourceError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut metas = txn.open_table(META).map_err(|e| self.err(e))?;
            metas.remove((volume, target)).map_err(|e| self.err(e))?;
            let mut blocks = txn.open_table(BLOCKS).map_err(|e| self.err(e))?;
            blocks.retain_in((volume, target, 0)..=(volume, target, u64::MAX), |_, _| false).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(seq: u64, count: u64) -> BaselineMeta {
        BaselineMeta { seq: RpSeq(seq), merkle_root: crate::content::MerkleRoot([seq as u8; 32]), block_bytes: 4096, block_count: count, volume_bytes: count * 4096, time_unix_ms: seq }
    }

    #[test]
    fn staged_entries_count_only_after_promote() {
        let dir = tempfile::tempdir().unwrap();
        let b = Baselines::open(&dir.path().join("source.redb")).unwrap();
        let c1 = ContentId([1; 32]);
        b.stage("v", "t", &[(0, c1, vec![7; 16]), (3, c1, vec![8; 16])]).unwrap();
        assert_eq!(b.blocks("v", "t", 0, 4).unwrap(), vec![None; 4]);
        assert_eq!(b.meta("v", "t").unwrap(), None);
        b.promote("v", "t", &meta(1, 4)).unwrap();
        let got = b.blocks("v", "t", 0, 4).unwrap();
        assert_eq!(got[0], Some(BaseBlock { content: c1, page_hashes: vec![7; 16] }));
        assert_eq!(got[1], None);
        assert_eq!(b.meta("v", "t").unwrap(), Some(meta(1, 4)));
        // Another target's baseline is separate.
        assert_eq!(b.meta("v", "other").unwrap(), None);

        // A failed cycle's staging is cleared; a zero block removes the entry; shrinking drops the tail.
        b.stage("v", "t", &[(0, ContentId([9; 32]), vec![])]).unwrap();
        b.clear_staged("v", "t").unwrap();
        b.stage("v", "t", &[(0, ContentId::ZERO, vec![])]).unwrap();
        b.promote("v", "t", &meta(2, 2)).unwrap();
        assert_eq!(b.blocks("v", "t", 0, 4).unwrap(), vec![None; 4]);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("source.redb");
        {
            let b = Baselines::open(&path).unwrap();
            b.stage("v", "t", &[(1, ContentId([2; 32]), vec![1; 16])]).unwrap();
            b.promote("v", "t", &meta(5, 2)).unwrap();
        }
        let b = Baselines::open(&path).unwrap();
        assert_eq!(b.meta("v", "t").unwrap().unwrap().seq, RpSeq(5));
        assert!(b.blocks("v", "t", 1, 1).unwrap()[0].is_some());
    }

    #[test]
    fn source_state_is_per_volume_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("source.redb");
        {
            let b = Baselines::open(&path).unwrap();
            b.set_source_state("v", &[("a".into(), Some(vec![1, 2])), ("b".into(), Some(vec![3]))]).unwrap();
            b.set_source_state("w", &[("a".into(), Some(vec![9]))]).unwrap();
            b.set_source_state("v", &[("b".into(), None)]).unwrap();
        }
        let b = Baselines::open(&path).unwrap();
        assert_eq!(b.source_state("v", "a").unwrap(), Some(vec![1, 2]));
        assert_eq!(b.source_state("v", "b").unwrap(), None);
        assert_eq!(b.source_state("w", "a").unwrap(), Some(vec![9]));
    }

    #[test]
    fn paused_set_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("source.redb");
        {
            let b = Baselines::open(&path).unwrap();
            b.set_paused("a", Some(10)).unwrap();
            b.set_paused("b", Some(20)).unwrap();
            b.set_paused("a", None).unwrap();
        }
        let b = Baselines::open(&path).unwrap();
        assert_eq!(b.paused().unwrap(), BTreeMap::from([("b".to_string(), 20)]));
    }
}

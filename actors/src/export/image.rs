//! A recovery point as a readable disk: blocks decoded on demand from the local
//! store or fetched from a holder, each verified against its content id before
//! any byte of it is served, with a small cache and read-ahead.
//!
//! Opening checks the RP's whole block map against its Merkle root, and keeps
//! the block ids in memory (32 bytes per block: 32 MiB per TiB at 1 MiB blocks).
//! A block that cannot be read or does not verify is a [`BlockFault`] for the
//! read that needed it (an I/O error to an NBD client), logged with the block
//! and the reason; other blocks are still served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use super::fetcher::{Connect, Fetcher};
use crate::codec::BlockCodec;
use crate::content::{ContentId, MerkleBuilder};
use crate::restore::{blob_chain, decode_into, RestoreError, RpSource};
use crate::store::{ReadStore, RpMeta, RpSeq, VolumeName};

/// Decoded blocks kept by default.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
/// Blocks read ahead of a sequential reader.
const READ_AHEAD_BLOCKS: u64 = 8;

/// Why a block could not be served.
#[derive(Debug, Clone, thiserror::Error)]
#[error("block {index} of {rp} (content {content}): {reason}")]
pub struct BlockFault {
    /// The RP.
    pub rp: String,
    /// The block.
    pub index: u64,
    /// Its content id.
    pub content: ContentId,
    /// What went wrong.
    pub reason: String,
}

/// Where blocks come from.
enum Blocks {
    Local(Arc<dyn ReadStore>),
    Remote(Fetcher),
}

type Loading = Arc<OnceCell<Result<Arc<Vec<u8>>, BlockFault>>>;

/// An RP, readable at any offset. `Send + Sync`; share it as `Arc<RpImage>`.
pub struct RpImage {
    meta: RpMeta,
    ids: Vec<ContentId>,
    codec: BlockCodec,
    blocks: Blocks,
    cache: Mutex<Cache>,
    loading: Mutex<HashMap<u64, Loading>>,
    zero: Arc<Vec<u8>>,
    last_end: AtomicU64,
    faults: AtomicU64,
}

/// Least recently used decoded blocks, up to a byte budget.
struct Cache {
    entries: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    tick: u64,
    bytes: u64,
    limit_bytes: u64,
}

impl Cache {
    fn get(&mut self, index: u64) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&index).map(|e| {
            e.1 = tick;
            e.0.clone()
        })
    }

    fn put(&mut self, index: u64, block: Arc<Vec<u8>>) {
        self.tick += 1;
        self.bytes += block.len() as u64;
        if let Some((old, _)) = self.entries.insert(index, (block, self.tick)) {
            self.bytes -= old.len() as u64;
        }
        while self.bytes > self.limit_bytes && self.entries.len() > 1 {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, t))| *t).map(|(i, _)| *i) else { break };
            if let Some((b, _)) = self.entries.remove(&oldest) {
                self.bytes -= b.len() as u64;
            }
        }
    }
}

impl RpImage {
    /// Opens `volume@seq` (the newest when `seq` is None) from `source`: reads every
    /// block id and checks them against the RP's Merkle root. A remote source's
    /// stream (from the holder named in `failover`) keeps serving blocks, and
    /// `failover`'s connector opens other holders when it fails.
    pub async fn open(mut source: RpSource, volume: &VolumeName, seq: Option<RpSeq>, codec: BlockCodec, cache_bytes: u64, failover: Option<(String, Connect)>) -> Result<RpImage, RestoreError> {
        let meta = source.rp(volume, seq).await?;
        let mut ids = Vec::with_capacity(usize::try_from(meta.block_count).unwrap_or(0));
        let mut merkle = MerkleBuilder::new();
        let mut start = 0;
        while start < meta.block_count {
            let count = (meta.block_count - start).min(crate::proto::fetch::IDS_PER_REQUEST);
            for id in source.block_ids(&meta, start, count).await? {
                merkle.push(&id);
                ids.push(id);
            }
            start += count;
        }
        let root = merkle.finish();
        if root != meta.merkle_root {
            return Err(RestoreError::Merkle { rp: meta.name(), expected: meta.merkle_root.to_hex(), actual: root.to_hex() });
        }
        let blocks = match (source, failover) {
            (RpSource::Local(store), _) => Blocks::Local(store),
            (RpSource::Remote(client), Some((holder, connect))) => Blocks::Remote(Fetcher::new(Some((holder, client)), meta.clone(), Some(connect))),
            (RpSource::Remote(client), None) => Blocks::Remote(Fetcher::single(client, meta.clone())),
        };
        Ok(RpImage {
            zero: Arc::new(vec![0u8; meta.block_bytes as usize]),
            meta,
            ids,
            codec,
            blocks,
            cache: Mutex::new(Cache { entries: HashMap::new(), tick: 0, bytes: 0, limit_bytes: cache_bytes.max(1) }),
            loading: Mutex::new(HashMap::new()),
            last_end: AtomicU64::new(u64::MAX),
            faults: AtomicU64::new(0),
        })
    }

    /// The RP.
    pub fn meta(&self) -> &RpMeta {
        &self.meta
    }

    /// Blocks that failed to load so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Bytes of block `index` (the last may be short).
    fn block_len(&self, index: u64) -> usize {
        let start = index * u64::from(self.meta.block_bytes);
        self.meta.volume_bytes.saturating_sub(start).min(u64::from(self.meta.block_bytes)) as usize
    }

    /// Whether block `index` is all zeros in the RP (not stored).
    pub fn is_zero_block(&self, index: u64) -> bool {
        self.ids.get(index as usize).is_none_or(|c| c.is_zero())
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Block `index`, decoded and verified (from the cache when it is there).
    pub async fn block(self: &Arc<Self>, index: u64) -> Result<Arc<Vec<u8>>, BlockFault> {
        let content = self.ids.get(index as usize).copied().unwrap_or(ContentId::ZERO);
        if content.is_zero() {
            return Ok(self.zero.clone());
        }
        if let Some(b) = self.lock_cache().get(index) {
            return Ok(b);
        }
        let cell = self.loading.lock().unwrap_or_else(|p| p.into_inner()).entry(index).or_default().clone();
        let this = self.clone();
        let result = cell.get_or_init(|| async move { this.load(index, content).await }).await.clone();
        {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            if loading.get(&index).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                loading.remove(&index);
            }
        }
        match &result {
            Ok(block) => self.lock_cache().put(index, block.clone()),
            Err(fault) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                tracing::error!(rp = %fault.rp, block = fault.index, content = %fault.content, reason = %fault.reason, "export: block cannot be served; the client gets an I/O error");
            }
        }
        result
    }

    async fn load(&self, index: u64, content: ContentId) -> Result<Arc<Vec<u8>>, BlockFault> {
        let fault = |reason: String| BlockFault { rp: self.meta.name(), index, content, reason };
        let chain = match &self.blocks {
            Blocks::Local(store) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || blob_chain(store.as_ref(), &content).map_err(|e| e.to_string())).await.map_err(|e| fault(e.to_string()))?
            }
            Blocks::Remote(fetcher) => fetcher.chain(content).await,
        }
        .map_err(fault)?;
        let (codec, len) = (self.codec.clone(), self.block_len(index));
        let decoded = tokio::task::spawn_blocking(move || {
            let (mut out, mut chain) = (vec![0u8; len], chain);
            decode_into(&codec, content, &mut chain, &mut out).map(|()| out)
        })
        .await
        .map_err(|e| fault(e.to_string()))?
        .map_err(fault)?;
        Ok(Arc::new(decoded))
    }

    /// Reads `len` bytes at `offset` of the RP. Blocks of the range load at once
    /// (concurrently), and a sequential reader gets the next blocks read ahead.
    pub async fn read(self: &Arc<Self>, offset: u64, len: usize) -> Result<Vec<u8>, BlockFault> {
        let bb = u64::from(self.meta.block_bytes);
        let end = (offset + len as u64).min(self.meta.volume_bytes);
        let mut out = vec![0u8; len];
        if offset >= end {
            return Ok(out);
        }
        let (first, last) = (offset / bb, (end - 1) / bb);
        let sequential = self.last_end.swap(end, Ordering::Relaxed) == offset;
        let ahead = if sequential { READ_AHEAD_BLOCKS } else { 0 };
        for i in last + 1..=(last + ahead).min(self.meta.block_count.saturating_sub(1)) {
            let loading = self.loading.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&i);
            if !self.is_zero_block(i) && !loading && !self.lock_cache().entries.contains_key(&i) {
                let this = self.clone();
                tokio::spawn(async move {
                    let _ = this.block(i).await;
                });
            }
        }
        if first == last {
            // Most reads stay within one block: no task to spawn.
            let block = self.block(first).await?;
            let block_start = first * bb;
            out[..(end - offset) as usize].copy_from_slice(&block[(offset - block_start) as usize..(end - block_start) as usize]);
            return Ok(out);
        }
        let loads: Vec<_> = (first..=last)
            .map(|i| {
                let this = self.clone();
                tokio::spawn(async move { this.block(i).await })
            })
            .collect();
        for (i, load) in (first..=last).zip(loads) {
            let block = load.await.map_err(|e| BlockFault { rp: self.meta.name(), index: i, content: ContentId::ZERO, reason: e.to_string() })??;
            let block_start = i * bb;
            let from = offset.max(block_start);
            let to = end.min(block_start + block.len() as u64);
            let src = &block[(from - block_start) as usize..(to - block_start) as usize];
            out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
        }
        Ok(out)
    }
}

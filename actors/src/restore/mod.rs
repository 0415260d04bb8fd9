//! Restore and verify: rebuilding a volume image from a recovery point.
//!
//! Blocks come from the local store or, over a fetch stream, from the node
//! that holds the RP. Every block is decoded (AES-GCM authenticated,
//! decompressed, delta chains applied from their full base up) and its content
//! id recomputed; the ids of all blocks are then checked against the RP's
//! Merkle root. A missing or corrupted blob fails loudly, naming the block. The
//! image is written to `PATH.partial` and renamed into place only when all of
//! that passed, so a failed restore never leaves a plausible-looking image.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::actor::fetch::{FetchClient, FetchReply, FetchRequest};
use crate::codec::{BlockCodec, CodecError};
use crate::content::{ContentId, MerkleBuilder};
use crate::store::{EncodedBlob, RpMeta, Store};

/// Blocks fetched and decoded per step.
const CHUNK_BLOCKS: u64 = 64;

/// Why a restore or verify failed. No image is left at the destination.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The RP is not there.
    #[error("no recovery point {0} here")]
    NoSuchRp(String),
    /// A block could not be read or decoded.
    #[error("block {index} of {rp} (content {content}): {reason}")]
    Block {
        /// RP name.
        rp: String,
        /// Block index.
        index: u64,
        /// Its content id.
        content: ContentId,
        /// What went wrong.
        reason: String,
    },
    /// The block ids do not hash to the RP's Merkle root.
    #[error("{rp}: Merkle root mismatch (catalog {expected}, blocks {actual}); the block map is damaged")]
    Merkle {
        /// RP name.
        rp: String,
        /// Root recorded at commit.
        expected: String,
        /// Root of what was read.
        actual: String,
    },
    /// Reading the catalog or talking to the peer failed.
    #[error("{0}")]
    Source(String),
    /// Writing the image failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Where the RP's blocks come from.
pub enum RpSource {
    /// This node's store.
    Local(Arc<Store>),
    /// A peer, over a fetch stream.
    Remote(FetchClient),
}

/// What a restore or verify did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The RP.
    pub rp: RpMeta,
    /// Blocks in the image.
    pub blocks: u64,
    /// Zero blocks (not stored, written as holes).
    pub zero_blocks: u64,
    /// Blobs read (delta bases included).
    pub blobs_read: u64,
    /// Bytes of blob payload read.
    pub payload_bytes: u64,
    /// Wall time.
    pub duration_secs: f64,
    /// Where the image was written (None for verify).
    pub output: Option<PathBuf>,
}

fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl RpSource {
    async fn rp(&mut self, volume: &str, seq: Option<u64>) -> Result<RpMeta, RestoreError> {
        let name = format!("{volume}@{}", seq.map_or("latest".to_string(), |s| s.to_string()));
        match self {
            RpSource::Local(store) => {
                let (store, v) = (store.clone(), volume.to_string());
                let found = tokio::task::spawn_blocking(move || match seq {
                    Some(s) => store.rp(&v, s),
                    None => store.latest_rp(&v),
                })
                .await
                .map_err(|e| RestoreError::Source(e.to_string()))?
                .map_err(|e| RestoreError::Source(e.to_string()))?;
                found.ok_or(RestoreError::NoSuchRp(name))
            }
            RpSource::Remote(client) => {
                client.request(&FetchRequest::Rp { volume: volume.to_string(), seq }).await.map_err(RestoreError::Source)?;
                match client.reply().await.map_err(RestoreError::Source)? {
                    FetchReply::Rp(meta) => Ok(meta),
                    FetchReply::Error(e) => Err(RestoreError::Source(format!("{name}: {e}"))),
                    other => Err(RestoreError::Source(format!("unexpected reply {other:?}"))),
                }
            }
        }
    }

    async fn block_ids(&mut self, meta: &RpMeta, start: u64, count: u64) -> Result<Vec<ContentId>, RestoreError> {
        let ids = match self {
            RpSource::Local(store) => {
                let (store, v, seq) = (store.clone(), meta.volume.clone(), meta.seq);
                tokio::task::spawn_blocking(move || store.block_ids(&v, seq, start, count))
                    .await
                    .map_err(|e| RestoreError::Source(e.to_string()))?
                    .map_err(|e| RestoreError::Source(e.to_string()))?
            }
            RpSource::Remote(client) => {
                client.request(&FetchRequest::Blocks { start, count }).await.map_err(RestoreError::Source)?;
                match client.reply().await.map_err(RestoreError::Source)? {
                    FetchReply::Blocks(ids) => ids,
                    FetchReply::Error(e) => return Err(RestoreError::Source(e)),
                    other => return Err(RestoreError::Source(format!("unexpected reply {other:?}"))),
                }
            }
        };
        if ids.len() as u64 != count {
            return Err(RestoreError::Source(format!("asked for {count} block ids, got {}", ids.len())));
        }
        Ok(ids)
    }

    /// Blob chains (head first) for each content; errors per content.
    async fn chains(&mut self, contents: Vec<ContentId>) -> Result<Vec<Result<Vec<EncodedBlob>, String>>, RestoreError> {
        match self {
            RpSource::Local(store) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || contents.par_iter().map(|c| blob_chain(&store, c)).collect())
                    .await
                    .map_err(|e| RestoreError::Source(e.to_string()))
            }
            RpSource::Remote(client) => {
                for c in &contents {
                    client.request(&FetchRequest::Content(*c)).await.map_err(RestoreError::Source)?;
                }
                let mut out = Vec::with_capacity(contents.len());
                for _ in &contents {
                    out.push(FetchClient::chain(client.reply().await.map_err(RestoreError::Source)?));
                }
                Ok(out)
            }
        }
    }
}

/// The blobs that materialize `content` in `store`: the head blob, then its
/// delta bases down to a full block.
pub fn blob_chain(store: &Store, content: &ContentId) -> Result<Vec<EncodedBlob>, String> {
    let loc = store.locate(content).map_err(|e| e.to_string())?.ok_or("no blob holds this block (missing from the store)")?;
    let mut out = Vec::new();
    let mut next = Some(loc.blob);
    while let Some(id) = next {
        let blob = store.read_blob(&id).map_err(|e| e.to_string())?;
        next = blob.base;
        out.push(blob);
        if out.len() > 64 {
            return Err("delta chain does not end".into());
        }
    }
    Ok(out)
}

/// Decodes a chain (head first) into the block it materializes, checking each step's content id.
pub fn materialize(codec: &BlockCodec, content: ContentId, chain: &[EncodedBlob]) -> Result<Vec<u8>, CodecError> {
    let mut block: Option<Vec<u8>> = None;
    for blob in chain.iter().rev() {
        let plain = codec.open(blob)?;
        let next = match block.take() {
            None => plain,
            Some(base) => codec.apply_delta(blob, &plain, &base)?,
        };
        codec.check(blob.id, blob.content, &next)?;
        block = Some(next);
    }
    let block = block.unwrap_or_default();
    codec.check(chain.first().map_or(content, |b| b.id), content, &block)?;
    Ok(block)
}

/// Restores (`output` Some) or verifies (`output` None) `volume@seq` (newest when None).
pub async fn restore(
    source: &mut RpSource,
    volume: &str,
    seq: Option<u64>,
    codec: &BlockCodec,
    output: Option<&Path>,
    mut progress: impl FnMut(u64, u64),
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let meta = source.rp(volume, seq).await?;
    let rp = meta.name();
    let partial = output.map(|p| {
        let mut s = p.as_os_str().to_owned();
        s.push(".partial");
        PathBuf::from(s)
    });
    let file = match &partial {
        Some(path) => {
            let f = OpenOptions::new().create(true).write(true).truncate(true).open(path).map_err(|source| RestoreError::Write { path: path.clone(), source })?;
            f.set_len(meta.volume_bytes).map_err(|source| RestoreError::Write { path: path.clone(), source })?;
            Some(Arc::new(f))
        }
        None => None,
    };
    let result: Result<RestoreReport, RestoreError> = async {
        let mut merkle = MerkleBuilder::new();
        let mut report = RestoreReport { rp: meta.clone(), blocks: meta.block_count, zero_blocks: 0, blobs_read: 0, payload_bytes: 0, duration_secs: 0.0, output: output.map(Path::to_path_buf) };
        let mut start = 0;
        while start < meta.block_count {
            let count = (meta.block_count - start).min(CHUNK_BLOCKS);
            let ids = source.block_ids(&meta, start, count).await?;
            for id in &ids {
                merkle.push(id);
            }
            let wanted: Vec<(u64, ContentId)> = ids.iter().enumerate().filter(|(_, c)| !c.is_zero()).map(|(i, c)| (start + i as u64, *c)).collect();
            report.zero_blocks += count - wanted.len() as u64;
            let chains = source.chains(wanted.iter().map(|(_, c)| *c).collect()).await?;
            for chain in chains.iter().flatten() {
                report.blobs_read += chain.len() as u64;
                report.payload_bytes += chain.iter().map(|b| b.payload.len() as u64).sum::<u64>();
            }
            let (codec, file, rp2, block_bytes, out_path) = (codec.clone(), file.clone(), rp.clone(), u64::from(meta.block_bytes), partial.clone());
            tokio::task::spawn_blocking(move || -> Result<(), RestoreError> {
                wanted.into_par_iter().zip(chains.into_par_iter()).try_for_each(|((index, content), chain)| {
                    let fail = |reason: String| RestoreError::Block { rp: rp2.clone(), index, content, reason };
                    let chain = chain.map_err(fail)?;
                    let block = materialize(&codec, content, &chain).map_err(|e| fail(e.to_string()))?;
                    if let (Some(f), Some(path)) = (&file, &out_path) {
                        f.write_all_at(&block, index * block_bytes).map_err(|source| RestoreError::Write { path: path.clone(), source })?;
                    }
                    Ok(())
                })
            })
            .await
            .map_err(|e| RestoreError::Source(e.to_string()))??;
            start += count;
            progress(start, meta.block_count);
        }
        let root = merkle.finish();
        if root != meta.merkle_root {
            return Err(RestoreError::Merkle { rp: rp.clone(), expected: hex(&meta.merkle_root), actual: hex(&root) });
        }
        report.duration_secs = started.elapsed().as_secs_f64();
        Ok(report)
    }
    .await;
    match (&result, &partial, output) {
        (Ok(_), Some(tmp), Some(out)) => {
            if let Some(f) = &file {
                f.sync_all().map_err(|source| RestoreError::Write { path: tmp.clone(), source })?;
            }
            std::fs::rename(tmp, out).map_err(|source| RestoreError::Write { path: out.to_path_buf(), source })?;
        }
        (Err(_), Some(tmp), _) => {
            let _ = std::fs::remove_file(tmp);
        }
        _ => {}
    }
    result
}

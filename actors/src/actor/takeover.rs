//! A `qemu` volume taken over from another proxy (or whose proxy lost its
//! baseline): the target's newest RP becomes the baseline, so the cycle can
//! trust qemu's dirty bitmap and read only what changed.
//!
//! qemu's bitmap of a volume and target always covers every change since
//! the target's newest RP, whichever proxy made it: a view stops the bitmap
//! and a new one records; the stopped one is dropped only after the target
//! committed, and merged back after anything else (by the proxy, or by the
//! next view, which merges what a dead proxy left split). What a new reader
//! lacks is the block ids of that RP (its own baseline is of an older RP,
//! or none): it fetches them from the target and records them as its
//! baseline, without page hashes (the first delta against such a block is a
//! whole block). The old baseline is forgotten before the fetch (the
//! fetched ids are staged and promoted over an empty one), so a failure
//! part-way leaves no baseline: the cycle then offers every block, as for a
//! new volume, and the next cycle adopts again. Never a wrong baseline.

use std::sync::Arc;

use crate::actor::fetch::{FetchClient, FetchReply, FetchRequest, IDS_PER_REQUEST};
use crate::content::ContentId;
use crate::source::baseline::{BaselineMeta, Baselines};
use crate::store::VolumeName;

/// Makes the target's newest RP of `volume` the baseline towards `target`
/// (the node at the other end of `conn`) when the baseline is another RP
/// and the block size is the same. Returns whether it did.
pub async fn adopt_target_baseline(conn: &quinn::Connection, baselines: &Arc<Baselines>, volume: &VolumeName, target: &str, block_bytes: u32) -> Result<bool, String> {
    let mut client = FetchClient::open(conn).await?;
    client.request(&FetchRequest::Rp { volume: volume.clone(), seq: None }).await?;
    let rp = match client.reply().await? {
        FetchReply::Rp(rp) => rp,
        // No RP there yet (or none this node may read): nothing to adopt.
        FetchReply::Error(_) => return Ok(false),
        _ => return Err("protocol error: the target answered an RP request with something else".into()),
    };
    let (b, v, t) = (baselines.clone(), volume.to_string(), target.to_string());
    let local = tokio::task::spawn_blocking(move || b.meta(&v, &t)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    if local.as_ref().is_some_and(|m| m.seq == rp.seq && m.merkle_root == rp.merkle_root) || rp.block_bytes != block_bytes {
        return Ok(false);
    }
    let (b, v, t) = (baselines.clone(), volume.to_string(), target.to_string());
    tokio::task::spawn_blocking(move || -> Result<(), crate::source::SourceError> {
        b.reset(&v, &t)?;
        b.clear_staged(&v, &t)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let mut start = 0u64;
    while start < rp.block_count {
        let count = (rp.block_count - start).min(IDS_PER_REQUEST);
        client.request(&FetchRequest::Blocks { start, count }).await?;
        let ids = match client.reply().await? {
            FetchReply::Blocks(ids) if !ids.is_empty() && ids.len() as u64 <= count => ids,
            FetchReply::Error(e) => return Err(e),
            _ => return Err(format!("protocol error: the target answered a request for block ids {start}.. with something else")),
        };
        let entries: Vec<(u64, ContentId, Vec<u8>)> =
            ids.iter().enumerate().filter(|(_, id)| !id.is_zero()).map(|(i, id)| (start + i as u64, *id, Vec::new())).collect();
        start += ids.len() as u64;
        let (b, v, t) = (baselines.clone(), volume.to_string(), target.to_string());
        tokio::task::spawn_blocking(move || b.stage(&v, &t, &entries)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    let meta = BaselineMeta {
        seq: rp.seq,
        merkle_root: rp.merkle_root,
        block_bytes: rp.block_bytes,
        block_count: rp.block_count,
        volume_bytes: rp.volume_bytes,
        time_unix_ms: rp.time_unix_ms,
    };
    let (b, v, t) = (baselines.clone(), volume.to_string(), target.to_string());
    tokio::task::spawn_blocking(move || b.promote(&v, &t, &meta)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    tracing::info!(%volume, %target, rp = %rp.name(), from = %rp.source_node, "baseline taken from the target's newest RP: the dirty bitmap is trusted from there");
    Ok(true)
}

//! Reading what materializes a content: the head blob and its delta bases
//! (for restores, exports and fetches served to peers), from any [`ReadStore`].

use super::{ContentId, EncodedBlob, ReadStore, StoreError};

/// Longest chain read before the blobs are called inconsistent (the store
/// writes chains far shorter).
const MAX_CHAIN_BLOBS: usize = 64;

/// The blobs that materialize `content` in `store`: the head blob, then its
/// delta bases down to a full block.
pub fn blob_chain(store: &dyn ReadStore, content: &ContentId) -> Result<Vec<EncodedBlob>, StoreError> {
    blob_chain_into(store, content, Vec::new())
}

/// [`blob_chain`], reading the head blob's payload into `buffer` (reused capacity).
pub fn blob_chain_into(store: &dyn ReadStore, content: &ContentId, buffer: Vec<u8>) -> Result<Vec<EncodedBlob>, StoreError> {
    let loc = store.locate(content)?.ok_or_else(|| StoreError::ContentNotFound { content: content.to_hex() })?;
    let mut out = Vec::new();
    let mut next = Some(loc.blob);
    let mut buffer = Some(buffer);
    while let Some(id) = next {
        if out.len() >= MAX_CHAIN_BLOBS {
            return Err(StoreError::ChainTooLong { content: content.to_hex(), blobs: out.len() });
        }
        let blob = store.read_blob_into(&id, buffer.take().unwrap_or_default())?;
        next = blob.base;
        out.push(blob);
    }
    Ok(out)
}

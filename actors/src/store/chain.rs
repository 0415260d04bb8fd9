//! Reading what materializes a content: the head blob and its delta bases
//! (for restores, exports and fetches served to peers).

use super::{ContentId, EncodedBlob, Store};

/// The blobs that materialize `content` in `store`: the head blob, then its
/// delta bases down to a full block.
pub fn blob_chain(store: &Store, content: &ContentId) -> Result<Vec<EncodedBlob>, String> {
    blob_chain_into(store, content, Vec::new())
}

/// [`blob_chain`], reading the head blob's payload into `buffer` (reused capacity).
pub fn blob_chain_into(store: &Store, content: &ContentId, buffer: Vec<u8>) -> Result<Vec<EncodedBlob>, String> {
    let loc = store.locate(content).map_err(|e| e.to_string())?.ok_or("no blob holds this block (missing from the store)")?;
    let mut out = Vec::new();
    let mut next = Some(loc.blob);
    let mut buffer = Some(buffer);
    while let Some(id) = next {
        let blob = store.read_blob_into(&id, buffer.take().unwrap_or_default()).map_err(|e| e.to_string())?;
        next = blob.base;
        out.push(blob);
        if out.len() > 64 {
            return Err("delta chain does not end".into());
        }
    }
    Ok(out)
}

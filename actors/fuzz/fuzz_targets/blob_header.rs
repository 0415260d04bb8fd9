//! Feeds arbitrary bytes to the blob header decoder (what restores, scrubs and
//! `store rebuild` read first from every blob file). It must refuse or decode,
//! never panic, whatever the file length and id it is told.
#![no_main]

use drmesh_actors::content::ContentId;
use drmesh_actors::store::{parse_blob_header, BLOB_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < BLOB_HEADER_BYTES + 8 + 32 {
        return;
    }
    let mut header = [0u8; BLOB_HEADER_BYTES];
    header.copy_from_slice(&data[..BLOB_HEADER_BYTES]);
    let file_len = u64::from_le_bytes(data[BLOB_HEADER_BYTES..BLOB_HEADER_BYTES + 8].try_into().expect("8 bytes"));
    let id = ContentId(data[BLOB_HEADER_BYTES + 8..BLOB_HEADER_BYTES + 40].try_into().expect("32 bytes"));
    if let Ok(h) = parse_blob_header(&header, file_len, &id) {
        assert_eq!(h.payload_len, file_len - BLOB_HEADER_BYTES as u64);
    }
});

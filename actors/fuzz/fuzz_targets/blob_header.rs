//! Feeds arbitrary bytes to the blob header decoder (what restores, scrubs and
//! `store rebuild` read first from every blob file). It must refuse or decode,
//! never panic, whatever the file length and id it is told.
//!
//! Each input is also tried with its header check (bytes 152..168, blake3 of
//! bytes 0..152) made right, so mutations reach the field checks behind it.
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
    let check = |header: &[u8; BLOB_HEADER_BYTES]| {
        if let Ok(h) = parse_blob_header(header, file_len, &id) {
            assert_eq!(h.payload_len, file_len - BLOB_HEADER_BYTES as u64);
        }
    };
    check(&header);
    let sum = blake3::hash(&header[..152]);
    header[152..168].copy_from_slice(&sum.as_bytes()[..16]);
    check(&header);
});

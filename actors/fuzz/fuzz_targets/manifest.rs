//! Feeds arbitrary bytes to the RP manifest decoder (what `store rebuild`
//! trusts a catalog's worth of RPs to). It must refuse or decode, never panic,
//! and whatever it decodes must encode back to the same bytes.
//!
//! Each input is also tried with its last 32 bytes replaced by the blake3 of
//! the rest (the trailer a writer puts there), so mutations get past the
//! checksum and reach the field checks behind it.
#![no_main]

use drmesh_actors::store::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fn round_trip(bytes: &[u8]) {
    if let Ok(m) = Manifest::decode(bytes) {
        assert_eq!(m.encode(), bytes, "a decoded manifest encodes to other bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip(data);
    if data.len() >= 32 {
        let body = &data[..data.len() - 32];
        let mut sealed = body.to_vec();
        sealed.extend_from_slice(blake3::hash(body).as_bytes());
        round_trip(&sealed);
    }
});

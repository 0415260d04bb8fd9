//! Feeds arbitrary bytes to the RP manifest decoder (what `store rebuild`
//! trusts a catalog's worth of RPs to). It must refuse or decode, never panic,
//! and whatever it decodes must encode back to the same bytes.
#![no_main]

use drmesh_actors::store::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data, "a decoded manifest encodes to other bytes");
    }
});

//! Feeds arbitrary bytes as a volume to the free-space reader (partition
//! tables, the ext4 superblock, group descriptors and block bitmaps) and asks
//! it for the free ranges of every 4 KiB. The first bytes become the ext4
//! superblock (with its magic set), the rest the descriptors and bitmaps after
//! it, so the fuzzer reaches past the magic check. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut image = vec![0u8; 1024];
    image.extend_from_slice(data);
    if image.len() < 1024 + 0x3A {
        image.resize(1024 + 0x3A, 0);
    }
    image[1024 + 0x38] = 0x53;
    image[1024 + 0x39] = 0xEF;
    let _ = drmesh_actors::source::free_space::probe_bytes(image.clone(), 4096);
    // The same bytes read as a whole disk (partition tables first).
    let _ = drmesh_actors::source::free_space::probe_bytes(data.to_vec(), 1024);
});

//! Feeds arbitrary bytes to the frame decoder, split at an arbitrary point, as a
//! peer could send them: it must return messages or errors, never panic.
#![no_main]

use drmesh_transport::wire::FrameDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map(|b| *b as usize % (data.len().max(1))).unwrap_or(0);
    let mut decoder = FrameDecoder::new();
    decoder.handle_bytes(&data[..split]);
    while let Ok(Some(_)) = decoder.poll_message() {}
    decoder.handle_bytes(&data[split..]);
    loop {
        match decoder.poll_message() {
            Ok(Some(_)) => continue,
            Ok(None) => {
                let _ = decoder.handle_end();
                break;
            }
            Err(_) => break,
        }
    }
});

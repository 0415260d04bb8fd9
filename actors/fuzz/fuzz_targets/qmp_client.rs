//! Feeds arbitrary bytes to a QMP client connection as qemu's monitor, or
//! qemu-guest-agent (the first byte chooses), could send them, in pieces
//! whose size comes from the input, with commands pending. The core must
//! never panic, never report Ready twice, and say nothing more once it has
//! closed with an error.
#![no_main]

use drmesh_actors::proto::qmp::{QmpClient, QmpEvent};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let mut client = if mode & 1 != 0 { QmpClient::guest_agent(u64::from(mode)) } else { QmpClient::new() };
    for _ in 0..3 {
        client.execute("query-status", Value::Null);
    }
    let mut ready = 0;
    while !rest.is_empty() {
        let take = usize::from(rest[0] % 64).clamp(1, rest.len());
        let (piece, tail) = rest.split_at(take);
        rest = tail;
        let closed = client.error().is_some();
        client.handle_input(piece);
        while client.poll_transmit().is_some() {}
        while let Some(event) = client.poll_event() {
            assert!(!closed, "an event after the error: {event:?}");
            if matches!(event, QmpEvent::Ready { .. }) {
                ready += 1;
            }
        }
    }
    assert!(ready <= 1, "Ready {ready} times");
});

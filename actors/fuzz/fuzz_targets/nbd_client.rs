//! Feeds arbitrary bytes to an NBD client connection as a server could send
//! them, optionally after a valid handshake from our own server core (so the
//! replies to a pending read and block status get their share), in pieces
//! whose size comes from the input. The core must never panic, never report
//! more answers than requests, and a read it reports must have the length
//! asked for.
#![no_main]

use drmesh_actors::proto::nbd::client::{ClientEvent, NbdClient};
use drmesh_actors::proto::nbd::{Export, NbdConnection};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let contexts: &[&str] = if mode & 1 != 0 { &["base:allocation"] } else { &[] };
    let mut client = NbdClient::new("disk", contexts);
    if mode & 2 != 0 {
        let export = Export { name: "disk".into(), size_bytes: 1 << 20, read_only: true, description: None };
        let mut server = NbdConnection::new(vec![export]).expect("one export");
        for _ in 0..16 {
            while let Some(b) = client.poll_transmit() {
                server.handle_input(&b);
            }
            while server.poll_event().is_some() {}
            while let Some(b) = server.poll_transmit() {
                client.handle_input(&b);
            }
        }
        while client.poll_event().is_some() {}
    }
    let mut asked = 0;
    if client.read(4096, 512).is_ok() {
        asked += 1;
    }
    if client.block_status(0, 8192, "base:allocation").is_ok() {
        asked += 1;
    }
    let piece = usize::from(mode >> 2) + 1;
    let mut answered = 0;
    for chunk in rest.chunks(piece) {
        client.handle_input(chunk);
        while let Some(event) = client.poll_event() {
            match event {
                ClientEvent::Read { result: Ok(bytes), .. } => {
                    assert_eq!(bytes.len(), 512);
                    answered += 1;
                }
                ClientEvent::Read { .. } | ClientEvent::BlockStatus { .. } => answered += 1,
                ClientEvent::Ready { .. } => {}
            }
        }
    }
    client.handle_eof();
    assert!(answered <= asked, "{answered} answers to {asked} requests");
});

//! Feeds arbitrary bytes to an NBD client connection as a server could send
//! them, optionally after a valid handshake from our own server core (so the
//! replies to a pending read and block status get their share), in pieces
//! whose size comes from the input. The first byte chooses: bit 0 a meta
//! context, bit 1 the handshake first, bit 7 a TLS client (`new_tls`; the
//! target answers its STARTTLS, as our server core refuses it, and starts
//! "TLS" whenever asked to), bits 2-6 the piece size. The core must never
//! panic, never report more answers than requests, a read it reports must
//! have the length asked for, and a TLS client sends nothing but its flags
//! and STARTTLS before TLS is up.
#![no_main]

use drmesh_actors::proto::nbd::client::{ClientEvent, NbdClient};
use drmesh_actors::proto::nbd::wire::{OPTION_MAGIC, OPTION_REPLY_MAGIC, OPT_STARTTLS, REP_ACK};
use drmesh_actors::proto::nbd::{Export, NbdConnection};
use libfuzzer_sys::fuzz_target;

/// STARTTLS as the client sends it, and the server's ACK to it.
fn starttls() -> (Vec<u8>, Vec<u8>) {
    let option = [&OPTION_MAGIC.to_be_bytes()[..], &OPT_STARTTLS.to_be_bytes(), &0u32.to_be_bytes()].concat();
    let ack = [&OPTION_REPLY_MAGIC.to_be_bytes()[..], &OPT_STARTTLS.to_be_bytes(), &REP_ACK.to_be_bytes(), &0u32.to_be_bytes()].concat();
    (option, ack)
}

/// Takes the client's events; starts "TLS" when asked to.
fn events(client: &mut NbdClient, tls_up: &mut bool, plaintext: &mut Vec<u8>, mut each: impl FnMut(ClientEvent)) {
    while let Some(event) = client.poll_event() {
        if event == ClientEvent::StartTls {
            assert!(!*tls_up, "StartTls twice");
            while let Some(b) = client.poll_transmit() {
                plaintext.extend_from_slice(&b);
            }
            client.handle_tls_started();
            *tls_up = true;
        }
        each(event);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let contexts: &[&str] = if mode & 1 != 0 { &["base:allocation"] } else { &[] };
    let tls = mode & 0x80 != 0;
    let mut client = if tls { NbdClient::new_tls("disk", contexts) } else { NbdClient::new("disk", contexts) };
    let (starttls_option, starttls_ack) = starttls();
    // What the client sent before TLS (TLS clients only).
    let mut plaintext = Vec::new();
    let mut tls_up = false;
    if mode & 2 != 0 {
        let export = Export { name: "disk".into(), size_bytes: 1 << 20, read_only: true, description: None };
        let mut server = NbdConnection::new(vec![export]).expect("one export");
        for _ in 0..16 {
            while let Some(b) = client.poll_transmit() {
                if tls && !tls_up {
                    // The client flags and STARTTLS: the server gets the flags, the client the ACK.
                    plaintext.extend_from_slice(&b);
                    server.handle_input(&b[..b.len().min(4)]);
                    client.handle_input(&starttls_ack);
                } else {
                    server.handle_input(&b);
                }
            }
            while server.poll_event().is_some() {}
            while let Some(b) = server.poll_transmit() {
                client.handle_input(&b);
            }
            events(&mut client, &mut tls_up, &mut plaintext, |_| {});
        }
    }
    let mut asked = 0;
    if client.read(4096, 512).is_ok() {
        asked += 1;
    }
    if client.block_status(0, 8192, "base:allocation").is_ok() {
        asked += 1;
    }
    let piece = usize::from((mode >> 2) & 0x1f) + 1;
    let mut answered = 0;
    for chunk in rest.chunks(piece) {
        client.handle_input(chunk);
        events(&mut client, &mut tls_up, &mut plaintext, |event| match event {
            ClientEvent::Read { result: Ok(bytes), .. } => {
                assert_eq!(bytes.len(), 512);
                answered += 1;
            }
            ClientEvent::Read { .. } | ClientEvent::BlockStatus { .. } => answered += 1,
            ClientEvent::Ready { .. } | ClientEvent::StartTls => {}
        });
        if !tls_up {
            while let Some(b) = client.poll_transmit() {
                plaintext.extend_from_slice(&b);
            }
        }
    }
    client.handle_eof();
    assert!(answered <= asked, "{answered} answers to {asked} requests");
    if tls {
        assert!(plaintext.is_empty() || plaintext.get(4..) == Some(&starttls_option[..]), "sent {plaintext:?} before TLS");
    } else {
        assert!(!tls_up, "StartTls from a plain client");
    }
});

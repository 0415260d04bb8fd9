//! Feeds arbitrary bytes to an NBD server connection as a client could send
//! them, optionally behind a valid handshake so the transmission phase gets
//! its share, in pieces whose size comes from the input; answers every
//! request (some with errors). The core must never panic, and its output must
//! stay within a bound of its input plus the data the driver supplied.
#![no_main]

use drmesh_actors::proto::nbd::wire::{
    BASE_ALLOCATION, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPTION_MAGIC, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
};
use drmesh_actors::proto::nbd::{Export, Extent, NbdConnection, NbdErrno, NbdEvent};
use libfuzzer_sys::fuzz_target;

const DISK_BYTES: u64 = 1 << 20;

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Client flags, then (if `structured`) structured replies and
/// `base:allocation`, then `NBD_OPT_GO` on "disk".
fn handshake(structured: bool) -> Vec<u8> {
    let mut out = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    if structured {
        option(&mut out, OPT_STRUCTURED_REPLY, &[]);
        let mut meta = 4u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"disk");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        option(&mut out, OPT_SET_META_CONTEXT, &meta);
    }
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut out, OPT_GO, &go);
    out
}

/// Answers every queued event; returns the bytes of read data and extents supplied.
fn serve(conn: &mut NbdConnection, salt: u8) -> usize {
    let mut supplied = 0;
    while let Some(event) = conn.poll_event() {
        let _ = match event {
            NbdEvent::Read { handle, offset, len_bytes } => {
                if (offset as u8 ^ salt).is_multiple_of(7) {
                    conn.reply_read(handle, Err(NbdErrno::Io))
                } else {
                    supplied += len_bytes as usize;
                    conn.reply_read(handle, Ok(vec![salt; len_bytes as usize]))
                }
            }
            NbdEvent::Write { handle, .. }
            | NbdEvent::Trim { handle, .. }
            | NbdEvent::WriteZeroes { handle, .. }
            | NbdEvent::Flush { handle } => conn.reply(handle, Ok(())),
            NbdEvent::BlockStatus { handle, len_bytes, .. } => {
                let extents: Vec<Extent> = (0..(len_bytes / 4096).clamp(1, 64))
                    .map(|i| Extent { len_bytes: 4096, zero: (i as u8 ^ salt) & 1 == 0, hole: i % 3 == 0 })
                    .collect();
                supplied += 8 * extents.len();
                conn.reply_block_status(handle, Ok(extents))
            }
            NbdEvent::Selected { .. } | NbdEvent::Disconnect => Ok(()),
        };
    }
    supplied
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let exports = vec![
        Export { name: "disk".into(), size_bytes: DISK_BYTES, read_only: false, description: Some("fuzz".into()) },
        Export { name: "ro".into(), size_bytes: 4096, read_only: true, description: None },
    ];
    let Ok(mut conn) = NbdConnection::new(exports) else { return };
    let mut input = match mode % 3 {
        0 => Vec::new(),
        1 => handshake(false),
        _ => handshake(true),
    };
    input.extend_from_slice(rest);
    let piece = 1 + usize::from(mode >> 2) * 13;
    let mut out_bytes = 0;
    let mut supplied = 0;
    for chunk in input.chunks(piece) {
        conn.handle_input(chunk);
        supplied += serve(&mut conn, mode);
        while let Some(b) = conn.poll_transmit() {
            out_bytes += b.len();
        }
    }
    conn.handle_eof();
    supplied += serve(&mut conn, mode);
    while let Some(b) = conn.poll_transmit() {
        out_bytes += b.len();
    }
    assert!(conn.is_closed(), "EOF with every request answered ends the connection");
    assert!(out_bytes <= 1024 + 16 * input.len() + supplied, "{out_bytes} bytes out for {} in", input.len());
});

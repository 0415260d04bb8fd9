//! NBD wire constants and the server's message encoders.
//!
//! Names follow the protocol document (`doc/proto.md` of the reference
//! implementation) without their `NBD_` prefix; every number is sent
//! big-endian. Only what this server speaks is here: fixed newstyle
//! handshake, simple and structured replies, `base:allocation`.

use bytes::{BufMut, BytesMut};

/// First magic of the greeting, ASCII `NBDMAGIC`.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second magic of the greeting and the magic of every option, ASCII `IHAVEOPT`.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no 124 zero bytes after `OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag that must always be set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `CMD_WRITE_ZEROES` and `CMD_FLAG_NO_HOLE` are supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `CMD_FLAG_DF` is supported (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;

/// Option: select an export and enter transmission (cannot fail politely).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: the client gives up the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (the server core refuses it; the client core asks for it in `NbdClient::new_tls`).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for `CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done, success.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option reply error: option not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option reply error: option known but forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option reply error: option malformed or out of place.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option reply error: the server talks no further until TLS is up (`OPT_STARTTLS`).
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Information type: size and transmission flags (mandatory before `REP_ACK`).
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (the payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush to stable storage.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (reply only once the effect is durable).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag of `CMD_WRITE_ZEROES`: do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag of `CMD_READ`: at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag of `CMD_BLOCK_STATUS`: one extent only, not longer than asked.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: nothing (final chunk of a reply without content).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: an error without offset.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` status bit: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status bit: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id in `REP_META_CONTEXT` after `OPT_SET_META_CONTEXT` and in block status chunks.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Bytes of the client's flags after the greeting.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Bytes of an option header (magic, option, length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of a request header (magic, flags, type, cookie, offset, length).
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes of a simple reply.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_BYTES: usize = 20;

/// The server's greeting: magics and handshake flags.
pub(crate) fn put_greeting(out: &mut BytesMut) {
    out.put_u64(INIT_MAGIC);
    out.put_u64(OPTION_MAGIC);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

/// One option reply with its payload.
pub(crate) fn put_option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(len_u32(data.len()));
    out.put_slice(data);
}

/// A simple reply header (the data of a successful read follows it).
pub(crate) fn put_simple_reply(out: &mut BytesMut, errno: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(errno);
    out.put_u64(cookie);
}

/// A structured reply chunk header announcing `payload_len` bytes of payload.
pub(crate) fn put_chunk_header(out: &mut BytesMut, flags: u16, kind: u16, cookie: u64, payload_len: usize) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(len_u32(payload_len));
}

/// A final `REPLY_TYPE_ERROR` chunk carrying `errno` and a message for people.
pub(crate) fn put_error_chunk(out: &mut BytesMut, cookie: u64, errno: u32, message: &str) {
    let message = cut_str(message, crate::nbd::MAX_STRING_BYTES);
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + message.len());
    out.put_u32(errno);
    // `cut_str` keeps it within 4096 bytes.
    out.put_u16(u16::try_from(message.len()).unwrap_or(0));
    out.put_slice(message.as_bytes());
}

/// Lengths here are bounded by construction (options ≤ 64 KiB, payloads ≤
/// 32 MiB + 8, block status ≤ 2^20 descriptors); saturate rather than wrap.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The longest prefix of `s` that fits in `max_bytes` and ends on a char boundary.
pub(crate) fn cut_str(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Bounds-checked big-endian reader over option data; every getter returns
/// `None` once the data runs out.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Reader { rest: data }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        let b = self.bytes(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        Some(u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

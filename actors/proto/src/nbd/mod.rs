//! NBD server core (sans-IO): one client connection of `drmesh export`, server side.
//!
//! It speaks the Network Block Device protocol as written in the reference
//! implementation's `doc/proto.md`; `tests/nbd_interop.rs` checks it against
//! qemu-img, qemu-io and libnbd's `nbdinfo` and `nbdcopy` (all of which use
//! structured replies; the simple replies older clients such as the kernel's
//! `nbd-client` get are covered by the unit tests only):
//!
//! - **Handshake**: fixed newstyle only, with `NBD_FLAG_NO_ZEROES`. Options
//!   `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (information `EXPORT`,
//!   `NAME`, `DESCRIPTION`, `BLOCK_SIZE` = 1 / 4096 / 32 MiB),
//!   `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (only
//!   `base:allocation`). `STARTTLS` and every other option get
//!   `NBD_REP_ERR_UNSUP`. An empty export name means the first export.
//! - **Transmission**: `READ`, `WRITE` (with FUA), `DISC`, `FLUSH`, `TRIM`,
//!   `WRITE_ZEROES` (with `NO_HOLE`) and, once `base:allocation` was selected
//!   with structured replies, `BLOCK_STATUS`. Reads are answered with one
//!   `OFFSET_DATA` chunk (or `OFFSET_HOLE` when all zero) under structured
//!   replies, else with a simple reply; a failed simple read carries no data.
//!
//! The core checks every request (flags, read-only, bounds, the 32 MiB
//! payload limit) and answers the bad ones itself; only sound requests reach
//! the driver as [`NbdEvent`]s, each with a [`RequestHandle`]. The driver
//! answers them in any order (it may serve them concurrently and hand the
//! results back to the connection's owner) with [`NbdConnection::reply_read`],
//! [`NbdConnection::reply`] or [`NbdConnection::reply_block_status`]; each
//! reply is framed whole, so replies never interleave on the wire. Requests
//! the core refuses itself are answered at once, so their replies may
//! overtake those of earlier requests, as the protocol allows.
//!
//! Driving it: write [`NbdConnection::poll_transmit`] to the socket after
//! every call; feed what the socket reads to [`NbdConnection::handle_input`]
//! (any split) and an end of stream to [`NbdConnection::handle_eof`]; drain
//! [`NbdConnection::poll_event`] and answer. For back-pressure, stop reading
//! while [`NbdConnection::pending_requests`] is at the driver's limit: the
//! core itself holds at most the one message it is reading (a write payload
//! is at most [`MAX_PAYLOAD_BYTES`]; a longer one is refused and skipped, not
//! buffered). Close the socket once [`NbdConnection::is_closed`] and the
//! transmit queue is empty; [`NbdConnection::close_error`] says why.
//!
//! Nothing here reads a clock, does I/O or spawns, and no input makes it panic.

pub mod client;
pub mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use wire::*;

/// Largest payload of a read or write, and the maximum block size advertised.
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;
/// Minimum block size advertised: any byte offset and length are fine.
pub const MIN_BLOCK_BYTES: u32 = 1;
/// Preferred block size advertised.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Largest option payload accepted during the handshake; more closes the connection.
pub const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Longest string (export name, description, message) on the wire.
pub const MAX_STRING_BYTES: usize = 4096;
/// Most descriptors sent in one block status reply (the spec's recommended limit).
pub const MAX_EXTENTS_PER_REPLY: usize = 1 << 20;
/// Read data up to this size is copied into the transmit buffer; larger data
/// goes out as its own buffer, without a copy.
const COPY_READ_BYTES_MAX: usize = 64 << 10;
/// Initial capacity of a write payload buffer (grows to the request's length).
const WRITE_BUFFER_BYTES_INITIAL: usize = 1 << 20;

/// One export a connection may select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Name clients ask for (`nbd+unix:///NAME?socket=…`); at most
    /// [`MAX_STRING_BYTES`], no NUL, unique among the exports.
    pub name: String,
    /// Size of the disk in bytes.
    pub size_bytes: u64,
    /// Whether writes, trims and write-zeroes are refused (with `EPERM`).
    pub read_only: bool,
    /// Shown by `nbdinfo` and listings; at most [`MAX_STRING_BYTES`], no NUL.
    pub description: Option<String>,
}

/// Error numbers a request can fail with on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NbdErrno {
    /// `NBD_EPERM`: operation not permitted (write to a read-only export).
    Perm,
    /// `NBD_EIO`: input/output error.
    Io,
    /// `NBD_ENOMEM`: out of memory (the spec asks servers to avoid it).
    NoMem,
    /// `NBD_EINVAL`: invalid argument (bad flags, beyond the end, unknown command).
    Inval,
    /// `NBD_ENOSPC`: no space left (write beyond the end).
    NoSpc,
    /// `NBD_EOVERFLOW`: request too large.
    Overflow,
    /// `NBD_ENOTSUP`: operation not supported.
    NotSup,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    Shutdown,
}

impl NbdErrno {
    /// The number sent on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdErrno::Perm => 1,
            NbdErrno::Io => 5,
            NbdErrno::NoMem => 12,
            NbdErrno::Inval => 22,
            NbdErrno::NoSpc => 28,
            NbdErrno::Overflow => 75,
            NbdErrno::NotSup => 95,
            NbdErrno::Shutdown => 108,
        }
    }

    /// The errno for a number read from the wire, if it is one of the defined ones.
    pub fn from_code(code: u32) -> Option<Self> {
        [
            NbdErrno::Perm,
            NbdErrno::Io,
            NbdErrno::NoMem,
            NbdErrno::Inval,
            NbdErrno::NoSpc,
            NbdErrno::Overflow,
            NbdErrno::NotSup,
            NbdErrno::Shutdown,
        ]
        .into_iter()
        .find(|e| e.code() == code)
    }

    /// What to tell the client when the backing store failed with `err`:
    /// permission and read-only errors map to `EPERM`, out-of-space and
    /// quota to `ENOSPC`, `EINVAL` stays, everything else is `EIO`.
    pub fn from_io_error(err: &std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => NbdErrno::Perm,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => NbdErrno::NoSpc,
            Some(libc::EINVAL) => NbdErrno::Inval,
            _ => NbdErrno::Io,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            NbdErrno::Perm => "operation not permitted",
            NbdErrno::Io => "input/output error",
            NbdErrno::NoMem => "out of memory",
            NbdErrno::Inval => "invalid argument",
            NbdErrno::NoSpc => "no space left on device",
            NbdErrno::Overflow => "value too large",
            NbdErrno::NotSup => "operation not supported",
            NbdErrno::Shutdown => "server shutting down",
        }
    }
}

impl fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (NBD error {})", self.describe(), self.code())
    }
}

/// Names one request handed to the driver, to answer it with. Unique for the
/// life of the connection (the client's own cookie need not be).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestHandle(u64);

impl fmt::Display for RequestHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One run of bytes with the same allocation status, for block status replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; zero-length extents are skipped.
    pub len_bytes: u32,
    /// The range reads as zeroes.
    pub zero: bool,
    /// The range is not allocated (sparse).
    pub hole: bool,
}

/// What the driver must do for the client. Every variant with a `handle`
/// must be answered exactly once (the method is named on each variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdEvent {
    /// The client chose an export and entered transmission.
    Selected {
        /// Index into the exports given to [`NbdConnection::new`].
        index: usize,
        /// Its name.
        name: String,
    },
    /// Read `len_bytes` at `offset` (within the export, at most
    /// [`MAX_PAYLOAD_BYTES`]); answer with [`NbdConnection::reply_read`].
    Read {
        /// Answer with this.
        handle: RequestHandle,
        /// Byte offset.
        offset: u64,
        /// Bytes to read, at least 1.
        len_bytes: u32,
    },
    /// Write `data` at `offset` (within the export); answer with [`NbdConnection::reply`].
    Write {
        /// Answer with this.
        handle: RequestHandle,
        /// Byte offset.
        offset: u64,
        /// The bytes, at least 1 and at most [`MAX_PAYLOAD_BYTES`].
        data: Vec<u8>,
        /// Reply only once the data is on stable storage.
        fua: bool,
    },
    /// Make every write answered so far durable; answer with [`NbdConnection::reply`].
    Flush {
        /// Answer with this.
        handle: RequestHandle,
    },
    /// The range is no longer needed (a hint); answer with [`NbdConnection::reply`].
    Trim {
        /// Answer with this.
        handle: RequestHandle,
        /// Byte offset.
        offset: u64,
        /// Bytes, at least 1 (may exceed [`MAX_PAYLOAD_BYTES`]).
        len_bytes: u32,
        /// Reply only once the effect is durable.
        fua: bool,
    },
    /// Make the range read as zeroes; answer with [`NbdConnection::reply`].
    WriteZeroes {
        /// Answer with this.
        handle: RequestHandle,
        /// Byte offset.
        offset: u64,
        /// Bytes, at least 1 (may exceed [`MAX_PAYLOAD_BYTES`]).
        len_bytes: u32,
        /// The range must stay allocated (no hole punching).
        no_hole: bool,
        /// Reply only once the effect is durable.
        fua: bool,
    },
    /// Describe allocation from `offset` on; answer with
    /// [`NbdConnection::reply_block_status`]. `len_bytes` is a hint: fewer
    /// bytes may be described, and the last extent may reach further.
    BlockStatus {
        /// Answer with this.
        handle: RequestHandle,
        /// Byte offset.
        offset: u64,
        /// Bytes of interest, at least 1.
        len_bytes: u32,
    },
    /// The client sent `NBD_CMD_DISC`: it sends nothing more. The connection
    /// closes once every request in flight is answered (a good moment to flush).
    Disconnect,
}

/// Why a connection closed, or why a driver call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    /// An export given to [`NbdConnection::new`] cannot go on the wire; no connection was made.
    #[error("export \"{name}\" cannot be served over NBD: {reason}")]
    BadExport {
        /// The export's name (possibly cut).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The client is not a fixed-newstyle client; the connection is closed.
    #[error(
        "NBD client sent handshake flags {flags:#x}: only fixed-newstyle clients are served \
         (qemu, libnbd, nbd-client 3.10 or later); connection closed"
    )]
    ClientFlags {
        /// The client's flags.
        flags: u32,
    },
    /// An option did not start with `IHAVEOPT`; the connection is closed.
    #[error(
        "NBD client sent an option with magic {magic:#018x} instead of IHAVEOPT: it is not an \
         NBD client or lost track of the framing; connection closed"
    )]
    BadOptionMagic {
        /// The magic received.
        magic: u64,
    },
    /// An option carried more than [`MAX_OPTION_BYTES`]; the connection is closed.
    #[error("NBD client sent option {option} with {len_bytes} bytes of data, more than the {MAX_OPTION_BYTES} accepted; connection closed")]
    OptionTooLong {
        /// The option number.
        option: u32,
        /// Its announced length.
        len_bytes: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that is not offered; the
    /// protocol has no way to say so but closing the connection.
    #[error(
        "NBD client asked for export \"{name}\", which this server does not offer; connection \
         closed (`nbdinfo --list` shows the exports)"
    )]
    UnknownExport {
        /// The name asked for (lossy UTF-8, cut).
        name: String,
    },
    /// A request did not start with the request magic; the connection is closed.
    #[error(
        "NBD client sent a request with magic {magic:#010x}: it is not an NBD request, or the \
         client lost track of the framing; connection closed"
    )]
    BadRequestMagic {
        /// The magic received.
        magic: u32,
    },
    /// The client went away during the handshake without `NBD_OPT_ABORT`.
    #[error("NBD client closed the connection during the handshake without NBD_OPT_ABORT")]
    HungUpInHandshake,
    /// The client went away without `NBD_CMD_DISC`; answers still in flight are dropped.
    #[error("NBD client closed the connection without NBD_CMD_DISC; {in_flight} requests were still unanswered")]
    HungUp {
        /// Requests handed to the driver and not answered yet.
        in_flight: usize,
    },
    /// The driver answered a request that is not in flight; nothing was sent.
    #[error("reply for NBD request {handle}, which is not in flight (answered already?); ignored")]
    UnknownHandle {
        /// The handle given.
        handle: RequestHandle,
    },
    /// The driver answered a request with the wrong method; nothing was sent
    /// and the request still waits for its reply.
    #[error("NBD request {handle} is a {request} and cannot be answered with {reply}; it still waits for its reply")]
    WrongReply {
        /// The handle given.
        handle: RequestHandle,
        /// What the request is.
        request: &'static str,
        /// The method used.
        reply: &'static str,
    },
    /// A read's data had the wrong length; the client got `EIO` for it instead.
    #[error("NBD read {handle} asked for {expected} bytes but its reply had {got}; the client got an I/O error instead")]
    ReadLength {
        /// The read.
        handle: RequestHandle,
        /// Bytes requested.
        expected: u32,
        /// Bytes given.
        got: usize,
    },
    /// A block status answer had no extent of nonzero length; the client got `EIO` instead.
    #[error("block status reply for NBD request {handle} has no extent of nonzero length; the client got an I/O error instead")]
    NoExtents {
        /// The request.
        handle: RequestHandle,
    },
}

/// What the core is reading next.
enum Phase {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: usize },
    RequestHeader,
    WriteData { cookie: u64, offset: u64, fua: bool, len: usize, data: Vec<u8> },
    /// The payload of a refused write, dropped as it arrives.
    SkipPayload { remaining: u64 },
    /// `NBD_CMD_DISC` received; waiting for the answers in flight.
    Disconnecting,
    Closed,
}

impl fmt::Debug for Phase {
    /// Names the phase; a write's payload is summed up, not dumped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::ClientFlags => f.write_str("ClientFlags"),
            Phase::OptionHeader => f.write_str("OptionHeader"),
            Phase::OptionData { option, len } => write!(f, "OptionData {{ option: {option}, len: {len} }}"),
            Phase::RequestHeader => f.write_str("RequestHeader"),
            Phase::WriteData { offset, len, data, .. } => {
                write!(f, "WriteData {{ offset: {offset}, len: {len}, received: {} }}", data.len())
            }
            Phase::SkipPayload { remaining } => write!(f, "SkipPayload {{ remaining: {remaining} }}"),
            Phase::Disconnecting => f.write_str("Disconnecting"),
            Phase::Closed => f.write_str("Closed"),
        }
    }
}

/// What kind of answer a request in flight expects.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Read { offset: u64, len_bytes: u32 },
    /// Write, flush, trim, write-zeroes: success or an error, no payload.
    Plain { what: &'static str },
    BlockStatus { offset: u64, len_bytes: u32, req_one: bool },
}

impl Pending {
    fn name(self) -> &'static str {
        match self {
            Pending::Read { .. } => "read",
            Pending::Plain { what } => what,
            Pending::BlockStatus { .. } => "block status",
        }
    }
}

#[derive(Debug)]
struct InFlight {
    cookie: u64,
    kind: Pending,
}

/// One NBD client connection, server side: handshake, then transmission.
pub struct NbdConnection {
    exports: Vec<Export>,
    phase: Phase,
    /// The fixed-size message being read (client flags, option, request header).
    inbuf: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    /// Export for which `base:allocation` was selected by the last `SET_META_CONTEXT`.
    meta_export: Option<usize>,
    selected: Option<usize>,
    size_bytes: u64,
    read_only: bool,
    block_status: bool,
    next_handle: u64,
    in_flight: BTreeMap<RequestHandle, InFlight>,
    events: VecDeque<NbdEvent>,
    /// Small messages, coalesced until the next transmit.
    staged: BytesMut,
    transmits: VecDeque<Bytes>,
    close_error: Option<NbdError>,
}

impl fmt::Debug for NbdConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdConnection")
            .field("phase", &self.phase)
            .field("selected", &self.selected)
            .field("structured", &self.structured)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl NbdConnection {
    /// A connection offering `exports` (the first is the default one), with
    /// the greeting queued for [`NbdConnection::poll_transmit`]. Fails if an
    /// export's name or description cannot go on the wire, or names repeat.
    pub fn new(exports: Vec<Export>) -> Result<Self, NbdError> {
        for (i, e) in exports.iter().enumerate() {
            let bad = |reason| NbdError::BadExport { name: cut_str(&e.name, 256).to_string(), reason };
            if e.name.len() > MAX_STRING_BYTES || e.name.contains('\0') {
                return Err(bad("the name must be at most 4096 bytes without NUL"));
            }
            if e.description.as_ref().is_some_and(|d| d.len() > MAX_STRING_BYTES || d.contains('\0')) {
                return Err(bad("the description must be at most 4096 bytes without NUL"));
            }
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(bad("another export has the same name"));
            }
        }
        let mut conn = NbdConnection {
            exports,
            phase: Phase::ClientFlags,
            inbuf: Vec::with_capacity(REQUEST_HEADER_BYTES),
            no_zeroes: false,
            structured: false,
            meta_export: None,
            selected: None,
            size_bytes: 0,
            read_only: true,
            block_status: false,
            next_handle: 0,
            in_flight: BTreeMap::new(),
            events: VecDeque::new(),
            staged: BytesMut::new(),
            transmits: VecDeque::new(),
            close_error: None,
        };
        put_greeting(&mut conn.staged);
        Ok(conn)
    }

    /// Bytes read from the client, split anyhow. Ignored once the client
    /// disconnected or the connection closed.
    pub fn handle_input(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match &mut self.phase {
                Phase::Disconnecting | Phase::Closed => return,
                Phase::WriteData { len, data, .. } => {
                    let take = (*len - data.len()).min(input.len());
                    data.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if data.len() == *len {
                        self.finish_write();
                    }
                }
                Phase::SkipPayload { remaining } => {
                    // `min` with a slice length: fits a usize.
                    let take = usize::try_from((*remaining).min(input.len() as u64)).unwrap_or(input.len());
                    *remaining -= take as u64;
                    input = &input[take..];
                    if *remaining == 0 {
                        self.phase = Phase::RequestHeader;
                    }
                }
                Phase::ClientFlags | Phase::OptionHeader | Phase::OptionData { .. } | Phase::RequestHeader => {
                    let need = self.need_bytes();
                    let take = need.saturating_sub(self.inbuf.len()).min(input.len());
                    self.inbuf.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.inbuf.len() >= need {
                        let unit = std::mem::take(&mut self.inbuf);
                        self.handle_unit(&unit);
                        if unit.capacity() <= 4 * REQUEST_HEADER_BYTES {
                            self.inbuf = unit;
                            self.inbuf.clear();
                        }
                    }
                }
            }
        }
    }

    /// The client closed its side of the connection. Closes the connection
    /// unless it had sent `NBD_CMD_DISC` (then the answers in flight are
    /// still awaited, though nobody will read them).
    pub fn handle_eof(&mut self) {
        match self.phase {
            Phase::Closed | Phase::Disconnecting => {}
            Phase::ClientFlags | Phase::OptionHeader | Phase::OptionData { .. } => self.close(Some(NbdError::HungUpInHandshake)),
            Phase::RequestHeader | Phase::WriteData { .. } | Phase::SkipPayload { .. } => {
                let in_flight = self.in_flight.len();
                self.close(Some(NbdError::HungUp { in_flight }));
            }
        }
    }

    /// Next bytes to write to the client, in order. Each reply is whole within
    /// the sequence; a large read's data comes as its own buffer.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if let Some(b) = self.transmits.pop_front() {
            return Some(b);
        }
        (!self.staged.is_empty()).then(|| self.staged.split().freeze())
    }

    /// Next thing for the driver to do.
    pub fn poll_event(&mut self) -> Option<NbdEvent> {
        self.events.pop_front()
    }

    /// Requests handed out (or queued as events) and not answered yet. The
    /// driver should stop reading the socket while this is at its limit.
    pub fn pending_requests(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether more input is useful: false once the client sent `NBD_CMD_DISC`
    /// or the connection closed.
    pub fn wants_input(&self) -> bool {
        !matches!(self.phase, Phase::Disconnecting | Phase::Closed)
    }

    /// Whether the connection is over: nothing more will be queued, and the
    /// driver should close the socket once [`NbdConnection::poll_transmit`] is drained.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Why the connection closed, if not cleanly (`NBD_OPT_ABORT`, or
    /// `NBD_CMD_DISC` with every request answered, are clean).
    pub fn close_error(&self) -> Option<&NbdError> {
        self.close_error.as_ref()
    }

    /// The export in use once transmission started.
    pub fn export(&self) -> Option<&Export> {
        self.selected.and_then(|i| self.exports.get(i))
    }

    /// Whether the client negotiated structured replies.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Answers an [`NbdEvent::Read`] with its data (exactly the length asked)
    /// or an error. After the connection closed, answers are dropped.
    pub fn reply_read(&mut self, handle: RequestHandle, result: Result<Vec<u8>, NbdErrno>) -> Result<(), NbdError> {
        let accepts = |k: Pending| result.is_err() || matches!(k, Pending::Read { .. });
        let Some(entry) = self.take_pending(handle, "reply_read", accepts)? else {
            return Ok(());
        };
        let outcome = match (entry.kind, result) {
            (Pending::Read { offset, len_bytes }, Ok(data)) => {
                if data.len() == len_bytes as usize {
                    self.send_read_data(entry.cookie, offset, data);
                    Ok(())
                } else {
                    self.send_error(entry.cookie, NbdErrno::Io, "the server's storage returned a short read");
                    Err(NbdError::ReadLength { handle, expected: len_bytes, got: data.len() })
                }
            }
            (kind, Err(errno)) => {
                self.send_driver_error(entry.cookie, kind, errno);
                Ok(())
            }
            // `accepts` let only reads through with data.
            (_, Ok(_)) => Ok(()),
        };
        self.after_reply();
        outcome
    }

    /// Answers a write, flush, trim or write-zeroes (or fails any request
    /// with an error). After the connection closed, answers are dropped.
    pub fn reply(&mut self, handle: RequestHandle, result: Result<(), NbdErrno>) -> Result<(), NbdError> {
        let accepts = |k: Pending| result.is_err() || matches!(k, Pending::Plain { .. });
        let Some(entry) = self.take_pending(handle, "reply", accepts)? else {
            return Ok(());
        };
        match result {
            Ok(()) => put_simple_reply(&mut self.staged, 0, entry.cookie),
            Err(errno) => self.send_driver_error(entry.cookie, entry.kind, errno),
        }
        self.after_reply();
        Ok(())
    }

    /// Answers an [`NbdEvent::BlockStatus`] with consecutive extents from its
    /// offset on, or an error. The core drops empty extents, merges equal
    /// neighbours, stops once the asked length is covered (one extent if the
    /// client asked for one) and clips at the end of the export.
    pub fn reply_block_status(&mut self, handle: RequestHandle, result: Result<Vec<Extent>, NbdErrno>) -> Result<(), NbdError> {
        let accepts = |k: Pending| result.is_err() || matches!(k, Pending::BlockStatus { .. });
        let Some(entry) = self.take_pending(handle, "reply_block_status", accepts)? else {
            return Ok(());
        };
        let outcome = match (entry.kind, result) {
            (Pending::BlockStatus { offset, len_bytes, req_one }, Ok(extents)) => {
                let room = self.size_bytes.saturating_sub(offset);
                let descriptors = normalize_extents(&extents, len_bytes, req_one, room);
                if descriptors.is_empty() {
                    self.send_error(entry.cookie, NbdErrno::Io, "the server found no allocation information");
                    Err(NbdError::NoExtents { handle })
                } else {
                    let out = &mut self.staged;
                    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, entry.cookie, 4 + 8 * descriptors.len());
                    out.put_u32(BASE_ALLOCATION_ID);
                    for (len, flags) in descriptors {
                        out.put_u32(len);
                        out.put_u32(flags);
                    }
                    Ok(())
                }
            }
            (kind, Err(errno)) => {
                self.send_driver_error(entry.cookie, kind, errno);
                Ok(())
            }
            (_, Ok(_)) => Ok(()),
        };
        self.after_reply();
        outcome
    }

    // ---- handshake ----

    fn need_bytes(&self) -> usize {
        match self.phase {
            Phase::ClientFlags => CLIENT_FLAGS_BYTES,
            Phase::OptionHeader => OPTION_HEADER_BYTES,
            Phase::OptionData { len, .. } => len,
            Phase::RequestHeader => REQUEST_HEADER_BYTES,
            _ => 0,
        }
    }

    fn handle_unit(&mut self, unit: &[u8]) {
        match self.phase {
            Phase::ClientFlags => self.handle_client_flags(unit),
            Phase::OptionHeader => self.handle_option_header(unit),
            Phase::OptionData { option, .. } => self.handle_option(option, unit),
            Phase::RequestHeader => self.handle_request(unit),
            _ => {}
        }
    }

    fn handle_client_flags(&mut self, unit: &[u8]) {
        let flags = Reader::new(unit).u32().unwrap_or(0);
        if flags & FLAG_C_FIXED_NEWSTYLE == 0 || flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            self.close(Some(NbdError::ClientFlags { flags }));
            return;
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.phase = Phase::OptionHeader;
    }

    fn handle_option_header(&mut self, unit: &[u8]) {
        let mut r = Reader::new(unit);
        let (Some(magic), Some(option), Some(len)) = (r.u64(), r.u32(), r.u32()) else {
            return;
        };
        if magic != OPTION_MAGIC {
            self.close(Some(NbdError::BadOptionMagic { magic }));
        } else if len > MAX_OPTION_BYTES {
            self.close(Some(NbdError::OptionTooLong { option, len_bytes: len }));
        } else if len == 0 {
            self.handle_option(option, &[]);
        } else {
            self.phase = Phase::OptionData { option, len: len as usize };
        }
    }

    fn handle_option(&mut self, option: u32, data: &[u8]) {
        self.phase = Phase::OptionHeader;
        match option {
            OPT_EXPORT_NAME => self.opt_export_name(data),
            OPT_ABORT => {
                put_option_reply(&mut self.staged, option, REP_ACK, &[]);
                self.close(None);
            }
            OPT_LIST if !data.is_empty() => self.opt_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data"),
            OPT_LIST => {
                for e in &self.exports {
                    let mut body = Vec::with_capacity(4 + e.name.len());
                    body.put_u32(e.name.len() as u32);
                    body.put_slice(e.name.as_bytes());
                    if let Some(d) = &e.description {
                        body.put_slice(d.as_bytes());
                    }
                    put_option_reply(&mut self.staged, option, REP_SERVER, &body);
                }
                put_option_reply(&mut self.staged, option, REP_ACK, &[]);
            }
            OPT_STARTTLS => self.opt_error(option, REP_ERR_UNSUP, "this server does not offer TLS"),
            OPT_INFO | OPT_GO => self.opt_info_go(option, data),
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                self.opt_error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                put_option_reply(&mut self.staged, option, REP_ACK, &[]);
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.opt_meta_context(option, data),
            _ => {
                let message = format!("option {option} is not supported by this server");
                self.opt_error(option, REP_ERR_UNSUP, &message);
            }
        }
    }

    fn opt_error(&mut self, option: u32, reply: u32, message: &str) {
        put_option_reply(&mut self.staged, option, reply, cut_str(message, MAX_STRING_BYTES).as_bytes());
    }

    fn opt_unknown_export(&mut self, option: u32, name: &[u8]) {
        let name = String::from_utf8_lossy(name);
        let message = format!("no export named \"{}\" here; NBD_OPT_LIST shows the exports", cut_str(&name, 256));
        self.opt_error(option, REP_ERR_UNKNOWN, &message);
    }

    fn find_export(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    fn transmission_flags(&self, export: &Export) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH;
        if export.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        }
        if self.structured {
            flags |= FLAG_SEND_DF;
        }
        flags
    }

    fn opt_export_name(&mut self, name: &[u8]) {
        let Some(index) = self.find_export(name) else {
            let name = cut_str(&String::from_utf8_lossy(name), 256).to_string();
            self.close(Some(NbdError::UnknownExport { name }));
            return;
        };
        let export = &self.exports[index];
        let flags = self.transmission_flags(export);
        self.staged.put_u64(export.size_bytes);
        self.staged.put_u16(flags);
        if !self.no_zeroes {
            self.staged.put_bytes(0, 124);
        }
        self.enter_transmission(index);
    }

    fn opt_info_go(&mut self, option: u32, data: &[u8]) {
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name_len = r.u32()? as usize;
            let name = r.bytes(name_len)?;
            let count = r.u16()?;
            let mut infos = Vec::new();
            for _ in 0..count {
                infos.push(r.u16()?);
            }
            r.is_empty().then_some((name, infos))
        })();
        let Some((name, infos)) = parsed else {
            self.opt_error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO data");
            return;
        };
        let Some(index) = self.find_export(name) else {
            self.opt_unknown_export(option, name);
            return;
        };
        let export = &self.exports[index];
        let mut body = BytesMut::with_capacity(14);
        body.put_u16(INFO_EXPORT);
        body.put_u64(export.size_bytes);
        body.put_u16(self.transmission_flags(export));
        put_option_reply(&mut self.staged, option, REP_INFO, &body);
        if infos.contains(&INFO_NAME) {
            body.clear();
            body.put_u16(INFO_NAME);
            body.put_slice(export.name.as_bytes());
            put_option_reply(&mut self.staged, option, REP_INFO, &body);
        }
        if let (true, Some(d)) = (infos.contains(&INFO_DESCRIPTION), &export.description) {
            body.clear();
            body.put_u16(INFO_DESCRIPTION);
            body.put_slice(d.as_bytes());
            put_option_reply(&mut self.staged, option, REP_INFO, &body);
        }
        // Sent even unasked: these are the defaults, and clients ignore what they did not ask for.
        body.clear();
        body.put_u16(INFO_BLOCK_SIZE);
        body.put_u32(MIN_BLOCK_BYTES);
        body.put_u32(PREFERRED_BLOCK_BYTES);
        body.put_u32(MAX_PAYLOAD_BYTES);
        put_option_reply(&mut self.staged, option, REP_INFO, &body);
        put_option_reply(&mut self.staged, option, REP_ACK, &[]);
        if option == OPT_GO {
            self.enter_transmission(index);
        }
    }

    fn opt_meta_context(&mut self, option: u32, data: &[u8]) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta_export = None;
        }
        if !self.structured {
            self.opt_error(option, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts");
            return;
        }
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name_len = r.u32()? as usize;
            let name = r.bytes(name_len)?;
            let count = r.u32()?;
            let mut base_allocation = false;
            for _ in 0..count {
                let len = r.u32()? as usize;
                let query = r.bytes(len)?;
                base_allocation |= query == BASE_ALLOCATION.as_bytes() || (!set && query == b"base:");
            }
            // No query lists everything; no query selects nothing.
            r.is_empty().then_some((name, base_allocation || (count == 0 && !set)))
        })();
        let Some((name, base_allocation)) = parsed else {
            self.opt_error(option, REP_ERR_INVALID, "malformed metadata context request");
            return;
        };
        let Some(index) = self.find_export(name) else {
            self.opt_unknown_export(option, name);
            return;
        };
        if base_allocation {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut body = BytesMut::with_capacity(4 + BASE_ALLOCATION.len());
            body.put_u32(id);
            body.put_slice(BASE_ALLOCATION.as_bytes());
            put_option_reply(&mut self.staged, option, REP_META_CONTEXT, &body);
            if set {
                self.meta_export = Some(index);
            }
        }
        put_option_reply(&mut self.staged, option, REP_ACK, &[]);
    }

    fn enter_transmission(&mut self, index: usize) {
        let export = &self.exports[index];
        self.selected = Some(index);
        self.size_bytes = export.size_bytes;
        self.read_only = export.read_only;
        self.block_status = self.structured && self.meta_export == Some(index);
        self.phase = Phase::RequestHeader;
        self.events.push_back(NbdEvent::Selected { index, name: export.name.clone() });
    }

    // ---- transmission ----

    fn handle_request(&mut self, unit: &[u8]) {
        let mut r = Reader::new(unit);
        let (Some(magic), Some(flags), Some(kind), Some(cookie), Some(offset), Some(len)) =
            (r.u32(), r.u16(), r.u16(), r.u64(), r.u64(), r.u32())
        else {
            return;
        };
        if magic != REQUEST_MAGIC {
            self.close(Some(NbdError::BadRequestMagic { magic }));
            return;
        }
        if kind == CMD_DISC {
            self.events.push_back(NbdEvent::Disconnect);
            self.phase = Phase::Disconnecting;
            self.after_reply();
            return;
        }
        if let Err((errno, message)) = self.check_request(kind, flags, offset, len) {
            self.send_error(cookie, errno, &message);
            if kind == CMD_WRITE && len > 0 {
                self.phase = Phase::SkipPayload { remaining: u64::from(len) };
            }
            return;
        }
        let fua = flags & CMD_FLAG_FUA != 0;
        if len == 0 && kind != CMD_FLUSH {
            // Zero-length reads, writes, trims and zeroes succeed without touching anything.
            if kind == CMD_READ && self.structured {
                put_chunk_header(&mut self.staged, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
            } else {
                put_simple_reply(&mut self.staged, 0, cookie);
            }
            return;
        }
        match kind {
            CMD_WRITE => {
                let len = len as usize;
                let data = Vec::with_capacity(len.min(WRITE_BUFFER_BYTES_INITIAL));
                self.phase = Phase::WriteData { cookie, offset, fua, len, data };
            }
            CMD_READ => {
                let handle = self.start(cookie, Pending::Read { offset, len_bytes: len });
                self.events.push_back(NbdEvent::Read { handle, offset, len_bytes: len });
            }
            CMD_FLUSH => {
                let handle = self.start(cookie, Pending::Plain { what: "flush" });
                self.events.push_back(NbdEvent::Flush { handle });
            }
            CMD_TRIM => {
                let handle = self.start(cookie, Pending::Plain { what: "trim" });
                self.events.push_back(NbdEvent::Trim { handle, offset, len_bytes: len, fua });
            }
            CMD_WRITE_ZEROES => {
                let handle = self.start(cookie, Pending::Plain { what: "write-zeroes" });
                let no_hole = flags & CMD_FLAG_NO_HOLE != 0;
                self.events.push_back(NbdEvent::WriteZeroes { handle, offset, len_bytes: len, no_hole, fua });
            }
            CMD_BLOCK_STATUS => {
                let req_one = flags & CMD_FLAG_REQ_ONE != 0;
                let handle = self.start(cookie, Pending::BlockStatus { offset, len_bytes: len, req_one });
                self.events.push_back(NbdEvent::BlockStatus { handle, offset, len_bytes: len });
            }
            // `check_request` refused every other command.
            _ => {}
        }
    }

    /// Whether a request may go to the driver; the error and a message for people if not.
    fn check_request(&self, kind: u16, flags: u16, offset: u64, len: u32) -> Result<(), (NbdErrno, String)> {
        let (name, allowed) = match kind {
            CMD_READ => ("NBD_CMD_READ", if self.structured { CMD_FLAG_FUA | CMD_FLAG_DF } else { CMD_FLAG_FUA }),
            CMD_WRITE => ("NBD_CMD_WRITE", CMD_FLAG_FUA),
            CMD_FLUSH => ("NBD_CMD_FLUSH", CMD_FLAG_FUA),
            CMD_TRIM => ("NBD_CMD_TRIM", CMD_FLAG_FUA),
            CMD_WRITE_ZEROES => ("NBD_CMD_WRITE_ZEROES", CMD_FLAG_FUA | CMD_FLAG_NO_HOLE),
            CMD_BLOCK_STATUS => ("NBD_CMD_BLOCK_STATUS", CMD_FLAG_FUA | CMD_FLAG_REQ_ONE),
            _ => return Err((NbdErrno::Inval, format!("command {kind} is not supported by this server"))),
        };
        if flags & !allowed != 0 {
            return Err((NbdErrno::Inval, format!("command flags {flags:#x} are not valid for {name} here")));
        }
        let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.read_only {
            return Err((NbdErrno::Perm, "the export is read-only".to_string()));
        }
        if matches!(kind, CMD_READ | CMD_WRITE) && len > MAX_PAYLOAD_BYTES {
            let errno = if kind == CMD_READ && self.structured { NbdErrno::Overflow } else { NbdErrno::Inval };
            return Err((errno, format!("{len} bytes exceed the {MAX_PAYLOAD_BYTES}-byte maximum payload")));
        }
        if kind == CMD_BLOCK_STATUS && !self.block_status {
            return Err((NbdErrno::Inval, "select base:allocation with NBD_OPT_SET_META_CONTEXT first".to_string()));
        }
        if kind == CMD_BLOCK_STATUS && len == 0 {
            return Err((NbdErrno::Inval, "block status of zero bytes".to_string()));
        }
        if kind != CMD_FLUSH && offset.checked_add(u64::from(len)).is_none_or(|end| end > self.size_bytes) {
            let errno = if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) { NbdErrno::NoSpc } else { NbdErrno::Inval };
            let size = self.size_bytes;
            return Err((errno, format!("{len} bytes at offset {offset} reach beyond the end of the {size}-byte export")));
        }
        Ok(())
    }

    fn finish_write(&mut self) {
        let Phase::WriteData { cookie, offset, fua, data, .. } = std::mem::replace(&mut self.phase, Phase::RequestHeader) else {
            return;
        };
        let handle = self.start(cookie, Pending::Plain { what: "write" });
        self.events.push_back(NbdEvent::Write { handle, offset, data, fua });
    }

    fn start(&mut self, cookie: u64, kind: Pending) -> RequestHandle {
        let handle = RequestHandle(self.next_handle);
        self.next_handle = self.next_handle.wrapping_add(1);
        self.in_flight.insert(handle, InFlight { cookie, kind });
        handle
    }

    /// Removes the request `handle` if `accepts` its kind. `Ok(None)` once the
    /// connection closed (answers are dropped then).
    fn take_pending(&mut self, handle: RequestHandle, reply: &'static str, accepts: impl Fn(Pending) -> bool) -> Result<Option<InFlight>, NbdError> {
        if self.is_closed() {
            return Ok(None);
        }
        let Some(entry) = self.in_flight.get(&handle) else {
            return Err(NbdError::UnknownHandle { handle });
        };
        if !accepts(entry.kind) {
            return Err(NbdError::WrongReply { handle, request: entry.kind.name(), reply });
        }
        Ok(self.in_flight.remove(&handle))
    }

    fn after_reply(&mut self) {
        if matches!(self.phase, Phase::Disconnecting) && self.in_flight.is_empty() {
            self.close(None);
        }
    }

    fn send_read_data(&mut self, cookie: u64, offset: u64, data: Vec<u8>) {
        if self.structured {
            if data.iter().all(|&b| b == 0) {
                put_chunk_header(&mut self.staged, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
                self.staged.put_u64(offset);
                self.staged.put_u32(data.len() as u32);
                return;
            }
            put_chunk_header(&mut self.staged, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.len());
            self.staged.put_u64(offset);
        } else {
            put_simple_reply(&mut self.staged, 0, cookie);
        }
        if data.len() <= COPY_READ_BYTES_MAX {
            self.staged.put_slice(&data);
        } else {
            if !self.staged.is_empty() {
                self.transmits.push_back(self.staged.split().freeze());
            }
            self.transmits.push_back(Bytes::from(data));
        }
    }

    /// An error reply: an error chunk with `message` under structured
    /// replies, else a simple reply (which never carries read data).
    fn send_error(&mut self, cookie: u64, errno: NbdErrno, message: &str) {
        if self.structured {
            put_error_chunk(&mut self.staged, cookie, errno.code(), message);
        } else {
            put_simple_reply(&mut self.staged, errno.code(), cookie);
        }
    }

    fn send_driver_error(&mut self, cookie: u64, kind: Pending, errno: NbdErrno) {
        let message = format!("{} failed on the server: {}", kind.name(), errno.describe());
        self.send_error(cookie, errno, &message);
    }

    /// Ends the connection: no more input is read, answers in flight are dropped.
    fn close(&mut self, error: Option<NbdError>) {
        if self.is_closed() {
            return;
        }
        self.phase = Phase::Closed;
        self.in_flight.clear();
        self.inbuf = Vec::new();
        self.close_error = error;
    }
}

/// The descriptors `(length, status flags)` of a block status reply: no empty
/// extent, equal neighbours merged, all but the last inside `len_bytes`, one
/// only if `req_one` (then inside `len_bytes` too), nothing past `room`
/// bytes (the end of the export), at most [`MAX_EXTENTS_PER_REPLY`].
fn normalize_extents(extents: &[Extent], len_bytes: u32, req_one: bool, room: u64) -> Vec<(u32, u32)> {
    let want = u64::from(len_bytes);
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut covered: u64 = 0;
    for e in extents {
        if covered >= want || covered >= room {
            break;
        }
        let mut len = u64::from(e.len_bytes).min(room - covered);
        if req_one {
            len = len.min(want);
        }
        if len == 0 {
            continue;
        }
        let flags = (if e.hole { STATE_HOLE } else { 0 }) | (if e.zero { STATE_ZERO } else { 0 });
        // `len` ≤ the extent's own u32 length, so the casts are exact.
        let full = out.len() >= MAX_EXTENTS_PER_REPLY;
        match out.last_mut() {
            Some(last) if last.1 == flags && u64::from(last.0) + len <= u64::from(u32::MAX) => last.0 += len as u32,
            _ if full => break,
            _ => out.push((len as u32, flags)),
        }
        covered += len;
        if req_one {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests;

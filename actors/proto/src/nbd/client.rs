//! NBD client core (sans-IO): one connection to an NBD server, client side,
//! as a proxy node reads a VM's disk from qemu (or qemu-storage-daemon,
//! qemu-nbd) without an agent in the VM.
//!
//! - **Handshake**: fixed newstyle. With [`NbdClient::new_tls`], first
//!   `STARTTLS` and nothing else: on the server's ACK the core reports
//!   [`ClientEvent::StartTls`] and waits for the driver to run TLS on the
//!   same connection ([`NbdClient::handle_tls_started`]); a refusal closes
//!   the connection (never a fallback to plaintext), and so does any
//!   plaintext byte after the ACK (an injection). Then, with or without
//!   TLS, `STRUCTURED_REPLY` (a server without
//!   them is still read, with simple replies, but offers no block status),
//!   then `SET_META_CONTEXT` with the contexts asked for (`base:allocation`,
//!   `qemu:dirty-bitmap:NAME`), then `GO` for the export. A refused export or
//!   context request closes the connection with the server's message; a
//!   server that requires TLS (`ERR_TLS_REQD`) from a plain client too.
//! - **Transmission**: `READ` (simple or structured replies: data and hole
//!   chunks must cover the request exactly once), `BLOCK_STATUS` (the
//!   server describes every granted context; the one asked for is kept),
//!   `DISC`. Requests may be pipelined; replies are matched
//!   by cookie in any order.
//!
//! Driving it: write [`NbdClient::poll_transmit`] to the socket after every
//! call; feed what the socket reads to [`NbdClient::handle_input`] (any
//! split) and its end to [`NbdClient::handle_eof`]; drain
//! [`NbdClient::poll_event`]. A server that breaks the protocol closes the
//! connection with an [`NbdClientError`] that says what it sent; no input
//! makes the core panic, and it buffers at most one reply chunk (a read's
//! data is at most [`MAX_READ_BYTES`]).

use std::collections::{BTreeMap, VecDeque};

use bytes::{Buf, BufMut, BytesMut};

use super::wire::*;

/// Largest read asked for at once (the common server limit).
pub const MAX_READ_BYTES: u32 = 32 << 20;
/// Largest option reply accepted during the handshake.
const MAX_OPTION_REPLY_BYTES: u32 = 64 << 10;
/// Largest reply chunk accepted: a read's data and its offset, or block
/// status descriptors (the spec recommends at most 2^20 of them).
const MAX_CHUNK_BYTES: u32 = MAX_READ_BYTES + 64 + (1 << 23);
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Why a connection ended or a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdClientError {
    /// The server sent something the protocol does not allow.
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    /// The server refused an option of the handshake.
    #[error("the NBD server refused {what}: {message}")]
    Refused {
        /// What was asked ("export \"vm1\"", "meta context qemu:dirty-bitmap:b0").
        what: String,
        /// The server's reason (its message, or the reply type).
        message: String,
    },
    /// The server closed the connection.
    #[error("the NBD server closed the connection {0}")]
    Closed(&'static str),
    /// A call that does not fit the connection's state or the export.
    #[error("{0}")]
    Usage(String),
}

/// A request's number, to match its [`ClientEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A request the server answered with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// The NBD error number (5 = EIO, 22 = EINVAL...).
    pub errno: u32,
    /// The server's message, if it sent one.
    pub message: String,
}

/// A run of bytes with the same status in one meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Its first byte.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The context's flags: for `base:allocation` [`STATE_HOLE`] and
    /// [`STATE_ZERO`], for `qemu:dirty-bitmap:NAME` 1 when dirty.
    pub flags: u32,
}

/// What the connection has to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server agreed to `STARTTLS` (clients of [`NbdClient::new_tls`]
    /// only): the driver must now run a TLS handshake on the same
    /// connection as client and then call [`NbdClient::handle_tls_started`];
    /// from then on the core's bytes go through TLS both ways. Every byte
    /// read before this event must have gone to [`NbdClient::handle_input`]
    /// (the core closes the connection if any followed the ACK), and TLS
    /// starts on the bare socket: no plaintext read-ahead may be handed to
    /// it. Until then the core sends nothing.
    StartTls,
    /// The handshake is done: the export is open.
    Ready {
        /// Its size in bytes.
        size: u64,
        /// Whether the server refuses writes to it.
        read_only: bool,
        /// The meta contexts the server granted, of those asked for.
        contexts: Vec<String>,
    },
    /// A read finished.
    Read {
        /// Which.
        id: RequestId,
        /// The bytes, exactly as many as asked for.
        result: Result<Vec<u8>, RequestError>,
    },
    /// A block status request finished.
    BlockStatus {
        /// Which.
        id: RequestId,
        /// The extents from the request's offset on, in order (the server
        /// may describe less than asked, never nothing).
        result: Result<Vec<StatusExtent>, RequestError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the server's greeting.
    Greeting,
    /// Waiting for the reply to `STARTTLS`.
    StartTls,
    /// `STARTTLS` agreed: the driver runs the TLS handshake; no input is
    /// allowed until [`NbdClient::handle_tls_started`].
    TlsHandshake,
    /// Waiting for the reply to `STRUCTURED_REPLY`.
    Structured,
    /// Waiting for the replies to `SET_META_CONTEXT`.
    MetaContext,
    /// Waiting for the replies to `GO`.
    Go,
    /// Requests may be sent.
    Transmission,
    /// `DISC` sent, or the connection broke.
    Closed,
}

enum Pending {
    Read { offset: u64, data: Vec<u8>, covered: u64, error: Option<RequestError> },
    Status { offset: u64, context: u32, extents: Vec<StatusExtent>, error: Option<RequestError> },
}

/// An option reply type as the spec names it.
fn reply_name(kind: u32) -> String {
    let name = match kind {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        _ => return format!("reply type {kind:#x}"),
    };
    name.into()
}

/// One client connection.
pub struct NbdClient {
    state: State,
    export: String,
    /// Whether the connection starts with `STARTTLS`.
    tls: bool,
    wanted: Vec<String>,
    granted: Vec<(u32, String)>,
    structured: bool,
    size: u64,
    read_only: bool,
    inbuf: BytesMut,
    out: BytesMut,
    events: VecDeque<ClientEvent>,
    next_cookie: u64,
    pending: BTreeMap<u64, Pending>,
    error: Option<NbdClientError>,
}

impl NbdClient {
    /// A connection that will open `export` and ask for `contexts`; the
    /// server speaks first.
    pub fn new(export: &str, contexts: &[&str]) -> NbdClient {
        NbdClient {
            state: State::Greeting,
            export: export.to_string(),
            tls: false,
            wanted: contexts.iter().map(|c| c.to_string()).collect(),
            granted: Vec::new(),
            structured: false,
            size: 0,
            read_only: true,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            events: VecDeque::new(),
            next_cookie: 1,
            pending: BTreeMap::new(),
            error: None,
        }
    }

    /// Like [`NbdClient::new`], over TLS: after the greeting (and the client
    /// flags) it sends `STARTTLS` and nothing else, reports
    /// [`ClientEvent::StartTls`] when the server agrees, and goes on once
    /// the driver called [`NbdClient::handle_tls_started`].
    pub fn new_tls(export: &str, contexts: &[&str]) -> NbdClient {
        NbdClient { tls: true, ..NbdClient::new(export, contexts) }
    }

    /// The driver finished the TLS handshake asked for by
    /// [`ClientEvent::StartTls`]: what follows (both ways) goes through TLS,
    /// and the handshake goes on with `STRUCTURED_REPLY`.
    ///
    /// Called at any other time (also before the event was taken from
    /// [`NbdClient::poll_event`]) it is a driver bug that could leave the
    /// two ends disagreeing on whether TLS is up: it closes the connection
    /// with [`NbdClientError::Usage`] (nothing is sent), except on a
    /// connection already closed, where it does nothing.
    pub fn handle_tls_started(&mut self) {
        match self.state {
            State::TlsHandshake if !self.events.contains(&ClientEvent::StartTls) => self.structured_reply(),
            State::Closed => {}
            _ => self.fail(NbdClientError::Usage(
                "handle_tls_started was called, but the NBD connection was not waiting for a TLS handshake (no ClientEvent::StartTls)".into(),
            )),
        }
    }

    /// Bytes to send to the server, if any.
    pub fn poll_transmit(&mut self) -> Option<bytes::Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Whether the connection is over (after `DISC` or an error).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Why the connection ended, if it broke.
    pub fn close_error(&self) -> Option<&NbdClientError> {
        self.error.as_ref()
    }

    /// Requests sent and not answered yet.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// The export's size, once [`ClientEvent::Ready`] was reported.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The socket ended.
    pub fn handle_eof(&mut self) {
        if self.state != State::Closed {
            let when = if self.state == State::Transmission { "with requests unanswered" } else { "during the handshake" };
            if self.state != State::Transmission || !self.pending.is_empty() {
                self.fail(NbdClientError::Closed(when));
            } else {
                self.state = State::Closed;
            }
        }
    }

    /// Bytes the socket read, in any split.
    pub fn handle_input(&mut self, input: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        self.inbuf.extend_from_slice(input);
        while self.state != State::Closed {
            let step = match self.state {
                State::Greeting => self.greeting(),
                State::TlsHandshake => self.no_plaintext().map(|()| false),
                State::StartTls | State::Structured | State::MetaContext | State::Go => self.option_reply(),
                State::Transmission => self.reply(),
                State::Closed => break,
            };
            match step {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => self.fail(e),
            }
        }
    }

    /// Asks for `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<RequestId, NbdClientError> {
        self.check_request(offset, u64::from(len))?;
        if len > MAX_READ_BYTES {
            return Err(NbdClientError::Usage(format!("a read of {len} bytes is more than {MAX_READ_BYTES} at once")));
        }
        let cookie = self.request(CMD_READ, 0, offset, len);
        self.pending.insert(cookie, Pending::Read { offset, data: vec![0; len as usize], covered: 0, error: None });
        Ok(RequestId(cookie))
    }

    /// Asks for the status of `len` bytes at `offset` in the granted meta
    /// context `context`.
    pub fn block_status(&mut self, offset: u64, len: u32, context: &str) -> Result<RequestId, NbdClientError> {
        self.check_request(offset, u64::from(len))?;
        let Some(&(id, _)) = self.granted.iter().find(|(_, name)| name == context) else {
            return Err(NbdClientError::Usage(format!("the meta context {context} was not granted by the server")));
        };
        if len == 0 {
            return Err(NbdClientError::Usage("a block status of 0 bytes".into()));
        }
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len);
        self.pending.insert(cookie, Pending::Status { offset, context: id, extents: Vec::new(), error: None });
        Ok(RequestId(cookie))
    }

    /// Ends the connection politely (`DISC`); requests still pending get no answer.
    pub fn disconnect(&mut self) {
        if self.state == State::Transmission {
            self.request(CMD_DISC, 0, 0, 0);
        }
        self.state = State::Closed;
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<(), NbdClientError> {
        if self.state != State::Transmission {
            return Err(NbdClientError::Usage("the connection is not open for requests".into()));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(NbdClientError::Usage(format!("bytes {offset}+{len} lie past the end of the {}-byte export", self.size)));
        }
        Ok(())
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.out.put_u32(REQUEST_MAGIC);
        self.out.put_u16(flags);
        self.out.put_u16(kind);
        self.out.put_u64(cookie);
        self.out.put_u64(offset);
        self.out.put_u32(len);
        cookie
    }

    fn fail(&mut self, e: NbdClientError) {
        self.state = State::Closed;
        self.pending.clear();
        self.inbuf.clear();
        // A TLS handshake not started yet must not start on a dead connection.
        self.events.retain(|e| *e != ClientEvent::StartTls);
        self.error.get_or_insert(e);
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        self.out.put_u64(OPTION_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }

    fn greeting(&mut self) -> Result<bool, NbdClientError> {
        if self.inbuf.len() < 18 {
            return Ok(false);
        }
        let (init, opt, flags) = (self.inbuf.get_u64(), self.inbuf.get_u64(), self.inbuf.get_u16());
        if init != INIT_MAGIC || opt != OPTION_MAGIC {
            return Err(NbdClientError::Protocol("its greeting is not a newstyle NBD server's".into()));
        }
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdClientError::Protocol("it does not speak fixed newstyle".into()));
        }
        let mut client = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client |= FLAG_C_NO_ZEROES;
        }
        self.out.put_u32(client);
        if self.tls {
            self.option(OPT_STARTTLS, &[]);
            self.state = State::StartTls;
        } else {
            self.structured_reply();
        }
        Ok(true)
    }

    fn structured_reply(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        self.state = State::Structured;
    }

    /// Between the server's ACK to `STARTTLS` and the end of the TLS
    /// handshake the server sends nothing in plaintext; bytes here were
    /// sent (or injected on the way) after the ACK and would otherwise be
    /// taken for replies protected by TLS.
    fn no_plaintext(&self) -> Result<(), NbdClientError> {
        if self.inbuf.is_empty() {
            return Ok(());
        }
        Err(NbdClientError::Protocol(format!(
            "it sent {} bytes of plaintext after agreeing to TLS (NBD_OPT_STARTTLS), where only the TLS handshake may follow (an injection attempt?)",
            self.inbuf.len()
        )))
    }

    /// One option reply, when all of it is here.
    fn option_reply(&mut self) -> Result<bool, NbdClientError> {
        if self.inbuf.len() < 20 {
            return Ok(false);
        }
        let mut head = Reader::new(&self.inbuf[..20]);
        let (magic, option, kind, len) = (head.u64(), head.u32(), head.u32(), head.u32().unwrap_or(0));
        if magic != Some(OPTION_REPLY_MAGIC) {
            return Err(NbdClientError::Protocol("an option reply without its magic number".into()));
        }
        if len > MAX_OPTION_REPLY_BYTES {
            return Err(NbdClientError::Protocol(format!("an option reply of {len} bytes")));
        }
        if self.inbuf.len() < 20 + len as usize {
            return Ok(false);
        }
        self.inbuf.advance(20);
        let data = self.inbuf.split_to(len as usize);
        let asked = match self.state {
            State::StartTls => OPT_STARTTLS,
            State::Structured => OPT_STRUCTURED_REPLY,
            State::MetaContext => OPT_SET_META_CONTEXT,
            _ => OPT_GO,
        };
        let (option, kind) = (option.unwrap_or(0), kind.unwrap_or(0));
        if option != asked {
            return Err(NbdClientError::Protocol(format!("a reply to option {option} while option {asked} was asked")));
        }
        let message = || String::from_utf8_lossy(&data).into_owned();
        // The server's reply for people: its message, else the reply type.
        let said = || if data.is_empty() { reply_name(kind) } else { format!("{:?} ({})", message(), reply_name(kind)) };
        if self.state == State::StartTls && kind & (1 << 31) != 0 {
            return Err(NbdClientError::Refused {
                what: "TLS (NBD_OPT_STARTTLS)".into(),
                message: format!(
                    "it answered {}: the server has no TLS credentials (qemu: nbd-server-start without tls-creds); \
                     the connection does not fall back to plaintext",
                    said()
                ),
            });
        }
        if kind == REP_ERR_TLS_REQD {
            if self.tls {
                return Err(NbdClientError::Protocol(format!("it answered option {option} with {} although TLS is up", said())));
            }
            return Err(NbdClientError::Refused {
                what: format!("export {:?} without TLS", self.export),
                message: format!("it answered {}: the server requires TLS; give the volume TLS credentials", said()),
            });
        }
        if kind & (1 << 31) != 0 {
            let what = match self.state {
                State::Structured => {
                    // Simple replies still read; block status needs structured ones.
                    self.structured = false;
                    return self.after_structured();
                }
                State::MetaContext => format!("the meta contexts {}", self.wanted.join(", ")),
                _ => format!("export {:?}", self.export),
            };
            let reason = if data.is_empty() { format!("reply type {kind:#x}") } else { message() };
            return Err(NbdClientError::Refused { what, message: reason });
        }
        match (self.state, kind) {
            (State::StartTls, REP_ACK) if !data.is_empty() => Err(NbdClientError::Protocol("an ACK to NBD_OPT_STARTTLS with data".into())),
            (State::StartTls, REP_ACK) => {
                // Checked before the event: a driver must not start TLS on
                // a connection whose plaintext was tampered with.
                self.state = State::TlsHandshake;
                self.no_plaintext()?;
                self.events.push_back(ClientEvent::StartTls);
                Ok(false)
            }
            (State::Structured, REP_ACK) => {
                self.structured = true;
                self.after_structured()
            }
            (State::MetaContext, REP_META_CONTEXT) => {
                let Some(id) = Reader::new(&data).u32() else {
                    return Err(NbdClientError::Protocol("a meta context reply without its id".into()));
                };
                let name = String::from_utf8_lossy(&data[4..]).into_owned();
                if !self.wanted.contains(&name) || self.granted.iter().any(|(i, _)| *i == id) {
                    return Err(NbdClientError::Protocol(format!("it granted meta context {name:?} (id {id}), not asked for or twice")));
                }
                self.granted.push((id, name));
                Ok(true)
            }
            (State::MetaContext, REP_ACK) => {
                self.go();
                Ok(true)
            }
            (State::Go, REP_INFO) => {
                let mut info = Reader::new(&data);
                if let (Some(INFO_EXPORT), Some(size), Some(flags)) = (info.u16(), info.u64(), info.u16()) {
                    self.size = size;
                    self.read_only = flags & FLAG_READ_ONLY != 0;
                }
                Ok(true)
            }
            (State::Go, REP_ACK) => {
                self.state = State::Transmission;
                let contexts = self.granted.iter().map(|(_, n)| n.clone()).collect();
                self.events.push_back(ClientEvent::Ready { size: self.size, read_only: self.read_only, contexts });
                Ok(true)
            }
            (_, kind) => Err(NbdClientError::Protocol(format!("an option reply of type {kind} where it has no place"))),
        }
    }

    fn after_structured(&mut self) -> Result<bool, NbdClientError> {
        if self.wanted.is_empty() {
            self.go();
        } else if !self.structured {
            return Err(NbdClientError::Refused { what: "structured replies".into(), message: "block status (meta contexts) needs them".into() });
        } else {
            let mut data = BytesMut::new();
            data.put_u32(self.export.len() as u32);
            data.put_slice(self.export.as_bytes());
            data.put_u32(self.wanted.len() as u32);
            for w in &self.wanted {
                data.put_u32(w.len() as u32);
                data.put_slice(w.as_bytes());
            }
            self.option(OPT_SET_META_CONTEXT, &data);
            self.state = State::MetaContext;
        }
        Ok(true)
    }

    fn go(&mut self) {
        let mut data = BytesMut::new();
        data.put_u32(self.export.len() as u32);
        data.put_slice(self.export.as_bytes());
        data.put_u16(0);
        self.option(OPT_GO, &data);
        self.state = State::Go;
    }

    /// One simple reply or structured reply chunk, when all of it is here.
    fn reply(&mut self) -> Result<bool, NbdClientError> {
        if self.inbuf.len() < 4 {
            return Ok(false);
        }
        match Reader::new(&self.inbuf).u32() {
            Some(SIMPLE_REPLY_MAGIC) => self.simple_reply(),
            Some(STRUCTURED_REPLY_MAGIC) => self.chunk(),
            other => Err(NbdClientError::Protocol(format!("a reply with magic number {:#x}", other.unwrap_or(0)))),
        }
    }

    fn simple_reply(&mut self) -> Result<bool, NbdClientError> {
        if self.inbuf.len() < 16 {
            return Ok(false);
        }
        let mut head = Reader::new(&self.inbuf[4..16]);
        let (errno, cookie) = (head.u32().unwrap_or(0), head.u64().unwrap_or(0));
        let data_len = match self.pending.get(&cookie) {
            Some(Pending::Read { data, .. }) if errno == 0 => data.len(),
            Some(Pending::Read { .. }) => 0,
            Some(Pending::Status { .. }) => return Err(NbdClientError::Protocol("a simple reply to a block status request".into())),
            None => return Err(NbdClientError::Protocol(format!("a reply to request {cookie}, which is not pending"))),
        };
        if self.inbuf.len() < 16 + data_len {
            return Ok(false);
        }
        self.inbuf.advance(16);
        let bytes = self.inbuf.split_to(data_len);
        let Some(Pending::Read { .. }) = self.pending.remove(&cookie) else { unreachable!("checked above") };
        let result = if errno == 0 { Ok(bytes.to_vec()) } else { Err(RequestError { errno, message: String::new() }) };
        self.events.push_back(ClientEvent::Read { id: RequestId(cookie), result });
        Ok(true)
    }

    fn chunk(&mut self) -> Result<bool, NbdClientError> {
        if self.inbuf.len() < 20 {
            return Ok(false);
        }
        let mut head = Reader::new(&self.inbuf[4..20]);
        let (flags, kind, cookie, len) = (head.u16().unwrap_or(0), head.u16().unwrap_or(0), head.u64().unwrap_or(0), head.u32().unwrap_or(0));
        if !self.structured {
            return Err(NbdClientError::Protocol("a structured reply, which was not negotiated".into()));
        }
        if len > MAX_CHUNK_BYTES {
            return Err(NbdClientError::Protocol(format!("a reply chunk of {len} bytes")));
        }
        if self.inbuf.len() < 20 + len as usize {
            return Ok(false);
        }
        self.inbuf.advance(20);
        let body = self.inbuf.split_to(len as usize);
        let Some(pending) = self.pending.get_mut(&cookie) else {
            return Err(NbdClientError::Protocol(format!("a reply to request {cookie}, which is not pending")));
        };
        let bad = |what: &str| Err(NbdClientError::Protocol(format!("{what} in the reply to request {cookie}")));
        if kind & (1 << 15) != 0 {
            let mut r = Reader::new(&body);
            let (Some(errno), Some(message_len)) = (r.u32(), r.u16()) else { return bad("an error chunk too short") };
            let message = r.bytes(usize::from(message_len)).unwrap_or_default();
            let extra = if kind == REPLY_TYPE_ERROR_OFFSET { r.u64().map(|_| ()) } else { Some(()) };
            if (kind != REPLY_TYPE_ERROR && kind != REPLY_TYPE_ERROR_OFFSET) || message.len() != usize::from(message_len) || extra.is_none() || !r.is_empty() || errno == 0 {
                return bad("an error chunk that is not well formed");
            }
            let error = RequestError { errno, message: String::from_utf8_lossy(message).into_owned() };
            match pending {
                Pending::Read { error: e, .. } | Pending::Status { error: e, .. } => {
                    e.get_or_insert(error);
                }
            }
        } else {
            match (pending, kind) {
                (_, REPLY_TYPE_NONE) if body.is_empty() => {}
                (Pending::Read { offset, data, covered, .. }, REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE) => {
                    let mut r = Reader::new(&body);
                    let Some(at) = r.u64() else { return bad("a read chunk too short") };
                    let n = if kind == REPLY_TYPE_OFFSET_DATA {
                        (body.len() - 8) as u64
                    } else {
                        match (r.u32(), r.is_empty()) {
                            (Some(n), true) => u64::from(n),
                            _ => return bad("a hole chunk that is not 12 bytes"),
                        }
                    };
                    // Checked: a server's offset near 2^64 must not wrap past the request.
                    let start = at.checked_sub(*offset).filter(|s| s.checked_add(n).is_some_and(|end| end <= data.len() as u64) && n > 0);
                    let Some(start) = start else { return bad("a read chunk outside the request") };
                    let range = start as usize..(start + n) as usize;
                    if kind == REPLY_TYPE_OFFSET_DATA {
                        data[range].copy_from_slice(&body[8..]);
                    } else {
                        data[range].fill(0);
                    }
                    *covered += n;
                }
                (Pending::Status { offset, context, extents, .. }, REPLY_TYPE_BLOCK_STATUS) => {
                    if body.len() < 12 || !(body.len() - 4).is_multiple_of(8) {
                        return bad("a block status chunk that is not well formed");
                    }
                    // The server describes every context it granted; only the asked one is kept.
                    let mut r = Reader::new(&body);
                    let id = r.u32().unwrap_or(0);
                    if !self.granted.iter().any(|(g, _)| *g == id) {
                        return bad(&format!("block status of context {id}, which was not granted"));
                    }
                    if id != *context {
                        return self.done(flags, cookie);
                    }
                    if !extents.is_empty() {
                        return bad("block status of one context twice");
                    }
                    let mut at = *offset;
                    while let (Some(len), Some(flags)) = (r.u32(), r.u32()) {
                        if len == 0 {
                            return bad("a block status extent of 0 bytes");
                        }
                        extents.push(StatusExtent { offset: at, len: u64::from(len), flags });
                        at += u64::from(len);
                    }
                }
                (_, kind) => return bad(&format!("a chunk of type {kind}")),
            }
        }
        self.done(flags, cookie)
    }

    /// After a chunk of request `cookie`: reports it when the chunk was its last.
    fn done(&mut self, flags: u16, cookie: u64) -> Result<bool, NbdClientError> {
        let bad = |what: &str| Err(NbdClientError::Protocol(format!("{what} in the reply to request {cookie}")));
        if flags & REPLY_FLAG_DONE != 0 {
            let done = self.pending.remove(&cookie).expect("pending, looked up above");
            let id = RequestId(cookie);
            let event = match done {
                Pending::Read { error: Some(e), .. } => ClientEvent::Read { id, result: Err(e) },
                Pending::Read { data, covered, .. } if covered == data.len() as u64 => ClientEvent::Read { id, result: Ok(data) },
                Pending::Read { data, covered, .. } => {
                    return Err(NbdClientError::Protocol(format!("the reply to read {cookie} covered {covered} of its {} bytes", data.len())));
                }
                Pending::Status { error: Some(e), .. } => ClientEvent::BlockStatus { id, result: Err(e) },
                Pending::Status { extents, .. } if extents.is_empty() => return bad("no block status"),
                Pending::Status { extents, .. } => ClientEvent::BlockStatus { id, result: Ok(extents) },
            };
            self.events.push_back(event);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{Export, Extent, NbdConnection, NbdErrno, NbdEvent};

    /// A client and our own server core over an in-memory pipe; the server
    /// answers from `disk` (reads), with one extent per 64 KiB for block
    /// status (a hole where the disk is zero), and fails reads at `bad_at`.
    struct Pair {
        client: NbdClient,
        server: NbdConnection,
        disk: Vec<u8>,
        bad_at: Option<u64>,
        split: usize,
        /// The test plays the server's part of `STARTTLS` (our server core
        /// refuses it): it takes the option away, answers ACK, and "runs
        /// TLS" at once, so the rest of the bytes pass as if decrypted.
        starttls: bool,
    }

    impl Pair {
        fn new(contexts: &[&str], split: usize) -> Pair {
            let disk: Vec<u8> = (0..1u32 << 20).map(|i| if (i >> 16) % 3 == 0 { 0 } else { (i % 251) as u8 }).collect();
            let export = Export { name: "vm1".into(), size_bytes: disk.len() as u64, read_only: true, description: None };
            Pair { client: NbdClient::new("vm1", contexts), server: NbdConnection::new(vec![export]).unwrap(), disk, bad_at: None, split, starttls: false }
        }

        /// The same with a client of [`NbdClient::new_tls`].
        fn new_tls(contexts: &[&str], split: usize) -> Pair {
            Pair { client: NbdClient::new_tls("vm1", contexts), starttls: true, ..Pair::new(contexts, split) }
        }

        /// Moves bytes both ways, in pieces of `split` bytes, until nothing moves.
        fn pump(&mut self) -> Vec<ClientEvent> {
            let mut events = Vec::new();
            loop {
                let mut moved = false;
                while let Some(b) = self.client.poll_transmit() {
                    moved = true;
                    if std::mem::take(&mut self.starttls) {
                        // The client flags, then STARTTLS and nothing else.
                        assert_eq!(&b[4..], &option_bytes(OPT_STARTTLS, &[])[..]);
                        for piece in b[..4].chunks(self.split) {
                            self.server.handle_input(piece);
                        }
                        for piece in option_reply(OPT_STARTTLS, REP_ACK, &[]).chunks(self.split) {
                            self.client.handle_input(piece);
                        }
                        continue;
                    }
                    for piece in b.chunks(self.split) {
                        self.server.handle_input(piece);
                    }
                }
                while let Some(e) = self.server.poll_event() {
                    moved = true;
                    match e {
                        NbdEvent::Read { handle, offset, len_bytes } => {
                            let r = if self.bad_at.is_some_and(|b| b >= offset && b < offset + u64::from(len_bytes)) {
                                Err(NbdErrno::Io)
                            } else {
                                Ok(self.disk[offset as usize..offset as usize + len_bytes as usize].to_vec())
                            };
                            self.server.reply_read(handle, r).unwrap();
                        }
                        NbdEvent::BlockStatus { handle, offset, len_bytes } => {
                            let end = (offset + u64::from(len_bytes)).min(self.disk.len() as u64);
                            let mut extents = Vec::new();
                            let mut at = offset;
                            while at < end {
                                let next = ((at >> 16) + 1) << 16;
                                let zero = self.disk[at as usize..next.min(end) as usize].iter().all(|&b| b == 0);
                                extents.push(Extent { len_bytes: (next.min(end) - at) as u32, zero, hole: zero });
                                at = next.min(end);
                            }
                            self.server.reply_block_status(handle, Ok(extents)).unwrap();
                        }
                        _ => {}
                    }
                }
                while let Some(b) = self.server.poll_transmit() {
                    moved = true;
                    for piece in b.chunks(self.split) {
                        self.client.handle_input(piece);
                    }
                }
                while let Some(e) = self.client.poll_event() {
                    moved = true;
                    if e == ClientEvent::StartTls {
                        assert_eq!(self.client.poll_transmit(), None, "nothing is sent until TLS is up");
                        self.client.handle_tls_started();
                    }
                    events.push(e);
                }
                if !moved {
                    return events;
                }
            }
        }
    }

    /// An option as the client sends it.
    fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u64(OPTION_MAGIC);
        b.put_u32(option);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        b.to_vec()
    }

    /// An option reply as a server sends it.
    fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        put_option_reply(&mut b, option, reply, data);
        b.to_vec()
    }

    fn greeting_bytes() -> Vec<u8> {
        let mut b = BytesMut::new();
        put_greeting(&mut b);
        b.to_vec()
    }

    /// What a TLS client sends before TLS: its flags (our greeting offers
    /// NO_ZEROES) and STARTTLS.
    fn starttls_bytes() -> Vec<u8> {
        [&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()[..], &option_bytes(OPT_STARTTLS, &[])].concat()
    }

    /// Everything the client sent so far.
    fn sent(client: &mut NbdClient) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(b) = client.poll_transmit() {
            all.extend_from_slice(&b);
        }
        all
    }

    fn events(client: &mut NbdClient) -> Vec<ClientEvent> {
        std::iter::from_fn(|| client.poll_event()).collect()
    }

    #[test]
    fn reads_and_block_status_against_our_server_in_any_split_with_or_without_tls() {
        for (split, tls) in [1, 7, 4096, usize::MAX].into_iter().flat_map(|s| [(s, false), (s, true)]) {
            let mut pair = if tls { Pair::new_tls(&["base:allocation"], split) } else { Pair::new(&["base:allocation"], split) };
            let ready = pair.pump();
            let mut want = vec![ClientEvent::Ready { size: 1 << 20, read_only: true, contexts: vec!["base:allocation".into()] }];
            if tls {
                want.insert(0, ClientEvent::StartTls);
            }
            assert_eq!(ready, want, "split {split}");
            // Pipelined: three reads (one all zero: a hole chunk) and a block status.
            let a = pair.client.read(0, 4096).unwrap();
            let b = pair.client.read(70_000, 100_000).unwrap();
            let c = pair.client.read((1 << 20) - 10, 10).unwrap();
            let s = pair.client.block_status(0, 1 << 18, "base:allocation").unwrap();
            let mut got = pair.pump();
            got.sort_by_key(|e| match e {
                ClientEvent::Read { id, .. } | ClientEvent::BlockStatus { id, .. } => *id,
                ClientEvent::Ready { .. } | ClientEvent::StartTls => RequestId(0),
            });
            let disk = pair.disk.clone();
            assert_eq!(got[0], ClientEvent::Read { id: a, result: Ok(disk[..4096].to_vec()) });
            assert_eq!(got[1], ClientEvent::Read { id: b, result: Ok(disk[70_000..170_000].to_vec()) });
            assert_eq!(got[2], ClientEvent::Read { id: c, result: Ok(disk[(1 << 20) - 10..].to_vec()) });
            let ClientEvent::BlockStatus { id, result: Ok(extents) } = &got[3] else { panic!("{:?}", got[3]) };
            assert_eq!(*id, s);
            assert_eq!(extents[0], StatusExtent { offset: 0, len: 65536, flags: STATE_HOLE | STATE_ZERO });
            // The server merges neighbours of the same status.
            assert_eq!(extents[1], StatusExtent { offset: 65536, len: 131072, flags: 0 });
            assert_eq!(extents[2], StatusExtent { offset: 196608, len: 65536, flags: STATE_HOLE | STATE_ZERO });
            assert_eq!(pair.client.pending_requests(), 0);
            pair.client.disconnect();
            pair.pump();
            assert!(pair.client.is_closed() && pair.client.close_error().is_none());
        }
    }

    /// Found by the `nbd_client` fuzz target: a read chunk whose offset is
    /// near 2^64 made the bound check overflow (a panic); it is a protocol
    /// error that names the request.
    #[test]
    fn a_read_chunk_offset_near_the_end_of_the_u64_range_is_refused() {
        let mut pair = Pair::new(&[], usize::MAX);
        pair.pump();
        let id = pair.client.read(4096, 512).unwrap();
        let mut chunk = Vec::new();
        chunk.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        chunk.extend_from_slice(&0u16.to_be_bytes());
        chunk.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        chunk.extend_from_slice(&id.0.to_be_bytes());
        // 5000 bytes at 2^64 - 904: 5000 bytes past the request's offset
        // (4096) wrapped to 0, which an unchecked sum took for inside it.
        chunk.extend_from_slice(&5008u32.to_be_bytes());
        chunk.extend_from_slice(&(u64::MAX - 903).to_be_bytes());
        chunk.extend_from_slice(&[0x7d; 5000]);
        pair.client.handle_input(&chunk);
        while pair.client.poll_event().is_some() {}
        let e = pair.client.close_error().expect("a protocol error").to_string();
        assert!(e.contains("a read chunk outside the request"), "{e}");
    }

    #[test]
    fn a_failed_read_is_reported_and_the_connection_goes_on() {
        let mut pair = Pair::new(&[], usize::MAX);
        pair.pump();
        pair.bad_at = Some(5000);
        let id = pair.client.read(4096, 4096).unwrap();
        let got = pair.pump();
        assert!(matches!(&got[..], [ClientEvent::Read { id: i, result: Err(RequestError { errno: 5, .. }) }] if *i == id), "{got:?}");
        pair.bad_at = None;
        let id = pair.client.read(4096, 4096).unwrap();
        assert!(matches!(&pair.pump()[..], [ClientEvent::Read { id: i, result: Ok(d) }] if *i == id && d.len() == 4096));
    }

    #[test]
    fn refusals_and_misuse_say_what() {
        // A context the server does not have: not granted; asking for its status is refused locally.
        let mut pair = Pair::new(&["qemu:dirty-bitmap:b0"], usize::MAX);
        let ready = pair.pump();
        assert_eq!(ready, vec![ClientEvent::Ready { size: 1 << 20, read_only: true, contexts: vec![] }]);
        let e = pair.client.block_status(0, 4096, "qemu:dirty-bitmap:b0").unwrap_err();
        assert_eq!(e.to_string(), "the meta context qemu:dirty-bitmap:b0 was not granted by the server");
        assert!(pair.client.read(1 << 20, 1).unwrap_err().to_string().contains("past the end"));
        assert!(pair.client.read(0, MAX_READ_BYTES + 1).is_err());
        // An export the server does not have.
        let mut pair = Pair::new(&[], usize::MAX);
        pair.client = NbdClient::new("nope", &[]);
        assert!(pair.pump().is_empty());
        let e = pair.client.close_error().unwrap().to_string();
        assert!(e.starts_with("the NBD server refused export \"nope\""), "{e}");
        assert!(pair.client.read(0, 1).is_err());
    }

    #[test]
    fn starttls_is_sent_alone_and_the_core_waits_for_tls() {
        let mut client = NbdClient::new_tls("vm1", &["base:allocation"]);
        assert_eq!(client.poll_transmit(), None, "the server speaks first");
        // Greeting and ACK in one read: nothing follows the ACK, so it is fine.
        client.handle_input(&[greeting_bytes(), option_reply(OPT_STARTTLS, REP_ACK, &[])].concat());
        assert_eq!(sent(&mut client), starttls_bytes());
        assert_eq!(events(&mut client), vec![ClientEvent::StartTls]);
        client.handle_input(&[]);
        assert_eq!(client.poll_transmit(), None, "nothing until TLS is up");
        assert!(!client.is_closed());
        client.handle_tls_started();
        assert_eq!(sent(&mut client), option_bytes(OPT_STRUCTURED_REPLY, &[]));
        // From here the bytes are the decrypted ones; the plain handshake goes on.
        client.handle_input(&option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        let meta = sent(&mut client);
        assert_eq!(&meta[8..12], &OPT_SET_META_CONTEXT.to_be_bytes()[..]);
        assert!(!client.is_closed() && events(&mut client).is_empty());
    }

    /// The STARTTLS injection: bytes after the ACK in the plaintext stream
    /// would be read as if TLS had protected them. However the stream is
    /// split, the connection closes and a StartTls not yet taken is withdrawn.
    #[test]
    fn plaintext_after_the_starttls_ack_closes_the_connection() {
        // A forged ACK to STRUCTURED_REPLY, as an attacker would inject.
        let injected = option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let stream = [greeting_bytes(), option_reply(OPT_STARTTLS, REP_ACK, &[]), injected].concat();
        for split in 1..=stream.len() {
            let mut client = NbdClient::new_tls("vm1", &[]);
            for piece in stream.chunks(split) {
                client.handle_input(piece);
            }
            assert!(events(&mut client).is_empty(), "split {split}: no TLS handshake on a tampered connection");
            assert_eq!(sent(&mut client), starttls_bytes(), "split {split}: nothing sent after STARTTLS");
            let e = client.close_error().expect("closed").to_string();
            assert!(matches!(client.close_error(), Some(NbdClientError::Protocol(_))), "{e}");
            assert!(e.contains("plaintext after agreeing to TLS"), "{e}");
            client.handle_tls_started();
            assert_eq!(client.close_error().map(ToString::to_string), Some(e), "the first error stays");
        }
        // The driver took the event, then the socket still gave plaintext to the core.
        let mut client = NbdClient::new_tls("vm1", &[]);
        client.handle_input(&[greeting_bytes(), option_reply(OPT_STARTTLS, REP_ACK, &[])].concat());
        assert_eq!(events(&mut client), vec![ClientEvent::StartTls]);
        client.handle_input(&[0]);
        assert!(client.close_error().unwrap().to_string().contains("1 bytes of plaintext after agreeing to TLS"));
        // An ACK with data is not an ACK.
        let mut client = NbdClient::new_tls("vm1", &[]);
        client.handle_input(&[greeting_bytes(), option_reply(OPT_STARTTLS, REP_ACK, b"x")].concat());
        assert!(events(&mut client).is_empty());
        assert!(matches!(client.close_error(), Some(NbdClientError::Protocol(_))));
    }

    #[test]
    fn a_refused_starttls_closes_the_connection_without_falling_back() {
        // Our own server core: ERR_UNSUP with a message.
        let mut pair = Pair::new(&[], usize::MAX);
        pair.client = NbdClient::new_tls("vm1", &[]);
        let mut sent_bytes = Vec::new();
        while let Some(b) = pair.server.poll_transmit() {
            pair.client.handle_input(&b);
        }
        while let Some(b) = pair.client.poll_transmit() {
            sent_bytes.extend_from_slice(&b);
            pair.server.handle_input(&b);
        }
        assert!(pair.pump().is_empty());
        sent_bytes.extend(sent(&mut pair.client));
        assert_eq!(sent_bytes, starttls_bytes(), "no plaintext option after the refusal");
        let Some(NbdClientError::Refused { what, message }) = pair.client.close_error() else { panic!("{:?}", pair.client.close_error()) };
        assert_eq!(what, "TLS (NBD_OPT_STARTTLS)");
        assert!(message.contains("does not offer TLS") && message.contains("NBD_REP_ERR_UNSUP"), "{message}");
        assert!(message.contains("no TLS credentials") && message.contains("tls-creds"), "{message}");
        // Any error reply, with or without a message.
        for (kind, name) in [(REP_ERR_POLICY, "NBD_REP_ERR_POLICY"), (REP_ERR_INVALID, "NBD_REP_ERR_INVALID"), ((1 << 31) + 77, "reply type 0x8000004d")] {
            let mut client = NbdClient::new_tls("vm1", &[]);
            client.handle_input(&[greeting_bytes(), option_reply(OPT_STARTTLS, kind, &[])].concat());
            assert_eq!(sent(&mut client), starttls_bytes());
            assert!(client.is_closed() && events(&mut client).is_empty());
            let e = client.close_error().unwrap().to_string();
            assert!(e.starts_with("the NBD server refused TLS (NBD_OPT_STARTTLS): it answered ") && e.contains(name), "{e}");
            assert!(e.contains("does not fall back to plaintext"), "{e}");
        }
        // A reply to another option is not an answer to STARTTLS.
        let mut client = NbdClient::new_tls("vm1", &[]);
        client.handle_input(&[greeting_bytes(), option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])].concat());
        assert!(matches!(client.close_error(), Some(NbdClientError::Protocol(_))));
    }

    #[test]
    fn a_server_that_requires_tls_tells_a_plain_client_so() {
        // qemu with tls-creds answers every option before STARTTLS this way,
        // here STRUCTURED_REPLY (which otherwise falls back to simple replies).
        for contexts in [&[][..], &["base:allocation"][..]] {
            let mut client = NbdClient::new("vm1", contexts);
            let refusal = option_reply(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, b"Option 0x8 not permitted before TLS");
            client.handle_input(&[greeting_bytes(), refusal].concat());
            assert!(client.is_closed() && events(&mut client).is_empty());
            let Some(NbdClientError::Refused { what, message }) = client.close_error() else { panic!("{:?}", client.close_error()) };
            assert_eq!(what, "export \"vm1\" without TLS");
            assert!(message.contains("not permitted before TLS") && message.contains("requires TLS") && message.contains("TLS credentials"), "{message}");
        }
        // A server that refuses only this export without TLS, at GO.
        let mut client = NbdClient::new("vm1", &[]);
        client.handle_input(&[greeting_bytes(), option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]), option_reply(OPT_GO, REP_ERR_TLS_REQD, &[])].concat());
        let e = client.close_error().unwrap().to_string();
        assert_eq!(e, "the NBD server refused export \"vm1\" without TLS: it answered NBD_REP_ERR_TLS_REQD: the server requires TLS; give the volume TLS credentials");
        // Over TLS the same answer makes no sense.
        let mut client = NbdClient::new_tls("vm1", &[]);
        client.handle_input(&[greeting_bytes(), option_reply(OPT_STARTTLS, REP_ACK, &[])].concat());
        assert_eq!(events(&mut client), vec![ClientEvent::StartTls]);
        client.handle_tls_started();
        client.handle_input(&option_reply(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, &[]));
        assert!(matches!(client.close_error(), Some(NbdClientError::Protocol(m)) if m.contains("although TLS is up")));
        // Other errors to STRUCTURED_REPLY still fall back to simple replies.
        let mut client = NbdClient::new("vm1", &[]);
        client.handle_input(&[greeting_bytes(), option_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[])].concat());
        assert!(!client.is_closed());
    }

    #[test]
    fn handle_tls_started_out_of_place_closes_the_connection_and_never_panics() {
        let usage = |client: &NbdClient| matches!(client.close_error(), Some(NbdClientError::Usage(m)) if m.contains("not waiting for a TLS handshake"));
        // Before the greeting, plain or TLS.
        for mut client in [NbdClient::new("vm1", &[]), NbdClient::new_tls("vm1", &[])] {
            client.handle_tls_started();
            assert!(client.is_closed() && usage(&client));
            assert_eq!(client.poll_transmit(), None);
        }
        // STARTTLS sent, no ACK yet: the driver must not run TLS on its own.
        let mut client = NbdClient::new_tls("vm1", &[]);
        client.handle_input(&greeting_bytes());
        assert_eq!(sent(&mut client), starttls_bytes());
        client.handle_tls_started();
        assert!(usage(&client) && client.poll_transmit().is_none());
        // Before the driver took the event.
        let mut client = NbdClient::new_tls("vm1", &[]);
        client.handle_input(&[greeting_bytes(), option_reply(OPT_STARTTLS, REP_ACK, &[])].concat());
        client.handle_tls_started();
        assert!(usage(&client) && events(&mut client).is_empty());
        assert_eq!(sent(&mut client), starttls_bytes());
        // Twice.
        let mut client = NbdClient::new_tls("vm1", &[]);
        client.handle_input(&[greeting_bytes(), option_reply(OPT_STARTTLS, REP_ACK, &[])].concat());
        assert_eq!(events(&mut client), vec![ClientEvent::StartTls]);
        client.handle_tls_started();
        assert_eq!(sent(&mut client), [starttls_bytes(), option_bytes(OPT_STRUCTURED_REPLY, &[])].concat());
        client.handle_tls_started();
        assert!(usage(&client) && client.poll_transmit().is_none());
        // In transmission, on a plain connection: requests are refused afterwards.
        let mut pair = Pair::new(&[], 7);
        pair.pump();
        pair.client.handle_tls_started();
        assert!(usage(&pair.client) && pair.client.read(0, 512).is_err());
        // Closed already: nothing changes.
        pair.client.handle_tls_started();
        pair.client.handle_eof();
        assert!(usage(&pair.client));
    }

    #[test]
    fn any_bytes_from_a_server_never_panic() {
        // A real handshake, then seeded garbage, and garbage from the start;
        // plain clients and TLS ones (which start TLS whenever asked to, and
        // now and then call handle_tls_started out of place).
        let mut good = Pair::new(&["base:allocation"], usize::MAX);
        let mut transcript = Vec::new();
        loop {
            let mut moved = false;
            while let Some(b) = good.client.poll_transmit() {
                good.server.handle_input(&b);
                moved = true;
            }
            while let Some(b) = good.server.poll_transmit() {
                transcript.extend_from_slice(&b);
                good.client.handle_input(&b);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        // A TLS server says the same after its greeting, but first ACKs
        // STARTTLS; its bytes come in two reads, before and after TLS.
        let greeting = greeting_bytes();
        assert_eq!(&transcript[..greeting.len()], &greeting[..]);
        let tls_transcript = [greeting.clone(), option_reply(OPT_STARTTLS, REP_ACK, &[]), transcript[greeting.len()..].to_vec()].concat();
        let tls_cut = greeting.len() + 20;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut tls_rounds_up = 0;
        for round in 0..6000 {
            let tls = round % 4 >= 2;
            let mut client = if tls { NbdClient::new_tls("vm1", &["base:allocation"]) } else { NbdClient::new("vm1", &["base:allocation"]) };
            let mut bytes = match (round % 2, tls) {
                (0, false) => transcript.clone(),
                (0, true) => tls_transcript.clone(),
                _ => Vec::new(),
            };
            if round % 2 == 0 {
                for _ in 0..1 + next() % 4 {
                    let at = (next() % bytes.len() as u64) as usize;
                    bytes[at] = next() as u8;
                }
            }
            let extra = (next() % 64) as usize;
            bytes.extend((0..extra).map(|_| next() as u8));
            let cut = if tls && round % 2 == 0 { tls_cut } else { bytes.len() };
            let misuse = next() % 8 == 0;
            // What a TLS client sent before TLS: never more than its flags and STARTTLS.
            let mut plaintext = Vec::new();
            let mut tls_up = false;
            let reply: Vec<u8> = (0..(next() % 80) as usize).map(|_| next() as u8).collect();
            for (i, input) in [&bytes[..cut], &bytes[cut..], &reply[..]].into_iter().enumerate() {
                client.handle_input(input);
                if misuse && next() % 3 == 0 {
                    client.handle_tls_started();
                }
                while let Some(e) = client.poll_event() {
                    if e == ClientEvent::StartTls {
                        assert!(tls && !tls_up, "round {round}: StartTls from a plain client or twice");
                        plaintext.extend(sent(&mut client));
                        client.handle_tls_started();
                        tls_up = true;
                    }
                }
                if !tls_up {
                    plaintext.extend(sent(&mut client));
                }
                if tls {
                    assert!(plaintext.is_empty() || plaintext[4..] == option_bytes(OPT_STARTTLS, &[])[..], "round {round}: sent {plaintext:?} before TLS");
                }
                if i == 1 {
                    let _ = client.read(0, 512);
                    let _ = client.block_status(0, 512, "base:allocation");
                }
            }
            tls_rounds_up += usize::from(tls_up);
            client.handle_eof();
            while client.poll_event().is_some() {}
        }
        assert!(tls_rounds_up > 300, "only {tls_rounds_up} rounds got past STARTTLS");
    }
}

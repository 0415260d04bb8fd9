//! The node's QUIC endpoint: one UDP socket that both accepts peers and dials them.
//!
//! Dialing out from the same socket that accepts means a node behind NAT opens a
//! connection that then carries traffic both ways.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::error::TransportError;
use crate::identity::Identity;
use crate::tls::{self, node_id_of_cert, AllowedPeers};
use crate::wire::{self, FrameDecoder, Message, WireError};
use crate::NodeId;

/// How often an idle connection is probed, so NAT bindings stay open and dead peers are noticed.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A connection silent for this long is considered dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Application close code: orderly shutdown or topology change.
pub const CLOSE_NORMAL: u32 = 0;
/// Application close code: the peer broke the wire protocol.
pub const CLOSE_PROTOCOL: u32 = 1;
/// Application close code: an equivalent connection already exists.
pub const CLOSE_DUPLICATE: u32 = 2;

/// The largest bandwidth-delay product a connection is sized for: 1 Gbit/s
/// over a 250 ms round trip (31.25 MB), rounded up.
pub const BDP_BYTES_MAX: u64 = 32 << 20;

/// Flow-control window of one stream and the send window of a connection:
/// two bandwidth-delay products. A lost packet holds a stream's receive
/// window back at the hole until its retransmission arrives, which takes
/// about 1.5 round trips after it was first sent (and the window update
/// another half); with one BDP of window the sender would stall every time.
///
/// These are credit, not buffers: memory is used only by bytes actually in
/// flight or waiting to be read, which the replication session already bounds
/// (`session::inflight_window`: encoded blobs sent and not yet durable).
pub const STREAM_WINDOW_BYTES: u64 = 2 * BDP_BYTES_MAX;

/// Connection-wide receive window: one stream's window plus room for the
/// control and gossip streams, so a replication stream stalled at a hole
/// cannot starve them.
pub const CONNECTION_WINDOW_BYTES: u64 = STREAM_WINDOW_BYTES + (8 << 20);

/// Largest UDP payload a node sends or accepts. MTU discovery searches up to it
/// and settles at what the path carries (1,452 on an Ethernet WAN, this bound on
/// loopback or with jumbo frames); packets past the path MTU are only lost
/// probes, never data. Most of QUIC's cost is per packet (header protection,
/// acks, one send and one receive each), so larger packets on paths that allow
/// them leave more CPU for compression: 4.5x fewer packets than at 1,452.
///
/// Why not up to 64 KiB: quinn hands the kernel up to 10 packets in one
/// segmentation-offload send, and Linux refuses a batch over 64 KiB. With larger
/// packets whole batches were dropped, and the losses of large packets made
/// quinn's black-hole detection fall back to 1,200 bytes. 10 x 6,500 fits.
pub const MAX_UDP_PAYLOAD_BYTES: u16 = 6_500;

/// How long after quinn's black-hole detection fell back to 1,200-byte
/// packets path-MTU discovery searches again (quinn's default: a minute).
/// The detector also fires on congestion: on the benchmark's 1 Gbit/s,
/// 150 ms link, in 2 of about 70 initial syncs, on the losses that end
/// start-up, which come just as the MTU rises; the cycle then ran at 1,200
/// bytes from there on (75% of the link instead of 82%). A real black hole
/// costs a search's lost probes (a dozen single datagrams) per cooldown.
pub const MTU_BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(2);

/// Socket buffer asked of the kernel in each direction. The default (~208 KiB)
/// holds about two dozen large packets, or about a millisecond at 1 Gbit/s:
/// when the receiving node is busy for a moment (compression on every core), a
/// burst overflows it and the kernel drops packets that already crossed the
/// network, which the congestion controller then reads as congestion. 8 MiB is
/// ~30 ms at 1 Gbit/s (the kernel counts each datagram at about twice its size). The kernel caps the request at
/// `net.core.rmem_max` / `wmem_max`, so asking never fails.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

fn size_socket_buffers(socket: &std::net::UdpSocket) {
    let socket = socket2::SockRef::from(socket);
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "could not enlarge the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "could not enlarge the UDP send buffer");
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD_BYTES);
    mtu.black_hole_cooldown(MTU_BLACK_HOLE_COOLDOWN);
    config.mtu_discovery_config(Some(mtu));
    // The constants are far below the varint limit (2^62), so these cannot fail.
    config.stream_receive_window(quinn::VarInt::from_u64(STREAM_WINDOW_BYTES).expect("window fits a QUIC varint"));
    config.receive_window(quinn::VarInt::from_u64(CONNECTION_WINDOW_BYTES).expect("window fits a QUIC varint"));
    config.send_window(STREAM_WINDOW_BYTES);
    config.congestion_controller_factory(crate::congestion::CongestionChoice::from_env().factory());
    config.keep_alive_interval(Some(KEEP_ALIVE));
    // IDLE_TIMEOUT is far below the varint limit, so the conversion cannot fail.
    config.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits a QUIC varint")));
    Arc::new(config)
}

/// A bound QUIC endpoint speaking the drmesh protocol with pinned mutual TLS.
pub struct MeshEndpoint {
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
}

impl MeshEndpoint {
    /// Binds `listen`; only nodes in `allowed` can complete a handshake with it.
    /// Must run inside a tokio runtime with IO and time (an actix arbiter is one).
    pub fn bind(identity: Arc<Identity>, listen: SocketAddr, allowed: AllowedPeers) -> Result<Self, TransportError> {
        let tls = tls::server_config(&identity, allowed)?;
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| TransportError::BadCertificate {
            what: "server TLS configuration".into(),
            reason: e.to_string(),
        })?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        // Reset key and connection-id key survive restarts (derived from the node
        // key): a restarted node recognises the ids it handed out before and
        // answers stale packets with a stateless reset, so peers reconnect at
        // once instead of after the idle timeout.
        let secret = identity.reset_secret();
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
        config
            .max_udp_payload_size(MAX_UDP_PAYLOAD_BYTES)
            .map_err(|e| TransportError::Bind {
                addr: listen,
                source: std::io::Error::other(format!("max UDP payload {MAX_UDP_PAYLOAD_BYTES}: {e}")),
            })?;
        let cid_key = u64::from_le_bytes([secret[0], secret[1], secret[2], secret[3], secret[4], secret[5], secret[6], secret[7]]);
        config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        let socket = std::net::UdpSocket::bind(listen).map_err(|source| TransportError::Bind { addr: listen, source })?;
        size_socket_buffers(&socket);
        let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Bind {
            addr: listen,
            source: std::io::Error::other("no async runtime is running"),
        })?;
        let endpoint =
            quinn::Endpoint::new(config, Some(server), socket, runtime).map_err(|source| TransportError::Bind { addr: listen, source })?;
        Ok(MeshEndpoint { endpoint, identity })
    }

    /// The address actually bound (useful when port 0 was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// A clone of the quinn endpoint, for accept loops.
    pub fn quinn(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// Dials `addr`, accepting only the node `expected` on the other end.
    pub async fn connect(&self, addr: SocketAddr, expected: NodeId) -> Result<quinn::Connection, TransportError> {
        let tls = tls::client_config(&self.identity, expected)?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::BadCertificate {
            what: "client TLS configuration".into(),
            reason: e.to_string(),
        })?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport_config());
        let connecting = self
            .endpoint
            .connect_with(client, addr, "drmesh")
            .map_err(|e| TransportError::Connect { addr, reason: crate::tls::readable(&e.to_string()) })?;
        connecting.await.map_err(|e| TransportError::Connect { addr, reason: crate::tls::readable(&e.to_string()) })
    }

    /// Closes every connection with `reason` and stops accepting.
    pub fn close(&self, reason: &str) {
        self.endpoint.close(CLOSE_NORMAL.into(), reason.as_bytes());
    }

    /// Waits until closed connections have told their peers (bounded by quinn's own timers).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// The node id of the peer of an established connection.
pub fn peer_id(connection: &quinn::Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let certs = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    node_id_of_cert(certs.first()?).ok()
}

/// Why the control stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer sent bytes that are not a valid frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The QUIC stream or connection failed.
    #[error("stream failed: {}", with_causes(.0))]
    Read(#[from] quinn::ReadError),
    /// Writing failed.
    #[error("stream write failed: {}", with_causes(.0))]
    Write(#[from] quinn::WriteError),
}

/// An error and its sources, `a: b: c`. quinn's "connection lost" alone
/// hides why the connection ended (timed out, closed by the peer with a
/// transport error, reset), which is the part worth reading.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    crate::tls::readable(&text)
}

/// Puts the chunks of an unordered stream read back in order: chunks (offset +
/// bytes) in, the contiguous bytes from the read position out. Sans-IO.
///
/// Why read unordered at all: quinn keeps a stream's out-of-order data in at
/// most 1024 separate pieces and closes the connection ("too many gaps in
/// stream buffer") when a stream holds more gaps than that. A stream with a
/// window of several bandwidth-delay products on a lossy path (or one whose
/// queue overflows in start-up and drops every few packets) easily has more
/// holes in flight. Read unordered, quinn hands every chunk over as it
/// arrives and keeps no gaps; the holes are tracked here instead, as a map
/// with no limit on their number.
///
/// Memory: quinn grants flow-control credit for bytes read unordered, so what
/// waits here behind a hole is bounded not by the stream window but by the
/// sender: at most what it has sent beyond the hole, which the replication
/// session caps (encoded bytes sent and not yet durable).
#[derive(Debug, Default)]
pub struct Reassembler {
    /// Stream offset of the next byte to hand out.
    next: u64,
    /// Chunks past `next`, by offset.
    pending: BTreeMap<u64, Bytes>,
    /// Bytes held in `pending`.
    pending_bytes: usize,
}

impl Reassembler {
    /// A reassembler whose next byte is at stream offset `start`.
    pub fn new(start: u64) -> Self {
        Reassembler { next: start, pending: BTreeMap::new(), pending_bytes: 0 }
    }

    /// Bytes held behind a hole.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Takes a chunk at `offset`; calls `out` with every run of bytes that is
    /// now contiguous, in order. Bytes already handed out are dropped.
    pub fn handle_chunk(&mut self, offset: u64, bytes: Bytes, mut out: impl FnMut(&[u8])) {
        if bytes.is_empty() {
            return;
        }
        if offset > self.next {
            // Keep the longer of two chunks at the same offset.
            let len = bytes.len();
            match self.pending.get(&offset) {
                Some(old) if old.len() >= len => {}
                Some(old) => {
                    self.pending_bytes = self.pending_bytes - old.len() + len;
                    self.pending.insert(offset, bytes);
                }
                None => {
                    self.pending_bytes += len;
                    self.pending.insert(offset, bytes);
                }
            }
            return;
        }
        self.emit(offset, bytes, &mut out);
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > self.next {
                break;
            }
            let (offset, bytes) = entry.remove_entry();
            self.pending_bytes -= bytes.len();
            self.emit(offset, bytes, &mut out);
        }
    }

    /// Hands out the part of a chunk starting at or before `next` that is new.
    fn emit(&mut self, offset: u64, bytes: Bytes, out: &mut impl FnMut(&[u8])) {
        let end = offset + bytes.len() as u64;
        if end <= self.next {
            return;
        }
        // offset <= next < end, so the skip is within the chunk.
        let skip = (self.next - offset) as usize;
        out(&bytes[skip..]);
        self.next = end;
    }
}

/// Reads framed messages from a QUIC receive stream.
pub struct MessageReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// Set when the stream is read unordered.
    reassembler: Option<Reassembler>,
}

impl MessageReader {
    /// Wraps a control stream ([`Message`] frames of at most 1 MiB).
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self::with_limit(recv, wire::MAX_FRAME_BYTES)
    }

    /// Wraps a stream whose frames may be up to `max` bytes.
    pub fn with_limit(recv: quinn::RecvStream, max: usize) -> Self {
        MessageReader { recv, decoder: FrameDecoder::with_limit(max), reassembler: None }
    }

    /// Wraps a bulk stream whose frames may be up to `max` bytes, read
    /// unordered and put back in order here (see [`Reassembler`] for why);
    /// `already_read` bytes were read from it before
    /// ([`wire::StreamHeader::DATA_BYTES`] after [`read_stream_header`] of a
    /// data stream, 0 on a stream this side opened).
    pub fn unordered(recv: quinn::RecvStream, max: usize, already_read: u64) -> Self {
        MessageReader { recv, decoder: FrameDecoder::with_limit(max), reassembler: Some(Reassembler::new(already_read)) }
    }

    /// The next control message, `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Message>, StreamError> {
        self.next_frame().await
    }

    /// The next frame of any wire type, `Ok(None)` at a clean end of stream.
    pub async fn next_frame<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(message) = self.decoder.poll_frame()? {
                return Ok(Some(message));
            }
            let ordered = self.reassembler.is_none();
            match self.recv.read_chunk(1 << 20, ordered).await? {
                Some(chunk) => match self.reassembler.as_mut() {
                    Some(r) => {
                        let decoder = &mut self.decoder;
                        r.handle_chunk(chunk.offset, chunk.bytes, |b| decoder.handle_bytes(b));
                    }
                    None => self.decoder.handle_bytes(&chunk.bytes),
                },
                None => {
                    // quinn ends an unordered stream only once every byte up to
                    // its final size was read, so no hole is left here.
                    self.decoder.handle_end()?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Writes one framed control message.
pub async fn send_message(send: &mut quinn::SendStream, message: &Message) -> Result<(), StreamError> {
    send.write_all(&wire::encode(message)).await?;
    Ok(())
}

/// Writes one framed data-stream message (up to [`wire::MAX_DATA_FRAME_BYTES`]).
pub async fn send_frame<T: serde::Serialize>(send: &mut quinn::SendStream, message: &T) -> Result<(), StreamError> {
    send_frame_with_limit(send, message, wire::MAX_DATA_FRAME_BYTES).await
}

/// Writes one framed message of up to `max` bytes (peers must read with the same limit).
pub async fn send_frame_with_limit<T: serde::Serialize>(send: &mut quinn::SendStream, message: &T, max: usize) -> Result<(), StreamError> {
    // Handing quinn the encoded frame as owned bytes saves copying every blob
    // payload once more into its send buffer.
    send.write_chunk(bytes::Bytes::from(wire::encode_frame(message, max))).await?;
    Ok(())
}

/// Opens a stream whose first bytes are `header`.
pub async fn open_stream(connection: &quinn::Connection, header: wire::StreamHeader) -> Result<(quinn::SendStream, quinn::RecvStream), StreamError> {
    let (mut send, recv) = connection.open_bi().await.map_err(|e| StreamError::Write(quinn::WriteError::ConnectionLost(e)))?;
    send.write_all(&header.encode()).await?;
    Ok((send, recv))
}

/// Reads the header of a stream the peer opened: `None` when its first byte
/// names no stream kind.
pub async fn read_stream_header(recv: &mut quinn::RecvStream) -> Result<Option<wire::StreamHeader>, StreamError> {
    async fn exact(recv: &mut quinn::RecvStream, buf: &mut [u8], buffered: usize) -> Result<(), StreamError> {
        recv.read_exact(buf).await.map_err(|e| match e {
            quinn::ReadExactError::ReadError(e) => StreamError::Read(e),
            quinn::ReadExactError::FinishedEarly(_) => StreamError::Wire(WireError::Truncated { buffered }),
        })
    }
    let mut byte = [0u8; 1];
    exact(recv, &mut byte, 0).await?;
    let Some(kind) = wire::StreamKind::from_byte(byte[0]) else {
        return Ok(None);
    };
    if kind == wire::StreamKind::Control {
        return Ok(Some(wire::StreamHeader::control()));
    }
    let mut version = [0u8; 2];
    exact(recv, &mut version, 1).await?;
    Ok(Some(wire::StreamHeader::data(kind, u16::from_be_bytes(version))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut Reassembler, offset: u64, data: &[u8], out: &mut Vec<u8>) {
        r.handle_chunk(offset, Bytes::copy_from_slice(data), |b| out.extend_from_slice(b));
    }

    #[test]
    fn reassembles_out_of_order_overlapping_and_duplicate_chunks() {
        let data: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
        // The stream's first byte (the kind) was read before: start at 1.
        let mut r = Reassembler::new(1);
        let mut out = Vec::new();
        feed(&mut r, 50, &data[50..80], &mut out);
        feed(&mut r, 120, &data[120..200], &mut out);
        assert!(out.is_empty(), "nothing is contiguous yet");
        assert_eq!(r.pending_bytes(), 30 + 80);
        feed(&mut r, 1, &data[1..20], &mut out);
        assert_eq!(out, &data[1..20]);
        // Overlapping the delivered part and the pending chunk; a duplicate.
        feed(&mut r, 10, &data[10..60], &mut out);
        feed(&mut r, 50, &data[50..80], &mut out);
        assert_eq!(out, &data[1..80]);
        // A shorter duplicate at a pending offset keeps the longer chunk.
        feed(&mut r, 120, &data[120..130], &mut out);
        feed(&mut r, 80, &data[80..120], &mut out);
        assert_eq!(out, &data[1..200]);
        assert_eq!(r.pending_bytes(), 0);
        // Old data after the fact changes nothing.
        feed(&mut r, 0, &data[0..150], &mut out);
        assert_eq!(out, &data[1..200]);
    }

    #[test]
    fn many_holes_at_once() {
        // 10,000 holes (more than quinn's 1024 per stream) filled in reverse.
        let mut r = Reassembler::new(0);
        let mut out = Vec::new();
        for i in (1..20_000u64).step_by(2) {
            feed(&mut r, i * 10, &[i as u8; 10], &mut out);
        }
        assert!(out.is_empty());
        let evens: Vec<u64> = (0..20_000u64).step_by(2).collect();
        for &i in evens.iter().rev() {
            feed(&mut r, i * 10, &[i as u8; 10], &mut out);
        }
        assert_eq!(out.len(), 200_000);
        assert!(out.chunks(10).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8)));
        assert_eq!(r.pending_bytes(), 0);
    }
}

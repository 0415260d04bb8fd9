//! The node's QUIC endpoint: one UDP socket that both accepts peers and dials them.
//!
//! Dialing out from the same socket that accepts means a node behind NAT opens a
//! connection that then carries traffic both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

/// Largest UDP payload path-MTU discovery probes for: a 9000-byte jumbo frame
/// minus IPv6 and UDP headers. Links with a 1500-byte MTU settle at 1452 as
/// before; LANs with jumbo frames and loopback send 6x fewer packets.
pub const MTU_UPPER_BOUND: u16 = 8952;

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config.keep_alive_interval(Some(KEEP_ALIVE));
    // IDLE_TIMEOUT is far below the varint limit, so the conversion cannot fail.
    config.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits a QUIC varint")));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    config.mtu_discovery_config(Some(mtu));
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
        let cid_key = u64::from_le_bytes([secret[0], secret[1], secret[2], secret[3], secret[4], secret[5], secret[6], secret[7]]);
        config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        let socket = std::net::UdpSocket::bind(listen).map_err(|source| TransportError::Bind { addr: listen, source })?;
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
            .map_err(|e| TransportError::Connect { addr, reason: e.to_string() })?;
        connecting.await.map_err(|e| TransportError::Connect { addr, reason: e.to_string() })
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
    #[error("stream failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Reads framed messages from a QUIC receive stream.
pub struct MessageReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl MessageReader {
    /// Wraps a control stream ([`Message`] frames of at most 1 MiB).
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self::with_limit(recv, wire::MAX_FRAME_BYTES)
    }

    /// Wraps a stream whose frames may be up to `max` bytes.
    pub fn with_limit(recv: quinn::RecvStream, max: usize) -> Self {
        MessageReader { recv, decoder: FrameDecoder::with_limit(max) }
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
            match self.recv.read_chunk(1 << 20, true).await? {
                Some(chunk) => self.decoder.handle_bytes(&chunk.bytes),
                None => {
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
    send.write_all(&wire::encode_frame(message, wire::MAX_DATA_FRAME_BYTES)).await?;
    Ok(())
}

/// Writes one framed message of up to `max` bytes (peers must read with the same limit).
pub async fn send_frame_with_limit<T: serde::Serialize>(send: &mut quinn::SendStream, message: &T, max: usize) -> Result<(), StreamError> {
    send.write_all(&wire::encode_frame(message, max)).await?;
    Ok(())
}

/// Opens a stream of `kind` (its first byte says which).
pub async fn open_stream(connection: &quinn::Connection, kind: wire::StreamKind) -> Result<(quinn::SendStream, quinn::RecvStream), StreamError> {
    let (mut send, recv) = connection.open_bi().await.map_err(|e| StreamError::Write(quinn::WriteError::ConnectionLost(e)))?;
    send.write_all(&[kind as u8]).await?;
    Ok((send, recv))
}

/// Reads the kind byte of a stream the peer opened.
pub async fn read_stream_kind(recv: &mut quinn::RecvStream) -> Result<Option<wire::StreamKind>, StreamError> {
    let mut byte = [0u8; 1];
    recv.read_exact(&mut byte).await.map_err(|e| match e {
        quinn::ReadExactError::ReadError(e) => StreamError::Read(e),
        quinn::ReadExactError::FinishedEarly(_) => StreamError::Wire(WireError::Truncated { buffered: 0 }),
    })?;
    Ok(wire::StreamKind::from_byte(byte[0]))
}

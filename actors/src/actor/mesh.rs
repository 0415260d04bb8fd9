//! The mesh actor: keeps this node connected to its peers.
//!
//! It owns the QUIC endpoint and the [`PeerTable`]; it feeds the table real time,
//! handshake results and topology updates, and carries out what the table asks
//! (dial, close). Each live connection has a small task that speaks the control
//! stream (hello, ping) and reports back to the actor when the connection ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use drmesh_topology::{NodeId, Topology};
use drmesh_transport::congestion::closing;
use drmesh_transport::endpoint::{self, peer_id, MessageReader, StreamError, CLOSE_NORMAL, CLOSE_PROTOCOL};
use drmesh_transport::wire::{Hello, Message, StreamHeader, StreamKind, PROTOCOL_VERSION};
use drmesh_transport::{AllowedPeers, Identity, MeshEndpoint, TransportError};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::proto::peers::{ConnId, Direction, LinkState, PeerAction, PeerSpec, PeerTable};

/// How often the actor polls the peer table for due dials.
const TICK: Duration = Duration::from_millis(100);
/// Messages queued per connection before the sender waits (bounded memory).
const CONTROL_QUEUE: usize = 16;
/// Longest wait for peers to receive our close on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The software version sent in hellos.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the mesh actor could not start or take a topology; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// This node's id is not listed in the topology.
    #[error("this node's id {id} is not in topology {path}; add the [[node]] block printed by `drmesh init`, or run with the state dir that matches")]
    NotInTopology {
        /// This node's id.
        id: NodeId,
        /// The topology file.
        path: String,
    },
    /// The endpoint could not be opened.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Serves the data streams peers open (replication sessions, fetches). The mesh
/// actor hands each accepted stream over after reading its header.
pub trait StreamService: Send + Sync + 'static {
    /// Takes over a data stream opened by `peer` whose header (read) is
    /// `header`; must not block (spawn the work).
    fn serve(&self, header: StreamHeader, peer: NodeId, send: quinn::SendStream, recv: quinn::RecvStream);
}

/// Receives the gossip datagrams peers send on their authenticated QUIC
/// connections (never a plain UDP socket), and hears of new connections.
pub trait DatagramService: Send + Sync + 'static {
    /// A datagram (or a datagram carried on a one-shot unidirectional stream) from `peer`; must not block.
    fn datagram(&self, peer: NodeId, bytes: bytes::Bytes);
    /// A connection to `peer` was established.
    fn connected(&self, _peer: NodeId) {}
}

/// Largest gossip payload accepted on the unidirectional-stream fallback.
const GOSSIP_STREAM_BYTES_MAX: usize = 1200;

struct Connection {
    conn: quinn::Connection,
    peer: NodeId,
    outbox: mpsc::Sender<Message>,
}

/// The mesh actor.
pub struct MeshActor {
    identity: Arc<Identity>,
    topology: Arc<Topology>,
    allowed: AllowedPeers,
    endpoint: Arc<MeshEndpoint>,
    table: PeerTable,
    connections: HashMap<ConnId, Connection>,
    hellos: HashMap<NodeId, Hello>,
    next_conn: ConnId,
    started: Instant,
    service: Option<Arc<dyn StreamService>>,
    datagrams: Arc<OnceLock<Arc<dyn DatagramService>>>,
    /// UDP bytes (sent, received) of each peer's ended connections.
    ended_traffic: HashMap<NodeId, (u64, u64)>,
}

fn peer_specs(local: NodeId, topology: &Topology) -> Vec<PeerSpec> {
    let local_has_addresses = topology.node_by_id(&local).is_some_and(|n| !n.addresses.is_empty());
    topology
        .nodes
        .iter()
        .filter(|n| n.id != local)
        .map(|n| PeerSpec {
            id: n.id,
            name: n.name.clone(),
            addresses: n.addresses.clone(),
            dial: PeerSpec::dial_rule(local, local_has_addresses, n.id, !n.addresses.is_empty()),
        })
        .collect()
}

fn check_listed(identity: &Identity, topology: &Topology) -> Result<SocketAddr, MeshError> {
    topology.node_by_id(&identity.node_id()).map(|n| n.listen).ok_or_else(|| MeshError::NotInTopology {
        id: identity.node_id(),
        path: topology.path().display().to_string(),
    })
}

impl MeshActor {
    /// Binds the endpoint on this node's `listen` address and starts the actor.
    /// Must be called inside a running actix system.
    pub fn start_with(
        identity: Arc<Identity>,
        topology: Arc<Topology>,
        service: Option<Arc<dyn StreamService>>,
    ) -> Result<Addr<MeshActor>, MeshError> {
        let listen = check_listed(&identity, &topology)?;
        let allowed = AllowedPeers::new(topology.nodes.iter().map(|n| n.id));
        let endpoint = Arc::new(MeshEndpoint::bind(identity.clone(), listen, allowed.clone())?);
        tracing::info!(listen = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "QUIC endpoint open");
        let table = PeerTable::new(identity.node_id());
        Ok(MeshActor {
            identity,
            topology,
            allowed,
            endpoint,
            table,
            connections: HashMap::new(),
            hellos: HashMap::new(),
            next_conn: 1,
            started: Instant::now(),
            service,
            datagrams: Arc::new(OnceLock::new()),
            ended_traffic: HashMap::new(),
        }
        .start())
    }

    fn local_name(&self) -> String {
        self.topology.node_by_id(&self.identity.node_id()).map(|n| n.name.clone()).unwrap_or_default()
    }

    fn hello(&self) -> Message {
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.to_string(),
            node_name: self.local_name(),
            topology_version: self.topology.mesh.version,
            topology_hash: self.topology.hash(),
        })
    }

    fn peer_name(&self, id: &NodeId) -> String {
        self.table.get(id).map(|e| e.spec.name.clone()).unwrap_or_else(|| id.short())
    }

    fn drive(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        while let Some(action) = self.table.poll_action(now) {
            match action {
                PeerAction::Dial { id, addresses } => self.dial(ctx, id, addresses),
                PeerAction::Close { id, conn, reason } => {
                    if let Some(c) = self.connections.get(&conn) {
                        tracing::info!(peer = %self.peer_name(&id), %reason, "closing connection");
                        let code = if reason.contains("duplicate") || reason.contains("replaced") { endpoint::CLOSE_DUPLICATE } else { endpoint::CLOSE_NORMAL };
                        closing::close(&c.conn, code, reason.as_bytes());
                    }
                }
            }
        }
    }

    fn dial(&mut self, ctx: &mut Context<Self>, id: NodeId, addresses: Vec<String>) {
        let endpoint = self.endpoint.clone();
        let me = ctx.address();
        tracing::debug!(peer = %self.peer_name(&id), ?addresses, "dialing");
        actix_rt::spawn(async move {
            let mut errors = Vec::new();
            for address in &addresses {
                let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(address.as_str()).await {
                    Ok(addrs) => addrs.collect(),
                    Err(e) => {
                        errors.push(format!("{address}: cannot resolve: {e}"));
                        continue;
                    }
                };
                if resolved.is_empty() {
                    errors.push(format!("{address}: no address found"));
                }
                // A name may resolve to several addresses (IPv6 and IPv4); try each.
                for addr in resolved {
                    match endpoint.connect(addr, id).await {
                        Ok(conn) => {
                            me.do_send(Established { conn, direction: Direction::Outbound, expected: Some(id) });
                            return;
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
            }
            if addresses.is_empty() {
                errors.push("no addresses to dial".into());
            }
            me.do_send(DialFailed { id, error: errors.join("; ") });
        });
    }

    fn spawn_connection(&mut self, ctx: &mut Context<Self>, conn_id: ConnId, conn: quinn::Connection, peer: NodeId, direction: Direction) {
        let (outbox, inbox) = mpsc::channel(CONTROL_QUEUE);
        self.connections.insert(conn_id, Connection { conn: conn.clone(), peer, outbox });
        let me = ctx.address();
        let hello = self.hello();
        let name = self.peer_name(&peer);
        let service = self.service.clone();
        let datagrams = self.datagrams.clone();
        if let Some(d) = datagrams.get() {
            d.connected(peer);
        }
        actix_rt::spawn(async move {
            let (control_tx, control_rx) = tokio::sync::oneshot::channel();
            let accepting = accept_streams(conn.clone(), peer, control_tx, service);
            tokio::select! {
                result = control_stream(&conn, direction, hello, inbox, &me, peer, conn_id, control_rx) => {
                    if let Err(reason) = result {
                        tracing::warn!(peer = %name, %reason, "closing connection: peer broke the protocol");
                        closing::close(&conn, CLOSE_PROTOCOL, reason.as_bytes());
                    }
                }
                result = accepting => {
                    if let Err(reason) = result {
                        tracing::warn!(peer = %name, %reason, "closing connection: peer broke the protocol");
                        closing::close(&conn, CLOSE_PROTOCOL, reason.as_bytes());
                    }
                }
                _ = gossip_inbound(conn.clone(), peer, datagrams) => {}
                _ = conn.closed() => {}
            }
            let reason = conn.closed().await;
            me.do_send(Closed { peer, conn_id, reason: drmesh_transport::tls::readable(&reason.to_string()) });
        });
    }
}

type StreamPair = (quinn::SendStream, quinn::RecvStream);

/// Hands the peer's gossip datagrams (and unidirectional streams, the fallback
/// for a datagram larger than the path allows) to the datagram service. Never
/// returns while the connection lives.
async fn gossip_inbound(conn: quinn::Connection, peer: NodeId, datagrams: Arc<OnceLock<Arc<dyn DatagramService>>>) {
    loop {
        tokio::select! {
            datagram = conn.read_datagram() => match datagram {
                Ok(bytes) => {
                    if let Some(d) = datagrams.get() {
                        d.datagram(peer, bytes);
                    }
                }
                Err(_) => break,
            },
            stream = conn.accept_uni() => match stream {
                Ok(mut recv) => {
                    let datagrams = datagrams.clone();
                    actix_rt::spawn(async move {
                        if let (Ok(bytes), Some(d)) = (recv.read_to_end(GOSSIP_STREAM_BYTES_MAX).await, datagrams.get()) {
                            d.datagram(peer, bytes.into());
                        }
                    });
                }
                Err(_) => break,
            },
        }
    }
    // The connection ended; the caller learns why from `closed()`.
    std::future::pending::<()>().await;
}

/// Accepts the streams the peer opens: the first control stream goes to the
/// control task, data streams to the service. Returns `Err` on a protocol violation.
async fn accept_streams(
    conn: quinn::Connection,
    peer: NodeId,
    control: tokio::sync::oneshot::Sender<StreamPair>,
    service: Option<Arc<dyn StreamService>>,
) -> Result<(), String> {
    let mut control = Some(control);
    loop {
        let Ok((send, mut recv)) = conn.accept_bi().await else {
            // The connection ended; the caller learns why from `closed()`.
            std::future::pending::<()>().await;
            return Ok(());
        };
        let header = endpoint::read_stream_header(&mut recv).await.map_err(|e| format!("stream header: {e}"))?;
        match (header, control.take(), &service) {
            (Some(StreamHeader { kind: StreamKind::Control, .. }), Some(tx), _) => {
                let _ = tx.send((send, recv));
            }
            (Some(StreamHeader { kind: StreamKind::Control, .. }), None, _) => return Err("a second control stream".into()),
            (Some(header), c, Some(service)) => {
                control = c;
                service.serve(header, peer, send, recv);
            }
            (Some(StreamHeader { kind, .. }), c, None) => {
                control = c;
                tracing::debug!(?kind, "refusing a data stream: this node serves none");
            }
            (None, _, _) => return Err("unknown stream kind".into()),
        }
    }
}

/// Runs the control stream of one connection until it ends; `Err` is a protocol violation.
#[allow(clippy::too_many_arguments)] // one call site; the arguments are the connection's parts
async fn control_stream(
    conn: &quinn::Connection,
    direction: Direction,
    hello: Message,
    mut inbox: mpsc::Receiver<Message>,
    me: &Addr<MeshActor>,
    peer: NodeId,
    conn_id: ConnId,
    accepted: tokio::sync::oneshot::Receiver<StreamPair>,
) -> Result<(), String> {
    let (mut send, recv) = match direction {
        Direction::Outbound => endpoint::open_stream(conn, StreamHeader::control()).await.map_err(|e| format!("control stream: {e}"))?,
        Direction::Inbound => accepted.await.map_err(|_| "connection ended before its control stream".to_string())?,
    };
    if endpoint::send_message(&mut send, &hello).await.is_err() {
        return Ok(());
    }
    let mut reader = MessageReader::new(recv);
    loop {
        tokio::select! {
            received = reader.next() => match received {
                // Bad bytes are a protocol violation; a stream that merely ends or breaks is a lost connection.
                Err(StreamError::Wire(e)) => return Err(e.to_string()),
                Err(_) => return Ok(()),
                Ok(received) => match received {
                Some(Message::Hello(hello)) => {
                    if hello.protocol_version != PROTOCOL_VERSION {
                        return Err(format!(
                            "peer speaks protocol version {}, this node speaks {PROTOCOL_VERSION}; upgrade the older node",
                            hello.protocol_version
                        ));
                    }
                    me.do_send(PeerHello { peer, conn_id, hello });
                }
                Some(Message::Ping { nonce }) => {
                    if endpoint::send_message(&mut send, &Message::Pong { nonce }).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Message::Pong { .. }) => {}
                Some(Message::Goodbye { reason }) => {
                    tracing::info!(%reason, "peer said goodbye");
                    return Ok(());
                }
                None => return Ok(()),
            }},
            outgoing = inbox.recv() => match outgoing {
                Some(message) => {
                    if endpoint::send_message(&mut send, &message).await.is_err() {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            },
        }
    }
}

impl Actor for MeshActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let specs = peer_specs(self.identity.node_id(), &self.topology);
        self.table.handle_topology(Instant::now(), specs);
        let endpoint = self.endpoint.quinn();
        let me = ctx.address();
        actix_rt::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let me = me.clone();
                let remote = incoming.remote_address();
                actix_rt::spawn(async move {
                    match incoming.await {
                        Ok(conn) => me.do_send(Established { conn, direction: Direction::Inbound, expected: None }),
                        Err(e) => tracing::warn!(%remote, reason = %drmesh_transport::tls::readable(&e.to_string()), "refused incoming connection"),
                    }
                });
            }
        });
        ctx.run_interval(TICK, |act, ctx| act.drive(ctx));
        self.drive(ctx);
    }
}

/// A handshake finished (either direction).
#[derive(Message)]
#[rtype(result = "()")]
struct Established {
    conn: quinn::Connection,
    direction: Direction,
    expected: Option<NodeId>,
}

impl Handler<Established> for MeshActor {
    type Result = ();

    fn handle(&mut self, msg: Established, ctx: &mut Context<Self>) {
        let Some(peer) = peer_id(&msg.conn) else {
            closing::close(&msg.conn, CLOSE_PROTOCOL, b"no peer certificate");
            return;
        };
        debug_assert!(msg.expected.is_none_or(|e| e == peer), "TLS pinning let in another node");
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let now = Instant::now();
        // The current connection may have ended without the mesh knowing yet
        // (its `Closed` is on its way): typically the peer restarted and this
        // is its new incarnation. Report the end first, so the new connection
        // takes its place whichever side dialed it.
        if let Some(LinkState::Connected { conn: old, .. }) = self.table.get(&peer).map(|e| e.state.clone()) {
            if let Some(reason) = self.connections.get(&old).and_then(|c| c.conn.close_reason()) {
                let reason = drmesh_transport::tls::readable(&reason.to_string());
                tracing::info!(peer = %self.peer_name(&peer), %reason, "previous connection already ended");
                self.hellos.remove(&peer);
                self.table.handle_closed(now, peer, old, reason);
            }
        }
        // Register before the table may ask to close it as a duplicate.
        if self.table.handle_connected(now, peer, conn_id, msg.direction) {
            tracing::info!(peer = %self.peer_name(&peer), remote = %msg.conn.remote_address(), direction = ?msg.direction, "peer connected");
            self.spawn_connection(ctx, conn_id, msg.conn, peer, msg.direction);
        } else {
            self.connections.insert(conn_id, Connection { conn: msg.conn, peer, outbox: mpsc::channel(1).0 });
        }
        self.drive(ctx);
    }
}

/// A dial failed on every address.
#[derive(Message)]
#[rtype(result = "()")]
struct DialFailed {
    id: NodeId,
    error: String,
}

impl Handler<DialFailed> for MeshActor {
    type Result = ();

    fn handle(&mut self, msg: DialFailed, _ctx: &mut Context<Self>) {
        tracing::debug!(peer = %self.peer_name(&msg.id), error = %msg.error, "dial failed");
        self.table.handle_dial_failed(Instant::now(), msg.id, msg.error);
    }
}

/// A connection ended.
#[derive(Message)]
#[rtype(result = "()")]
struct Closed {
    peer: NodeId,
    conn_id: ConnId,
    reason: String,
}

impl Handler<Closed> for MeshActor {
    type Result = ();

    fn handle(&mut self, msg: Closed, ctx: &mut Context<Self>) {
        if let Some(ended) = self.connections.remove(&msg.conn_id) {
            let stats = ended.conn.stats();
            let total = self.ended_traffic.entry(ended.peer).or_default();
            total.0 += stats.udp_tx.bytes;
            total.1 += stats.udp_rx.bytes;
        }
        let current = matches!(self.table.get(&msg.peer).map(|e| &e.state), Some(LinkState::Connected { conn, .. }) if *conn == msg.conn_id);
        if current {
            tracing::info!(peer = %self.peer_name(&msg.peer), reason = %msg.reason, "peer disconnected");
            self.hellos.remove(&msg.peer);
        }
        self.table.handle_closed(Instant::now(), msg.peer, msg.conn_id, msg.reason);
        self.drive(ctx);
    }
}

/// A peer introduced itself.
#[derive(Message)]
#[rtype(result = "()")]
struct PeerHello {
    peer: NodeId,
    conn_id: ConnId,
    hello: Hello,
}

impl Handler<PeerHello> for MeshActor {
    type Result = ();

    fn handle(&mut self, msg: PeerHello, _ctx: &mut Context<Self>) {
        if msg.hello.topology_hash != self.topology.hash() {
            tracing::warn!(
                peer = %self.peer_name(&msg.peer),
                peer_topology_version = msg.hello.topology_version,
                local_topology_version = self.topology.mesh.version,
                "peer runs a different topology file"
            );
        }
        if self.connections.contains_key(&msg.conn_id) {
            self.table.handle_hello(msg.peer, msg.conn_id);
            self.hellos.insert(msg.peer, msg.hello);
        }
    }
}

/// Replace the topology in force. The caller has validated the file; this
/// refuses only a topology that no longer lists this node, and then keeps the old one.
#[derive(Message)]
#[rtype(result = "Result<(), MeshError>")]
pub struct ApplyTopology(pub Arc<Topology>);

impl Handler<ApplyTopology> for MeshActor {
    type Result = Result<(), MeshError>;

    fn handle(&mut self, msg: ApplyTopology, ctx: &mut Context<Self>) -> Self::Result {
        let listen = check_listed(&self.identity, &msg.0)?;
        let old_listen = check_listed(&self.identity, &self.topology).ok();
        if old_listen != Some(listen) {
            tracing::warn!(%listen, "this node's listen address changed; it takes effect at the next restart");
        }
        self.topology = msg.0;
        self.allowed.replace(self.topology.nodes.iter().map(|n| n.id));
        let specs = peer_specs(self.identity.node_id(), &self.topology);
        self.table.handle_topology(Instant::now(), specs);
        // Tell connected peers which topology we now run.
        let hello = self.hello();
        for c in self.connections.values() {
            let _ = c.outbox.try_send(hello.clone());
        }
        self.drive(ctx);
        Ok(())
    }
}

/// One peer as shown by `drmesh ctl peers`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Topology name.
    pub name: String,
    /// Full node id.
    pub id: String,
    /// `connected`, `dialing`, `backoff` or `waiting`.
    pub state: &'static str,
    /// `outbound` or `inbound` when connected.
    pub direction: Option<&'static str>,
    /// Remote socket address when connected.
    pub remote: Option<String>,
    /// Smoothed round-trip time in milliseconds when connected.
    pub rtt_ms: Option<f64>,
    /// Seconds since the connection was established.
    pub connected_secs: Option<u64>,
    /// Seconds until the next dial, in backoff.
    pub retry_in_secs: Option<f64>,
    /// Connections established so far.
    pub connect_count: u64,
    /// UDP bytes sent to the peer since this node started (all connections).
    pub sent_bytes: u64,
    /// UDP bytes received from the peer since this node started.
    pub received_bytes: u64,
    /// Last dial or connection error.
    pub last_error: Option<String>,
    /// The peer's drmesh version, from its hello.
    pub software_version: Option<String>,
    /// The peer's `[mesh] version`.
    pub topology_version: Option<u64>,
    /// Short hash of the peer's topology file.
    pub topology_hash: Option<String>,
    /// Whether the peer runs the same topology file as this node.
    pub topology_matches: Option<bool>,
}

/// What `drmesh ctl status` shows about the mesh side of this node.
#[derive(Debug, Clone, Serialize)]
pub struct MeshStatus {
    /// This node's id.
    pub node_id: String,
    /// This node's name.
    pub name: String,
    /// drmesh version.
    pub software_version: &'static str,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Bound QUIC address.
    pub listen: Option<String>,
    /// `[mesh] name`.
    pub mesh: String,
    /// `[mesh] version` in force.
    pub topology_version: u64,
    /// Short hash of the topology file in force.
    pub topology_hash: String,
    /// Path of the topology file.
    pub topology_path: String,
    /// Every peer of the topology.
    pub peers: Vec<PeerStatus>,
}

/// Asks for a [`MeshStatus`].
#[derive(Message)]
#[rtype(result = "MeshStatus")]
pub struct GetStatus;

fn hex_short(hash: &[u8; 32]) -> String {
    hash.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

impl Handler<GetStatus> for MeshActor {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _msg: GetStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        let peers = self
            .table
            .peers()
            .map(|entry| {
                let hello = self.hellos.get(&entry.spec.id);
                let (mut sent_bytes, mut received_bytes) = self.ended_traffic.get(&entry.spec.id).copied().unwrap_or_default();
                for c in self.connections.values().filter(|c| c.peer == entry.spec.id) {
                    let stats = c.conn.stats();
                    sent_bytes += stats.udp_tx.bytes;
                    received_bytes += stats.udp_rx.bytes;
                }
                let mut status = PeerStatus {
                    name: entry.spec.name.clone(),
                    id: entry.spec.id.to_string(),
                    state: "waiting",
                    direction: None,
                    remote: None,
                    rtt_ms: None,
                    connected_secs: None,
                    retry_in_secs: None,
                    connect_count: entry.connect_count,
                    sent_bytes,
                    received_bytes,
                    last_error: entry.last_error.clone(),
                    software_version: hello.map(|h| h.software_version.clone()),
                    topology_version: hello.map(|h| h.topology_version),
                    topology_hash: hello.map(|h| hex_short(&h.topology_hash)),
                    topology_matches: hello.map(|h| h.topology_hash == self.topology.hash()),
                };
                match &entry.state {
                    LinkState::Waiting => {}
                    LinkState::Dialing { .. } => status.state = "dialing",
                    LinkState::Backoff { until, .. } => {
                        status.state = "backoff";
                        status.retry_in_secs = Some(until.saturating_duration_since(now).as_secs_f64());
                    }
                    LinkState::Connected { conn, direction, since } => {
                        status.state = "connected";
                        status.direction = Some(match direction {
                            Direction::Outbound => "outbound",
                            Direction::Inbound => "inbound",
                        });
                        status.connected_secs = Some(now.saturating_duration_since(*since).as_secs());
                        if let Some(c) = self.connections.get(conn) {
                            status.rtt_ms = Some(c.conn.rtt().as_secs_f64() * 1000.0);
                            status.remote = Some(c.conn.remote_address().to_string());
                            debug_assert_eq!(c.peer, entry.spec.id);
                        }
                    }
                }
                status
            })
            .collect();
        MessageResult(MeshStatus {
            node_id: self.identity.node_id().to_string(),
            name: self.local_name(),
            software_version: SOFTWARE_VERSION,
            uptime_secs: now.saturating_duration_since(self.started).as_secs(),
            listen: self.endpoint.local_addr().map(|a| a.to_string()),
            mesh: self.topology.mesh.name.clone(),
            topology_version: self.topology.mesh.version,
            topology_hash: hex_short(&self.topology.hash()),
            topology_path: self.topology.path().display().to_string(),
            peers,
        })
    }
}

/// Asks for the live connection to a peer, by node name: `None` while it is
/// not connected, or its connection has closed and no new one is up yet.
#[derive(Message)]
#[rtype(result = "Option<(NodeId, quinn::Connection)>")]
pub struct GetConnection(pub String);

impl Handler<GetConnection> for MeshActor {
    type Result = Option<(NodeId, quinn::Connection)>;

    fn handle(&mut self, msg: GetConnection, _ctx: &mut Context<Self>) -> Self::Result {
        let entry = self.table.peers().find(|e| e.spec.name == msg.0)?;
        match entry.state {
            // A connection that already closed (a restarted peer answered it
            // with a reset, say) is not handed out while its `Closed` is on
            // the way: the caller waits for the new one instead of failing on it.
            LinkState::Connected { conn, .. } => {
                self.connections.get(&conn).filter(|c| c.conn.close_reason().is_none()).map(|c| (entry.spec.id, c.conn.clone()))
            }
            _ => None,
        }
    }
}

/// Installs the service that receives gossip datagrams (once; later calls are ignored).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDatagramService(pub Arc<dyn DatagramService>);

impl Handler<SetDatagramService> for MeshActor {
    type Result = ();

    fn handle(&mut self, msg: SetDatagramService, _ctx: &mut Context<Self>) {
        let _ = self.datagrams.set(msg.0);
    }
}

/// Sends gossip datagrams `(to, bytes)` on the live connections to those peers;
/// a datagram to a peer without a live connection is dropped (gossip copes with loss).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendDatagrams(pub Vec<(NodeId, Vec<u8>)>);

impl Handler<SendDatagrams> for MeshActor {
    type Result = ();

    fn handle(&mut self, msg: SendDatagrams, _ctx: &mut Context<Self>) {
        for (to, bytes) in msg.0 {
            let Some(LinkState::Connected { conn, .. }) = self.table.get(&to).map(|e| &e.state) else {
                continue;
            };
            let Some(c) = self.connections.get(conn) else {
                continue;
            };
            let bytes = bytes::Bytes::from(bytes);
            match c.conn.send_datagram(bytes.clone()) {
                Ok(()) | Err(quinn::SendDatagramError::ConnectionLost(_)) => {}
                // Larger than the path allows yet (MTU discovery pending), or datagrams
                // disabled: carry it on a one-shot unidirectional stream instead.
                Err(_) => {
                    let conn = c.conn.clone();
                    actix_rt::spawn(async move {
                        if let Ok(mut send) = conn.open_uni().await {
                            if send.write_all(&bytes).await.is_ok() {
                                let _ = send.finish();
                            }
                        }
                    });
                }
            }
        }
    }
}

/// Closes every connection (peers see an orderly close) and stops the actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for MeshActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        tracing::info!("closing all peer connections");
        for c in self.connections.values() {
            let _ = c.outbox.try_send(Message::Goodbye { reason: "node shutting down".into() });
            closing::close(&c.conn, CLOSE_NORMAL, b"node shutting down");
        }
        self.endpoint.close("node shutting down");
        ctx.stop();
        let endpoint = self.endpoint.clone();
        Box::pin(async move {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
        })
    }
}

//! The peer table: which peers a node keeps connected, and when to dial them.
//!
//! Exactly one side of each pair dials (see [`PeerSpec::dial`]), so two nodes
//! never race to open two connections. The dialing side retries with
//! exponential backoff. A new connection from the same direction replaces the
//! old one (the peer restarted and the old connection has not timed out yet);
//! if connections exist in both directions (topologies that disagree for a
//! while), the one dialed by the lower node id wins on both sides, so both ends
//! keep the same connection.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use drmesh_topology::NodeId;

/// Local handle of one QUIC connection, unique for the life of the node.
pub type ConnId = u64;

/// First retry delay after a failed dial or a lost connection.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest delay between two dial attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the backoff; shorter ones (a peer
/// that accepts the handshake and then refuses us) keep it growing.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// What the topology says about one peer, as far as connecting is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer's id, pinned during the handshake.
    pub id: NodeId,
    /// The peer's name in the topology.
    pub name: String,
    /// Addresses to dial, `host:port`, tried in order.
    pub addresses: Vec<String>,
    /// Whether this node dials the peer (otherwise it waits for the peer to dial).
    pub dial: bool,
}

impl PeerSpec {
    /// Decides who dials: a node without addresses (behind NAT) always dials;
    /// nobody dials a node without addresses; otherwise the lower node id dials.
    pub fn dial_rule(local: NodeId, local_has_addresses: bool, peer: NodeId, peer_has_addresses: bool) -> bool {
        peer_has_addresses && (!local_has_addresses || local < peer)
    }
}

/// Which side opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This node dialed.
    Outbound,
    /// The peer dialed.
    Inbound,
}

/// Where the link to one peer stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected; the peer is expected to dial us.
    Waiting,
    /// A dial is in flight.
    Dialing {
        /// 0 for the first attempt after a (re)start or loss.
        attempt: u32,
    },
    /// Not connected; the next dial is due at `until`.
    Backoff {
        /// When the next dial starts.
        until: Instant,
        /// Attempts made so far.
        attempt: u32,
    },
    /// Connected.
    Connected {
        /// The connection in use.
        conn: ConnId,
        /// Who opened it.
        direction: Direction,
        /// When it was established.
        since: Instant,
    },
}

/// One peer's entry: its spec, link state and what went wrong last.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    /// From the topology.
    pub spec: PeerSpec,
    /// Current link state.
    pub state: LinkState,
    /// The most recent dial or connection error, kept after recovery for ops.
    pub last_error: Option<String>,
    /// Connections established so far (reconnects show as a count above 1).
    pub connect_count: u64,
    /// Short-lived connections in a row, which keep the backoff growing.
    pub short_lived: u32,
    /// Whether the current connection was accepted by the peer (hello received).
    pub stable: bool,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAction {
    /// Dial the peer; report back with `handle_connected` or `handle_dial_failed`.
    Dial {
        /// Whom.
        id: NodeId,
        /// Where, in order.
        addresses: Vec<String>,
    },
    /// Close this connection (peer removed from the topology, or a duplicate).
    Close {
        /// Whose.
        id: NodeId,
        /// Which.
        conn: ConnId,
        /// Told to the peer and logged.
        reason: String,
    },
}

/// The peer table state machine.
#[derive(Debug)]
pub struct PeerTable {
    local: NodeId,
    peers: BTreeMap<NodeId, PeerEntry>,
    actions: VecDeque<PeerAction>,
}

fn backoff(attempt: u32) -> Duration {
    BACKOFF_MIN.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_MAX)
}

impl PeerTable {
    /// An empty table for the node `local`.
    pub fn new(local: NodeId) -> Self {
        PeerTable { local, peers: BTreeMap::new(), actions: VecDeque::new() }
    }

    /// Applies the peer list of a (new) topology: adds, updates and removes peers.
    /// Removed peers' connections are closed; added dialable peers are dialed at once.
    pub fn handle_topology(&mut self, now: Instant, specs: Vec<PeerSpec>) {
        let mut wanted: BTreeMap<NodeId, PeerSpec> = specs.into_iter().filter(|s| s.id != self.local).map(|s| (s.id, s)).collect();
        let removed: Vec<NodeId> = self.peers.keys().filter(|id| !wanted.contains_key(id)).copied().collect();
        for id in removed {
            if let Some(PeerEntry { state: LinkState::Connected { conn, .. }, .. }) = self.peers.remove(&id) {
                self.actions.push_back(PeerAction::Close { id, conn, reason: "removed from the topology".into() });
            }
        }
        for (id, spec) in std::mem::take(&mut wanted) {
            match self.peers.get_mut(&id) {
                Some(entry) => {
                    let addresses_changed = entry.spec.addresses != spec.addresses;
                    entry.spec = spec;
                    match entry.state {
                        LinkState::Waiting if entry.spec.dial => entry.state = LinkState::Backoff { until: now, attempt: 0 },
                        LinkState::Backoff { .. } if !entry.spec.dial => entry.state = LinkState::Waiting,
                        // Retry a failing peer at once on the new addresses.
                        LinkState::Backoff { .. } if addresses_changed => entry.state = LinkState::Backoff { until: now, attempt: 0 },
                        _ => {}
                    }
                }
                None => {
                    let state = if spec.dial { LinkState::Backoff { until: now, attempt: 0 } } else { LinkState::Waiting };
                    self.peers.insert(id, PeerEntry { spec, state, last_error: None, connect_count: 0, short_lived: 0, stable: false });
                }
            }
        }
    }

    /// A dial started by [`PeerAction::Dial`] failed.
    pub fn handle_dial_failed(&mut self, now: Instant, id: NodeId, error: String) {
        let Some(entry) = self.peers.get_mut(&id) else { return };
        entry.last_error = Some(error);
        if let LinkState::Dialing { attempt } = entry.state {
            entry.state = if entry.spec.dial {
                LinkState::Backoff { until: now + backoff(attempt), attempt: attempt + 1 }
            } else {
                LinkState::Waiting
            };
        }
    }

    /// A handshake completed with `id`. Returns whether the connection is kept;
    /// if not, a [`PeerAction::Close`] for it has been queued.
    pub fn handle_connected(&mut self, now: Instant, id: NodeId, conn: ConnId, direction: Direction) -> bool {
        let local = self.local;
        let Some(entry) = self.peers.get_mut(&id) else {
            // The TLS check let it in, so it was listed a moment ago; not any more.
            self.actions.push_back(PeerAction::Close { id, conn, reason: "not in the topology".into() });
            return false;
        };
        if let LinkState::Connected { conn: old, direction: old_direction, .. } = entry.state {
            let dialer_is_local = |d: Direction| d == Direction::Outbound;
            let keep_new = if old_direction == direction {
                true
            } else {
                // Keep the connection dialed by the lower node id.
                let lower_is_local = local < id;
                dialer_is_local(direction) == lower_is_local
            };
            let (closed, reason) = if keep_new { (old, "replaced by a newer connection") } else { (conn, "duplicate connection") };
            self.actions.push_back(PeerAction::Close { id, conn: closed, reason: reason.into() });
            if !keep_new {
                return false;
            }
        }
        entry.state = LinkState::Connected { conn, direction, since: now };
        entry.stable = false;
        entry.connect_count += 1;
        true
    }

    /// The peer introduced itself on connection `conn`: it accepted us, so the
    /// link is sound and a later loss is an ordinary one (no growing backoff).
    pub fn handle_hello(&mut self, id: NodeId, conn: ConnId) {
        if let Some(entry) = self.peers.get_mut(&id) {
            if matches!(entry.state, LinkState::Connected { conn: c, .. } if c == conn) {
                entry.short_lived = 0;
                entry.stable = true;
            }
        }
    }

    /// Connection `conn` to `id` ended (closed by either side, timed out, or refused later).
    pub fn handle_closed(&mut self, now: Instant, id: NodeId, conn: ConnId, reason: String) {
        let Some(entry) = self.peers.get_mut(&id) else { return };
        match entry.state {
            LinkState::Connected { conn: current, since, .. } if current == conn => {
                entry.last_error = Some(reason);
                let lasted = entry.stable || now.saturating_duration_since(since) >= STABLE_CONNECTION;
                entry.stable = false;
                entry.short_lived = if lasted { 0 } else { entry.short_lived + 1 };
                let attempt = entry.short_lived;
                entry.state = if entry.spec.dial {
                    LinkState::Backoff { until: now + backoff(attempt.saturating_sub(1)), attempt }
                } else {
                    LinkState::Waiting
                };
            }
            _ => {}
        }
    }

    /// The next action to carry out, if any is due at `now`.
    pub fn poll_action(&mut self, now: Instant) -> Option<PeerAction> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        for (id, entry) in self.peers.iter_mut() {
            if let LinkState::Backoff { until, attempt } = entry.state {
                if until <= now {
                    entry.state = LinkState::Dialing { attempt };
                    return Some(PeerAction::Dial { id: *id, addresses: entry.spec.addresses.clone() });
                }
            }
        }
        None
    }

    /// When [`PeerTable::poll_action`] will next have something, if nothing is due now.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|e| match e.state {
                LinkState::Backoff { until, .. } => Some(until),
                _ => None,
            })
            .min()
    }

    /// All peers, ordered by node id.
    pub fn peers(&self) -> impl Iterator<Item = &PeerEntry> {
        self.peers.values()
    }

    /// One peer's entry.
    pub fn get(&self, id: &NodeId) -> Option<&PeerEntry> {
        self.peers.get(id)
    }
}

#[cfg(test)]
// The tests start their virtual time at a real instant (Instant has no other constructor).
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn spec(n: u8, dial: bool) -> PeerSpec {
        PeerSpec { id: id(n), name: format!("n{n}"), addresses: vec![format!("127.0.0.1:{}", 7400 + u16::from(n))], dial }
    }

    fn drain(table: &mut PeerTable, now: Instant) -> Vec<PeerAction> {
        std::iter::from_fn(|| table.poll_action(now)).collect()
    }

    #[test]
    fn dial_rule_picks_exactly_one_side() {
        let (a, b) = (id(1), id(2));
        assert!(PeerSpec::dial_rule(a, true, b, true));
        assert!(!PeerSpec::dial_rule(b, true, a, true));
        // Behind NAT: the address-less node dials, the other waits.
        assert!(PeerSpec::dial_rule(b, false, a, true));
        assert!(!PeerSpec::dial_rule(a, true, b, false));
    }

    #[test]
    fn dials_at_once_then_backs_off_exponentially_up_to_the_cap() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(id(1));
        table.handle_topology(t0, vec![spec(1, false), spec(2, true), spec(3, false)]);
        assert_eq!(drain(&mut table, t0), vec![PeerAction::Dial { id: id(2), addresses: vec!["127.0.0.1:7402".into()] }]);
        assert_eq!(table.get(&id(3)).unwrap().state, LinkState::Waiting);
        assert!(table.get(&id(1)).is_none(), "a node is never its own peer");

        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            table.handle_dial_failed(now, id(2), "refused".into());
            let due = table.poll_timeout().unwrap();
            delays.push(due - now);
            assert!(drain(&mut table, due - Duration::from_millis(1)).is_empty(), "dialed before the backoff ran out");
            now = due;
            assert_eq!(drain(&mut table, now).len(), 1);
        }
        assert_eq!(delays[0], BACKOFF_MIN);
        assert_eq!(delays[1], BACKOFF_MIN * 2);
        assert_eq!(*delays.last().unwrap(), BACKOFF_MAX);
        assert_eq!(table.get(&id(2)).unwrap().last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn lost_connection_is_redialed_and_removed_peer_is_closed() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(id(1));
        table.handle_topology(t0, vec![spec(2, true), spec(3, false)]);
        drain(&mut table, t0);
        assert!(table.handle_connected(t0, id(2), 10, Direction::Outbound));
        assert!(table.handle_connected(t0, id(3), 11, Direction::Inbound));
        table.handle_closed(t0, id(2), 10, "peer restarted".into());
        assert!(drain(&mut table, t0).is_empty());
        assert_eq!(drain(&mut table, t0 + BACKOFF_MIN).len(), 1);
        assert_eq!(table.get(&id(2)).unwrap().state, LinkState::Dialing { attempt: 1 });

        table.handle_topology(t0, vec![spec(2, true)]);
        assert_eq!(
            drain(&mut table, t0),
            vec![PeerAction::Close { id: id(3), conn: 11, reason: "removed from the topology".into() }]
        );
        assert!(table.get(&id(3)).is_none());
        // A stale close of an old connection changes nothing.
        assert!(table.handle_connected(t0, id(2), 12, Direction::Outbound));
        table.handle_closed(t0, id(2), 10, "late".into());
        assert!(matches!(table.get(&id(2)).unwrap().state, LinkState::Connected { conn: 12, .. }));
    }

    #[test]
    fn connections_that_drop_at_once_back_off_like_failed_dials() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(id(1));
        table.handle_topology(t0, vec![spec(2, true)]);
        let mut now = t0;
        let mut delays = Vec::new();
        for conn in 0..6 {
            assert_eq!(drain(&mut table, now).len(), 1);
            table.handle_connected(now, id(2), conn, Direction::Outbound);
            table.handle_closed(now + Duration::from_millis(5), id(2), conn, "refused".into());
            let due = table.poll_timeout().unwrap();
            delays.push(due - now);
            now = due;
        }
        assert!(delays.windows(2).all(|w| w[1] >= w[0]), "{delays:?}");
        assert!(*delays.last().unwrap() >= BACKOFF_MAX - Duration::from_millis(5), "{delays:?}");
        // A connection the peer accepted (hello) resets it, however short.
        drain(&mut table, now);
        table.handle_connected(now, id(2), 98, Direction::Outbound);
        table.handle_hello(id(2), 98);
        table.handle_closed(now, id(2), 98, "peer restarted".into());
        assert_eq!(table.poll_timeout().unwrap() - now, BACKOFF_MIN);
        now += BACKOFF_MIN;
        // A connection that held for a while resets it.
        drain(&mut table, now);
        table.handle_connected(now, id(2), 99, Direction::Outbound);
        table.handle_closed(now + STABLE_CONNECTION, id(2), 99, "peer restarted".into());
        assert_eq!(table.poll_timeout().unwrap() - (now + STABLE_CONNECTION), BACKOFF_MIN);
    }

    #[test]
    fn newer_connection_from_the_same_side_replaces_the_old() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(id(5));
        table.handle_topology(t0, vec![spec(2, false)]);
        assert!(table.handle_connected(t0, id(2), 1, Direction::Inbound));
        assert!(table.handle_connected(t0, id(2), 2, Direction::Inbound));
        assert_eq!(drain(&mut table, t0), vec![PeerAction::Close { id: id(2), conn: 1, reason: "replaced by a newer connection".into() }]);
        assert_eq!(table.get(&id(2)).unwrap().connect_count, 2);
    }

    #[test]
    fn both_ends_keep_the_same_one_of_two_crossing_connections() {
        let t0 = Instant::now();
        // Node 1 dialed conn A to node 2; node 2 dialed conn B to node 1.
        let mut one = PeerTable::new(id(1));
        let mut two = PeerTable::new(id(2));
        one.handle_topology(t0, vec![spec(2, true)]);
        two.handle_topology(t0, vec![spec(1, true)]);
        // Each side sees them in a different order.
        one.handle_connected(t0, id(2), 100, Direction::Outbound); // A
        one.handle_connected(t0, id(2), 101, Direction::Inbound); // B
        two.handle_connected(t0, id(1), 200, Direction::Outbound); // B
        two.handle_connected(t0, id(1), 201, Direction::Inbound); // A
        // Both keep A, dialed by the lower id (node 1).
        assert!(matches!(one.get(&id(2)).unwrap().state, LinkState::Connected { conn: 100, .. }));
        assert!(matches!(two.get(&id(1)).unwrap().state, LinkState::Connected { conn: 201, .. }));
    }

    #[test]
    fn connection_from_a_peer_just_removed_is_closed() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(id(1));
        assert!(!table.handle_connected(t0, id(9), 3, Direction::Inbound));
        assert_eq!(drain(&mut table, t0), vec![PeerAction::Close { id: id(9), conn: 3, reason: "not in the topology".into() }]);
    }
}

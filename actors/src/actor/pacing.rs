//! Pacing of blob frames: a cycle's frames wait for its policy's pacer, the
//! node's share of its site uplink and the `[[link]]` to its peer; fetch
//! replies served to a peer keep to that link's. The rates are the sans-IO
//! [`Pacer`]s' (proto::bandwidth); the scheduler sets them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::proto::bandwidth::Pacer;

/// Longest single sleep of a paced sender: a rate change (a window opening,
/// a topology reload, a new site share) takes effect within this time.
const PACE_RECHECK: Duration = Duration::from_millis(100);

/// The pacers a cycle's blob frames go through: its policy's (shared by this
/// node's cycles of that policy), the node's share of its site uplink
/// (shared by all its cycles) and the `[[link]]` to its peer. The scheduler
/// changes their rates while cycles run; a sender sees a change within
/// [`PACE_RECHECK`], and a link added or removed by a reload at its next frame.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// Origin of the pacers' time.
    pub origin: Instant,
    /// Every pacer a frame must wait for, besides the link's.
    pub pacers: Vec<Arc<Mutex<Pacer>>>,
    /// The links of this node and the peer the frames go to: the link's
    /// pacer is looked up at every frame.
    pub link: Option<(Arc<LinkPacers>, String)>,
    /// Blob payload bytes let through so far (the cycle's progress, for status).
    pub sent_payload_bytes: Arc<AtomicU64>,
}

impl Pacing {
    /// No limits.
    pub fn unlimited() -> Self {
        Pacing { origin: Instant::now(), pacers: Vec::new(), link: None, sent_payload_bytes: Arc::default() }
    }

    /// Waits until every pacer lets `bytes` go, then charges them.
    pub async fn pace(&self, bytes: u64) {
        let link = self.link.as_ref().and_then(|(links, peer)| links.get(peer));
        let pacers: Vec<&Arc<Mutex<Pacer>>> = self.pacers.iter().chain(link.as_ref()).collect();
        // A poisoned pacer only means a panic elsewhere mid-update; its numbers are still usable.
        loop {
            let now = self.origin.elapsed();
            let wait = pacers
                .iter()
                .map(|p| p.lock().unwrap_or_else(PoisonError::into_inner).delay(now))
                .max()
                .unwrap_or_default();
            if wait.is_zero() {
                break;
            }
            tokio::time::sleep(wait.min(PACE_RECHECK)).await;
        }
        let now = self.origin.elapsed();
        for p in &pacers {
            p.lock().unwrap_or_else(PoisonError::into_inner).handle_sent(now, bytes);
        }
        self.sent_payload_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The pacers of this node's `[[link]]` caps, one per peer it has a link
/// to. The scheduler sets their rates; every transfer this node sends to
/// that peer (replication cycles and fetch replies) waits for the same one,
/// so together they keep to the link's cap.
#[derive(Debug)]
pub struct LinkPacers {
    origin: Instant,
    by_peer: Mutex<BTreeMap<String, Arc<Mutex<Pacer>>>>,
}

impl LinkPacers {
    /// No links yet; `origin` is the time base of every pacer.
    pub fn new(origin: Instant) -> Self {
        LinkPacers { origin, by_peer: Mutex::new(BTreeMap::new()) }
    }

    /// Time base of the pacers: their `now` is `origin.elapsed()`.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Sets the caps in force at `now` (bits per second, `None`: unlimited):
    /// a peer missing from `caps` has no link any more and loses its pacer.
    pub fn set(&self, now: Duration, caps: &BTreeMap<String, Option<u64>>) {
        let mut by_peer = self.by_peer.lock().unwrap_or_else(PoisonError::into_inner);
        by_peer.retain(|peer, _| caps.contains_key(peer));
        for (peer, bps) in caps {
            let pacer = by_peer.entry(peer.clone()).or_insert_with(|| Arc::new(Mutex::new(Pacer::new(now, None))));
            pacer.lock().unwrap_or_else(PoisonError::into_inner).set_rate(now, *bps);
        }
    }

    /// The pacer of the link to `peer`, if there is a link.
    fn get(&self, peer: &str) -> Option<Arc<Mutex<Pacer>>> {
        self.by_peer.lock().unwrap_or_else(PoisonError::into_inner).get(peer).cloned()
    }

    /// What a transfer to `peer` keeps to besides its own limits: the link to
    /// `peer` as it is at each frame (nothing while no link is declared).
    pub fn pacing_to(self: &Arc<Self>, peer: &str) -> Pacing {
        Pacing { origin: self.origin, pacers: Vec::new(), link: Some((self.clone(), peer.to_string())), sent_payload_bytes: Arc::default() }
    }
}

//! Congestion control for long, lossy WAN links.
//!
//! Loss-based controllers (NewReno, Cubic: quinn's default) read every lost
//! packet as congestion. On a 150 ms path with 1% random loss that caps a
//! connection near `1.2·MSS / (RTT·√p)` ≈ 1 Mbit/s, whatever the link rate.
//! BBR models the path instead (delivery rate and minimum RTT) and does not
//! need loss as a signal; quinn's BBR (a port of quiche's BBRv1) still enters
//! *recovery* on any loss and then caps its window by a conservation window
//! that only grows with acks, so with loss in every round trip it stays in
//! recovery and runs at a fraction of the link.
//!
//! [`LossFilteredBbr`] is quinn's BBR with one change: losses reach it only
//! when they look like congestion, that is when more than
//! [`CONGESTIVE_LOSS_PER_MILLE`] of the bytes of the current round trip were
//! lost (the BBRv2 `loss_thresh` idea; a queue overflowing in start-up loses
//! far more than that in a burst). Random loss below the threshold costs the
//! retransmissions and nothing else. Persistent congestion always gets through.
//!
//! [`bdp::BdpController`] (the default) keeps the same loss filter but sizes
//! the window itself, near the estimated bandwidth-delay product, because
//! quinn paces by the window and BBR's window of twice the BDP overruns
//! shallow bottleneck queues (see its module docs).
//!
//! Which controller a node uses: [`CongestionChoice::from_env`] (for
//! benchmarks that compare them; the default is [`CongestionChoice::Bdp`]).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

pub mod bdp;
pub mod closing;

/// Losses above this share of a round trip's bytes (in thousandths) are
/// passed to BBR as congestion; below it they are treated as random loss.
pub const CONGESTIVE_LOSS_PER_MILLE: u64 = 20;

/// Paths whose minimum RTT is below this are short (loopback, LAN): random
/// loss is not expected there and every loss is a full buffer (often the
/// receiver's UDP socket). BBR (quinn's, filtered or not) keeps overrunning
/// such a buffer, so on a short path [`LossFilteredBbr`] hands the window to
/// a Cubic controller fed with the same events.
pub const SHORT_PATH_RTT: Duration = Duration::from_millis(10);

/// Environment variable that overrides the congestion controller:
/// `bdp` (default), `bbr-filtered`, `bbr` (quinn's BBR as is) or `cubic`.
pub const CONGESTION_ENV: &str = "DRMESH_CONGESTION";

/// The congestion controllers a node can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CongestionChoice {
    /// quinn's Cubic (its default).
    Cubic,
    /// quinn's BBR as it is.
    Bbr,
    /// quinn's BBR behind the loss filter ([`LossFilteredBbr`]).
    LossFilteredBbr,
    /// The window sized to the estimated BDP ([`bdp::BdpController`]).
    Bdp,
}

impl CongestionChoice {
    /// Parses `bdp`, `bbr-filtered`, `bbr` or `cubic`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "bbr-filtered" => Some(Self::LossFilteredBbr),
            "bbr" => Some(Self::Bbr),
            "cubic" => Some(Self::Cubic),
            "bdp" => Some(Self::Bdp),
            _ => None,
        }
    }

    /// The choice named by [`CONGESTION_ENV`], or the default when it is
    /// unset or names no controller (a warning is logged then).
    pub fn from_env() -> Self {
        match std::env::var(CONGESTION_ENV) {
            Ok(name) => Self::parse(&name).unwrap_or_else(|| {
                tracing::warn!("{CONGESTION_ENV}={name} names no congestion controller; using bdp");
                Self::Bdp
            }),
            Err(_) => Self::Bdp,
        }
    }

    /// The quinn factory of this controller, wrapped in
    /// [`closing::ClosingWindow`] so that [`closing::close`] always gets the
    /// close reason to the peer.
    pub fn factory(self) -> Arc<dyn ControllerFactory + Send + Sync> {
        let inner: Arc<dyn ControllerFactory + Send + Sync> = match self {
            Self::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Self::Bbr => Arc::new(BbrConfig::default()),
            Self::LossFilteredBbr => Arc::new(LossFilteredBbrConfig::default()),
            Self::Bdp => Arc::new(bdp::BdpConfig),
        };
        Arc::new(closing::ClosingWindowConfig::new(inner))
    }
}

/// Factory of [`LossFilteredBbr`].
#[derive(Debug, Clone, Default)]
pub struct LossFilteredBbrConfig {
    bbr: BbrConfig,
}

impl ControllerFactory for LossFilteredBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let inner = Arc::new(self.bbr.clone()).build(now, current_mtu);
        let short = Arc::new(quinn::congestion::CubicConfig::default()).build(now, current_mtu);
        Box::new(LossFilteredBbr::new(inner, short, now))
    }
}

/// The loss filter of [`LossFilteredBbr`], without the controller: bytes acked
/// and lost per round trip in, "is this loss congestion?" out.
#[derive(Debug, Clone)]
pub struct LossFilter {
    /// Start of the current accounting round.
    round_start: Instant,
    /// Length of a round: the smoothed RTT seen last.
    round: Duration,
    /// Bytes acknowledged in the current round.
    round_acked_bytes: u64,
    /// Bytes declared lost in the current round.
    round_lost_bytes: u64,
    /// Smallest RTT seen; `None` before the first ack.
    min_rtt: Option<Duration>,
}

impl LossFilter {
    /// A filter whose first round starts at `now`.
    pub fn new(now: Instant) -> Self {
        LossFilter { round_start: now, round: Duration::from_millis(100), round_acked_bytes: 0, round_lost_bytes: 0, min_rtt: None }
    }

    /// `bytes` were acknowledged; `srtt` is the smoothed RTT now and `min_rtt`
    /// the smallest seen.
    pub fn handle_ack(&mut self, bytes: u64, srtt: Duration, min_rtt: Duration) {
        self.round = srtt;
        self.min_rtt = Some(min_rtt);
        self.round_acked_bytes += bytes;
    }

    /// The end of a batch of acks at `now`: starts a new round once the last one
    /// lasted an RTT.
    pub fn handle_end_acks(&mut self, now: Instant) {
        if now.saturating_duration_since(self.round_start) >= self.round {
            self.round_start = now;
            self.round_acked_bytes = 0;
            self.round_lost_bytes = 0;
        }
    }

    /// Bytes declared lost in the current round so far.
    pub fn round_lost_bytes(&self) -> u64 {
        self.round_lost_bytes
    }

    /// Whether the path is short ([`SHORT_PATH_RTT`]); false before any ack.
    pub fn is_short_path(&self) -> bool {
        self.min_rtt.is_some_and(|rtt| rtt < SHORT_PATH_RTT)
    }

    /// `lost_bytes` were declared lost while the congestion window is
    /// `window`: whether to treat it as congestion, that is when the round's
    /// losses so far exceed [`CONGESTIVE_LOSS_PER_MILLE`] of its bytes, counted
    /// against at least one window (so one loss early in a round is not a
    /// burst), or quinn declared persistent congestion.
    pub fn handle_loss(&mut self, lost_bytes: u64, persistent: bool, window: u64) -> bool {
        self.round_lost_bytes += lost_bytes;
        let total = (self.round_acked_bytes + self.round_lost_bytes).max(window);
        persistent || self.round_lost_bytes * 1000 > total * CONGESTIVE_LOSS_PER_MILLE
    }
}

/// quinn's BBR that sees only congestive loss. See the [module docs](self).
pub struct LossFilteredBbr {
    inner: Box<dyn Controller>,
    /// The controller whose window counts on a short path (Cubic), fed every
    /// event and every loss.
    short: Box<dyn Controller>,
    filter: LossFilter,
}

impl LossFilteredBbr {
    /// Wraps `inner` (a BBR controller) and `short` (the controller for short paths).
    pub fn new(inner: Box<dyn Controller>, short: Box<dyn Controller>, now: Instant) -> Self {
        LossFilteredBbr { inner, short, filter: LossFilter::new(now) }
    }
}

impl Controller for LossFilteredBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
        self.short.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.filter.handle_ack(bytes, rtt.get(), rtt.min());
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        self.short.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        self.short.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        self.filter.handle_end_acks(now);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.short.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        if self.filter.handle_loss(lost_bytes, is_persistent_congestion, self.inner.window()) {
            self.inner.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
        self.short.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        if self.filter.is_short_path() {
            self.short.window()
        } else {
            self.inner.window()
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        if self.filter.is_short_path() {
            self.short.metrics()
        } else {
            self.inner.metrics()
        }
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(LossFilteredBbr { inner: self.inner.clone_box(), short: self.short.clone_box(), filter: self.filter.clone() })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_loss_is_filtered_and_bursts_get_through() {
        let t0 = Instant::now();
        let srtt = Duration::from_millis(100);
        let window = 100_000;
        let mut f = LossFilter::new(t0);
        // Round 1: 1 MB acked within 50 ms, 1% lost in 1200-byte packets: filtered.
        let mut now = t0;
        for i in 0..1000u64 {
            now = t0 + Duration::from_micros(i * 50);
            f.handle_ack(1000, srtt, srtt);
            f.handle_end_acks(now);
            if i % 100 == 99 {
                assert!(!f.handle_loss(1200, false, window), "1% loss is not congestion (ack {i})");
            }
        }
        // Round 2: a burst early in the round gets through once its share passes
        // 2% of max(round bytes, window).
        now += Duration::from_millis(101);
        f.handle_end_acks(now);
        f.handle_ack(100_000, srtt, srtt);
        assert!(!f.handle_loss(1200, false, window), "one packet of 100 kB is 1.2%");
        assert!(f.handle_loss(1200, false, window), "2.4% of the round is congestive");
        // A new round starts clean; persistent congestion always gets through.
        f.handle_end_acks(now + Duration::from_millis(101));
        assert!(!f.handle_loss(1200, false, window));
        assert!(f.handle_loss(1, true, window));
        assert!(!f.is_short_path());
        let mut short = LossFilter::new(t0);
        assert!(!short.is_short_path(), "unknown before the first ack");
        short.handle_ack(1_000_000, Duration::from_millis(2), Duration::from_millis(1));
        assert!(short.is_short_path());
    }

    #[test]
    fn choices_parse() {
        assert_eq!(CongestionChoice::parse("bbr-filtered"), Some(CongestionChoice::LossFilteredBbr));
        assert_eq!(CongestionChoice::parse("bbr"), Some(CongestionChoice::Bbr));
        assert_eq!(CongestionChoice::parse("cubic"), Some(CongestionChoice::Cubic));
        assert_eq!(CongestionChoice::parse("bdp"), Some(CongestionChoice::Bdp));
        assert_eq!(CongestionChoice::parse("reno"), None);
    }
}

//! A sans-IO model of one direction of a network link.
//!
//! [`Link`] is a plain state machine: the caller hands it each datagram's
//! length and the current instant ([`Link::handle_datagram`]) and gets back a
//! [`Verdict`]: drop it (and why) or deliver it at a given instant. It never
//! reads a clock, touches a socket or sleeps; [`crate::relay`] drives it with
//! real time and real UDP sockets, and its tests drive it with made-up
//! instants.
//!
//! The model, per datagram of `len` bytes arriving at `now`:
//!
//! 0. **MTU**: a datagram longer than `mtu_bytes` is dropped
//!    ([`DropReason::TooBig`]) before it uses the link, as a router drops an
//!    IPv4 packet with DF set (or any IPv6 packet) that does not fit the next
//!    hop. This is what makes path-MTU discovery settle where it would on a
//!    real WAN.
//! 1. **Serialisation** at `rate_bits_per_s` through a drop-tail queue:
//!    `start = max(now, previous departure)`, `departure = start + len·8/rate`.
//!    If the backlog (bytes not yet serialised at `now`, plus this datagram)
//!    would exceed the queue limit, the datagram is dropped
//!    ([`DropReason::QueueFull`]) and leaves no trace in the queue. The
//!    serialisation clock keeps the sub-nanosecond remainder, so the long-run
//!    rate is exact. A rate of 0 means unlimited: no serialisation, no queue.
//! 2. **Loss** on the wire with probability `loss` ([`DropReason::Loss`]). A
//!    lost datagram has already used its share of the link's capacity, as a
//!    datagram lost past the bottleneck does.
//! 3. **Propagation**: `arrival = departure + delay + j`, `j` uniform in
//!    `0..=jitter` (nanosecond resolution). Unless [`LinkParams::reorder`] is
//!    set, the arrival is raised to the previous datagram's arrival so that the
//!    link stays FIFO; either way `arrival - departure - delay` stays within
//!    `0..=jitter`, so jitter never reorders datagrams by more than `jitter`.
//!
//! The RNG ([`rand::rngs::SmallRng`]) is seeded at construction: the same seed,
//! parameters and inputs give the same verdicts.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Nanoseconds per second, as the unit of the serialisation arithmetic.
const NS_PER_S: u128 = 1_000_000_000;

/// How much may wait in the link's queue before new datagrams are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueLimit {
    /// At most this many bytes waiting to be serialised (including the
    /// datagram being serialised).
    Bytes(u64),
    /// At most this much queueing delay: a datagram is dropped if its
    /// departure would come later than `now + limit`. At rate `r` this is the
    /// same as `Bytes(limit · r / 8)`.
    Delay(Duration),
}

/// Parameters of one direction of a link. See the [module docs](self) for the
/// model.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkParams {
    /// One-way propagation delay added to every delivered datagram.
    pub delay: Duration,
    /// Extra delay, uniform in `0..=jitter`, per datagram.
    pub jitter: Duration,
    /// Let jitter reorder datagrams (by at most `jitter`). When false (the
    /// default) each arrival is raised to the previous one, so the link is FIFO.
    pub reorder: bool,
    /// Probability in `0.0..=1.0` that a datagram is lost on the wire.
    pub loss: f64,
    /// Link rate in bits per second; 0 = unlimited (and then no queue).
    pub rate_bits_per_s: u64,
    /// Size of the drop-tail queue in front of the rate limit.
    pub queue: QueueLimit,
    /// Largest datagram payload that fits the link; longer ones are dropped.
    /// `None` = no limit.
    pub mtu_bytes: Option<usize>,
}

/// Largest UDP payload on a 1500-byte Ethernet path over IPv4 (1500 minus 20
/// bytes of IPv4 and 8 of UDP header): the default MTU of a [`LinkParams`].
pub const ETHERNET_UDP_PAYLOAD_BYTES: usize = 1472;

impl Default for LinkParams {
    /// A perfect link with an Ethernet MTU: no delay, no loss, unlimited rate,
    /// a 50 ms queue (which matters only once a rate is set), datagrams of at
    /// most [`ETHERNET_UDP_PAYLOAD_BYTES`].
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: false,
            loss: 0.0,
            rate_bits_per_s: 0,
            queue: QueueLimit::Delay(Duration::from_millis(50)),
            mtu_bytes: Some(ETHERNET_UDP_PAYLOAD_BYTES),
        }
    }
}

impl LinkParams {
    /// Checks that the parameters make sense (loss is a probability).
    pub fn validate(&self) -> Result<(), LinkError> {
        if !(0.0..=1.0).contains(&self.loss) {
            // NaN fails `contains` too.
            return Err(LinkError::Loss(self.loss));
        }
        Ok(())
    }

    /// The queue limit in bit·nanoseconds (bytes × 8 × 10⁹), the unit in
    /// which [`Link`] compares backlogs exactly. `None` when the rate is
    /// unlimited.
    fn queue_limit_bit_ns(&self) -> Option<u128> {
        if self.rate_bits_per_s == 0 {
            return None;
        }
        Some(match self.queue {
            QueueLimit::Bytes(b) => u128::from(b) * 8 * NS_PER_S,
            QueueLimit::Delay(d) => d.as_nanos() * u128::from(self.rate_bits_per_s),
        })
    }
}

/// Invalid [`LinkParams`]; nothing was built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    /// `loss` is not a probability.
    #[error("loss probability {0} is not within 0.0..=1.0")]
    Loss(f64),
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Lost on the wire (random loss).
    Loss,
    /// The drop-tail queue in front of the rate limit was full.
    QueueFull,
    /// The datagram is longer than the link's MTU.
    TooBig,
}

/// What becomes of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand the datagram to the far end at this instant.
    Deliver {
        /// Arrival instant at the far end.
        at: Instant,
    },
    /// The datagram never arrives.
    Drop(DropReason),
}

/// Counters of one [`Link`]; packets and bytes are datagrams and their
/// payload lengths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams handed to the link.
    pub in_packets: u64,
    /// Bytes handed to the link.
    pub in_bytes: u64,
    /// Datagrams given a delivery instant.
    pub delivered_packets: u64,
    /// Bytes given a delivery instant.
    pub delivered_bytes: u64,
    /// Datagrams dropped by random loss.
    pub dropped_loss_packets: u64,
    /// Bytes dropped by random loss.
    pub dropped_loss_bytes: u64,
    /// Datagrams dropped because the queue was full.
    pub dropped_queue_packets: u64,
    /// Bytes dropped because the queue was full.
    pub dropped_queue_bytes: u64,
    /// Datagrams dropped because they were longer than the MTU.
    pub dropped_mtu_packets: u64,
}

/// One direction of an emulated link: a sans-IO state machine. See the
/// [module docs](self) for the model.
#[derive(Debug)]
pub struct Link {
    params: LinkParams,
    /// The queue limit in bit·ns, `None` when the rate is unlimited.
    queue_limit_bit_ns: Option<u128>,
    rng: SmallRng,
    /// Whole-nanosecond part of the instant the last accepted datagram
    /// finishes serialisation; `None` before the first one.
    busy_until: Option<Instant>,
    /// Sub-nanosecond remainder of `busy_until`, in bit·ns (`< rate`).
    busy_frac_bit_ns: u128,
    /// Arrival of the last delivered datagram (for FIFO mode).
    last_arrival: Option<Instant>,
    stats: LinkStats,
}

impl Link {
    /// Builds a link from its parameters and the seed of its RNG.
    pub fn new(params: LinkParams, seed: u64) -> Result<Self, LinkError> {
        params.validate()?;
        Ok(Self {
            queue_limit_bit_ns: params.queue_limit_bit_ns(),
            params,
            rng: SmallRng::seed_from_u64(seed),
            busy_until: None,
            busy_frac_bit_ns: 0,
            last_arrival: None,
            stats: LinkStats::default(),
        })
    }

    /// The parameters this link was built with.
    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// The counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Backlog at `now` in bit·ns: what is still to be serialised.
    fn backlog_bit_ns(&self, now: Instant, rate: u128) -> u128 {
        match self.busy_until {
            Some(busy) if busy > now => (busy - now).as_nanos() * rate + self.busy_frac_bit_ns,
            Some(busy) if busy == now => self.busy_frac_bit_ns,
            _ => 0,
        }
    }

    /// Decides the fate of one datagram of `len` bytes handed to the link at
    /// `now`. Calls are expected with non-decreasing `now`; an earlier `now`
    /// is not an error, the datagram just queues behind what is already there
    /// (and never arrives before an earlier datagram unless `reorder` is set).
    pub fn handle_datagram(&mut self, len: usize, now: Instant) -> Verdict {
        let len_u64 = len as u64;
        self.stats.in_packets += 1;
        self.stats.in_bytes += len_u64;

        // 0. Too big for the link: dropped before it uses any capacity.
        if self.params.mtu_bytes.is_some_and(|mtu| len > mtu) {
            self.stats.dropped_mtu_packets += 1;
            return Verdict::Drop(DropReason::TooBig);
        }

        // 1. Serialisation through the drop-tail queue.
        let departure = match self.queue_limit_bit_ns {
            None => now,
            Some(limit) => {
                let rate = u128::from(self.params.rate_bits_per_s);
                let tx_bit_ns = u128::from(len_u64) * 8 * NS_PER_S;
                let backlog = self.backlog_bit_ns(now, rate);
                if backlog + tx_bit_ns > limit {
                    self.stats.dropped_queue_packets += 1;
                    self.stats.dropped_queue_bytes += len_u64;
                    return Verdict::Drop(DropReason::QueueFull);
                }
                // Serialisation starts when the link is free (exactly, with the
                // remainder) or now, whichever is later.
                let (start, frac) = match self.busy_until {
                    Some(busy) if busy >= now => (busy, self.busy_frac_bit_ns),
                    _ => (now, 0),
                };
                let total = frac + tx_bit_ns;
                let whole_ns = total / rate;
                self.busy_frac_bit_ns = total % rate;
                // A datagram takes at most 64 KiB · 8 · 10⁹ bit·ns / rate ≥ 1
                // bit/s, well within u64 nanoseconds.
                let end = start + Duration::from_nanos(whole_ns as u64);
                self.busy_until = Some(end);
                end
            }
        };

        // 2. Loss on the wire (drawn only when it can happen, so a lossless link
        // leaves the RNG to the jitter).
        if self.params.loss > 0.0 && self.rng.random_bool(self.params.loss) {
            self.stats.dropped_loss_packets += 1;
            self.stats.dropped_loss_bytes += len_u64;
            return Verdict::Drop(DropReason::Loss);
        }

        // 3. Propagation and jitter.
        let jitter_ns = self.params.jitter.as_nanos() as u64;
        let jitter = if jitter_ns > 0 { Duration::from_nanos(self.rng.random_range(0..=jitter_ns)) } else { Duration::ZERO };
        let mut at = departure + self.params.delay + jitter;
        if !self.params.reorder {
            if let Some(last) = self.last_arrival {
                at = at.max(last);
            }
        }
        self.last_arrival = Some(self.last_arrival.map_or(at, |l| l.max(at)));
        self.stats.delivered_packets += 1;
        self.stats.delivered_bytes += len_u64;
        Verdict::Deliver { at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn deliver_at(v: Verdict) -> Instant {
        match v {
            Verdict::Deliver { at } => at,
            Verdict::Drop(r) => panic!("dropped: {r:?}"),
        }
    }

    #[test]
    fn datagrams_over_the_mtu_are_dropped_before_the_queue() {
        let t0 = Instant::now();
        // 8 Mbit/s: 1000 bytes take 1 ms; the default MTU is Ethernet's.
        let params = LinkParams { delay: ms(10), rate_bits_per_s: 8_000_000, ..LinkParams::default() };
        assert_eq!(params.mtu_bytes, Some(ETHERNET_UDP_PAYLOAD_BYTES));
        let mut link = Link::new(params, 1).expect("valid params");
        assert_eq!(deliver_at(link.handle_datagram(1472, t0)), t0 + us(11_472));
        assert_eq!(link.handle_datagram(1473, t0), Verdict::Drop(DropReason::TooBig));
        assert_eq!(link.handle_datagram(8952, t0), Verdict::Drop(DropReason::TooBig));
        // The dropped ones took no link time: the next one queues behind the first only.
        assert_eq!(deliver_at(link.handle_datagram(1000, t0)), t0 + us(11_472 + 1_000));
        let stats = link.stats();
        assert_eq!((stats.in_packets, stats.delivered_packets, stats.dropped_mtu_packets), (4, 2, 2));
        assert_eq!(stats.dropped_queue_packets + stats.dropped_loss_packets, 0);

        // No limit: a jumbo datagram passes.
        let mut open = Link::new(LinkParams { mtu_bytes: None, ..LinkParams::default() }, 1).expect("valid params");
        assert_eq!(deliver_at(open.handle_datagram(8952, t0)), t0);
    }

    #[test]
    fn exact_delivery_times_without_jitter() {
        let t0 = Instant::now();
        // 8 Mbit/s: 1000 bytes take exactly 1 ms.
        let params = LinkParams { delay: ms(75), rate_bits_per_s: 8_000_000, ..LinkParams::default() };
        let mut link = Link::new(params, 1).expect("valid params");
        // Three back-to-back datagrams queue behind each other.
        assert_eq!(deliver_at(link.handle_datagram(1000, t0)), t0 + ms(76));
        assert_eq!(deliver_at(link.handle_datagram(1000, t0)), t0 + ms(77));
        assert_eq!(deliver_at(link.handle_datagram(500, t0 + us(100))), t0 + us(77_500));
        // After the link goes idle, serialisation starts at `now` again.
        assert_eq!(deliver_at(link.handle_datagram(1000, t0 + ms(10))), t0 + ms(86));

        // Unlimited rate: exactly `delay`.
        let mut link = Link::new(LinkParams { delay: ms(75), ..LinkParams::default() }, 1).expect("valid params");
        for i in 0..10 {
            assert_eq!(deliver_at(link.handle_datagram(1400, t0 + us(i))), t0 + us(i) + ms(75));
        }
    }

    #[test]
    fn long_run_rate_matches_configured_rate() {
        let t0 = Instant::now();
        // A rate that does not divide evenly into nanoseconds per datagram.
        let rate = 999_999_937;
        let params = LinkParams { delay: ms(75), rate_bits_per_s: rate, queue: QueueLimit::Bytes(u64::MAX), ..LinkParams::default() };
        let mut link = Link::new(params, 1).expect("valid params");
        let n = 100_000u64;
        let len = 1200u64;
        let first = deliver_at(link.handle_datagram(len as usize, t0));
        let mut last = first;
        for _ in 1..n {
            last = deliver_at(link.handle_datagram(len as usize, t0));
        }
        // The first datagram's own serialisation is not between `first` and
        // `last`: n - 1 datagrams are.
        let bits = (n - 1) * len * 8;
        let measured = bits as f64 / (last - first).as_secs_f64();
        let err = (measured - rate as f64).abs() / rate as f64;
        assert!(err < 0.01, "measured {measured} bit/s vs {rate}");
        // With the remainder carried, it is in fact exact to the nanosecond.
        let expect_ns = u128::from(n * len * 8) * NS_PER_S / u128::from(rate);
        assert_eq!((last - t0 - ms(75)).as_nanos(), expect_ns);
    }

    #[test]
    fn loss_fraction_is_near_p() {
        let t0 = Instant::now();
        let params = LinkParams { loss: 0.01, ..LinkParams::default() };
        let mut link = Link::new(params, 7).expect("valid params");
        let n = 200_000;
        let mut lost = 0u64;
        for i in 0..n {
            if link.handle_datagram(1200, t0 + us(i)) == Verdict::Drop(DropReason::Loss) {
                lost += 1;
            }
        }
        let s = link.stats();
        assert_eq!(s.dropped_loss_packets, lost);
        assert_eq!(s.delivered_packets + lost, n);
        assert_eq!(s.dropped_queue_packets, 0);
        // Expected 2000, σ ≈ 44.5: allow about 4.5 σ.
        assert!((1800..=2200).contains(&lost), "lost {lost} of {n}");
    }

    #[test]
    fn queue_drops_exactly_when_backlog_exceeds_limit() {
        let t0 = Instant::now();
        // 8 Mbit/s (1000 bytes per ms) and a 10 000-byte queue.
        for queue in [QueueLimit::Bytes(10_000), QueueLimit::Delay(ms(10))] {
            let params = LinkParams { rate_bits_per_s: 8_000_000, queue, ..LinkParams::default() };
            let mut link = Link::new(params, 1).expect("valid params");
            // A burst at one instant: ten datagrams fill the queue to exactly
            // the limit, the eleventh would exceed it.
            for i in 0..10 {
                assert!(matches!(link.handle_datagram(1000, t0), Verdict::Deliver { .. }), "datagram {i} of {queue:?}");
            }
            assert_eq!(link.handle_datagram(1000, t0), Verdict::Drop(DropReason::QueueFull));
            // A smaller one does not fit either, a zero-length one does.
            assert_eq!(link.handle_datagram(1, t0), Verdict::Drop(DropReason::QueueFull));
            assert!(matches!(link.handle_datagram(0, t0), Verdict::Deliver { .. }));
            // 999 µs later the backlog is 9001 bytes: 999 fit, 1000 do not.
            assert_eq!(link.handle_datagram(1000, t0 + us(999)), Verdict::Drop(DropReason::QueueFull));
            assert!(matches!(link.handle_datagram(999, t0 + us(999)), Verdict::Deliver { .. }));
            // Now the backlog is exactly 10 000 bytes again; 1 ms later 1000 fit.
            assert_eq!(link.handle_datagram(1, t0 + us(999)), Verdict::Drop(DropReason::QueueFull));
            assert!(matches!(link.handle_datagram(1000, t0 + us(1999)), Verdict::Deliver { .. }));
            let s = link.stats();
            assert_eq!(s.dropped_queue_packets, 4);
            assert_eq!(s.dropped_queue_bytes, 1000 + 1 + 1000 + 1);
            assert_eq!(s.delivered_packets, 13);
            assert_eq!(s.in_packets, 17);
        }
    }

    #[test]
    fn jitter_stays_within_bounds_and_fifo_unless_reorder() {
        let t0 = Instant::now();
        for reorder in [false, true] {
            let params = LinkParams { delay: ms(10), jitter: ms(5), reorder, ..LinkParams::default() };
            let mut link = Link::new(params, 3).expect("valid params");
            let mut prev = None;
            let mut reordered = 0;
            for i in 0..10_000 {
                let now = t0 + us(i * 10);
                let at = deliver_at(link.handle_datagram(1200, now));
                assert!(at >= now + ms(10) && at <= now + ms(15), "datagram {i}: {:?}", at - now);
                if let Some(p) = prev {
                    if at < p {
                        reordered += 1;
                    }
                }
                prev = Some(at);
            }
            assert_eq!(reordered > 0, reorder, "reorder={reorder}: {reordered} reordered");
        }
    }

    #[test]
    fn same_seed_same_decisions() {
        let t0 = Instant::now();
        let params = LinkParams {
            delay: ms(20),
            jitter: ms(3),
            reorder: true,
            loss: 0.1,
            rate_bits_per_s: 100_000_000,
            queue: QueueLimit::Delay(ms(1)),
            mtu_bytes: Some(1400),
        };
        let run = |seed| {
            let mut link = Link::new(params.clone(), seed).expect("valid params");
            (0..5000).map(|i| link.handle_datagram(1200 + (i % 300), t0 + us(i as u64 * 50))).collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        assert!(a.contains(&Verdict::Drop(DropReason::QueueFull)));
        assert!(a.contains(&Verdict::Drop(DropReason::Loss)));
    }

    #[test]
    fn invalid_loss_is_refused() {
        for loss in [-0.1, 1.5, f64::NAN] {
            let params = LinkParams { loss, ..LinkParams::default() };
            assert!(matches!(Link::new(params, 0), Err(LinkError::Loss(_))));
        }
    }
}

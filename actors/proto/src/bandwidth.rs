//! Bandwidth limits (sans-IO): what a policy allows at a given local time,
//! a pacer that keeps transfers at a rate, and a node's fair share of its
//! site's uplink.
//!
//! - [`policy_cap`]: the policy's `bandwidth` table at a local date-time (first
//!   open window wins, `limit` outside every window).
//! - [`Pacer`]: a token bucket in bytes with a small burst. The driver asks
//!   [`Pacer::delay`] before a send and reports it with [`Pacer::handle_sent`];
//!   a new rate ([`Pacer::set_rate`]) applies at once.
//! - [`site_share`]: max-min fair split of a site's uplink among the site's
//!   nodes that have transfers running, from the [`Demand`]s they gossip. No
//!   node coordinates: each computes the same split from the same demands and
//!   keeps to its own part.
//!
//! Nothing here reads a clock: local times and `now` (time since an origin the
//! driver picks) come in as arguments.

use std::fmt;
use std::time::Duration;

use drmesh_topology::{Bandwidth, BandwidthWindow, TimeOfDay, Weekday};
use serde::{Deserialize, Serialize};

/// A local wall-clock instant as policy windows see it: day of the week and
/// minute of the day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// Day of the week.
    pub weekday: Weekday,
    /// Minutes since local midnight, 0..1440.
    pub minute: u16,
}

/// Why a policy allows the rate it does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyCap {
    /// Cap in bits per second; `None`: unlimited.
    pub bps: Option<u64>,
    /// The open window that set it; `None`: the policy's `limit` (no window open).
    pub window: Option<BandwidthWindow>,
}

fn previous_day(day: Weekday) -> Weekday {
    Weekday::ALL[(day as usize + 6) % 7]
}

/// Whether `window` is open at `at`. A window starts on its days at `from` and
/// ends at `to` the same day, or the next day if `to` is not after `from`.
pub fn window_open(window: &BandwidthWindow, at: LocalTime) -> bool {
    let (from, to, m) = (window.from.minutes, window.to.minutes, at.minute);
    if from < to {
        window.days.contains(at.weekday) && from <= m && m < to
    } else {
        (window.days.contains(at.weekday) && m >= from) || (window.days.contains(previous_day(at.weekday)) && m < to)
    }
}

/// The cap of a policy's `bandwidth` table (`None`: no table, unlimited) at `at`.
pub fn policy_cap(bandwidth: Option<&Bandwidth>, at: LocalTime) -> PolicyCap {
    let Some(bw) = bandwidth else { return PolicyCap { bps: None, window: None } };
    match bw.windows.iter().find(|w| window_open(w, at)) {
        Some(w) => PolicyCap { bps: w.limit_bps, window: Some(*w) },
        None => PolicyCap { bps: bw.limit_bps, window: None },
    }
}

/// Burst of a [`Pacer`]: this much time at the current rate …
const BURST_TIME: Duration = Duration::from_millis(50);
/// … but at least this many bytes.
const BURST_BYTES_MIN: f64 = 64.0 * 1024.0;

/// A token bucket in bytes. Sends may start while the bucket is not in debt;
/// each send takes its full size (a large frame leaves the bucket in debt,
/// which the next sends wait out), so the long-run rate is the cap whatever
/// the frame sizes.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate_bps: Option<u64>,
    tokens: f64,
    last: Duration,
}

impl Pacer {
    /// A pacer at `rate_bps` (`None`: unlimited), with an empty bucket at `now`.
    pub fn new(now: Duration, rate_bps: Option<u64>) -> Self {
        Pacer { rate_bps, tokens: 0.0, last: now }
    }

    /// The rate in bits per second; `None`: unlimited.
    pub fn rate_bps(&self) -> Option<u64> {
        self.rate_bps
    }

    fn bytes_per_sec(rate_bps: u64) -> f64 {
        rate_bps as f64 / 8.0
    }

    fn burst_bytes(rate_bps: u64) -> f64 {
        (Self::bytes_per_sec(rate_bps) * BURST_TIME.as_secs_f64()).max(BURST_BYTES_MIN)
    }

    fn refill(&mut self, now: Duration) {
        if let Some(rate) = self.rate_bps {
            let elapsed = now.saturating_sub(self.last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * Self::bytes_per_sec(rate)).min(Self::burst_bytes(rate));
        }
        self.last = self.last.max(now);
    }

    /// Changes the rate from `now` on. Time before `now` counts at the old rate;
    /// a debt carries over and is paid at the new rate.
    pub fn set_rate(&mut self, now: Duration, rate_bps: Option<u64>) {
        if rate_bps == self.rate_bps {
            return;
        }
        self.refill(now);
        if self.rate_bps.is_none() {
            self.tokens = 0.0;
        }
        self.rate_bps = rate_bps;
        if let Some(rate) = rate_bps {
            self.tokens = self.tokens.min(Self::burst_bytes(rate));
        }
    }

    /// How long to wait from `now` before the next send may start (zero: now).
    pub fn delay(&mut self, now: Duration) -> Duration {
        self.refill(now);
        match self.rate_bps {
            Some(rate) if self.tokens < 0.0 => Duration::from_secs_f64(-self.tokens / Self::bytes_per_sec(rate)),
            _ => Duration::ZERO,
        }
    }

    /// `bytes` were sent at `now`.
    pub fn handle_sent(&mut self, now: Duration, bytes: u64) {
        self.refill(now);
        if self.rate_bps.is_some() {
            self.tokens -= bytes as f64;
        }
    }
}

/// What a node's running transfers want from its site's uplink, as it gossips it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Demand {
    /// No transfer running: the node takes no share.
    Idle,
    /// Its transfers are capped (by policy) at this many bits per second in all.
    Bps(u64),
    /// At least one transfer is not capped by its policy.
    Unlimited,
}

impl Demand {
    /// The sum of two demands (what a node publishes for all its transfers).
    pub fn plus(self, other: Demand) -> Demand {
        match (self, other) {
            (Demand::Idle, d) | (d, Demand::Idle) => d,
            (Demand::Unlimited, _) | (_, Demand::Unlimited) => Demand::Unlimited,
            (Demand::Bps(a), Demand::Bps(b)) => Demand::Bps(a.saturating_add(b)),
        }
    }

    /// The lesser of two demands on the same transfers (e.g. their policy
    /// caps and the caps of the links they run over).
    pub fn min(self, other: Demand) -> Demand {
        match (self, other) {
            (Demand::Idle, _) | (_, Demand::Idle) => Demand::Idle,
            (Demand::Unlimited, d) | (d, Demand::Unlimited) => d,
            (Demand::Bps(a), Demand::Bps(b)) => Demand::Bps(a.min(b)),
        }
    }

    fn want(self) -> u64 {
        match self {
            Demand::Idle => 0,
            Demand::Bps(b) => b,
            Demand::Unlimited => u64::MAX,
        }
    }
}

/// This node's share of a site uplink of `uplink_bps`, split max-min fair
/// among this node (wanting `mine`) and the site's other live nodes (wanting
/// `others`): a node that wants less than an equal split gets what it wants,
/// and the rest is split among the others. An idle node is counted as if it
/// wanted the whole uplink, so the answer is what it would get if it started now.
pub fn site_share(uplink_bps: u64, mine: Demand, others: &[Demand]) -> u64 {
    let mine = if mine == Demand::Idle { u64::MAX } else { mine.want() };
    let mut wants: Vec<u64> = others.iter().map(|d| d.want()).filter(|&w| w > 0).collect();
    wants.sort_unstable();
    // Water-filling in ascending order of want: each gets the least of its want
    // and an equal split of what is left; this node's turn comes after every
    // smaller want (ties do not matter: equal wants get equal parts).
    let mut left = uplink_bps;
    let mut count = wants.len() as u64 + 1;
    for want in wants.into_iter().take_while(|&w| w < mine) {
        left -= want.min(left / count);
        count -= 1;
    }
    mine.min(left / count)
}

/// Where a transfer's effective cap comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapReason {
    /// Nothing caps it.
    Unlimited,
    /// The policy's `limit` (no window open).
    PolicyLimit,
    /// An open policy window.
    PolicyWindow {
        /// Window start.
        from: TimeOfDay,
        /// Window end.
        to: TimeOfDay,
    },
    /// This node's share of its site's uplink.
    SiteShare {
        /// The site's uplink, bits per second.
        uplink_bps: u64,
    },
    /// The `[[link]]` between this node and the target (shared by every
    /// transfer to that target).
    Link {
        /// The open link window (start, end); `None`: the link's `limit`.
        window: Option<(TimeOfDay, TimeOfDay)>,
    },
}

/// The cap a transfer runs under now, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveCap {
    /// Bits per second; `None`: unlimited.
    pub bps: Option<u64>,
    /// Which limit is the tightest.
    pub reason: CapReason,
}

/// The tighter of a policy cap and a site share (`None`: the site declares no uplink).
pub fn effective_cap(policy: PolicyCap, site: Option<(u64, u64)>) -> EffectiveCap {
    let from_policy = match (policy.bps, policy.window) {
        (None, _) => EffectiveCap { bps: None, reason: CapReason::Unlimited },
        (Some(bps), None) => EffectiveCap { bps: Some(bps), reason: CapReason::PolicyLimit },
        (Some(bps), Some(w)) => EffectiveCap { bps: Some(bps), reason: CapReason::PolicyWindow { from: w.from, to: w.to } },
    };
    match site {
        Some((share, uplink_bps)) if from_policy.bps.is_none_or(|p| share < p) => {
            EffectiveCap { bps: Some(share), reason: CapReason::SiteShare { uplink_bps } }
        }
        _ => from_policy,
    }
}

impl EffectiveCap {
    /// The tighter of this cap and a `[[link]]` cap (`link.bps` `None`: no limit).
    pub fn with_link(self, link: PolicyCap) -> EffectiveCap {
        match link.bps {
            Some(bps) if self.bps.is_none_or(|b| bps < b) => {
                EffectiveCap { bps: Some(bps), reason: CapReason::Link { window: link.window.map(|w| (w.from, w.to)) } }
            }
            _ => self,
        }
    }
}

/// A rate for people: `"50 Mbit/s"`, `"1.5 Gbit/s"`, `"640 kbit/s"`.
pub fn format_rate(bps: u64) -> String {
    let (value, unit) = match bps {
        b if b >= 1_000_000_000 => (b as f64 / 1e9, "Gbit/s"),
        b if b >= 1_000_000 => (b as f64 / 1e6, "Mbit/s"),
        b if b >= 1_000 => (b as f64 / 1e3, "kbit/s"),
        b => (b as f64, "bit/s"),
    };
    let text = format!("{value:.1}");
    format!("{} {unit}", text.strip_suffix(".0").unwrap_or(&text))
}

impl fmt::Display for EffectiveCap {
    /// `"capped 50 Mbit/s by policy window 08:00-18:00"`, `"site share 100 Mbit/s of 200 Mbit/s"`, …
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.bps, self.reason) {
            (Some(bps), CapReason::PolicyLimit) => write!(f, "capped {} by policy limit", format_rate(bps)),
            (Some(bps), CapReason::PolicyWindow { from, to }) => {
                write!(f, "capped {} by policy window {from}-{to}", format_rate(bps))
            }
            (Some(bps), CapReason::SiteShare { uplink_bps }) => {
                write!(f, "site share {} of {}", format_rate(bps), format_rate(uplink_bps))
            }
            (Some(bps), CapReason::Link { window: None }) => write!(f, "capped {} by link limit", format_rate(bps)),
            (Some(bps), CapReason::Link { window: Some((from, to)) }) => {
                write!(f, "capped {} by link window {from}-{to}", format_rate(bps))
            }
            _ => f.write_str("unlimited"),
        }
    }
}

#[cfg(test)]
mod link_tests {
    use super::*;

    #[test]
    fn a_link_cap_below_the_others_wins_and_says_so() {
        let policy = PolicyCap { bps: Some(100_000_000), window: None };
        let link = PolicyCap { bps: Some(20_000_000), window: None };
        let cap = effective_cap(policy, None).with_link(link);
        assert_eq!(cap.bps, Some(20_000_000));
        assert_eq!(cap.to_string(), "capped 20 Mbit/s by link limit");
        // A looser link changes nothing; no link cap at all neither.
        let loose = PolicyCap { bps: Some(500_000_000), window: None };
        assert_eq!(effective_cap(policy, None).with_link(loose), effective_cap(policy, None));
        let none = PolicyCap { bps: None, window: None };
        assert_eq!(effective_cap(none, Some((30_000_000, 200_000_000))).with_link(none).bps, Some(30_000_000));
        // An unlimited policy under a link cap.
        assert_eq!(effective_cap(none, None).with_link(link).bps, Some(20_000_000));
    }

    #[test]
    fn demand_min_keeps_idle_and_the_smaller_rate() {
        assert_eq!(Demand::Bps(5).min(Demand::Bps(3)), Demand::Bps(3));
        assert_eq!(Demand::Unlimited.min(Demand::Bps(3)), Demand::Bps(3));
        assert_eq!(Demand::Unlimited.min(Demand::Unlimited), Demand::Unlimited);
        assert_eq!(Demand::Idle.min(Demand::Bps(3)), Demand::Idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drmesh_topology::units::{parse_days, parse_time_of_day};

    fn window(days: &str, from: &str, to: &str, limit: Option<u64>) -> BandwidthWindow {
        BandwidthWindow {
            days: parse_days(days).unwrap(),
            from: parse_time_of_day(from, false).unwrap(),
            to: parse_time_of_day(to, true).unwrap(),
            limit_bps: limit,
        }
    }

    fn at(weekday: Weekday, hhmm: &str) -> LocalTime {
        LocalTime { weekday, minute: parse_time_of_day(hhmm, false).unwrap().minutes }
    }

    const M: u64 = 1_000_000;

    #[test]
    fn office_hours_window() {
        let bw = Bandwidth { limit_bps: None, windows: vec![window("mon-fri", "08:00", "18:00", Some(50 * M))] };
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Mon, "08:00")).bps, Some(50 * M));
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Fri, "17:59")).bps, Some(50 * M));
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Fri, "18:00")), PolicyCap { bps: None, window: None });
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Tue, "07:59")).bps, None);
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Sat, "12:00")).bps, None);
        assert_eq!(policy_cap(None, at(Weekday::Mon, "12:00")).bps, None);
    }

    #[test]
    fn window_past_midnight_belongs_to_its_start_day() {
        let bw = Bandwidth { limit_bps: Some(10 * M), windows: vec![window("fri", "22:00", "06:00", Some(100 * M))] };
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Fri, "21:59")).bps, Some(10 * M));
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Fri, "22:00")).bps, Some(100 * M));
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Sat, "05:59")).bps, Some(100 * M));
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Sat, "06:00")).bps, Some(10 * M));
        // Friday early morning belongs to a Thursday window, which there is not.
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Fri, "01:00")).bps, Some(10 * M));
        // A window wrapping from Sunday ends on Monday.
        let sun = Bandwidth { limit_bps: None, windows: vec![window("sun", "23:00", "01:00", Some(M))] };
        assert_eq!(policy_cap(Some(&sun), at(Weekday::Mon, "00:30")).bps, Some(M));
    }

    #[test]
    fn first_open_window_wins_and_24_00_ends_the_day() {
        let bw = Bandwidth {
            limit_bps: Some(5 * M),
            windows: vec![window("daily", "12:00", "24:00", Some(20 * M)), window("daily", "00:00", "24:00", None)],
        };
        let cap = policy_cap(Some(&bw), at(Weekday::Wed, "23:59"));
        assert_eq!(cap.bps, Some(20 * M));
        assert_eq!(cap.window.map(|w| w.from.to_string()), Some("12:00".into()));
        assert_eq!(policy_cap(Some(&bw), at(Weekday::Wed, "11:00")).bps, None, "second window: unlimited");
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Sends `frame` bytes as fast as the pacer allows for `until` seconds of
    /// virtual time; returns the bytes sent.
    fn run(p: &mut Pacer, start: f64, until: f64, frame: u64) -> (u64, f64) {
        let (mut now, mut sent) = (secs(start), 0);
        while now < secs(until) {
            let wait = p.delay(now);
            if !wait.is_zero() {
                now += wait;
                continue;
            }
            p.handle_sent(now, frame);
            sent += frame;
        }
        (sent, now.as_secs_f64())
    }

    #[test]
    fn pacer_keeps_the_rate_whatever_the_frame_size() {
        for frame in [1_000u64, 64 * 1024, 1 << 20, 4 << 20] {
            let mut p = Pacer::new(Duration::ZERO, Some(40 * M));
            let (sent, end) = run(&mut p, 0.0, 60.0, frame);
            let rate = sent as f64 * 8.0 / end;
            assert!((rate / (40.0 * 1e6) - 1.0).abs() < 0.02, "frame {frame}: {rate} bit/s");
        }
    }

    #[test]
    fn pacer_burst_is_small_and_idle_time_does_not_pile_up() {
        let mut p = Pacer::new(Duration::ZERO, Some(8 * M)); // 1 MB/s: burst 64 KiB
        assert_eq!(p.delay(secs(100.0)), Duration::ZERO);
        p.handle_sent(secs(100.0), 64 * 1024 + 1_000_000);
        // After a long idle spell only the burst was saved: the 1 MB frame costs ~1 s.
        let wait = p.delay(secs(100.0));
        assert!(wait > secs(0.99) && wait < secs(1.01), "{wait:?}");
    }

    #[test]
    fn pacer_rate_changes_apply_at_once() {
        let mut p = Pacer::new(Duration::ZERO, Some(10 * M));
        let (a, t) = run(&mut p, 0.0, 10.0, 1 << 20);
        p.set_rate(secs(t), Some(40 * M));
        let (b, t2) = run(&mut p, t, 20.0, 1 << 20);
        let (ra, rb) = (a as f64 * 8.0 / t, b as f64 * 8.0 / (t2 - t));
        assert!((ra / 10e6 - 1.0).abs() < 0.05 && (rb / 40e6 - 1.0).abs() < 0.05, "{ra} {rb}");
        p.set_rate(secs(t2), None);
        assert_eq!(p.delay(secs(t2)), Duration::ZERO);
        p.handle_sent(secs(t2), 1 << 30);
        assert_eq!(p.delay(secs(t2)), Duration::ZERO, "unlimited never waits");
        p.set_rate(secs(t2), Some(8 * M));
        p.handle_sent(secs(t2), 1_000_000);
        assert!(p.delay(secs(t2)) <= secs(1.0), "no debt carried from unlimited time");
    }

    #[test]
    fn site_share_is_max_min_fair() {
        let up = 200 * M;
        assert_eq!(site_share(up, Demand::Unlimited, &[]), up, "alone: the whole uplink");
        assert_eq!(site_share(up, Demand::Unlimited, &[Demand::Idle, Demand::Idle]), up);
        assert_eq!(site_share(up, Demand::Unlimited, &[Demand::Unlimited]), 100 * M);
        assert_eq!(site_share(up, Demand::Unlimited, &[Demand::Bps(20 * M), Demand::Unlimited]), 90 * M);
        assert_eq!(site_share(up, Demand::Bps(30 * M), &[Demand::Unlimited, Demand::Unlimited]), 30 * M);
        assert_eq!(site_share(up, Demand::Bps(150 * M), &[Demand::Bps(150 * M)]), 100 * M);
        assert_eq!(site_share(up, Demand::Idle, &[Demand::Unlimited]), 100 * M, "what it would get");
        // Every node computes the same split: the shares sum to the uplink.
        let all = [Demand::Bps(10 * M), Demand::Unlimited, Demand::Bps(80 * M), Demand::Unlimited];
        let total: u64 = (0..all.len())
            .map(|i| {
                let others: Vec<Demand> = all.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, d)| *d).collect();
                site_share(up, all[i], &others)
            })
            .sum();
        assert!(up - total < 4, "{total}");
    }

    #[test]
    fn demands_add_up() {
        assert_eq!(Demand::Idle.plus(Demand::Bps(5)), Demand::Bps(5));
        assert_eq!(Demand::Bps(5).plus(Demand::Bps(7)), Demand::Bps(12));
        assert_eq!(Demand::Bps(5).plus(Demand::Unlimited), Demand::Unlimited);
        assert_eq!(Demand::Idle.plus(Demand::Idle), Demand::Idle);
    }

    #[test]
    fn effective_cap_names_the_tightest_limit() {
        let w = window("daily", "08:00", "18:00", Some(50 * M));
        let by_window = effective_cap(PolicyCap { bps: Some(50 * M), window: Some(w) }, Some((100 * M, 200 * M)));
        assert_eq!(by_window.to_string(), "capped 50 Mbit/s by policy window 08:00-18:00");
        let by_site = effective_cap(PolicyCap { bps: None, window: None }, Some((100 * M, 200 * M)));
        assert_eq!(by_site.to_string(), "site share 100 Mbit/s of 200 Mbit/s");
        let by_limit = effective_cap(PolicyCap { bps: Some(2_500_000), window: None }, None);
        assert_eq!(by_limit.to_string(), "capped 2.5 Mbit/s by policy limit");
        assert_eq!(effective_cap(PolicyCap { bps: None, window: None }, None).to_string(), "unlimited");
    }
}

//! When drills run on a node, and how many at once (sans-IO).
//!
//! The node feeds in the volumes it drills with their schedules
//! ([`DrillQueue::handle_plans`]), requests from operators
//! ([`DrillQueue::handle_request`]) and finished drills
//! ([`DrillQueue::handle_finished`]); [`DrillQueue::poll_start`] says which
//! drill to start now. Rules:
//!
//! - At most `max_running` drills run at once; one per volume at a time.
//! - Waiting drills start oldest first, skipping volumes already running, so
//!   one busy volume never holds the others back (fair by volume).
//! - A scheduled drill is queued when its time comes unless one of the same
//!   volume is already waiting (a slow drill does not pile up a backlog).
//! - `every D` schedules count from when the plan was first seen (node start);
//!   daily and weekly ones use wall-clock time in the node's time zone.

use std::collections::{BTreeMap, VecDeque};

use drmesh_topology::{DrillCheck, DrillSchedule, VolumeName, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan as _};

use crate::blob::RpSeq;

/// One volume this node drills, as the topology says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillPlan {
    /// Volume name.
    pub volume: VolumeName,
    /// When its drills run.
    pub schedule: DrillSchedule,
    /// The policy's checks.
    pub checks: Vec<DrillCheck>,
}

/// Why a drill runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its schedule came due.
    Schedule,
    /// An operator asked (`drmesh drill`).
    Request,
}

impl Trigger {
    /// `schedule` or `request`.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Request => "request",
        }
    }
}

/// A drill to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillJob {
    /// Identifies the job in [`DrillQueue::handle_finished`].
    pub ticket: u64,
    /// Volume name.
    pub volume: VolumeName,
    /// The RP; `None`: the newest this node holds when it starts.
    pub seq: Option<RpSeq>,
    /// Checks to run.
    pub checks: Vec<DrillCheck>,
    /// Why.
    pub trigger: Trigger,
    /// When it was queued, Unix milliseconds.
    pub queued_unix_ms: u64,
}

/// The instant (Unix ms) of the first time `schedule` comes due strictly after
/// `after_unix_ms`, in `tz`; `Every` counts from `origin_unix_ms`.
pub fn next_due(schedule: &DrillSchedule, origin_unix_ms: u64, after_unix_ms: u64, tz: &TimeZone) -> u64 {
    match schedule {
        DrillSchedule::Every(d) => {
            let step = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
            let n = after_unix_ms.saturating_sub(origin_unix_ms) / step + 1;
            origin_unix_ms.saturating_add(n.saturating_mul(step))
        }
        DrillSchedule::Daily { at } => next_wall(after_unix_ms, tz, at.minutes, None),
        DrillSchedule::Weekly { day, at } => next_wall(after_unix_ms, tz, at.minutes, Some(*day)),
    }
}

fn weekday(day: Weekday) -> jiff::civil::Weekday {
    use jiff::civil::Weekday as W;
    match day {
        Weekday::Mon => W::Monday,
        Weekday::Tue => W::Tuesday,
        Weekday::Wed => W::Wednesday,
        Weekday::Thu => W::Thursday,
        Weekday::Fri => W::Friday,
        Weekday::Sat => W::Saturday,
        Weekday::Sun => W::Sunday,
    }
}

/// Next wall-clock `minutes` after midnight (on `day`) strictly after `after`.
fn next_wall(after_unix_ms: u64, tz: &TimeZone, minutes: u16, day: Option<Weekday>) -> u64 {
    let after = Timestamp::from_millisecond(i64::try_from(after_unix_ms).unwrap_or(i64::MAX)).unwrap_or(Timestamp::UNIX_EPOCH);
    let local = after.to_zoned(tz.clone());
    let today = local.date();
    // Eight days ahead always holds the next match; a gap (DST) resolves forwards.
    for offset in 0..=8i64 {
        let Ok(date) = today.checked_add(offset.days()) else { break };
        if day.is_some_and(|d| date.weekday() != weekday(d)) {
            continue;
        }
        let (h, m) = (i8::try_from(minutes / 60).unwrap_or(0), i8::try_from(minutes % 60).unwrap_or(0));
        // 24:00 is midnight at the end of the day.
        let at = if h >= 24 { date.checked_add(1.days()).map(|d| d.at(0, 0, 0, 0)) } else { Ok(date.at(h, m, 0, 0)) };
        let Ok(at) = at else { continue };
        let Ok(zoned) = at.to_zoned(tz.clone()) else { continue };
        let ms = u64::try_from(zoned.timestamp().as_millisecond()).unwrap_or(0);
        if ms > after_unix_ms {
            return ms;
        }
    }
    after_unix_ms.saturating_add(86_400_000)
}

#[derive(Debug, Clone)]
struct PlanState {
    plan: DrillPlan,
    origin_unix_ms: u64,
    next_due_unix_ms: u64,
}

/// The node's drill queue: schedules, waiting and running drills.
#[derive(Debug)]
pub struct DrillQueue {
    max_running: usize,
    tz: TimeZone,
    plans: BTreeMap<VolumeName, PlanState>,
    waiting: VecDeque<DrillJob>,
    running: BTreeMap<u64, DrillJob>,
    next_ticket: u64,
}

impl DrillQueue {
    /// An empty queue running at most `max_running` drills (at least 1), with
    /// daily and weekly schedules in `tz`.
    pub fn new(max_running: usize, tz: TimeZone) -> DrillQueue {
        DrillQueue { max_running: max_running.max(1), tz, plans: BTreeMap::new(), waiting: VecDeque::new(), running: BTreeMap::new(), next_ticket: 1 }
    }

    /// The volumes this node drills changed (start-up, topology reload). A
    /// plan whose schedule is unchanged keeps its next due time; waiting
    /// scheduled drills of volumes no longer drilled are dropped.
    pub fn handle_plans(&mut self, now_unix_ms: u64, plans: Vec<DrillPlan>, max_running: usize) {
        self.max_running = max_running.max(1);
        let mut next = BTreeMap::new();
        for plan in plans {
            let state = match self.plans.remove(&plan.volume) {
                Some(old) if old.plan.schedule == plan.schedule => PlanState { plan, ..old },
                _ => PlanState { next_due_unix_ms: next_due(&plan.schedule, now_unix_ms, now_unix_ms, &self.tz), origin_unix_ms: now_unix_ms, plan },
            };
            next.insert(state.plan.volume.clone(), state);
        }
        self.plans = next;
        let plans = &self.plans;
        self.waiting.retain(|j| j.trigger == Trigger::Request || plans.contains_key(&j.volume));
    }

    /// An operator asks for a drill; returns its ticket. It waits its turn like any other.
    pub fn handle_request(&mut self, now_unix_ms: u64, volume: &VolumeName, seq: Option<RpSeq>, checks: Vec<DrillCheck>) -> u64 {
        self.push(now_unix_ms, volume, seq, checks, Trigger::Request)
    }

    fn push(&mut self, now_unix_ms: u64, volume: &VolumeName, seq: Option<RpSeq>, checks: Vec<DrillCheck>, trigger: Trigger) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.push_back(DrillJob { ticket, volume: volume.clone(), seq, checks, trigger, queued_unix_ms: now_unix_ms });
        ticket
    }

    /// Queues the scheduled drills due at `now` (see the module doc).
    pub fn handle_tick(&mut self, now_unix_ms: u64) {
        let mut due = Vec::new();
        for state in self.plans.values_mut() {
            if state.next_due_unix_ms <= now_unix_ms {
                state.next_due_unix_ms = next_due(&state.plan.schedule, state.origin_unix_ms, now_unix_ms, &self.tz);
                due.push(state.plan.clone());
            }
        }
        for plan in due {
            let pending = self.waiting.iter().any(|j| j.volume == plan.volume && j.trigger == Trigger::Schedule);
            if !pending {
                self.push(now_unix_ms, &plan.volume, None, plan.checks, Trigger::Schedule);
            }
        }
    }

    /// The next drill to start now, if a slot is free; it counts as running
    /// until [`DrillQueue::handle_finished`].
    pub fn poll_start(&mut self) -> Option<DrillJob> {
        if self.running.len() >= self.max_running {
            return None;
        }
        let running = &self.running;
        let i = self.waiting.iter().position(|j| !running.values().any(|r| r.volume == j.volume))?;
        let job = self.waiting.remove(i)?;
        self.running.insert(job.ticket, job.clone());
        Some(job)
    }

    /// Drill `ticket` ended (whatever the outcome).
    pub fn handle_finished(&mut self, ticket: u64) {
        self.running.remove(&ticket);
    }

    /// Drills waiting and running, in that order of interest: (running, waiting).
    pub fn jobs(&self) -> (Vec<&DrillJob>, Vec<&DrillJob>) {
        (self.running.values().collect(), self.waiting.iter().collect())
    }

    /// When each drilled volume's schedule next comes due, Unix ms.
    pub fn next_due_times(&self) -> Vec<(&str, u64)> {
        self.plans.values().map(|s| (s.plan.volume.as_str(), s.next_due_unix_ms)).collect()
    }

    /// Where a waiting job stands (0: next to start), if still waiting.
    pub fn position(&self, ticket: u64) -> Option<usize> {
        self.waiting.iter().position(|j| j.ticket == ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drmesh_topology::TimeOfDay;
    use std::time::Duration;

    const MIN: u64 = 60_000;

    fn plan(volume: &'static str, every_min: u64) -> DrillPlan {
        DrillPlan { volume: VolumeName::from_static(volume), schedule: DrillSchedule::Every(Duration::from_secs(every_min * 60)), checks: vec![DrillCheck::Fsck] }
    }

    #[test]
    fn every_counts_from_start_and_skips_missed_slots() {
        let s = DrillSchedule::Every(Duration::from_secs(60));
        assert_eq!(next_due(&s, 1000, 1000, &TimeZone::UTC), 1000 + MIN);
        assert_eq!(next_due(&s, 1000, 1000 + MIN, &TimeZone::UTC), 1000 + 2 * MIN);
        // Asleep for ten minutes: the next slot, not ten of them.
        assert_eq!(next_due(&s, 1000, 1000 + 10 * MIN + 5, &TimeZone::UTC), 1000 + 11 * MIN);
    }

    #[test]
    fn daily_and_weekly_use_wall_clock() {
        // 2026-12-06 is a Sunday. 10:00 UTC.
        let sunday_10 = 1_796_551_200_000u64;
        assert_eq!(Timestamp::from_millisecond(sunday_10 as i64).unwrap().to_string(), "2026-12-06T10:00:00Z");
        let daily_3 = DrillSchedule::Daily { at: TimeOfDay { minutes: 180 } };
        assert_eq!(next_due(&daily_3, 0, sunday_10, &TimeZone::UTC), sunday_10 + 17 * 60 * MIN);
        let daily_11 = DrillSchedule::Daily { at: TimeOfDay { minutes: 660 } };
        assert_eq!(next_due(&daily_11, 0, sunday_10, &TimeZone::UTC), sunday_10 + 60 * MIN);
        let weekly_mon = DrillSchedule::Weekly { day: Weekday::Mon, at: TimeOfDay { minutes: 120 } };
        assert_eq!(next_due(&weekly_mon, 0, sunday_10, &TimeZone::UTC), sunday_10 + 16 * 60 * MIN);
        let weekly_sun_9 = DrillSchedule::Weekly { day: Weekday::Sun, at: TimeOfDay { minutes: 540 } };
        assert_eq!(next_due(&weekly_sun_9, 0, sunday_10, &TimeZone::UTC), sunday_10 + (7 * 24 - 1) * 60 * MIN);
        // In a zone two hours east, 03:00 local is 01:00 UTC.
        let east = TimeZone::fixed(jiff::tz::Offset::constant(2));
        assert_eq!(next_due(&daily_3, 0, sunday_10, &east), sunday_10 + 15 * 60 * MIN);
    }

    #[test]
    fn at_most_n_run_one_per_volume_fairly() {
        let mut q = DrillQueue::new(1, TimeZone::UTC);
        q.handle_plans(0, vec![plan("a", 1), plan("b", 1)], 1);
        assert!(q.poll_start().is_none(), "nothing due yet");
        q.handle_tick(MIN);
        let first = q.poll_start().expect("a due drill starts");
        assert!(q.poll_start().is_none(), "one slot only");
        // Two more ticks while a runs: a's scheduled drill does not pile up.
        q.handle_tick(2 * MIN);
        q.handle_tick(3 * MIN);
        let (running, waiting) = q.jobs();
        assert_eq!(running.len(), 1);
        assert_eq!(waiting.iter().filter(|j| j.volume == first.volume).count(), 1);
        assert_eq!(waiting.iter().filter(|j| j.volume != first.volume).count(), 1);
        // A request for the running volume waits; the other volume goes next.
        let t = q.handle_request(3 * MIN, &first.volume, Some(RpSeq(7)), vec![DrillCheck::Boot]);
        q.handle_finished(first.ticket);
        let second = q.poll_start().expect("next");
        assert_ne!(second.volume, first.volume, "the other volume had waited longer");
        q.handle_finished(second.ticket);
        let third = q.poll_start().expect("next");
        assert_eq!((third.volume.as_str(), third.trigger), (first.volume.as_str(), Trigger::Schedule));
        assert_eq!(q.position(t), Some(0));
        q.handle_finished(third.ticket);
        let fourth = q.poll_start().expect("the request");
        assert_eq!((fourth.ticket, fourth.seq, fourth.trigger), (t, Some(RpSeq(7)), Trigger::Request));
    }

    #[test]
    fn two_slots_run_two_volumes_never_one_volume_twice() {
        let mut q = DrillQueue::new(2, TimeZone::UTC);
        q.handle_request(0, &crate::blob::VolumeName::from_static("a"), None, vec![DrillCheck::Fsck]);
        q.handle_request(0, &crate::blob::VolumeName::from_static("a"), Some(RpSeq(1)), vec![DrillCheck::Fsck]);
        q.handle_request(0, &crate::blob::VolumeName::from_static("b"), None, vec![DrillCheck::Fsck]);
        let x = q.poll_start().unwrap();
        let y = q.poll_start().unwrap();
        assert_eq!((x.volume.as_str(), y.volume.as_str()), ("a", "b"));
        assert!(q.poll_start().is_none());
    }

    #[test]
    fn reload_keeps_due_times_and_drops_unplanned_scheduled_jobs() {
        let mut q = DrillQueue::new(1, TimeZone::UTC);
        q.handle_plans(0, vec![plan("a", 10), plan("b", 10)], 1);
        q.handle_tick(10 * MIN);
        q.handle_request(10 * MIN, &crate::blob::VolumeName::from_static("b"), None, vec![]);
        q.handle_plans(11 * MIN, vec![plan("a", 10)], 1);
        let (_, waiting) = q.jobs();
        let left: Vec<(&str, Trigger)> = waiting.iter().map(|j| (j.volume.as_str(), j.trigger)).collect();
        assert_eq!(left, vec![("a", Trigger::Schedule), ("b", Trigger::Request)], "an operator's request stays");
        assert_eq!(q.next_due_times(), vec![("a", 20 * MIN)]);
    }
}

//! What the daemon learns from job arrivals, to keep the right number of machines warm
//! before the jobs arrive. Persisted with the pool (`state.json`) and bounded in size: per
//! class, 96 numbers (jobs per hour, and the largest burst, by hour of day, weekdays and
//! weekends, as moving averages over days) and the arrivals of the last hours (at most
//! [`RECENT_MAX`] entries); at most [`MAX_CLASSES`] classes (the least recently used one is
//! forgotten).
//!
//! A burst is the jobs that arrive within [`BURST_SECS`] of each other (a pipeline's
//! jobs): what a stopped pool must cover, since a burst comes faster than machines
//! launch.
//!
//! Pure like `plan`: the caller passes every time, so the daemon and the simulator learn
//! and forecast identically.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc, Weekday};
use serde::{Deserialize, Serialize};

/// Classes remembered at most.
pub(crate) const MAX_CLASSES: usize = 32;
/// Recent arrivals remembered at most per class (same-second arrivals share one entry).
pub(crate) const RECENT_MAX: usize = 512;
/// Recent arrivals older than this are forgotten.
pub(crate) const RECENT_SECS: i64 = 6 * 3600;
/// Weight of the newest day in the hour-of-day profile.
const PROFILE_ALPHA: f64 = 0.3;
/// Hours of silence folded into the profile at most (a week: after that, it is all zeros).
const MAX_FOLD_HOURS: i64 = 7 * 24;
const SLOTS: usize = 48;
/// Jobs arriving within this many seconds of each other count as one burst.
pub(crate) const BURST_SECS: i64 = 60;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandHistory {
    #[serde(default)]
    classes: BTreeMap<String, ClassHistory>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ClassHistory {
    /// Jobs per hour by UTC hour of day: 0..24 weekdays, 24..48 weekends.
    #[serde(default)]
    per_hour: Vec<f64>,
    /// Days each slot has been learned from (capped).
    #[serde(default)]
    days: Vec<u16>,
    /// The hour being counted (hours since the Unix epoch) and its jobs so far.
    #[serde(default)]
    hour: i64,
    #[serde(default)]
    hour_jobs: u32,
    /// Largest burst by slot (as `per_hour`), and the largest one of the hour being counted.
    #[serde(default)]
    burst: Vec<f64>,
    #[serde(default)]
    hour_burst: u32,
    /// (Unix second, jobs) of recent arrivals, oldest first.
    #[serde(default)]
    recent: VecDeque<(i64, u32)>,
    #[serde(default)]
    last_seen: i64,
}

/// Profile slot of an hour (hours since the Unix epoch): its UTC hour of day, plus 24 on
/// Saturdays and Sundays.
fn slot(hour_index: i64) -> usize {
    let t = Utc
        .timestamp_opt(hour_index * 3600, 0)
        .single()
        .unwrap_or_default();
    let weekend = matches!(t.weekday(), Weekday::Sat | Weekday::Sun);
    t.hour() as usize + if weekend { 24 } else { 0 }
}

impl ClassHistory {
    fn new(hour: i64) -> Self {
        Self {
            per_hour: vec![0.0; SLOTS],
            days: vec![0; SLOTS],
            burst: vec![0.0; SLOTS],
            hour,
            ..Self::default()
        }
    }

    /// Repairs what a hand-edited or older state file may hold.
    fn normalise(&mut self) {
        self.per_hour.resize(SLOTS, 0.0);
        self.days.resize(SLOTS, 0);
        self.burst.resize(SLOTS, 0.0);
        for v in self.per_hour.iter_mut().chain(self.burst.iter_mut()) {
            if !v.is_finite() || *v < 0.0 {
                *v = 0.0;
            }
        }
        while self.recent.len() > RECENT_MAX {
            self.recent.pop_front();
        }
    }

    fn fold(&mut self, hour_index: i64, jobs: u32, burst: u32) {
        let s = slot(hour_index);
        let average = |old: f64, new: u32| {
            if self.days[s] == 0 {
                f64::from(new)
            } else {
                (1.0 - PROFILE_ALPHA) * old + PROFILE_ALPHA * f64::from(new)
            }
        };
        self.per_hour[s] = average(self.per_hour[s], jobs);
        self.burst[s] = average(self.burst[s], burst);
        self.days[s] = self.days[s].saturating_add(1).min(9999);
    }

    fn record(&mut self, at: i64) {
        self.normalise();
        let h = at.div_euclid(3600);
        if h > self.hour {
            self.fold(self.hour, self.hour_jobs, self.hour_burst);
            let first_silent = (self.hour + 1).max(h - MAX_FOLD_HOURS);
            for silent in first_silent..h {
                self.fold(silent, 0, 0);
            }
            self.hour = h;
            self.hour_jobs = 0;
            self.hour_burst = 0;
        }
        self.hour_jobs = self.hour_jobs.saturating_add(1);
        match self.recent.back_mut() {
            Some((s, n)) if *s == at => *n = n.saturating_add(1),
            _ => self.recent.push_back((at, 1)),
        }
        while self
            .recent
            .front()
            .is_some_and(|(s, _)| *s < at - RECENT_SECS)
            || self.recent.len() > RECENT_MAX
        {
            self.recent.pop_front();
        }
        // This arrival ends a burst of the jobs since `at - BURST_SECS` (itself included).
        let burst = self.jobs_between(at - BURST_SECS, at);
        self.hour_burst = self.hour_burst.max(burst);
        self.last_seen = at;
    }

    /// The largest burst among the recent arrivals after `from` (up to `to`).
    fn recent_burst(&self, from: i64, to: i64) -> u32 {
        let start = self.recent.partition_point(|(s, _)| *s <= from);
        let end = self.recent.partition_point(|(s, _)| *s <= to);
        let (mut best, mut in_window, mut oldest) = (0u32, 0u32, start);
        for (s, n) in self.recent.range(start..end) {
            in_window = in_window.saturating_add(*n);
            while let Some((_, k)) = self
                .recent
                .get(oldest)
                .filter(|(o, _)| *o <= s - BURST_SECS)
            {
                in_window = in_window.saturating_sub(*k);
                oldest += 1;
            }
            best = best.max(in_window);
        }
        best
    }

    /// The learned largest burst of each hour from the one containing `from` to the one
    /// containing `to`, at most a day of slots; the largest of them, if any was learned.
    fn profile_burst(&self, from: i64, to: i64) -> Option<f64> {
        let first = from.div_euclid(3600);
        let last = to.div_euclid(3600).min(first + 23);
        (first..=last)
            .filter_map(|h| {
                let s = slot(h);
                // A state file from before bursts were learned has none: 0 for a learned hour.
                (self.days.get(s).copied().unwrap_or(0) > 0)
                    .then(|| self.burst.get(s).copied().unwrap_or(0.0))
            })
            .reduce(f64::max)
    }

    /// Learned jobs per hour for the hour containing `at`, if that slot was ever learned.
    fn profile_rate(&self, at: i64) -> Option<f64> {
        let s = slot(at.div_euclid(3600));
        (self.days.get(s).copied().unwrap_or(0) > 0).then(|| self.per_hour[s])
    }

    fn jobs_between(&self, from: i64, to: i64) -> u32 {
        self.recent
            .iter()
            .filter(|(s, _)| *s > from && *s <= to)
            .map(|(_, n)| n)
            .sum()
    }
}

/// What the history says about the next minutes, for one class.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Outlook {
    /// Jobs per hour this hour of the day on this kind of day (weekday or weekend), learned
    /// over past days; `None` until that hour has been seen once.
    pub profile_per_hour: Option<f64>,
    /// Jobs per hour over the recent `window`.
    pub recent_per_hour: f64,
}

impl DemandHistory {
    /// A job asked for a machine of `class` at `at`.
    pub fn record(&mut self, class: &str, at: DateTime<Utc>) {
        let now = at.timestamp();
        if !self.classes.contains_key(class) && self.classes.len() >= MAX_CLASSES {
            if let Some(oldest) = self
                .classes
                .iter()
                .min_by_key(|(_, h)| h.last_seen)
                .map(|(k, _)| k.clone())
            {
                self.classes.remove(&oldest);
            }
        }
        self.classes
            .entry(class.to_owned())
            .or_insert_with(|| ClassHistory::new(now.div_euclid(3600)))
            .record(now);
    }

    /// The outlook for `class` at `now`, with the recent rate taken over `window`.
    pub fn outlook(&self, class: &str, now: DateTime<Utc>, window: Duration) -> Outlook {
        let Some(h) = self.classes.get(class) else {
            return Outlook::default();
        };
        let now = now.timestamp();
        let window_s = i64::try_from(window.as_secs()).unwrap_or(i64::MAX).max(1);
        let recent = h.jobs_between(now.saturating_sub(window_s), now);
        Outlook {
            profile_per_hour: h.profile_rate(now),
            recent_per_hour: f64::from(recent) * 3600.0 / window_s as f64,
        }
    }

    /// The largest burst of `class` to prepare for at `now` over `horizon`: the larger of
    /// the largest burst seen in the last `horizon` (at most the [`RECENT_SECS`] kept) and
    /// the largest learned for the hours of the day from now to `now + horizon` (at most a
    /// day ahead). 0 without history.
    pub fn burst_ahead(&self, class: &str, now: DateTime<Utc>, horizon: Duration) -> f64 {
        let Some(h) = self.classes.get(class) else {
            return 0.0;
        };
        let now = now.timestamp();
        let horizon_s = i64::try_from(horizon.as_secs()).unwrap_or(i64::MAX);
        let recent = h.recent_burst(now.saturating_sub(horizon_s.min(RECENT_SECS)), now);
        let profile = h.profile_burst(now, now.saturating_add(horizon_s));
        f64::from(recent).max(profile.unwrap_or(0.0))
    }

    /// Classes with history (for status and tests).
    pub fn classes(&self) -> impl Iterator<Item = &str> {
        self.classes.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Day 1 is Monday 2026-11-30 (UTC).
    fn at(day: i64, h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 30, h, m, s).unwrap() + chrono::Duration::days(day - 1)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn learns_jobs_per_hour_by_hour_of_day() {
        let mut d = DemandHistory::default();
        // Monday 10:00-11:00: 6 jobs; Tuesday 10:00: 12 jobs.
        for i in 0..6 {
            d.record("c", at(1, 10, i * 5, 0));
        }
        d.record("c", at(1, 15, 0, 0)); // closes Monday 10:00
        assert_eq!(
            d.outlook("c", at(2, 10, 0, 0), HOUR).profile_per_hour,
            Some(6.0)
        );
        for i in 0..12 {
            d.record("c", at(2, 10, i * 4, 0));
        }
        d.record("c", at(2, 12, 0, 0));
        let rate = d
            .outlook("c", at(3, 10, 30, 0), HOUR)
            .profile_per_hour
            .unwrap();
        assert!((rate - (0.7 * 6.0 + 0.3 * 12.0)).abs() < 1e-9, "{rate}");
        // Hours that passed without jobs were learned as zero; unseen ones are unknown.
        assert_eq!(
            d.outlook("c", at(2, 3, 0, 0), HOUR).profile_per_hour,
            Some(0.0)
        );
        assert_eq!(
            d.outlook("c", at(6, 10, 0, 0), HOUR).profile_per_hour,
            None,
            "weekend"
        );
    }

    #[test]
    fn recent_rate_counts_the_window_only() {
        let mut d = DemandHistory::default();
        for _ in 0..20 {
            d.record("c", at(1, 9, 0, 0)); // one 20-job pipeline
        }
        d.record("c", at(1, 9, 10, 0));
        d.record("c", at(1, 9, 10, 30));
        let o = d.outlook("c", at(1, 9, 30, 0), HOUR);
        assert!((o.recent_per_hour - 22.0).abs() < 1e-9);
        let o = d.outlook("c", at(1, 9, 29, 0), Duration::from_secs(1800));
        assert!((o.recent_per_hour - 44.0).abs() < 1e-9);
        // An hour later the pipeline has left the window.
        let o = d.outlook("c", at(1, 10, 5, 0), HOUR);
        assert!((o.recent_per_hour - 2.0).abs() < 1e-9);
        assert_eq!(
            d.outlook("other", at(1, 10, 5, 0), HOUR),
            Outlook::default()
        );
    }

    #[test]
    fn stays_bounded_and_round_trips_through_json() {
        let mut d = DemandHistory::default();
        let start = at(1, 0, 0, 0);
        for i in 0..5000 {
            d.record("c", start + chrono::Duration::seconds(i * 7));
        }
        for c in 0..(MAX_CLASSES + 5) {
            d.record(&format!("class-{c}"), at(1, 23, 0, 0));
        }
        assert_eq!(d.classes.len(), MAX_CLASSES);
        assert!(d
            .classes
            .values()
            .all(|h| h.recent.len() <= RECENT_MAX && h.per_hour.len() == SLOTS));
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.len() < 64 * 1024, "{} bytes", json.len());
        let back: DemandHistory = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        // A state file from before the history existed still loads.
        let empty: DemandHistory = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, DemandHistory::default());
    }

    #[test]
    fn the_largest_recent_burst_counts_jobs_within_a_minute() {
        let mut d = DemandHistory::default();
        for _ in 0..20 {
            d.record("c", at(1, 9, 0, 0)); // a 20-job pipeline
        }
        for _ in 0..5 {
            d.record("c", at(1, 9, 0, 30)); // 5 more within the minute
        }
        for _ in 0..10 {
            d.record("c", at(1, 9, 3, 0)); // a separate 10-job pipeline
        }
        assert_eq!(d.burst_ahead("c", at(1, 9, 5, 0), HOUR), 25.0);
        // Only bursts within the horizon count: the 10-job one is 2 minutes old.
        let two_min = Duration::from_secs(150);
        assert_eq!(d.burst_ahead("c", at(1, 9, 5, 0), two_min), 10.0);
        // A 59 s horizon at 09:01:00 sees only the 5 of 09:00:30.
        assert_eq!(
            d.burst_ahead("c", at(1, 9, 1, 0), Duration::from_secs(59)),
            5.0
        );
        assert_eq!(d.burst_ahead("other", at(1, 9, 5, 0), HOUR), 0.0);
    }

    #[test]
    fn bursts_are_learned_by_hour_of_day_and_looked_up_ahead() {
        let mut d = DemandHistory::default();
        for _ in 0..12 {
            d.record("c", at(1, 10, 0, 0)); // Monday 10:00, a 12-job pipeline
        }
        d.record("c", at(1, 10, 30, 0));
        d.record("c", at(1, 23, 0, 0)); // closes Monday's hours
                                        // Tuesday 08:30: the last bursts are hours old; 10:00 is within 2 h ahead.
        assert_eq!(d.burst_ahead("c", at(2, 8, 30, 0), 2 * HOUR), 12.0);
        // Within 1 h ahead only 08:00 and 09:00, never learned: nothing.
        assert_eq!(d.burst_ahead("c", at(2, 8, 30, 0), HOUR), 0.0);
        // A second Monday-like day with a 2-job burst at 10:00 averages it in.
        for _ in 0..2 {
            d.record("c", at(2, 10, 0, 0));
        }
        d.record("c", at(2, 23, 0, 0));
        let b = d.burst_ahead("c", at(3, 9, 0, 0), 2 * HOUR);
        assert!((b - (0.7 * 12.0 + 0.3 * 2.0)).abs() < 1e-9, "{b}");
        // A state written before bursts were learned loads and forecasts no burst.
        let mut old: serde_json::Value = serde_json::to_value(&d).unwrap();
        let class = old["classes"]["c"].as_object_mut().unwrap();
        class.remove("burst");
        class.remove("hour_burst");
        let old: DemandHistory = serde_json::from_value(old).unwrap();
        assert_eq!(old.burst_ahead("c", at(3, 9, 0, 0), 2 * HOUR), 0.0);
    }

    #[test]
    fn a_long_silence_is_learned_as_quiet_hours() {
        let mut d = DemandHistory::default();
        for i in 0..10 {
            d.record("c", at(1, 10, i, 0));
        }
        // Ten days later: every slot has been folded (zeros), bounded work.
        d.record("c", at(1, 10, 0, 0) + chrono::Duration::days(10));
        let o = d.outlook("c", at(2, 10, 0, 0), HOUR);
        assert!(o.profile_per_hour.unwrap() < 10.0);
    }
}

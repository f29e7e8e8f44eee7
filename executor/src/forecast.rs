//! What the daemon learns from job arrivals, to keep the right number of machines warm
//! before the jobs arrive. Persisted with the pool (`state.json`) and bounded in size: per
//! class, 48 numbers (jobs per hour by hour of day, weekdays and weekends, as a moving
//! average over days) and the arrivals of the last hours (at most [`RECENT_MAX`] entries);
//! at most [`MAX_CLASSES`] classes (the least recently used one is forgotten).
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
            hour,
            ..Self::default()
        }
    }

    /// Repairs what a hand-edited or older state file may hold.
    fn normalise(&mut self) {
        self.per_hour.resize(SLOTS, 0.0);
        self.days.resize(SLOTS, 0);
        for v in &mut self.per_hour {
            if !v.is_finite() || *v < 0.0 {
                *v = 0.0;
            }
        }
        while self.recent.len() > RECENT_MAX {
            self.recent.pop_front();
        }
    }

    fn fold(&mut self, hour_index: i64, jobs: u32) {
        let s = slot(hour_index);
        let v = f64::from(jobs);
        self.per_hour[s] = if self.days[s] == 0 {
            v
        } else {
            (1.0 - PROFILE_ALPHA) * self.per_hour[s] + PROFILE_ALPHA * v
        };
        self.days[s] = self.days[s].saturating_add(1).min(9999);
    }

    fn record(&mut self, at: i64) {
        self.normalise();
        let h = at.div_euclid(3600);
        if h > self.hour {
            self.fold(self.hour, self.hour_jobs);
            let first_silent = (self.hour + 1).max(h - MAX_FOLD_HOURS);
            for silent in first_silent..h {
                self.fold(silent, 0);
            }
            self.hour = h;
            self.hour_jobs = 0;
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
        self.last_seen = at;
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

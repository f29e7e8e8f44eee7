//! Which of a baseline's cron periods is active, cached per minute (cron matches whole
//! minutes, so the cache is exact): a replay asks at every event, millions of times.

use chrono::{TimeZone, Utc};
use flotilla_proto::schedule::{Schedule, Window};

#[derive(Debug, Clone, Default)]
pub(super) struct PeriodCache {
    /// `None` for an entry that does not parse: it never matches, and keeps its index.
    schedules: Vec<Option<Window>>,
    minute: Option<i64>,
    active: Option<usize>,
}

impl PeriodCache {
    /// `(periods, timezone)` per entry, in configuration order: the last match wins.
    pub(super) fn new(entries: &[(Vec<String>, String)]) -> Self {
        Self {
            schedules: entries
                .iter()
                .map(|(periods, timezone)| Schedule {
                    periods: periods.clone(),
                    timezone: timezone.clone(),
                    idle_count: None,
                    idle_count_min: None,
                    idle_scale_factor: None,
                    idle_time: None,
                })
                .map(|s| s.compile().ok())
                .collect(),
            minute: None,
            active: None,
        }
    }

    /// Index of the last entry active at `now_ms`, if any.
    pub(super) fn active(&mut self, now_ms: i64) -> Option<usize> {
        if self.schedules.is_empty() {
            return None;
        }
        let minute = now_ms.div_euclid(60_000);
        if self.minute != Some(minute) {
            self.minute = Some(minute);
            let now = Utc
                .timestamp_millis_opt(minute * 60_000)
                .single()
                .unwrap_or_default();
            self.active = self
                .schedules
                .iter()
                .rposition(|w| w.as_ref().is_some_and(|w| w.is_active(now)));
        }
        self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_match_wins_and_cache_follows_the_minute() {
        let mut c = PeriodCache::new(&[
            (vec!["* * * * *".into()], "UTC".into()),
            (vec!["* 12 * * *".into()], "UTC".into()),
        ]);
        let at = |h: i64, m: i64| 1_764_460_800_000 + (h * 60 + m) * 60_000; // 2025-11-30 00:00 UTC
        assert_eq!(c.active(at(11, 59)), Some(0));
        assert_eq!(c.active(at(12, 0)), Some(1));
        assert_eq!(c.active(at(12, 0) + 59_000), Some(1));
        assert_eq!(c.active(at(13, 0)), Some(0));
        assert_eq!(PeriodCache::default().active(at(1, 0)), None);
    }
}

//! Schedules: which idle policy applies at a given instant. Pure: the caller passes the
//! time, so the daemon and the simulator (and tests with a fake clock) agree exactly.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;

use crate::config::Schedule;

pub fn parse_period(pattern: &str) -> Result<Cron, String> {
    Cron::from_str(pattern).map_err(|e| format!("invalid cron pattern {pattern:?}: {e}"))
}

pub fn parse_timezone(name: &str) -> Result<chrono_tz::Tz, String> {
    chrono_tz::Tz::from_str(name).map_err(|_| {
        format!("unknown time zone {name:?} (expected an IANA name like \"Europe/Berlin\")")
    })
}

/// True when one of the schedule's periods matches `now` in its time zone. Invalid
/// patterns never match (validation rejects them at load).
pub fn is_active(schedule: &Schedule, now: DateTime<Utc>) -> bool {
    let Ok(tz) = parse_timezone(&schedule.timezone) else {
        return false;
    };
    let local = now.with_timezone(&tz);
    schedule.periods.iter().any(|p| {
        parse_period(p)
            .ok()
            .and_then(|c| c.is_time_matching(&local).ok())
            .unwrap_or(false)
    })
}

/// The last schedule active at `now` (docker+machine's "last match wins").
pub fn active(schedules: &[Schedule], now: DateTime<Utc>) -> Option<&Schedule> {
    schedules.iter().rev().find(|s| is_active(s, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sched(periods: &[&str], tz: &str, idle: u32) -> Schedule {
        Schedule {
            periods: periods.iter().map(|s| s.to_string()).collect(),
            timezone: tz.into(),
            idle_count: Some(idle),
            idle_count_min: None,
            idle_scale_factor: None,
            idle_time: None,
        }
    }

    #[test]
    fn working_hours_in_the_configured_zone() {
        let s = [sched(&["* 8-17 * * mon-fri"], "Europe/Berlin", 5)];
        // 2026-11-30 is a Monday; Berlin is UTC+1 in winter.
        let at = |h, m| Utc.with_ymd_and_hms(2026, 11, 30, h, m, 0).unwrap();
        assert!(active(&s, at(6, 59)).is_none(), "07:59 Berlin");
        assert!(active(&s, at(7, 0)).is_some(), "08:00 Berlin");
        assert!(active(&s, at(16, 59)).is_some(), "17:59 Berlin");
        assert!(active(&s, at(17, 0)).is_none(), "18:00 Berlin");
        let saturday = Utc.with_ymd_and_hms(2026, 12, 5, 10, 0, 0).unwrap();
        assert!(active(&s, saturday).is_none());
    }

    #[test]
    fn last_matching_schedule_wins() {
        let s = [
            sched(&["* * * * *"], "UTC", 1),
            sched(&["* 12 * * *"], "UTC", 9),
        ];
        let noon = Utc.with_ymd_and_hms(2026, 11, 30, 12, 30, 0).unwrap();
        let night = Utc.with_ymd_and_hms(2026, 11, 30, 2, 0, 0).unwrap();
        assert_eq!(active(&s, noon).unwrap().idle_count, Some(9));
        assert_eq!(active(&s, night).unwrap().idle_count, Some(1));
    }
}

//! Schedules: which idle policy applies at a given instant. A [`Schedule`] is what the
//! config file says (patterns as text); [`Schedule::compile`] parses it once into a
//! [`Window`] (cron patterns and time zone parsed), which is what the daemon's policy and
//! the simulator hold, so deciding whether a window is active parses nothing. Pure: the
//! caller passes the time, so the daemon and the simulator (and tests with a fake clock)
//! agree exactly.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;

/// A time window that overrides a class's idle policy, like docker+machine's
/// `[[runners.machine.autoscaling]]`: the LAST matching schedule wins. Fields left out keep
/// the class's own value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// 5-field cron patterns (minute hour day-of-month month day-of-week); the schedule is
    /// active during every minute one of them matches, e.g. `"* 8-18 * * mon-fri"`.
    pub periods: Vec<String>,
    /// IANA time zone the periods are read in.
    #[serde(default = "utc")]
    pub timezone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_count_min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_scale_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_time: Option<HumanDuration>,
}

fn utc() -> String {
    "UTC".into()
}

/// Why a schedule cannot be used: the field (`periods` or `timezone`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScheduleError {
    pub field: &'static str,
    pub message: String,
}

/// A schedule with its patterns and time zone parsed: built once when the policy is.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    schedule: Schedule,
    periods: Vec<Cron>,
    zone: chrono_tz::Tz,
}

impl Schedule {
    /// Parses the periods and the time zone, naming the field that is wrong.
    pub fn compile(&self) -> Result<Window, ScheduleError> {
        if self.periods.is_empty() {
            return Err(ScheduleError {
                field: "periods",
                message: "must list at least one cron pattern".into(),
            });
        }
        let periods = self
            .periods
            .iter()
            .map(|p| parse_period(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| ScheduleError {
                field: "periods",
                message,
            })?;
        let zone = parse_timezone(&self.timezone).map_err(|message| ScheduleError {
            field: "timezone",
            message,
        })?;
        Ok(Window {
            schedule: self.clone(),
            periods,
            zone,
        })
    }
}

impl Window {
    /// True when one of the periods matches `now` in the window's time zone.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        let local = now.with_timezone(&self.zone);
        self.periods
            .iter()
            .any(|c| c.is_time_matching(&local).unwrap_or(false))
    }

    /// The settings the window overrides (its fields that are `Some`).
    pub fn overrides(&self) -> &Schedule {
        &self.schedule
    }
}

pub fn parse_period(pattern: &str) -> Result<Cron, String> {
    Cron::from_str(pattern).map_err(|e| format!("invalid cron pattern {pattern:?}: {e}"))
}

pub fn parse_timezone(name: &str) -> Result<chrono_tz::Tz, String> {
    chrono_tz::Tz::from_str(name).map_err(|_| {
        format!("unknown time zone {name:?} (expected an IANA name like \"Europe/Berlin\")")
    })
}

/// The last window active at `now` (docker+machine's "last match wins").
pub fn active(windows: &[Window], now: DateTime<Utc>) -> Option<&Window> {
    windows.iter().rev().find(|w| w.is_active(now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn window(periods: &[&str], tz: &str, idle: u32) -> Window {
        Schedule {
            periods: periods.iter().map(|s| s.to_string()).collect(),
            timezone: tz.into(),
            idle_count: Some(idle),
            idle_count_min: None,
            idle_scale_factor: None,
            idle_time: None,
        }
        .compile()
        .unwrap()
    }

    #[test]
    fn working_hours_in_the_configured_zone() {
        let s = [window(&["* 8-17 * * mon-fri"], "Europe/Berlin", 5)];
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
            window(&["* * * * *"], "UTC", 1),
            window(&["* 12 * * *"], "UTC", 9),
        ];
        let noon = Utc.with_ymd_and_hms(2026, 11, 30, 12, 30, 0).unwrap();
        let night = Utc.with_ymd_and_hms(2026, 11, 30, 2, 0, 0).unwrap();
        assert_eq!(active(&s, noon).unwrap().overrides().idle_count, Some(9));
        assert_eq!(active(&s, night).unwrap().overrides().idle_count, Some(1));
    }

    #[test]
    fn compile_names_the_field_that_is_wrong() {
        let base = Schedule {
            periods: vec!["* 8-18 * * mon-fri".into()],
            timezone: "UTC".into(),
            idle_count: None,
            idle_count_min: None,
            idle_scale_factor: None,
            idle_time: None,
        };
        let field = |s: Schedule| s.compile().unwrap_err().field;
        assert_eq!(
            field(Schedule {
                periods: vec![],
                ..base.clone()
            }),
            "periods"
        );
        assert_eq!(
            field(Schedule {
                periods: vec!["99 * * * *".into()],
                ..base.clone()
            }),
            "periods"
        );
        assert_eq!(
            field(Schedule {
                timezone: "Mars/Olympus".into(),
                ..base.clone()
            }),
            "timezone"
        );
        assert!(base.compile().is_ok());
    }
}

//! The daemon's time: where "now" comes from, and saturating arithmetic on it.

#[cfg(test)]
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// Where the daemon's wall-clock time comes from: the system clock, or in tests a manual
/// one the test advances (leases, idle times, launch back-off and boot deadlines all read
/// it, so a failure path that takes minutes runs in milliseconds).
#[derive(Debug, Clone)]
pub enum Clock {
    System,
    #[cfg(test)]
    Manual(Arc<Mutex<DateTime<Utc>>>),
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Self::System => Utc::now(),
            #[cfg(test)]
            Self::Manual(t) => *t.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// A manual clock at `start`.
    #[cfg(test)]
    pub fn manual(start: DateTime<Utc>) -> Self {
        Self::Manual(Arc::new(Mutex::new(start)))
    }

    /// Moves a manual clock forward.
    #[cfg(test)]
    pub fn advance(&self, d: std::time::Duration) {
        if let Self::Manual(t) = self {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            *t = saturating_add(*t, d);
        }
    }
}

/// `d` as a chrono duration, saturating at chrono's range: a configured duration or a
/// persisted time far out must never panic the daemon.
pub fn chrono_duration(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// `t + d`, saturating at the latest representable time.
pub fn saturating_add(t: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    t.checked_add_signed(chrono_duration(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn configured_durations_saturate_instead_of_panicking() {
        let t = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
        let huge = std::time::Duration::from_secs(u64::MAX);
        assert_eq!(chrono_duration(huge), chrono::Duration::MAX);
        assert_eq!(saturating_add(t, huge), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            saturating_add(t, std::time::Duration::from_secs(60)),
            t + chrono::Duration::seconds(60)
        );
        assert_eq!(
            saturating_add(DateTime::<Utc>::MAX_UTC, std::time::Duration::from_secs(1)),
            DateTime::<Utc>::MAX_UTC
        );
    }
}

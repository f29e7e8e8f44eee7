//! What the daemon learns from job arrivals, to keep the right number of machines warm
//! before the jobs arrive. Persisted with the pool and bounded in size.
//!
//! (Stub: records nothing yet; the policy that uses it lives in `plan`.)

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandHistory {}

impl DemandHistory {
    /// A job asked for a machine of `class` at `at`.
    pub fn record(&mut self, _class: &str, _at: DateTime<Utc>) {}
}

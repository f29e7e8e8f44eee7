//! Which images a class's jobs use, learned from each job's cleanup (the images its
//! containers ran), so a new machine can pull the most used ones before its first job.
//! Pure, persisted inside the pool like the forecast's history.
//!
//! Bounded against hostile jobs, whose image names are theirs to choose: a release counts
//! at most [`MAX_PER_RELEASE`] distinct names of at most [`MAX_NAME`] printable
//! characters, a class keeps at most [`MAX_PER_CLASS`] images, and each use decays with a
//! half-life of [`HALF_LIFE_HOURS`], so one job's images are displaced by what the class
//! keeps using. What a job gains by naming images is at most that new machines pull them,
//! which its own jobs would have done anyway.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Distinct images one release may count.
pub(crate) const MAX_PER_RELEASE: usize = 8;
/// Images remembered per class (the lowest scores go first).
pub(crate) const MAX_PER_CLASS: usize = 32;
/// Longest image reference counted.
pub(crate) const MAX_NAME: usize = 255;
/// A use counts half after this long.
pub(crate) const HALF_LIFE_HOURS: f64 = 24.0;

/// One image's decayed use count and when it was last updated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Use {
    score: f64,
    at: DateTime<Utc>,
}

impl Use {
    fn score_at(&self, now: DateTime<Utc>) -> f64 {
        let hours = (now - self.at).num_milliseconds().max(0) as f64 / 3_600_000.0;
        self.score * 0.5f64.powf(hours / HALF_LIFE_HOURS)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ImageUsage {
    classes: BTreeMap<String, BTreeMap<String, Use>>,
}

/// Whether `name` may be counted: a plausible image reference, nothing a log line or a
/// pull could be confused by.
fn acceptable(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\'))
}

impl ImageUsage {
    /// Counts one job's images for `class` (each once, whatever the job repeated).
    pub(crate) fn record(&mut self, class: &str, images: &[String], now: DateTime<Utc>) {
        let mut names: Vec<&str> = images
            .iter()
            .map(String::as_str)
            .filter(|n| acceptable(n))
            .collect();
        names.sort_unstable();
        names.dedup();
        names.truncate(MAX_PER_RELEASE);
        if names.is_empty() {
            return;
        }
        let uses = self.classes.entry(class.to_owned()).or_default();
        for name in names {
            let score = uses.get(name).map_or(0.0, |u| u.score_at(now)) + 1.0;
            uses.insert(name.to_owned(), Use { score, at: now });
        }
        while uses.len() > MAX_PER_CLASS {
            let lowest = uses
                .iter()
                .min_by(|a, b| a.1.score_at(now).total_cmp(&b.1.score_at(now)))
                .map(|(name, _)| name.clone());
            match lowest {
                Some(name) => uses.remove(&name),
                None => break,
            };
        }
    }

    /// The `n` most used images of `class` at `now`, most used first (ties by name).
    pub(crate) fn top(&self, class: &str, n: usize, now: DateTime<Utc>) -> Vec<String> {
        let Some(uses) = self.classes.get(class) else {
            return Vec::new();
        };
        let mut ranked: Vec<(f64, &String)> =
            uses.iter().map(|(k, u)| (u.score_at(now), k)).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        ranked.into_iter().take(n).map(|(_, k)| k.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(hours: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + hours * 3600, 0).unwrap()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_most_used_images_come_first_and_a_job_counts_each_once() {
        let mut u = ImageUsage::default();
        u.record("c", &names(&["rust:1", "helper:x", "rust:1"]), t(0));
        u.record("c", &names(&["rust:1", "helper:x", "postgres:16"]), t(1));
        u.record("c", &names(&["node:20", "helper:x"]), t(2));
        assert_eq!(
            u.top("c", 3, t(2)),
            names(&["helper:x", "rust:1", "node:20"])
        );
        assert!(u.top("other", 3, t(2)).is_empty());
    }

    #[test]
    fn old_uses_fade_so_what_the_class_uses_now_wins() {
        let mut u = ImageUsage::default();
        for h in 0..4 {
            u.record("c", &names(&["old:1"]), t(h));
        }
        // Three days later, two jobs of a new image outrank four old ones (4/8 < 2).
        u.record("c", &names(&["new:1"]), t(72));
        u.record("c", &names(&["new:1"]), t(73));
        assert_eq!(u.top("c", 1, t(73)), names(&["new:1"]));
    }

    #[test]
    fn hostile_names_and_floods_are_bounded() {
        let mut u = ImageUsage::default();
        let flood: Vec<String> = (0..100).map(|i| format!("junk/{i:03}")).collect();
        u.record("c", &flood, t(0));
        assert_eq!(u.top("c", 100, t(0)).len(), MAX_PER_RELEASE);
        u.record(
            "c",
            &names(&["", "a b", "x\"y", &"z".repeat(MAX_NAME + 1)]),
            t(0),
        );
        assert_eq!(u.top("c", 100, t(0)).len(), MAX_PER_RELEASE);
        for r in 0..10 {
            let batch: Vec<String> = (0..8).map(|i| format!("img/{r}-{i}")).collect();
            u.record("c", &batch, t(1));
        }
        assert_eq!(u.top("c", 1000, t(1)).len(), MAX_PER_CLASS);
    }

    #[test]
    fn it_survives_the_state_file() {
        let mut u = ImageUsage::default();
        u.record("c", &names(&["rust:1"]), t(0));
        let back: ImageUsage = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
        assert_eq!(back.top("c", 1, t(0)), names(&["rust:1"]));
    }
}

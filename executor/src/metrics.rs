//! Prometheus metrics (text format), served on `metrics_addr`. Counters are bumped where
//! things happen; pool gauges are recomputed from the pool at scrape time so they can
//! never drift from it.

use std::sync::Mutex;

use flotilla_proto::api::MachineState;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::pool::Pool;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub struct Metrics {
    registry: Registry,
    machines: Family<Labels, Gauge>,
    leases: Gauge,
    waiting: Family<Labels, Gauge>,
    job_slots: Family<Labels, Gauge>,
    pub lease_wait: Histogram,
    pub boot_time: Histogram,
    launches: Family<Labels, Counter>,
    launch_failures: Family<Labels, Counter>,
    terminations: Family<Labels, Counter>,
    orphans_reaped: Counter,
    machines_lost: Counter,
    ec2_calls: Family<Labels, Counter>,
    ec2_throttles: Family<Labels, Counter>,
    machine_seconds: Family<Labels, Counter<f64>>,
    prefetch_pulls: Family<Labels, Counter>,
    /// Serializes scrapes (gauges are rewritten per scrape).
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flotilla");
        let m = Self {
            machines: Family::default(),
            leases: Gauge::default(),
            waiting: Family::default(),
            job_slots: Family::default(),
            lease_wait: Histogram::new(exponential_buckets(0.005, 2.0, 18)),
            boot_time: Histogram::new(exponential_buckets(0.5, 2.0, 12)),
            launches: Family::default(),
            launch_failures: Family::default(),
            terminations: Family::default(),
            orphans_reaped: Counter::default(),
            machines_lost: Counter::default(),
            ec2_calls: Family::default(),
            ec2_throttles: Family::default(),
            machine_seconds: Family::default(),
            prefetch_pulls: Family::default(),
            registry: Registry::default(),
            scrape: Mutex::new(()),
        };
        registry.register(
            "machines",
            "Machines by class and state",
            m.machines.clone(),
        );
        registry.register("leases", "Leases currently held by jobs", m.leases.clone());
        registry.register(
            "waiting_requests",
            "Acquire requests waiting for a machine, by class",
            m.waiting.clone(),
        );
        registry.register(
            "job_slots",
            "Job slots of ready machines by class and state: busy (a job holds it) or free \
             (a job may take it); with jobs_per_machine 1, one per machine",
            m.job_slots.clone(),
        );
        registry.register(
            "lease_wait_seconds",
            "Time a job waited for a machine",
            m.lease_wait.clone(),
        );
        registry.register(
            "boot_seconds",
            "Launch to dockerd answering over mTLS",
            m.boot_time.clone(),
        );
        registry.register(
            "launches",
            "Machines launched, by class, instance type and market",
            m.launches.clone(),
        );
        registry.register(
            "launch_failures",
            "Launch attempts that failed, by class and reason",
            m.launch_failures.clone(),
        );
        registry.register(
            "terminations",
            "Machines terminated, by reason",
            m.terminations.clone(),
        );
        registry.register(
            "machines_lost",
            "Machines that vanished, stopped, or stopped answering without being asked to",
            m.machines_lost.clone(),
        );
        registry.register(
            "orphans_reaped",
            "Instances of this fleet unknown to the daemon, terminated",
            m.orphans_reaped.clone(),
        );
        registry.register(
            "ec2_calls",
            "EC2 API requests sent (SDK retries included), by operation",
            m.ec2_calls.clone(),
        );
        registry.register(
            "ec2_throttles",
            "EC2 API requests throttled (RequestLimitExceeded), by operation",
            m.ec2_throttles.clone(),
        );
        registry.register(
            "machine_seconds",
            "Machine running time by class and instance type (for cost)",
            m.machine_seconds.clone(),
        );
        registry.register(
            "prefetch_pulls",
            "Images new machines pulled before their first job, by result (pulled, failed)",
            m.prefetch_pulls.clone(),
        );
        Self { registry, ..m }
    }

    pub fn prefetched(&self, result: &str) {
        self.prefetch_pulls
            .get_or_create(&labels(&[("result", result)]))
            .inc();
    }

    pub fn launched(&self, class: &str, instance_type: &str, market: &str) {
        self.launches
            .get_or_create(&labels(&[
                ("class", class),
                ("instance_type", instance_type),
                ("market", market),
            ]))
            .inc();
    }

    pub fn launch_failed(&self, class: &str, reason: &str) {
        self.launch_failures
            .get_or_create(&labels(&[("class", class), ("reason", reason)]))
            .inc();
    }

    pub fn terminated(&self, reason: &str, n: u64) {
        self.terminations
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(n);
    }

    pub fn lost(&self, n: u64) {
        self.machines_lost.inc_by(n);
    }

    pub fn orphans(&self, n: u64) {
        self.orphans_reaped.inc_by(n);
    }

    pub fn ec2_call(&self, operation: &str) {
        self.ec2_calls
            .get_or_create(&labels(&[("operation", operation)]))
            .inc();
    }

    pub fn ec2_throttled(&self, operation: &str) {
        self.ec2_throttles
            .get_or_create(&labels(&[("operation", operation)]))
            .inc();
    }

    pub fn machine_time(&self, class: &str, instance_type: &str, seconds: f64) {
        self.machine_seconds
            .get_or_create(&labels(&[
                ("class", class),
                ("instance_type", instance_type),
            ]))
            .inc_by(seconds);
    }

    /// The text exposition, with pool gauges taken from `pool` now. `classes` are the
    /// configured ones with their `jobs_per_machine` (a machine of a class no longer
    /// configured counts one slot).
    pub fn render(&self, pool: &Pool, classes: &[(&str, u32)]) -> String {
        let _guard = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let states = [
            MachineState::Booting,
            MachineState::Idle,
            MachineState::Leased,
            MachineState::Broken,
            MachineState::Terminating,
            MachineState::Stopping,
            MachineState::Stopped,
            MachineState::Starting,
        ];
        let mut all_classes: Vec<(&str, u32)> = classes.to_vec();
        for m in pool.machines().values() {
            if !all_classes.iter().any(|(c, _)| *c == m.class) {
                all_classes.push((&m.class, 1));
            }
        }
        for &(class, slots) in &all_classes {
            for state in states {
                self.machines
                    .get_or_create(&labels(&[("class", class), ("state", state.as_str())]))
                    .set(i64::from(pool.count(class, state)));
            }
            self.waiting
                .get_or_create(&labels(&[("class", class)]))
                .set(i64::from(pool.waiting(class)));
            let free: u32 = pool
                .machines()
                .values()
                .filter(|m| m.class == class)
                .map(|m| m.free_slots(slots))
                .sum();
            for (state, n) in [("busy", pool.jobs_on(class)), ("free", free)] {
                self.job_slots
                    .get_or_create(&labels(&[("class", class), ("state", state)]))
                    .set(i64::from(n));
            }
        }
        self.leases.set(pool.leases().len() as i64);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_counts() {
        let m = Metrics::new();
        m.launched("small", "t3.micro", "on-demand");
        m.launched("small", "t3.micro", "on-demand");
        m.terminated("idle_timeout", 1);
        let text = m.render(&Pool::default(), &[("small", 1)]);
        assert!(text.contains(r#"flotilla_launches_total{class="small",instance_type="t3.micro",market="on-demand"} 2"#), "{text}");
        assert!(
            text.contains(r#"flotilla_terminations_total{reason="idle_timeout"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"flotilla_machines{class="small",state="idle"} 0"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn job_slots_count_jobs_held_and_slots_free_on_ready_machines() {
        use chrono::{TimeZone, Utc};
        let now = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
        let mut pool = Pool::default();
        for id in ["a", "b", "booting"] {
            pool.reserve(id, "shared", "m5.xlarge", now);
            pool.record_launch(id, &format!("i-{id}"), "10.0.0.1", "m5.xlarge");
        }
        assert!(pool.mark_ready("a", now) && pool.mark_ready("b", now));
        let terms = crate::pool::LeaseTerms {
            slots: 4,
            ..Default::default()
        };
        for job in ["j1", "j2", "j3"] {
            let lease =
                pool.try_lease_with_terms(job, "shared", format!("l-{job}"), terms.clone(), now);
            assert!(lease.is_some());
        }
        let text = Metrics::new().render(&pool, &[("shared", 4), ("empty", 2)]);
        // Three jobs fill one machine first: 1 slot left on it, 4 on the idle one; the
        // booting machine offers none yet.
        for line in [
            r#"flotilla_job_slots{class="shared",state="busy"} 3"#,
            r#"flotilla_job_slots{class="shared",state="free"} 5"#,
            r#"flotilla_job_slots{class="empty",state="free"} 0"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}

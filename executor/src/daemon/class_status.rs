//! `flotilla status` per class: what the class has, and when jobs wait, what they are
//! waiting for (backoff after a failed launch, `max_machines`, machines booting, drain).
//! A pure function of the pool, the policy and the launch backoffs, so every reason is a
//! unit test.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_proto::api::{ClassStatus, MachineState};

use crate::plan::Policy;
use crate::pool::Pool;

/// A class whose last launch failed: no launch before `until`; the delay doubles on each
/// further failure. `last_error` is EC2's answer (code and message, never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchBackoff {
    pub until: DateTime<Utc>,
    pub delay: Duration,
    pub last_error: String,
}

pub fn class_statuses(
    policy: &Policy,
    pool: &Pool,
    backoff: &HashMap<String, LaunchBackoff>,
    now: DateTime<Utc>,
) -> BTreeMap<String, ClassStatus> {
    let fleet = |state| {
        pool.machines()
            .values()
            .filter(|m| m.state == state)
            .count() as u32
    };
    let fleet_booting = fleet(MachineState::Booting);
    let fleet_live = pool.machines().len() as u32 - fleet(MachineState::Terminating);
    policy
        .classes
        .iter()
        .map(|(name, class)| {
            let count = |state| pool.count(name, state);
            let (idle, leased, booting) = (
                count(MachineState::Idle),
                count(MachineState::Leased),
                count(MachineState::Booting),
            );
            let stopped = count(MachineState::Stopping) + count(MachineState::Stopped);
            let starting = count(MachineState::Starting);
            let live = idle + leased + booting + stopped + starting + count(MachineState::Broken);
            let waiting = pool.waiting(name);
            let backoff = backoff.get(name).filter(|b| now < b.until);
            let waiting_for = (waiting > 0).then(|| {
                if pool.is_draining() {
                    "nothing: the daemon is draining and grants no leases".to_owned()
                // Starts come before launches, and are held up by neither a launch
                // backoff nor max_machines (a stopped machine already counts).
                } else if starting > 0 {
                    format!("{starting} stopped machine(s) starting")
                } else if count(MachineState::Stopped) > 0 {
                    "a start of a stopped machine on the next reconcile pass".to_owned()
                } else if let Some(b) = backoff {
                    format!(
                        "launch backoff until {} after: {}",
                        b.until.format("%H:%M:%S UTC"),
                        b.last_error
                    )
                } else if live >= class.max_machines {
                    format!(
                        "a machine to be released: max_machines ({}) reached",
                        class.max_machines
                    )
                } else if fleet_live >= policy.max_machines {
                    format!(
                        "a machine to be released: the fleet's max_machines ({}) reached",
                        policy.max_machines
                    )
                } else if booting > 0 {
                    format!("{booting} machine(s) booting")
                } else if fleet_booting >= policy.max_growth_rate {
                    format!(
                        "other classes' machines to boot: max_growth_rate ({}) reached",
                        policy.max_growth_rate
                    )
                } else {
                    "a launch on the next reconcile pass".to_owned()
                }
            });
            let status = ClassStatus {
                idle,
                leased,
                booting,
                stopped,
                starting,
                live,
                jobs: pool.jobs_on(name),
                jobs_per_machine: class.slots(),
                max_machines: class.max_machines,
                waiting,
                launch_backoff_until: backoff.map(|b| b.until),
                last_launch_error: backoff.map(|b| b.last_error.clone()),
                waiting_for,
            };
            (name.clone(), status)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Machine;
    use chrono::TimeZone;
    use flotilla_proto::config::Config;

    fn policy(max_machines: u32) -> Policy {
        let text = format!(
            "fleet = \"f\"\nstate_dir = \"/s\"\ndefault_class = \"c\"\n[classes.c]\nami = \"a\"\ninstance_types = [\"t\"]\nsubnets = [\"s\"]\nmax_machines = {max_machines}\n"
        );
        Policy::from_config(&Config::from_toml(&text).unwrap())
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 2, 10, 0, 0).unwrap()
    }

    fn pool(waiting: u32, machines: &[MachineState]) -> Pool {
        let mut pool = Pool::default();
        for (i, state) in machines.iter().enumerate() {
            let mut m = Machine::booting(format!("m{i}"), "c".into(), "t".into(), now());
            m.state = *state;
            pool.insert_for_test(m);
        }
        if waiting > 0 {
            pool.set_waiting_for_test("c", waiting);
        }
        pool
    }

    fn waiting_for(
        policy: &Policy,
        pool: &Pool,
        backoff: &HashMap<String, LaunchBackoff>,
    ) -> Option<String> {
        class_statuses(policy, pool, backoff, now())["c"]
            .waiting_for
            .clone()
    }

    #[test]
    fn each_reason_a_waiting_job_is_not_served_is_named() {
        let none = HashMap::new();
        let p = policy(2);
        assert_eq!(waiting_for(&p, &pool(0, &[]), &none), None);
        assert_eq!(
            waiting_for(&p, &pool(1, &[]), &none).as_deref(),
            Some("a launch on the next reconcile pass")
        );
        assert_eq!(
            waiting_for(&p, &pool(1, &[MachineState::Booting]), &none).as_deref(),
            Some("1 machine(s) booting")
        );
        let full = pool(3, &[MachineState::Leased, MachineState::Booting]);
        assert_eq!(
            waiting_for(&p, &full, &none).as_deref(),
            Some("a machine to be released: max_machines (2) reached")
        );
        let backoff = HashMap::from([(
            "c".to_string(),
            LaunchBackoff {
                until: now() + chrono::Duration::seconds(10),
                delay: Duration::from_secs(10),
                last_error: "RunInstances: InsufficientInstanceCapacity".into(),
            },
        )]);
        let s = &class_statuses(&p, &pool(1, &[]), &backoff, now())["c"];
        assert_eq!(
            s.waiting_for.as_deref(),
            Some("launch backoff until 10:00:10 UTC after: RunInstances: InsufficientInstanceCapacity")
        );
        assert!(s.last_launch_error.is_some());
        // A backoff that has run out is no longer a reason.
        let later = class_statuses(
            &p,
            &pool(1, &[]),
            &backoff,
            now() + chrono::Duration::seconds(11),
        );
        assert_eq!(later["c"].launch_backoff_until, None);
        // The stopped pool: a start before any launch, whatever the backoff or the cap.
        let stopped = pool(3, &[MachineState::Leased, MachineState::Stopped]);
        assert_eq!(
            waiting_for(&p, &stopped, &backoff).as_deref(),
            Some("a start of a stopped machine on the next reconcile pass")
        );
        let starting = pool(3, &[MachineState::Leased, MachineState::Starting]);
        assert_eq!(
            waiting_for(&p, &starting, &backoff).as_deref(),
            Some("1 stopped machine(s) starting")
        );
        let mut draining = pool(1, &[]);
        draining.set_draining(true);
        assert!(waiting_for(&p, &draining, &backoff).is_some_and(|w| w.contains("draining")));
    }

    #[test]
    fn counts_are_per_state_and_terminating_machines_are_not_live() {
        let p = policy(5);
        let pool = pool(
            0,
            &[
                MachineState::Idle,
                MachineState::Idle,
                MachineState::Leased,
                MachineState::Terminating,
                MachineState::Stopping,
                MachineState::Stopped,
                MachineState::Starting,
            ],
        );
        let s = &class_statuses(&p, &pool, &HashMap::new(), now())["c"];
        assert_eq!((s.idle, s.leased, s.booting, s.live), (2, 1, 0, 6));
        assert_eq!((s.stopped, s.starting), (2, 1));
        assert_eq!(s.max_machines, 5);
    }
}

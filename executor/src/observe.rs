//! Folding one DescribeInstances result into the pool. Pure: no I/O, explicit time.
//!
//! EC2 is the truth about which machines exist; the pool is the truth about leases. A
//! machine missing from a *successful* observation (past a short visibility grace, since
//! EC2 is eventually consistent) or shutting down without us asking is lost: marked broken
//! and its job told. A failed observation is never passed here, so it can never kill one.
//!
//! After an unreadable pool state (`flotilla daemon --adopt`), [`adopt`] takes in the
//! fleet's running instances the first observation lists, and [`drain_adopted`] retires
//! them once they are free, instead of reaping them as orphans.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_proto::api::MachineState;

use crate::ec2::ObservedInstance;
use crate::pool::{Machine, Pool, TerminateReason};

/// What the observation means beyond the pool updates it made.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Fleet-tagged instances unknown to the pool past the orphan grace: to terminate.
    pub orphans: Vec<String>,
    /// Machines that vanished or stopped behind our back (id, why).
    pub lost: Vec<(String, String)>,
    /// Terminating machines now gone from EC2, dropped from the pool.
    pub forgotten: Vec<String>,
}

pub struct Graces {
    pub visibility: Duration,
    pub orphan: Duration,
}

pub fn fold(
    pool: &mut Pool,
    observed: &[ObservedInstance],
    now: DateTime<Utc>,
    graces: &Graces,
    unknown_since: &mut HashMap<String, DateTime<Utc>>,
) -> Observation {
    let mut out = Observation::default();
    let mut seen_machines = HashSet::new();
    let mut seen_unknown = HashSet::new();
    let older_than = |t: DateTime<Utc>, d: Duration| (now - t).to_std().unwrap_or_default() >= d;

    for inst in observed {
        let known = inst
            .machine_id
            .as_ref()
            .filter(|id| pool.machines.contains_key(id.as_str()));
        let Some(machine_id) = known else {
            seen_unknown.insert(inst.instance_id.clone());
            let first = *unknown_since.entry(inst.instance_id.clone()).or_insert(now);
            if !inst.life.is_gone() && older_than(first, graces.orphan) {
                out.orphans.push(inst.instance_id.clone());
            }
            continue;
        };
        seen_machines.insert(machine_id.clone());
        let Some(m) = pool.machines.get_mut(machine_id) else {
            continue;
        };
        // Adopt what a crash mid-launch left unrecorded.
        if m.instance_id.is_empty() {
            m.instance_id = inst.instance_id.clone();
        }
        if m.address.is_empty() {
            if let Some(ip) = &inst.private_ip {
                m.address = ip.clone();
            }
        }
        if inst.life.is_gone() && m.state != MachineState::Terminating {
            let why = format!(
                "instance {} is {:?} (terminated or reclaimed outside flotilla)",
                inst.instance_id, inst.life
            )
            .to_lowercase();
            out.lost.push((m.id.clone(), why));
        }
    }
    unknown_since.retain(|id, _| seen_unknown.contains(id));

    let missing: Vec<(String, MachineState, DateTime<Utc>, String)> = pool
        .machines
        .values()
        .filter(|m| !seen_machines.contains(&m.id))
        .map(|m| (m.id.clone(), m.state, m.launched_at, m.instance_id.clone()))
        .collect();
    for (id, state, launched_at, instance_id) in missing {
        if state == MachineState::Terminating {
            if !instance_id.is_empty() || older_than(launched_at, graces.visibility) {
                pool.machines.remove(&id);
                out.forgotten.push(id);
            }
        } else if older_than(
            launched_at,
            // A launch still in flight (throttled, retried) has no instance yet: give it
            // as long as an unknown instance gets before it is called an orphan.
            if instance_id.is_empty() {
                graces.orphan.max(graces.visibility)
            } else {
                graces.visibility
            },
        ) {
            let shown = if instance_id.is_empty() {
                "never launched".to_string()
            } else {
                instance_id
            };
            out.lost
                .push((id, format!("instance {shown} no longer exists in EC2")));
        }
    }
    for (id, why) in &out.lost {
        pool.mark_broken(id, why);
    }
    out
}

/// `flotilla daemon --adopt`: the pool state was unreadable and has been moved aside, so
/// the pool starts empty while the fleet's instances run on. Applied to the first
/// successful observation only, before [`fold`]: every live instance of the fleet that
/// carries a machine tag the pool does not know is adopted instead of becoming an orphan.
/// Instances without a machine tag were not launched by flotilla (it tags in the launch
/// call) and keep the orphan rules. Returns the adopted machine ids.
///
/// Adopted machines are drained, never put back in service: with the state lost, nothing
/// says whether a job still runs on one (a `run` stage checks its lease only when it
/// starts, and its script runs on), how many builds it ran, or whether its last job was
/// cleaned up. So an adopted machine is held `Leased` with no lease: never handed to a
/// job, never terminated by the plan, counted against `max_machines` (it exists),
/// health-checked like any leased machine (one that stops answering is marked broken and
/// replaced), and terminated by [`drain_adopted`] once no job containers are left on it.
/// The plan launches fresh machines for new jobs meanwhile.
pub fn adopt(pool: &mut Pool, observed: &[ObservedInstance], now: DateTime<Utc>) -> Vec<String> {
    let mut adopted = Vec::new();
    for inst in observed {
        let Some(machine_id) = inst.machine_id.as_deref().filter(|id| !id.is_empty()) else {
            continue;
        };
        let known = pool.machines.contains_key(machine_id)
            || pool
                .machines
                .values()
                .any(|m| m.instance_id == inst.instance_id);
        if inst.life.is_gone() || known {
            continue;
        }
        let mut m = Machine::booting(
            machine_id.to_owned(),
            inst.class.clone().unwrap_or_default(),
            inst.instance_type.clone(),
            inst.launched_at.unwrap_or(now),
        );
        m.instance_id = inst.instance_id.clone();
        m.address = inst.private_ip.clone().unwrap_or_default();
        m.state = MachineState::Leased;
        m.idle_since = now;
        m.adopted_at = Some(now);
        m.note = Some(
            "adopted after an unreadable pool state: drained (never leased), terminated once no job runs on it"
                .into(),
        );
        pool.machines.insert(m.id.clone(), m);
        adopted.push(machine_id.to_owned());
    }
    adopted
}

/// Retires adopted machines (see [`adopt`]): those in `free` (a check just found their
/// dockerd answering with no job containers: the job that ran there, if any, is over and
/// cleaned up) and those held `max_hold` or longer (`lease_timeout`: a job whose
/// containers are still there by then was abandoned, as an expired lease is). They become
/// `Terminating` (reason `drained`). Returns their ids.
pub fn drain_adopted(
    pool: &mut Pool,
    free: &HashSet<String>,
    now: DateTime<Utc>,
    max_hold: Duration,
) -> Vec<String> {
    let mut retired = Vec::new();
    for m in pool.machines.values_mut() {
        let Some(adopted_at) = m.adopted_at else {
            continue;
        };
        if m.state != MachineState::Leased || m.lease_id.is_some() {
            continue;
        }
        let held = (now - adopted_at).to_std().unwrap_or_default();
        let why = if free.contains(&m.id) {
            "adopted machine drained: no job containers left on it".to_string()
        } else if held >= max_hold {
            format!(
                "adopted machine drained: job containers still on it after {}s (abandoned)",
                held.as_secs()
            )
        } else {
            continue;
        };
        m.state = MachineState::Terminating;
        m.terminate_reason = Some(TerminateReason::Drained);
        m.note = Some(why);
        retired.push(m.id.clone());
    }
    retired
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::InstanceLife;
    use crate::pool::Machine;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }
    const G: Graces = Graces {
        visibility: Duration::from_secs(30),
        orphan: Duration::from_secs(600),
    };

    fn obs(id: &str, machine: Option<&str>, life: InstanceLife) -> ObservedInstance {
        ObservedInstance {
            instance_id: id.into(),
            life,
            machine_id: machine.map(Into::into),
            class: Some("c".into()),
            private_ip: Some("127.0.0.5".into()),
            instance_type: "t3.micro".into(),
            launched_at: None,
        }
    }

    fn pool_with(id: &str, instance: &str, state: MachineState) -> Pool {
        let mut pool = Pool::default();
        let mut m = Machine::booting(id.into(), "c".into(), "t3.micro".into(), t(0));
        m.instance_id = instance.into();
        m.state = state;
        pool.machines.insert(id.into(), m);
        pool
    }

    #[test]
    fn orphan_is_reaped_after_grace_and_never_before() {
        let mut pool = Pool::default();
        let mut seen = HashMap::new();
        let o = [obs("i-x", Some("m-unknown"), InstanceLife::Running)];
        assert!(fold(&mut pool, &o, t(0), &G, &mut seen).orphans.is_empty());
        assert!(fold(&mut pool, &o, t(599), &G, &mut seen)
            .orphans
            .is_empty());
        assert_eq!(
            fold(&mut pool, &o, t(600), &G, &mut seen).orphans,
            vec!["i-x"]
        );
    }

    #[test]
    fn machine_terminated_behind_our_back_is_lost() {
        let mut pool = pool_with("m1", "i-1", MachineState::Idle);
        let out = fold(&mut pool, &[], t(100), &G, &mut HashMap::new());
        assert_eq!(out.lost.len(), 1);
        assert_eq!(pool.machines["m1"].state, MachineState::Broken);
    }

    #[test]
    fn fresh_launch_not_yet_visible_is_not_lost() {
        let mut pool = pool_with("m1", "i-1", MachineState::Booting);
        let out = fold(&mut pool, &[], t(10), &G, &mut HashMap::new());
        assert!(out.lost.is_empty());
        assert_eq!(pool.machines["m1"].state, MachineState::Booting);
    }

    #[test]
    fn launch_still_in_flight_is_not_lost_before_the_orphan_grace() {
        let mut pool = pool_with("m1", "", MachineState::Booting);
        let out = fold(&mut pool, &[], t(300), &G, &mut HashMap::new());
        assert!(out.lost.is_empty(), "{out:?}");
        let out = fold(&mut pool, &[], t(600), &G, &mut HashMap::new());
        assert_eq!(out.lost.len(), 1);
    }

    #[test]
    fn crash_mid_launch_is_adopted_by_machine_tag() {
        let mut pool = pool_with("m1", "", MachineState::Booting);
        let out = fold(
            &mut pool,
            &[obs("i-9", Some("m1"), InstanceLife::Pending)],
            t(5),
            &G,
            &mut HashMap::new(),
        );
        assert_eq!(out, Observation::default());
        assert_eq!(pool.machines["m1"].instance_id, "i-9");
        assert_eq!(pool.machines["m1"].address, "127.0.0.5");
    }

    #[test]
    fn terminated_machine_is_forgotten_once_gone() {
        let mut pool = pool_with("m1", "i-1", MachineState::Terminating);
        let out = fold(&mut pool, &[], t(5), &G, &mut HashMap::new());
        assert_eq!(out.forgotten, vec!["m1"]);
        assert!(pool.machines.is_empty());
    }

    #[test]
    fn spot_reclaim_marks_leased_machine_lost() {
        let mut pool = pool_with("m1", "i-1", MachineState::Idle);
        pool.try_lease("job", "c", "l1".into(), t(1)).unwrap();
        fold(
            &mut pool,
            &[obs("i-1", Some("m1"), InstanceLife::ShuttingDown)],
            t(5),
            &G,
            &mut HashMap::new(),
        );
        assert!(pool.leases["l1"].lost.is_some());
    }

    fn tagged(id: &str, machine: &str) -> ObservedInstance {
        ObservedInstance {
            launched_at: Some(t(-3600)),
            ..obs(id, Some(machine), InstanceLife::Running)
        }
    }

    #[test]
    fn adopt_takes_in_unknown_fleet_machines_instead_of_reaping_them() {
        let mut pool = Pool::default();
        let observed = [
            tagged("i-1", "m-1"),
            obs("i-2", None, InstanceLife::Running),
            obs("i-3", Some("m-3"), InstanceLife::Terminated),
            ObservedInstance {
                private_ip: None,
                ..obs("i-4", Some("m-4"), InstanceLife::Pending)
            },
        ];
        let mut seen = HashMap::new();
        let mut adopted = adopt(&mut pool, &observed, t(0));
        adopted.sort();
        assert_eq!(adopted, vec!["m-1", "m-4"]);
        let m = &pool.machines["m-1"];
        assert_eq!(m.state, MachineState::Leased);
        assert_eq!(m.lease_id, None);
        assert_eq!(m.adopted_at, Some(t(0)));
        assert_eq!(
            (m.instance_id.as_str(), m.address.as_str()),
            ("i-1", "127.0.0.5")
        );
        assert_eq!(m.launched_at, t(-3600));
        assert!(
            pool.try_lease("job", "c", "l1".into(), t(1)).is_none(),
            "an adopted machine is never leased"
        );

        // Past the orphan grace only the untagged instance is reaped; nothing is lost.
        assert_eq!(
            fold(&mut pool, &observed, t(0), &G, &mut seen),
            Observation::default()
        );
        let mut observed = observed;
        observed[3].private_ip = Some("127.0.0.5".into());
        let later = fold(&mut pool, &observed, t(600), &G, &mut seen);
        assert_eq!(later.orphans, vec!["i-2"]);
        assert!(later.lost.is_empty(), "{later:?}");
        assert_eq!(
            pool.machines["m-4"].address, "127.0.0.5",
            "address filled in once known"
        );

        // Adopting again (a later observation) changes nothing.
        assert!(adopt(&mut pool, &observed, t(700)).is_empty());
    }

    #[test]
    fn without_adopt_the_same_instance_is_an_orphan() {
        let mut pool = Pool::default();
        let observed = [tagged("i-1", "m-1")];
        let mut seen = HashMap::new();
        fold(&mut pool, &observed, t(0), &G, &mut seen);
        assert_eq!(
            fold(&mut pool, &observed, t(600), &G, &mut seen).orphans,
            vec!["i-1"]
        );
    }

    #[test]
    fn adopted_machines_are_drained_once_free_or_held_too_long() {
        let mut pool = Pool::default();
        adopt(
            &mut pool,
            &[
                tagged("i-1", "m-1"),
                tagged("i-2", "m-2"),
                tagged("i-3", "m-3"),
            ],
            t(0),
        );
        let hold = Duration::from_secs(86_400);
        let free: HashSet<String> = ["m-1".to_string()].into();
        assert_eq!(drain_adopted(&mut pool, &free, t(30), hold), vec!["m-1"]);
        assert_eq!(pool.machines["m-1"].state, MachineState::Terminating);
        assert_eq!(
            pool.machines["m-1"].terminate_reason,
            Some(TerminateReason::Drained)
        );
        // m-2 and m-3 still run a job: kept until the hold runs out.
        assert!(drain_adopted(&mut pool, &HashSet::new(), t(86_399), hold).is_empty());
        assert_eq!(pool.machines["m-2"].state, MachineState::Leased);
        // One stops answering health checks meanwhile: broken, replaced by the plan.
        pool.mark_broken("m-3", "its Docker daemon stopped answering");
        assert_eq!(pool.machines["m-3"].state, MachineState::Broken);
        assert_eq!(
            drain_adopted(&mut pool, &HashSet::new(), t(86_400), hold),
            vec!["m-2"]
        );
        // Ordinary machines are never touched.
        let mut ordinary = pool_with("m9", "i-9", MachineState::Leased);
        let everything: HashSet<String> = ["m9".to_string()].into();
        assert!(drain_adopted(&mut ordinary, &everything, t(999_999), hold).is_empty());
    }

    #[test]
    fn the_plan_neither_terminates_adopted_machines_nor_counts_them_as_available() {
        use crate::plan::{plan, Action, Policy};
        use flotilla_proto::config::{ClassConfig, Config};
        let mut config = Config::default();
        config.classes.insert(
            "c".into(),
            ClassConfig {
                idle_count: 1,
                ..ClassConfig::default()
            },
        );
        let policy = Policy::from_config(&config);
        let mut pool = Pool::default();
        adopt(&mut pool, &[tagged("i-1", "m-1")], t(0));
        pool.draining = false;
        let actions = plan(&policy, &pool, t(7200));
        assert_eq!(
            actions,
            vec![Action::Launch {
                class: "c".into(),
                count: 1
            }]
        );
        pool.draining = true;
        assert!(plan(&policy, &pool, t(7200)).is_empty());
    }
}

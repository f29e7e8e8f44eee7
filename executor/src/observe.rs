//! Folding one DescribeInstances result into the pool. Pure: no I/O, explicit time.
//!
//! EC2 is the truth about which machines exist; the pool is the truth about leases. A
//! machine missing from a *successful* observation (past a short visibility grace, since
//! EC2 is eventually consistent) or shutting down without us asking is lost: marked broken
//! and its job told. A failed observation is never passed here, so it can never kill one.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_proto::api::MachineState;

use crate::ec2::ObservedInstance;
use crate::pool::Pool;

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
}

//! Folding one DescribeInstances result into the pool. Pure: no I/O, explicit time.
//!
//! EC2 is the truth about which machines exist; the pool is the truth about leases. A
//! machine missing from a *successful* observation (past a short visibility grace, since
//! EC2 is eventually consistent) or shutting down without us asking is lost: marked broken
//! and its job told. A failed observation is never passed here, so it can never kill one.
//!
//! Instances are matched to machine records by instance id first, then by `flotilla:machine`
//! tag (only to a record with no instance id yet, or the same one: a crash mid-launch).
//!
//! Only our own unknown instances are reaped as orphans ([`Ownership`]): fleet-tagged, and
//! tagged with this daemon's id (or with no daemon id at all: launched by a version before
//! daemon ids), and in one of the configured classes' subnets. Anything else with the
//! fleet tag (another daemon sharing the fleet name, a subnet this daemon does not use) is
//! reported as `foreign` and never terminated, not even by `flotilla audit --terminate`.
//!
//! A `Terminating` record is kept while EC2 lists its instance in any state (the
//! termination is retried meanwhile) and dropped once EC2 reports it terminated: listed as
//! terminated, or no longer listed by a successful observation (DescribeInstances is asked
//! for every state but terminated) once it is known to have existed (it was ready or
//! adopted) or its launch is past the visibility grace (a fresh launch may not be listed yet).
//!
//! The stopped warm pool: a machine the pool has stopping, stopped or starting is matched
//! to what EC2 lists for it (stopping → stopped once listed so; starting → probed once
//! listed pending or running, at the listed address; a stopped one listed running was
//! started by someone else and is taken back as a start): never lost, never an orphan. A
//! booting, idle or leased machine EC2 lists stopped was stopped outside Flotilla: lost
//! (its job told), replaced. An unknown stopped instance of ours is an orphan like a
//! running one (its disks cost), and is never adopted.
//!
//! After an unreadable pool state (`flotilla daemon --adopt`), [`adopt`] takes in the
//! fleet's running instances the first observation lists, and [`drain_adopted`] retires
//! them once they are free, instead of reaping them as orphans.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_proto::api::MachineState;

use crate::ec2::{InstanceLife, ObservedInstance};
use crate::pool::{Adopted, Pool};

/// What the observation means beyond the pool updates it made.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Observation {
    /// Fleet-tagged instances unknown to the pool past the orphan grace: to terminate.
    pub orphans: Vec<String>,
    /// Machines that vanished or stopped behind our back (id, why).
    pub lost: Vec<(String, String)>,
    /// Terminating machines now gone from EC2, dropped from the pool.
    pub forgotten: Vec<String>,
    /// Fleet-tagged instances unknown to the pool that are not ours to terminate
    /// (instance id, why): reported, never reaped.
    pub foreign: Vec<(String, String)>,
    /// Stopping machines EC2 now lists stopped.
    pub stopped: Vec<String>,
    /// Starting machines EC2 lists pending or running: to health-check (their address
    /// re-read from the listing).
    pub started: Vec<String>,
}

/// What makes an unknown fleet-tagged instance this daemon's to reap.
#[derive(Debug, Clone)]
pub(crate) struct Ownership {
    pub fleet: String,
    /// This daemon's persistent id (`<state_dir>/daemon-id`).
    pub daemon_id: String,
    /// Every subnet of the configured classes.
    pub subnets: BTreeSet<String>,
}

impl Ownership {
    /// `None` if an unknown instance of the fleet is ours to reap, else why not.
    /// Instances without a daemon tag were launched by a version before daemon ids: ours
    /// if they are in our subnets (upgrading keeps reaping the orphans it left), foreign
    /// otherwise.
    pub(crate) fn why_not_ours(&self, inst: &ObservedInstance) -> Option<String> {
        let fleet = &self.fleet;
        if let Some(id) = inst.daemon_id.as_deref().filter(|id| *id != self.daemon_id) {
            return Some(format!(
                "tagged for fleet {fleet} by another daemon (id {id}): not ours to terminate"
            ));
        }
        let subnet = inst.subnet.as_deref().unwrap_or("");
        if !self.subnets.contains(subnet) {
            let by = match inst.daemon_id.as_deref() {
                Some(id) => format!("by this daemon (id {id})"),
                None => "without a daemon id".to_string(),
            };
            let subnet = if subnet.is_empty() {
                "no subnet"
            } else {
                subnet
            };
            return Some(format!(
                "tagged for fleet {fleet} {by} but in {subnet}, outside this daemon's configured subnets: not ours to terminate"
            ));
        }
        None
    }
}

pub(crate) struct Graces {
    pub visibility: Duration,
    pub orphan: Duration,
}

pub(crate) fn fold(
    pool: &mut Pool,
    observed: &[ObservedInstance],
    now: DateTime<Utc>,
    graces: &Graces,
    owner: &Ownership,
    unknown_since: &mut HashMap<String, DateTime<Utc>>,
) -> Observation {
    let mut out = Observation::default();
    let mut seen_machines = HashSet::new();
    let mut seen_unknown = HashSet::new();
    let older_than = |t: DateTime<Utc>, d: Duration| (now - t).to_std().unwrap_or_default() >= d;
    let by_instance: HashMap<String, String> = pool
        .machines()
        .values()
        .filter(|m| !m.instance_id.is_empty())
        .map(|m| (m.instance_id.clone(), m.id.clone()))
        .collect();

    for inst in observed {
        // By instance id first; by machine tag only to a record that has no instance yet
        // (or this one): another instance carrying a known machine tag is not that machine.
        let known = by_instance.get(&inst.instance_id).cloned().or_else(|| {
            inst.machine_id.clone().filter(|id| {
                pool.machines()
                    .get(id.as_str())
                    .is_some_and(|m| m.instance_id.is_empty() || m.instance_id == inst.instance_id)
            })
        });
        let Some(machine_id) = known else {
            seen_unknown.insert(inst.instance_id.clone());
            let first = *unknown_since.entry(inst.instance_id.clone()).or_insert(now);
            if let Some(why) = owner.why_not_ours(inst) {
                out.foreign.push((inst.instance_id.clone(), why));
            } else if !inst.life.is_gone() && older_than(first, graces.orphan) {
                out.orphans.push(inst.instance_id.clone());
            }
            continue;
        };
        let Some(m) = pool.machine(&machine_id) else {
            continue;
        };
        if m.state == MachineState::Terminating && inst.life == InstanceLife::Terminated {
            // EC2 reports it terminated: the record has served its purpose.
            pool.forget(&machine_id);
            out.forgotten.push(machine_id);
            continue;
        }
        seen_machines.insert(machine_id.clone());
        let state = m.state;
        // Ready a moment ago: a listing a little behind (EC2 is eventually consistent) may
        // still show the stop a start just undid.
        let just_ready = m
            .ready_at
            .is_some_and(|t| !older_than(t, graces.visibility));
        let running = matches!(inst.life, InstanceLife::Pending | InstanceLife::Running);
        match state {
            MachineState::Terminating => {}
            _ if inst.life.is_gone() => {
                let why = format!(
                    "instance {} is {:?} (terminated or reclaimed outside flotilla)",
                    inst.instance_id, inst.life
                )
                .to_lowercase();
                out.lost.push((machine_id.clone(), why));
            }
            // The stopped pool: a stop, a stopped machine and a start are what EC2 lists
            // between them. A stop not carried out yet is resent after a while (reconcile);
            // a start not yet visible is bounded by its boot timeout (plan).
            MachineState::Stopping if inst.life == InstanceLife::Stopped => {
                pool.mark_stopped(&machine_id);
                out.stopped.push(machine_id.clone());
            }
            MachineState::Stopping | MachineState::Stopped if !running => {}
            MachineState::Stopping => {}
            MachineState::Stopped => {
                // Started outside Flotilla: taken back as a start, health-checked first.
                pool.started_outside(&machine_id, now);
                if let Some(ip) = inst.private_ip.as_deref() {
                    pool.readdress_started(&machine_id, ip);
                }
                out.started.push(machine_id.clone());
            }
            MachineState::Starting if running => {
                if let Some(ip) = inst.private_ip.as_deref() {
                    pool.readdress_started(&machine_id, ip);
                }
                out.started.push(machine_id.clone());
            }
            MachineState::Starting => {}
            // Stopped behind Flotilla's back while booting, idle or leased: it serves no
            // job and its state (a job's leftovers, a half boot) is unknown, so it is lost
            // like a terminated one: its job told, the machine replaced (a broken stopped
            // instance is terminated by the plan like any broken machine).
            _ if inst.life.is_stopped() && !just_ready => {
                let why = format!(
                    "instance {} is {:?} (stopped outside flotilla while {})",
                    inst.instance_id,
                    inst.life,
                    state.as_str()
                )
                .to_lowercase();
                out.lost.push((machine_id.clone(), why));
            }
            _ => {}
        }
        // Adopt what a crash mid-launch left unrecorded.
        pool.fill_in_instance(&machine_id, &inst.instance_id, inst.private_ip.as_deref());
    }
    unknown_since.retain(|id, _| seen_unknown.contains(id));

    let missing: Vec<(String, MachineState, DateTime<Utc>, String, bool)> = pool
        .machines()
        .values()
        .filter(|m| !seen_machines.contains(&m.id))
        .map(|m| {
            // Known to have existed: its dockerd answered, or it was adopted from a listing.
            let existed = m.ready_at.is_some() || m.adopted_at.is_some();
            (
                m.id.clone(),
                m.state,
                m.launched_at,
                m.instance_id.clone(),
                existed,
            )
        })
        .collect();
    for (id, state, launched_at, instance_id, existed) in missing {
        if state == MachineState::Terminating {
            // Not listed: terminated (the listing asks for every other state), unless the
            // launch is too recent to be visible yet and nothing says it ever ran.
            if (existed && !instance_id.is_empty()) || older_than(launched_at, graces.visibility) {
                pool.forget(&id);
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
/// call) and keep the orphan rules, as do instances that are not ours ([`Ownership`]:
/// another daemon's, or outside our subnets), which are never adopted (adopting drains,
/// that is terminates). Returns the adopted machine ids.
///
/// Adopted machines are drained, never put back in service: with the state lost, nothing
/// says whether a job still runs on one (a `run` stage checks its lease only when it
/// starts, and its script runs on), how many builds it ran, or whether its last job was
/// cleaned up. So an adopted machine is held `Leased` with no lease: never handed to a
/// job, never terminated by the plan, counted against `max_machines` (it exists),
/// health-checked like any leased machine (one that stops answering is marked broken and
/// replaced), and terminated by [`drain_adopted`] once no job containers are left on it.
/// The plan launches fresh machines for new jobs meanwhile.
pub(crate) fn adopt(
    pool: &mut Pool,
    observed: &[ObservedInstance],
    now: DateTime<Utc>,
    owner: &Ownership,
) -> Vec<String> {
    let mut adopted = Vec::new();
    for inst in observed {
        let Some(machine_id) = inst.machine_id.as_deref().filter(|id| !id.is_empty()) else {
            continue;
        };
        let known = pool.machines().contains_key(machine_id)
            || pool
                .machines()
                .values()
                .any(|m| m.instance_id == inst.instance_id);
        // Only running instances: a stopped one of ours without a record is an orphan.
        if inst.life.is_gone()
            || inst.life.is_stopped()
            || known
            || owner.why_not_ours(inst).is_some()
        {
            continue;
        }
        pool.adopt(
            Adopted {
                machine_id: machine_id.to_owned(),
                instance_id: inst.instance_id.clone(),
                class: inst.class.clone().unwrap_or_default(),
                instance_type: inst.instance_type.clone(),
                address: inst.private_ip.clone().unwrap_or_default(),
                launched_at: inst.launched_at.unwrap_or(now),
            },
            now,
        );
        adopted.push(machine_id.to_owned());
    }
    adopted
}

/// Retires adopted machines (see [`adopt`]): those in `free` (a check just found their
/// dockerd answering with no job containers: the job that ran there, if any, is over and
/// cleaned up) and those held `max_hold` or longer (`lease_timeout`: a job whose
/// containers are still there by then was abandoned, as an expired lease is). They become
/// `Terminating` (reason `drained`). Returns their ids.
pub(crate) fn drain_adopted(
    pool: &mut Pool,
    free: &HashSet<String>,
    now: DateTime<Utc>,
    max_hold: Duration,
) -> Vec<String> {
    let due: Vec<(String, String)> = pool
        .machines()
        .values()
        .filter(|m| m.state == MachineState::Leased && m.leases.is_empty())
        .filter_map(|m| {
            let held = (now - m.adopted_at?).to_std().unwrap_or_default();
            let why = if free.contains(&m.id) {
                "adopted machine drained: no job containers left on it".to_string()
            } else if held >= max_hold {
                format!(
                    "adopted machine drained: job containers still on it after {}s (abandoned)",
                    held.as_secs()
                )
            } else {
                return None;
            };
            Some((m.id.clone(), why))
        })
        .collect();
    due.into_iter()
        .filter_map(|(id, why)| pool.retire_adopted(&id, why).then_some(id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Machine;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }
    const G: Graces = Graces {
        visibility: Duration::from_secs(30),
        orphan: Duration::from_secs(600),
    };

    fn own() -> Ownership {
        Ownership {
            fleet: "f".into(),
            daemon_id: "d-ours".into(),
            subnets: ["subnet-a".to_string(), "subnet-b".to_string()].into(),
        }
    }

    fn obs(id: &str, machine: Option<&str>, life: InstanceLife) -> ObservedInstance {
        ObservedInstance {
            instance_id: id.into(),
            life,
            machine_id: machine.map(Into::into),
            class: Some("c".into()),
            daemon_id: Some("d-ours".into()),
            subnet: Some("subnet-a".into()),
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
        pool.insert_for_test(m);
        pool
    }

    #[test]
    fn orphan_is_reaped_after_grace_and_never_before() {
        let mut pool = Pool::default();
        let mut seen = HashMap::new();
        let o = [obs("i-x", Some("m-unknown"), InstanceLife::Running)];
        assert!(fold(&mut pool, &o, t(0), &G, &own(), &mut seen)
            .orphans
            .is_empty());
        assert!(fold(&mut pool, &o, t(599), &G, &own(), &mut seen)
            .orphans
            .is_empty());
        assert_eq!(
            fold(&mut pool, &o, t(600), &G, &own(), &mut seen).orphans,
            vec!["i-x"]
        );
    }

    #[test]
    fn machine_terminated_behind_our_back_is_lost() {
        let mut pool = pool_with("m1", "i-1", MachineState::Idle);
        let out = fold(&mut pool, &[], t(100), &G, &own(), &mut HashMap::new());
        assert_eq!(out.lost.len(), 1);
        assert_eq!(pool.machines()["m1"].state, MachineState::Broken);
    }

    #[test]
    fn fresh_launch_not_yet_visible_is_not_lost() {
        let mut pool = pool_with("m1", "i-1", MachineState::Booting);
        let out = fold(&mut pool, &[], t(10), &G, &own(), &mut HashMap::new());
        assert!(out.lost.is_empty());
        assert_eq!(pool.machines()["m1"].state, MachineState::Booting);
    }

    #[test]
    fn launch_still_in_flight_is_not_lost_before_the_orphan_grace() {
        let mut pool = pool_with("m1", "", MachineState::Booting);
        let out = fold(&mut pool, &[], t(300), &G, &own(), &mut HashMap::new());
        assert!(out.lost.is_empty(), "{out:?}");
        let out = fold(&mut pool, &[], t(600), &G, &own(), &mut HashMap::new());
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
            &own(),
            &mut HashMap::new(),
        );
        assert_eq!(out, Observation::default());
        assert_eq!(pool.machines()["m1"].instance_id, "i-9");
        assert_eq!(pool.machines()["m1"].address, "127.0.0.5");
    }

    #[test]
    fn terminated_machine_is_forgotten_once_gone() {
        let mut pool = pool_with("m1", "i-1", MachineState::Terminating);
        // Launched 5s ago and not listed: maybe not visible yet, kept.
        let out = fold(&mut pool, &[], t(5), &G, &own(), &mut HashMap::new());
        assert!(out.forgotten.is_empty(), "{out:?}");
        let out = fold(&mut pool, &[], t(30), &G, &own(), &mut HashMap::new());
        assert_eq!(out.forgotten, vec!["m1"]);
        assert!(pool.machines().is_empty());

        // One that ran (its dockerd answered) existed: not listed means terminated.
        let mut pool = pool_with("m2", "i-2", MachineState::Terminating);
        if let Some(m) = pool.machine_mut_for_test("m2") {
            m.ready_at = Some(t(3));
        }
        let out = fold(&mut pool, &[], t(5), &G, &own(), &mut HashMap::new());
        assert_eq!(out.forgotten, vec!["m2"]);
    }

    #[test]
    fn terminating_record_is_kept_until_ec2_reports_the_instance_terminated() {
        let mut pool = pool_with("m1", "i-1", MachineState::Terminating);
        let mut seen = HashMap::new();
        // Still running (the terminate call failed or is not yet applied) or shutting
        // down: kept, and never reported lost.
        for life in [InstanceLife::Running, InstanceLife::ShuttingDown] {
            let out = fold(
                &mut pool,
                &[obs("i-1", Some("m1"), life)],
                t(3600),
                &G,
                &own(),
                &mut seen,
            );
            assert_eq!(out, Observation::default(), "{life:?}");
            assert_eq!(pool.machines()["m1"].state, MachineState::Terminating);
        }
        // Listed as terminated: dropped at once.
        let out = fold(
            &mut pool,
            &[obs("i-1", Some("m1"), InstanceLife::Terminated)],
            t(3601),
            &G,
            &own(),
            &mut seen,
        );
        assert_eq!(out.forgotten, vec!["m1"]);
        assert!(pool.machines().is_empty());
        assert!(out.orphans.is_empty() && out.lost.is_empty(), "{out:?}");

        // No longer listed after shutting down (the listing excludes terminated): dropped.
        let mut pool = pool_with("m2", "i-2", MachineState::Terminating);
        fold(
            &mut pool,
            &[obs("i-2", Some("m2"), InstanceLife::ShuttingDown)],
            t(3600),
            &G,
            &own(),
            &mut seen,
        );
        let out = fold(&mut pool, &[], t(3610), &G, &own(), &mut seen);
        assert_eq!(out.forgotten, vec!["m2"]);
    }

    #[test]
    fn instances_are_matched_by_instance_id_before_machine_tag() {
        // Matched by instance id whatever its machine tag says (or none).
        let mut pool = pool_with("m1", "i-1", MachineState::Idle);
        let mut seen = HashMap::new();
        let out = fold(
            &mut pool,
            &[obs("i-1", None, InstanceLife::Running)],
            t(100),
            &G,
            &own(),
            &mut seen,
        );
        assert_eq!(out, Observation::default());
        assert_eq!(pool.machines()["m1"].state, MachineState::Idle);

        // Another instance carrying m1's tag is not m1: m1 is still running, and the
        // other one going away does not make m1 lost. It is an unknown instance.
        let o = [
            obs("i-1", Some("m1"), InstanceLife::Running),
            obs("i-2", Some("m1"), InstanceLife::ShuttingDown),
        ];
        let out = fold(&mut pool, &o, t(200), &G, &own(), &mut seen);
        assert!(out.lost.is_empty(), "{out:?}");
        assert_eq!(pool.machines()["m1"].instance_id, "i-1");
        assert!(seen.contains_key("i-2"));
        let o = [
            obs("i-1", Some("m1"), InstanceLife::Running),
            obs("i-2", Some("m1"), InstanceLife::Running),
        ];
        assert_eq!(
            fold(&mut pool, &o, t(800), &G, &own(), &mut seen).orphans,
            vec!["i-2"]
        );
    }

    #[test]
    fn another_daemons_instances_are_reported_never_reaped() {
        let mut pool = Pool::default();
        let mut seen = HashMap::new();
        let theirs = ObservedInstance {
            daemon_id: Some("d-theirs".into()),
            ..obs("i-t", Some("m-t"), InstanceLife::Running)
        };
        for now in [t(0), t(600), t(100_000)] {
            let out = fold(
                &mut pool,
                std::slice::from_ref(&theirs),
                now,
                &G,
                &own(),
                &mut seen,
            );
            assert!(out.orphans.is_empty(), "{out:?}");
            assert_eq!(out.foreign.len(), 1);
            assert_eq!(out.foreign[0].0, "i-t");
            assert!(
                out.foreign[0].1.contains("another daemon (id d-theirs)")
                    && out.foreign[0].1.contains("not ours to terminate"),
                "{}",
                out.foreign[0].1
            );
        }
        // Nor adopted (adopting drains, that is terminates).
        assert!(adopt(&mut pool, &[theirs], t(0), &own()).is_empty());
    }

    #[test]
    fn our_id_outside_our_subnets_is_reported_never_reaped() {
        let mut pool = Pool::default();
        let mut seen = HashMap::new();
        let elsewhere = ObservedInstance {
            subnet: Some("subnet-z".into()),
            ..obs("i-z", Some("m-z"), InstanceLife::Running)
        };
        let out = fold(
            &mut pool,
            std::slice::from_ref(&elsewhere),
            t(0),
            &G,
            &own(),
            &mut seen,
        );
        let out2 = fold(&mut pool, &[elsewhere], t(600), &G, &own(), &mut seen);
        assert!(out.orphans.is_empty() && out2.orphans.is_empty());
        assert!(out2.foreign[0].1.contains("subnet-z"), "{out2:?}");
    }

    #[test]
    fn instances_from_before_daemon_ids_are_ours_only_in_our_subnets() {
        let mut pool = Pool::default();
        let mut seen = HashMap::new();
        let old = |id: &str, subnet: &str| ObservedInstance {
            daemon_id: None,
            subnet: Some(subnet.into()),
            ..obs(id, Some("m-old"), InstanceLife::Running)
        };
        let o = [old("i-in", "subnet-b"), old("i-out", "subnet-z")];
        fold(&mut pool, &o, t(0), &G, &own(), &mut seen);
        let out = fold(&mut pool, &o, t(600), &G, &own(), &mut seen);
        assert_eq!(out.orphans, vec!["i-in"]);
        assert_eq!(out.foreign.len(), 1);
        assert!(
            out.foreign[0].1.contains("without a daemon id"),
            "{:?}",
            out.foreign
        );
    }

    #[test]
    fn the_stopped_pool_is_neither_lost_nor_orphaned() {
        let mut seen = HashMap::new();
        // Stopping, then EC2 says stopped: stopped in the pool, nothing lost.
        let mut pool = pool_with("m1", "i-1", MachineState::Stopping);
        for life in [InstanceLife::Running, InstanceLife::Stopping] {
            let out = fold(
                &mut pool,
                &[obs("i-1", Some("m1"), life)],
                t(100),
                &G,
                &own(),
                &mut seen,
            );
            assert_eq!(out, Observation::default(), "{life:?}");
            assert_eq!(pool.machines()["m1"].state, MachineState::Stopping);
        }
        let out = fold(
            &mut pool,
            &[obs("i-1", Some("m1"), InstanceLife::Stopped)],
            t(101),
            &G,
            &own(),
            &mut seen,
        );
        assert_eq!(out.stopped, vec!["m1"]);
        assert!(out.lost.is_empty());
        assert_eq!(pool.machines()["m1"].state, MachineState::Stopped);
        let out = fold(
            &mut pool,
            &[obs("i-1", Some("m1"), InstanceLife::Stopped)],
            t(9000),
            &G,
            &own(),
            &mut seen,
        );
        assert_eq!(out, Observation::default());

        // Starting: still listed stopped (the start not visible yet), then pending at a
        // new address: to probe there.
        assert!(pool.begin_start("m1", t(9001)));
        let out = fold(
            &mut pool,
            &[obs("i-1", Some("m1"), InstanceLife::Stopped)],
            t(9002),
            &G,
            &own(),
            &mut seen,
        );
        assert_eq!(out, Observation::default());
        let moved = ObservedInstance {
            private_ip: Some("10.1.2.3".into()),
            ..obs("i-1", Some("m1"), InstanceLife::Pending)
        };
        let out = fold(&mut pool, &[moved], t(9003), &G, &own(), &mut seen);
        assert_eq!(out.started, vec!["m1"]);
        assert_eq!(pool.machines()["m1"].address, "10.1.2.3");
        assert_eq!(pool.machines()["m1"].state, MachineState::Starting);

        // Idle, but EC2 says stopped (outside flotilla): lost, replaced.
        let mut pool = pool_with("m2", "i-2", MachineState::Idle);
        let out = fold(
            &mut pool,
            &[obs("i-2", Some("m2"), InstanceLife::Stopped)],
            t(100),
            &G,
            &own(),
            &mut seen,
        );
        assert_eq!(out.lost.len(), 1);
        assert!(
            out.lost[0]
                .1
                .contains("stopped outside flotilla while idle"),
            "{out:?}"
        );
        assert_eq!(pool.machines()["m2"].state, MachineState::Broken);

        // An unknown stopped instance of ours is an orphan (its disk costs), not adopted.
        let mut pool = Pool::default();
        let o = [obs("i-x", Some("m-x"), InstanceLife::Stopped)];
        assert!(adopt(&mut pool, &o, t(0), &own()).is_empty());
        fold(&mut pool, &o, t(0), &G, &own(), &mut seen);
        assert_eq!(
            fold(&mut pool, &o, t(600), &G, &own(), &mut seen).orphans,
            vec!["i-x"]
        );
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
            &own(),
            &mut HashMap::new(),
        );
        assert!(pool.leases()["l1"].lost.is_some());
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
        let mut adopted = adopt(&mut pool, &observed, t(0), &own());
        adopted.sort();
        assert_eq!(adopted, vec!["m-1", "m-4"]);
        let m = &pool.machines()["m-1"];
        assert_eq!(m.state, MachineState::Leased);
        assert!(m.leases.is_empty());
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
            fold(&mut pool, &observed, t(0), &G, &own(), &mut seen),
            Observation::default()
        );
        let mut observed = observed;
        observed[3].private_ip = Some("127.0.0.5".into());
        let later = fold(&mut pool, &observed, t(600), &G, &own(), &mut seen);
        assert_eq!(later.orphans, vec!["i-2"]);
        assert!(later.lost.is_empty(), "{later:?}");
        assert_eq!(
            pool.machines()["m-4"].address,
            "127.0.0.5",
            "address filled in once known"
        );

        // Adopting again (a later observation) changes nothing.
        assert!(adopt(&mut pool, &observed, t(700), &own()).is_empty());
    }

    #[test]
    fn without_adopt_the_same_instance_is_an_orphan() {
        let mut pool = Pool::default();
        let observed = [tagged("i-1", "m-1")];
        let mut seen = HashMap::new();
        fold(&mut pool, &observed, t(0), &G, &own(), &mut seen);
        assert_eq!(
            fold(&mut pool, &observed, t(600), &G, &own(), &mut seen).orphans,
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
            &own(),
        );
        let hold = Duration::from_secs(86_400);
        let free: HashSet<String> = ["m-1".to_string()].into();
        assert_eq!(drain_adopted(&mut pool, &free, t(30), hold), vec!["m-1"]);
        assert_eq!(pool.machines()["m-1"].state, MachineState::Terminating);
        assert_eq!(
            pool.machines()["m-1"].terminate_reason,
            Some(crate::pool::TerminateReason::Drained)
        );
        // m-2 and m-3 still run a job: kept until the hold runs out.
        assert!(drain_adopted(&mut pool, &HashSet::new(), t(86_399), hold).is_empty());
        assert_eq!(pool.machines()["m-2"].state, MachineState::Leased);
        // One stops answering health checks meanwhile: broken, replaced by the plan.
        pool.mark_broken("m-3", "its Docker daemon stopped answering");
        assert_eq!(pool.machines()["m-3"].state, MachineState::Broken);
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
        adopt(&mut pool, &[tagged("i-1", "m-1")], t(0), &own());
        pool.set_draining(false);
        let actions = plan(&policy, &pool, t(7200));
        assert_eq!(
            actions,
            vec![Action::Launch {
                class: "c".into(),
                count: 1
            }]
        );
        pool.set_draining(true);
        assert!(plan(&policy, &pool, t(7200)).is_empty());
    }
}

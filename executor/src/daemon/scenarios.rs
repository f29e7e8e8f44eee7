//! The daemon's failure paths as millisecond unit tests: the real reconcile passes, boot
//! probes and health checks over a real state directory, with EC2 and the machines'
//! dockerd replaced by recording fakes ([`super::fakes`]) and time by a manual clock.
//! The end-to-end fleet tests keep one smoke test per path; the cases live here.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use flotilla_proto::api::{MachineState, ReleaseOutcome};
use tokio::sync::watch;

use super::fakes::{Call, Dockerd, FakeEc2, FakeMachines, Fault, Op};
use super::{reconcile, test_rig, Clock, Shared};
use crate::ec2::{InstanceLife, ObservedInstance, Purchase};
use crate::pool::{LeaseTerms, Pool, TerminateReason};
use crate::state_store::JournalOp;

struct Rig {
    shared: Arc<Shared>,
    ec2: Arc<FakeEc2>,
    machines: Arc<FakeMachines>,
    clock: Clock,
    dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

fn start() -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 0).unwrap()
}

/// A daemon over a fresh state directory: class `c` with `class` keys, `top` keys.
fn rig(top: &str, class: &str) -> Rig {
    rig_in(
        tempfile::tempdir().unwrap(),
        top,
        class,
        Clock::manual(start()),
    )
}

/// A daemon over `dir` (a restart when it holds a state).
fn rig_in(dir: tempfile::TempDir, top: &str, class: &str, clock: Clock) -> Rig {
    let (stop_tx, stop_rx) = watch::channel(false);
    let ec2 = Arc::new(FakeEc2::new(clock.clone()));
    let machines = Arc::new(FakeMachines::default());
    let shared = test_rig(
        dir.path(),
        stop_rx,
        top,
        class,
        ec2.clone(),
        machines.clone(),
        clock.clone(),
    );
    Rig {
        shared,
        ec2,
        machines,
        clock,
        dir,
        _stop: stop_tx,
    }
}

impl Rig {
    /// One reconcile pass (observe, plan, act), launches awaited.
    async fn pass(&self) {
        reconcile::observe(&self.shared, &reconcile::graces(&self.shared)).await;
        for launch in reconcile::act(&self.shared).await {
            launch.await.unwrap();
        }
    }

    /// Waits (a few ms of real time for the probe and health tasks) until `pred` holds.
    async fn until(&self, what: &str, pred: impl Fn(&Pool) -> bool) {
        for _ in 0..2_000 {
            if pred(&self.shared.pool()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!(
            "timed out waiting for {what}: {:#?}",
            self.shared.pool().machines()
        );
    }

    fn in_state(&self, state: MachineState) -> Vec<String> {
        self.shared
            .pool()
            .machines()
            .values()
            .filter(|m| m.state == state)
            .map(|m| m.id.clone())
            .collect()
    }

    /// Launches `n` machines and waits for them to be idle.
    async fn warm(&self, n: usize) {
        self.pass().await;
        self.until("idle machines", |p| {
            p.count("c", MachineState::Idle) as usize >= n
        })
        .await;
    }

    /// Leases an idle machine to `job`, journaled as the API does: (lease id, machine id).
    fn lease(&self, job: &str) -> (String, String) {
        let lease_id = format!("l-{job}");
        let now = self.shared.now();
        self.shared
            .update_journaled(|pool| {
                let l = pool
                    .try_lease_with_terms(job, "c", lease_id.clone(), LeaseTerms::default(), now)
                    .cloned()
                    .expect("an idle machine");
                let op = JournalOp::Leased { lease: l.clone() };
                (l.machine_id, Some(op))
            })
            .map(|m| (lease_id.clone(), m))
            .unwrap()
    }

    /// Class `c` as `flotilla status` shows it.
    fn class_status(&self) -> flotilla_proto::api::ClassStatus {
        let backoff = self.shared.launch_backoff.lock().unwrap().clone();
        super::class_status::class_statuses(
            &self.shared.policy,
            &self.shared.pool(),
            &backoff,
            self.shared.now(),
        )
        .remove("c")
        .unwrap()
    }

    fn instance_of(&self, machine_id: &str) -> String {
        self.shared.pool().machines()[machine_id]
            .instance_id
            .clone()
    }
}

#[tokio::test]
async fn capacity_errors_walk_subnets_then_types_then_on_demand() {
    let r = rig(
        "",
        "instance_types = [\"a\", \"b\"]\nsubnets = [\"s1\", \"s2\"]\nmarket = \"spot-with-fallback\"\nidle_count = 1",
    );
    r.ec2
        .inject(Fault::no_capacity().for_purchase(Purchase::Spot));
    r.ec2.inject(
        Fault::no_capacity()
            .for_purchase(Purchase::OnDemand)
            .for_type("a"),
    );
    r.warm(1).await;
    let tried: Vec<(String, String, Purchase)> = r.ec2.launches();
    let expected: Vec<(String, String, Purchase)> = [
        ("a", "s1", Purchase::Spot),
        ("a", "s2", Purchase::Spot),
        ("b", "s1", Purchase::Spot),
        ("b", "s2", Purchase::Spot),
        ("a", "s1", Purchase::OnDemand),
        ("a", "s2", Purchase::OnDemand),
        ("b", "s1", Purchase::OnDemand),
    ]
    .iter()
    .map(|(t, s, p)| (t.to_string(), s.to_string(), *p))
    .collect();
    assert_eq!(tried, expected);
    let idle = r.in_state(MachineState::Idle);
    assert_eq!(r.shared.pool().machines()[&idle[0]].instance_type, "b");
}

#[tokio::test]
async fn spot_only_never_falls_back_to_on_demand_and_backs_off() {
    let r = rig(
        "",
        "instance_types = [\"a\"]\nsubnets = [\"s1\", \"s2\"]\nmarket = \"spot\"\nidle_count = 1",
    );
    r.ec2.inject(Fault::no_capacity());
    r.pass().await;
    assert_eq!(
        r.ec2.launches(),
        vec![
            ("a".into(), "s1".into(), Purchase::Spot),
            ("a".into(), "s2".into(), Purchase::Spot)
        ]
    );
    // The reserved record is abandoned, not left booting forever.
    assert!(r.in_state(MachineState::Booting).is_empty());
    // Backed off: the next pass does not call EC2 again for this class.
    r.pass().await;
    assert_eq!(r.ec2.count(Op::Launch), 2);
    // ...and `flotilla status` says why a waiting job would wait.
    r.shared.update(|pool| pool.set_waiting_for_test("c", 1));
    let status = r.class_status();
    assert!(
        status
            .waiting_for
            .as_deref()
            .is_some_and(|w| w.starts_with("launch backoff until")
                && w.contains("InsufficientInstanceCapacity")),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_failed_launch_backs_the_class_off_doubling_until_one_succeeds() {
    let r = rig("", "idle_count = 1");
    r.ec2
        .inject(Fault::new(Op::Launch, "UnauthorizedOperation").times(2));
    r.pass().await;
    assert_eq!(
        r.ec2.count(Op::Launch),
        1,
        "not a capacity error: no fallback"
    );
    r.pass().await;
    assert_eq!(r.ec2.count(Op::Launch), 1, "backed off for 5 s");
    r.clock.advance(Duration::from_secs(5));
    r.pass().await;
    assert_eq!(
        r.ec2.count(Op::Launch),
        2,
        "retried after 5 s, failed again"
    );
    r.clock.advance(Duration::from_secs(5));
    r.pass().await;
    assert_eq!(r.ec2.count(Op::Launch), 2, "now backed off for 10 s");
    r.clock.advance(Duration::from_secs(5));
    r.pass().await;
    assert_eq!(r.ec2.count(Op::Launch), 3);
    r.until("the machine ready", |p| {
        p.count("c", MachineState::Idle) == 1
    })
    .await;
}

#[tokio::test]
async fn a_throttled_describe_changes_nothing_and_launches_nothing_extra() {
    let r = rig("", "idle_count = 1");
    r.warm(1).await;
    let (_, leased) = r.lease("job-1");
    r.pass().await;
    r.until("a second idle machine", |p| {
        p.count("c", MachineState::Idle) == 1
    })
    .await;
    let before = r.shared.pool().machines().clone();
    let launches = r.ec2.count(Op::Launch);
    r.ec2.inject(Fault::throttle(Op::Describe).times(5));
    for _ in 0..5 {
        r.clock.advance(Duration::from_secs(60));
        r.pass().await;
    }
    // Unknown is not dead: every machine is as it was, nothing relaunched or terminated.
    let after = r.shared.pool().machines().clone();
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert!(after
        .values()
        .all(|m| matches!(m.state, MachineState::Idle | MachineState::Leased)));
    assert_eq!(after[&leased].state, MachineState::Leased);
    assert_eq!(r.ec2.count(Op::Launch), launches);
    assert_eq!(r.ec2.count(Op::Terminate), 0);
}

#[tokio::test]
async fn an_instance_terminated_behind_its_back_fails_its_job_and_is_replaced() {
    let r = rig("", "idle_count = 1");
    r.warm(1).await;
    let (lease_id, machine) = r.lease("job-1");
    let instance = r.instance_of(&machine);
    r.ec2.terminate_behind_its_back(&instance);
    r.pass().await;
    {
        let pool = r.shared.pool();
        let lost = pool.leases()[&lease_id].lost.as_deref().unwrap_or_default();
        assert!(
            lost.contains("terminated"),
            "lease not marked lost: {lost:?}"
        );
        assert_ne!(
            pool.machines().get(&machine).map(|m| m.state),
            Some(MachineState::Leased)
        );
    }
    // A replacement comes up for the warm pool; the lost machine is never leased again.
    r.until("a replacement", |p| p.count("c", MachineState::Idle) == 1)
        .await;
    let (_, next) = r.lease("job-2");
    assert_ne!(next, machine);
}

#[tokio::test]
async fn a_termination_is_resent_only_after_the_retry_interval_and_forgotten_once_done() {
    let r = rig("", "idle_count = 0\nidle_time = \"1m\"");
    r.ec2.plant(ObservedInstance {
        instance_id: "i-planted".into(),
        life: InstanceLife::Running,
        machine_id: Some("m-x".into()),
        class: Some("c".into()),
        daemon_id: Some(r.shared.ownership.daemon_id.clone()),
        subnet: Some("s".into()),
        private_ip: Some("10.9.9.9".into()),
        instance_type: "t".into(),
        launched_at: Some(start()),
    });
    // An idle machine of ours past its idle time.
    r.shared.update(|pool| {
        pool.reserve("m-x", "c", "t", start());
        pool.record_launch("m-x", "i-planted", "10.9.9.9", "t");
        pool.mark_ready("m-x", start());
    });
    r.clock.advance(Duration::from_secs(61));
    r.ec2.ignore_terminate(true);
    r.ec2.inject(Fault::throttle(Op::Terminate).times(1));
    r.pass().await;
    assert_eq!(
        r.in_state(MachineState::Terminating),
        vec!["m-x".to_string()]
    );
    assert!(
        r.ec2.terminated().is_empty(),
        "the throttled call did nothing"
    );
    r.pass().await;
    assert_eq!(
        r.ec2.terminated(),
        vec!["i-planted".to_string()],
        "resent at once after a failure"
    );
    // Accepted but not carried out: not resent on every pass...
    for _ in 0..3 {
        r.clock.advance(Duration::from_secs(30));
        r.pass().await;
    }
    assert_eq!(r.ec2.terminated().len(), 1);
    // ...but after two minutes; the record stays until EC2 says terminated.
    r.clock.advance(Duration::from_secs(30));
    r.pass().await;
    assert_eq!(r.ec2.terminated().len(), 2);
    assert!(r.shared.pool().machines().contains_key("m-x"));
    r.ec2.ignore_terminate(false);
    r.clock.advance(Duration::from_secs(120));
    r.pass().await; // resends; EC2 carries it out this time
    r.pass().await; // observes it terminated
    assert_eq!(r.ec2.terminated().len(), 3);
    assert!(
        !r.shared.pool().machines().contains_key("m-x"),
        "forgotten once terminated"
    );
}

#[tokio::test]
async fn only_our_own_orphans_are_reaped_and_only_after_the_grace() {
    let r = rig("orphan_grace = \"10m\"", "idle_count = 0");
    let planted = |id: &str, daemon: &str| ObservedInstance {
        instance_id: id.into(),
        life: InstanceLife::Running,
        machine_id: Some(format!("m-{id}")),
        class: Some("c".into()),
        daemon_id: Some(daemon.into()),
        subnet: Some("s".into()),
        private_ip: None,
        instance_type: "t".into(),
        launched_at: Some(start()),
    };
    let ours = r.shared.ownership.daemon_id.clone();
    r.ec2.plant(planted("i-ours", &ours));
    r.ec2.plant(planted("i-theirs", "d-another"));
    r.pass().await;
    r.clock.advance(Duration::from_secs(599));
    r.pass().await;
    assert!(r.ec2.terminated().is_empty(), "within the grace");
    r.clock.advance(Duration::from_secs(1));
    r.pass().await;
    assert_eq!(r.ec2.terminated(), vec!["i-ours".to_string()]);
    r.clock.advance(Duration::from_secs(3600));
    r.pass().await;
    assert_eq!(
        r.ec2.terminated(),
        vec!["i-ours".to_string()],
        "another daemon's instance is never reaped"
    );
}

#[tokio::test]
async fn a_crash_between_record_and_launch_is_adopted_by_machine_tag() {
    let r = rig("", "idle_count = 1");
    // The previous daemon recorded the machine, launched, and died before the answer.
    r.shared
        .update(|pool| pool.reserve("m-crash", "c", "t", start()));
    r.ec2.plant(ObservedInstance {
        instance_id: "i-crash".into(),
        life: InstanceLife::Running,
        machine_id: Some("m-crash".into()),
        class: Some("c".into()),
        daemon_id: Some(r.shared.ownership.daemon_id.clone()),
        subnet: Some("s".into()),
        private_ip: Some("10.1.1.1".into()),
        instance_type: "t".into(),
        launched_at: Some(start()),
    });
    r.pass().await;
    assert_eq!(r.instance_of("m-crash"), "i-crash");
    assert_eq!(
        r.ec2.count(Op::Launch),
        0,
        "the booting record counts toward idle_count"
    );
    assert!(r.ec2.terminated().is_empty());
}

#[tokio::test]
async fn a_machine_that_never_answers_is_replaced_after_its_boot_timeout() {
    let r = rig("", "idle_count = 1\nboot_timeout = \"2m\"");
    r.machines.set_default(Dockerd::Down);
    r.pass().await;
    let booting = r.in_state(MachineState::Booting);
    assert_eq!(booting.len(), 1);
    r.clock.advance(Duration::from_secs(119));
    r.pass().await;
    assert_eq!(r.ec2.count(Op::Terminate), 0);
    r.clock.advance(Duration::from_secs(1));
    r.machines.set_default(Dockerd::Up { containers: 0 });
    r.pass().await;
    assert_eq!(r.ec2.terminated(), vec![r.instance_of(&booting[0])]);
    assert_eq!(
        r.shared.pool().machines()[&booting[0]].terminate_reason,
        Some(TerminateReason::BootTimeout)
    );
    r.until("a replacement", |p| p.count("c", MachineState::Idle) == 1)
        .await;
}

#[tokio::test]
async fn a_failing_ready_command_is_a_failed_boot_replaced_like_a_boot_timeout() {
    let r = rig(
        "",
        "idle_count = 1\nready_command = { image = \"busybox\", command = [\"test\", \"-e\", \"/host/ready\"] }",
    );
    r.machines.set_ready_exit(1);
    r.pass().await;
    let first = r.shared.pool().machines().keys().next().unwrap().clone();
    r.until("the failed boot", |p| p.machines()[&first].boot_failed)
        .await;
    assert_eq!(
        r.shared.pool().machines()[&first].state,
        MachineState::Broken
    );
    assert_eq!(r.in_state(MachineState::Idle), Vec::<String>::new());
    r.machines.set_ready_exit(0);
    r.pass().await;
    assert_eq!(r.ec2.terminated(), vec![r.instance_of(&first)]);
    assert_eq!(
        r.shared.pool().machines()[&first].terminate_reason,
        Some(TerminateReason::BootTimeout)
    );
    r.until("a replacement that passed", |p| {
        p.count("c", MachineState::Idle) == 1
    })
    .await;
    let runs = r.machines.ready_runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 2, "{runs:?}");
}

#[tokio::test]
async fn health_checks_replace_a_dead_idle_machine_but_never_take_a_leased_one() {
    let r = rig("health_interval = \"100ms\"", "idle_count = 2");
    r.warm(2).await;
    let (lease_id, leased) = r.lease("job-1");
    let idle = r.in_state(MachineState::Idle)[0].clone();
    r.machines.set(&leased, Dockerd::Down);
    r.machines.set(&idle, Dockerd::Down);
    let (stop_tx, stop_rx) = watch::channel(false);
    let watcher = tokio::spawn(super::probe::watch_health(r.shared.clone(), stop_rx));
    r.until("the dead idle machine marked broken", |p| {
        p.machines()[&idle].state == MachineState::Broken
    })
    .await;
    {
        let pool = r.shared.pool();
        assert_eq!(pool.machines()[&leased].state, MachineState::Leased);
        assert!(
            pool.leases()[&lease_id].lost.is_none(),
            "a blip never fails a running job"
        );
    }
    stop_tx.send(true).unwrap();
    watcher.await.unwrap();
}

#[tokio::test]
async fn a_lease_whose_release_never_came_is_reclaimed_once_its_containers_are_gone() {
    let r = rig("health_interval = \"100ms\"", "idle_count = 1");
    r.warm(1).await;
    let (lease_id, machine) = r.lease("job-1");
    r.machines.set(&machine, Dockerd::Up { containers: 2 });
    r.clock
        .advance(super::probe::LEASE_RECLAIM_GRACE + Duration::from_secs(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let watcher = tokio::spawn(super::probe::watch_health(r.shared.clone(), stop_rx));
    // Still running containers: kept however long (wait for a few checks).
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(r.shared.pool().leases().contains_key(&lease_id));
    r.machines.set(&machine, Dockerd::Up { containers: 0 });
    r.until("the lease reclaimed", |p| {
        !p.leases().contains_key(&lease_id)
    })
    .await;
    assert_eq!(
        r.shared.pool().machines()[&machine].state,
        MachineState::Idle
    );
    stop_tx.send(true).unwrap();
    watcher.await.unwrap();
}

#[tokio::test]
async fn a_restart_retires_a_machine_past_max_builds_before_any_lease() {
    let r = rig("", "idle_count = 1");
    r.warm(1).await;
    let (lease_id, machine) = r.lease("job-1");
    let now = r.shared.now();
    // Released with the old policy (no max_builds), journaled only.
    r.shared
        .update_journaled(|pool| {
            let released =
                pool.release_retiring(&lease_id, ReleaseOutcome::Healthy, None, now, |m| {
                    r.shared.retire_reason(m, now)
                });
            let op = JournalOp::Released {
                lease_id: lease_id.clone(),
                outcome: ReleaseOutcome::Healthy,
                reason: None,
                at: now,
            };
            (released, Some(op))
        })
        .unwrap();
    assert_eq!(
        r.shared.pool().machines()[&machine].state,
        MachineState::Idle
    );
    // The operator lowers max_builds and restarts the daemon.
    let Rig { dir, clock, .. } = r;
    let r = rig_in(dir, "", "idle_count = 1\nmax_builds = 1", clock);
    assert_eq!(
        r.shared.pool().machines()[&machine].builds,
        1,
        "the journal replayed the release"
    );
    super::retire_on_load(&r.shared).await;
    let pool = r.shared.pool();
    assert_eq!(pool.machines()[&machine].state, MachineState::Terminating);
    assert_eq!(
        pool.machines()[&machine].terminate_reason,
        Some(TerminateReason::MaxBuilds)
    );
}

/// The stopped pool's class: no hot target, a minute of idle time, one stopped spare.
/// A class whose stopped pool is `max_stopped` itself: without the forecast, which would
/// size it from bursts these tests do not make (the plan's unit tests cover that sizing).
const STOPPED_POOL: &str =
    "idle_count = 0\nidle_time = \"1m\"\nmax_stopped = 1\nboot_timeout = \"2m\"\n\
     forecast = { enabled = false }";

impl Rig {
    /// One machine launched for a waiting job, ready, then idle past its idle time with
    /// nobody waiting: the next pass stops it. Returns (machine id, instance id).
    async fn idle_past_idle_time(&self) -> (String, String) {
        self.shared.update(|pool| pool.set_waiting_for_test("c", 1));
        self.pass().await;
        self.until("an idle machine", |p| p.count("c", MachineState::Idle) == 1)
            .await;
        self.shared.update(|pool| pool.set_waiting_for_test("c", 0));
        self.clock.advance(Duration::from_secs(61));
        let machine = self.in_state(MachineState::Idle)[0].clone();
        let instance = self.instance_of(&machine);
        (machine, instance)
    }

    /// [`Rig::idle_past_idle_time`], then stopped: the pool has it stopped.
    async fn stopped_machine(&self) -> (String, String) {
        let (machine, instance) = self.idle_past_idle_time().await;
        self.pass().await; // StopInstances
        self.pass().await; // observed stopped
        assert_eq!(self.in_state(MachineState::Stopped), vec![machine.clone()]);
        (machine, instance)
    }

    fn state_of(&self, machine: &str) -> MachineState {
        self.shared.pool().machines()[machine].state
    }
}

#[tokio::test]
async fn an_idle_machine_past_its_idle_time_is_stopped_not_terminated() {
    let r = rig("", STOPPED_POOL);
    let (machine, instance) = r.idle_past_idle_time().await;
    r.pass().await;
    assert_eq!(
        r.ec2.stops_and_starts(),
        vec![Call::Stop(vec![instance.clone()])]
    );
    assert_eq!(r.state_of(&machine), MachineState::Stopping);
    assert!(r.ec2.terminated().is_empty());
    r.pass().await;
    assert_eq!(r.state_of(&machine), MachineState::Stopped);
    // Stopped is neither lost nor resent, however long it stays so.
    for _ in 0..3 {
        r.clock.advance(Duration::from_secs(300));
        r.pass().await;
    }
    assert_eq!(r.state_of(&machine), MachineState::Stopped);
    assert_eq!(r.ec2.count(Op::Stop), 1);
    assert_eq!(r.ec2.count(Op::Launch), 1);
    assert!(r.ec2.terminated().is_empty());
}

#[tokio::test]
async fn a_failed_stop_is_retried_and_a_refused_one_terminates_instead() {
    let r = rig("", STOPPED_POOL);
    let (machine, instance) = r.idle_past_idle_time().await;
    r.ec2.inject(Fault::throttle(Op::Stop).times(1));
    r.pass().await;
    assert_eq!(
        r.state_of(&machine),
        MachineState::Stopping,
        "kept, to retry"
    );
    r.pass().await;
    assert_eq!(
        r.ec2.stops_and_starts(),
        vec![
            Call::Stop(vec![instance.clone()]),
            Call::Stop(vec![instance.clone()])
        ],
        "resent on the next pass"
    );
    assert_eq!(r.state_of(&machine), MachineState::Stopping);
    r.pass().await;
    assert_eq!(r.state_of(&machine), MachineState::Stopped);

    // A one-time spot instance cannot be stopped: asked again it would say the same.
    let r = rig("", STOPPED_POOL);
    let (machine, instance) = r.idle_past_idle_time().await;
    r.ec2.inject(Fault::new(Op::Stop, "UnsupportedOperation"));
    r.pass().await;
    assert_eq!(r.state_of(&machine), MachineState::Terminating);
    r.pass().await;
    assert_eq!(r.ec2.terminated(), vec![instance]);
    assert_eq!(r.ec2.count(Op::Stop), 1, "a refusal is not resent");
}

#[tokio::test]
async fn a_waiting_job_starts_the_stopped_machine_probed_at_its_listed_address() {
    let r = rig("", STOPPED_POOL);
    let (machine, instance) = r.stopped_machine().await;
    r.ec2.address_after_start("10.7.7.7");
    r.shared.update(|pool| pool.set_waiting_for_test("c", 1));
    r.pass().await;
    assert_eq!(
        r.ec2.stops_and_starts().last(),
        Some(&Call::Start(vec![instance.clone()]))
    );
    assert_eq!(r.state_of(&machine), MachineState::Starting);
    assert!(
        r.shared
            .observe_soon
            .load(std::sync::atomic::Ordering::SeqCst),
        "the next pass observes at once"
    );
    r.pass().await; // lists it running at its new address: probed there
    r.until("the started machine idle", |p| {
        p.machines()[&machine].state == MachineState::Idle
    })
    .await;
    assert_eq!(r.shared.pool().machines()[&machine].address, "10.7.7.7");
    let pings = r.machines.pings.lock().unwrap().clone();
    assert_eq!(
        pings
            .iter()
            .rev()
            .find(|(m, _)| *m == machine)
            .map(|(_, a)| a.as_str()),
        Some("10.7.7.7")
    );
    assert_eq!(r.ec2.count(Op::Launch), 1, "started, not launched");
    assert_eq!(r.ec2.count(Op::Start), 1);
    let (_, leased) = r.lease("job-after-start");
    assert_eq!(leased, machine);
}

#[tokio::test]
async fn a_start_that_never_answers_is_terminated_at_its_boot_timeout_and_replaced() {
    let r = rig("", STOPPED_POOL);
    let (machine, instance) = r.stopped_machine().await;
    r.machines.set(&machine, Dockerd::Down);
    r.shared.update(|pool| pool.set_waiting_for_test("c", 1));
    r.pass().await; // StartInstances
    r.pass().await; // running: probed, never answers
    r.clock.advance(Duration::from_secs(119));
    r.pass().await;
    assert_eq!(r.state_of(&machine), MachineState::Starting);
    assert!(r.ec2.terminated().is_empty());
    r.clock.advance(Duration::from_secs(1));
    r.pass().await;
    assert_eq!(r.ec2.terminated(), vec![instance]);
    assert_eq!(
        r.shared.pool().machines()[&machine].terminate_reason,
        Some(TerminateReason::BootTimeout)
    );
    r.until("a launched replacement", |p| {
        p.count("c", MachineState::Idle) == 1
    })
    .await;
    assert_eq!(r.ec2.count(Op::Launch), 2);
}

#[tokio::test]
async fn a_refused_start_terminates_the_machine_and_a_launch_replaces_it() {
    let r = rig("", STOPPED_POOL);
    let (machine, instance) = r.stopped_machine().await;
    r.ec2
        .inject(Fault::new(Op::Start, "InsufficientInstanceCapacity").times(1));
    r.shared.update(|pool| pool.set_waiting_for_test("c", 1));
    r.pass().await;
    assert_eq!(r.state_of(&machine), MachineState::Terminating);
    assert_eq!(
        r.shared.pool().machines()[&machine].terminate_reason,
        Some(TerminateReason::BootTimeout)
    );
    r.pass().await;
    assert_eq!(r.ec2.terminated(), vec![instance]);
    r.until("a launched replacement", |p| {
        p.count("c", MachineState::Idle) == 1
    })
    .await;
}

#[tokio::test]
async fn a_machine_stopped_behind_its_back_while_idle_is_replaced_and_one_started_is_taken_back() {
    let r = rig("", "idle_count = 1\nmax_stopped = 1");
    r.warm(1).await;
    let machine = r.in_state(MachineState::Idle)[0].clone();
    let instance = r.instance_of(&machine);
    r.clock.advance(Duration::from_secs(600));
    r.ec2.set_life(&instance, InstanceLife::Stopped);
    r.pass().await;
    {
        let pool = r.shared.pool();
        let m = &pool.machines()[&machine];
        assert_eq!(m.state, MachineState::Terminating);
        assert_eq!(m.terminate_reason, Some(TerminateReason::Broken));
        assert!(
            m.note
                .as_deref()
                .is_some_and(|n| n.contains("stopped outside flotilla while idle")),
            "{m:?}"
        );
    }
    assert_eq!(r.ec2.terminated(), vec![instance]);

    // The other way round: a stopped machine an operator started is health-checked and
    // taken back into service, not left running unseen.
    let r = rig("", STOPPED_POOL);
    let (machine, instance) = r.stopped_machine().await;
    r.ec2.set_life(&instance, InstanceLife::Running);
    r.pass().await;
    r.until("the machine back in service", |p| {
        p.machines()[&machine].state == MachineState::Idle
    })
    .await;
    assert_eq!(r.ec2.count(Op::Start), 0);
}

/// A daemon that dies while a machine's report is under way makes it after its restart,
/// naming the time of the verdict, and forgets it only once saved.
#[tokio::test]
async fn a_report_under_way_when_the_daemon_dies_is_made_after_the_restart() {
    let r = rig("", "idle_count = 1");
    r.warm(1).await;
    let machine = r.in_state(MachineState::Idle).remove(0);
    let verdict_at = r.shared.now();
    r.machines
        .hold_events
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let gen = r
        .shared
        .update(|pool| pool.mark_broken(&machine, "dockerd stopped answering"))
        .1;
    assert!(r.shared.commit(gen).await);
    let report = r
        .dir
        .path()
        .join(flotilla_proto::logs::MACHINES_DIR)
        .join(format!("{machine}.log"));
    assert!(!report.exists(), "the report is held up");

    // The daemon dies; an hour later it starts again over the same state.
    let Rig { dir, clock, .. } = r;
    clock.advance(Duration::from_secs(3600));
    let r = rig_in(dir, "", "idle_count = 1", clock);
    r.pass().await;
    for _ in 0..2_000 {
        if report.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let text = std::fs::read_to_string(&report).expect("the report was made after the restart");
    assert!(
        text.contains(&format!(
            "marked broken or lost at {}",
            verdict_at.to_rfc3339()
        )) && text.contains("dockerd stopped answering")
            && text.contains(&format!("container die {machine}")),
        "{text}"
    );
    // Saved: the daemon forgets it, and so does the state on disk.
    let held = |r: &Rig| serde_json::to_value(&*r.shared.pool()).unwrap()["casualties"].clone();
    for _ in 0..2_000 {
        r.shared.settle_reports().await;
        if held(&r).is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(held(&r).is_null(), "{}", held(&r));
    let Rig { dir, clock, .. } = r;
    let r = rig_in(dir, "", "idle_count = 1", clock);
    assert!(held(&r).is_null(), "not reported again: {}", held(&r));
}

/// A machine that becomes ready pulls its class's most used images while idle (it is
/// leasable at once); `prefetch_images = 0` pulls nothing.
#[tokio::test]
async fn a_new_machine_prefetches_the_classs_most_used_images() {
    let r = rig("", "idle_count = 1\nprefetch_images = 2");
    let now = r.shared.now();
    r.shared.update(|pool| {
        let used = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        pool.record_images("c", &used(&["rust:1", "helper:x"]), now);
        pool.record_images("c", &used(&["rust:1", "helper:x", "redis:7"]), now);
        pool.record_images("other", &used(&["not-this-class:1"]), now);
    });
    r.warm(1).await;
    let machine = r.in_state(MachineState::Idle).remove(0);
    for _ in 0..2_000 {
        if r.machines.pulls.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pulls = r.machines.pulls.lock().unwrap().clone();
    assert_eq!(
        pulls,
        vec![
            (machine.clone(), "helper:x".to_string()),
            (machine, "rust:1".to_string())
        ]
    );

    let off = rig("", "idle_count = 1\nprefetch_images = 0");
    off.shared
        .update(|pool| pool.record_images("c", &["rust:1".to_string()], now));
    off.warm(1).await;
    tokio::task::yield_now().await;
    assert!(off.machines.pulls.lock().unwrap().is_empty());
}

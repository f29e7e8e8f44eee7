//! Flotilla in the simulator: the daemon's own [`Pool`] operations and the daemon's own
//! [`plan`] function, driven by simulated time instead of the reconcile loop. What the
//! daemon does on each event is mirrored here:
//!
//! - acquire (`daemon/api.rs`): record the arrival in `pool.history`, lease a free slot
//!   (`Pool::try_lease_where` with the class's `jobs_per_machine` slots, never on a machine
//!   due to retire) or count the request in `pool.waiting` and replan;
//! - a machine answers its boot probe: `Pool::mark_ready`, waiters retry their lease;
//! - release: `Pool::release`, replan (a machine at `max_builds` is terminated), waiters
//!   retry, replan (top the idle pool back up);
//! - every reconcile interval: replan;
//! - plan actions: `Launch` adds a `Booting` machine (ready after the simulated launch),
//!   `Stop` parks an idle one (its disk billed), `Start` brings a stopped one back (ready
//!   after the simulated start), `Terminate` removes it;
//! - a spot reclaim: the machine is broken, each job's lease is released as `Broken` (as
//!   its cleanup would) and each job acquires again, as its retry does.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::plan::{plan, Action, Policy};
use crate::pool::{LeaseTerms, Pool};
use flotilla_proto::api::ReleaseOutcome;

use super::engine::{Ctx, Scaler};

pub(super) struct Flotilla {
    policy: Policy,
    pub pool: Pool,
    instance_types: BTreeMap<String, String>,
    /// Root volume size (GB) of each class's machines: what a stopped one costs.
    root_gb: BTreeMap<String, u32>,
    default_class: String,
    queues: BTreeMap<String, VecDeque<usize>>,
    engine_of: HashMap<String, usize>,
    pool_of: HashMap<usize, String>,
    lease_of: HashMap<usize, String>,
    next_id: u64,
}

impl Flotilla {
    /// `instance_types`: the type launched for each class (the daemon launches the first
    /// of the class's list when it has capacity); `root_gb`: each class's root volume.
    pub(super) fn new(
        policy: Policy,
        instance_types: BTreeMap<String, String>,
        root_gb: BTreeMap<String, u32>,
        default_class: String,
        pool: Pool,
    ) -> Self {
        Self {
            policy,
            pool,
            instance_types,
            root_gb,
            default_class,
            queues: BTreeMap::new(),
            engine_of: HashMap::new(),
            pool_of: HashMap::new(),
            lease_of: HashMap::new(),
            next_id: 0,
        }
    }

    fn class_of(&self, ctx: &Ctx<'_>, job: usize) -> String {
        let c = &ctx.jobs[job].class;
        if self.policy.classes.contains_key(c) {
            c.clone()
        } else {
            self.default_class.clone()
        }
    }

    fn acquire(&mut self, ctx: &mut Ctx<'_>, job: usize) {
        let class = self.class_of(ctx, job);
        let now = ctx.now_utc();
        self.pool.record_arrival(&class, now);
        if !self.try_lease(ctx, job, &class) {
            self.queues.entry(class.clone()).or_default().push_back(job);
            self.pool.add_waiter(&class);
        }
        self.replan(ctx);
    }

    fn try_lease(&mut self, ctx: &mut Ctx<'_>, job: usize, class: &str) -> bool {
        self.next_id += 1;
        let lease_id = format!("l-{}", self.next_id);
        let job_key = format!("job-{job}-{}", self.next_id);
        let now = ctx.now_utc();
        let policy = self.policy.classes.get(class);
        let terms = LeaseTerms {
            slots: policy.map_or(1, |c| c.slots()),
            ..LeaseTerms::default()
        };
        // As the daemon's acquire: a shared machine at max_builds or max_age takes no
        // further job (an idle one was retired when it became idle).
        let Some(lease) =
            self.pool
                .try_lease_where(&job_key, class, lease_id.clone(), terms, now, |m| {
                    policy.is_none_or(|c| c.retire_reason(m, now).is_none())
                })
        else {
            return false;
        };
        let machine = lease.machine_id.clone();
        if let Some(&m) = self.engine_of.get(&machine) {
            ctx.start(job, m);
        }
        self.lease_of.insert(job, lease_id);
        true
    }

    /// Waiting acquires retry (the daemon wakes them on every pool change).
    fn serve(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let mut served = false;
        let classes: Vec<String> = self.queues.keys().cloned().collect();
        for class in classes {
            while let Some(&job) = self.queues.get(&class).and_then(|q| q.front()) {
                if !self.try_lease(ctx, job, &class) {
                    break;
                }
                served = true;
                if let Some(q) = self.queues.get_mut(&class) {
                    q.pop_front();
                }
                self.pool.remove_waiter(&class);
            }
        }
        served
    }

    fn replan(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now_utc();
        for action in plan(&self.policy, &self.pool, now) {
            match action {
                Action::Stop { machine_id } => {
                    if self.pool.begin_stop(&machine_id, now) {
                        // The simulated StopInstances completes at once.
                        self.pool.mark_stopped(&machine_id);
                        if let Some(&m) = self.engine_of.get(&machine_id) {
                            ctx.stop(m);
                        }
                    }
                }
                Action::Start { machine_id } => {
                    if self.pool.begin_start(&machine_id, now) {
                        if let Some(&m) = self.engine_of.get(&machine_id) {
                            ctx.start_stopped(m);
                        }
                    }
                }
                Action::Terminate { machine_id, .. } => {
                    if self.pool.forget(&machine_id) {
                        if let Some(m) = self.engine_of.remove(&machine_id) {
                            self.pool_of.remove(&m);
                            ctx.terminate(m);
                        }
                    }
                }
                Action::Launch { class, count } => {
                    let instance_type =
                        self.instance_types.get(&class).cloned().unwrap_or_default();
                    let root_gb = self
                        .root_gb
                        .get(&class)
                        .copied()
                        .unwrap_or(super::engine::DEFAULT_ROOT_GB);
                    let capacity = self.policy.classes.get(&class).map_or(1, |c| c.slots());
                    for _ in 0..count {
                        let m = ctx.launch_with(&instance_type, root_gb, capacity);
                        let id = format!("m-{m}");
                        self.pool.reserve(&id, &class, &instance_type, now);
                        self.engine_of.insert(id.clone(), m);
                        self.pool_of.insert(m, id);
                    }
                }
            }
        }
    }
}

impl Scaler for Flotilla {
    fn arrive(&mut self, ctx: &mut Ctx<'_>, job: usize) {
        self.acquire(ctx, job);
    }

    fn ready(&mut self, ctx: &mut Ctx<'_>, machine: usize) {
        if let Some(id) = self.pool_of.get(&machine).cloned() {
            self.pool.mark_ready(&id, ctx.now_utc());
            self.serve(ctx);
            self.replan(ctx);
        }
    }

    fn finish(&mut self, ctx: &mut Ctx<'_>, job: usize, _machine: usize) {
        if let Some(lease) = self.lease_of.remove(&job) {
            self.pool
                .release(&lease, ReleaseOutcome::Healthy, None, ctx.now_utc());
        }
        self.replan(ctx);
        if self.serve(ctx) {
            self.replan(ctx);
        }
    }

    fn lost(&mut self, ctx: &mut Ctx<'_>, machine: usize, jobs: &[usize]) {
        if let Some(id) = self.pool_of.get(&machine).cloned() {
            self.pool.mark_broken(&id, "spot instance reclaimed");
        }
        // As each job's cleanup does: its lease ends, the machine stays broken.
        for j in jobs {
            if let Some(lease) = self.lease_of.remove(j) {
                self.pool.release(
                    &lease,
                    ReleaseOutcome::Broken,
                    Some("spot instance reclaimed".into()),
                    ctx.now_utc(),
                );
            }
        }
        // Each job fails with a system failure; its retry is a new acquire.
        for &j in jobs {
            self.acquire(ctx, j);
        }
        if jobs.is_empty() {
            self.replan(ctx);
        }
    }

    fn tick(&mut self, ctx: &mut Ctx<'_>) {
        self.replan(ctx);
        if self.serve(ctx) {
            self.replan(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::engine::tests::{env, trace};
    use super::super::engine::{run, Outcome};
    use super::super::runs::{run_flotilla, run_taskscaler, taskscaler_from};
    use super::super::setup::default_config;
    use super::*;
    use flotilla_proto::duration::HumanDuration;

    fn config(forecast: bool, idle_count: u32, idle_time_s: u64) -> flotilla_proto::config::Config {
        let mut c = default_config(&["c".to_string()]);
        let k = c.classes.get_mut("c").unwrap();
        k.instance_types = vec!["t".into()];
        k.idle_count = idle_count;
        k.idle_time = HumanDuration::from_secs(idle_time_s);
        k.forecast.enabled = forecast;
        c
    }

    /// Bursts of three 100 s jobs every four minutes for two hours: a machine released
    /// after a burst idles 140 s before the next one, longer than a 60 s idle time.
    fn bursts() -> Vec<(i64, i64)> {
        (0..30).flat_map(|i| [(i * 240, 100); 3]).collect()
    }

    fn late_waits(o: &Outcome) -> i64 {
        o.waits_ms[30..].iter().copied().max().unwrap_or(0)
    }

    #[test]
    fn without_the_forecast_the_daemons_plan_behaves_like_taskscaler() {
        let t = trace(&bursts());
        for (idle_count, idle_time) in [(0, 60), (2, 60), (1, 300)] {
            let c = config(false, idle_count, idle_time);
            let ours = run_flotilla("f", &c, &t, &env(60.0)).summary();
            let theirs = run_taskscaler("t", taskscaler_from(&c), &t, &env(60.0)).summary();
            assert_eq!(
                (ours.p95_wait_s, ours.idle_machine_hours, ours.launches),
                (
                    theirs.p95_wait_s,
                    theirs.idle_machine_hours,
                    theirs.launches
                ),
                "idle_count {idle_count}, idle_time {idle_time}"
            );
        }
    }

    #[test]
    fn with_slots_and_without_the_forecast_the_plan_still_behaves_like_taskscaler() {
        let t = trace(&bursts());
        for (idle_count, idle_time) in [(0, 60), (2, 60), (3, 300)] {
            let mut c = config(false, idle_count, idle_time);
            c.classes.get_mut("c").unwrap().jobs_per_machine = 2;
            let ours = run_flotilla("f", &c, &t, &env(60.0));
            let theirs = run_taskscaler("t", taskscaler_from(&c), &t, &env(60.0));
            assert_eq!(ours.violations + theirs.violations, 0);
            let (ours, theirs) = (ours.summary(), theirs.summary());
            assert_eq!(
                (ours.p95_wait_s, ours.idle_slot_hours, ours.launches),
                (theirs.p95_wait_s, theirs.idle_slot_hours, theirs.launches),
                "idle_count {idle_count}, idle_time {idle_time}"
            );
        }
    }

    #[test]
    fn the_forecast_learns_the_stream_and_jobs_stop_waiting() {
        let t = trace(&bursts());
        let off = run_flotilla("off", &config(false, 0, 60), &t, &env(60.0));
        let on = run_flotilla("on", &config(true, 0, 60), &t, &env(60.0));
        assert_eq!(off.violations + on.violations, 0);
        assert!(late_waits(&off) >= 60_000, "{:?}", off.waits_ms);
        assert_eq!(late_waits(&on), 0, "{:?}", on.waits_ms);
    }

    #[test]
    fn a_stopped_pool_serves_bursts_from_starts_instead_of_launches() {
        let t = trace(&bursts());
        let off = run_flotilla("off", &config(false, 0, 60), &t, &env(60.0));
        let mut c = config(false, 0, 60);
        c.classes.get_mut("c").unwrap().max_stopped = 3;
        let on = run_flotilla("on", &c, &t, &env(60.0));
        assert_eq!(off.violations + on.violations, 0);
        let (off, on) = (off.summary(), on.summary());
        assert_eq!(off.starts, 0);
        assert!(on.starts > 0, "{on:?}");
        assert!(on.launches < off.launches, "{on:?} vs {off:?}");
        assert!(on.stopped_machine_hours > 0.0, "{on:?}");
        // A start takes a quarter of a launch in this environment.
        assert!(on.p95_wait_s < off.p95_wait_s, "{on:?} vs {off:?}");
    }

    #[test]
    fn a_forecast_sized_pool_lets_its_disks_go_once_the_bursts_are_past_its_horizon() {
        // An hour of bursts, then one job nine hours later.
        let mut jobs: Vec<(i64, i64)> = (0..15).flat_map(|i| [(i * 240, 100); 3]).collect();
        jobs.push((9 * 3600, 100));
        let t = trace(&jobs);
        let mut fixed = config(false, 0, 60);
        fixed.classes.get_mut("c").unwrap().max_stopped = 3;
        let mut sized = config(true, 0, 60);
        let k = sized.classes.get_mut("c").unwrap();
        k.max_stopped = 3;
        k.forecast.lookahead = HumanDuration::from_secs(0);
        let (fixed, sized) = (
            run_flotilla("fixed", &fixed, &t, &env(60.0)),
            run_flotilla("sized", &sized, &t, &env(60.0)),
        );
        assert_eq!(fixed.violations + sized.violations, 0);
        let (fixed, sized) = (fixed.summary(), sized.summary());
        assert!(sized.starts > 0, "{sized:?}");
        // The fixed pool sleeps through the nine hours; the sized one for six at most
        // (its horizon), then its machines are terminated.
        assert!(fixed.stopped_machine_hours > 3.0 * 8.0, "{fixed:?}");
        assert!(sized.stopped_machine_hours < 3.0 * 6.5, "{sized:?}");
    }

    fn sharing(slots: u32) -> flotilla_proto::config::Config {
        let mut c = config(false, 0, 60);
        c.classes.get_mut("c").unwrap().jobs_per_machine = slots;
        c
    }

    #[test]
    fn two_jobs_arriving_together_share_one_machine_with_two_slots() {
        let t = trace(&[(0, 100), (0, 100)]);
        let shared = run_flotilla("2", &sharing(2), &t, &env(60.0));
        assert_eq!(shared.violations, 0);
        assert_eq!(shared.launches, 1);
        assert_eq!(shared.waits_ms, vec![60_000, 60_000]);
        assert_eq!(
            shared.busy_ms, 100_000,
            "one machine, busy while its jobs run"
        );
        // One job per machine, as before slots: a machine each.
        let alone = run_flotilla("1", &sharing(1), &t, &env(60.0));
        assert_eq!(alone.violations, 0);
        assert_eq!(alone.launches, 2);
        assert_eq!(alone.waits_ms, vec![60_000, 60_000]);
        assert_eq!(alone.busy_ms, 200_000);
        assert!(
            (alone.cost - 2.0 * shared.cost).abs() < 1e-9,
            "{} vs {}",
            alone.cost,
            shared.cost
        );
    }

    #[test]
    fn jobs_of_a_reclaimed_shared_machine_all_run_again() {
        let mut e = env(10.0);
        e.reclaims_per_hour = 60.0; // mean life 60 s: most 110 s runs are cut short
        let t = trace(&[(0, 100), (0, 100)]);
        let mut reclaimed = 0;
        for seed in 1..=10 {
            e.seed = seed;
            let mut s = Flotilla::new(
                crate::plan::Policy::from_config(&sharing(2)),
                BTreeMap::from([("c".to_string(), "t".to_string())]),
                BTreeMap::new(),
                "c".into(),
                Pool::default(),
            );
            let out = run("f", &t, &mut s, &e);
            assert_eq!(out.violations, 0);
            reclaimed += out.reclaims;
            // Both jobs finished (the run ended long before its horizon) and every lease,
            // the lost ones too, was released.
            assert!(out.end - out.start < 86_400_000, "{out:?}");
            assert!(s.pool.leases().is_empty());
            assert!(s.pool.waiting_by_class().is_empty());
            assert!(
                out.waits_ms.iter().all(|&w| w >= 10_000),
                "{:?}",
                out.waits_ms
            );
        }
        assert!(reclaimed > 0);
    }

    #[test]
    fn arrivals_are_recorded_in_the_pools_history_like_the_daemon_does() {
        let t = trace(&bursts());
        let c = config(true, 0, 60);
        let mut s = Flotilla::new(
            crate::plan::Policy::from_config(&c),
            BTreeMap::from([("c".to_string(), "t".to_string())]),
            BTreeMap::new(),
            "c".into(),
            Pool::default(),
        );
        let out = run("f", &t, &mut s, &env(60.0));
        assert_eq!(out.violations, 0);
        assert_eq!(s.pool.history().classes().collect::<Vec<_>>(), vec!["c"]);
        assert!(
            s.pool.waiting_by_class().is_empty(),
            "every waiter was served"
        );
        assert!(s.pool.leases().is_empty());
    }
}

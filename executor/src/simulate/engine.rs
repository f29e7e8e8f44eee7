//! The simulated world: a clock, an event queue, simulated EC2 (launch-to-ready and
//! start-to-ready drawn from their distributions, optional spot reclaims, per-second billing
//! with a one-minute minimum per running period, the root volume of a stopped machine
//! billed per GB-month) and
//! the job bookkeeping every policy is measured by. Policies only decide; the engine owns
//! what actually happened, so every policy is measured the same way.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use chrono::{DateTime, TimeZone, Utc};

use super::rng::{Dist, Rng};
use super::trace::{Job, Trace};

/// EC2 bills Linux instances per second with a one-minute minimum.
const MIN_BILLED_MS: i64 = 60_000;

/// Root volume size (GB) of a class that sets none (the AMI's default, typically 8-30 GB;
/// the larger, as CI machines keep an image cache).
pub(super) const DEFAULT_ROOT_GB: u32 = 30;

/// What a policy sees of the world and may do to it.
pub(super) trait Scaler {
    /// A job asks for a machine.
    fn arrive(&mut self, ctx: &mut Ctx<'_>, job: usize);
    /// A launched machine finished booting.
    fn ready(&mut self, ctx: &mut Ctx<'_>, machine: usize);
    /// A job ended; its slot on the machine is free.
    fn finish(&mut self, ctx: &mut Ctx<'_>, job: usize, machine: usize);
    /// EC2 took the machine back (spot reclaim); `jobs` (in the order they started, none
    /// for an idle or booting machine) were running on it and must run again.
    fn lost(&mut self, ctx: &mut Ctx<'_>, machine: usize, jobs: &[usize]);
    /// The periodic reconcile pass.
    fn tick(&mut self, ctx: &mut Ctx<'_>);
}

/// The simulated environment, the same for every policy compared.
#[derive(Debug, Clone)]
pub(super) struct Env {
    /// RunInstances to ready, for a cold launch (seconds).
    pub launch: Dist,
    /// StartInstances to ready, for a stopped machine (seconds).
    pub start: Dist,
    /// USD per GB-month of EBS: what a stopped machine's root volume costs (a running
    /// machine's volume is not counted, for any policy).
    pub ebs_usd_per_gb_month: f64,
    pub seed: u64,
    /// Mean spot reclaims per machine-hour (0: none).
    pub reclaims_per_hour: f64,
    /// Reconcile interval: how often policies get a pass without an event.
    pub tick_ms: i64,
    /// USD per hour by instance type.
    pub prices: BTreeMap<String, f64>,
    /// The replay starts this long before the first arrival, so pools that are kept warm
    /// exist when the first job comes (their cost counts).
    pub lead_ms: i64,
    /// Keep a time series for plots.
    pub timeline: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival(usize),
    Ready(usize),
    Finish(usize, usize),
    Reclaim(usize),
    Tick,
}

#[derive(Debug, Clone)]
struct SimMachine {
    price_per_ms: f64,
    /// What its root volume costs while it is stopped.
    stopped_price_per_ms: f64,
    /// Start of the current running period (launch or start).
    run_since: i64,
    /// Running time of closed periods, and what EC2 bills for them (60 s minimum each).
    run_ms: i64,
    billed_ms: i64,
    /// Stopped since (a stopped machine is neither alive nor billed per second).
    stopped_since: Option<i64>,
    stopped_ms: i64,
    ready: Option<i64>,
    ended: Option<i64>,
    /// Jobs it runs at once (`jobs_per_machine`; 1 for one job per machine).
    capacity: u32,
    /// Time it ran at least one job (closed periods), and since when it runs one now: a
    /// machine is busy while it runs any job, idle (paid for nothing) while it runs none.
    busy_ms: i64,
    busy_since: Option<i64>,
    /// The jobs running on it and when each started, oldest first.
    jobs: Vec<(usize, i64)>,
    /// Time its jobs ran (closed runs), summed over its slots.
    job_ms: i64,
}

/// Hours in a month as AWS bills EBS (GB-months are prorated by the hour over 730 h).
const HOURS_PER_MONTH: f64 = 730.0;

impl SimMachine {
    /// Ends the current running period at `now` (a stop, a termination or a reclaim): its
    /// time is billed with EC2's one-minute minimum.
    fn end_run(&mut self, now: i64) {
        let run = now - self.run_since;
        self.run_ms += run;
        self.billed_ms += run.max(MIN_BILLED_MS);
    }

    /// Ends the current stopped period at `now` (a start or a termination).
    fn end_stop(&mut self, now: i64) {
        if let Some(since) = self.stopped_since.take() {
            self.stopped_ms += now - since;
        }
    }
}

/// One sample of the time series: jobs in the system (running or waiting), machines that
/// exist (booting, idle or busy) and those not running a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Sample {
    pub t: i64,
    pub demand: u32,
    pub machines: u32,
    pub idle: u32,
}

/// What a replay measured.
#[derive(Debug, Clone, Default)]
pub(super) struct Outcome {
    pub name: String,
    /// Per job, milliseconds between asking for a machine and running on one (time spent
    /// running on a machine that was then reclaimed does not count as waiting).
    pub waits_ms: Vec<i64>,
    pub machine_ms: i64,
    pub busy_ms: i64,
    /// Running time x capacity (job slots paid for) and the time jobs ran in them
    /// (reruns of reclaimed jobs too); equal to `machine_ms` and `busy_ms` when every
    /// machine runs one job at a time.
    pub slot_ms: i64,
    pub job_ms: i64,
    /// Whether some machine had more than one slot (then the summary shows idle slots).
    pub shared: bool,
    pub launches: u64,
    /// StartInstances of stopped machines, and their stopped time.
    pub starts: u64,
    pub stopped_ms: i64,
    pub cost: f64,
    pub reclaims: u64,
    /// Policy errors the engine refused (terminating a busy machine, running a job twice):
    /// always zero for a correct policy.
    pub violations: u64,
    pub timeline: Vec<Sample>,
    pub start: i64,
    pub end: i64,
}

pub(super) struct Ctx<'a> {
    pub now: i64,
    pub jobs: &'a [Job],
    env: &'a Env,
    rng: Rng,
    events: BinaryHeap<Reverse<(i64, u64, Ev)>>,
    seq: u64,
    machines: Vec<SimMachine>,
    started: Vec<Option<i64>>,
    ran_before: Vec<i64>,
    running_on: Vec<Option<usize>>,
    alive: u32,
    busy: u32,
    arrived: u32,
    done: u32,
    launches: u64,
    starts: u64,
    reclaims: u64,
    violations: u64,
}

impl<'a> Ctx<'a> {
    fn push(&mut self, at: i64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    pub(super) fn now_utc(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.now)
            .single()
            .unwrap_or_default()
    }

    /// Launches an instance of `instance_type` (a root volume of the default size: policies
    /// that never stop machines never pay for it). Returns the machine's index.
    pub(super) fn launch(&mut self, instance_type: &str) -> usize {
        self.launch_with_root(instance_type, DEFAULT_ROOT_GB)
    }

    /// Launches an instance of `instance_type` with a `root_gb` root volume, for one job
    /// at a time. Returns the machine's index.
    pub(super) fn launch_with_root(&mut self, instance_type: &str, root_gb: u32) -> usize {
        self.launch_with(instance_type, root_gb, 1)
    }

    /// Launches an instance of `instance_type` with a `root_gb` root volume that runs up
    /// to `capacity` jobs at once (0 counts as 1); it is ready after a draw from the
    /// launch distribution. Returns the machine's index.
    pub(super) fn launch_with(
        &mut self,
        instance_type: &str,
        root_gb: u32,
        capacity: u32,
    ) -> usize {
        let id = self.machines.len();
        let price = self.env.prices.get(instance_type).copied().unwrap_or(0.0);
        let disk_per_hour = f64::from(root_gb) * self.env.ebs_usd_per_gb_month / HOURS_PER_MONTH;
        self.machines.push(SimMachine {
            price_per_ms: price / 3.6e6,
            stopped_price_per_ms: disk_per_hour / 3.6e6,
            run_since: self.now,
            run_ms: 0,
            billed_ms: 0,
            stopped_since: None,
            stopped_ms: 0,
            ready: None,
            ended: None,
            capacity: capacity.max(1),
            busy_ms: 0,
            busy_since: None,
            jobs: Vec::new(),
            job_ms: 0,
        });
        self.alive += 1;
        self.launches += 1;
        let boot_ms = (self.env.launch.sample(&mut self.rng) * 1000.0).round() as i64;
        self.push(self.now + boot_ms, Ev::Ready(id));
        if self.env.reclaims_per_hour > 0.0 {
            let life = self.rng.exponential(3.6e6 / self.env.reclaims_per_hour) as i64;
            self.push(self.now + life.max(1), Ev::Reclaim(id));
        }
        id
    }

    /// Terminates a machine (no-op when it is already gone). Refused for a machine running
    /// any job.
    pub(super) fn terminate(&mut self, m: usize) {
        let Some(machine) = self.machines.get_mut(m) else {
            self.violations += 1;
            return;
        };
        if machine.ended.is_some() {
            return;
        }
        if !machine.jobs.is_empty() {
            self.violations += 1;
            return;
        }
        machine.ended = Some(self.now);
        if machine.stopped_since.is_some() {
            machine.end_stop(self.now);
        } else {
            machine.end_run(self.now);
            self.alive -= 1;
        }
    }

    /// Stops a ready, free machine: its running period ends (billed with EC2's minimum),
    /// its disk is billed until it starts or is terminated. Refused otherwise.
    pub(super) fn stop(&mut self, m: usize) {
        let now = self.now;
        let Some(machine) = self.machines.get_mut(m) else {
            self.violations += 1;
            return;
        };
        if machine.ended.is_some()
            || !machine.jobs.is_empty()
            || machine.ready.is_none()
            || machine.stopped_since.is_some()
        {
            self.violations += 1;
            return;
        }
        machine.end_run(now);
        machine.stopped_since = Some(now);
        machine.ready = None;
        self.alive -= 1;
    }

    /// Starts a stopped machine: ready again after a draw from the start distribution.
    pub(super) fn start_stopped(&mut self, m: usize) {
        let now = self.now;
        let Some(machine) = self.machines.get_mut(m) else {
            self.violations += 1;
            return;
        };
        if machine.ended.is_some() || machine.stopped_since.is_none() {
            self.violations += 1;
            return;
        }
        machine.end_stop(now);
        machine.run_since = now;
        self.alive += 1;
        self.starts += 1;
        let start_ms = (self.env.start.sample(&mut self.rng) * 1000.0).round() as i64;
        self.push(now + start_ms, Ev::Ready(m));
    }

    /// Runs `job` on machine `m` (ready, alive, with a free slot). A job does not slow
    /// the others on its machine: it takes its recorded duration however many share it.
    pub(super) fn start(&mut self, job: usize, m: usize) {
        let ok = self.machines.get(m).is_some_and(|x| {
            x.ended.is_none() && x.ready.is_some() && (x.jobs.len() as u32) < x.capacity
        }) && self.running_on[job].is_none()
            && self.started[job].is_none();
        if !ok {
            self.violations += 1;
            return;
        }
        let now = self.now;
        let machine = &mut self.machines[m];
        if machine.jobs.is_empty() {
            machine.busy_since = Some(now);
            self.busy += 1;
        }
        machine.jobs.push((job, now));
        self.running_on[job] = Some(m);
        let duration = self.jobs[job].duration;
        self.push(self.now + duration, Ev::Finish(job, m));
    }

    fn sample(&self) -> Sample {
        Sample {
            t: self.now,
            demand: self.arrived - self.done,
            machines: self.alive,
            idle: self.alive - self.busy,
        }
    }
}

/// Replays `trace` through `scaler` and measures it.
pub(super) fn run(name: &str, trace: &Trace, scaler: &mut dyn Scaler, env: &Env) -> Outcome {
    let n = trace.jobs.len();
    let mut ctx = Ctx {
        now: 0,
        jobs: &trace.jobs,
        env,
        rng: Rng::new(env.seed),
        events: BinaryHeap::new(),
        seq: 0,
        machines: Vec::new(),
        started: vec![None; n],
        ran_before: vec![0; n],
        running_on: vec![None; n],
        alive: 0,
        busy: 0,
        arrived: 0,
        done: 0,
        launches: 0,
        starts: 0,
        reclaims: 0,
        violations: 0,
    };
    let start = trace.jobs.first().map_or(0, |j| j.arrival) - env.lead_ms;
    for (i, j) in trace.jobs.iter().enumerate() {
        ctx.push(j.arrival, Ev::Arrival(i));
    }
    ctx.now = start;
    ctx.push(start, Ev::Tick);
    // A policy that never serves some job must not spin forever.
    let horizon = trace.jobs.last().map_or(start, |j| j.arrival) + 7 * 86_400_000;
    let mut timeline = Vec::new();
    while ctx.done < n as u32 {
        let Some(Reverse((t, _, ev))) = ctx.events.pop() else {
            break;
        };
        if t > horizon {
            break;
        }
        ctx.now = t;
        match ev {
            Ev::Arrival(j) => {
                ctx.arrived += 1;
                scaler.arrive(&mut ctx, j);
            }
            Ev::Ready(m) => {
                let machine = &mut ctx.machines[m];
                if machine.ended.is_none()
                    && machine.ready.is_none()
                    && machine.stopped_since.is_none()
                {
                    machine.ready = Some(t);
                    scaler.ready(&mut ctx, m);
                }
            }
            Ev::Finish(j, m) => {
                let machine = &mut ctx.machines[m];
                let at = machine.jobs.iter().position(|&(x, _)| x == j);
                if let Some(at) = at.filter(|_| machine.ended.is_none()) {
                    let (_, since) = machine.jobs.remove(at);
                    machine.job_ms += t - since;
                    if machine.jobs.is_empty() {
                        machine.busy_ms += t - machine.busy_since.take().unwrap_or(t);
                        ctx.busy -= 1;
                    }
                    ctx.running_on[j] = None;
                    ctx.started[j] = Some(since);
                    ctx.done += 1;
                    scaler.finish(&mut ctx, j, m);
                }
            }
            Ev::Reclaim(m) => {
                let machine = &mut ctx.machines[m];
                // A stopped machine is not reclaimed (spot instances of a stopped pool are
                // out of scope); a reclaim of a running one ends its period.
                if machine.ended.is_none() && machine.stopped_since.is_none() {
                    machine.ended = Some(t);
                    machine.end_run(t);
                    let running = std::mem::take(&mut machine.jobs);
                    if let Some(since) = machine.busy_since.take() {
                        machine.busy_ms += t - since;
                        ctx.busy -= 1;
                    }
                    ctx.alive -= 1;
                    ctx.reclaims += 1;
                    for &(j, since) in &running {
                        machine.job_ms += t - since;
                        ctx.running_on[j] = None;
                        ctx.ran_before[j] += t - since;
                    }
                    let jobs: Vec<usize> = running.iter().map(|&(j, _)| j).collect();
                    scaler.lost(&mut ctx, m, &jobs);
                }
            }
            Ev::Tick => {
                scaler.tick(&mut ctx);
                if env.timeline {
                    timeline.push(ctx.sample());
                }
                let next = t + env.tick_ms;
                ctx.push(next, Ev::Tick);
            }
        }
    }
    let end = ctx.now;
    if env.timeline {
        timeline.push(ctx.sample());
    }
    let mut out = Outcome {
        name: name.to_owned(),
        launches: ctx.launches,
        starts: ctx.starts,
        reclaims: ctx.reclaims,
        violations: ctx.violations,
        timeline,
        start,
        end,
        ..Outcome::default()
    };
    for m in &ctx.machines {
        // Machines still there at the end are billed up to it, as if ended then.
        let mut m = m.clone();
        if m.ended.is_none() {
            if m.stopped_since.is_some() {
                m.end_stop(end);
            } else {
                m.end_run(end);
            }
        }
        let busy = m.busy_ms + m.busy_since.map_or(0, |since| end - since);
        let jobs: i64 = m.jobs.iter().map(|&(_, since)| end - since).sum();
        out.machine_ms += m.run_ms;
        out.busy_ms += busy;
        out.slot_ms += m.run_ms * i64::from(m.capacity);
        out.job_ms += m.job_ms + jobs;
        out.shared |= m.capacity > 1;
        out.stopped_ms += m.stopped_ms;
        out.cost +=
            m.billed_ms as f64 * m.price_per_ms + m.stopped_ms as f64 * m.stopped_price_per_ms;
    }
    // A job's wait: from arrival to its (last) start, minus time spent on reclaimed machines.
    out.waits_ms = trace
        .jobs
        .iter()
        .enumerate()
        .map(|(i, j)| match ctx.started[i] {
            Some(s) => (s - j.arrival - ctx.ran_before[i]).max(0),
            None => end - j.arrival,
        })
        .collect();
    out
}

/// Summary numbers of one replay.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(super) struct Summary {
    pub name: String,
    pub p50_wait_s: f64,
    pub p95_wait_s: f64,
    pub max_wait_s: f64,
    pub idle_machine_hours: f64,
    pub busy_machine_hours: f64,
    pub stopped_machine_hours: f64,
    /// Job slots paid for and running no job (slot-hours), when machines run several jobs
    /// at once: a machine is busy while any of its jobs runs, so idle machine-hours alone
    /// hide its empty slots. Absent (and not in the JSON) with one job per machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_slot_hours: Option<f64>,
    pub launches: u64,
    pub starts: u64,
    pub cost: f64,
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100).
pub(super) fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Outcome {
    pub(super) fn summary(&self) -> Summary {
        let mut w = self.waits_ms.clone();
        w.sort_unstable();
        let s = |ms: i64| (ms as f64 / 100.0).round() / 10.0;
        let h = |ms: i64| (ms as f64 / 3.6e4).round() / 100.0;
        Summary {
            name: self.name.clone(),
            p50_wait_s: s(percentile(&w, 50.0)),
            p95_wait_s: s(percentile(&w, 95.0)),
            max_wait_s: s(w.last().copied().unwrap_or(0)),
            idle_machine_hours: h(self.machine_ms - self.busy_ms),
            busy_machine_hours: h(self.busy_ms),
            stopped_machine_hours: h(self.stopped_ms),
            idle_slot_hours: self.shared.then(|| h(self.slot_ms - self.job_ms)),
            launches: self.launches,
            starts: self.starts,
            cost: (self.cost * 100.0).round() / 100.0,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn env(boot: f64) -> Env {
        Env {
            launch: Dist::Fixed(boot),
            start: Dist::Fixed(boot / 4.0),
            ebs_usd_per_gb_month: 0.0,
            seed: 1,
            reclaims_per_hour: 0.0,
            tick_ms: 10_000,
            prices: BTreeMap::from([("t".to_string(), 3.6)]),
            lead_ms: 900_000,
            timeline: true,
        }
    }

    pub(crate) fn trace(jobs: &[(i64, i64)]) -> Trace {
        Trace {
            jobs: jobs
                .iter()
                .map(|&(at, d)| Job {
                    arrival: 1_700_000_000_000 + at * 1000,
                    duration: d * 1000,
                    class: "c".into(),
                })
                .collect(),
        }
    }

    /// One machine per job, launched on arrival, terminated on finish.
    struct OnDemand {
        waiting: Vec<(usize, usize)>,
    }

    impl Scaler for OnDemand {
        fn arrive(&mut self, ctx: &mut Ctx<'_>, job: usize) {
            let m = ctx.launch("t");
            self.waiting.push((m, job));
        }
        fn ready(&mut self, ctx: &mut Ctx<'_>, machine: usize) {
            if let Some(i) = self.waiting.iter().position(|(m, _)| *m == machine) {
                let (m, j) = self.waiting.remove(i);
                ctx.start(j, m);
            }
        }
        fn finish(&mut self, ctx: &mut Ctx<'_>, _job: usize, machine: usize) {
            ctx.terminate(machine);
        }
        fn lost(&mut self, ctx: &mut Ctx<'_>, machine: usize, jobs: &[usize]) {
            let booting = self.waiting.iter().position(|(m, _)| *m == machine);
            let job = jobs.first().copied();
            if let Some(j) = job.or_else(|| booting.map(|i| self.waiting.remove(i).1)) {
                self.arrive(ctx, j);
            }
        }
        fn tick(&mut self, _ctx: &mut Ctx<'_>) {}
    }

    #[test]
    fn on_demand_waits_the_boot_and_bills_the_minute_minimum() {
        let t = trace(&[(0, 100), (5, 10)]);
        let out = run("x", &t, &mut OnDemand { waiting: vec![] }, &env(40.0));
        let s = out.summary();
        assert_eq!(out.waits_ms, vec![40_000, 40_000]);
        assert_eq!(s.launches, 2);
        assert_eq!(
            s.busy_machine_hours,
            ((110.0 / 3600.0) * 100.0_f64).round() / 100.0
        );
        // Machine 1: 140 s; machine 2: 50 s billed as 60 s; $3.6/h = $0.001/s.
        assert!((out.cost - 0.2).abs() < 1e-9, "{}", out.cost);
        assert_eq!(
            out.machine_ms - out.busy_ms,
            80_000,
            "boot time counts as idle"
        );
        assert_eq!(out.violations, 0);
    }

    #[test]
    fn reclaimed_job_runs_again_and_only_waiting_counts() {
        let mut e = env(10.0);
        e.reclaims_per_hour = 40.0; // mean life 90 s, so a 10-minute job is reclaimed often
        let t = trace(&[(0, 600)]);
        let out = run("x", &t, &mut OnDemand { waiting: vec![] }, &e);
        assert!(out.reclaims > 0);
        assert!(out.waits_ms[0] >= 10_000, "{:?}", out.waits_ms);
        assert!(
            out.busy_ms >= 600_000,
            "the reclaimed run counts as busy machine time"
        );
        assert!(out.launches > 1);
        assert_eq!(out.violations, 0);
    }

    /// Launches a machine for the job, stops it once booted, starts it an hour later and
    /// runs the job on it.
    #[derive(Default)]
    struct StopStart {
        machine: Option<usize>,
        stopped_at: Option<i64>,
        job: Option<usize>,
    }

    impl Scaler for StopStart {
        fn arrive(&mut self, ctx: &mut Ctx<'_>, job: usize) {
            self.machine = Some(ctx.launch_with_root("t", 73));
            self.job = Some(job);
        }
        fn ready(&mut self, ctx: &mut Ctx<'_>, machine: usize) {
            if self.stopped_at.is_none() {
                ctx.stop(machine);
                self.stopped_at = Some(ctx.now);
            } else if let Some(j) = self.job.take() {
                ctx.start(j, machine);
            }
        }
        fn finish(&mut self, ctx: &mut Ctx<'_>, _job: usize, machine: usize) {
            ctx.terminate(machine);
        }
        fn lost(&mut self, _ctx: &mut Ctx<'_>, _machine: usize, _jobs: &[usize]) {}
        fn tick(&mut self, ctx: &mut Ctx<'_>) {
            if let (Some(m), Some(at)) = (self.machine, self.stopped_at) {
                if self.job.is_some() && ctx.now - at >= 3_600_000 {
                    ctx.start_stopped(m);
                    self.machine = None;
                }
            }
        }
    }

    #[test]
    fn a_stopped_machine_costs_its_root_volume_and_each_running_period_a_minute_at_least() {
        let mut e = env(40.0); // launch 40 s, start 10 s
        e.ebs_usd_per_gb_month = 10.0; // 73 GB: $1 an hour while stopped
        let out = run("x", &trace(&[(0, 100)]), &mut StopStart::default(), &e);
        assert_eq!(out.violations, 0);
        assert_eq!((out.launches, out.starts), (1, 1));
        assert_eq!(out.stopped_ms, 3_600_000);
        assert_eq!(out.waits_ms, vec![3_650_000]);
        // Booted 40 s, billed 60 s ($0.06 at $3.6/h); stopped an hour ($1); started and
        // ran the job: 110 s ($0.11).
        assert!((out.cost - 1.17).abs() < 1e-9, "{}", out.cost);
    }

    /// Every job on one machine of `capacity` slots, launched on the first arrival (and
    /// again after a reclaim), terminated once it runs nothing and nothing waits. A
    /// `careless` one terminates it whenever a job ends; `assumed` is the slots it believes
    /// the machine has.
    struct Shared {
        capacity: u32,
        assumed: u32,
        careless: bool,
        machine: Option<usize>,
        ready: bool,
        running: u32,
        queue: Vec<usize>,
        /// The most jobs one reclaim took.
        most_lost: usize,
    }

    impl Shared {
        fn new(capacity: u32) -> Self {
            Self {
                capacity,
                assumed: capacity,
                careless: false,
                machine: None,
                ready: false,
                running: 0,
                queue: Vec::new(),
                most_lost: 0,
            }
        }

        fn run_queued(&mut self, ctx: &mut Ctx<'_>) {
            match self.machine {
                None if !self.queue.is_empty() => {
                    self.machine = Some(ctx.launch_with("t", DEFAULT_ROOT_GB, self.capacity));
                }
                Some(m) if self.ready => {
                    while self.running < self.assumed && !self.queue.is_empty() {
                        ctx.start(self.queue.remove(0), m);
                        self.running += 1;
                    }
                }
                _ => {}
            }
        }
    }

    impl Scaler for Shared {
        fn arrive(&mut self, ctx: &mut Ctx<'_>, job: usize) {
            self.queue.push(job);
            self.run_queued(ctx);
        }
        fn ready(&mut self, ctx: &mut Ctx<'_>, _machine: usize) {
            self.ready = true;
            self.run_queued(ctx);
        }
        fn finish(&mut self, ctx: &mut Ctx<'_>, _job: usize, machine: usize) {
            self.running -= 1;
            self.run_queued(ctx);
            if self.careless || (self.running == 0 && self.queue.is_empty()) {
                ctx.terminate(machine);
            }
            if self.running == 0 && self.queue.is_empty() {
                self.machine = None;
                self.ready = false;
            }
        }
        fn lost(&mut self, ctx: &mut Ctx<'_>, _machine: usize, jobs: &[usize]) {
            self.most_lost = self.most_lost.max(jobs.len());
            (self.machine, self.ready, self.running) = (None, false, 0);
            self.queue.extend_from_slice(jobs);
            self.run_queued(ctx);
        }
        fn tick(&mut self, _ctx: &mut Ctx<'_>) {}
    }

    #[test]
    fn jobs_sharing_a_machine_run_together_and_it_is_busy_while_any_runs() {
        // Two slots: both jobs run from the boot (40 s); the machine is busy 100 s, not
        // 150 (the job-seconds), and billed 140 s.
        let t = trace(&[(0, 100), (0, 50)]);
        let out = run("x", &t, &mut Shared::new(2), &env(40.0));
        assert_eq!(out.violations, 0);
        assert_eq!(out.launches, 1);
        assert_eq!(out.waits_ms, vec![40_000, 40_000]);
        assert_eq!((out.machine_ms, out.busy_ms), (140_000, 100_000));
        // Two slots for 140 s, jobs in them for 150 s: 130 slot-seconds idle.
        assert_eq!((out.slot_ms, out.job_ms), (280_000, 150_000));
        assert_eq!(out.summary().idle_slot_hours, Some(0.04));
        assert!((out.cost - 0.14).abs() < 1e-9, "{}", out.cost);
        // One slot: the second job waits for the first, as before slots.
        let out = run("x", &t, &mut Shared::new(1), &env(40.0));
        assert_eq!(out.violations, 0);
        assert_eq!(out.waits_ms, vec![40_000, 140_000]);
        assert_eq!((out.machine_ms, out.busy_ms), (190_000, 150_000));
        assert_eq!((out.slot_ms, out.job_ms), (190_000, 150_000));
        assert_eq!(
            out.summary().idle_slot_hours,
            None,
            "one slot: idle machine-hours say it"
        );
    }

    #[test]
    fn a_machine_running_any_job_is_not_terminated_and_a_full_one_takes_none() {
        let t = trace(&[(0, 100), (0, 50)]);
        let mut careless = Shared::new(2);
        careless.careless = true;
        let out = run("x", &t, &mut careless, &env(40.0));
        // The first end (90 s) leaves a job running: refused; the second is fine.
        assert_eq!(out.violations, 1);
        assert_eq!(out.machine_ms, 140_000);
        // A third job on a two-slot machine is refused; with two, it waits for a slot.
        let t = trace(&[(0, 100), (0, 100), (0, 100)]);
        let mut overfull = Shared::new(2);
        overfull.assumed = 3;
        assert_eq!(run("x", &t, &mut overfull, &env(40.0)).violations, 1);
        let ok = run("x", &t, &mut Shared::new(2), &env(40.0));
        assert_eq!(ok.violations, 0);
        assert_eq!(ok.waits_ms, vec![40_000, 40_000, 140_000]);
    }

    #[test]
    fn a_reclaimed_shared_machine_gives_back_every_job_it_ran() {
        let mut e = env(10.0);
        e.reclaims_per_hour = 60.0; // mean life 60 s: most 110 s runs are cut short
        let t = trace(&[(0, 100), (0, 100)]);
        let mut both_lost = 0;
        for seed in 1..=10 {
            e.seed = seed;
            let mut s = Shared::new(2);
            let out = run("x", &t, &mut s, &e);
            assert_eq!(out.violations, 0);
            if s.most_lost == 2 {
                both_lost += 1;
                // Both ran again from the start; only the time not running is waiting.
                assert!(out.launches > 1 && out.busy_ms > 100_000, "{out:?}");
                assert!(
                    out.waits_ms.iter().all(|&w| w >= 20_000),
                    "{:?}",
                    out.waits_ms
                );
            }
        }
        assert!(
            both_lost > 0,
            "no seed reclaimed the machine under both jobs"
        );
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 95.0), 95);
        assert_eq!(percentile(&[7], 95.0), 7);
        assert_eq!(percentile(&[], 95.0), 0);
    }
}

//! Baseline: GitLab Runner's docker+machine autoscaler (`[runners.machine]`), modelled on
//! its documentation and on the provider code (`executors/docker/machine`):
//!
//! - Every job request runs `updateMachines` then `createMachines`. `updateMachines` walks
//!   the machines oldest first with counts of the machines seen SO FAR: an idle machine is
//!   removed when it reached `MaxBuilds`, when the machines seen reach `limit`, or when it
//!   has been idle longer than `IdleTime` and the machines seen so far already satisfy the
//!   idle rule (`Idle + Creating >= IdleCount`, or with `IdleScaleFactor` at least
//!   `max(IdleCountMin, 1)` and at least `int(InUse x IdleScaleFactor)`). So the oldest idle
//!   machines survive and newer surplus ones go.
//! - `createMachines` pre-creates idle machines until that same idle rule holds, the
//!   machines reach `limit`, or `MaxGrowthRate` machines are being created.
//! - A job takes the NEWEST idle machine. With `IdleCount > 0` and no idle machine the
//!   runner does not take the job at all (`no free machines that can process builds`): it
//!   stays queued in GitLab until a machine is idle. With `IdleCount = 0` the job is taken
//!   and creates its own machine on demand (waiting for `MaxGrowthRate`), then runs on
//!   whichever machine is free first.
//! - A released machine is removed once it ran `MaxBuilds` jobs; `IdleTime` counts from the
//!   end of its last job (or from its creation).
//! - `[[runners.machine.autoscaling]]` periods override IdleCount, IdleCountMin,
//!   IdleScaleFactor and IdleTime; the last matching period wins.
//!
//! Not modelled (the same for every policy in the simulator): GitLab's job polling
//! (`check_interval`), removal taking time, creation failures.

use std::collections::{BTreeMap, VecDeque};

use super::engine::{Ctx, Scaler};
use super::periods::PeriodCache;

/// The knobs one period (or the runner itself) sets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Knobs {
    pub idle_count: u32,
    pub idle_count_min: u32,
    pub idle_scale_factor: f64,
    pub idle_time_s: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Period {
    pub periods: Vec<String>,
    pub timezone: String,
    pub knobs: Knobs,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Config {
    pub knobs: Knobs,
    /// `MaxBuilds`; 0 means unlimited.
    pub max_builds: u32,
    /// `limit`: machines in any state; 0 means unlimited.
    pub limit: u32,
    /// `MaxGrowthRate`: machines being created at once; 0 means unlimited.
    pub max_growth_rate: u32,
    pub periods: Vec<Period>,
    pub instance_type: String,
}

impl Config {
    pub(super) fn label(&self) -> String {
        let k = &self.knobs;
        let mut s = format!("IdleCount={} IdleTime={}s", k.idle_count, k.idle_time_s);
        if k.idle_scale_factor > 0.0 {
            s += &format!(
                " IdleScaleFactor={} IdleCountMin={}",
                k.idle_scale_factor, k.idle_count_min
            );
        }
        for p in &self.periods {
            s += &format!(
                " [{} {}: IdleCount={} IdleTime={}s]",
                p.periods.join(","),
                p.timezone,
                p.knobs.idle_count,
                p.knobs.idle_time_s
            );
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Creating,
    Idle,
    Used,
}

#[derive(Debug, Clone)]
struct Machine {
    m: usize,
    state: State,
    /// `details.Used`: creation end or the end of the last job.
    used_at: i64,
    used_count: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct Data {
    creating: u32,
    idle: u32,
    used: u32,
    removing: u32,
}

impl Data {
    fn available(&self) -> u32 {
        self.creating + self.idle
    }
    fn total(&self) -> u32 {
        self.creating + self.idle + self.used + self.removing
    }
}

struct Runner {
    config: Config,
    periods: PeriodCache,
    /// Creation order (oldest first), like `docker-machine ls` of timestamped names.
    machines: Vec<Machine>,
    /// Creations waiting for `MaxGrowthRate` (already counted as creating).
    queued_creations: u32,
    /// Jobs still queued in GitLab (not taken by the runner).
    pending: VecDeque<usize>,
    /// Jobs taken with `IdleCount = 0`, waiting for a machine created for them.
    accepted: VecDeque<usize>,
}

impl Runner {
    fn knobs(&mut self, now: i64) -> Knobs {
        match self.periods.active(now) {
            Some(i) => self.config.periods[i].knobs,
            None => self.config.knobs,
        }
    }

    fn idle_rule_met(k: &Knobs, d: &Data) -> bool {
        let available = d.available();
        if available >= k.idle_count {
            return true;
        }
        if k.idle_scale_factor <= 0.0 {
            return false;
        }
        let min = k.idle_count_min.max(1);
        let desired = (f64::from(d.used) * k.idle_scale_factor) as u32;
        available >= min && available >= desired
    }

    fn growth_exceeded(&self, d: &Data) -> bool {
        self.config.max_growth_rate > 0 && d.creating >= self.config.max_growth_rate
    }

    fn total_exceeded(&self, d: &Data) -> bool {
        self.config.limit > 0 && d.total() >= self.config.limit
    }

    fn data(&self) -> Data {
        let mut d = Data {
            creating: self.queued_creations,
            ..Data::default()
        };
        for m in &self.machines {
            match m.state {
                State::Creating => d.creating += 1,
                State::Idle => d.idle += 1,
                State::Used => d.used += 1,
            }
        }
        d
    }

    /// `updateMachines`: removals with running counts, oldest machine first.
    fn update(&mut self, ctx: &mut Ctx<'_>, k: &Knobs) {
        let mut seen = Data {
            creating: self.queued_creations,
            ..Data::default()
        };
        let idle_time_ms = k.idle_time_s as i64 * 1000;
        let mut keep = Vec::with_capacity(self.machines.len());
        for m in std::mem::take(&mut self.machines) {
            let remove = m.state == State::Idle
                && ((self.config.max_builds > 0 && m.used_count >= self.config.max_builds)
                    || self.total_exceeded(&seen)
                    || (ctx.now - m.used_at > idle_time_ms && Self::idle_rule_met(k, &seen)));
            if remove {
                ctx.terminate(m.m);
                seen.removing += 1;
                continue;
            }
            match m.state {
                State::Creating => seen.creating += 1,
                State::Idle => seen.idle += 1,
                State::Used => seen.used += 1,
            }
            keep.push(m);
        }
        self.machines = keep;
    }

    fn create(&mut self, ctx: &mut Ctx<'_>) {
        let m = ctx.launch(&self.config.instance_type);
        self.machines.push(Machine {
            m,
            state: State::Creating,
            used_at: ctx.now,
            used_count: 0,
        });
    }

    /// `createMachines`: pre-create idle machines.
    fn create_idle(&mut self, ctx: &mut Ctx<'_>, k: &Knobs) {
        let mut d = self.data();
        while !self.growth_exceeded(&d) && !self.total_exceeded(&d) && !Self::idle_rule_met(k, &d) {
            self.create(ctx);
            d.creating += 1;
        }
    }

    /// Starts creations that were waiting for `MaxGrowthRate`.
    fn start_queued(&mut self, ctx: &mut Ctx<'_>) {
        while self.queued_creations > 0 {
            let creating = self
                .machines
                .iter()
                .filter(|m| m.state == State::Creating)
                .count() as u32;
            if self.config.max_growth_rate > 0 && creating >= self.config.max_growth_rate {
                break;
            }
            self.queued_creations -= 1;
            self.create(ctx);
        }
    }

    fn newest_idle(&self) -> Option<usize> {
        self.machines.iter().rposition(|m| m.state == State::Idle)
    }

    fn run_on(&mut self, ctx: &mut Ctx<'_>, i: usize, job: usize) {
        let m = &mut self.machines[i];
        m.state = State::Used;
        m.used_at = ctx.now;
        m.used_count += 1;
        ctx.start(job, m.m);
    }

    fn step(&mut self, ctx: &mut Ctx<'_>) {
        let k = self.knobs(ctx.now);
        self.start_queued(ctx);
        self.update(ctx, &k);
        self.create_idle(ctx, &k);
        // Jobs already taken get the first free machine.
        while !self.accepted.is_empty() {
            let Some(i) = self.newest_idle() else { break };
            let job = self.accepted.pop_front().unwrap_or_default();
            self.run_on(ctx, i, job);
        }
        // One job request at a time, each one an Acquire.
        while let Some(&job) = self.pending.front() {
            if let Some(i) = self.newest_idle() {
                self.pending.pop_front();
                self.run_on(ctx, i, job);
            } else if k.idle_count == 0 {
                // `limit` also caps the jobs the runner takes.
                let d = self.data();
                let taken = d.used + self.accepted.len() as u32;
                if self.config.limit > 0 && taken >= self.config.limit {
                    break;
                }
                self.pending.pop_front();
                self.accepted.push_back(job);
                if self.growth_exceeded(&d) {
                    self.queued_creations += 1;
                } else {
                    self.create(ctx);
                }
            } else {
                break; // no free machines that can process builds
            }
            self.update(ctx, &k);
            self.create_idle(ctx, &k);
        }
    }

    fn find(&self, m: usize) -> Option<usize> {
        self.machines.iter().position(|x| x.m == m)
    }
}

/// docker+machine, one runner per class.
pub(super) struct DockerMachine {
    runners: BTreeMap<String, Runner>,
}

impl DockerMachine {
    /// `configs` by class; jobs of an unknown class use the first runner.
    pub(super) fn new(configs: BTreeMap<String, Config>) -> Self {
        Self {
            runners: configs
                .into_iter()
                .map(|(class, config)| {
                    let periods = PeriodCache::new(
                        &config
                            .periods
                            .iter()
                            .map(|p| (p.periods.clone(), p.timezone.clone()))
                            .collect::<Vec<_>>(),
                    );
                    (
                        class,
                        Runner {
                            config,
                            periods,
                            machines: Vec::new(),
                            queued_creations: 0,
                            pending: VecDeque::new(),
                            accepted: VecDeque::new(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn runner_of(&mut self, class: &str) -> Option<&mut Runner> {
        if self.runners.contains_key(class) {
            self.runners.get_mut(class)
        } else {
            self.runners.values_mut().next()
        }
    }

    fn runner_with(&mut self, m: usize) -> Option<(&mut Runner, usize)> {
        self.runners
            .values_mut()
            .find_map(|r| r.find(m).map(|i| (r, i)))
    }
}

impl Scaler for DockerMachine {
    fn arrive(&mut self, ctx: &mut Ctx<'_>, job: usize) {
        let class = ctx.jobs[job].class.clone();
        if let Some(r) = self.runner_of(&class) {
            r.pending.push_back(job);
            r.step(ctx);
        }
    }

    fn ready(&mut self, ctx: &mut Ctx<'_>, machine: usize) {
        if let Some((r, i)) = self.runner_with(machine) {
            r.machines[i].state = State::Idle;
            r.machines[i].used_at = ctx.now;
            r.step(ctx);
        }
    }

    fn finish(&mut self, ctx: &mut Ctx<'_>, _job: usize, machine: usize) {
        if let Some((r, i)) = self.runner_with(machine) {
            let m = &mut r.machines[i];
            m.used_at = ctx.now;
            if r.config.max_builds > 0 && m.used_count >= r.config.max_builds {
                ctx.terminate(m.m);
                r.machines.remove(i);
            } else {
                m.state = State::Idle;
            }
            r.step(ctx);
        }
    }

    fn lost(&mut self, ctx: &mut Ctx<'_>, machine: usize, jobs: &[usize]) {
        if let Some((r, i)) = self.runner_with(machine) {
            r.machines.remove(i);
            r.pending.extend(jobs.iter().copied());
            r.step(ctx);
        }
    }

    fn tick(&mut self, ctx: &mut Ctx<'_>) {
        for r in self.runners.values_mut() {
            r.step(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::engine::run;
    use super::super::engine::tests::{env, trace};
    use super::*;

    fn dm(idle_count: u32, idle_time_s: u64) -> Config {
        Config {
            knobs: Knobs {
                idle_count,
                idle_count_min: 0,
                idle_scale_factor: 0.0,
                idle_time_s,
            },
            max_builds: 0,
            limit: 0,
            max_growth_rate: 0,
            periods: Vec::new(),
            instance_type: "t".into(),
        }
    }

    fn replay(c: Config, jobs: &[(i64, i64)], boot: f64) -> super::super::engine::Outcome {
        let mut s = DockerMachine::new(BTreeMap::from([("c".to_string(), c)]));
        let out = run("dm", &trace(jobs), &mut s, &env(boot));
        assert_eq!(out.violations, 0);
        out
    }

    #[test]
    fn idle_count_zero_creates_one_machine_per_job_on_demand() {
        // Two jobs at once, boot 60 s: both wait 60 s on their own machines.
        let out = replay(dm(0, 0), &[(0, 30), (0, 30)], 60.0);
        assert_eq!(out.waits_ms, vec![60_000, 60_000]);
        assert_eq!(out.launches, 2);
    }

    #[test]
    fn idle_machine_is_reused_within_idle_time_then_removed() {
        // Job 1 at 0 (boot 60, runs 30, done at 90). Job 2 at 200: with IdleTime 300 it
        // reuses the machine (idle 110 s); with IdleTime 60 the machine was removed at the
        // first pass after 150 s (the 160 s tick) and job 2 waits for a new one.
        let out = replay(dm(0, 300), &[(0, 30), (200, 30)], 60.0);
        assert_eq!(out.waits_ms, vec![60_000, 0]);
        assert_eq!(out.launches, 1);
        assert_eq!(
            out.machine_ms, 230_000,
            "alive from 0 s until the replay ends"
        );
        let out = replay(dm(0, 60), &[(0, 30), (200, 30)], 60.0);
        assert_eq!(out.waits_ms, vec![60_000, 60_000]);
        assert_eq!(out.launches, 2);
        assert_eq!(out.machine_ms, 160_000 + 90_000);
    }

    #[test]
    fn with_idle_count_jobs_wait_for_idle_machines_and_bursts_serialise() {
        // IdleCount 2, boot 60 s: two machines are pre-created at t=0 (ready at 60).
        // Five jobs at 100 s: two run at once, the runner then refuses jobs until the
        // two replacements it pre-creates are idle (160 s), then two more, then one:
        // waits 0, 0, 60, 60, 120 — docker+machine never creates for a waiting job.
        let out = replay(dm(2, 3600), &[(100, 500); 5], 60.0);
        let mut w = out.waits_ms.clone();
        w.sort();
        assert_eq!(w, vec![0, 0, 60_000, 60_000, 120_000]);
    }

    #[test]
    fn surplus_idle_machines_go_newest_first_oldest_survive() {
        // IdleCount 1, IdleTime 60, boot 60. A is pre-created before the first job.
        // 100 s: job 1 takes A, B is pre-created; job 2 is refused until B is idle (160 s),
        // then C is pre-created (idle at 220). Job 1 ends at 200, job 2 at 260: three idle
        // machines. Walking oldest first, A is kept (nothing seen yet), B and C are removed
        // once idle over 60 s. Job 3 at 1000 s runs at once on A; D replaces it as idle.
        let out = replay(dm(1, 60), &[(100, 100), (100, 100), (1000, 1)], 60.0);
        assert_eq!(out.waits_ms, vec![0, 60_000, 0]);
        assert_eq!(out.launches, 4);
    }

    #[test]
    fn scale_factor_keeps_idle_proportional_to_machines_in_use() {
        let mut c = dm(10, 3600);
        c.knobs.idle_scale_factor = 0.5;
        c.knobs.idle_count_min = 1;
        // At start: in use 0 -> max(IdleCountMin, 1) = 1 idle machine.
        // Four jobs at 100 s (one runs, three are refused until machines are idle).
        let out = replay(c, &[(100, 1000); 4], 60.0);
        let mut w = out.waits_ms.clone();
        w.sort();
        // 100 s: job 1 takes the idle machine; in use 1 -> int(0.5) = 0, min 1: create 1.
        // 160 s: job 2 runs; in use 2 -> 1 idle: create 1. 220 s: job 3; in use 3 -> int(1.5)
        // = 1: create 1. 280 s: job 4.
        assert_eq!(w, vec![0, 60_000, 120_000, 180_000]);
    }

    #[test]
    fn last_matching_period_wins() {
        let period = |cron: &str, idle_count| Period {
            periods: vec![cron.into()],
            timezone: "UTC".into(),
            knobs: Knobs {
                idle_count,
                idle_count_min: 0,
                idle_scale_factor: 0.0,
                idle_time_s: 60,
            },
        };
        let mut c = dm(0, 60);
        c.periods = vec![period("* * * * *", 3), period("* 0-5 * * *", 1)];
        // The test trace starts at 22:13:20 UTC: only the catch-all period matches, so 3
        // idle machines, plus one to replace the one the job takes.
        let out = replay(c.clone(), &[(0, 1)], 60.0);
        assert_eq!(out.launches, 4);
        // Three hours later it is 01:13 UTC: the later period (1 idle) wins.
        let out = replay(c, &[(3 * 3600, 1)], 60.0);
        assert_eq!(out.launches, 2);
    }

    #[test]
    fn max_builds_replaces_the_machine_and_limit_caps_machines() {
        let mut c = dm(0, 600);
        c.max_builds = 1;
        let out = replay(c, &[(0, 10), (100, 10)], 60.0);
        assert_eq!(out.launches, 2);
        assert_eq!(out.waits_ms, vec![60_000, 60_000]);
        let mut c = dm(0, 600);
        c.limit = 1;
        let out = replay(c, &[(0, 100), (0, 100)], 60.0);
        assert_eq!(out.launches, 1);
        assert_eq!(out.waits_ms, vec![60_000, 160_000]);
    }
}

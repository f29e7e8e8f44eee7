//! Baseline: GitLab Runner's docker-autoscaler executor (taskscaler + a fleeting plugin),
//! modelled on its documentation, `capacity_per_instance` the class's `jobs_per_machine`
//! (1 unless set):
//!
//! - A job is taken at once and reserves capacity; it runs in a free slot of a ready
//!   instance, or waits until one is (the default, non-preemptive mode).
//! - Wanted capacity, in job slots = in use + waiting + the idle capacity, where the idle
//!   capacity is `idle_count`, or with `scale_factor` set,
//!   `max(idle_count, min(ceil(in_use x scale_factor), scale_factor_limit))` ("idle_count
//!   becomes the minimum idle capacity and scale_factor_limit the maximum");
//!   `scale_factor_limit = 0` leaves it uncapped. Instances wanted =
//!   `ceil(wanted capacity / capacity_per_instance)`; missing ones are requested at once
//!   (scale_throttle is 100/s), up to `max_instances`.
//! - An instance running no job for `idle_time` (since its last job ended, or since it was
//!   provisioned) is removed unless it is needed for the wanted capacity; the longest idle
//!   go first. An instance that took `max_use_count` jobs takes no more and is removed
//!   once its last one is released.
//! - `[[runners.autoscaler.policy]]` entries are periods; the last match wins.
//!
//! Assumptions where the documentation is silent: `ceil` for the scale-factor product,
//! and a job takes a slot on the fullest instance, then the most recently idle one (so
//! old ones can age out), as Flotilla's pool does.

use std::collections::{BTreeMap, VecDeque};

use super::engine::{Ctx, Scaler};
use super::periods::PeriodCache;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Knobs {
    /// Idle capacity in JOB SLOTS (= instances here).
    pub idle_count: u32,
    pub idle_time_s: u64,
    pub scale_factor: f64,
    /// 0: uncapped.
    pub scale_factor_limit: u32,
}

impl Knobs {
    pub(super) fn idle_capacity(&self, in_use: u32) -> u32 {
        if self.scale_factor <= 0.0 {
            return self.idle_count;
        }
        let mut scaled = (f64::from(in_use) * self.scale_factor).ceil() as u32;
        if self.scale_factor_limit > 0 {
            scaled = scaled.min(self.scale_factor_limit);
        }
        scaled.max(self.idle_count)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Policy {
    pub periods: Vec<String>,
    pub timezone: String,
    pub knobs: Knobs,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Config {
    /// The policy when no period entry matches (a `["* * * * *"]` entry listed first).
    pub knobs: Knobs,
    pub policies: Vec<Policy>,
    /// 0: unlimited.
    pub max_instances: u32,
    /// 0: unlimited.
    pub max_use_count: u32,
    pub instance_type: String,
    /// Jobs an instance runs at once (0 counts as 1).
    pub capacity_per_instance: u32,
}

impl Config {
    pub(super) fn label(&self) -> String {
        let k = &self.knobs;
        let mut s = format!("idle_count={} idle_time={}s", k.idle_count, k.idle_time_s);
        if k.scale_factor > 0.0 {
            s += &format!(
                " scale_factor={} scale_factor_limit={}",
                k.scale_factor, k.scale_factor_limit
            );
        }
        for p in &self.policies {
            s += &format!(
                " [{} {}: idle_count={} idle_time={}s]",
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
    Busy,
}

#[derive(Debug, Clone)]
struct Instance {
    m: usize,
    /// `Busy` while it runs any job.
    state: State,
    idle_since: i64,
    uses: u32,
    /// Jobs running on it.
    running: u32,
}

struct Scaler1 {
    config: Config,
    periods: PeriodCache,
    instances: Vec<Instance>,
    waiting: VecDeque<usize>,
}

impl Scaler1 {
    fn knobs(&mut self, now: i64) -> Knobs {
        match self.periods.active(now) {
            Some(i) => self.config.policies[i].knobs,
            None => self.config.knobs,
        }
    }

    fn capacity(&self) -> u32 {
        self.config.capacity_per_instance.max(1)
    }

    /// Whether the instance may take one more job: ready, a slot free, `max_use_count`
    /// not reached.
    fn may_take(&self, x: &Instance) -> bool {
        let max = self.config.max_use_count;
        x.state != State::Creating && x.running < self.capacity() && (max == 0 || x.uses < max)
    }

    fn step(&mut self, ctx: &mut Ctx<'_>) {
        // Waiting jobs fill the fullest instances, then the most recently idle.
        while !self.waiting.is_empty() {
            let Some(i) = self
                .instances
                .iter()
                .enumerate()
                .filter(|(_, x)| self.may_take(x))
                .max_by_key(|(_, x)| (x.running, x.idle_since))
                .map(|(i, _)| i)
            else {
                break;
            };
            let job = self.waiting.pop_front().unwrap_or_default();
            let inst = &mut self.instances[i];
            inst.state = State::Busy;
            inst.uses += 1;
            inst.running += 1;
            ctx.start(job, inst.m);
        }
        let k = self.knobs(ctx.now);
        let in_use: u32 = self.instances.iter().map(|x| x.running).sum();
        let slots = in_use + self.waiting.len() as u32 + k.idle_capacity(in_use);
        let wanted = slots.div_ceil(self.capacity());
        let have = self.instances.len() as u32;
        if wanted > have {
            let room = if self.config.max_instances > 0 {
                self.config.max_instances.saturating_sub(have)
            } else {
                u32::MAX
            };
            for _ in 0..(wanted - have).min(room) {
                let m = ctx.launch_with(
                    &self.config.instance_type,
                    super::engine::DEFAULT_ROOT_GB,
                    self.capacity(),
                );
                self.instances.push(Instance {
                    m,
                    state: State::Creating,
                    idle_since: ctx.now,
                    uses: 0,
                    running: 0,
                });
            }
        } else if wanted < have {
            let idle_ms = k.idle_time_s as i64 * 1000;
            let mut expired: Vec<(i64, usize)> = self
                .instances
                .iter()
                .filter(|x| x.state == State::Idle && ctx.now - x.idle_since >= idle_ms)
                .map(|x| (x.idle_since, x.m))
                .collect();
            expired.sort_unstable();
            let surplus = (have - wanted) as usize;
            for &(_, m) in expired.iter().take(surplus) {
                ctx.terminate(m);
                self.instances.retain(|x| x.m != m);
            }
        }
    }
}

/// taskscaler, one runner (and instance group) per class.
pub(super) struct Taskscaler {
    runners: BTreeMap<String, Scaler1>,
}

impl Taskscaler {
    pub(super) fn new(configs: BTreeMap<String, Config>) -> Self {
        Self {
            runners: configs
                .into_iter()
                .map(|(class, config)| {
                    let periods = PeriodCache::new(
                        &config
                            .policies
                            .iter()
                            .map(|p| (p.periods.clone(), p.timezone.clone()))
                            .collect::<Vec<_>>(),
                    );
                    (
                        class,
                        Scaler1 {
                            config,
                            periods,
                            instances: Vec::new(),
                            waiting: VecDeque::new(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn runner_with(&mut self, m: usize) -> Option<(&mut Scaler1, usize)> {
        self.runners
            .values_mut()
            .find_map(|r| r.instances.iter().position(|x| x.m == m).map(|i| (r, i)))
    }
}

impl Scaler for Taskscaler {
    fn arrive(&mut self, ctx: &mut Ctx<'_>, job: usize) {
        let class = &ctx.jobs[job].class;
        let r = if self.runners.contains_key(class) {
            self.runners.get_mut(class)
        } else {
            self.runners.values_mut().next()
        };
        if let Some(r) = r {
            r.waiting.push_back(job);
            r.step(ctx);
        }
    }

    fn ready(&mut self, ctx: &mut Ctx<'_>, machine: usize) {
        if let Some((r, i)) = self.runner_with(machine) {
            r.instances[i].state = State::Idle;
            r.instances[i].idle_since = ctx.now;
            r.step(ctx);
        }
    }

    fn finish(&mut self, ctx: &mut Ctx<'_>, _job: usize, machine: usize) {
        if let Some((r, i)) = self.runner_with(machine) {
            let inst = &mut r.instances[i];
            inst.running = inst.running.saturating_sub(1);
            if inst.running > 0 {
                // Other jobs run on: still busy (and not yet removable).
            } else if r.config.max_use_count > 0 && inst.uses >= r.config.max_use_count {
                ctx.terminate(inst.m);
                r.instances.remove(i);
            } else {
                inst.state = State::Idle;
                inst.idle_since = ctx.now;
            }
            r.step(ctx);
        }
    }

    fn lost(&mut self, ctx: &mut Ctx<'_>, machine: usize, jobs: &[usize]) {
        if let Some((r, i)) = self.runner_with(machine) {
            r.instances.remove(i);
            r.waiting.extend(jobs.iter().copied());
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
    use super::super::engine::tests::{env, trace};
    use super::super::engine::{run, Outcome};
    use super::*;

    fn ts(idle_count: u32, idle_time_s: u64) -> Config {
        Config {
            knobs: Knobs {
                idle_count,
                idle_time_s,
                scale_factor: 0.0,
                scale_factor_limit: 0,
            },
            policies: Vec::new(),
            max_instances: 0,
            max_use_count: 0,
            instance_type: "t".into(),
            capacity_per_instance: 1,
        }
    }

    fn replay(c: Config, jobs: &[(i64, i64)], boot: f64) -> Outcome {
        let mut s = Taskscaler::new(BTreeMap::from([("c".to_string(), c)]));
        let out = run("ts", &trace(jobs), &mut s, &env(boot));
        assert_eq!(out.violations, 0);
        out
    }

    #[test]
    fn idle_capacity_formula() {
        let k = Knobs {
            idle_count: 2,
            idle_time_s: 0,
            scale_factor: 0.5,
            scale_factor_limit: 5,
        };
        assert_eq!(k.idle_capacity(0), 2, "idle_count is the floor");
        assert_eq!(k.idle_capacity(5), 3, "ceil(2.5)");
        assert_eq!(k.idle_capacity(100), 5, "scale_factor_limit caps");
        let uncapped = Knobs {
            scale_factor_limit: 0,
            ..k
        };
        assert_eq!(uncapped.idle_capacity(100), 50);
    }

    #[test]
    fn burst_beyond_idle_count_is_provisioned_at_once() {
        // idle_count 2 (ready before the burst). Five jobs at 100 s: two run at once; the
        // three others are provisioned immediately (plus two to restore idle capacity), so
        // they all wait exactly one boot — unlike docker+machine, which serialises.
        let out = replay(ts(2, 3600), &[(100, 500); 5], 60.0);
        let mut w = out.waits_ms.clone();
        w.sort();
        assert_eq!(w, vec![0, 0, 60_000, 60_000, 60_000]);
        assert_eq!(out.launches, 2 + 3 + 2);
    }

    #[test]
    fn idle_instances_expire_after_idle_time_unless_needed() {
        // idle_count 1, idle_time 60. Job at 100 s takes the idle instance; a new idle
        // one is provisioned (ready 160). The job ends at 110: two idle. The surplus one
        // idle longest (the job's, idle since 110 s) goes at the first pass >= 60 s later
        // (the 170 s tick); the other is kept as the idle capacity.
        let out = replay(ts(1, 60), &[(100, 10), (500, 1)], 60.0);
        assert_eq!(out.waits_ms, vec![0, 0]);
        // The replay starts 15 min before the first job. Instance 1: -800..170 s;
        // instance 2: 100..501 s (the end); instance 3 replaces the idle one job 2 took:
        // 500..501 s.
        assert_eq!(out.launches, 3);
        assert_eq!(out.machine_ms, (170 + 800) * 1000 + 401_000 + 1_000);
    }

    #[test]
    fn scale_factor_grows_idle_capacity_with_use() {
        let mut c = ts(0, 3600);
        c.knobs.scale_factor = 1.0;
        c.knobs.scale_factor_limit = 10;
        // Four long jobs 200 s apart: the first waits a boot, then each one in use keeps
        // one more idle instance, so later jobs start at once.
        let out = replay(
            c,
            &[(0, 10_000), (200, 10_000), (400, 10_000), (600, 10_000)],
            60.0,
        );
        assert_eq!(out.waits_ms, vec![60_000, 0, 0, 0]);
    }

    #[test]
    fn with_capacity_per_instance_jobs_share_instances_and_idle_capacity_is_in_slots() {
        let mut c = ts(0, 600);
        c.capacity_per_instance = 2;
        let out = replay(c.clone(), &[(0, 100), (0, 100), (0, 100)], 60.0);
        // Three jobs, two slots an instance: two instances, three jobs at once.
        assert_eq!(out.launches, 2);
        assert_eq!(out.waits_ms, vec![60_000; 3]);
        // idle_count 3 slots: two instances before the first job; the second job takes
        // the free slot next to the first (fullest first), and with 2 in use + 3 idle
        // = 5 slots wanted, a third instance is requested.
        c.knobs.idle_count = 3;
        let out = replay(c, &[(0, 1000), (10, 10)], 60.0);
        assert_eq!(out.waits_ms, vec![0, 0]);
        assert_eq!(out.launches, 3);
        assert_eq!(
            out.busy_ms, 1_000_000,
            "the second job ran beside the first"
        );
    }

    #[test]
    fn max_use_count_and_max_instances() {
        let mut c = ts(0, 600);
        c.max_use_count = 1;
        let out = replay(c, &[(0, 10), (100, 10)], 60.0);
        assert_eq!(out.launches, 2);
        let mut c = ts(0, 600);
        c.max_instances = 1;
        let out = replay(c, &[(0, 100), (0, 100)], 60.0);
        assert_eq!(out.launches, 1);
        assert_eq!(out.waits_ms, vec![60_000, 160_000]);
    }
}

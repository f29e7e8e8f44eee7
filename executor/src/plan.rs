//! The scaling decision: a pure function of policy, the pool and the time.
//!
//! Invariants: never awaits, never reads a clock, never terminates a leased machine, never
//! plans more machines than `max_machines` (per class and in total), never keeps an idle
//! machine past its class's `max_age` (so none outlives its server certificate). Unit tests
//! drive it with a fake clock.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_proto::api::MachineState;
use flotilla_proto::config::{ClassConfig, Config, Market};
use flotilla_proto::schedule::{self, Window};

use crate::ec2::Purchase;
use crate::forecast::DemandHistory;
use crate::pool::{Machine, Pool, TerminateReason};

#[derive(Debug, Clone, PartialEq)]
pub struct ClassPolicy {
    pub idle: IdlePolicy,
    pub max_machines: u32,
    /// Most machines kept stopped (not terminated) beyond the hot idle target; 0 turns
    /// the stopped pool off.
    pub max_stopped: u32,
    pub max_builds: u32,
    /// Jobs a machine runs at once (at least 1): the idle target, waiting jobs and the
    /// forecast count jobs, and are turned into machines by [`ClassPolicy::machines_for`].
    pub jobs_per_machine: u32,
    pub boot_timeout: Duration,
    /// Machines older than this (since launch) take no further job.
    pub max_age: Duration,
    /// The class's schedules, parsed once (see [`schedule::Window`]).
    pub schedules: Vec<Window>,
    /// Machines kept warm from the arrival history (`None`: the idle policy alone).
    pub learned: Option<Learned>,
}

/// Flotilla's default policy, on top of the configured idle target: keep warm a job slot
/// (a machine, with one job per machine) for each job the arrival history expects within
/// `lookahead`, at the larger of the rate
/// learned for this hour of the day on this kind of day (weekday or weekend, over past
/// days) and the rate of the last `memory` (see [`crate::forecast`]); at most `max_idle`.
/// Those machines are launched before the jobs arrive. Idle machines beyond the target go
/// after `idle_time` or the class's idle time, whichever is shorter: the forecast, not a
/// timer, decides what stays warm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learned {
    pub max_idle: u32,
    pub lookahead: Duration,
    pub memory: Duration,
    pub idle_time: Duration,
    /// The stopped pool is sized for the largest burst of the last `stopped_horizon` or
    /// learned for the hours of the day within the next one (see [`Learned::stopped`]).
    pub stopped_horizon: Duration,
}

impl Learned {
    /// Job slots to keep warm for `class` at `now`: the whole jobs expected within the
    /// look-ahead (rounded down, so a trickle of jobs does not keep a machine up). The
    /// plan turns slots into machines (`ClassPolicy::machines_for`).
    pub fn warm(&self, history: &DemandHistory, class: &str, now: DateTime<Utc>) -> u32 {
        let o = history.outlook(class, now, self.memory);
        let rate = o.profile_per_hour.unwrap_or(0.0).max(o.recent_per_hour);
        let expected = rate * self.lookahead.as_secs_f64() / 3600.0;
        expected.floor().clamp(0.0, f64::from(self.max_idle)) as u32
    }

    /// Stopped machines to keep for `class` at `now`, at most `max_stopped`: one per job of
    /// the largest burst (jobs arriving within a minute) the history saw in the last
    /// `stopped_horizon` or learned for the hours of the day up to `stopped_horizon`
    /// ahead. A burst outruns launches, and a stopped machine costs only its disk, so the
    /// pool is sized for the peak, not the mean; at night and at weekends it shrinks with
    /// the bursts.
    pub fn stopped(
        &self,
        history: &DemandHistory,
        class: &str,
        now: DateTime<Utc>,
        max_stopped: u32,
        slots: u32,
    ) -> u32 {
        let burst = history.burst_ahead(class, now, self.stopped_horizon);
        (burst / f64::from(slots.max(1)))
            .ceil()
            .clamp(0.0, f64::from(max_stopped)) as u32
    }
}

/// The knobs a schedule may override.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdlePolicy {
    pub idle_count: u32,
    pub idle_count_min: u32,
    pub idle_scale_factor: f64,
    pub idle_time: Duration,
}

impl IdlePolicy {
    /// Idle machines to keep with `in_use` machines leased: `idle_count`, or with a scale
    /// factor, `factor x in_use` clamped to `[idle_count_min, idle_count]`.
    pub fn target(&self, in_use: u32) -> u32 {
        if self.idle_scale_factor > 0.0 {
            let scaled = (self.idle_scale_factor * f64::from(in_use)).ceil() as u32;
            scaled.clamp(self.idle_count_min.min(self.idle_count), self.idle_count)
        } else {
            self.idle_count
        }
    }
}

impl ClassPolicy {
    /// Why a machine that is (or is about to become) idle must take no further job: it ran
    /// `max_builds` jobs, or it is `max_age` old. The plan retires idle machines for it; a
    /// release applies it in the same critical section, so no waiting job gets such a
    /// machine and a machine kept busy still retires at the end of its current job.
    /// Jobs still running on a shared machine count as taken: with slots, a machine at
    /// `max_builds` takes no new job while its last ones finish.
    pub fn retire_reason(&self, m: &Machine, now: DateTime<Utc>) -> Option<TerminateReason> {
        let taken = m.builds.saturating_add(m.leases.len() as u32);
        if self.max_builds > 0 && taken >= self.max_builds {
            Some(TerminateReason::MaxBuilds)
        } else if elapsed(m.launched_at, now) >= self.max_age {
            Some(TerminateReason::MaxAge)
        } else {
            None
        }
    }

    /// Slots per machine (`jobs_per_machine`, at least 1).
    pub fn slots(&self) -> u32 {
        self.jobs_per_machine.max(1)
    }

    /// Machines that give `jobs` job slots beyond the `free` slots machines already
    /// running jobs have left. Pure.
    pub fn machines_for(&self, jobs: u32, free: u32) -> u32 {
        jobs.saturating_sub(free).div_ceil(self.slots())
    }

    /// The stopped pool's size at `now`: from the forecast ([`Learned::stopped`]) when the
    /// class has one, else `max_stopped` itself.
    pub fn stopped_target(&self, history: &DemandHistory, class: &str, now: DateTime<Utc>) -> u32 {
        match &self.learned {
            Some(l) if self.max_stopped > 0 => {
                l.stopped(history, class, now, self.max_stopped, self.slots())
            }
            _ => self.max_stopped,
        }
    }

    /// The idle policy in force at `now`: the class's own, overridden field by field by the
    /// last matching schedule.
    pub fn idle_at(&self, now: DateTime<Utc>) -> IdlePolicy {
        let mut p = self.idle;
        if let Some(w) = schedule::active(&self.schedules, now) {
            let s = w.overrides();
            p.idle_count = s.idle_count.unwrap_or(p.idle_count);
            p.idle_count_min = s.idle_count_min.unwrap_or(p.idle_count_min);
            p.idle_scale_factor = s.idle_scale_factor.unwrap_or(p.idle_scale_factor);
            p.idle_time = s.idle_time.map_or(p.idle_time, |d| d.0);
        }
        p
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub classes: BTreeMap<String, ClassPolicy>,
    pub max_machines: u32,
    /// Most machines booting at once, all classes together.
    pub max_growth_rate: u32,
}

impl Policy {
    /// The policy of a validated config. `Config::validate` rejects a schedule that does
    /// not compile, so the `filter_map` below drops none; an unvalidated config's broken
    /// schedule never matches, as an invalid cron pattern never would.
    pub fn from_config(c: &Config) -> Self {
        Self {
            classes: c
                .classes
                .iter()
                .map(|(name, k)| {
                    (
                        name.clone(),
                        ClassPolicy {
                            idle: IdlePolicy {
                                idle_count: k.idle_count,
                                idle_count_min: k.idle_count_min,
                                idle_scale_factor: k.idle_scale_factor,
                                idle_time: k.idle_time.0,
                            },
                            max_machines: k.max_machines,
                            max_stopped: k.max_stopped,
                            max_builds: k.max_builds,
                            jobs_per_machine: k.jobs_per_machine.max(1),
                            boot_timeout: k.boot_timeout.0,
                            max_age: k.max_age.0,
                            schedules: k
                                .schedules
                                .iter()
                                .filter_map(|s| s.compile().ok())
                                .collect(),
                            learned: k.forecast.enabled.then_some(Learned {
                                max_idle: k.forecast.max_idle,
                                lookahead: k.forecast.lookahead.0,
                                memory: k.forecast.memory.0,
                                idle_time: k.forecast.idle_time.0,
                                stopped_horizon: k.forecast.stopped_horizon.0,
                            }),
                        },
                    )
                })
                .collect(),
            max_machines: c.max_machines,
            max_growth_rate: c.max_growth_rate,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    Launch {
        class: String,
        count: u32,
    },
    Terminate {
        machine_id: String,
        reason: TerminateReason,
    },
    /// StopInstances: an idle machine beyond the hot target joins the stopped pool.
    Stop {
        machine_id: String,
    },
    /// StartInstances: a stopped machine serves demand before any cold launch.
    Start {
        machine_id: String,
    },
}

fn elapsed(since: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - since).to_std().unwrap_or(Duration::ZERO)
}

/// One RunInstances attempt of a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LaunchAttempt {
    pub purchase: Purchase,
    pub instance_type: String,
    pub subnet: String,
}

/// The order in which one machine's launch tries subnets, instance types and markets:
/// every subnet of the first type, then the next type, and on-demand only after every
/// spot attempt, and only where the class allows it (`spot_with_fallback`). A capacity
/// error moves to the next attempt; any other error ends the launch. Pure.
pub(crate) fn launch_order(class: &ClassConfig) -> Vec<LaunchAttempt> {
    let purchases: &[Purchase] = match class.market {
        Market::OnDemand => &[Purchase::OnDemand],
        Market::Spot => &[Purchase::Spot],
        Market::SpotWithFallback => &[Purchase::Spot, Purchase::OnDemand],
    };
    let mut order = Vec::new();
    for &purchase in purchases {
        for instance_type in &class.instance_types {
            for subnet in &class.subnets {
                order.push(LaunchAttempt {
                    purchase,
                    instance_type: instance_type.clone(),
                    subnet: subnet.clone(),
                });
            }
        }
    }
    order
}

/// Decides which machines to terminate, stop, start and how many to launch, in three
/// phases: the machines that must go whatever the demand, then idle machines beyond each
/// class's hot target (stopped while the class's stopped pool is below its target, else
/// terminated) and stopped machines beyond that target (terminated), then starts of
/// stopped machines and launches for what is still missing.
pub(crate) fn plan(policy: &Policy, pool: &Pool, now: DateTime<Utc>) -> Vec<Action> {
    let mut doomed = Doomed::default();
    retire_unneeded(policy, pool, now, &mut doomed);
    let classes = scale_down_idle(policy, pool, now, &mut doomed);
    let launches = if pool.is_draining() {
        Vec::new()
    } else {
        plan_launches(policy, pool, &classes, &doomed)
    };
    let mut actions = doomed.actions;
    actions.extend(launches);
    actions
}

/// Whether `state` is a stopped-pool state that is not (yet) serving: stopping or stopped.
fn parked(state: MachineState) -> bool {
    matches!(state, MachineState::Stopping | MachineState::Stopped)
}

/// Terminations decided so far, in order, each machine at most once.
#[derive(Default)]
struct Doomed {
    actions: Vec<Action>,
    ids: std::collections::BTreeSet<String>,
}

impl Doomed {
    fn terminate(&mut self, id: &str, reason: TerminateReason) {
        if self.ids.insert(id.to_owned()) {
            self.actions.push(Action::Terminate {
                machine_id: id.to_owned(),
                reason,
            });
        }
    }

    /// Stops an idle machine instead of terminating it (phase 2 only).
    fn stop(&mut self, id: &str) {
        if self.ids.insert(id.to_owned()) {
            self.actions.push(Action::Stop {
                machine_id: id.to_owned(),
            });
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

/// Phase 1: machines that must go whatever the demand: of a removed class, broken, past
/// their boot timeout, and idle ones that are retired (max builds, max age) or drained.
fn retire_unneeded(policy: &Policy, pool: &Pool, now: DateTime<Utc>, doomed: &mut Doomed) {
    for m in pool.machines().values() {
        let Some(class) = policy.classes.get(&m.class) else {
            if matches!(
                m.state,
                MachineState::Idle
                    | MachineState::Booting
                    | MachineState::Broken
                    | MachineState::Stopped
                    | MachineState::Starting
            ) {
                doomed.terminate(&m.id, TerminateReason::ClassRemoved);
            }
            continue;
        };
        match m.state {
            // A failed boot counts as one: same reason, metric and alert as a timeout.
            MachineState::Broken if m.boot_failed => {
                doomed.terminate(&m.id, TerminateReason::BootTimeout)
            }
            MachineState::Broken => doomed.terminate(&m.id, TerminateReason::Broken),
            // Only once RunInstances answered: a launch still in flight (throttled, in the
            // SDK's retries) has no instance to time out, and timing out its record would
            // start a second launch beside it. Its launch task ends it either way, and a
            // record no launch task owns (a crash) is observe's, after the orphan grace.
            MachineState::Booting
                if !m.instance_id.is_empty()
                    && elapsed(m.launched_at, now) >= class.boot_timeout =>
            {
                doomed.terminate(&m.id, TerminateReason::BootTimeout)
            }
            // A start that does not answer in time is a failed boot: terminated and, through
            // the launch phase, replaced (a stopped spare first, else a launch).
            MachineState::Starting
                if elapsed(m.started_at.unwrap_or(m.launched_at), now) >= class.boot_timeout =>
            {
                doomed.terminate(&m.id, TerminateReason::BootTimeout)
            }
            // A stopped machine is retired like an idle one (its certificate and AMI age
            // while it sleeps), and does not survive a drain.
            MachineState::Stopped => {
                if let Some(reason) = class.retire_reason(m, now) {
                    doomed.terminate(&m.id, reason)
                } else if pool.is_draining() {
                    doomed.terminate(&m.id, TerminateReason::Drained)
                }
            }
            MachineState::Idle => {
                if let Some(reason) = class.retire_reason(m, now) {
                    doomed.terminate(&m.id, reason)
                } else if pool.is_draining() {
                    doomed.terminate(&m.id, TerminateReason::Drained)
                }
            }
            _ => {}
        }
    }
}

/// What one class has left after phase 2, for the launch phase.
struct ClassRoom {
    /// Machines that are not terminating (and not doomed).
    live: u32,
    /// Idle or booting machines: those a waiting job can still get.
    available: u32,
    /// Idle or starting machines: those a waiting job gets sooner than a start would
    /// bring one (a boot in flight may take longer).
    ready_soon: u32,
    /// Machines the waiting jobs need beyond the free slots of machines running jobs.
    waiting: u32,
    /// Machines for the waiting jobs and the idle slots the class should keep (idle
    /// policy in force, or the forecast).
    demand: u32,
    /// Stopped machines a start can bring back, oldest stop first.
    stopped: Vec<String>,
    /// Machines the stopped pool is short of its (forecast) target.
    fill: u32,
}

/// Phase 2, per class: the idle target in force (schedule, scale factor, forecast), idle
/// machines over `max_machines` or beyond the target past their idle time stopped while
/// the stopped pool is below its target (the forecast's, bounded by `max_stopped`) or
/// terminated (oldest idle first), stopped machines beyond that target terminated (oldest
/// launch first, sparing those demand is about to start), and what is left.
fn scale_down_idle<'a>(
    policy: &'a Policy,
    pool: &Pool,
    now: DateTime<Utc>,
    doomed: &mut Doomed,
) -> BTreeMap<&'a str, ClassRoom> {
    let mut rooms = BTreeMap::new();
    for (name, class) in &policy.classes {
        let mine: Vec<_> = pool
            .machines()
            .values()
            .filter(|m| &m.class == name && !doomed.contains(&m.id))
            .collect();
        // Jobs and idle targets count slots; machines running jobs (that may take more)
        // serve them from their free slots first, and the rest is whole machines.
        let leased: Vec<_> = mine
            .iter()
            .filter(|m| m.state == MachineState::Leased)
            .collect();
        let in_use_jobs: u32 = leased.iter().map(|m| (m.leases.len() as u32).max(1)).sum();
        let partial_free: u32 = leased
            .iter()
            .filter(|m| class.retire_reason(m, now).is_none())
            .map(|m| m.free_slots(class.slots()))
            .sum();
        let waiting_jobs = pool.waiting(name);
        let mut idle_policy = class.idle_at(now);
        let mut idle_target = idle_policy.target(in_use_jobs);
        if let Some(learned) = &class.learned {
            idle_target = idle_target.max(learned.warm(pool.history(), name, now));
            idle_policy.idle_time = idle_policy.idle_time.min(learned.idle_time);
        }
        let waiting = class.machines_for(waiting_jobs, partial_free);
        let demand = if pool.is_draining() {
            0
        } else {
            class.machines_for(idle_target + waiting_jobs, partial_free)
        };
        // A starting machine is coming capacity, as a booting one is.
        let booting = mine
            .iter()
            .filter(|m| matches!(m.state, MachineState::Booting | MachineState::Starting))
            .count() as u32;
        let starting = mine
            .iter()
            .filter(|m| m.state == MachineState::Starting)
            .count() as u32;
        let mut stopped: Vec<_> = mine
            .iter()
            .filter(|m| m.state == MachineState::Stopped)
            .collect();
        stopped.sort_by_key(|m| (m.idle_since, m.id.clone()));
        let mut parked_count = mine.iter().filter(|m| parked(m.state)).count() as u32;
        let stop_target = class.stopped_target(pool.history(), name, now);
        let stop_room = |parked_count: u32| !pool.is_draining() && parked_count < stop_target;
        let mut idle: Vec<_> = mine
            .iter()
            .filter(|m| m.state == MachineState::Idle)
            .collect();
        idle.sort_by_key(|m| (m.idle_since, m.id.clone()));
        let live = mine
            .iter()
            .filter(|m| m.state != MachineState::Terminating)
            .count() as u32;

        let mut surplus = (idle.len() as u32 + booting).saturating_sub(demand);
        let mut over = live.saturating_sub(class.max_machines);
        let mut removed = 0u32;
        let mut left_idle = idle.len() as u32;
        // Over capacity, stopped machines go before idle ones: they serve nobody now.
        for m in &stopped {
            if over == 0 {
                break;
            }
            doomed.terminate(&m.id, TerminateReason::OverCapacity);
            over -= 1;
            parked_count -= 1;
            removed += 1;
        }
        for m in &idle {
            if over > 0 {
                doomed.terminate(&m.id, TerminateReason::OverCapacity);
                over -= 1;
                surplus = surplus.saturating_sub(1);
                removed += 1;
            } else if surplus > 0 && elapsed(m.idle_since, now) >= idle_policy.idle_time {
                surplus -= 1;
                if stop_room(parked_count) {
                    // Stays live (it counts towards max_machines) but leaves the hot pool.
                    doomed.stop(&m.id);
                    parked_count += 1;
                } else {
                    doomed.terminate(&m.id, TerminateReason::IdleTimeout);
                    removed += 1;
                }
            } else {
                continue;
            }
            left_idle -= 1;
        }
        // Stopped machines beyond the target go (oldest launch first): nobody is expected
        // to start them, and their disks cost. Those the launch phase is about to start
        // for demand (the first in start order) are not counted against the target.
        let startable: Vec<_> = stopped.iter().filter(|m| !doomed.contains(&m.id)).collect();
        let waiting_starts = if pool.is_draining() {
            0
        } else {
            waiting.saturating_sub(left_idle + starting)
        };
        let to_start = (demand
            .saturating_sub(left_idle + booting)
            .max(waiting_starts) as usize)
            .min(startable.len());
        let mut spare = startable[to_start..].to_vec();
        spare.sort_by_key(|m| (m.launched_at, m.id.clone()));
        let mut beyond = parked_count
            .saturating_sub(to_start as u32)
            .saturating_sub(stop_target);
        for m in spare {
            if beyond == 0 {
                break;
            }
            doomed.terminate(&m.id, TerminateReason::IdleTimeout);
            beyond -= 1;
            removed += 1;
            parked_count -= 1;
        }
        // A forecast-sized pool is a target, not only a bound: when short, the launch
        // phase launches machines for it (they are stopped once idle past their idle time;
        // a machine launched only to be stopped costs its boot and a minute or so). Leased
        // machines count towards it: they come back when their jobs end, and refilling
        // for them too would launch a machine per start, only to terminate the one that
        // comes back.
        let fill = match &class.learned {
            Some(_) if !pool.is_draining() => {
                stop_target.saturating_sub(parked_count + leased.len() as u32)
            }
            _ => 0,
        };
        rooms.insert(
            name.as_str(),
            ClassRoom {
                live: live - removed,
                available: left_idle + booting,
                ready_soon: left_idle + starting,
                waiting,
                demand,
                fill,
                stopped: stopped
                    .iter()
                    .filter(|m| !doomed.contains(&m.id))
                    .map(|m| m.id.clone())
                    .collect(),
            },
        );
    }
    rooms
}

/// Phase 3: starts and launches, jobs waiting first (every class), then idle-target
/// top-ups, then launches for stopped pools short of their forecast target, within the
/// per-class and fleet caps and the growth rate.
fn plan_launches(
    policy: &Policy,
    pool: &Pool,
    classes: &BTreeMap<&str, ClassRoom>,
    doomed: &Doomed,
) -> Vec<Action> {
    let live_now = |m: &&Machine| !doomed.contains(&m.id);
    let total_live = pool
        .machines()
        .values()
        .filter(live_now)
        .filter(|m| m.state != MachineState::Terminating)
        .count() as u32;
    let booting_total = pool
        .machines()
        .values()
        .filter(live_now)
        .filter(|m| matches!(m.state, MachineState::Booting | MachineState::Starting))
        .count() as u32;
    // Stopped machines are live already: a start needs growth room only, a launch both.
    let mut growth_room = policy.max_growth_rate.saturating_sub(booting_total);
    let mut global_room = policy
        .max_machines
        .saturating_sub(total_live)
        .min(growth_room);
    let mut launches: BTreeMap<String, u32> = BTreeMap::new();
    let mut starts: Vec<Action> = Vec::new();
    let mut started: BTreeMap<&str, u32> = BTreeMap::new();
    for pass in [Pass::Waiting, Pass::IdleCount, Pass::StoppedPool] {
        for (name, class) in &policy.classes {
            let Some(room) = classes.get(name.as_str()) else {
                continue;
            };
            let s = started.entry(name.as_str()).or_default();
            let want = match pass {
                Pass::Waiting => room.waiting,
                Pass::IdleCount => room.waiting.max(room.demand),
                // Machines started above will be leased: they still count for the pool.
                Pass::StoppedPool => room.waiting.max(room.demand) + room.fill,
            };
            // Starts first: a stopped machine is already counted live, so only the growth
            // rate bounds it, and it comes back faster and with its image cache. A waiting
            // job gets a start even while launches boot (a start is faster than most of a
            // boot; the booted machine then joins the pool). Never to fill the pool itself.
            let planned = launches.get(name).copied().unwrap_or(0);
            let mut start_need = match pass {
                Pass::Waiting => want.saturating_sub(room.ready_soon + *s),
                Pass::IdleCount => want.saturating_sub(room.available + planned + *s),
                Pass::StoppedPool => 0,
            };
            while start_need > 0 && growth_room > 0 {
                let Some(id) = room.stopped.get(*s as usize) else {
                    break;
                };
                starts.push(Action::Start {
                    machine_id: id.clone(),
                });
                *s += 1;
                start_need -= 1;
                growth_room -= 1;
                global_room = global_room.min(growth_room);
            }
            let need = want.saturating_sub(room.available + planned + *s);
            let class_room = class.max_machines.saturating_sub(room.live + planned);
            let n = need.min(class_room).min(global_room);
            if n > 0 {
                *launches.entry(name.clone()).or_default() += n;
                global_room -= n;
                growth_room -= n;
            }
        }
    }
    starts.extend(
        launches
            .into_iter()
            .map(|(class, count)| Action::Launch { class, count }),
    );
    starts
}

#[derive(Clone, Copy)]
enum Pass {
    Waiting,
    IdleCount,
    /// Launches for a forecast-sized stopped pool that is short (lowest priority).
    StoppedPool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Machine;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }

    fn policy(idle_count: u32, idle_time: u64, max: u32, max_builds: u32) -> Policy {
        Policy {
            classes: BTreeMap::from([(
                "c".to_string(),
                ClassPolicy {
                    idle: IdlePolicy {
                        idle_count,
                        idle_count_min: 0,
                        idle_scale_factor: 0.0,
                        idle_time: Duration::from_secs(idle_time),
                    },
                    max_machines: max,
                    max_stopped: 0,
                    max_builds,
                    jobs_per_machine: 1,
                    boot_timeout: Duration::from_secs(300),
                    max_age: Duration::from_secs(7 * 86_400),
                    schedules: Vec::new(),
                    learned: None,
                },
            )]),
            max_machines: 100,
            max_growth_rate: 100,
        }
    }

    fn add(pool: &mut Pool, id: &str, state: MachineState, since: i64) {
        let mut m = Machine::booting(id.into(), "c".into(), "t3.micro".into(), t(since));
        m.instance_id = format!("i-{id}");
        m.state = state;
        m.idle_since = t(since);
        pool.insert_for_test(m);
    }

    fn launches(actions: &[Action]) -> u32 {
        actions
            .iter()
            .map(|a| match a {
                Action::Launch { count, .. } => *count,
                _ => 0,
            })
            .sum()
    }

    fn terminated(actions: &[Action]) -> Vec<(String, TerminateReason)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Terminate { machine_id, reason } => Some((machine_id.clone(), *reason)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn launch_order_tries_every_spot_subnet_and_type_before_on_demand() {
        let class = |market: &str| {
            let text = format!(
                "fleet = \"f\"\nstate_dir = \"/tmp/f\"\ndefault_class = \"c\"\n[classes.c]\nami = \"a\"\ninstance_types = [\"big\", \"small\"]\nsubnets = [\"s1\", \"s2\"]\nmarket = \"{market}\"\n"
            );
            Config::from_toml(&text).unwrap().classes["c"].clone()
        };
        let order = |market: &str| -> Vec<String> {
            launch_order(&class(market))
                .iter()
                .map(|a| format!("{} {} {}", a.purchase.as_str(), a.instance_type, a.subnet))
                .collect()
        };
        let spot = [
            "spot big s1",
            "spot big s2",
            "spot small s1",
            "spot small s2",
        ];
        let on_demand = [
            "on-demand big s1",
            "on-demand big s2",
            "on-demand small s1",
            "on-demand small s2",
        ];
        assert_eq!(order("spot"), spot);
        assert_eq!(order("on-demand"), on_demand);
        assert_eq!(order("spot-with-fallback"), [spot, on_demand].concat());
    }

    #[test]
    fn empty_pool_launches_idle_count() {
        let actions = plan(&policy(2, 600, 10, 0), &Pool::default(), t(0));
        assert_eq!(launches(&actions), 2);
    }

    #[test]
    fn waiting_jobs_launch_beyond_idle_count_but_within_max() {
        let mut pool = Pool::default();
        pool.set_waiting_for_test("c", 7);
        add(&mut pool, "a", MachineState::Leased, 0);
        let actions = plan(&policy(0, 600, 5, 0), &pool, t(0));
        assert_eq!(launches(&actions), 4, "{actions:?}");
    }

    /// A machine of class `c` running the jobs `leases` (each a lease the pool holds).
    fn running(pool: &mut Pool, id: &str, jobs: &[&str]) {
        add(pool, id, MachineState::Idle, 0);
        for job in jobs {
            let terms = crate::pool::LeaseTerms {
                slots: 4,
                ..Default::default()
            };
            let l = pool.try_lease_where(job, "c", format!("l-{job}"), terms, t(0), |m| m.id == id);
            assert!(l.is_some(), "{job} on {id}");
        }
    }

    fn sharing(slots: u32, p: Policy) -> Policy {
        let mut p = p;
        for c in p.classes.values_mut() {
            c.jobs_per_machine = slots;
        }
        p
    }

    #[test]
    fn with_slots_jobs_and_idle_targets_count_slots_not_machines() {
        // 4 slots: 7 waiting jobs need 2 machines, an idle target of 5 slots another 2.
        let mut pool = Pool::default();
        pool.set_waiting_for_test("c", 7);
        let p = sharing(4, policy(0, 600, 10, 0));
        assert_eq!(launches(&plan(&p, &pool, t(0))), 2);
        let p = sharing(4, policy(5, 600, 10, 0));
        assert_eq!(launches(&plan(&p, &pool, t(0))), 3);
        // A machine running 1 job has 3 slots free: 3 waiting jobs need no launch.
        let mut pool = Pool::default();
        running(&mut pool, "a", &["j1"]);
        pool.set_waiting_for_test("c", 3);
        let p = sharing(4, policy(0, 600, 10, 0));
        assert_eq!(launches(&plan(&p, &pool, t(0))), 0);
        pool.set_waiting_for_test("c", 4);
        assert_eq!(launches(&plan(&p, &pool, t(0))), 1);
    }

    #[test]
    fn with_slots_an_idle_machine_covering_the_idle_slots_stays() {
        // idle_count 2 slots, 4 per machine: one idle machine covers it; a second goes.
        let mut pool = Pool::default();
        add(&mut pool, "old", MachineState::Idle, 0);
        add(&mut pool, "new", MachineState::Idle, 100);
        let p = sharing(4, policy(2, 60, 10, 0));
        let actions = plan(&p, &pool, t(1000));
        assert_eq!(
            terminated(&actions),
            vec![("old".to_string(), TerminateReason::IdleTimeout)]
        );
        assert_eq!(launches(&actions), 0);
        // Free slots on a busy machine cover the idle target too: both idle ones go.
        running(&mut pool, "busy", &["j1", "j2"]);
        let actions = plan(&p, &pool, t(1000));
        assert_eq!(terminated(&actions).len(), 2, "{actions:?}");
    }

    #[test]
    fn a_shared_machine_at_max_builds_offers_no_free_slots() {
        // max_builds 2: a machine with 1 job done and 1 running has taken its 2.
        let mut pool = Pool::default();
        running(&mut pool, "a", &["j1", "j2"]);
        pool.release(
            "l-j1",
            flotilla_proto::api::ReleaseOutcome::Healthy,
            None,
            t(1),
        );
        pool.set_waiting_for_test("c", 1);
        let p = sharing(4, policy(0, 600, 10, 2));
        assert_eq!(launches(&plan(&p, &pool, t(2))), 1);
        assert!(
            terminated(&plan(&p, &pool, t(2))).is_empty(),
            "its job runs on"
        );
    }

    #[test]
    fn booting_machines_count_as_coming_capacity() {
        let mut pool = Pool::default();
        pool.set_waiting_for_test("c", 1);
        add(&mut pool, "a", MachineState::Booting, 0);
        assert_eq!(launches(&plan(&policy(0, 600, 5, 0), &pool, t(1))), 0);
    }

    #[test]
    fn idle_machine_is_kept_until_idle_time_then_terminated() {
        let mut pool = Pool::default();
        add(&mut pool, "a", MachineState::Idle, 0);
        let p = policy(0, 600, 5, 0);
        assert!(terminated(&plan(&p, &pool, t(599))).is_empty());
        assert_eq!(
            terminated(&plan(&p, &pool, t(600))),
            vec![("a".to_string(), TerminateReason::IdleTimeout)]
        );
    }

    #[test]
    fn idle_count_machines_survive_idle_time() {
        let mut pool = Pool::default();
        add(&mut pool, "old", MachineState::Idle, 0);
        add(&mut pool, "new", MachineState::Idle, 100);
        let actions = plan(&policy(1, 60, 5, 0), &pool, t(1000));
        assert_eq!(
            terminated(&actions),
            vec![("old".to_string(), TerminateReason::IdleTimeout)]
        );
        assert_eq!(launches(&actions), 0);
    }

    #[test]
    fn leased_machine_is_never_terminated() {
        let mut pool = Pool::default();
        add(&mut pool, "a", MachineState::Leased, 0);
        let mut p = policy(0, 1, 1, 1);
        p.max_machines = 0;
        assert!(terminated(&plan(&p, &pool, t(10_000))).is_empty());
    }

    #[test]
    fn max_builds_replaces_machine() {
        let mut pool = Pool::default();
        add(&mut pool, "a", MachineState::Idle, 0);
        pool.machine_mut_for_test("a").unwrap().builds = 1;
        let actions = plan(&policy(1, 600, 5, 1), &pool, t(1));
        assert_eq!(
            terminated(&actions),
            vec![("a".to_string(), TerminateReason::MaxBuilds)]
        );
        assert_eq!(launches(&actions), 1, "replacement keeps idle_count");
    }

    const DAY: i64 = 86_400;

    /// A machine launched at `launched`, idle (or leased) since `since`.
    fn add_launched(pool: &mut Pool, id: &str, state: MachineState, launched: i64, since: i64) {
        add(pool, id, state, since);
        pool.machine_mut_for_test(id).unwrap().launched_at = t(launched);
    }

    #[test]
    fn idle_machine_is_retired_at_max_age_and_replaced() {
        let mut pool = Pool::default();
        // Launched a week ago, idle for a minute: within idle_count, so only age retires it.
        add_launched(&mut pool, "old", MachineState::Idle, 0, 7 * DAY - 60);
        add_launched(&mut pool, "young", MachineState::Idle, DAY, 7 * DAY - 60);
        let p = policy(2, 600, 5, 0);
        let just_before = plan(&p, &pool, t(7 * DAY - 1));
        assert!(terminated(&just_before).is_empty(), "{just_before:?}");
        assert_eq!(launches(&just_before), 0);
        let at = plan(&p, &pool, t(7 * DAY));
        assert_eq!(
            terminated(&at),
            vec![("old".to_string(), TerminateReason::MaxAge)]
        );
        assert_eq!(launches(&at), 1, "the replacement keeps idle_count: {at:?}");
    }

    #[test]
    fn leased_machine_past_max_age_is_not_terminated_but_retires_at_release() {
        let mut pool = Pool::default();
        add_launched(&mut pool, "busy", MachineState::Leased, 0, 6 * DAY);
        let p = policy(0, 600, 5, 0);
        assert!(terminated(&plan(&p, &pool, t(9 * DAY))).is_empty());
        // What the release checks in its critical section.
        let class = &p.classes["c"];
        let m = &pool.machines()["busy"];
        assert_eq!(
            class.retire_reason(m, t(9 * DAY)),
            Some(TerminateReason::MaxAge)
        );
        assert_eq!(class.retire_reason(m, t(7 * DAY - 1)), None);
    }

    #[test]
    fn max_builds_is_named_before_max_age() {
        let mut pool = Pool::default();
        add_launched(&mut pool, "a", MachineState::Idle, 0, 8 * DAY);
        pool.machine_mut_for_test("a").unwrap().builds = 3;
        let p = policy(0, 600, 5, 3);
        assert_eq!(
            terminated(&plan(&p, &pool, t(8 * DAY))),
            vec![("a".to_string(), TerminateReason::MaxBuilds)]
        );
    }

    #[test]
    fn from_config_carries_max_age() {
        let text = "fleet = \"f\"\nstate_dir = \"/s\"\ndefault_class = \"c\"\n[classes.c]\nami = \"a\"\ninstance_types = [\"t\"]\nsubnets = [\"s\"]\nmax_age = \"3d\"\n";
        let p = Policy::from_config(&Config::from_toml(text).unwrap());
        assert_eq!(p.classes["c"].max_age, Duration::from_secs(3 * 86_400));
    }

    #[test]
    fn broken_and_boot_timeout_machines_are_replaced() {
        let mut pool = Pool::default();
        pool.set_waiting_for_test("c", 2);
        add(&mut pool, "broken", MachineState::Broken, 0);
        add(&mut pool, "slow", MachineState::Booting, 0);
        let actions = plan(&policy(0, 600, 5, 0), &pool, t(301));
        let mut got = terminated(&actions);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("broken".to_string(), TerminateReason::Broken),
                ("slow".to_string(), TerminateReason::BootTimeout)
            ]
        );
        assert_eq!(launches(&actions), 2);
    }

    #[test]
    fn a_launch_still_in_flight_is_not_timed_out_and_not_doubled() {
        let mut pool = Pool::default();
        pool.set_waiting_for_test("c", 1);
        add(&mut pool, "in-flight", MachineState::Booting, 0);
        pool.machine_mut_for_test("in-flight").unwrap().instance_id = String::new();
        let actions = plan(&policy(0, 600, 5, 0), &pool, t(3_600));
        assert!(terminated(&actions).is_empty(), "{actions:?}");
        assert_eq!(
            launches(&actions),
            0,
            "the waiting job has that machine coming"
        );
    }

    #[test]
    fn global_cap_limits_launches_across_classes() {
        let mut p = policy(3, 600, 10, 0);
        p.max_machines = 2;
        assert_eq!(launches(&plan(&p, &Pool::default(), t(0))), 2);
    }

    #[test]
    fn draining_terminates_idle_and_launches_nothing() {
        let mut pool = Pool::default();
        pool.set_draining(true);
        pool.set_waiting_for_test("c", 3);
        add(&mut pool, "a", MachineState::Idle, 0);
        add(&mut pool, "b", MachineState::Leased, 0);
        let actions = plan(&policy(2, 600, 5, 0), &pool, t(1));
        assert_eq!(launches(&actions), 0);
        assert_eq!(
            terminated(&actions),
            vec![("a".to_string(), TerminateReason::Drained)]
        );
    }

    #[test]
    fn growth_rate_caps_machines_booting_at_once() {
        let mut p = policy(0, 600, 50, 0);
        p.max_growth_rate = 3;
        let mut pool = Pool::default();
        pool.set_waiting_for_test("c", 10);
        add(&mut pool, "b1", MachineState::Booting, 0);
        assert_eq!(launches(&plan(&p, &pool, t(1))), 2);
    }

    #[test]
    fn scale_factor_keeps_idle_proportional_to_use_within_bounds() {
        let idle = IdlePolicy {
            idle_count: 10,
            idle_count_min: 2,
            idle_scale_factor: 0.5,
            idle_time: Duration::from_secs(60),
        };
        assert_eq!(idle.target(0), 2);
        assert_eq!(idle.target(9), 5);
        assert_eq!(idle.target(100), 10);
    }

    #[test]
    fn schedule_switches_idle_count_at_the_right_local_time() {
        let mut p = policy(0, 600, 20, 0);
        p.classes.get_mut("c").unwrap().schedules = vec![flotilla_proto::config::Schedule {
            periods: vec!["* 9-17 * * mon-fri".into()],
            timezone: "America/New_York".into(),
            idle_count: Some(4),
            idle_count_min: None,
            idle_scale_factor: None,
            idle_time: None,
        }
        .compile()
        .unwrap()];
        // Monday 2026-11-30: 09:00 in New York is 14:00 UTC.
        let at = |h| Utc.with_ymd_and_hms(2026, 11, 30, h, 0, 0).unwrap();
        assert_eq!(launches(&plan(&p, &Pool::default(), at(13))), 0);
        assert_eq!(launches(&plan(&p, &Pool::default(), at(14))), 4);
        assert_eq!(launches(&plan(&p, &Pool::default(), at(23))), 0);
    }

    fn learned(max_idle: u32) -> Learned {
        Learned {
            max_idle,
            lookahead: Duration::from_secs(300),
            memory: Duration::from_secs(600),
            idle_time: Duration::from_secs(60),
            stopped_horizon: Duration::from_secs(6 * 3600),
        }
    }

    fn with_learned(mut p: Policy, l: Learned) -> Policy {
        p.classes.get_mut("c").unwrap().learned = Some(l);
        p
    }

    #[test]
    fn without_history_the_forecast_changes_nothing() {
        let p = with_learned(policy(0, 600, 10, 0), learned(20));
        assert_eq!(launches(&plan(&p, &Pool::default(), t(0))), 0);
        let p = with_learned(policy(2, 600, 10, 0), learned(20));
        assert_eq!(launches(&plan(&p, &Pool::default(), t(0))), 2);
    }

    #[test]
    fn forecast_keeps_a_machine_warm_per_job_expected_within_the_lookahead() {
        let mut pool = Pool::default();
        // 30 jobs in the last 10 minutes: 180 jobs/h, 15 expected in the next 5 minutes.
        for i in 0..30 {
            pool.record_arrival("c", t(-590 + i * 20));
        }
        let p = with_learned(policy(0, 600, 50, 0), learned(20));
        assert_eq!(launches(&plan(&p, &pool, t(0))), 15);
        // Capped by max_idle, and by the class's max_machines.
        let p = with_learned(policy(0, 600, 50, 0), learned(4));
        assert_eq!(launches(&plan(&p, &pool, t(0))), 4);
        let p = with_learned(policy(0, 600, 3, 0), learned(20));
        assert_eq!(launches(&plan(&p, &pool, t(0))), 3);
        // Idle and booting machines count towards it; waiting jobs come on top.
        add(&mut pool, "i", MachineState::Idle, 0);
        add(&mut pool, "b", MachineState::Booting, 0);
        pool.set_waiting_for_test("c", 2);
        let p = with_learned(policy(0, 600, 50, 0), learned(20));
        assert_eq!(launches(&plan(&p, &pool, t(1))), 15 + 2 - 2);
        // A trickle (one job in 10 minutes: 0.5 expected) keeps nothing warm.
        let mut trickle = Pool::default();
        trickle.record_arrival("c", t(-60));
        assert_eq!(launches(&plan(&p, &trickle, t(0))), 0);
    }

    #[test]
    fn forecast_warms_up_for_the_usual_busy_hour_before_its_jobs_arrive() {
        use chrono::TimeZone;
        // Monday 10:00-11:00 UTC saw 120 jobs; on Tuesday at 10:00, before any job, the
        // profile expects 120/h: 10 in the next 5 minutes.
        let monday = |h, m| Utc.with_ymd_and_hms(2026, 11, 30, h, m, 0).unwrap();
        let mut pool = Pool::default();
        for i in 0..120 {
            pool.record_arrival("c", monday(10, 0) + chrono::Duration::seconds(i * 30));
        }
        pool.record_arrival("c", monday(23, 0));
        let p = with_learned(policy(0, 600, 50, 0), learned(20));
        let tuesday_10 = monday(10, 0) + chrono::Duration::days(1);
        assert_eq!(launches(&plan(&p, &pool, tuesday_10)), 10);
        // At 03:00, an hour that was quiet, nothing is kept warm.
        let tuesday_3 = monday(3, 0) + chrono::Duration::days(1);
        assert_eq!(launches(&plan(&p, &pool, tuesday_3)), 0);
    }

    #[test]
    fn forecast_idle_time_releases_machines_it_does_not_need() {
        let mut pool = Pool::default();
        add(&mut pool, "a", MachineState::Idle, 0);
        let p = with_learned(policy(0, 600, 5, 0), learned(20));
        assert!(terminated(&plan(&p, &pool, t(59))).is_empty());
        assert_eq!(
            terminated(&plan(&p, &pool, t(60))),
            vec![("a".to_string(), TerminateReason::IdleTimeout)]
        );
        // The class's idle_time still applies when it is the shorter one.
        let p = with_learned(policy(0, 10, 5, 0), learned(20));
        assert_eq!(terminated(&plan(&p, &pool, t(10))).len(), 1);
        // A machine the forecast wants warm stays.
        for i in 0..30 {
            pool.record_arrival("c", t(i * 10));
        }
        let p = with_learned(policy(0, 600, 5, 0), learned(20));
        assert!(terminated(&plan(&p, &pool, t(400))).is_empty());
    }

    #[test]
    fn from_config_turns_the_forecast_on_by_default() {
        let text = "fleet = \"f\"\nstate_dir = \"/s\"\ndefault_class = \"c\"\n[classes.c]\nami = \"a\"\ninstance_types = [\"t\"]\nsubnets = [\"s\"]\n";
        let c = Config::from_toml(text).unwrap();
        let p = Policy::from_config(&c);
        assert_eq!(p.classes["c"].learned, Some(learned(20)));
        let off = text.to_owned() + "[classes.c.forecast]\nenabled = false\n";
        let p = Policy::from_config(&Config::from_toml(&off).unwrap());
        assert_eq!(p.classes["c"].learned, None);
    }

    fn with_stopped(mut p: Policy, max_stopped: u32) -> Policy {
        p.classes.get_mut("c").unwrap().max_stopped = max_stopped;
        p
    }

    fn stops(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Stop { machine_id } => Some(machine_id.clone()),
                _ => None,
            })
            .collect()
    }

    fn starts(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { machine_id } => Some(machine_id.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn idle_machine_beyond_the_hot_target_is_stopped_instead_of_terminated() {
        let mut pool = Pool::default();
        add(&mut pool, "a", MachineState::Idle, 0);
        let p = with_stopped(policy(0, 600, 5, 0), 2);
        assert!(plan(&p, &pool, t(599)).is_empty());
        let actions = plan(&p, &pool, t(600));
        assert_eq!(stops(&actions), ["a"], "{actions:?}");
        assert!(terminated(&actions).is_empty(), "{actions:?}");
        assert_eq!(launches(&actions), 0);
    }

    #[test]
    fn without_max_stopped_idle_machines_are_terminated_as_before() {
        let mut pool = Pool::default();
        add(&mut pool, "a", MachineState::Idle, 0);
        let actions = plan(&policy(0, 600, 5, 0), &pool, t(600));
        assert!(stops(&actions).is_empty());
        assert_eq!(terminated(&actions).len(), 1);
    }

    #[test]
    fn the_stopped_pool_is_bounded_by_max_stopped() {
        let mut pool = Pool::default();
        add(&mut pool, "s", MachineState::Stopped, 0);
        add(&mut pool, "x", MachineState::Stopping, 0);
        add(&mut pool, "a", MachineState::Idle, 0);
        add(&mut pool, "b", MachineState::Idle, 1);
        add(&mut pool, "c", MachineState::Idle, 2);
        let actions = plan(&with_stopped(policy(0, 600, 10, 0), 3), &pool, t(1000));
        assert_eq!(stops(&actions), ["a"], "{actions:?}");
        assert_eq!(
            terminated(&actions),
            vec![
                ("b".to_string(), TerminateReason::IdleTimeout),
                ("c".to_string(), TerminateReason::IdleTimeout)
            ]
        );
    }

    #[test]
    fn demand_starts_stopped_machines_before_any_cold_launch() {
        let mut pool = Pool::default();
        add(&mut pool, "old", MachineState::Stopped, 0);
        add(&mut pool, "new", MachineState::Stopped, 10);
        let p = with_stopped(policy(0, 600, 5, 0), 2);
        pool.set_waiting_for_test("c", 1);
        let one = plan(&p, &pool, t(20));
        assert_eq!(starts(&one), ["old"], "{one:?}");
        assert_eq!(launches(&one), 0);
        pool.set_waiting_for_test("c", 4);
        let four = plan(&p, &pool, t(20));
        assert_eq!(starts(&four), ["old", "new"], "{four:?}");
        // Stopped machines count towards max_machines (5): 2 + 2 launches.
        assert_eq!(launches(&four), 2, "{four:?}");
    }

    #[test]
    fn a_waiting_job_gets_a_start_even_while_a_launch_boots() {
        let mut pool = Pool::default();
        add(&mut pool, "b", MachineState::Booting, 0);
        add(&mut pool, "s", MachineState::Stopped, 0);
        pool.set_waiting_for_test("c", 1);
        let actions = plan(&with_stopped(policy(0, 600, 5, 0), 2), &pool, t(5));
        assert_eq!(starts(&actions), ["s"], "{actions:?}");
        assert_eq!(launches(&actions), 0, "{actions:?}");
        // An idle-target top-up does not: the booting machine will be idle.
        pool.set_waiting_for_test("c", 0);
        let actions = plan(&with_stopped(policy(1, 600, 5, 0), 2), &pool, t(5));
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn a_starting_machine_is_coming_capacity() {
        let mut pool = Pool::default();
        add(&mut pool, "s", MachineState::Starting, 0);
        pool.set_waiting_for_test("c", 1);
        let actions = plan(&with_stopped(policy(0, 600, 5, 0), 2), &pool, t(1));
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn a_failed_start_is_terminated_and_replaced() {
        let mut pool = Pool::default();
        add(&mut pool, "s", MachineState::Starting, 0);
        add(&mut pool, "spare", MachineState::Stopped, 0);
        pool.set_waiting_for_test("c", 2);
        let actions = plan(&with_stopped(policy(0, 600, 5, 0), 2), &pool, t(300));
        assert_eq!(
            terminated(&actions),
            vec![("s".to_string(), TerminateReason::BootTimeout)]
        );
        assert_eq!(starts(&actions), ["spare"], "{actions:?}");
        assert_eq!(launches(&actions), 1, "{actions:?}");
    }

    #[test]
    fn an_old_machine_started_now_times_out_from_its_start_not_its_launch() {
        let mut pool = Pool::default();
        add_launched(&mut pool, "s", MachineState::Stopped, 0, DAY);
        assert!(pool.begin_start("s", t(DAY)));
        let p = with_stopped(policy(0, 600, 5, 0), 2);
        assert!(terminated(&plan(&p, &pool, t(DAY + 299))).is_empty());
        assert_eq!(
            terminated(&plan(&p, &pool, t(DAY + 300))),
            vec![("s".to_string(), TerminateReason::BootTimeout)]
        );
    }

    #[test]
    fn pool_walks_idle_stopping_stopped_starting_idle() {
        let mut pool = Pool::default();
        add(&mut pool, "m", MachineState::Idle, 0);
        assert!(
            !pool.begin_start("m", t(1)),
            "only a stopped machine starts"
        );
        assert!(pool.begin_stop("m", t(1)));
        assert_eq!(pool.machines()["m"].state, MachineState::Stopping);
        assert!(!pool.mark_ready("m", t(2)));
        assert!(pool.mark_stopped("m"));
        assert!(pool.begin_start("m", t(3)));
        assert_eq!(pool.machines()["m"].state, MachineState::Starting);
        assert!(pool.mark_ready("m", t(4)));
        assert_eq!(pool.machines()["m"].state, MachineState::Idle);
        // The state file: the new fields round-trip, and an old record without them loads.
        let m = pool.machines()["m"].clone();
        let json = serde_json::to_string(&m).unwrap();
        let back: Machine = serde_json::from_str(&json).unwrap();
        assert_eq!(back.started_at, Some(t(3)));
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("started_at");
        let old: Machine = serde_json::from_value(old).unwrap();
        assert_eq!(old.started_at, None);
        let stopped: MachineState = serde_json::from_str("\"stopped\"").unwrap();
        assert_eq!(stopped.as_str(), "stopped");
    }

    #[test]
    fn a_fleet_at_max_machines_still_starts_its_stopped_machines() {
        let mut p = with_stopped(policy(0, 600, 5, 0), 5);
        p.max_machines = 2;
        let mut pool = Pool::default();
        add(&mut pool, "s1", MachineState::Stopped, 0);
        add(&mut pool, "s2", MachineState::Stopped, 0);
        pool.set_waiting_for_test("c", 3);
        let actions = plan(&p, &pool, t(1));
        assert_eq!(starts(&actions), ["s1", "s2"], "{actions:?}");
        assert_eq!(launches(&actions), 0);
    }

    #[test]
    fn starts_share_the_growth_rate_with_launches() {
        let mut p = with_stopped(policy(0, 600, 50, 0), 5);
        p.max_growth_rate = 2;
        let mut pool = Pool::default();
        for id in ["s1", "s2", "s3"] {
            add(&mut pool, id, MachineState::Stopped, 0);
        }
        pool.set_waiting_for_test("c", 5);
        let actions = plan(&p, &pool, t(1));
        assert_eq!(starts(&actions), ["s1", "s2"], "{actions:?}");
        assert_eq!(launches(&actions), 0);
    }

    #[test]
    fn stopped_machines_retire_at_max_age_and_on_drain() {
        let mut pool = Pool::default();
        add_launched(&mut pool, "old", MachineState::Stopped, 0, DAY);
        add_launched(&mut pool, "young", MachineState::Stopped, DAY, DAY);
        let p = with_stopped(policy(0, 600, 5, 0), 2);
        assert_eq!(
            terminated(&plan(&p, &pool, t(7 * DAY))),
            vec![("old".to_string(), TerminateReason::MaxAge)]
        );
        pool.set_draining(true);
        let mut got = terminated(&plan(&p, &pool, t(2 * DAY)));
        got.sort();
        assert_eq!(
            got,
            vec![
                ("old".to_string(), TerminateReason::Drained),
                ("young".to_string(), TerminateReason::Drained)
            ]
        );
    }

    #[test]
    fn the_forecast_hot_target_is_kept_hot_not_stopped() {
        let mut pool = Pool::default();
        for i in 0..30 {
            pool.record_arrival("c", t(i * 10));
        }
        add(&mut pool, "a", MachineState::Idle, 0);
        let p = with_stopped(with_learned(policy(0, 600, 5, 0), learned(20)), 2);
        let actions = plan(&p, &pool, t(400));
        assert!(stops(&actions).is_empty(), "{actions:?}");
        assert!(terminated(&actions).is_empty(), "{actions:?}");
    }

    /// The forecast with no hot look-ahead (so only the stopped target is at play), a
    /// 2 h stopped horizon and a stopped pool of at most `max_stopped`.
    fn burst_sized(max_stopped: u32) -> Policy {
        let mut l = learned(20);
        l.lookahead = Duration::ZERO;
        l.stopped_horizon = Duration::from_secs(2 * 3600);
        with_stopped(with_learned(policy(0, 600, 50, 0), l), max_stopped)
    }

    /// `n` jobs arriving together at `at` (a pipeline).
    fn burst(pool: &mut Pool, n: u32, at: i64) {
        for _ in 0..n {
            pool.record_arrival("c", t(at));
        }
    }

    #[test]
    fn the_stopped_pool_is_sized_for_the_largest_recent_burst() {
        let mut pool = Pool::default();
        burst(&mut pool, 4, -100);
        for i in 0..6 {
            add(&mut pool, &format!("i{i}"), MachineState::Idle, -1000 + i);
        }
        let actions = plan(&burst_sized(10), &pool, t(0));
        assert_eq!(stops(&actions), ["i0", "i1", "i2", "i3"], "{actions:?}");
        assert_eq!(terminated(&actions).len(), 2, "{actions:?}");
        // max_stopped still bounds it.
        let actions = plan(&burst_sized(3), &pool, t(0));
        assert_eq!(stops(&actions).len(), 3, "{actions:?}");
        // No history, no burst to prepare for: nothing is kept stopped.
        let mut quiet = Pool::default();
        add(&mut quiet, "i", MachineState::Idle, -1000);
        let actions = plan(&burst_sized(10), &quiet, t(0));
        assert!(stops(&actions).is_empty(), "{actions:?}");
        assert_eq!(terminated(&actions).len(), 1);
    }

    #[test]
    fn stopped_machines_beyond_the_target_are_terminated_oldest_launch_first() {
        let mut pool = Pool::default();
        burst(&mut pool, 2, -100);
        // Stopped in the order s0..s4, launched in the reverse order.
        for i in 0..5i64 {
            let id = format!("s{i}");
            add_launched(
                &mut pool,
                &id,
                MachineState::Stopped,
                -DAY + 4 - i,
                -500 + i,
            );
        }
        add(&mut pool, "stopping", MachineState::Stopping, -10);
        let actions = plan(&burst_sized(10), &pool, t(0));
        // Target 2, six parked (the stopping one included): four go, oldest launch first.
        assert_eq!(
            terminated(&actions),
            ["s4", "s3", "s2", "s1"]
                .map(|id| (id.to_string(), TerminateReason::IdleTimeout))
                .to_vec()
        );
        assert!(
            starts(&actions).is_empty() && launches(&actions) == 0,
            "{actions:?}"
        );
        // Two hours later the burst is past the horizon: every stopped machine goes.
        let later = plan(&burst_sized(10), &pool, t(7201));
        assert_eq!(terminated(&later).len(), 5, "{later:?}");
        // Without the forecast the stopped pool is max_stopped, as before.
        let fixed = with_stopped(policy(0, 600, 50, 0), 10);
        assert!(terminated(&plan(&fixed, &pool, t(7201))).is_empty());
    }

    #[test]
    fn stopped_machines_demand_is_about_to_start_are_not_surplus() {
        let mut pool = Pool::default();
        for i in 0..4 {
            add(&mut pool, &format!("s{i}"), MachineState::Stopped, i);
        }
        // Three waiting jobs, no history: the target is 0, yet three are started, not
        // terminated and replaced by launches; only the fourth goes.
        pool.set_waiting_for_test("c", 3);
        let actions = plan(&burst_sized(10), &pool, t(10));
        assert_eq!(starts(&actions), ["s0", "s1", "s2"], "{actions:?}");
        assert_eq!(
            terminated(&actions),
            vec![("s3".to_string(), TerminateReason::IdleTimeout)]
        );
        assert_eq!(launches(&actions), 0);
    }

    #[test]
    fn a_forecast_pool_short_of_its_target_is_filled_by_launches_after_demand() {
        let mut pool = Pool::default();
        burst(&mut pool, 6, -100);
        for i in 0..4 {
            add(&mut pool, &format!("s{i}"), MachineState::Stopped, i);
        }
        pool.set_waiting_for_test("c", 3);
        let actions = plan(&burst_sized(10), &pool, t(10));
        // Target 6: the three started machines will be leased and come back, so only
        // the two the pool never had are launched.
        assert_eq!(starts(&actions), ["s0", "s1", "s2"], "{actions:?}");
        assert_eq!(launches(&actions), 2, "{actions:?}");
        // Refills come last: with the growth rate at 4, the waiting jobs take 3 of it.
        let mut p = burst_sized(10);
        p.max_growth_rate = 4;
        let actions = plan(&p, &pool, t(10));
        assert_eq!(
            starts(&actions).len() as u32 + launches(&actions),
            4,
            "{actions:?}"
        );
        assert_eq!(starts(&actions).len(), 3, "{actions:?}");
        // A fixed pool (no forecast) is a bound only: nothing is launched to fill it.
        let fixed = with_stopped(policy(0, 600, 50, 0), 10);
        let actions = plan(&fixed, &pool, t(10));
        assert_eq!(launches(&actions), 0, "{actions:?}");
        // Booting machines count: once launched, the refill is not planned again.
        let mut refilling = Pool::default();
        burst(&mut refilling, 4, -100);
        add(&mut refilling, "s", MachineState::Stopped, 0);
        for i in 0..3 {
            add(&mut refilling, &format!("b{i}"), MachineState::Booting, 10);
        }
        let actions = plan(&burst_sized(10), &refilling, t(11));
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn a_burst_learned_for_the_coming_hours_keeps_the_pool_overnight() {
        let monday = |h, m| Utc.with_ymd_and_hms(2026, 11, 30, h, m, 0).unwrap();
        let mut pool = Pool::default();
        for _ in 0..12 {
            pool.record_arrival("c", monday(10, 0));
        }
        pool.record_arrival("c", monday(23, 0));
        let tuesday = |h| monday(h, 0) + chrono::Duration::days(1);
        let mut m = Machine::booting("s".into(), "c".into(), "t".into(), monday(12, 0));
        m.instance_id = "i-s".into();
        m.state = MachineState::Stopped;
        pool.insert_for_test(m);
        // At 09:00 the 10:00 burst is within the 2 h horizon: the machine is kept, and the
        // pool is filled up to the burst (bounded by max_stopped) by launches.
        let actions = plan(&burst_sized(10), &pool, tuesday(9));
        assert!(terminated(&actions).is_empty(), "{actions:?}");
        assert_eq!(launches(&actions), 9, "{actions:?}");
        // At 06:00 it is not (and the recent arrivals are older than 2 h): it goes.
        assert_eq!(
            terminated(&plan(&burst_sized(10), &pool, tuesday(6))).len(),
            1
        );
    }

    #[test]
    fn removed_class_machines_go_when_idle() {
        let mut pool = Pool::default();
        add(&mut pool, "a", MachineState::Idle, 0);
        pool.machine_mut_for_test("a").unwrap().class = "gone".into();
        let actions = plan(&policy(0, 600, 5, 0), &pool, t(1));
        assert_eq!(
            terminated(&actions),
            vec![("a".to_string(), TerminateReason::ClassRemoved)]
        );
    }
}

//! Fleet management against a misbehaving EC2 (issue 4): capacity errors, spot shortfalls
//! and throttling storms injected by the fault proxy in front of moto; the daemon killed
//! mid-job; machines terminated behind its back; audit, drain and the metrics it exports.
//!
//! Covered elsewhere, not repeated here: orphans reaped after `orphan_grace` and never
//! before, and instances without this fleet's tag never touched (`pool::orphan_with_...`;
//! its orphan has no daemon tag, as from a version before daemon ids, in the sandbox's
//! subnet: still ours);
//! schedules switching `idle_count` at the right local time (`flotilla::plan` unit test
//! `schedule_switches_idle_count_at_the_right_local_time`, fake clock, America/New_York).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use aws_sdk_ec2::types::Filter;
use flotilla_proto::api::{AuditResponse, MachineState, StatusResponse};
use flotilla_proto::config::{ClassConfig, Market};
use flotilla_sandbox::faults::{FaultProxy, Rule, INSUFFICIENT_CAPACITY, REQUEST_LIMIT_EXCEEDED};
use flotilla_sandbox::prom::{self, Exposition};
use flotilla_sandbox::runner::{self, SYSTEM_FAILURE_EXIT_CODE};
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{Job, JobResult, Outcome, Sandbox, SandboxOptions};
use nix::sys::signal::Signal;

use crate::common::{bounded, let_go, wait_for_job_process, HELD, HOLD, POLL};

/// A sandbox whose daemon is not started yet, so faults can be in place before its
/// first reconcile.
async fn paused(opts: SandboxOptions) -> Result<Sandbox> {
    Sandbox::start(SandboxOptions {
        start_daemon: false,
        ..opts
    })
    .await
}

fn proxy(sb: &Sandbox) -> Result<&FaultProxy> {
    sb.faults()
        .context("the sandbox was started without ec2_proxy")
}

/// `flotilla --config <sandbox> <args>`: (exit code, stdout, stderr).
async fn flotilla(sb: &Sandbox, args: &[&str]) -> Result<(i32, String, String)> {
    let out = tokio::process::Command::new(&sb.flotilla_bin)
        .arg("--config")
        .arg(&sb.config_path)
        .args(args)
        .envs(sb.aws_env())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running flotilla {}", args.join(" ")))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn status(sb: &Sandbox) -> Result<StatusResponse> {
    let (code, out, err) = flotilla(sb, &["status", "--json"]).await?;
    ensure!(code == 0, "flotilla status --json exited {code}: {err}");
    serde_json::from_str(&out).with_context(|| format!("status JSON: {out}"))
}

async fn scrape(sb: &Sandbox) -> Result<Exposition> {
    let text = sb.metrics().await?;
    prom::parse(&text).with_context(|| format!("/metrics is not valid Prometheus text:\n{text}"))
}

/// One fleet instance in moto with what the tests need beyond `InstanceInfo`.
#[derive(Debug, Clone)]
struct Instance {
    id: String,
    state: String,
    instance_type: String,
    class: Option<String>,
    lifecycle: Option<String>,
}

impl Instance {
    fn live(&self) -> bool {
        !matches!(self.state.as_str(), "terminated" | "shutting-down")
    }
}

/// The tags moto holds for an instance and for its volumes, by what they are on.
async fn machine_tags(
    sb: &Sandbox,
    instance_id: &str,
) -> Result<Vec<(String, std::collections::BTreeMap<String, String>)>> {
    let as_map = |tags: &[aws_sdk_ec2::types::Tag]| {
        tags.iter()
            .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let mut out = Vec::new();
    let resp = sb
        .ec2()
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .context("DescribeInstances in moto")?;
    for i in resp.reservations().iter().flat_map(|r| r.instances()) {
        out.push((format!("instance {instance_id}"), as_map(i.tags())));
    }
    let volumes = sb
        .ec2()
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("attachment.instance-id")
                .values(instance_id)
                .build(),
        )
        .send()
        .await
        .context("DescribeVolumes in moto")?;
    for v in volumes.volumes() {
        out.push((
            format!("volume {}", v.volume_id().unwrap_or_default()),
            as_map(v.tags()),
        ));
    }
    ensure!(
        out.len() >= 2,
        "moto lists {} instance(s) and volume(s) for {instance_id}",
        out.len()
    );
    Ok(out)
}

async fn fleet(sb: &Sandbox) -> Result<Vec<Instance>> {
    let resp = sb
        .ec2()
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", flotilla_proto::tags::FLEET))
                .values(&sb.fleet)
                .build(),
        )
        .send()
        .await
        .context("DescribeInstances in moto")?;
    let mut out = Vec::new();
    for i in resp.reservations().iter().flat_map(|r| r.instances()) {
        let tag = |k: &str| {
            i.tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
                .map(str::to_owned)
        };
        out.push(Instance {
            id: i.instance_id().unwrap_or_default().to_owned(),
            state: i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned())
                .unwrap_or_default(),
            instance_type: i
                .instance_type()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            class: tag(flotilla_proto::tags::CLASS),
            lifecycle: i.instance_lifecycle().map(|l| l.as_str().to_owned()),
        });
    }
    Ok(out)
}

/// Waits until the daemon reports `n` idle machines of `class`.
async fn wait_idle(
    sb: &Sandbox,
    class: &str,
    n: usize,
    timeout: Duration,
) -> Result<StatusResponse> {
    wait_until(
        &format!("{n} idle {class} machine(s)"),
        timeout,
        POLL,
        || async {
            let s = status(sb).await?;
            let idle = s
                .machines
                .iter()
                .filter(|m| m.class == class && m.state == MachineState::Idle)
                .count();
            Ok((idle == n).then_some(s))
        },
    )
    .await
    .with_context(|| sb.diagnostics())
}

fn spawn_job(sb: &Sandbox, job: Job) -> tokio::task::JoinHandle<Result<JobResult>> {
    tokio::spawn(runner::run_job(sb.runner_options(), job))
}

async fn successful_job(sb: &Sandbox, id: u64) -> Result<JobResult> {
    let r = sb
        .run_job(Job::new(id, &["echo job-$CI_JOB_ID ok"]))
        .await?;
    ensure!(
        r.outcome == Outcome::Success && r.cleanup_exit == Some(0),
        "job {id}:\n{}\n{}",
        r.describe(),
        sb.diagnostics()
    );
    Ok(r)
}

/// Reads the proxy's counts and /metrics until both agree on a quiet moment (a call is
/// counted by the daemon just before it reaches the proxy); fails with both when they never do.
async fn ec2_calls_agree(sb: &Sandbox) -> Result<Exposition> {
    let faults = proxy(sb)?;
    let last = std::sync::Mutex::new(String::new());
    wait_until(
        "the proxy's counts and /metrics to agree",
        Duration::from_secs(30),
        POLL,
        || async {
            let before = faults.counts();
            let e = scrape(sb).await?;
            let after = faults.counts();
            let metrics: BTreeMap<String, u64> = e
                .by_label("flotilla_ec2_calls_total", "operation")
                .into_iter()
                .map(|(k, v)| (k, v as u64))
                .filter(|(_, v)| *v > 0)
                .collect();
            if before == after && metrics == after {
                return Ok(Some(e));
            }
            *last.lock().unwrap_or_else(|p| p.into_inner()) =
                format!("proxy saw {after:?}, /metrics says {metrics:?}");
            Ok(None)
        },
    )
    .await
    .with_context(|| {
        format!(
            "EC2 calls never agreed: {}\n{}",
            last.lock().unwrap_or_else(|p| p.into_inner()),
            sb.diagnostics()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_error_on_the_first_instance_type_launches_the_next_type() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let mut sb = paused(SandboxOptions {
            ec2_proxy: true,
            metrics: true,
            idle_count: 1,
            // No top-up launch while the job holds the machine: one launch to look at.
            max_machines: 1,
            instance_types: vec!["t3.micro".into(), "t3.small".into()],
            ..Default::default()
        })
        .await?;
        proxy(&sb)?.inject(Rule::no_capacity_for_type("t3.micro"));
        sb.start_daemon().await?;

        wait_idle(&sb, "default", 1, Duration::from_secs(90)).await?;
        let all = fleet(&sb).await?;
        ensure!(
            all.len() == 1 && all[0].instance_type == "t3.small",
            "expected one t3.small instance, moto has {all:#?}\n{}",
            sb.diagnostics()
        );
        // The machine is a working one.
        successful_job(&sb, 401).await?;

        let calls = proxy(&sb)?.calls();
        let runs: Vec<_> = calls
            .iter()
            .filter(|c| c.action == "RunInstances")
            .collect();
        let refused = runs
            .iter()
            .filter(|c| c.injected.as_deref() == Some(INSUFFICIENT_CAPACITY))
            .count();
        let forwarded: Vec<_> = runs.iter().filter(|c| c.injected.is_none()).collect();
        ensure!(
            forwarded.len() == 1 && forwarded[0].param("InstanceType") == Some("t3.small"),
            "RunInstances that reached moto: {forwarded:#?}"
        );
        let m = scrape(&sb).await?;
        let failures = m.get(
            "flotilla_launch_failures_total",
            &[("class", "default"), ("reason", INSUFFICIENT_CAPACITY)],
        );
        ensure!(
            failures == Some(1.0),
            "launch_failures_total for the t3.micro shortfall: {failures:?}"
        );
        // A capacity error is an answer, not a transient fault: one refused call, not a
        // retry loop in the SDK before the next type is tried.
        ensure!(
            refused == 1,
            "t3.micro was asked {refused} times for one machine: {runs:#?}"
        );
        ensure!(
            m.get(
                "flotilla_launches_total",
                &[
                    ("class", "default"),
                    ("instance_type", "t3.small"),
                    ("market", "on-demand")
                ]
            ) == Some(1.0)
                && m.sum("flotilla_launches_total", &[]) == 1.0,
            "launches_total: {:?}",
            m.samples
                .iter()
                .filter(|s| s.name == "flotilla_launches_total")
                .collect::<Vec<_>>()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_shortfall_falls_back_to_on_demand_only_where_the_class_allows_it() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let mut sb = paused(SandboxOptions {
            ec2_proxy: true,
            metrics: true,
            idle_count: 1,
            market: Market::SpotWithFallback,
            tags: [("CostCenter".to_string(), "ci".to_string())].into(),
            extra_classes: vec![(
                "spot".into(),
                ClassConfig {
                    tags: [("Team".to_string(), "spot-builds".to_string())].into(),
                    market: Market::Spot,
                    idle_count: 1,
                    max_machines: 2,
                    idle_time: flotilla_proto::duration::HumanDuration::from_secs(20),
                    boot_timeout: flotilla_proto::duration::HumanDuration::from_secs(60),
                    forecast: flotilla_proto::config::ForecastConfig {
                        enabled: false,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )],
            ..Default::default()
        })
        .await?;
        proxy(&sb)?.inject(Rule::no_spot_capacity());
        sb.start_daemon().await?;

        // spot-with-fallback: the spot shortfall is bought on-demand.
        wait_idle(&sb, "default", 1, Duration::from_secs(90)).await?;
        // Plain spot: several reconciles (and launch attempts with backoff) later, still
        // nothing.
        sb.wait_reconciles(8).await?;
        let all = fleet(&sb).await?;
        let by_class = |c: &str| -> Vec<&Instance> {
            all.iter()
                .filter(|i| i.class.as_deref() == Some(c))
                .collect()
        };
        ensure!(
            by_class("default").len() == 1 && by_class("spot").is_empty(),
            "expected one default (on-demand) instance and no spot one, moto has {all:#?}\n{}",
            sb.diagnostics()
        );
        // The operator's tags, as moto recorded them from the launch call, on the instance
        // and its root volume, beside Flotilla's own.
        let tagged = machine_tags(&sb, &by_class("default")[0].id).await?;
        for (what, tags) in &tagged {
            ensure!(
                tags.get("CostCenter").map(String::as_str) == Some("ci")
                    && tags.get(flotilla_proto::tags::FLEET) == Some(&sb.fleet)
                    && !tags.contains_key("Team"),
                "the default class's {what} carries {tags:?}"
            );
        }
        let calls = proxy(&sb)?.calls();
        let runs: Vec<_> = calls
            .iter()
            .filter(|c| c.action == "RunInstances")
            .collect();
        // The spot class's launches (refused, so nothing in moto) asked for its own tags.
        for c in runs.iter().filter(|c| c.is_spot()) {
            let sent: Vec<(&str, &str)> = (1..=8)
                .filter_map(|n| {
                    Some((
                        c.param(&format!("TagSpecification.1.Tag.{n}.Key"))?,
                        c.param(&format!("TagSpecification.1.Tag.{n}.Value"))?,
                    ))
                })
                .collect();
            if sent.contains(&(flotilla_proto::tags::CLASS, "spot")) {
                ensure!(
                    sent.contains(&("Team", "spot-builds")) && sent.contains(&("CostCenter", "ci")),
                    "the spot class's launch sent tags {sent:?}"
                );
            }
        }
        for c in runs.iter().filter(|c| c.injected.is_none()) {
            ensure!(
                !c.is_spot(),
                "a spot RunInstances got through the injected shortfall: {c:#?}"
            );
        }
        let spot_class_calls: Vec<_> = runs
            .iter()
            .filter(|c| c.param("TagSpecification.1.Tag.2.Value") == Some("spot"))
            .collect();
        ensure!(
            spot_class_calls.iter().all(|c| c.is_spot()),
            "the spot class asked for on-demand: {spot_class_calls:#?}"
        );
        // Launch backoff (5 s, then 10 s...): a handful of attempts, not one per reconcile.
        ensure!(
            !spot_class_calls.is_empty() && spot_class_calls.len() <= 4,
            "{} RunInstances for the spot class over 8 reconcile passes and more",
            spot_class_calls.len()
        );
        let m = scrape(&sb).await?;
        let spot_failures = m.get(
            "flotilla_launch_failures_total",
            &[("class", "spot"), ("reason", INSUFFICIENT_CAPACITY)],
        );
        ensure!(
            spot_failures == Some(spot_class_calls.len() as f64),
            "launch_failures_total for the spot class: {spot_failures:?}, calls {}",
            spot_class_calls.len()
        );
        ensure!(
            m.get(
                "flotilla_launches_total",
                &[
                    ("class", "default"),
                    ("instance_type", "t3.micro"),
                    ("market", "on-demand")
                ]
            ) == Some(1.0)
                && m.sum("flotilla_launches_total", &[("class", "spot")]) == 0.0,
            "launches_total: {:?}",
            m.samples
                .iter()
                .filter(|s| s.name == "flotilla_launches_total")
                .collect::<Vec<_>>()
        );
        ensure!(
            m.get(
                "flotilla_launch_failures_total",
                &[("class", "default"), ("reason", INSUFFICIENT_CAPACITY)]
            ) == Some(1.0),
            "the fallback class should have failed exactly one spot attempt"
        );

        // Capacity comes back: the spot class gets its machine, bought on the spot market.
        proxy(&sb)?.clear();
        wait_idle(&sb, "spot", 1, Duration::from_secs(90)).await?;
        let m = scrape(&sb).await?;
        ensure!(
            m.get(
                "flotilla_launches_total",
                &[
                    ("class", "spot"),
                    ("instance_type", "t3.micro"),
                    ("market", "spot")
                ]
            ) == Some(1.0),
            "the spot class did not launch on the spot market once it could"
        );
        // As EC2 records them: the fallback machine on-demand, the spot class's on spot.
        let all = fleet(&sb).await?;
        let lifecycle = |class: &str| {
            all.iter()
                .find(|i| i.class.as_deref() == Some(class))
                .map(|i| i.lifecycle.clone())
        };
        ensure!(
            lifecycle("default") == Some(None) && lifecycle("spot") == Some(Some("spot".into())),
            "instance lifecycles in moto: {all:#?}"
        );
        sb.shutdown().await
    })
    .await
}

/// Throttled answers in a row of the quiet storm: more than the SDK's attempts at one
/// logical call (5), so at least one observation fails outright.
const QUIET_STORM: u64 = 6;

/// Throttling storms that end on events, not after a duration: the first after a number of
/// throttled answers, the second once a job holding the warm machine through it has made
/// the daemon launch a replacement, that launch has failed and the class backed off. What is checked is which
/// calls were made and what the daemon did, never how many calls fit in some seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_storm_causes_backoff_not_extra_launches_or_lost_machines() -> Result<()> {
    // The storm outlasts two logical calls, each retried by the SDK for about 75 s.
    bounded(Duration::from_secs(600), async {
        let sb = Sandbox::start(SandboxOptions {
            ec2_proxy: true,
            metrics: true,
            idle_count: 1,
            // Nothing leaves by idle_time while the storm and its aftermath are watched.
            idle_time: Duration::from_secs(300),
            ..Default::default()
        })
        .await?;
        let steady = wait_idle(&sb, "default", 1, Duration::from_secs(90)).await?;
        let faults = proxy(&sb)?;

        // 1. A steady pool: the observations are throttled, retried, and their failure
        // changes nothing (gitlab-runner #3424: a failed Describe made docker+machine
        // believe its machines gone and create more).
        let log_from = std::fs::metadata(sb.daemon_log()).map_or(0, |m| m.len() as usize);
        let before = faults.mark();
        let storm = faults.inject(Rule::throttle_all().times(QUIET_STORM));
        let end = faults
            .wait_spent(storm, Duration::from_secs(120))
            .await
            .with_context(|| sb.diagnostics())?;
        let first: Vec<_> = faults.calls()[before..end].to_vec();
        let mut first_actions: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &first {
            *first_actions.entry(c.action.as_str()).or_default() += 1;
        }
        eprintln!("quiet storm of {QUIET_STORM} throttled answers: EC2 requests {first_actions:?}");
        ensure!(
            first.iter().all(|c| c.action == "DescribeInstances"),
            "a storm on a steady pool made the daemon call more than DescribeInstances: {first_actions:?}"
        );
        let log = std::fs::read(sb.daemon_log()).unwrap_or_default();
        let log = String::from_utf8_lossy(log.get(log_from..).unwrap_or_default());
        ensure!(
            log.contains("could not observe the fleet"),
            "no observation failed under {QUIET_STORM} throttled answers\n{}",
            sb.diagnostics()
        );
        let s = status(&sb).await?;
        ensure!(
            s.machines == steady.machines,
            "the pool changed under a storm: {:#?}",
            s.machines
        );
        // The daemon observes again once EC2 answers.
        faults
            .wait_call(
                "a successful observation",
                Duration::from_secs(60),
                end,
                |c| c.action == "DescribeInstances" && c.injected.is_none(),
            )
            .await?;

        // 2. A job during a storm that lasts until the launch of the machine replacing the
        // one the job took has failed. Leases need no EC2 call: the job gets the warm
        // machine through the storm, and holds it until the replacement is ready (its
        // release would make the replacement unnecessary).
        let before = faults.mark();
        let storm = faults.inject(Rule::throttle_all());
        let task = spawn_job(&sb, Job::new(421, &["echo job-$CI_JOB_ID ok", HOLD]));
        let (machine, container) =
            wait_for_job_process(&sb, 421, HELD, Duration::from_secs(90)).await?;
        // The replacement is launched (RunInstances, retried by the SDK), refused, and the
        // class backs off.
        let control = flotilla::control::ControlClient::new(&sb.config.socket_path());
        let backoff = wait_until(
            "the class to back off after a throttled launch",
            Duration::from_secs(300),
            Duration::from_millis(100),
            || async {
                let s = control.status().await?;
                Ok(s.classes.get("default").and_then(|c| {
                    let throttled = c
                        .last_launch_error
                        .as_deref()
                        .is_some_and(|e| e.contains(REQUEST_LIMIT_EXCEEDED));
                    c.launch_backoff_until.filter(|_| throttled)
                }))
            },
        )
        .await
        .with_context(|| sb.diagnostics())?;
        let end = faults.lift(storm);
        let during: Vec<_> = faults.calls()[before..end].to_vec();

        // After the storm: exactly the one replacement (the job took the idle machine),
        // nothing else.
        let storm_start = during.first().map_or_else(Instant::now, |c| c.at);
        let timeline = || {
            faults.calls()[before..]
                .iter()
                .map(|c| {
                    format!(
                        "+{:.1}s {}{}{}{}",
                        c.at.saturating_duration_since(storm_start).as_secs_f64(),
                        c.action,
                        c.attempt.map(|a| format!(" attempt {a}")).unwrap_or_default(),
                        c.invocation
                            .as_deref()
                            .map(|i| format!(" of call {}", &i[..i.len().min(8)]))
                            .unwrap_or_default(),
                        if c.injected.is_some() { " (throttled)" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        // Once EC2 answers (and the backoff is over) the replacement is launched and
        // ready while the job still holds its machine; then the job ends: two idle.
        wait_until(
            "the replacement to be ready beside the job's machine",
            Duration::from_secs(180),
            POLL,
            || async {
                let s = control.status().await?;
                Ok(s.machines
                    .iter()
                    .any(|m| m.state == MachineState::Idle && m.instance_id != machine.instance_id)
                    .then_some(()))
            },
        )
        .await
        .with_context(timeline)?;
        let_go(&machine, &container).await?;
        let r = task.await??;
        ensure!(
            r.outcome == Outcome::Success && r.cleanup_exit == Some(0),
            "job 421 during the storm:\n{}\n{}",
            r.describe(),
            sb.diagnostics()
        );
        wait_idle(&sb, "default", 2, Duration::from_secs(60))
            .await
            .with_context(timeline)?;
        // And the passes after that change nothing more.
        sb.wait_reconciles(3).await?;
        let all = fleet(&sb).await?;
        ensure!(
            all.len() == 2 && all.iter().all(Instance::live),
            "expected the warm machine and one replacement, moto has {all:#?}\n{}",
            sb.diagnostics()
        );
        let s = status(&sb).await?;
        ensure!(
            s.machines
                .iter()
                .all(|m| matches!(m.state, MachineState::Idle)),
            "a machine is not idle after the storm: {:#?}",
            s.machines
        );
        let log = std::fs::read_to_string(sb.daemon_log()).unwrap_or_default();
        ensure!(
            !log.contains("machine lost"),
            "the storm made the daemon declare a machine lost\n{}",
            sb.diagnostics()
        );
        let calls = faults.calls();
        let forwarded_runs = calls
            .iter()
            .filter(|c| c.action == "RunInstances" && c.injected.is_none())
            .count();
        ensure!(
            forwarded_runs == 2,
            "{forwarded_runs} RunInstances reached moto (1 warm + 1 replacement expected)\n{}",
            timeline()
        );
        ensure!(
            !calls.iter().any(|c| c.action == "TerminateInstances"),
            "something was terminated\n{}",
            timeline()
        );
        // Backoff, not more launches: during the storm one launch was made (one SDK
        // invocation id, however many attempts the SDK made of it), never a second beside
        // it nor one per reconcile pass; the replacement came from one launch after it.
        let launches = |calls: &[flotilla_sandbox::faults::Call]| {
            calls
                .iter()
                .filter(|c| c.action == "RunInstances")
                .map(|c| c.invocation.clone().unwrap_or_default())
                .collect::<std::collections::BTreeSet<_>>()
        };
        let in_storm = launches(&during);
        let after = launches(&calls[end..]);
        ensure!(
            in_storm.len() == 1 && !in_storm.contains("") && after.len() == 1,
            "{} launches during the storm and {} after it (one each expected)\n{}",
            in_storm.len(),
            after.len(),
            timeline()
        );
        // The daemon saw every throttled answer (each one feeds its cool-down).
        let m = ec2_calls_agree(&sb).await?;
        let throttles = m.sum("flotilla_ec2_throttles_total", &[]);
        let injected: u64 = faults.injected().values().sum();
        eprintln!(
            "storm: {} EC2 requests, {throttles} throttled calls seen by the daemon, \
             launch backoff until {backoff}\n{}",
            during.len(),
            timeline()
        );
        ensure!(
            throttles == injected as f64,
            "the proxy throttled {injected} requests, the daemon counted {throttles}"
        );
        ensure!(
            m.sum("flotilla_terminations_total", &[]) == 0.0,
            "something was terminated: {:?}",
            m.by_label("flotilla_terminations_total", "reason")
        );
        // And jobs keep running afterwards.
        successful_job(&sb, 422).await?;
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_job_restarts_and_the_job_completes_without_leaking_machines(
) -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let mut sb = Sandbox::start(SandboxOptions::default()).await?;
        // Held until the daemon is back: the job spans the kill and the restart.
        let job = Job::new(
            431,
            &["echo before-the-kill", HOLD, "echo after-the-restart"],
        )
        .with_after_script(&["echo after-script-ran"]);
        let task = spawn_job(&sb, job);
        let (machine, container) =
            wait_for_job_process(&sb, 431, HELD, Duration::from_secs(90)).await?;
        let leased_before = status(&sb).await?;

        sb.kill_daemon(Signal::SIGKILL).await?;
        sb.start_daemon().await?;
        let adopted = status(&sb).await?;
        ensure!(
            adopted.machines == leased_before.machines,
            "the restarted daemon does not have the pool it had:\nbefore {:#?}\nafter {:#?}",
            leased_before.machines,
            adopted.machines
        );
        ensure!(
            !task.is_finished(),
            "the job ended while the daemon was down"
        );
        let_go(&machine, &container).await?;

        let r = task.await??;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        ensure!(r.cleanup_exit == Some(0), "cleanup failed\n{}", ctx());
        let build = r.stage("build_script").context("no build_script")?;
        ensure!(
            build.stdout.contains("after-the-restart"),
            "the build script did not finish\n{}",
            ctx()
        );
        ensure!(
            r.stage("after_script")
                .is_some_and(|s| s.stdout.contains("after-script-ran")),
            "after_script did not run\n{}",
            ctx()
        );

        // Nothing leaked: the daemon tracks exactly the instances moto runs, the machine is
        // back to idle with its one build counted, no lease is left, and a few reconciles
        // later nothing was reaped as an orphan.
        sb.wait_reconciles(3).await?;
        let s = status(&sb).await?;
        let live: Vec<String> = fleet(&sb)
            .await?
            .into_iter()
            .filter(Instance::live)
            .map(|i| i.id)
            .collect();
        let tracked: Vec<String> = s.machines.iter().map(|m| m.instance_id.clone()).collect();
        ensure!(
            live == tracked && live.len() == 1,
            "moto runs {live:?}, the daemon tracks {tracked:?}\n{}",
            sb.diagnostics()
        );
        ensure!(
            s.machines[0].state == MachineState::Idle
                && s.machines[0].builds == 1
                && s.machines[0].job_key.is_none(),
            "machine after the job: {:#?}",
            s.machines[0]
        );
        let log = std::fs::read_to_string(sb.daemon_log()).unwrap_or_default();
        ensure!(
            !log.contains("orphan"),
            "the restarted daemon treated its own machine as an orphan\n{}",
            sb.diagnostics()
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_terminated_behind_the_daemons_back_fails_its_job_as_lost_and_is_replaced(
) -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            max_machines: 1,
            metrics: true,
            ..Default::default()
        })
        .await?;
        wait_idle(&sb, "default", 1, Duration::from_secs(90)).await?;
        let task = spawn_job(&sb, Job::new(441, &["echo started", HOLD, "echo too-late"]));
        // Never let go: its machine is terminated under it.
        let (m, _) = wait_for_job_process(&sb, 441, HELD, Duration::from_secs(90)).await?;
        let lost = m.instance_id.clone();
        sb.ec2()
            .terminate_instances()
            .instance_ids(&lost)
            .send()
            .await
            .context("terminating the job's instance in moto")?;
        let terminated_at = Instant::now();

        let r = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .context("the job did not end within 60 s of its machine's termination")???;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        let Outcome::SystemFailure { stage, .. } = &r.outcome else {
            bail!("expected a system failure\n{}", ctx());
        };
        let failed = r.stage(stage).context("no failed stage")?;
        ensure!(
            failed.exit_code == Some(SYSTEM_FAILURE_EXIT_CODE),
            "{stage} exited {:?}\n{}",
            failed.exit_code,
            ctx()
        );
        ensure!(
            failed.stderr.contains("lost"),
            "{stage}'s message does not say the machine was lost\n{}",
            ctx()
        );
        ensure!(
            !r.stages.iter().any(|s| s.stdout.contains("too-late")),
            "the script went on\n{}",
            ctx()
        );
        ensure!(
            r.cleanup_exit == Some(0),
            "cleanup of a lost machine must still succeed\n{}",
            ctx()
        );
        eprintln!(
            "job ended {:?} after its machine was terminated",
            terminated_at.elapsed()
        );

        // Replaced (max_machines = 1, so only once the lost one is gone), never leased again.
        let s = wait_idle(&sb, "default", 1, Duration::from_secs(90)).await?;
        ensure!(
            s.machines.iter().all(|m| m.instance_id != lost),
            "the lost machine is still in the pool: {:#?}",
            s.machines
        );
        let all = fleet(&sb).await?;
        ensure!(
            all.iter().filter(|i| i.live()).count() == 1
                && all.iter().any(|i| i.id != lost && i.live()),
            "no replacement in moto: {all:#?}"
        );
        let r2 = successful_job(&sb, 442).await?;
        ensure!(
            !r2.stages.iter().any(|s| s.stdout.contains(&lost)),
            "job 442 ran on the lost machine"
        );
        // (Not a termination of ours: EC2 took it. moto even refuses to terminate it again.)
        let m = scrape(&sb).await?;
        ensure!(
            m.sum("flotilla_launches_total", &[]) == 2.0
                && m.get(
                    "flotilla_machines",
                    &[("class", "default"), ("state", "idle")]
                ) == Some(1.0)
                && m.sum("flotilla_machines", &[]) == 1.0,
            "launches {}, machines {:?}",
            m.sum("flotilla_launches_total", &[]),
            m.by_label("flotilla_machines", "state")
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lists_an_orphan_with_its_reason_and_terminate_reaps_it() -> Result<()> {
    use flotilla_proto::tags;
    use flotilla_sandbox::moto::{instance_state, launch_instance};
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            orphan_grace: Duration::from_secs(600),
            metrics: true,
            ..Default::default()
        })
        .await?;
        let orphan = launch_instance(
            sb.ec2(),
            &sb.network,
            &[(tags::FLEET, &sb.fleet), (tags::MACHINE, "m-orphan")],
            None,
        )
        .await?;
        let foreign = launch_instance(sb.ec2(), &sb.network, &[("Name", "not-ours")], None).await?;

        let audit = wait_until(
            "audit to list the orphan",
            Duration::from_secs(30),
            POLL,
            || async {
                let (code, out, err) = flotilla(&sb, &["audit", "--json"]).await?;
                ensure!(code == 0, "flotilla audit --json exited {code}: {err}");
                let a: AuditResponse = serde_json::from_str(&out)?;
                Ok(a.entries
                    .iter()
                    .any(|e| e.instance_id == orphan)
                    .then_some(a))
            },
        )
        .await?;
        ensure!(
            audit.entries.len() == 1 && !audit.terminated,
            "audit lists {:#?}",
            audit.entries
        );
        let e = &audit.entries[0];
        ensure!(
            e.reason.starts_with("orphan")
                && e.reason.contains(&sb.fleet)
                && e.machine_id.as_deref() == Some("m-orphan")
                && e.reap_at.is_some(),
            "audit entry {e:#?}"
        );
        let (code, text, _) = flotilla(&sb, &["audit"]).await?;
        ensure!(
            code == 0
                && text.contains(&orphan)
                && text.contains("orphan")
                && !text.contains(&foreign),
            "flotilla audit printed: {text}"
        );
        ensure!(
            instance_state(sb.ec2(), &orphan).await? == "running",
            "audit without --terminate must not terminate"
        );

        let (code, text, err) = flotilla(&sb, &["audit", "--terminate"]).await?;
        ensure!(
            code == 0 && text.contains(&format!("terminated {orphan}")),
            "flotilla audit --terminate exited {code}: {text}{err}"
        );
        let state = instance_state(sb.ec2(), &orphan).await?;
        ensure!(
            state == "terminated" || state == "shutting-down",
            "the orphan is {state}"
        );
        ensure!(
            instance_state(sb.ec2(), &foreign).await? == "running",
            "an instance of no fleet was touched"
        );
        let m = scrape(&sb).await?;
        ensure!(
            m.get("flotilla_orphans_reaped_total", &[]) == Some(1.0)
                && m.get("flotilla_terminations_total", &[("reason", "orphan")]) == Some(1.0),
            "orphan metrics: {:?} {:?}",
            m.get("flotilla_orphans_reaped_total", &[]),
            m.by_label("flotilla_terminations_total", "reason")
        );
        let (_, text, _) = flotilla(&sb, &["audit"]).await?;
        ensure!(
            text.contains("nothing to reap"),
            "audit after reaping: {text}"
        );
        sb.shutdown().await
    })
    .await
}

/// Two daemons sharing a fleet name (two runner hosts): an unknown instance with this
/// daemon's id (read from its state dir) is reaped past the grace; one tagged by another
/// daemon is listed by `flotilla audit` with why, and terminated neither by the reconcile
/// loop nor by `audit --terminate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_daemons_instance_is_reported_and_never_terminated() -> Result<()> {
    use flotilla_proto::tags;
    use flotilla_sandbox::moto::{instance_state, launch_instance};
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            orphan_grace: Duration::from_secs(2),
            ..Default::default()
        })
        .await?;
        let path = sb.state_dir().join("daemon-id");
        let ours = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned();
        ensure!(ours.starts_with("d-"), "daemon id {ours:?}");
        let mine = launch_instance(
            sb.ec2(),
            &sb.network,
            &[
                (tags::FLEET, &sb.fleet),
                (tags::DAEMON, &ours),
                (tags::MACHINE, "m-mine"),
            ],
            None,
        )
        .await?;
        let theirs = launch_instance(
            sb.ec2(),
            &sb.network,
            &[
                (tags::FLEET, &sb.fleet),
                (tags::DAEMON, "d-another-host"),
                (tags::MACHINE, "m-theirs"),
            ],
            None,
        )
        .await?;
        wait_until(
            "our own orphan to be reaped",
            Duration::from_secs(60),
            POLL,
            || async {
                let s = instance_state(sb.ec2(), &mine).await?;
                Ok((s == "terminated" || s == "shutting-down").then_some(()))
            },
        )
        .await?;
        ensure!(
            instance_state(sb.ec2(), &theirs).await? == "running",
            "another daemon's instance was terminated"
        );
        let (code, out, err) = flotilla(&sb, &["audit", "--json"]).await?;
        ensure!(code == 0, "flotilla audit --json exited {code}: {err}");
        let audit: AuditResponse = serde_json::from_str(&out)?;
        let e = audit
            .entries
            .iter()
            .find(|e| e.instance_id == theirs)
            .with_context(|| format!("audit does not list {theirs}: {:#?}", audit.entries))?;
        ensure!(
            e.reason.contains("another daemon (id d-another-host)")
                && e.reason.contains("not ours to terminate")
                && e.reason.contains(&sb.fleet)
                && e.reap_at.is_none(),
            "audit entry {e:#?}"
        );
        let (code, text, err) = flotilla(&sb, &["audit", "--terminate"]).await?;
        ensure!(
            code == 0 && text.contains(&theirs) && !text.contains(&format!("terminated {theirs}")),
            "flotilla audit --terminate exited {code}: {text}{err}"
        );
        sb.wait_reconciles(3).await?;
        ensure!(
            instance_state(sb.ec2(), &theirs).await? == "running",
            "audit --terminate terminated another daemon's instance"
        );
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_lets_the_running_job_finish_then_ends_with_no_machines() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 2,
            max_machines: 3,
            metrics: true,
            ..Default::default()
        })
        .await?;
        wait_idle(&sb, "default", 2, Duration::from_secs(90)).await?;
        let task = spawn_job(&sb, Job::new(451, &[HOLD, "echo finished-while-draining"]));
        let (machine, container) =
            wait_for_job_process(&sb, 451, HELD, Duration::from_secs(60)).await?;

        // The job is held until the drain is in force and has taken every machine but
        // the job's; then it may finish, and the drain with it.
        let drain_started = Instant::now();
        let drain = tokio::time::timeout(
            Duration::from_secs(180),
            flotilla(&sb, &["drain", "--wait"]),
        );
        let release = async {
            wait_until(
                "the drain to leave only the job's machine",
                Duration::from_secs(90),
                POLL,
                || async {
                    let s = status(&sb).await?;
                    Ok((s.draining
                        && s.machines.len() == 1
                        && s.machines[0].instance_id == machine.instance_id)
                        .then_some(()))
                },
            )
            .await
            .with_context(|| sb.diagnostics())?;
            ensure!(!task.is_finished(), "the held job ended before the drain");
            let_go(&machine, &container).await
        };
        let (drained, released) = tokio::join!(drain, release);
        released?;
        let (code, out, err) = drained.context("drain --wait did not return within 180 s")??;
        let drained_after = drain_started.elapsed();
        ensure!(
            code == 0 && out.contains("drained: no machines left"),
            "flotilla drain --wait exited {code}:\n{out}{err}\n{}",
            sb.diagnostics()
        );
        let r = task.await??;
        ensure!(
            r.outcome == Outcome::Success && r.cleanup_exit == Some(0),
            "the job running during the drain:\n{}",
            r.describe()
        );
        let live: Vec<_> = fleet(&sb)
            .await?
            .into_iter()
            .filter(Instance::live)
            .collect();
        ensure!(live.is_empty(), "still running after the drain: {live:#?}");
        let s = status(&sb).await?;
        ensure!(s.draining && s.machines.is_empty(), "status: {s:#?}");
        // Draining launches nothing, and no new job gets a machine.
        let m = scrape(&sb).await?;
        let launched = m.sum("flotilla_launches_total", &[]);
        let drained = m.get("flotilla_terminations_total", &[("reason", "drained")]);
        ensure!(
            drained == Some(launched),
            "launched {launched}, drained {drained:?}"
        );
        let mut opts = sb.runner_options();
        opts.prepare_attempts = 1;
        let r = runner::run_job(opts, Job::new(452, &["echo must-not-run"])).await?;
        ensure!(
            matches!(&r.outcome, Outcome::SystemFailure { stage, .. } if stage == "prepare")
                && r.stage("prepare")
                    .is_some_and(|p| p.stderr.contains("drain")),
            "a job during the drain:\n{}",
            r.describe()
        );
        eprintln!("drain --wait returned after {drained_after:?}");
        sb.shutdown().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_match_what_happened() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            ec2_proxy: true,
            metrics: true,
            max_builds: 1,
            ..Default::default()
        })
        .await?;
        let text = sb.metrics().await?;
        ensure!(text.ends_with("# EOF\n"), "no # EOF terminator:\n{text}");
        prom::parse(&text)?;

        // Mid-job: one machine leased, one lease, as the daemon's status says.
        // Held until the mid-job numbers are read.
        let task = spawn_job(&sb, Job::new(461, &[HOLD]));
        let (machine, container) =
            wait_for_job_process(&sb, 461, HELD, Duration::from_secs(90)).await?;
        let m = scrape(&sb).await?;
        let s = status(&sb).await?;
        for state in [
            MachineState::Booting,
            MachineState::Idle,
            MachineState::Leased,
            MachineState::Broken,
            MachineState::Terminating,
        ] {
            let want = s.machines.iter().filter(|x| x.state == state).count() as f64;
            let got = m.get(
                "flotilla_machines",
                &[("class", "default"), ("state", state.as_str())],
            );
            ensure!(
                got == Some(want),
                "machines{{state={}}}: /metrics {got:?}, status {want}",
                state.as_str()
            );
        }
        ensure!(
            m.get(
                "flotilla_machines",
                &[("class", "default"), ("state", "leased")]
            ) == Some(1.0)
                && m.get("flotilla_leases", &[]) == Some(1.0),
            "mid-job gauges: {:?}",
            m.by_label("flotilla_machines", "state")
        );
        let_go(&machine, &container).await?;
        let r = task.await??;
        ensure!(r.outcome == Outcome::Success, "{}", r.describe());
        successful_job(&sb, 462).await?;

        // max_builds = 1: two jobs, two machines launched, two terminated for max_builds.
        sb.wait_instances("both machines terminated", Duration::from_secs(60), |l| {
            l.len() == 2 && l.iter().all(|i| i.is_terminated())
        })
        .await?;
        wait_until(
            "the pool to empty",
            Duration::from_secs(30),
            POLL,
            || async { Ok(status(&sb).await?.machines.is_empty().then_some(())) },
        )
        .await?;
        let m = ec2_calls_agree(&sb).await?;
        let faults = proxy(&sb)?;
        let forwarded = faults.forwarded();
        let run_instances = forwarded.get("RunInstances").copied().unwrap_or(0);
        ensure!(
            m.sum("flotilla_launches_total", &[]) == 2.0 && run_instances == 2,
            "launches_total {}, RunInstances {run_instances}",
            m.sum("flotilla_launches_total", &[])
        );
        ensure!(
            m.by_label("flotilla_terminations_total", "reason")
                == BTreeMap::from([("max_builds".to_string(), 2.0)]),
            "terminations_total: {:?}",
            m.by_label("flotilla_terminations_total", "reason")
        );
        ensure!(
            m.sum("flotilla_machines", &[]) == 0.0 && m.get("flotilla_leases", &[]) == Some(0.0),
            "gauges after the jobs: {:?}",
            m.by_label("flotilla_machines", "state")
        );
        ensure!(
            m.get("flotilla_lease_wait_seconds_count", &[]) == Some(2.0)
                && m.get("flotilla_boot_seconds_count", &[]) == Some(2.0),
            "lease_wait count {:?}, boot count {:?}",
            m.get("flotilla_lease_wait_seconds_count", &[]),
            m.get("flotilla_boot_seconds_count", &[])
        );
        ensure!(
            m.sum("flotilla_launch_failures_total", &[]) == 0.0
                && m.sum("flotilla_ec2_throttles_total", &[]) == 0.0,
            "failures or throttles without faults"
        );
        ensure!(
            m.sum("flotilla_machine_seconds_total", &[("class", "default")]) > 0.0,
            "no machine time accounted"
        );
        sb.shutdown().await
    })
    .await
}

/// SIGTERM with `on_shutdown = "keep"` (the default) leaves the idle machine running and
/// the next daemon adopts it; with `"terminate"` SIGTERM terminates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_idle_machines_by_default_and_terminates_them_when_configured() -> Result<()>
{
    bounded(Duration::from_secs(300), async {
        let mut sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            ..SandboxOptions::default()
        })
        .await?;
        let kept = one_idle_machine(&sb).await?;
        sb.kill_daemon(Signal::SIGTERM).await?;
        let after_keep = sb.instances().await?;
        ensure!(
            after_keep
                .iter()
                .any(|i| i.instance_id == kept && i.is_running()),
            "on_shutdown keep terminated the idle machine: {after_keep:?}\n{}",
            sb.diagnostics()
        );

        let mut config = sb.config.clone();
        config.on_shutdown = flotilla_proto::config::ShutdownPolicy::Terminate;
        std::fs::write(&sb.config_path, config.to_toml()?)?;
        sb.start_daemon().await?;
        let adopted = one_idle_machine(&sb).await?;
        ensure!(
            adopted == kept,
            "the restarted daemon did not adopt the kept machine ({kept}), it has {adopted}\n{}",
            sb.diagnostics()
        );
        sb.kill_daemon(Signal::SIGTERM).await?;
        sb.wait_instances(
            "the idle machine terminated at shutdown",
            Duration::from_secs(30),
            |list| list.iter().all(|i| i.is_terminated()),
        )
        .await
        .with_context(|| sb.diagnostics())?;
        sb.shutdown().await
    })
    .await
}

/// Waits for an idle machine; returns its instance id.
async fn one_idle_machine(sb: &Sandbox) -> Result<String> {
    wait_until(
        "one idle machine",
        Duration::from_secs(90),
        POLL,
        || async {
            let st = status(sb).await?;
            Ok(st
                .machines
                .iter()
                .find(|m| m.state == MachineState::Idle)
                .map(|m| m.instance_id.clone()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_root_volume_hop_limit_and_public_ip_reach_ec2() -> Result<()> {
    use flotilla_proto::config::{LaunchTemplateRef, RootVolume, VolumeKind};
    bounded(Duration::from_secs(300), async {
        let mut sb = Sandbox::start(SandboxOptions {
            ec2_proxy: true,
            start_daemon: false,
            idle_count: 1,
            extra_classes: vec![(
                "tuned".into(),
                ClassConfig {
                    idle_count: 1,
                    max_machines: 1,
                    imds_hop_limit: 2,
                    public_ip: true,
                    launch_template: Some(LaunchTemplateRef {
                        name: Some("operators-ci".into()),
                        id: None,
                        version: "$Latest".into(),
                    }),
                    root_volume: Some(RootVolume {
                        gb: Some(64),
                        kind: VolumeKind::Gp3,
                        iops: Some(6000),
                        throughput: Some(500),
                        kms_key: Some("alias/flotilla-ci".into()),
                    }),
                    forecast: flotilla_proto::config::ForecastConfig {
                        enabled: false,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )],
            ..Default::default()
        })
        .await?;
        // The operator's template: a key pair and a tag, which Flotilla does not model,
        // and an instance type Flotilla's own setting must override.
        let template_id = plant_operator_template(&sb, "operators-ci").await?;
        sb.start_daemon().await?;
        wait_idle(&sb, "tuned", 1, Duration::from_secs(90)).await?;
        wait_idle(&sb, "default", 1, Duration::from_secs(90)).await?;
        let all = fleet(&sb).await?;
        let tuned = all
            .iter()
            .find(|i| i.class.as_deref() == Some("tuned"))
            .context("no instance of class tuned in moto")?;
        let resp = sb
            .ec2()
            .describe_instances()
            .instance_ids(&tuned.id)
            .send()
            .await
            .context("DescribeInstances in moto")?;
        let inst = resp
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .next()
            .context("moto lists no such instance")?;
        let hops = inst
            .metadata_options()
            .and_then(|m| m.http_put_response_hop_limit());
        ensure!(hops == Some(2), "hop limit in moto: {hops:?}");
        let tokens = inst
            .metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str().to_owned());
        ensure!(
            tokens.as_deref() == Some("required"),
            "IMDSv2 stays required: {tokens:?}"
        );
        ensure!(
            inst.public_ip_address().is_some(),
            "public_ip = true, but moto gave the instance no public address: {inst:#?}"
        );
        let tag = |k: &str| {
            inst.tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
                .map(str::to_owned)
        };
        ensure!(
            inst.key_name() == Some("operators-key")
                && tag("Team").as_deref() == Some("platform")
                && tag("aws:ec2launchtemplate:id").as_deref() == Some(template_id.as_str()),
            "the template's key pair and tag reach the machine: {inst:#?}"
        );
        ensure!(
            tag(flotilla_proto::tags::CLASS).as_deref() == Some("tuned")
                && inst.instance_type().map(|t| t.as_str()) != Some("m5.24xlarge"),
            "Flotilla's own settings override the template's: {inst:#?}"
        );
        let volumes = sb
            .ec2()
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name("attachment.instance-id")
                    .values(&tuned.id)
                    .build(),
            )
            .send()
            .await
            .context("DescribeVolumes in moto")?;
        let root = volumes
            .volumes()
            .first()
            .context("moto lists no volume for the instance")?;
        ensure!(
            root.size() == Some(64)
                && root.volume_type().map(|t| t.as_str()) == Some("gp3")
                && root.encrypted() == Some(true)
                && root.kms_key_id() == Some("alias/flotilla-ci"),
            "the root volume in moto: {root:#?}"
        );
        // moto does not model a launch's IOPS and throughput: check them as sent.
        let calls = proxy(&sb)?.calls();
        let launch = calls
            .iter()
            .find(|c| {
                c.action == "RunInstances"
                    && c.param("TagSpecification.1.Tag.2.Value") == Some("tuned")
            })
            .context("no RunInstances for class tuned went through the proxy")?;
        ensure!(
            launch.param("BlockDeviceMapping.1.Ebs.Iops") == Some("6000")
                && launch.param("BlockDeviceMapping.1.Ebs.Throughput") == Some("500"),
            "the launch asked for {launch:#?}"
        );
        // The default class keeps the defaults: hop limit 1, no public address.
        let default = all.iter().find(|i| i.class.as_deref() == Some("default"));
        if let Some(d) = default {
            let resp = sb
                .ec2()
                .describe_instances()
                .instance_ids(&d.id)
                .send()
                .await?;
            let i = resp
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .next()
                .context("default instance")?;
            ensure!(
                i.metadata_options()
                    .and_then(|m| m.http_put_response_hop_limit())
                    == Some(1)
                    && i.public_ip_address().is_none(),
                "the default class's instance: {i:#?}"
            );
        }
        sb.shutdown().await
    })
    .await
}

/// An operator's launch template in moto: a key pair, a tag and an instance type.
async fn plant_operator_template(sb: &Sandbox, name: &str) -> Result<String> {
    use aws_sdk_ec2::types::{
        LaunchTemplateTagSpecificationRequest, RequestLaunchTemplateData, ResourceType, Tag,
    };
    let out = sb
        .ec2()
        .create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .key_name("operators-key")
                .instance_type(aws_sdk_ec2::types::InstanceType::M524xlarge)
                .tag_specifications(
                    LaunchTemplateTagSpecificationRequest::builder()
                        .resource_type(ResourceType::Instance)
                        .tags(Tag::builder().key("Team").value("platform").build())
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .context("CreateLaunchTemplate in moto")?;
    out.launch_template()
        .and_then(|t| t.launch_template_id())
        .map(str::to_owned)
        .context("moto returned no launch template id")
}

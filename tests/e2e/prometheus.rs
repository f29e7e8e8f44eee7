//! The observability kit checked by a real Prometheus (issue 13): Debian's `prometheus`
//! scrapes a sandbox daemon every second with `observability/`'s rule files loaded while a
//! job runs, and what it stored and evaluated is asserted through its HTTP API: the lease
//! gauge went to 1 and back to 0, launches were counted, the target is up, every rule
//! loaded and evaluates cleanly (none firing on a healthy fleet), only metric names the
//! kit knows were stored, and every dashboard query runs (with data where the job made
//! some, the cost of the machine included).
//!
//! Every wait is for an event seen through the API (a scrape with a given value after a
//! given time); the job holds its lease until the test has seen it in Prometheus.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use flotilla_sandbox::kit::{self, RuleKind};
use flotilla_sandbox::prometheus::{Prometheus, Sample};
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{docker_on, promql, Job, Outcome, Sandbox, SandboxOptions};

use crate::common::{bounded, wait_for_job_process, POLL};
use crate::observability::known_names;

/// The scrape job, as the alert rules expect it (`up{job="flotilla"}`).
const JOB: &str = "flotilla";
const JOB_ID: u64 = 1301;
/// The job's build script waits for this file (the test creates it once Prometheus has
/// seen the lease), at most two minutes.
const GO_FILE: &str = "/tmp/flotilla-go";

/// Dashboard panels that have no data after one successful job on a healthy fleet.
const EMPTY_PANELS: &[&str] = &[
    "Launch failures by class and reason",
    "EC2 throttles by operation",
    "Instance types without a price",
    "Images prefetched onto new machines",
];

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Polls an instant query until it returns something.
async fn wait_for(
    prom: &Prometheus,
    what: &str,
    expr: &str,
    timeout: Duration,
) -> Result<Vec<Sample>> {
    wait_until(what, timeout, POLL, || async {
        let r = prom.query(expr, None).await?;
        Ok((!r.is_empty()).then_some(r))
    })
    .await
    .with_context(|| format!("query {expr}"))
}

/// The one sample's value.
fn single(samples: &[Sample], expr: &str) -> Result<f64> {
    match samples {
        [s] => Ok(s.value),
        _ => bail!("{expr}: expected one sample, got {samples:?}"),
    }
}

/// Waits until the job's build script is polling for [`GO_FILE`], then creates it in that
/// container.
async fn release_job(sb: &Sandbox) -> Result<()> {
    let (m, id) = wait_for_job_process(sb, JOB_ID, "sleep 0.1", Duration::from_secs(120)).await?;
    docker_on(&m, &["exec", &id, "touch", GO_FILE]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_daemon_through_a_job_and_loads_the_kit() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let started = Instant::now();
        // A short idle_time: the machine is terminated soon after the job, so the
        // terminations counter has data too.
        let sb = Sandbox::start(SandboxOptions {
            metrics: true,
            idle_time: Duration::from_secs(3),
            ..Default::default()
        })
        .await?;
        let url = sb.metrics_url().context("the sandbox has no metrics URL")?;
        let target = url
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_owned();
        let dir = tempfile::Builder::new().prefix("flt-prom-").tempdir()?;
        let prom = Prometheus::start(dir.path(), JOB, &[target], &kit::rule_files()).await?;
        check(&sb, &prom).await.with_context(|| {
            format!(
                "--- prometheus log (tail)\n{}\n{}",
                prom.log_tail(),
                sb.diagnostics()
            )
        })?;
        eprintln!(
            "prometheus e2e: done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })
    .await
}

async fn check(sb: &Sandbox, prom: &Prometheus) -> Result<()> {
    let up = format!(r#"up{{job="{JOB}"}} == 1"#);
    wait_for(
        prom,
        "the daemon's target to be up",
        &up,
        Duration::from_secs(30),
    )
    .await?;
    let leases = format!(r#"flotilla_leases{{job="{JOB}"}}"#);
    let idle = format!("timestamp({leases} == 0)");
    let before = single(
        &wait_for(
            prom,
            "a scrape with no lease",
            &idle,
            Duration::from_secs(30),
        )
        .await?,
        &idle,
    )?;

    // A job that holds its lease until Prometheus has scraped it.
    let script = format!(
        r#"i=0; while [ ! -e {GO_FILE} ] && [ "$i" -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; echo "released after $i polls""#
    );
    let task = tokio::spawn(flotilla_sandbox::runner::run_job(
        sb.runner_options(),
        Job::new(JOB_ID, &[&script]),
    ));
    let leased_expr = format!("timestamp({leases} == 1)");
    wait_until(
        "Prometheus to scrape the job's lease",
        Duration::from_secs(150),
        POLL,
        || async {
            if task.is_finished() {
                bail!("the job ended before Prometheus saw its lease");
            }
            let r = prom.query(&leased_expr, None).await?;
            Ok((!r.is_empty()).then_some(()))
        },
    )
    .await?;
    release_job(sb).await?;
    let r = task.await??;
    ensure!(
        r.outcome == Outcome::Success && r.cleanup_exit == Some(0),
        "job {JOB_ID}:\n{}",
        r.describe()
    );
    let ended = now();
    let after_expr = format!(
        r#"{idle} > {ended:.3} and on () sum(flotilla_terminations_total{{job="{JOB}"}}) >= 1"#
    );
    let after = single(
        &wait_for(
            prom,
            "a scrape after the job with no lease, and the idle machine terminated",
            &after_expr,
            Duration::from_secs(60),
        )
        .await?,
        &after_expr,
    )?;

    // The lease gauge over the job: 0, then 1, then 0 again.
    let series = prom
        .query_range(&leases, before, after, Duration::from_secs(1))
        .await?;
    let values: Vec<f64> = match series.as_slice() {
        [s] => s.values.iter().map(|(_, v)| *v).collect(),
        _ => bail!("query_range {leases}: expected one series, got {series:?}"),
    };
    let first_one = values.iter().position(|v| *v == 1.0);
    let last_one = values.iter().rposition(|v| *v == 1.0);
    ensure!(
        values.first() == Some(&0.0)
            && values.last() == Some(&0.0)
            && first_one.is_some()
            && last_one < Some(values.len() - 1)
            && values.iter().all(|v| *v == 0.0 || *v == 1.0),
        "{leases} from {before} to {after} is not 0, then 1, then 0: {values:?}"
    );
    let window = format!("{}s", (after - before).ceil() as u64 + 1);
    for (f, want) in [("max_over_time", 1.0), ("min_over_time", 0.0)] {
        let expr = format!("{f}({leases}[{window}])");
        let got = single(&prom.query(&expr, Some(after)).await?, &expr)?;
        ensure!(got == want, "{expr} = {got}, expected {want}");
    }
    for expr in [
        format!(r#"sum(flotilla_launches_total{{job="{JOB}"}}) >= 1"#),
        format!(r#"sum(flotilla_boot_seconds_count{{job="{JOB}"}}) >= 1"#),
        format!(r#"sum(flotilla_lease_wait_seconds_count{{job="{JOB}"}}) >= 1"#),
        up.clone(),
    ] {
        ensure!(
            !prom.query(&expr, Some(after)).await?.is_empty(),
            "{expr} is empty at {after}"
        );
    }

    check_rules(prom).await?;
    check_stored_names(prom).await?;
    // Two more scrapes, so the counters born with the termination have a rate too.
    let later_expr = format!("timestamp({leases}) > {:.3}", after + 2.0);
    let later = single(
        &wait_for(
            prom,
            "two more scrapes",
            &later_expr,
            Duration::from_secs(30),
        )
        .await?,
        &later_expr,
    )?;
    let window = format!("{}s", (later - before).ceil() as u64 + 1);
    check_dashboard_queries(prom, &window, later).await
}

/// Every rule of the kit loaded, evaluated without error, selecting known names; no alert
/// fires on this healthy fleet.
async fn check_rules(prom: &Prometheus) -> Result<()> {
    let mut want = (BTreeSet::new(), BTreeSet::new());
    for file in [kit::ALERT_RULES, kit::PRICE_RULES] {
        for r in kit::rules(&kit::read(file)?)? {
            match r.kind {
                RuleKind::Alert => want.0.insert(r.name),
                RuleKind::Record => want.1.insert(r.name),
            };
        }
    }
    let groups = wait_until(
        "every rule evaluated",
        Duration::from_secs(30),
        POLL,
        || async {
            let data = prom.api("rules", &[]).await?;
            let groups = data["groups"].as_array().cloned().unwrap_or_default();
            let evaluated = !groups.is_empty()
                && groups
                    .iter()
                    .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                    .all(|r| {
                        r["lastEvaluation"]
                            .as_str()
                            .is_some_and(|t| !t.starts_with("0001-"))
                    });
            Ok(evaluated.then_some(groups))
        },
    )
    .await?;
    let known = known_names()?;
    let mut got = (BTreeSet::new(), BTreeSet::new());
    for g in &groups {
        for r in g["rules"].as_array().into_iter().flatten() {
            let name = r["name"].as_str().unwrap_or_default().to_owned();
            ensure!(
                r["health"] == "ok",
                "rule {name} of group {}: health {} {}",
                g["name"],
                r["health"],
                r["lastError"]
            );
            let query = r["query"].as_str().unwrap_or_default();
            let refs = promql::refs(query).with_context(|| format!("rule {name}: {query}"))?;
            let unknown: Vec<_> = refs.metrics.difference(&known).collect();
            ensure!(unknown.is_empty(), "rule {name} selects {unknown:?}");
            match r["type"].as_str() {
                Some("alerting") => got.0.insert(name),
                Some("recording") => got.1.insert(name),
                other => bail!("rule {name} of type {other:?}"),
            };
        }
    }
    ensure!(
        got == want,
        "Prometheus loaded alerts {:?} and records {:?}; the files have {:?} and {:?}",
        got.0,
        got.1,
        want.0,
        want.1
    );
    let alerts = prom.api("alerts", &[]).await?;
    let firing: Vec<_> = alerts["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == "firing")
        .collect();
    ensure!(
        firing.is_empty(),
        "alerts fire on a healthy sandbox: {firing:?}"
    );
    Ok(())
}

/// What Prometheus stored from the daemon is exactly what the kit knows it exports.
async fn check_stored_names(prom: &Prometheus) -> Result<()> {
    let data = prom.api("label/__name__/values", &[]).await?;
    let stored: BTreeSet<String> = data
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .filter(|n| n.starts_with("flotilla_"))
        .map(str::to_owned)
        .collect();
    let exported = kit::exported_names()?;
    let unknown: Vec<_> = stored.difference(&exported).collect();
    ensure!(
        unknown.is_empty(),
        "Prometheus stored {unknown:?}, which the kit does not know the daemon exports"
    );
    for n in [
        "flotilla_machines",
        "flotilla_leases",
        "flotilla_waiting_requests",
        "flotilla_launches_total",
        "flotilla_terminations_total",
        "flotilla_ec2_calls_total",
        "flotilla_machine_seconds_total",
        "flotilla_boot_seconds_bucket",
        "flotilla_lease_wait_seconds_bucket",
        "flotilla_machines_lost_total",
        "flotilla_orphans_reaped_total",
    ] {
        ensure!(
            stored.contains(n),
            "{n} was never stored; stored: {stored:?}"
        );
    }
    Ok(())
}

/// Every dashboard query, its variables filled in as Grafana would with "All", runs at
/// `at` over the test's `window`; panels with data have some, the cost included.
async fn check_dashboard_queries(prom: &Prometheus, window: &str, at: f64) -> Result<()> {
    let text = kit::read(kit::DASHBOARD)?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    for q in kit::queries(&dashboard)? {
        let expr = kit::substitute(&q.expr, JOB, window);
        let got = prom
            .query(&expr, Some(at))
            .await
            .with_context(|| format!("panel {:?} query {}", q.panel, q.ref_id))?;
        let empty_ok = EMPTY_PANELS.contains(&q.panel.as_str());
        ensure!(
            got.is_empty() == empty_ok,
            "panel {:?} query {} ({expr}) at {at}: {got:?}",
            q.panel,
            q.ref_id
        );
        if q.panel == "Cost per class" {
            ensure!(
                got.iter().any(|s| s.labels.get("class").map(String::as_str)
                    == Some(flotilla_sandbox::sandbox::CLASS)
                    && s.value > 0.0),
                "no cost for the class that ran the job: {got:?}"
            );
        }
    }
    Ok(())
}

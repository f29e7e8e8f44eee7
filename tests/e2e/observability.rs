//! The observability kit in `observability/` (issue 13): the Grafana dashboard is valid,
//! importable JSON whose every query selects only metrics the daemon exports (or the price
//! series flotilla.prices.yml records), filtered by the dashboard's job and instance
//! variables, and every exported family is on it; the alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`), which test every alert firing and
//! not firing; every alert has a `for:`, a severity and annotations, and the README
//! explains it. No sandbox: these need only promtool (Debian's `prometheus`).
//!
//! That a real Prometheus loads the rules and runs the dashboard's queries against a
//! live daemon is `prometheus::prometheus_scrapes_the_daemon_through_a_job_and_loads_the_kit`.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use flotilla_sandbox::kit::{self, RuleKind};
use flotilla_sandbox::promql;
use serde_json::Value;

/// Grafana's own variables a query may use.
const BUILT_INS: &[&str] = &["__rate_interval", "__interval", "__range"];

/// The names a query or rule may select: what the daemon exports, what the rule files
/// record, and Prometheus's own `up`.
pub fn known_names() -> Result<BTreeSet<String>> {
    let mut names = kit::exported_names()?;
    for file in [kit::ALERT_RULES, kit::PRICE_RULES] {
        for r in kit::rules(&kit::read(file)?)? {
            if r.kind == RuleKind::Record {
                names.insert(r.name);
            }
        }
    }
    names.insert("up".into());
    Ok(names)
}

fn dashboard() -> Result<Value> {
    let text = kit::read(kit::DASHBOARD)?;
    serde_json::from_str(&text).context("flotilla.dashboard.json is not JSON")
}

fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(kit::dir())
        .output()
        .context(
            "running promtool (apt-get install --no-install-recommends prometheus; \
             scripts/test installs it)",
        )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "promtool {} exited {}:\n{text}",
        args.join(" "),
        out.status
    );
    Ok(text)
}

#[test]
fn dashboard_is_importable_and_queries_only_exported_metrics() -> Result<()> {
    let d = dashboard()?;
    ensure!(
        d["id"].is_null() && d["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "an importable dashboard has a uid and no database id: id {} uid {}",
        d["id"],
        d["uid"]
    );
    ensure!(d["title"] == "Flotilla" && d["schemaVersion"].is_u64());

    // Variables: a Prometheus data source, then job and instance (and class) from it.
    let vars = d["templating"]["list"]
        .as_array()
        .context("no templating list")?;
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").context("no datasource variable")?;
    ensure!(
        ds["type"] == "datasource" && ds["query"] == "prometheus",
        "datasource variable: {ds}"
    );
    for name in ["job", "instance", "class"] {
        let v = var(name).with_context(|| format!("no {name} variable"))?;
        ensure!(
            v["type"] == "query" && v["datasource"]["uid"] == "${datasource}",
            "{name} variable does not query the datasource variable: {v}"
        );
        // label_values(<selector>, <label>)
        let q = v["query"].as_str().unwrap_or_default();
        let selector = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(','))
            .map(|(s, _)| s)
            .with_context(|| format!("{name} variable query {q:?} is not label_values"))?;
        let refs =
            promql::refs(selector).with_context(|| format!("{name} variable query {q:?}"))?;
        ensure!(
            refs.metrics.iter().all(|m| m.starts_with("flotilla_")),
            "{name} variable queries {:?}",
            refs.metrics
        );
    }
    let defined = kit::variables(&d);

    // Panels: unique ids, on the 24-column grid, every query through ${datasource}.
    let exported = kit::exported_names()?;
    let known = known_names()?;
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for p in kit::panels(&d)? {
        let title = p["title"].as_str().unwrap_or_default();
        ensure!(
            ids.insert(p["id"].as_u64().context("panel without a numeric id")?),
            "panel id {} twice",
            p["id"]
        );
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        ensure!(
            matches!((x, w, h), (Some(x), Some(w), Some(h)) if x + w <= 24 && w > 0 && h > 0)
                && g["y"].is_u64(),
            "panel {title:?}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "panel {title:?} does not use the datasource variable"
        );
        let targets = p["targets"].as_array().context("panel without targets")?;
        ensure!(!targets.is_empty(), "panel {title:?} has no query");
        let ref_ids: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
        ensure!(
            ref_ids.len() == targets.len(),
            "panel {title:?}: refIds missing or repeated"
        );
        for t in targets {
            ensure!(
                t["datasource"]["uid"] == "${datasource}",
                "panel {title:?}: a target does not use the datasource variable"
            );
        }
    }
    for q in kit::queries(&d)? {
        let at = format!("panel {:?} query {}: {}", q.panel, q.ref_id, q.expr);
        let refs = promql::refs(&q.expr).with_context(|| at.clone())?;
        ensure!(!refs.metrics.is_empty(), "{at}: selects no metric");
        let unknown: Vec<_> = refs.metrics.difference(&known).collect();
        ensure!(
            unknown.is_empty(),
            "{at}: selects {unknown:?}, which the daemon does not export"
        );
        for v in &refs.variables {
            ensure!(
                defined.contains(v) || BUILT_INS.contains(&v.as_str()),
                "{at}: uses ${v}, which the dashboard does not define"
            );
        }
        // Every selector of a daemon metric is filtered by the job and instance variables.
        for m in refs.metrics.intersection(&exported) {
            for (i, _) in q.expr.match_indices(m.as_str()) {
                let after = &q.expr[i + m.len()..];
                if after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                    continue; // a longer name
                }
                ensure!(
                    after.starts_with(r#"{job=~"$job", instance=~"$instance""#),
                    "{at}: {m} is not filtered by $job and $instance"
                );
            }
        }
        used.extend(refs.metrics);
    }

    // Every family the daemon exports is on the dashboard.
    for (family, kind) in kit::exported_families()? {
        ensure!(
            used.iter().any(|n| n == &family
                || n.strip_prefix(family.as_str())
                    .is_some_and(|s| ["_total", "_bucket", "_count", "_sum"].contains(&s))),
            "{kind} {family} is exported but on no panel"
        );
    }
    let exprs: Vec<String> = kit::queries(&d)?.into_iter().map(|q| q.expr).collect();
    for hist in [
        "flotilla_lease_wait_seconds_bucket",
        "flotilla_boot_seconds_bucket",
    ] {
        ensure!(
            exprs
                .iter()
                .any(|e| e.contains("histogram_quantile(") && e.contains(hist)),
            "no quantiles of {hist}"
        );
    }
    ensure!(
        exprs
            .iter()
            .any(|e| e.contains("flotilla_machine_seconds_total")
                && e.contains("group_left flotilla:instance_price_per_hour")),
        "no cost panel joining machine seconds with the prices"
    );
    Ok(())
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() -> Result<()> {
    let out = promtool(&["check", "rules", kit::ALERT_RULES, kit::PRICE_RULES])?;
    ensure!(
        !out.contains("WARNING"),
        "promtool check rules warns:\n{out}"
    );
    promtool(&["test", "rules", kit::RULE_TESTS])?;

    // Every alert is unit-tested both firing and not firing.
    let text = kit::read(kit::ALERT_RULES)?;
    let alerts: Vec<String> = kit::rules(&text)?
        .into_iter()
        .filter(|r| r.kind == RuleKind::Alert)
        .map(|r| r.name)
        .collect();
    let tested = kit::alert_tests(&kit::read(kit::RULE_TESTS)?)?;
    for a in &alerts {
        ensure!(
            tested.get(a) == Some(&(true, true)),
            "{a} is not tested both firing and not firing in {}: {:?}",
            kit::RULE_TESTS,
            tested.get(a)
        );
    }
    for a in tested.keys() {
        ensure!(
            alerts.contains(a),
            "{} tests {a}, which is no alert",
            kit::RULE_TESTS
        );
    }

    // Each alert waits (`for:`), has a severity the README explains, says what to check,
    // and the README's Observability section explains it.
    let readme = std::fs::read_to_string(kit::dir().join("../README.md"))?;
    let section = readme
        .split("\n## Observability")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .context("README.md has no Observability section")?;
    let items = kit::alert_items(&text);
    for a in &alerts {
        let item = &items[a];
        for key in ["for:", "severity:", "summary:", "description:"] {
            ensure!(
                item.lines().any(|l| l.trim_start().starts_with(key)),
                "alert {a} has no {key}"
            );
        }
        ensure!(
            item.contains("severity: critical") || item.contains("severity: warning"),
            "alert {a}: severity is neither critical nor warning"
        );
        ensure!(
            section.contains(&format!("`{a}`")),
            "README's Observability section does not explain {a}"
        );
    }
    ensure!(
        alerts.len() >= 8,
        "expected the eight alerts of issue 13, got {alerts:?}"
    );
    Ok(())
}

#[test]
fn rules_select_only_exported_metrics() -> Result<()> {
    let known = known_names()?;
    for file in [kit::ALERT_RULES, kit::PRICE_RULES] {
        for r in kit::rules(&kit::read(file)?)? {
            let refs = promql::refs(&r.expr).with_context(|| format!("{file}: {}", r.name))?;
            let unknown: Vec<_> = refs.metrics.difference(&known).collect();
            ensure!(
                unknown.is_empty(),
                "{file}: {} selects {unknown:?}, which the daemon does not export",
                r.name
            );
            ensure!(
                refs.variables.is_empty(),
                "{file}: {} uses Grafana variables",
                r.name
            );
            if r.kind == RuleKind::Record {
                ensure!(
                    r.name.starts_with("flotilla:"),
                    "{file}: recorded {} is not in the flotilla: namespace",
                    r.name
                );
            }
        }
    }
    Ok(())
}

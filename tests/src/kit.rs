//! The observability kit in `observability/` as data, for the tests that check it: the
//! Grafana dashboard's queries and variables, the rule files' alerts and recording rules,
//! which alerts the promtool unit tests cover, and the metric names the daemon exports
//! (from `flotilla::metrics` itself, so they cannot drift from what it serves).
//!
//! The rule files are read by a deliberately small YAML reader that knows their layout
//! (`- alert:` or `- record:` before `expr:`, which is on one line or a `|`/`>` block);
//! promtool reads them for real, and the e2e test compares both readings through a real
//! Prometheus's `/api/v1/rules`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::prom;

pub const DASHBOARD: &str = "flotilla.dashboard.json";
pub const ALERT_RULES: &str = "flotilla.rules.yml";
pub const PRICE_RULES: &str = "flotilla.prices.yml";
pub const RULE_TESTS: &str = "flotilla.rules.test.yml";

/// `observability/` of this checkout.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("observability")
}

pub fn path(file: &str) -> PathBuf {
    dir().join(file)
}

pub fn read(file: &str) -> Result<String> {
    let p = path(file);
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

/// The rule files Prometheus loads (alerts, then prices).
pub fn rule_files() -> Vec<PathBuf> {
    vec![path(ALERT_RULES), path(PRICE_RULES)]
}

/// One query of a dashboard panel.
#[derive(Debug, Clone)]
pub struct Query {
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
}

/// Every panel of the dashboard, rows' nested panels included.
pub fn panels(dashboard: &Value) -> Result<Vec<&Value>> {
    let mut out = Vec::new();
    for p in dashboard["panels"]
        .as_array()
        .context("the dashboard has no panels array")?
    {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    Ok(out)
}

/// Every target expression of every non-row panel.
pub fn queries(dashboard: &Value) -> Result<Vec<Query>> {
    let mut out = Vec::new();
    for p in panels(dashboard)? {
        if p["type"] == "row" {
            continue;
        }
        let panel = p["title"].as_str().unwrap_or_default().to_owned();
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                panel: panel.clone(),
                ref_id: t["refId"].as_str().unwrap_or_default().to_owned(),
                expr: t["expr"].as_str().unwrap_or_default().to_owned(),
            });
        }
    }
    Ok(out)
}

/// The names of the dashboard's template variables.
pub fn variables(dashboard: &Value) -> BTreeSet<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

/// `expr` as Prometheus would run it for Grafana: every variable replaced (`$job` by
/// `job`, every other non-built-in variable by `.*` as the dashboard's "All", and the
/// built-in intervals `$__rate_interval`, `$__interval` and `$__range` by `range`).
pub fn substitute(expr: &str, job: &str, range: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", range)
        .replace("$__interval", range)
        .replace("$__range", range)
        .replace("$job", job);
    while let Some(at) = out.find('$') {
        let end = out[at + 1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(out.len(), |n| at + 1 + n);
        out.replace_range(at..end, ".*");
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    Alert,
    Record,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub kind: RuleKind,
    pub name: String,
    pub expr: String,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner.to_owned();
        }
    }
    s.to_owned()
}

/// The alerts and recording rules of a rule file, in order.
pub fn rules(text: &str) -> Result<Vec<Rule>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut current: Option<(RuleKind, String)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let item = line.trim_start().trim_start_matches("- ");
        if let Some(name) = item.strip_prefix("alert:") {
            current = Some((RuleKind::Alert, unquote(name)));
        } else if let Some(name) = item.strip_prefix("record:") {
            current = Some((RuleKind::Record, unquote(name)));
        } else if let Some(value) = item.strip_prefix("expr:") {
            let (kind, name) = current
                .take()
                .with_context(|| format!("line {}: expr: before alert: or record:", i + 1))?;
            let value = value.trim();
            let expr = if value.starts_with('|') || value.starts_with('>') {
                let key_indent = indent(line);
                let mut block = Vec::new();
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty() || indent(lines[i + 1]) > key_indent)
                {
                    i += 1;
                    block.push(lines[i].trim());
                }
                block.join("\n").trim().to_owned()
            } else {
                unquote(value)
            };
            ensure!(!expr.is_empty(), "line {}: empty expr of {name}", i + 1);
            out.push(Rule { kind, name, expr });
        }
        i += 1;
    }
    if let Some((_, name)) = current {
        bail!("rule {name} has no expr:");
    }
    Ok(out)
}

/// Each alert's whole list item (`- alert:` up to the next rule or group), by name, to
/// check its `for:`, labels and annotations.
pub fn alert_items(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in text.lines() {
        let t = line.trim_start();
        let starts_item =
            t.starts_with("- alert:") || t.starts_with("- record:") || t.starts_with("- name:");
        if starts_item {
            if let Some((name, lines)) = current.take() {
                out.insert(name, lines.join("\n"));
            }
            if let Some(name) = t.strip_prefix("- alert:") {
                current = Some((unquote(name), vec![line]));
            }
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line);
        }
    }
    if let Some((name, lines)) = current {
        out.insert(name, lines.join("\n"));
    }
    out
}

/// For each alert a promtool test file names: (tested firing, tested not firing).
pub fn alert_tests(text: &str) -> Result<BTreeMap<String, (bool, bool)>> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut out: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:") else {
            continue;
        };
        let exp = lines[i + 1..]
            .iter()
            .position(|l| l.starts_with("exp_alerts:"))
            .map(|n| i + 1 + n)
            .with_context(|| format!("line {}: alertname without exp_alerts", i + 1))?;
        let entry = out.entry(unquote(name)).or_default();
        if lines[exp].trim_start_matches("exp_alerts:").trim() == "[]" {
            entry.1 = true;
        } else if lines
            .get(exp + 1)
            .is_some_and(|l| l.starts_with("- exp_labels:"))
        {
            entry.0 = true;
        } else {
            bail!("line {}: exp_alerts neither [] nor a list", exp + 1);
        }
    }
    Ok(out)
}

/// The metric families `flotilla daemon` exports, with their types, read from the
/// exposition `flotilla::metrics` renders (its `# TYPE` lines) after one event of each
/// kind: a labelled family appears with its first sample. A new recording method of
/// `Metrics` is called here too (`every_registered_family_is_found` counts them).
pub fn exported_families() -> Result<BTreeMap<String, String>> {
    let m = flotilla::metrics::Metrics::new();
    m.launched("default", "t3.micro", "on-demand");
    m.launch_failed("default", "InsufficientInstanceCapacity");
    m.terminated("idle_timeout", 1);
    m.lost(1);
    m.orphans(1);
    m.ec2_call("DescribeInstances");
    m.ec2_throttled("DescribeInstances");
    m.machine_time("default", "t3.micro", 1.0);
    m.lease_wait.observe(1.0);
    m.boot_time.observe(1.0);
    m.prefetched("pulled");
    let mut pool = flotilla::pool::Pool::default();
    pool.add_waiter("default");
    let text = m.render(&pool, &[("default", 1)]);
    Ok(prom::parse(&text)
        .context("the daemon's exposition does not parse")?
        .types)
}

/// The series names Prometheus stores for those families (`_total` for counters,
/// `_bucket`, `_sum`, `_count` for histograms).
pub fn exported_names() -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for (family, kind) in exported_families()? {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "gauge" | "unknown" => &[""],
            other => bail!("family {family} has type {other}, which the kit does not know"),
        };
        out.extend(suffixes.iter().map(|s| format!("{family}{s}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inline_and_block_exprs() {
        let text = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n\
                    \x20       for: 1m\n      - alert: B\n        expr: |\n          x > 0\n\
                    \x20         unless y\n        labels: {}\n      - record: r:x\n\
                    \x20       expr: 'vector(1)'\n";
        assert_eq!(
            rules(text).unwrap(),
            vec![
                Rule {
                    kind: RuleKind::Alert,
                    name: "A".into(),
                    expr: "up == 0".into()
                },
                Rule {
                    kind: RuleKind::Alert,
                    name: "B".into(),
                    expr: "x > 0\nunless y".into()
                },
                Rule {
                    kind: RuleKind::Record,
                    name: "r:x".into(),
                    expr: "vector(1)".into()
                },
            ]
        );
        assert!(rules("      - alert: A\n        for: 1m\n").is_err());
    }

    #[test]
    fn tells_firing_from_silent_tests() {
        let text = "      - eval_time: 1m\n        alertname: A\n        exp_alerts: []\n\
                    \x20     - eval_time: 5m\n        alertname: A\n        exp_alerts:\n\
                    \x20         - exp_labels:\n              severity: x\n\
                    \x20     - eval_time: 5m\n        alertname: B\n        exp_alerts: []\n";
        let t = alert_tests(text).unwrap();
        assert_eq!(t["A"], (true, true));
        assert_eq!(t["B"], (false, true));
    }

    #[test]
    fn substitutes_grafana_variables() {
        assert_eq!(
            substitute(
                r#"rate(m{job=~"$job", instance=~"$instance"}[$__rate_interval]) + increase(m[$__range])"#,
                "flotilla",
                "60s"
            ),
            r#"rate(m{job=~"flotilla", instance=~".*"}[60s]) + increase(m[60s])"#
        );
    }

    #[test]
    fn exported_names_follow_the_families_types() {
        let names = exported_names().unwrap();
        for n in [
            "flotilla_machines",
            "flotilla_launches_total",
            "flotilla_boot_seconds_bucket",
            "flotilla_machine_seconds_total",
        ] {
            assert!(names.contains(n), "{n} missing from {names:?}");
        }
        assert!(!names.contains("flotilla_launches"));
    }

    #[test]
    fn every_registered_family_is_found() {
        let src = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../executor/src/metrics.rs"),
        )
        .unwrap();
        let registered = src.matches("registry.register(").count();
        let found = exported_families().unwrap();
        assert_eq!(
            found.len(),
            registered,
            "metrics.rs registers {registered} families, exported_families() sees {found:?}: \
             call the new family's recording method in exported_families()"
        );
    }
}

//! A strict little parser for the Prometheus / OpenMetrics text exposition the daemon
//! serves on `metrics_addr`, so tests can check both the format and the numbers.
//!
//! Checked: every line is `# HELP`, `# TYPE`, `# UNIT`, a sample, or the final `# EOF`
//! (which must be the last line, newline-terminated); metric and label names are valid
//! identifiers; label values are quoted with only `\\`, `\"` and `\n` escapes; values are
//! floats (or `+Inf`, `-Inf`, `NaN`); every sample belongs to a family declared by a
//! `# TYPE` line before it, with a suffix that type allows (`_total` for counters, `_bucket`
//! `_count` `_sum` for histograms).

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family name -> type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    ok_first(first) && chars.all(|c| ok_first(c) || c.is_ascii_digit())
}

fn parse_value(s: &str) -> Result<f64> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .with_context(|| format!("invalid sample value {s:?}")),
    }
}

/// Parses `{a="x",b="y"}` from the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').context("expected '{'")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').context("label without '='")?;
        let name = &rest[..eq];
        ensure!(is_name(name, false), "invalid label name {name:?}");
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .with_context(|| format!("label {name} value is not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars
                .next()
                .with_context(|| format!("unterminated value of label {name}"))?;
            match c {
                '"' => break i,
                '\\' => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => bail!("invalid escape {other:?} in label {name}"),
                },
                '\n' => bail!("raw newline in label {name}"),
                c => value.push(c),
            }
        };
        ensure!(
            labels.insert(name.to_owned(), value).is_none(),
            "label {name} repeated"
        );
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else {
            ensure!(
                rest.starts_with('}'),
                "expected ',' or '}}' after label {name}"
            );
        }
    }
}

/// The family a sample name belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<(&'a str, &'a str)> {
    if types.contains_key(name) {
        return Some((name, ""));
    }
    for suffix in ["_total", "_created", "_bucket", "_count", "_sum", "_info"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.contains_key(base) {
                return Some((base, suffix));
            }
        }
    }
    None
}

pub fn parse(text: &str) -> Result<Exposition> {
    ensure!(
        text.ends_with("# EOF\n"),
        "the exposition does not end with \"# EOF\\n\" (last 40 bytes: {:?})",
        &text[text.len().saturating_sub(40)..]
    );
    let mut out = Exposition::default();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let at = || format!("line {}: {line:?}", i + 1);
        if *line == "# EOF" {
            ensure!(i + 1 == lines.len(), "# EOF before the end ({})", at());
            continue;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let kind = parts.next().unwrap_or_default();
            let name = parts.next().unwrap_or_default();
            let rest = parts.next().unwrap_or_default();
            ensure!(is_name(name, true), "invalid metric name ({})", at());
            match kind {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    ensure!(
                        matches!(
                            rest,
                            "counter"
                                | "gauge"
                                | "histogram"
                                | "gaugehistogram"
                                | "summary"
                                | "info"
                                | "stateset"
                                | "unknown"
                        ),
                        "unknown type ({})",
                        at()
                    );
                    ensure!(
                        out.types.insert(name.to_owned(), rest.to_owned()).is_none(),
                        "family typed twice ({})",
                        at()
                    );
                }
                _ => bail!("unknown comment ({})", at()),
            }
            continue;
        }
        ensure!(!line.is_empty(), "empty line ({})", at());
        let name_end = line.find(['{', ' ']).with_context(at)?;
        let name = &line[..name_end];
        ensure!(is_name(name, true), "invalid metric name ({})", at());
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).with_context(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .with_context(|| format!("no space before the value ({})", at()))?;
        // value [timestamp] [# exemplar]
        let rest = rest.split(" # ").next().unwrap_or(rest);
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).with_context(at)?;
        if let Some(ts) = fields.next() {
            parse_value(ts).with_context(|| format!("bad timestamp ({})", at()))?;
        }
        ensure!(fields.next().is_none(), "trailing fields ({})", at());
        let (family, suffix) = family_of(name, &out.types)
            .with_context(|| format!("sample of no declared family ({})", at()))?;
        let allowed: &[&str] = match out.types[family].as_str() {
            "counter" => &["_total", "_created"],
            "histogram" | "gaugehistogram" => &["_bucket", "_count", "_sum", "_created"],
            "summary" => &["", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        ensure!(
            allowed.contains(&suffix),
            "{} sample {name} has a suffix its type does not allow ({})",
            out.types[family],
            at()
        );
        if suffix == "_bucket" {
            ensure!(labels.contains_key("le"), "bucket without le ({})", at());
        }
        out.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

impl Exposition {
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sample with exactly these labels (every label named, no others).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .find(|s| s.labels.len() == labels.len())
            .map(|s| s.value)
    }

    /// The sum of every sample of `name` carrying at least these labels (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Every value of label `label` among samples of `name`, with the sample's value.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            if let Some(v) = s.labels.get(label) {
                *out.entry(v.clone()).or_default() += s.value;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "# HELP flotilla_launches Machines launched.\n# TYPE flotilla_launches counter\n\
flotilla_launches_total{class=\"a\",instance_type=\"t3.micro\"} 2\n\
# TYPE flotilla_leases gauge\nflotilla_leases 1\n\
# TYPE flotilla_wait_seconds histogram\n\
flotilla_wait_seconds_sum 0.5\nflotilla_wait_seconds_count 1\n\
flotilla_wait_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";

    #[test]
    fn parses_families_labels_and_values() {
        let e = parse(GOOD).unwrap();
        assert_eq!(
            e.get(
                "flotilla_launches_total",
                &[("class", "a"), ("instance_type", "t3.micro")]
            ),
            Some(2.0)
        );
        assert_eq!(e.sum("flotilla_launches_total", &[("class", "a")]), 2.0);
        assert_eq!(e.get("flotilla_leases", &[]), Some(1.0));
        assert_eq!(
            e.get("flotilla_wait_seconds_bucket", &[("le", "+Inf")]),
            Some(1.0)
        );
    }

    #[test]
    fn rejects_what_prometheus_would() {
        for bad in [
            GOOD.trim_end_matches("# EOF\n"),
            &GOOD.replace("counter\n", "counter\n\n"),
            &GOOD.replace("flotilla_leases 1", "flotilla_leases one"),
            &GOOD.replace("class=\"a\"", "class=a"),
            &GOOD.replace("flotilla_launches_total{", "flotilla_launches{"),
            &GOOD.replace("flotilla_leases 1", "flotilla_undeclared 1"),
            &format!("{GOOD}flotilla_leases 2\n"),
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}

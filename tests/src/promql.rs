//! What a PromQL expression refers to, found by a small lexer: the metric names it selects
//! and the Grafana variables (`$job`, `${class}`, `$__rate_interval`) it uses. Enough to
//! check that the dashboard and the alert rules in `observability/` only query metrics the
//! daemon exports; whether an expression is valid PromQL is for Prometheus to say (promtool
//! and the e2e test's real server do).
//!
//! Skipped: string literals, label matchers (`{...}`), ranges and subqueries (`[...]`),
//! label lists after `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`,
//! numbers and durations, function names (an identifier followed by `(`) and keywords.
//! Every other identifier is a metric name.

use std::collections::BTreeSet;

use anyhow::{bail, Result};

/// The metric names and Grafana variables of one expression.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refs {
    pub metrics: BTreeSet<String>,
    pub variables: BTreeSet<String>,
}

/// Aggregations, set and binary-operator keywords and constants: identifiers that are not
/// metric names even when no `(` follows.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    "inf",
    "nan",
    "start",
    "end",
];

/// Keywords followed by a parenthesized list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// Index just past the string literal starting at `i` (quote `chars[i]`).
fn skip_string(chars: &[char], i: usize) -> Result<usize> {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() {
        match chars[j] {
            '\\' if quote != '`' => j += 2,
            c if c == quote => return Ok(j + 1),
            _ => j += 1,
        }
    }
    bail!("unterminated string literal")
}

/// Index just past the bracket group opening at `i`, strings inside skipped.
fn skip_group(chars: &[char], i: usize, close: char) -> Result<usize> {
    let open = chars[i];
    let mut depth = 0usize;
    let mut j = i;
    while j < chars.len() {
        match chars[j] {
            '"' | '\'' | '`' => {
                j = skip_string(chars, j)?;
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(j + 1);
                }
            }
            _ => {}
        }
        j += 1;
    }
    bail!("unclosed {open:?}")
}

/// Reads a Grafana variable (`$name`, `${name}`, `${name:format}`) at `i` (`$`); returns
/// its name and the index after it.
fn variable(chars: &[char], i: usize) -> Result<(String, usize)> {
    let mut j = i + 1;
    if chars.get(j) == Some(&'{') {
        let end = skip_group(chars, j, '}')?;
        let inner: String = chars[j + 1..end - 1].iter().collect();
        let name = inner.split(':').next().unwrap_or_default().to_owned();
        return Ok((name, end));
    }
    while j < chars.len() && is_ident(chars[j]) {
        j += 1;
    }
    if j == i + 1 {
        bail!("a lone '$'");
    }
    Ok((chars[i + 1..j].iter().collect(), j))
}

/// Variables inside a skipped group (`{job=~"$job"}`, `[$__rate_interval]`).
fn variables_in(chars: &[char], refs: &mut Refs) -> Result<()> {
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' {
            let (name, next) = variable(chars, i)?;
            refs.variables.insert(name);
            i = next;
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// The metric names and variables `expr` refers to.
pub fn refs(expr: &str) -> Result<Refs> {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut depth = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i)?;
        } else if c == '{' || c == '[' {
            let end = skip_group(&chars, i, if c == '{' { '}' } else { ']' })?;
            variables_in(&chars[i..end], &mut refs)?;
            i = end;
        } else if c == '$' {
            let (name, next) = variable(&chars, i)?;
            refs.variables.insert(name);
            i = next;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers, durations (5m, 1h30m), exponents and hex: one token.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = chars.get(next) == Some(&'(');
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if call {
                    i = skip_group(&chars, next, ')')?;
                }
            } else if !call && !KEYWORDS.contains(&lower.as_str()) {
                refs.metrics.insert(word);
            }
        } else {
            // Operators and punctuation.
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => bail!("unbalanced ')'"),
                ')' => depth -= 1,
                _ => {}
            }
            i += 1;
        }
    }
    if depth > 0 {
        bail!("unclosed '('");
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(expr: &str) -> Vec<String> {
        refs(expr).unwrap().metrics.into_iter().collect()
    }

    #[test]
    fn finds_metric_names_and_nothing_else() {
        assert_eq!(
            metrics(
                r#"histogram_quantile(0.9, sum by (le) (rate(flotilla_boot_seconds_bucket{job=~"$job", le!="x}"}[$__rate_interval])))"#
            ),
            ["flotilla_boot_seconds_bucket"]
        );
        assert_eq!(
            metrics(
                "sum by (class) (rate(flotilla_machine_seconds_total[5m]) * on (instance_type) \
                 group_left flotilla:instance_price_per_hour) / 3600 > 0.5e1"
            ),
            [
                "flotilla:instance_price_per_hour",
                "flotilla_machine_seconds_total"
            ]
        );
        assert_eq!(
            metrics(
                "max by (job, instance, class) (flotilla_waiting_requests) > 0 unless on (job) \
                 increase(flotilla_boot_seconds_count[15m] offset 1h) > bool 0 and up == 0"
            ),
            [
                "flotilla_boot_seconds_count",
                "flotilla_waiting_requests",
                "up"
            ]
        );
        assert_eq!(
            metrics("sum without (le) (x) or absent(up{job=\"flotilla\"}) # a comment naming y\n"),
            ["up", "x"]
        );
        assert_eq!(metrics("group_left(instance_type) foo"), ["foo"]);
    }

    #[test]
    fn finds_grafana_variables() {
        let r = refs(
            r#"sum(rate(m{job=~"$job", class=~"${class:regex}"}[$__rate_interval])) * $scale"#,
        )
        .unwrap();
        assert_eq!(
            r.variables.into_iter().collect::<Vec<_>>(),
            ["__rate_interval", "class", "job", "scale"]
        );
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [r#"m{job="x}"#, "sum(m", "m[5m", "$", "m{a=\"\\\"}"] {
            assert!(refs(bad).is_err(), "accepted {bad:?}");
        }
    }
}

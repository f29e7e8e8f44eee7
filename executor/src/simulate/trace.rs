//! Job traces the simulator replays.
//!
//! Two CSV formats, told apart by the header:
//! - the shared CI-builds format (`started_at,duration_seconds,...,n_jobs,...`): each build's
//!   `n_jobs` jobs arrive at `started_at`, each lasting `duration_seconds / n_jobs`;
//! - an operator's own history, `arrival,duration_seconds[,class]`, one job per line, with
//!   `arrival` in RFC 3339 (`2026-11-30T09:15:00Z`), `YYYY-MM-DD HH:MM:SS` (UTC) or Unix
//!   seconds. The header line is optional; an empty class means the default class.

use chrono::{DateTime, NaiveDateTime, Utc};

/// One job: when it asked for a machine and how long it held it (milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Job {
    /// Unix time in milliseconds.
    pub arrival: i64,
    pub duration: i64,
    pub class: String,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Trace {
    /// Sorted by arrival.
    pub jobs: Vec<Job>,
}

impl Trace {
    pub(super) fn classes(&self) -> Vec<String> {
        let mut c: Vec<String> = self.jobs.iter().map(|j| j.class.clone()).collect();
        c.sort();
        c.dedup();
        c
    }

    /// Total job time, in hours.
    pub(super) fn job_hours(&self) -> f64 {
        self.jobs.iter().map(|j| j.duration as f64).sum::<f64>() / 3.6e6
    }

    pub(super) fn span_hours(&self) -> f64 {
        match (self.jobs.first(), self.jobs.last()) {
            (Some(a), Some(b)) => (b.arrival - a.arrival) as f64 / 3.6e6,
            _ => 0.0,
        }
    }
}

/// Splits one CSV line (double quotes may wrap fields; `""` is a quote inside them).
fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().map(|f| f.trim().to_owned()).collect()
}

/// Parses a timestamp: RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC), or Unix seconds.
pub(super) fn parse_time(s: &str) -> Option<i64> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc).timestamp_millis());
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S%.f",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    let secs: f64 = s.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| (secs * 1000.0).round() as i64)
}

fn parse_secs(s: &str) -> Option<i64> {
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| ((v * 1000.0).round() as i64).max(1))
}

/// Parses either trace format; `default_class` is used where a job names no class.
pub(super) fn parse(text: &str, default_class: &str) -> Result<Trace, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .peekable();
    let Some((_, first)) = lines.peek().copied() else {
        return Err("the trace is empty".into());
    };
    let header = fields(first);
    let lower: Vec<String> = header.iter().map(|h| h.to_ascii_lowercase()).collect();
    let col = |name: &str| lower.iter().position(|h| h == name);
    let mut jobs = Vec::new();
    if let (Some(at), Some(dur), Some(n)) =
        (col("started_at"), col("duration_seconds"), col("n_jobs"))
    {
        lines.next();
        for (no, line) in lines {
            let f = fields(line);
            let get = |i: usize, what: &str| {
                f.get(i)
                    .map(String::as_str)
                    .ok_or_else(|| format!("line {}: missing {what}", no + 1))
            };
            let arrival = parse_time(get(at, "started_at")?)
                .ok_or_else(|| format!("line {}: started_at is not a time", no + 1))?;
            let total = parse_secs(get(dur, "duration_seconds")?)
                .ok_or_else(|| format!("line {}: duration_seconds is not a number >= 0", no + 1))?;
            let n: i64 = get(n, "n_jobs")?
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("line {}: n_jobs is not a whole number >= 1", no + 1))?;
            for _ in 0..n {
                jobs.push(Job {
                    arrival,
                    duration: (total / n).max(1),
                    class: default_class.to_owned(),
                });
            }
        }
    } else {
        // arrival,duration_seconds[,class]; a header is recognised by an unparsable arrival.
        let (at, dur, class) = if parse_time(header.first().map_or("", |s| s.as_str())).is_none() {
            lines.next();
            (
                col("arrival").unwrap_or(0),
                col("duration_seconds")
                    .or_else(|| col("duration"))
                    .unwrap_or(1),
                col("class").or(if header.len() > 2 { Some(2) } else { None }),
            )
        } else {
            (0, 1, Some(2))
        };
        for (no, line) in lines {
            let f = fields(line);
            let arrival = f.get(at).and_then(|s| parse_time(s)).ok_or_else(|| {
                format!(
                    "line {}: arrival must be RFC 3339, \"YYYY-MM-DD HH:MM:SS\" or Unix seconds",
                    no + 1
                )
            })?;
            let duration = f
                .get(dur)
                .and_then(|s| parse_secs(s))
                .ok_or_else(|| format!("line {}: duration_seconds is not a number >= 0", no + 1))?;
            let class = class
                .and_then(|c| f.get(c))
                .filter(|c| !c.is_empty())
                .cloned()
                .unwrap_or_else(|| default_class.to_owned());
            jobs.push(Job {
                arrival,
                duration,
                class,
            });
        }
    }
    if jobs.is_empty() {
        return Err("the trace holds no jobs".into());
    }
    jobs.sort_by_key(|j| j.arrival);
    Ok(Trace { jobs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_format_splits_a_build_into_its_jobs() {
        let text = "started_at,duration_seconds,project,build_id,n_jobs,status,is_pr,pushed_at\n\
                    2014-12-08T00:07:17Z,245,a/b,1,3,passed,True,\n\
                    2014-12-08T00:00:00Z,43,c/d,2,1,errored,False,2014-12-08T00:00:00Z\n";
        let t = parse(text, "default").unwrap();
        assert_eq!(t.jobs.len(), 4);
        assert_eq!(t.jobs[0].duration, 43_000, "sorted by arrival");
        assert!(t.jobs[1..].iter().all(|j| j.duration == 81_666));
        assert_eq!(
            t.jobs[1].arrival,
            parse_time("2014-12-08T00:07:17Z").unwrap()
        );
    }

    #[test]
    fn simple_format_with_and_without_header_and_class() {
        // 1764493260 is 2025-11-30T09:01:00Z.
        let with = "arrival,duration_seconds,class\n2025-11-30T09:00:00Z,60,big\n1764493260,30,\n";
        let t = parse(with, "default").unwrap();
        assert_eq!(t.jobs.len(), 2);
        assert_eq!(t.jobs[0].class, "big");
        assert_eq!(t.jobs[1].class, "default");
        assert_eq!(t.jobs[1].arrival - t.jobs[0].arrival, 60_000);
        let without = "2026-11-30 09:00:00,12.5\n";
        let t = parse(without, "x").unwrap();
        assert_eq!(t.jobs[0].duration, 12_500);
        assert_eq!(t.classes(), vec!["x".to_string()]);
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse("arrival,duration_seconds\n2026-11-30T09:00:00Z,abc\n", "d").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let err = parse("started_at,duration_seconds,n_jobs\nnope,1,1\n", "d").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse("", "d").is_err());
    }
}

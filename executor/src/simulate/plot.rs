//! The time series of a replay as a hand-written SVG (one panel per policy: jobs in the
//! system, machines, idle machines) and as terminal sparklines.

use std::fmt::Write as _;
use std::path::Path;

use chrono::{DateTime, Datelike, TimeZone, Utc};

use super::engine::Outcome;

/// Mean of each series over `buckets` equal slices of the replay.
fn buckets(o: &Outcome, n: usize) -> Vec<(i64, f64, f64, f64)> {
    let (start, end) = (o.start, o.end.max(o.start + 1));
    let width = ((end - start) as f64 / n as f64).max(1.0);
    let mut acc = vec![(0.0, 0.0, 0.0, 0u32); n];
    for s in &o.timeline {
        let i = (((s.t - start) as f64 / width) as usize).min(n - 1);
        let a = &mut acc[i];
        a.0 += f64::from(s.demand);
        a.1 += f64::from(s.machines);
        a.2 += f64::from(s.idle);
        a.3 += 1;
    }
    // Empty slices (only with very short replays) repeat the previous value.
    let mut out = Vec::with_capacity(n);
    let mut last = (0.0, 0.0, 0.0);
    for (i, a) in acc.iter().enumerate() {
        if a.3 > 0 {
            let k = f64::from(a.3);
            last = (a.0 / k, a.1 / k, a.2 / k);
        }
        let t = start + (width * i as f64) as i64;
        out.push((t, last.0, last.1, last.2));
    }
    out
}

/// `▁▂▃▄▅▆▇█` of the idle machines (mean per slice), with the peak.
pub(super) fn sparkline(o: &Outcome, width: usize) -> String {
    series_line(&buckets(o, width), |b| b.3, "idle")
}

/// Sparkline of jobs in the system (running or waiting).
pub(super) fn demand_sparkline(o: &Outcome, width: usize) -> String {
    series_line(&buckets(o, width), |b| b.1, "jobs")
}

fn series_line(
    b: &[(i64, f64, f64, f64)],
    f: impl Fn(&(i64, f64, f64, f64)) -> f64,
    what: &str,
) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = b.iter().map(&f).fold(0.0, f64::max);
    let line: String = b
        .iter()
        .map(|x| {
            if max <= 0.0 {
                BARS[0]
            } else {
                BARS[((f(x) / max) * 7.0).round() as usize]
            }
        })
        .collect();
    format!("{line} {what}, peak {max:.1}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn path(points: &[(f64, f64)]) -> String {
    let mut d = String::new();
    for (i, (x, y)) in points.iter().enumerate() {
        let _ = write!(d, "{}{x:.1},{y:.1}", if i == 0 { "M" } else { " L" });
    }
    d
}

/// Renders the replays as one SVG document.
pub(super) fn svg(outcomes: &[Outcome]) -> String {
    const W: f64 = 1100.0;
    const LEFT: f64 = 56.0;
    const RIGHT: f64 = 16.0;
    const PANEL: f64 = 190.0;
    const GAP: f64 = 72.0;
    const TOP: f64 = 54.0;
    const N: usize = 700;
    let plot_w = W - LEFT - RIGHT;
    let height = TOP + outcomes.len() as f64 * (PANEL + GAP) + 10.0;
    let series: Vec<Vec<(i64, f64, f64, f64)>> = outcomes.iter().map(|o| buckets(o, N)).collect();
    let ymax = series
        .iter()
        .flatten()
        .map(|b| b.1.max(b.2))
        .fold(1.0, f64::max);
    let (ymax, ystep) = nice_axis(ymax);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height:.0}" viewBox="0 0 {W} {height:.0}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">Jobs, machines and idle machines over time (mean per {} min)</text>"##,
        outcomes
            .first()
            .map_or(0, |o| (o.end - o.start) / N as i64 / 60_000)
            .max(1)
    );
    // Legend.
    let legend = [
        ("#d9d9d9", "jobs running or waiting"),
        ("#1f77b4", "machines (booting, idle or busy)"),
        ("#ff7f0e", "idle machines (booting or waiting for a job)"),
    ];
    let mut lx = LEFT;
    for (color, label) in legend {
        let _ = writeln!(
            s,
            r##"<rect x="{lx}" y="32" width="14" height="10" fill="{color}"/><text x="{}" y="41">{label}</text>"##,
            lx + 18.0
        );
        lx += 24.0 + label.len() as f64 * 6.6;
    }
    for (k, (o, b)) in outcomes.iter().zip(&series).enumerate() {
        let y0 = TOP + k as f64 * (PANEL + GAP) + 40.0;
        let x = |t: i64| LEFT + (t - o.start) as f64 / (o.end - o.start).max(1) as f64 * plot_w;
        let y = |v: f64| y0 + PANEL - v / ymax * PANEL;
        let sum = o.summary();
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text><text x="{LEFT}" y="{:.1}" fill="#333">p50 wait {:.0} s · p95 wait {:.0} s · idle {:.0} machine-h · busy {:.0} machine-h · {} launches · ${:.2}</text>"##,
            y0 - 22.0,
            escape(&o.name),
            y0 - 7.0,
            sum.p50_wait_s,
            sum.p95_wait_s,
            sum.idle_machine_hours,
            sum.busy_machine_hours,
            sum.launches,
            sum.cost
        );
        // Grid and y labels.
        let ticks = (ymax / ystep).round() as u32;
        for i in 0..=ticks {
            let v = ystep * f64::from(i);
            let yy = y(v);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{v:.0}</text>"##,
                W - RIGHT,
                LEFT - 6.0,
                yy + 4.0
            );
        }
        // Day boundaries (UTC).
        let mut day = Utc
            .timestamp_millis_opt(o.start)
            .single()
            .unwrap_or_default()
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc();
        while day.timestamp_millis() <= o.end {
            let t = day.timestamp_millis();
            if t >= o.start {
                let xx = x(t);
                let _ = writeln!(
                    s,
                    r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{y0:.1}" y2="{:.1}" stroke="#ccc"/><text x="{:.1}" y="{:.1}" fill="#555">{}</text>"##,
                    y0 + PANEL,
                    xx + 3.0,
                    y0 + PANEL + 14.0,
                    label(day)
                );
            }
            day += chrono::Duration::days(1);
        }
        // Demand as an area, machines and idle as lines.
        let mut area: Vec<(f64, f64)> = vec![(x(o.start), y(0.0))];
        area.extend(b.iter().map(|p| (x(p.0), y(p.1))));
        area.push((x(o.end), y(0.0)));
        let _ = writeln!(s, r##"<path d="{} Z" fill="#d9d9d9"/>"##, path(&area));
        let machines: Vec<(f64, f64)> = b.iter().map(|p| (x(p.0), y(p.2))).collect();
        let idle: Vec<(f64, f64)> = b.iter().map(|p| (x(p.0), y(p.3))).collect();
        let _ = writeln!(
            s,
            r##"<path d="{}" fill="none" stroke="#1f77b4" stroke-width="1.2"/>"##,
            path(&machines)
        );
        let _ = writeln!(
            s,
            r##"<path d="{}" fill="none" stroke="#ff7f0e" stroke-width="1.2"/>"##,
            path(&idle)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y0:.1}" width="{plot_w:.1}" height="{PANEL}" fill="none" stroke="#999"/>"##
        );
    }
    s.push_str("</svg>\n");
    s
}

fn label(day: DateTime<Utc>) -> String {
    format!("{} {:02}-{:02}", day.weekday(), day.month(), day.day())
}

/// A round axis maximum at or above `v` and its tick step (at most six ticks).
fn nice_axis(v: f64) -> (f64, f64) {
    let step = [
        1.0, 2.0, 5.0, 10.0, 20.0, 25.0, 50.0, 100.0, 200.0, 250.0, 500.0,
    ]
    .into_iter()
    .find(|s| v / s <= 6.0)
    .unwrap_or_else(|| (v / 6.0).ceil());
    ((v / step).ceil().max(1.0) * step, step)
}

pub(super) fn write(path: &Path, outcomes: &[Outcome]) -> std::io::Result<()> {
    std::fs::write(path, svg(outcomes))
}

#[cfg(test)]
mod tests {
    use super::super::engine::Sample;
    use super::*;

    fn outcome() -> Outcome {
        Outcome {
            name: "a<b".into(),
            start: 0,
            end: 86_400_000 * 2,
            timeline: (0..100)
                .map(|i| Sample {
                    t: i * 1_728_000,
                    demand: (i % 7) as u32,
                    machines: (i % 9) as u32,
                    idle: (i % 3) as u32,
                })
                .collect(),
            waits_ms: vec![0, 1000],
            ..Outcome::default()
        }
    }

    #[test]
    fn svg_is_one_well_formed_document_with_escaped_names() {
        let doc = svg(&[outcome(), outcome()]);
        assert!(doc.starts_with("<svg "));
        assert!(doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("a&lt;b"));
        assert_eq!(doc.matches("<svg").count(), 1);
        assert!(doc.contains("Thu 01-01"), "day labels");
    }

    #[test]
    fn axis_is_round() {
        assert_eq!(nice_axis(37.0), (40.0, 10.0));
        assert_eq!(nice_axis(3.2), (4.0, 1.0));
        assert_eq!(nice_axis(120.0), (120.0, 20.0));
        assert_eq!(nice_axis(130.0), (150.0, 25.0));
    }

    #[test]
    fn sparkline_has_the_requested_width() {
        let line = sparkline(&outcome(), 20);
        assert_eq!(line.chars().take_while(|c| !c.is_whitespace()).count(), 20);
    }
}

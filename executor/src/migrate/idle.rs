//! `[runners.machine]`'s idle policy as a class's: `IdleCount`, `IdleTime`,
//! `IdleScaleFactor`, `IdleCountMin`, `MaxBuilds`, `MaxGrowthRate`, the
//! `[[runners.machine.autoscaling]]` periods as schedules, the legacy `OffPeak*` settings
//! (reported, not converted), and the runner's `limit` as the class's `max_machines`.

use flotilla_proto::config::Schedule;
use flotilla_proto::duration::HumanDuration;

use super::error::Bad;
use super::fields::Fields;
use super::periods;
use super::report::{Kind, Report};

/// A class's idle policy, from one runner.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct IdlePolicy {
    pub idle_count: u32,
    pub idle_count_min: u32,
    pub idle_scale_factor: f64,
    pub idle_time: HumanDuration,
    pub max_machines: u32,
    pub max_builds: u32,
    /// `MaxGrowthRate`; `None` or 0 is docker+machine's "no limit".
    pub growth: Option<u32>,
    pub schedules: Vec<Schedule>,
}

/// Reads the idle keys of `[runners.machine]` (`m`, reported at `at`) for class `class_name`;
/// `limit` is the runner's and `concurrent` the config's global one.
pub(super) fn read(
    m: &mut Fields,
    at: &str,
    class_name: &str,
    (limit, concurrent): (u32, Option<u32>),
    report: &mut Report,
) -> Result<IdlePolicy, Bad> {
    let ckey = |k: &str| format!("classes.{class_name}.{k}");
    let mat = |k: &str| format!("{at} machine.{k}");
    let idle_count = m.count("IdleCount")?.unwrap_or(0);
    let idle_time = m.count("IdleTime")?;
    let scale = m.float("IdleScaleFactor")?.unwrap_or(0.0);
    let count_min = m.count("IdleCountMin")?;
    let max_builds = m.count("MaxBuilds")?.unwrap_or(0);
    let growth = m.count("MaxGrowthRate")?;
    let autoscaling = m.tables("autoscaling")?;
    let mut schedules = Vec::new();
    let mut peak_idle = idle_count;
    for (j, entry) in autoscaling.into_iter().enumerate() {
        let path = m.key(&format!("autoscaling[{j}]"));
        let here = format!("{at} machine.autoscaling[{j}]");
        if let Some(s) = schedule(entry, &path, &here, class_name, report)? {
            peak_idle = peak_idle.max(s.idle_count.unwrap_or(0));
            schedules.push(s);
        }
    }
    let max_machines = if limit > 0 {
        report.push(
            Kind::Converted,
            format!("{at} limit"),
            format!(
                "{} = {limit} (the runner keeps limit too: it still caps its jobs)",
                ckey("max_machines")
            ),
        );
        limit
    } else {
        let jobs = concurrent.unwrap_or(1);
        let max = jobs.saturating_add(peak_idle).max(1);
        report.push(
            Kind::Default,
            format!("{at} limit"),
            format!(
                "no limit: docker+machine could run concurrent ({jobs}) jobs plus IdleCount \
                 ({peak_idle}) idle machines: {} = {max}",
                ckey("max_machines")
            ),
        );
        max
    };
    let idle_count = if idle_count > max_machines {
        report.push(
            Kind::Converted,
            mat("IdleCount"),
            format!(
                "{idle_count} is more than the runner's limit: {} = {max_machines} (docker+machine \
                 never had more machines than limit either)",
                ckey("idle_count")
            ),
        );
        max_machines
    } else {
        report.push(
            Kind::Converted,
            mat("IdleCount"),
            format!("{} = {idle_count}", ckey("idle_count")),
        );
        idle_count
    };
    let idle_time = match idle_time {
        Some(s) => {
            report.push(
                Kind::Converted,
                mat("IdleTime"),
                format!("{} = \"{s}s\"", ckey("idle_time")),
            );
            HumanDuration::from_secs(u64::from(s))
        }
        None => {
            report.push(
                Kind::Converted,
                mat("IdleTime"),
                format!(
                    "not set, 0 for docker+machine (machines beyond IdleCount go as soon as \
                     they are idle): {} = \"0s\"",
                    ckey("idle_time")
                ),
            );
            HumanDuration::from_secs(0)
        }
    };
    if !(0.0..=100.0).contains(&scale) {
        return Err(Bad::new(
            m.key("IdleScaleFactor"),
            format!("{scale} must be between 0 and 100"),
        ));
    }
    let (scale, count_min) = idle_scale(scale, count_min, idle_count, &mat, &ckey, report);
    if max_builds > 0 {
        report.push(
            Kind::Converted,
            mat("MaxBuilds"),
            format!("{} = {max_builds}", ckey("max_builds")),
        );
    }
    if let Some(g) = growth {
        report.push(
            Kind::Converted,
            mat("MaxGrowthRate"),
            format!("{g}: part of the fleet's max_growth_rate (see below)"),
        );
    }
    offpeak(m, at, class_name, report)?;
    Ok(IdlePolicy {
        idle_count,
        idle_count_min: count_min,
        idle_scale_factor: scale,
        idle_time,
        max_machines,
        max_builds,
        growth,
        schedules,
    })
}

/// docker+machine's IdleScaleFactor / IdleCountMin: with a factor, at least one idle
/// machine (docker+machine raises IdleCountMin to 1) and no more than IdleCount.
fn idle_scale(
    scale: f64,
    count_min: Option<u32>,
    idle_count: u32,
    mat: &dyn Fn(&str) -> String,
    ckey: &dyn Fn(&str) -> String,
    report: &mut Report,
) -> (f64, u32) {
    if scale <= 0.0 {
        if let Some(n) = count_min {
            report.push(
                Kind::Converted,
                mat("IdleCountMin"),
                format!(
                    "{} = {n} (only used with IdleScaleFactor, as in docker+machine)",
                    ckey("idle_count_min")
                ),
            );
        }
        return (0.0, count_min.unwrap_or(0));
    }
    report.push(
        Kind::Converted,
        mat("IdleScaleFactor"),
        format!("{} = {scale}", ckey("idle_scale_factor")),
    );
    let wanted = count_min.unwrap_or(0).max(1);
    let n = wanted.min(idle_count);
    report.push(
        Kind::Converted,
        mat("IdleCountMin"),
        format!(
            "{} = {n} (docker+machine keeps at least 1 with IdleScaleFactor, at most IdleCount)",
            ckey("idle_count_min")
        ),
    );
    (scale, n)
}

/// One `[[runners.machine.autoscaling]]` entry as a schedule. Every idle setting is
/// written, because an active docker+machine period replaces all four (those left out are
/// 0), while a Flotilla schedule keeps the class's value for those left out.
fn schedule(
    entry: toml::Table,
    path: &str,
    here: &str,
    class: &str,
    report: &mut Report,
) -> Result<Option<Schedule>, Bad> {
    let mut a = Fields::new(entry, path);
    let raw = a.strings("Periods", false)?.unwrap_or_default();
    let mut patterns = Vec::new();
    for (k, p) in raw.iter().enumerate() {
        match periods::convert(p) {
            Ok(c) => {
                if let Some(note) = c.note {
                    report.push(Kind::Note, format!("{here}.Periods[{k}] {p:?}"), note);
                }
                patterns.push(c.pattern);
            }
            Err(why) => report.push(
                Kind::Unsupported,
                format!("{here}.Periods[{k}]"),
                format!("not converted: {why}"),
            ),
        }
    }
    let timezone = match a.string("Timezone")? {
        Some(tz) if !tz.is_empty() => {
            flotilla_proto::schedule::parse_timezone(&tz)
                .map_err(|e| Bad::new(a.key("Timezone"), e))?;
            tz
        }
        _ => {
            report.push(
                Kind::Default,
                format!("{here}.Timezone"),
                "not set: docker+machine used the runner host's local time zone; written as \
                 timezone = \"UTC\": change it if the host was not on UTC",
            );
            "UTC".to_owned()
        }
    };
    let idle_count = a.count("IdleCount")?.unwrap_or(0);
    let idle_time = a.count("IdleTime")?.unwrap_or(0);
    let scale = a.float("IdleScaleFactor")?.unwrap_or(0.0);
    let count_min = a.count("IdleCountMin")?.unwrap_or(0);
    if !(0.0..=100.0).contains(&scale) {
        return Err(Bad::new(
            a.key("IdleScaleFactor"),
            format!("{scale} must be between 0 and 100"),
        ));
    }
    // docker+machine raises IdleCountMin to 1 when a scale factor is used.
    let count_min = if scale > 0.0 {
        count_min.max(1)
    } else {
        count_min
    };
    for (k, _) in a.rest() {
        report.push(
            Kind::Unknown,
            format!("{here}.{k}"),
            "not an autoscaling key docker+machine knows: not converted",
        );
    }
    if patterns.is_empty() {
        report.push(
            Kind::Unsupported,
            here,
            "no period could be converted: this schedule is left out",
        );
        return Ok(None);
    }
    report.push(
        Kind::Converted,
        here,
        format!(
            "[[classes.{class}.schedules]] periods = {patterns:?}, timezone = {timezone:?}, \
             idle_count = {idle_count}, idle_count_min = {count_min}, idle_scale_factor = \
             {scale}, idle_time = \"{idle_time}s\" (all four written: while a docker+machine \
             period is active, the settings it leaves out are 0)"
        ),
    );
    Ok(Some(Schedule {
        periods: patterns,
        timezone,
        idle_count: Some(idle_count),
        idle_count_min: Some(count_min),
        idle_scale_factor: Some(scale),
        idle_time: Some(HumanDuration::from_secs(u64::from(idle_time))),
    }))
}

/// The OffPeak settings gitlab-runner ignores since 14.0: not converted, but the report
/// shows the schedule that would keep them.
fn offpeak(m: &mut Fields, at: &str, class: &str, report: &mut Report) -> Result<(), Bad> {
    let periods = m.strings("OffPeakPeriods", false)?;
    let timezone = m.string("OffPeakTimezone")?;
    let idle_count = m.count("OffPeakIdleCount")?;
    let idle_time = m.count("OffPeakIdleTime")?;
    if periods.is_none() && timezone.is_none() && idle_count.is_none() && idle_time.is_none() {
        return Ok(());
    }
    let converted: Vec<String> = periods
        .unwrap_or_default()
        .iter()
        .filter_map(|p| periods::convert(p).ok().map(|c| c.pattern))
        .collect();
    report.push(
        Kind::Unsupported,
        format!("{at} machine.OffPeakPeriods/OffPeakTimezone/OffPeakIdleCount/OffPeakIdleTime"),
        format!(
            "deprecated and ignored by gitlab-runner since 14.0, so not converted; to have an \
             off-peak pool add [[classes.{class}.schedules]] periods = {converted:?}, timezone = \
             {:?}, idle_count = {}, idle_time = \"{}s\"",
            timezone.unwrap_or_else(|| "UTC".into()),
            idle_count.unwrap_or(0),
            idle_time.unwrap_or(0)
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, limit: u32, concurrent: Option<u32>) -> (Result<IdlePolicy, Bad>, Report) {
        let mut m = Fields::new(toml::from_str(text).unwrap(), "runners[0].machine");
        let mut report = Report::default();
        let r = read(&mut m, "at", "c", (limit, concurrent), &mut report);
        (r, report)
    }

    #[test]
    fn idle_count_above_the_limit_is_capped_by_it() {
        let (p, report) = run("IdleCount = 12\nIdleTime = 60\n", 5, None);
        let p = p.unwrap();
        assert_eq!((p.idle_count, p.max_machines), (5, 5));
        assert!(report.lines(Kind::Converted)[1].contains("more than the runner's limit"));
    }

    #[test]
    fn without_a_limit_machines_are_bounded_by_concurrent_jobs_plus_idle_ones() {
        let (p, _) = run(
            "IdleCount = 2\n[[autoscaling]]\nPeriods = [\"* * 9-17 * * mon-fri *\"]\nIdleCount = 8\n",
            0,
            Some(20),
        );
        assert_eq!(p.unwrap().max_machines, 28);
        let (p, _) = run("IdleCount = 0\n", 0, None);
        assert_eq!(
            p.unwrap().max_machines,
            1,
            "gitlab-runner's default concurrent is 1"
        );
    }

    #[test]
    fn a_scale_factor_keeps_at_least_one_idle_machine_as_docker_machine_does() {
        let (p, _) = run(
            "IdleCount = 10\nIdleScaleFactor = 1.5\nIdleTime = 600\n",
            20,
            None,
        );
        let p = p.unwrap();
        assert_eq!(p.idle_scale_factor, 1.5);
        assert_eq!(p.idle_count_min, 1);
        let (p, _) = run("IdleCount = 10\nIdleScaleFactor = 101.0\n", 20, None);
        assert_eq!(p.unwrap_err().key, "runners[0].machine.IdleScaleFactor");
    }

    #[test]
    fn an_unconvertible_period_is_reported_and_a_bad_time_zone_refused() {
        let (p, report) = run(
            "[[autoscaling]]\nPeriods = [\"* * 9-17 * * mon-fri 2019\"]\nIdleCount = 3\nTimezone = \"UTC\"\n",
            5,
            None,
        );
        assert!(p.unwrap().schedules.is_empty());
        assert_eq!(
            report.count(Kind::Unsupported),
            2,
            "the period and its schedule"
        );
        let (p, _) = run(
            "[[autoscaling]]\nPeriods = [\"* * * * * * *\"]\nTimezone = \"Mars/Olympus\"\n",
            5,
            None,
        );
        assert_eq!(
            p.unwrap_err().key,
            "runners[0].machine.autoscaling[0].Timezone"
        );
    }
}

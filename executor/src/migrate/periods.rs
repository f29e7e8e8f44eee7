//! docker+machine's `Periods` (gorhill/cronexpr: `[second] minute hour day-of-month month
//! day-of-week [year]`, matched to the second) as Flotilla's 5-field cron patterns
//! (matched by the minute).

use flotilla_proto::schedule;

/// One period in Flotilla's form, and a note when its meaning shifts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Period {
    pub pattern: String,
    pub note: Option<String>,
}

/// Converts one docker+machine period; `Err` says why it has no 5-field equivalent.
pub(super) fn convert(period: &str) -> Result<Period, String> {
    let p = period.trim();
    let macro_form = match p {
        "@yearly" | "@annually" => Some("0 0 1 1 *"),
        "@monthly" => Some("0 0 1 * *"),
        "@weekly" => Some("0 0 * * 0"),
        "@daily" | "@midnight" => Some("0 0 * * *"),
        "@hourly" => Some("0 * * * *"),
        _ => None,
    };
    let fields: Vec<&str> = match macro_form {
        Some(m) => m.split(' ').collect(),
        None => p.split_whitespace().collect(),
    };
    let (seconds, five, year) = match fields.as_slice() {
        [_, _, _, _, _] => (None, &fields[..], None),
        [rest @ .., y] if rest.len() == 5 => (None, rest, Some(*y)),
        [s, rest @ .., y] if rest.len() == 5 => (Some(*s), rest, Some(*y)),
        _ => {
            return Err(format!(
                "{period:?} has {} fields; docker+machine periods have 5 to 7 \
                 ([second] minute hour day-of-month month day-of-week [year])",
                fields.len()
            ))
        }
    };
    if let Some(y) = year.filter(|y| !matches!(*y, "*" | "?")) {
        return Err(format!(
            "{period:?} is limited to the year(s) {y}: Flotilla's 5-field periods have no \
             year; add the schedule by hand and remove it when the year is over"
        ));
    }
    let pattern = five.join(" ");
    schedule::parse_period(&pattern).map_err(|e| format!("{period:?} as {pattern:?}: {e}"))?;
    let note = match seconds {
        Some("*") => None,
        Some(s) => Some(format!(
            "the seconds field {s:?} made docker+machine match only at those seconds of a \
             minute; Flotilla matches whole minutes"
        )),
        None => Some(
            "without a seconds field docker+machine matched only at second 0 of each \
             minute (about one second a minute); Flotilla matches whole minutes"
                .to_owned(),
        ),
    };
    Ok(Period { pattern, note })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_field_periods_drop_seconds_and_year() {
        let p = convert("* * 9-17 * * mon-fri *").unwrap();
        assert_eq!(p.pattern, "* 9-17 * * mon-fri");
        assert_eq!(p.note, None);
        assert_eq!(
            convert("* * * * * sat,sun *").unwrap().pattern,
            "* * * * sat,sun"
        );
    }

    #[test]
    fn shorter_forms_follow_cronexpr() {
        // Six fields: cronexpr prepends second 0, so the last field is the year.
        let p = convert("* 8-18 * * 1-5 *").unwrap();
        assert_eq!(p.pattern, "* 8-18 * * 1-5");
        assert!(p.note.unwrap().contains("second 0"));
        assert_eq!(convert("@daily").unwrap().pattern, "0 0 * * *");
    }

    #[test]
    fn years_and_garbage_have_no_equivalent() {
        let e = convert("* * 9-17 * * mon-fri 2023").unwrap_err();
        assert!(e.contains("2023"), "{e}");
        assert!(convert("* *").unwrap_err().contains("2 fields"));
        assert!(convert("* * 25-30 * * * *").is_err(), "hour 25");
    }
}

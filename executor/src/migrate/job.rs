//! The `[job]` tables: one per runner from its docker options, checked as Flotilla reads
//! them, then split into what every runner shares (the fleet's `[job]`) and what each class
//! has of its own (`[classes.X.job]`, merged key by key over `[job]`).

use std::collections::BTreeMap;

use flotilla_proto::config::{ClassConfig, Config, JobConfig};

use super::docker::JobSetting;
use super::error::Bad;

/// Deserializes a `[job]` table, naming the key path of the first problem.
pub(super) fn deserialize(table: &toml::Table) -> Result<JobConfig, (String, String)> {
    serde_path_to_error::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
        let path = e.path().to_string();
        (path, e.into_inner().message().trim_end().to_owned())
    })
}

/// Checks one runner's `[job]` table (`job`, built from `settings`) as Flotilla reads it
/// for a fleet of just `class`, naming the `[runners.docker]` key a problem comes from.
pub(super) fn check(
    index: usize,
    (class_name, class): (&str, &ClassConfig),
    job: &toml::Table,
    settings: &[JobSetting],
) -> Result<(), Bad> {
    let blame = |path: &str, message: String| {
        let hit = settings.iter().find(|s| {
            let k = s.to_key();
            path == k || path.starts_with(&format!("{k}.")) || path.starts_with(&format!("{k}["))
        });
        match hit {
            Some(s) => {
                let rest = &path[s.to_key().len()..];
                Bad::new(
                    format!("runners[{}].docker.{}{rest}", index, s.from),
                    message,
                )
            }
            None => Bad::new(
                format!("runners[{}]", index),
                format!("{message} (as [job] {path} in flotilla.toml)"),
            ),
        }
    };
    let job = deserialize(job).map_err(|(p, m)| blame(&p, m))?;
    let probe = Config {
        fleet: "probe".into(),
        default_class: class_name.to_owned(),
        classes: BTreeMap::from([(class_name.to_owned(), class.clone())]),
        job,
        ..Config::default()
    };
    probe
        .validate()
        .map_err(|e| match e.key.strip_prefix("job.") {
            Some(path) => blame(path, e.message),
            None => Bad::new(
                format!("runners[{}]", index),
                format!("as {} in flotilla.toml: {}", e.key, e.message),
            ),
        })
}

/// The keys every table has with the same value (sub-tables key by key).
pub(super) fn common(tables: &[&toml::Table]) -> toml::Table {
    let mut out = toml::Table::new();
    let Some(first) = tables.first() else {
        return out;
    };
    for (k, v) in first.iter() {
        let Some(all) = tables.iter().map(|t| t.get(k)).collect::<Option<Vec<_>>>() else {
            continue;
        };
        if let Some(subs) = all.iter().map(|x| x.as_table()).collect::<Option<Vec<_>>>() {
            let c = common(&subs);
            if !c.is_empty() {
                out.insert(k.clone(), toml::Value::Table(c));
            }
        } else if all.iter().all(|x| *x == v) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// What `t` has beyond `base` (sub-tables key by key): a class's `[classes.X.job]`.
pub(super) fn minus(t: &toml::Table, base: &toml::Table) -> toml::Table {
    let mut out = toml::Table::new();
    for (k, v) in t {
        match (base.get(k), v) {
            (Some(b), _) if b == v => {}
            (Some(toml::Value::Table(b)), toml::Value::Table(sub)) => {
                let d = minus(sub, b);
                if !d.is_empty() {
                    out.insert(k.clone(), toml::Value::Table(d));
                }
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

pub(super) fn lookup<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let v = t.get(*first)?;
    if rest.is_empty() {
        Some(v)
    } else {
        lookup(v.as_table()?, rest)
    }
}

pub(super) fn insert_at(t: &mut toml::Table, path: &[&str], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            t.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let sub = t
                .entry((*first).to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(sub) = sub {
                insert_at(sub, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn shared_keys_go_to_the_base_and_the_rest_to_each_class() {
        let a =
            table("privileged = true\nimage = \"x\"\n[container]\ndns = [\"1\"]\nuser = \"a\"\n");
        let b = table("privileged = false\nimage = \"x\"\n[container]\ndns = [\"1\"]\n");
        let base = common(&[&a, &b]);
        assert_eq!(base, table("image = \"x\"\n[container]\ndns = [\"1\"]\n"));
        assert_eq!(
            minus(&a, &base),
            table("privileged = true\n[container]\nuser = \"a\"\n")
        );
        assert_eq!(minus(&b, &base), table("privileged = false\n"));
        let mut t = toml::Table::new();
        insert_at(
            &mut t,
            &["container", "shm_size"],
            toml::Value::String("1g".into()),
        );
        assert_eq!(
            lookup(&t, &["container", "shm_size"]).and_then(|v| v.as_str()),
            Some("1g")
        );
    }
}

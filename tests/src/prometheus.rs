//! A real Prometheus server (Debian's `prometheus`) on a free 127.0.0.1 port, scraping
//! given targets every second with given rule files loaded, and a client of its HTTP API
//! (`/api/v1/query`, `/api/v1/query_range`, and the rest as JSON).
//!
//! Invariant: the server is ours alone (its own config, TSDB directory and port, loopback
//! only) and is stopped when the [`Prometheus`] is dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::util::{free_port, stop_child, tail, wait_for_http};

/// One sample of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    /// Evaluation time, Unix seconds.
    pub time: f64,
    pub value: f64,
}

/// One series of a range query.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    /// (Unix seconds, value), oldest first.
    pub values: Vec<(f64, f64)>,
}

/// A running server.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// What Prometheus writes for a value: a string holding a float (or `NaN`, `+Inf`).
fn value(v: &Value) -> Result<f64> {
    let s = v
        .as_str()
        .with_context(|| format!("value {v} is not a string"))?;
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s.parse().with_context(|| format!("value {s:?}")),
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

fn pair(v: &Value) -> Result<(f64, f64)> {
    let t = v[0].as_f64().with_context(|| format!("timestamp of {v}"))?;
    Ok((t, value(&v[1])?))
}

impl Prometheus {
    /// Starts `prometheus` with its config and TSDB under `dir`, scraping `targets`
    /// (`host:port`, path `/metrics`) as job `job` every second and evaluating `rule_files`
    /// every second; returns once `/-/ready` answers.
    pub async fn start(
        dir: &Path,
        job: &str,
        targets: &[String],
        rule_files: &[PathBuf],
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: {}\n    static_configs:\n      - targets: [{}]\n",
            rule_files
                .iter()
                .map(|p| q(&p.display().to_string()))
                .collect::<Vec<_>>()
                .join(", "),
            q(job),
            targets.iter().map(|t| q(t)).collect::<Vec<_>>().join(", "),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let tsdb = dir.join("data");
        let log = dir.join("prometheus.log");
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", tsdb.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context(
                "starting prometheus (apt-get install --no-install-recommends prometheus; \
                 scripts/test installs it)",
            )?;
        let mut p = Self { child, port, log };
        let url = format!("{}/-/ready", p.url());
        wait_for_http(
            "prometheus",
            &mut p.child,
            &url,
            Duration::from_secs(60),
            &p.log,
            |code| Ok(code == 200),
        )
        .await?;
        Ok(p)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The tail of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }

    /// `GET /api/v1/<path>` with `params`; the response's `data` (an error status is an
    /// error naming Prometheus's message).
    pub async fn api(&self, path: &str, params: &[(&str, String)]) -> Result<Value> {
        let url = format!("{}/api/v1/{path}", self.url());
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let what = format!("GET {url} {params:?}");
        let body: Value = tokio::task::spawn_blocking(move || -> Result<Value> {
            let mut req = ureq::get(&url).timeout(Duration::from_secs(10));
            for (k, v) in &params {
                req = req.query(k, v);
            }
            match req.call() {
                Ok(r) => Ok(r.into_json()?),
                // Prometheus answers bad queries with 400 and a JSON error.
                Err(ureq::Error::Status(_, r)) => Ok(r.into_json()?),
                Err(e) => Err(e.into()),
            }
        })
        .await?
        .with_context(|| what.clone())?;
        if body["status"] != "success" {
            bail!(
                "{what}: {} {}",
                body["errorType"].as_str().unwrap_or("error"),
                body["error"].as_str().unwrap_or_default()
            );
        }
        Ok(body["data"].clone())
    }

    /// An instant query at `time` (Unix seconds; now when `None`). A scalar result is one
    /// sample without labels.
    pub async fn query(&self, expr: &str, time: Option<f64>) -> Result<Vec<Sample>> {
        let mut params = vec![("query", expr.to_owned())];
        if let Some(t) = time {
            params.push(("time", format!("{t:.3}")));
        }
        let data = self.api("query", &params).await?;
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let (time, value) = pair(&s["value"])?;
                    Ok(Sample {
                        labels: labels(&s["metric"]),
                        time,
                        value,
                    })
                })
                .collect(),
            Some("scalar") => {
                let (time, value) = pair(&data["result"])?;
                Ok(vec![Sample {
                    labels: BTreeMap::new(),
                    time,
                    value,
                }])
            }
            other => bail!("query {expr:?}: unexpected result type {other:?}"),
        }
    }

    /// A range query from `start` to `end` (Unix seconds) every `step`.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: Duration,
    ) -> Result<Vec<Series>> {
        let data = self
            .api(
                "query_range",
                &[
                    ("query", expr.to_owned()),
                    ("start", format!("{start:.3}")),
                    ("end", format!("{end:.3}")),
                    ("step", format!("{}", step.as_secs_f64())),
                ],
            )
            .await?;
        data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                Ok(Series {
                    labels: labels(&s["metric"]),
                    values: s["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(pair)
                        .collect::<Result<_>>()?,
                })
            })
            .collect()
    }

    pub fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10), false);
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

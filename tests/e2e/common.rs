//! Shared helpers of the end-to-end tests: a cap on concurrent sandboxes, a hard time
//! bound per test, and a throwaway CA for TLS tests.

use std::future::Future;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

static SLOTS: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();

/// Sandboxes allowed at once in this test process (`FLOTILLA_E2E_PARALLEL`, default 3):
/// each runs moto, a registry, a daemon and dockerds on a 2-core machine.
fn limit() -> usize {
    std::env::var("FLOTILLA_E2E_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(3)
}

pub struct Permit;

impl Drop for Permit {
    fn drop(&mut self) {
        let mut n = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        FREED.notify_one();
    }
}

/// Waits for a free sandbox slot.
pub async fn permit() -> Permit {
    tokio::task::spawn_blocking(|| {
        let mut n = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= limit() {
            n = FREED.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Permit
    })
    .await
    .expect("permit thread")
}

/// Runs a test body under a permit and a hard time limit.
pub async fn bounded<F>(limit: Duration, body: F) -> Result<()>
where
    F: Future<Output = Result<()>>,
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_E2E_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let _permit = permit().await;
    tokio::time::timeout(limit, body)
        .await
        .with_context(|| format!("test did not finish within {limit:?}"))?
}

/// A throwaway certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate()?)?,
        })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose) -> Result<Pair> {
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn server(&self, dns_name: &str) -> Result<Pair> {
        self.leaf(
            vec![dns_name.to_owned()],
            dns_name,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    pub fn client(&self, cn: &str) -> Result<Pair> {
        self.leaf(Vec::new(), cn, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// `curl` to a machine's dockerd over TLS, resolving its DNS name to its IP; returns
/// (exit code, stdout, stderr).
pub async fn curl_machine(
    dns_name: &str,
    ip: &str,
    port: u16,
    ca: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
    path: &str,
) -> Result<(i32, String, String)> {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--noproxy", "*"])
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{dns_name}:{port}:{ip}"));
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.arg(format!("https://{dns_name}:{port}{path}"));
    let out = cmd.output().await.context("running curl")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Interval of condition polls ([`flotilla_sandbox::util::wait_until`]) where the sandbox
/// has no notification to wait on (the daemon's status, Docker on a machine).
pub const POLL: Duration = Duration::from_millis(250);

/// A build script line that holds the job until the test lets it go ([`let_go`]): a job
/// that must span something (a daemon restart, a drain, an adoption) runs exactly until
/// then, however slow the host, instead of for a `sleep` guessed to be long enough.
/// [`wait_for_job_process`] finds it by [`HELD`].
pub const HOLD: &str = "while [ ! -e /tmp/flotilla-let-go ]; do sleep 1; done";

/// What a held job's container runs while it waits ([`HOLD`]'s `sleep`).
pub const HELD: &str = "sleep 1";

/// Lets a job held by [`HOLD`] go on: creates the file it waits for in its container.
pub async fn let_go(m: &flotilla_sandbox::EmulatedMachine, container: &str) -> Result<()> {
    flotilla_sandbox::docker_on(m, &["exec", container, "touch", "/tmp/flotilla-let-go"])
        .await
        .map(drop)
        .with_context(|| format!("letting the job in {container} go"))
}

/// The instances a job's prepare stage said it ran on ("Running on build machine m-..
/// (i-.., ...)"): read from the job's own output, no watching of machines needed.
pub fn machines_used(r: &flotilla_sandbox::JobResult) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for s in r.stages.iter().filter(|s| s.name == "prepare") {
        for text in [&s.stdout, &s.stderr] {
            for line in text.lines() {
                if let Some(rest) = line.split("Running on build machine ").nth(1) {
                    if let Some(inst) = rest
                        .split(['(', ',', ')', ' '])
                        .find(|w| w.starts_with("i-"))
                    {
                        out.insert(inst.to_owned());
                    }
                }
            }
        }
    }
    out
}

/// The label the executor puts on everything a job creates.
/// GitLab's job id on the objects of a job (the `flotilla.job` key label includes a hash
/// of the runner's temp dir, which tests driving whole jobs do not know).
pub const JOB_ID_LABEL: &str = "flotilla.job_id";

/// Waits until a container of job `job_id` runs a process whose command line contains
/// `needle` (e.g. the build script's `sleep`); returns the machine and the container id.
pub async fn wait_for_job_process(
    sb: &flotilla_sandbox::Sandbox,
    job_id: u64,
    needle: &str,
    timeout: Duration,
) -> Result<(flotilla_sandbox::EmulatedMachine, String)> {
    use flotilla_sandbox::docker_on;
    let filter = format!("label={JOB_ID_LABEL}={job_id}");
    flotilla_sandbox::util::wait_until(
        &format!("job {job_id} to run {needle:?}"),
        timeout,
        POLL,
        || async {
            for m in sb.machines() {
                let Ok(ids) = docker_on(&m, &["ps", "-q", "--filter", &filter]).await else {
                    continue;
                };
                for id in ids.lines() {
                    if let Ok(top) = docker_on(&m, &["top", id]).await {
                        if top.contains(needle) {
                            return Ok(Some((m.clone(), id.to_owned())));
                        }
                    }
                }
            }
            Ok(None)
        },
    )
    .await
    .with_context(|| sb.diagnostics())
}

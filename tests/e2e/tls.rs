//! A machine's dockerd talks only to clients holding a certificate from the fleet's CA; the
//! daemon keeps the stages' client certificate fresh.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla::pki::{
    CA_CERT_FILE, CA_KEY_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, CLIENT_PEM_FILE,
};
use flotilla_proto::bootstrap::{machine_dns_name, DOCKER_TLS_PORT};
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{Job, Outcome, Sandbox, SandboxOptions};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};

use crate::common::{bounded, curl_machine, TestCa};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_refuses_a_client_cert_from_another_ca_and_accepts_the_fleet_client_cert(
) -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            ..Default::default()
        })
        .await?;
        let state = sb.state_dir().to_owned();
        let machines = sb
            .emulator()
            .wait_running(1, Duration::from_secs(90))
            .await
            .with_context(|| sb.diagnostics())?;
        let m = &machines[0];
        let machine_id = m
            .machine_id
            .clone()
            .context("instance has no flotilla:machine tag")?;
        let dns = machine_dns_name(&machine_id);
        let (ca, cert, key) = (
            state.join("ca.pem"),
            state.join("client-cert.pem"),
            state.join("client-key.pem"),
        );
        let ca_key = state.join("ca-key.pem");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ca_key)?.permissions());
        ensure!(
            mode & 0o777 == 0o600,
            "{} has mode {mode:o}",
            ca_key.display()
        );

        let accepted = wait_until(
            "the fleet client to be accepted",
            Duration::from_secs(30),
            crate::common::POLL,
            || {
                let (dns, ip, ca, cert, key) = (
                    dns.clone(),
                    m.private_ip.clone(),
                    ca.clone(),
                    cert.clone(),
                    key.clone(),
                );
                async move {
                    let (code, out, err) = curl_machine(
                        &dns,
                        &ip,
                        DOCKER_TLS_PORT,
                        &ca,
                        Some((&cert, &key)),
                        "/_ping",
                    )
                    .await?;
                    Ok((code == 0 && out == "OK").then_some(()).or_else(|| {
                        tracing::info!("not yet: {code} {out} {err}");
                        None
                    }))
                }
            },
        )
        .await;
        accepted.with_context(|| sb.diagnostics())?;

        let dir = tempfile::tempdir()?;
        let other = TestCa::new("not the fleet CA")?.client("intruder")?;
        let (ocert, okey) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&ocert, &other.cert_pem)?;
        std::fs::write(&okey, &other.key_pem)?;
        let (code, out, err) = curl_machine(
            &dns,
            &m.private_ip,
            DOCKER_TLS_PORT,
            &ca,
            Some((&ocert, &okey)),
            "/_ping",
        )
        .await?;
        ensure!(
            code != 0 && out != "OK",
            "a client cert from another CA was accepted: {code} {out:?} {err}"
        );
        let (code, out, _) =
            curl_machine(&dns, &m.private_ip, DOCKER_TLS_PORT, &ca, None, "/_ping").await?;
        ensure!(
            code != 0 && out != "OK",
            "a client without certificate was accepted: {code} {out:?}"
        );
        // The server certificate names the machine, not some other machine.
        let (code, _, _) = curl_machine(
            &machine_dns_name("m-someone-else"),
            &m.private_ip,
            DOCKER_TLS_PORT,
            &ca,
            Some((&cert, &key)),
            "/_ping",
        )
        .await?;
        ensure!(
            code != 0,
            "the machine's certificate is valid for another machine's name"
        );
        sb.shutdown().await
    })
    .await
}

/// Writes `contents` to `path` by rename, as the daemon does (no reader sees half a file).
fn replace(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("planted");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_renewed_without_a_restart() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let sb = Sandbox::start(SandboxOptions {
            idle_count: 1,
            ..Default::default()
        })
        .await?;
        let state = sb.state_dir().to_owned();
        let machines = sb
            .emulator()
            .wait_running(1, Duration::from_secs(90))
            .await
            .with_context(|| sb.diagnostics())?;
        let m = &machines[0];
        let dns = machine_dns_name(m.machine_id.as_deref().context("no flotilla:machine tag")?);
        let ca = state.join(CA_CERT_FILE);

        // What a 365-day certificate looks like on day 366: issued by the fleet CA itself,
        // a year ago, expired yesterday.
        let issuer = Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(&ca)?,
            KeyPair::from_pem(&std::fs::read_to_string(state.join(CA_KEY_FILE))?)?,
        )?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(DnType::CommonName, "flotilla-stages");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Midnight of a day: a year ago, and at least a day ago.
        let day = |days_ago: i64| {
            use chrono::Datelike;
            let d = chrono::Utc::now() - chrono::Duration::days(days_ago);
            rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8)
        };
        p.not_before = day(366);
        p.not_after = day(2);
        let key = KeyPair::generate()?;
        let expired = p.signed_by(&key, &issuer)?;
        let (cert_pem, key_pem) = (expired.pem(), key.serialize_pem());

        // The machine refuses it: the failure the renewal exists to prevent.
        let dir = tempfile::tempdir()?;
        let both = dir.path().join("expired.pem");
        std::fs::write(&both, format!("{cert_pem}{key_pem}"))?;
        let (code, out, err) = curl_machine(
            &dns,
            &m.private_ip,
            DOCKER_TLS_PORT,
            &ca,
            Some((&both, &both)),
            "/_ping",
        )
        .await?;
        ensure!(
            code != 0 && out != "OK",
            "the machine accepted an expired client certificate: {code} {out:?} {err}"
        );

        // Put it in the daemon's state directory, under the running daemon.
        replace(&state.join(CLIENT_KEY_FILE), &key_pem)?;
        replace(&state.join(CLIENT_CERT_FILE), &cert_pem)?;
        let planted = format!("{cert_pem}{key_pem}");
        let client = state.join(CLIENT_PEM_FILE);
        replace(&client, &planted)?;

        // The daemon notices at its next check and writes a fresh one that the machine
        // accepts.
        wait_until(
            "the daemon to renew the client certificate",
            Duration::from_secs(60),
            crate::common::POLL,
            || {
                let (client, planted, dns, ip, ca) = (
                    client.clone(),
                    planted.clone(),
                    dns.clone(),
                    m.private_ip.clone(),
                    ca.clone(),
                );
                async move {
                    let now = std::fs::read_to_string(&client)?;
                    if now == planted {
                        return Ok(None);
                    }
                    let (code, out, err) = curl_machine(
                        &dns,
                        &ip,
                        DOCKER_TLS_PORT,
                        &ca,
                        Some((&client, &client)),
                        "/_ping",
                    )
                    .await?;
                    ensure!(
                        code == 0 && out == "OK",
                        "the renewed certificate is refused: {code} {out:?} {err}"
                    );
                    Ok(Some(()))
                }
            },
        )
        .await
        .with_context(|| sb.diagnostics())?;
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&client)?.permissions());
        ensure!(
            mode & 0o777 == 0o600,
            "{} has mode {mode:o}",
            client.display()
        );
        // The separate files are renewed too (docker --tlscert/--tlskey, curl).
        ensure!(
            std::fs::read_to_string(state.join(CLIENT_CERT_FILE))? != cert_pem,
            "client-cert.pem still holds the expired certificate"
        );

        // And a job runs, on the same daemon.
        let r = sb
            .run_job(Job::new(366, &["echo renewed-and-running"]))
            .await?;
        let ctx = || format!("{}\n{}", r.describe(), sb.diagnostics());
        ensure!(r.outcome == Outcome::Success, "{}", ctx());
        let log = std::fs::read_to_string(sb.daemon_log())?;
        ensure!(
            log.contains("renewed the stage client certificate"),
            "no renewal in the daemon log\n{}",
            ctx()
        );
        ensure!(
            log.matches("daemon starting").count() == 1,
            "the daemon was restarted\n{}",
            ctx()
        );
        sb.shutdown().await
    })
    .await
}

//! A machine's dockerd talks only to clients holding a certificate from the fleet's CA.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use flotilla_proto::bootstrap::{machine_dns_name, DOCKER_TLS_PORT};
use flotilla_sandbox::util::wait_until;
use flotilla_sandbox::{Sandbox, SandboxOptions};

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

//! A bollard client for one build machine, over mutual TLS.
//!
//! bollard's own `connect_with_ssl` does not fit (it trusts OS roots, verifies the IP, and
//! re-reads files per handshake), so this wraps a hyper-util client whose rustls connector
//! trusts only the fleet CA and verifies the machine's DNS name. Requests are pinned to
//! Docker API 1.41 (Docker 20.10+), which every supported dockerd speaks.

use std::sync::Arc;
use std::time::Duration;

use bollard::{ClientVersion, Docker};
use http_body_util::BodyExt;
use hyper_rustls::{FixedServerNameResolver, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

/// The API version Flotilla speaks to every machine.
pub(crate) const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error(
        "invalid machine server name {0:?}: a machine's dockerd is verified by a DNS name \
         (<machine id>.machine.flotilla.internal)"
    )]
    ServerName(String),
    #[error(
        "cannot set up a Docker client for {server_name} at https://{address}:{port}: {source}"
    )]
    Docker {
        server_name: String,
        address: String,
        port: u16,
        #[source]
        source: bollard::errors::Error,
    },
}

/// bollard's request body type is crate-private; name it through the public request type.
trait BodyOf {
    type Body;
}
impl<B> BodyOf for hyper::Request<B> {
    type Body = B;
}
type BodyType = <bollard::BollardRequest as BodyOf>::Body;
type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyType>;

fn https_client(
    tls: Arc<ClientConfig>,
    server_name: &str,
    connect_timeout: Duration,
) -> Result<HttpsClient, ConnectError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| ConnectError::ServerName(server_name.to_owned()))?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_only()
        .with_server_name_resolver(FixedServerNameResolver::new(name))
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}

/// Connects (lazily) to `https://address:port`, verifying `server_name`.
pub(crate) fn connect(
    tls: Arc<ClientConfig>,
    address: &str,
    port: u16,
    server_name: &str,
    timeout: Duration,
) -> Result<Docker, ConnectError> {
    let client = https_client(tls, server_name, timeout.min(Duration::from_secs(10)))?;
    let transport = move |mut req: bollard::BollardRequest| {
        let client = client.clone();
        async move {
            pin_api_version(&mut req);
            client
                .request(req)
                .await
                .map_err(bollard::errors::Error::from)
        }
    };
    let docker = Docker::connect_with_custom_transport(
        transport,
        Some(format!("https://{address}:{port}")),
        timeout.as_secs().max(1),
        &API_VERSION,
    )
    .map_err(|source| ConnectError::Docker {
        server_name: server_name.to_owned(),
        address: address.to_owned(),
        port,
        source,
    })?;
    Ok(docker)
}

/// bollard 0.21 drops the `/v1.xx` prefix when joining paths; put it back so requests mean
/// the same thing on every dockerd version.
fn pin_api_version(req: &mut bollard::BollardRequest) {
    let uri = req.uri();
    let path = uri.path();
    if path.starts_with("/v1.") {
        return;
    }
    let pq = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| path.to_owned());
    let versioned = format!(
        "/v{}.{}{}",
        API_VERSION.major_version, API_VERSION.minor_version, pq
    );
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = versioned.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(new_uri) = hyper::Uri::from_parts(parts) {
            *req.uri_mut() = new_uri;
        }
    }
}

/// Largest `/_ping` answer read: dockerd says `OK`; anything longer is not a dockerd.
const PING_BODY_LIMIT: usize = 1024;

/// One `GET /_ping` over mTLS: the readiness and health check. The whole exchange
/// (connect, handshake, answer, body) is bounded by `timeout` and the body by
/// [`PING_BODY_LIMIT`], so a machine that stalls or talks forever costs one timeout.
pub(crate) async fn ping(
    tls: Arc<ClientConfig>,
    address: &str,
    port: u16,
    server_name: &str,
    timeout: Duration,
) -> Result<(), String> {
    tokio::time::timeout(timeout, ping_once(tls, address, port, server_name, timeout))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}ms", timeout.as_millis())))
        .map_err(|e| format!("/_ping of {server_name} at {address}:{port}: {e}"))
}

async fn ping_once(
    tls: Arc<ClientConfig>,
    address: &str,
    port: u16,
    server_name: &str,
    timeout: Duration,
) -> Result<(), String> {
    let client = https_client(tls, server_name, timeout).map_err(|e| e.to_string())?;
    let uri: hyper::Uri = format!("https://{address}:{port}/_ping")
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| e.to_string())?;
    let req = hyper::Request::get(uri)
        .body(bollard::body_full(hyper::body::Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), PING_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    if status.is_success() && body.as_ref() == b"OK" {
        Ok(())
    } else {
        Err(format!("unexpected answer {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_machine_that_accepts_and_stalls_costs_one_timeout() {
        crate::tls::install_crypto_provider();
        let tls = Arc::new(
            ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts, then never says a word (no TLS handshake, no answer).
        let held = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        });
        let started = std::time::Instant::now();
        let r = ping(
            tls,
            "127.0.0.1",
            port,
            "m-x.machine.flotilla.internal",
            Duration::from_millis(300),
        )
        .await;
        let err = r.unwrap_err();
        assert!(err.contains("no answer within 300ms"), "{err}");
        assert!(err.contains("m-x.machine.flotilla.internal"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        held.abort();
    }
}

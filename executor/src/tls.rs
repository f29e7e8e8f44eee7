//! Mutual-TLS client configuration for talking to build machines' dockerd: trust only the
//! fleet CA, present the stage client certificate, verify the machine's DNS name (never the
//! IP, which EC2 recycles).
//!
//! The client certificate is read from `client.pem` (certificate and key in one file, so a
//! renewal is one rename and never pairs a new certificate with an old key), or from the
//! separate `client-cert.pem` / `client-key.pem` of a state directory written by an older
//! daemon. Stages read it at each start; the daemon holds it in a [`ClientCertSlot`] that
//! its renewal task refreshes in place.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

use crate::pki::{CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, CLIENT_PEM_FILE};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in PEM file")]
    Empty { path: PathBuf, what: &'static str },
    /// `what` names the files and what they were to be.
    #[error("{what}: {source}")]
    Material {
        what: String,
        #[source]
        source: rustls::Error,
    },
}

/// The fix for an unusable stage client certificate, said wherever one is refused.
const CLIENT_CERT_FIX: &str =
    "the daemon issues a new one at start and at every reconcile_interval; \
     restart it (`systemctl restart flotilla`) if this persists";

fn ca_material(path: &Path) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    move |source| TlsError::Material {
        what: format!("{} is not a usable fleet CA certificate", path.display()),
        source,
    }
}

fn client_material<'a>(
    cert: &'a Path,
    key: &'a Path,
) -> impl FnOnce(rustls::Error) -> TlsError + 'a {
    move |source| TlsError::Material {
        what: if cert == key {
            format!(
                "{} is not a usable client certificate and key ({CLIENT_CERT_FIX})",
                cert.display()
            )
        } else {
            format!(
                "{} and {} are not a usable client certificate and key ({CLIENT_CERT_FIX})",
                cert.display(),
                key.display()
            )
        },
        source,
    }
}

/// Installs the process-wide crypto provider once; the AWS SDK and rustls both use aws-lc.
pub fn install_crypto_provider() {
    // Err only means another caller installed it first, which is what we want anyway.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            path: path.to_owned(),
            what: "private key",
        })
}

/// A certificate chain and its key from PEM files (`cert` and `key` may be the same file).
pub fn read_identity(
    cert: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    Ok((certs(cert)?, key(key_path)?))
}

/// The stage client certificate and key in `state_dir`: `client.pem`, or where there is none
/// yet (an older daemon's state directory) the separate files.
pub fn load_client_identity(
    state_dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let (cert, key) = client_identity_paths(state_dir);
    read_identity(&cert, &key)
}

fn fleet_roots(state_dir: &Path) -> Result<RootCertStore, TlsError> {
    roots(&state_dir.join(CA_CERT_FILE))
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(ca_material(ca))?;
    }
    Ok(roots)
}

/// The files [`load_client_identity`] reads in `state_dir`: certificate, then key.
fn client_identity_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    let both = state_dir.join(CLIENT_PEM_FILE);
    if both.exists() {
        (both.clone(), both)
    } else {
        (
            state_dir.join(CLIENT_CERT_FILE),
            state_dir.join(CLIENT_KEY_FILE),
        )
    }
}

/// Client config from the files the daemon keeps in its state directory.
pub fn machine_client_config(state_dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    install_crypto_provider();
    let (cert_path, key_path) = client_identity_paths(state_dir);
    let (chain, key) = read_identity(&cert_path, &key_path)?;
    let config = ClientConfig::builder()
        .with_root_certificates(fleet_roots(state_dir)?)
        .with_client_auth_cert(chain, key)
        .map_err(client_material(&cert_path, &key_path))?;
    Ok(Arc::new(config))
}

/// The client certificate a long-lived client config presents, replaceable while the
/// config is in use: connections made after [`ClientCertSlot::reload`] present the new one.
#[derive(Debug)]
pub struct ClientCertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

/// The stage client certificate in `state_dir`, ready to present.
fn certified_key(state_dir: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let (cert_path, key_path) = client_identity_paths(state_dir);
    let (chain, key) = read_identity(&cert_path, &key_path)?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(client_material(&cert_path, &key_path))
}

impl ClientCertSlot {
    /// Loads the stage client certificate from `state_dir` (see [`load_client_identity`]).
    pub fn load(state_dir: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(certified_key(state_dir)?),
        })
    }

    /// Reads the certificate again; on error the one in use stays.
    pub fn reload(&self, state_dir: &Path) -> Result<(), TlsError> {
        let fresh = certified_key(state_dir)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// The end-entity certificate in use.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cert
            .first()
            .cloned()
    }
}

impl ResolvesClientCert for ClientCertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The daemon's client config (boot probes, health checks): like [`machine_client_config`],
/// with the client certificate in a slot the renewal task reloads.
pub fn reloadable_machine_client_config(
    state_dir: &Path,
) -> Result<(Arc<ClientConfig>, Arc<ClientCertSlot>), TlsError> {
    install_crypto_provider();
    let slot = Arc::new(ClientCertSlot::load(state_dir)?);
    let config = ClientConfig::builder()
        .with_root_certificates(fleet_roots(state_dir)?)
        .with_client_cert_resolver(slot.clone());
    Ok((Arc::new(config), slot))
}

pub fn client_config(
    ca: &Path,
    cert: &Path,
    key_path: &Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    install_crypto_provider();
    let config = ClientConfig::builder()
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certs(cert)?, key(key_path)?)
        .map_err(client_material(cert, key_path))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::FleetCa;
    use chrono::Utc;
    use flotilla_proto::bootstrap::machine_dns_name;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConfig, ServerConnection};

    /// A machine's side: its server certificate, and client certificates required from the
    /// fleet CA (what dockerd's `tlsverify` does).
    fn machine(dir: &Path, ca: &FleetCa, machine_id: &str) -> Arc<ServerConfig> {
        install_crypto_provider();
        let issued = ca.issue_server(machine_id).unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder(Arc::new(fleet_roots(dir).unwrap()))
                .build()
                .unwrap();
        let chain = rustls_pemfile::certs(&mut issued.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut issued.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        Arc::new(
            ServerConfig::builder()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap(),
        )
    }

    /// A full in-memory TLS handshake; the first error either side raises.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut c = ClientConnection::new(client, name)?;
        let mut s = ServerConnection::new(server)?;
        let mut buf = Vec::new();
        for _ in 0..10 {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn stage_and_machine_complete_mutual_tls_under_the_name_constrained_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path(), 0).unwrap();
        let server = machine(dir.path(), &ca, "m-1");
        let client = machine_client_config(dir.path()).unwrap();
        handshake(client.clone(), server.clone(), &machine_dns_name("m-1")).unwrap();
        // The machine is verified by its own name, not another machine's.
        let err = handshake(client, server, &machine_dns_name("m-2")).unwrap_err();
        assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
        // The separate files, as an older daemon left them, work the same.
        std::fs::remove_file(dir.path().join(CLIENT_PEM_FILE)).unwrap();
        let legacy = machine_client_config(dir.path()).unwrap();
        handshake(
            legacy,
            machine(dir.path(), &ca, "m-3"),
            &machine_dns_name("m-3"),
        )
        .unwrap();
    }

    #[test]
    fn a_renewed_client_certificate_is_presented_without_a_new_config() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path(), 0).unwrap();
        let now = Utc::now();
        // An expired certificate, as on day 366 with the old 365-day certificates.
        let old = ca
            .issue_client("flotilla-stages", now - chrono::Duration::days(40))
            .unwrap();
        std::fs::write(
            dir.path().join(CLIENT_PEM_FILE),
            format!("{}{}", old.cert_pem, old.key_pem),
        )
        .unwrap();
        let (client, slot) = reloadable_machine_client_config(dir.path()).unwrap();
        let server = machine(dir.path(), &ca, "m-1");
        let name = machine_dns_name("m-1");
        let err = handshake(client.clone(), server.clone(), &name).unwrap_err();
        assert!(format!("{err:?}").contains("Expired"), "{err:?}");
        let renewed = ca.renew_client_cert(dir.path(), now).unwrap();
        assert!(renewed.is_some());
        slot.reload(dir.path()).unwrap();
        handshake(client, server, &name).unwrap();
    }

    #[test]
    fn a_client_certificate_with_the_wrong_key_is_refused_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        FleetCa::load_or_create(dir.path(), 0).unwrap();
        let other = tempfile::tempdir().unwrap();
        FleetCa::load_or_create(other.path(), 0).unwrap();
        // This fleet's certificate with another fleet's key.
        let cert_pem = std::fs::read_to_string(dir.path().join(CLIENT_CERT_FILE)).unwrap();
        let key_pem = std::fs::read_to_string(other.path().join(CLIENT_KEY_FILE)).unwrap();
        std::fs::write(
            dir.path().join(CLIENT_PEM_FILE),
            format!("{cert_pem}{key_pem}"),
        )
        .unwrap();
        let err = machine_client_config(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("client.pem") && err.contains("restart"),
            "{err}"
        );
        assert!(!err.contains("PRIVATE KEY"), "no key material in: {err}");
    }

    #[test]
    fn a_bad_reload_keeps_the_certificate_in_use() {
        let dir = tempfile::tempdir().unwrap();
        FleetCa::load_or_create(dir.path(), 0).unwrap();
        let slot = ClientCertSlot::load(dir.path()).unwrap();
        let before = slot.leaf();
        std::fs::write(dir.path().join(CLIENT_PEM_FILE), "garbage").unwrap();
        slot.reload(dir.path()).unwrap_err();
        assert_eq!(slot.leaf(), before);
    }
}

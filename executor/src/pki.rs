//! The fleet's private CA: created on the daemon's first start, kept in the state directory
//! (private keys mode 0600), issuing one server certificate per machine and the client
//! certificate the stages present. The CA key never leaves the runner host.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flotilla_proto::bootstrap::machine_dns_name;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable PEM key or certificate: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: the CA key is readable by others (mode {mode:o}); expected 0600")]
    KeyTooOpen { path: PathBuf, mode: u32 },
}

/// A certificate and its private key, both PEM.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The loaded CA, able to issue certificates.
pub struct FleetCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

fn ca_params(fleet: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Flotilla");
    dn.push(DnType::CommonName, format!("Flotilla CA ({fleet})"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a file with the given mode from the start (no window where a key is world-readable).
fn write_private(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

impl FleetCa {
    /// Loads the CA from `dir`, creating it (and the stage client certificate) on first use.
    pub fn load_or_create(dir: &Path, fleet: &str) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let ca = if key_path.exists() && cert_path.exists() {
            let mode = fs::metadata(&key_path)
                .map_err(io_err(&key_path))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(PkiError::KeyTooOpen {
                    path: key_path,
                    mode,
                });
            }
            let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Parse {
                path: key_path.clone(),
                source,
            })?;
            let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            Self {
                issuer: Issuer::new(ca_params(fleet), key),
                cert_pem,
            }
        } else {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            let key = KeyPair::generate()?;
            let mut params = ca_params(fleet);
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::hours(1);
            params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
            let cert = params.self_signed(&key)?;
            write_private(&key_path, &key.serialize_pem(), 0o600)?;
            write_private(&cert_path, &cert.pem(), 0o644)?;
            tracing::info!(path = %cert_path.display(), "created fleet CA");
            Self {
                issuer: Issuer::new(ca_params(fleet), key),
                cert_pem: cert.pem(),
            }
        };
        ca.ensure_client_cert(dir)?;
        Ok(ca)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(
        &self,
        names: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Flotilla");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate naming the machine by [`machine_dns_name`] only: clients
    /// connect to the private IP but verify this name, so a recycled IP cannot impersonate.
    pub fn issue_server(&self, machine_id: &str) -> Result<IssuedCert, PkiError> {
        self.issue(
            vec![machine_dns_name(machine_id)],
            machine_id,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    pub fn issue_client(&self, name: &str) -> Result<IssuedCert, PkiError> {
        self.issue(vec![], name, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn ensure_client_cert(&self, dir: &Path) -> Result<(), PkiError> {
        let cert_path = dir.join(CLIENT_CERT_FILE);
        let key_path = dir.join(CLIENT_KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            return Ok(());
        }
        let issued = self.issue_client("flotilla-stages")?;
        write_private(&key_path, &issued.key_pem, 0o600)?;
        write_private(&cert_path, &issued.cert_pem, 0o644)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_with_private_key_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path(), "t").unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(dir.path().join(CLIENT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = FleetCa::load_or_create(dir.path(), "t").unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
    }

    #[test]
    fn world_readable_ca_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        FleetCa::load_or_create(dir.path(), "t").unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = FleetCa::load_or_create(dir.path(), "t").err().unwrap();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
    }
}

//! The fleet's private CA: created on the daemon's first start, kept in the state directory
//! (private keys mode 0600), issuing one server certificate per machine and the client
//! certificate the stages present. The CA key never leaves the runner host.
//!
//! Lifetimes: the CA 10 years; machine server certificates [`SERVER_CERT_LIFETIME`] (30
//! days; machines retire at their class's `max_age`, well before); the stage client
//! certificate [`CLIENT_CERT_LIFETIME`] (30 days), renewed by the daemon once less than a
//! third of it is left. Nothing can revoke a certificate, so a short lifetime is what bounds
//! the use of a leaked one.
//!
//! A stopped machine (the stopped warm pool) keeps the server certificate it was launched
//! with: nothing is reissued at a start. Its lifetime still runs from the launch, and so
//! does `max_age`: the plan retires a stopped machine at `max_age` since its launch, a
//! started one that answers past it is retired before it is ever idle
//! (`Pool::mark_ready_retiring`), and validation keeps `max_age + lease_timeout` a day
//! short of the 30 days. So however long a machine sleeps, no job uses it past its
//! certificate.
//!
//! The CA's identity is its own certificate on disk (a name chosen once at creation, never
//! derived from the fleet name), and it is never recreated while machines that trust it may
//! still run. New CAs carry name constraints: they can only vouch for names under
//! [`MACHINE_DNS_SUFFIX`], never for an IP address, and cannot sign other CAs.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use flotilla_proto::bootstrap::{machine_dns_name, MACHINE_DNS_SUFFIX, SERVER_CERT_LIFETIME};
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The stage client certificate and its key in one PEM file (mode 0600): replaced by one
/// rename, so a stage never reads a new certificate with an old key. What Flotilla reads.
pub const CLIENT_PEM_FILE: &str = "client.pem";
/// The same certificate and key as separate files, for tools that want them apart (docker
/// `--tlscert`/`--tlskey`, curl). Rewritten after [`CLIENT_PEM_FILE`] at each renewal;
/// Flotilla reads them only from a state directory that has no `client.pem` yet.
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a stage client certificate is valid. It lives on every runner host's disk and
/// cannot be revoked, so a short lifetime bounds what a leaked copy is worth; 30 days leaves
/// ten days between the renewal and the expiry for a failing renewal to be noticed (an
/// error in the daemon log at every check) and fixed.
pub const CLIENT_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// Leaf certificates start an hour in the past, for clocks slightly behind the daemon's.
const BACKDATE: Duration = Duration::hours(1);
/// The CA's common name; a random tail tells apart the CAs of different state directories.
const CA_NAME: &str = "Flotilla fleet CA";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a usable PEM key or certificate: {source}. Restore it from a backup of \
         the state directory"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    /// `what` names the certificate: the CA and its directory, a machine and its DNS name,
    /// or the stage client certificate and its file.
    #[error("cannot generate {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "{path}: the CA key is readable by others (mode {mode:o}); run `chmod 600 {path}` \
         (and check who could have read it)"
    )]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error(
        "the fleet CA ({CA_CERT_FILE} and {CA_KEY_FILE}) is missing from {} but \
         {machines} machine(s) on record (in the state file, or being adopted with \
         --adopt) have dockerd that trust only that CA: a new CA would \
         leave every one of them unreachable, so none is created. Either restore \
         {CA_CERT_FILE} and {CA_KEY_FILE} (mode 0600) from a backup of {}, or retire those \
         machines: move state.json and the journal-*.jsonl files out of {} (a state \
         directory without machines gets a new CA), start the daemon, and run `flotilla \
         audit --terminate` to terminate the old machines at once (they are the fleet's \
         orphans now; otherwise they go after orphan_grace)",
        dir.display(), dir.display(), dir.display()
    )]
    CaMissing { dir: PathBuf, machines: usize },
    #[error(
        "{present} exists but {missing} does not: a CA is never recreated over half of \
         one. Restore {missing} from a backup of {}; or, if no machine was ever launched \
         with this CA, remove {present} too to get a new one",
        dir.display()
    )]
    CaIncomplete {
        dir: PathBuf,
        present: PathBuf,
        missing: PathBuf,
    },
}

/// A certificate and its private key, both PEM.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

/// Why the stage client certificate is issued anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewReason {
    Missing,
    /// Unreadable, not signed by the current CA, not a client certificate, or its key does
    /// not match.
    Unusable(String),
    Expired,
    NotYetValid,
    /// Less than a third of its lifetime left.
    ExpiresSoon,
}

impl std::fmt::Display for RenewReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => f.write_str("missing"),
            Self::Unusable(why) => write!(f, "unusable: {why}"),
            Self::Expired => f.write_str("expired"),
            Self::NotYetValid => f.write_str("not valid yet (clock moved back?)"),
            Self::ExpiresSoon => f.write_str("less than a third of its lifetime left"),
        }
    }
}

/// Whether a certificate valid over `v` should be replaced at `now`: once expired, not yet
/// valid, or with less than a third of its lifetime left. Pure.
pub fn renewal_due(v: &Validity, now: DateTime<Utc>) -> Option<RenewReason> {
    if now >= v.not_after {
        return Some(RenewReason::Expired);
    }
    if now < v.not_before {
        return Some(RenewReason::NotYetValid);
    }
    let lifetime = v.not_after - v.not_before;
    let left = v.not_after - now;
    (left * 3 < lifetime).then_some(RenewReason::ExpiresSoon)
}

/// The state of the stage client certificate on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCertCheck {
    Usable(Validity),
    Renew(RenewReason),
}

/// A renewal done by [`FleetCa::renew_client_cert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    pub reason: RenewReason,
    pub validity: Validity,
}

/// The loaded CA, able to issue certificates.
pub struct FleetCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

fn to_time(t: DateTime<Utc>) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.timestamp()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn to_chrono(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(t, 0).unwrap_or_default()
}

/// Parameters of a new CA: a name of its own, usable only for machine names.
fn new_ca_params(now: DateTime<Utc>) -> CertificateParams {
    use rand::Rng;
    let tail: String = (0..8)
        .map(|_| char::from(b"0123456789abcdef"[rand::rng().random_range(0..16)]))
        .collect();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Flotilla");
    dn.push(DnType::CommonName, format!("{CA_NAME} {tail}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(MACHINE_DNS_SUFFIX.into())],
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    params.not_before = to_time(now) - BACKDATE;
    params.not_after = to_time(now) + Duration::days(CA_VALIDITY_DAYS);
    params
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Replaces `path` atomically (temporary file, fsync, rename, fsync of the directory), with
/// `mode` from the start: no reader sees half a file, no window where a key is readable.
fn write_private(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    // A leftover temporary file keeps its old mode through `create`.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

fn parse_der(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, String> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| format!("not an X.509 certificate: {e}"))
}

/// When the DER certificate `der` is valid.
pub fn validity_of(der: &[u8]) -> Result<Validity, String> {
    let c = parse_der(der)?;
    Ok(Validity {
        not_before: to_chrono(c.validity().not_before.timestamp()),
        not_after: to_chrono(c.validity().not_after.timestamp()),
    })
}

/// The certificate chain and private key in one PEM file, `None` when there is no file.
/// (`tls` reads it the same way to present it; the CA reads it only to judge it.)
fn read_pem_identity(
    path: &Path,
) -> Result<
    Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
    String,
> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let chain: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate found in PEM file",
            path.display()
        ));
    }
    let key = rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key found in PEM file", path.display()))?;
    Ok(Some((chain, key)))
}

impl FleetCa {
    /// Loads the CA from `dir`, creating it on a state directory without one, where
    /// `machines_on_record` (machines in the state file) is zero; then makes sure the stage
    /// client certificate is there and fresh.
    pub fn load_or_create(dir: &Path, machines_on_record: usize) -> Result<Self, PkiError> {
        let ca = Self::load_or_create_ca(dir, machines_on_record, Utc::now())?;
        if let Some(r) = ca.renew_client_cert(dir, Utc::now())? {
            tracing::info!(
                reason = %r.reason,
                not_after = %r.validity.not_after,
                "issued the stage client certificate"
            );
        }
        Ok(ca)
    }

    fn load_or_create_ca(
        dir: &Path,
        machines_on_record: usize,
        now: DateTime<Utc>,
    ) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path, now),
            (true, false) | (false, true) => {
                let (present, missing) = if cert_path.exists() {
                    (cert_path, key_path)
                } else {
                    (key_path, cert_path)
                };
                Err(PkiError::CaIncomplete {
                    dir: dir.to_owned(),
                    present,
                    missing,
                })
            }
            (false, false) if machines_on_record > 0 => Err(PkiError::CaMissing {
                dir: dir.to_owned(),
                machines: machines_on_record,
            }),
            (false, false) => Self::create(dir, &cert_path, &key_path, now),
        }
    }

    fn load(cert_path: &Path, key_path: &Path, now: DateTime<Utc>) -> Result<Self, PkiError> {
        let mode = fs::metadata(key_path)
            .map_err(io_err(key_path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(PkiError::KeyTooOpen {
                path: key_path.to_owned(),
                mode,
            });
        }
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Parse {
            path: key_path.to_owned(),
            source,
        })?;
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let parse_err = |source| PkiError::Parse {
            path: cert_path.to_owned(),
            source,
        };
        // The issuer name comes from the certificate itself: what it was created with,
        // whatever the fleet is called today.
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(parse_err)?;
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or(rcgen::Error::CouldNotParseCertificate)
            .map_err(parse_err)?;
        if let Ok(c) = parse_der(&cert_der) {
            if !matches!(c.name_constraints(), Ok(Some(_))) {
                tracing::warn!(
                    path = %cert_path.display(),
                    "the fleet CA has no name constraints (it predates them): its key could \
                     vouch for any name. A CA made on an empty state directory has them"
                );
            }
            let expires = to_chrono(c.validity().not_after.timestamp());
            if expires - now < chrono::Duration::days(365) {
                tracing::warn!(
                    path = %cert_path.display(),
                    %expires,
                    "the fleet CA expires within a year; replacing it means retiring the \
                     fleet (see the CA section of the README)"
                );
            }
        }
        Ok(Self {
            issuer,
            cert_pem,
            cert_der,
        })
    }

    fn create(
        dir: &Path,
        cert_path: &Path,
        key_path: &Path,
        now: DateTime<Utc>,
    ) -> Result<Self, PkiError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let generate = |source| PkiError::Generate {
            what: format!("the fleet CA {}", cert_path.display()),
            source,
        };
        let key = KeyPair::generate().map_err(generate)?;
        let params = new_ca_params(now);
        let cert = params.self_signed(&key).map_err(generate)?;
        write_private(key_path, &key.serialize_pem(), 0o600)?;
        write_private(cert_path, &cert.pem(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "created fleet CA");
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(
        &self,
        names: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        now: DateTime<Utc>,
        lifetime: std::time::Duration,
    ) -> Result<IssuedCert, PkiError> {
        let generate = |source| PkiError::Generate {
            what: match names.first() {
                Some(dns) => format!("the server certificate of {common_name} ({dns})"),
                None => format!("the client certificate {common_name}"),
            },
            source,
        };
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = CertificateParams::new(names.clone()).map_err(generate)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Flotilla");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.not_before = to_time(now) - BACKDATE;
        params.not_after = to_time(now) + Duration::seconds(lifetime.as_secs() as i64);
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate naming the machine by [`machine_dns_name`] only: clients
    /// connect to the private IP but verify this name, so a recycled IP cannot impersonate.
    /// Valid for [`SERVER_CERT_LIFETIME`].
    pub fn issue_server(&self, machine_id: &str) -> Result<IssuedCert, PkiError> {
        self.issue(
            vec![machine_dns_name(machine_id)],
            machine_id,
            ExtendedKeyUsagePurpose::ServerAuth,
            Utc::now(),
            SERVER_CERT_LIFETIME,
        )
    }

    /// A client certificate (no subject alternative name, so the CA's name constraints do
    /// not apply to it) valid for [`CLIENT_CERT_LIFETIME`] from `now`.
    pub fn issue_client(&self, name: &str, now: DateTime<Utc>) -> Result<IssuedCert, PkiError> {
        self.issue(
            vec![],
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
            now,
            CLIENT_CERT_LIFETIME,
        )
    }

    /// Checks the stage client certificate in `dir` ([`CLIENT_PEM_FILE`]) as a machine's
    /// dockerd would at `now` (signed by this CA, a client certificate, its key matching),
    /// and whether it is due for renewal. One small file read and parse: cheap enough for
    /// every reconcile pass. A state directory with only the separate files (an older
    /// daemon's) gets `client.pem` this way.
    pub fn check_client_cert(&self, dir: &Path, now: DateTime<Utc>) -> ClientCertCheck {
        let (chain, key) = match read_pem_identity(&dir.join(CLIENT_PEM_FILE)) {
            Ok(Some(identity)) => identity,
            Ok(None) => return ClientCertCheck::Renew(RenewReason::Missing),
            Err(why) => return ClientCertCheck::Renew(RenewReason::Unusable(why)),
        };
        let unusable = |why: String| {
            ClientCertCheck::Renew(RenewReason::Unusable(format!("{CLIENT_PEM_FILE}: {why}")))
        };
        let Some(leaf) = chain.first() else {
            return unusable("no certificate".into());
        };
        let validity = match validity_of(leaf) {
            Ok(v) => v,
            Err(e) => return unusable(e),
        };
        if let Some(reason @ (RenewReason::Expired | RenewReason::NotYetValid)) =
            renewal_due(&validity, now)
        {
            return ClientCertCheck::Renew(reason);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        if let Err(e) = rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider) {
            return unusable(format!("the key does not match the certificate: {e}"));
        }
        if let Err(e) = self.verify_client(leaf, &chain[1..], now) {
            return unusable(format!("not accepted under the fleet CA: {e}"));
        }
        match renewal_due(&validity, now) {
            Some(reason) => ClientCertCheck::Renew(reason),
            None => ClientCertCheck::Usable(validity),
        }
    }

    /// Verifies a client certificate chain against this CA alone, at `now`.
    fn verify_client(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| e.to_string())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(now.timestamp()).unwrap_or(0),
        ));
        verifier
            .verify_client_cert(leaf, intermediates, at)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Issues the stage client certificate anew when [`FleetCa::check_client_cert`] says
    /// so, and writes it: [`CLIENT_PEM_FILE`] first (one rename: a stage reads the old pair
    /// or the new one, never a mix), then the separate files for other tools.
    pub fn renew_client_cert(
        &self,
        dir: &Path,
        now: DateTime<Utc>,
    ) -> Result<Option<Renewed>, PkiError> {
        let reason = match self.check_client_cert(dir, now) {
            ClientCertCheck::Usable(_) => return Ok(None),
            ClientCertCheck::Renew(reason) => reason,
        };
        let issued = self.issue_client("flotilla-stages", now)?;
        let both = format!("{}{}", issued.cert_pem, issued.key_pem);
        write_private(&dir.join(CLIENT_PEM_FILE), &both, 0o600)?;
        write_private(&dir.join(CLIENT_KEY_FILE), &issued.key_pem, 0o600)?;
        write_private(&dir.join(CLIENT_CERT_FILE), &issued.cert_pem, 0o644)?;
        let validity = rustls_pemfile::certs(&mut issued.cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .and_then(|der| validity_of(&der).ok())
            .unwrap_or(Validity {
                not_before: now,
                not_after: now,
            });
        Ok(Some(Renewed { reason, validity }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(days: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000, 0).unwrap() + chrono::Duration::days(days)
    }

    fn v(from: i64, to: i64) -> Validity {
        Validity {
            not_before: t(from),
            not_after: t(to),
        }
    }

    #[test]
    fn renewal_is_due_with_less_than_a_third_of_the_lifetime_left() {
        // 30 days: kept until 10 days are left, renewed from then on.
        assert_eq!(renewal_due(&v(0, 30), t(0)), None);
        assert_eq!(renewal_due(&v(0, 30), t(20)), None);
        assert_eq!(
            renewal_due(&v(0, 30), t(20) + chrono::Duration::seconds(1)),
            Some(RenewReason::ExpiresSoon)
        );
        assert_eq!(
            renewal_due(&v(0, 30), t(30)),
            Some(RenewReason::Expired),
            "expired at not_after"
        );
        assert_eq!(renewal_due(&v(0, 365), t(366)), Some(RenewReason::Expired));
        assert_eq!(renewal_due(&v(5, 35), t(4)), Some(RenewReason::NotYetValid));
    }

    fn fresh() -> (tempfile::TempDir, FleetCa) {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path(), 0).unwrap();
        (dir, ca)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ca_is_created_once_with_private_key_mode_0600() {
        let (dir, ca) = fresh();
        assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.path().join(CLIENT_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.path().join(CLIENT_PEM_FILE)), 0o600);
        let again = FleetCa::load_or_create(dir.path(), 3).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
    }

    #[test]
    fn world_readable_ca_key_is_refused() {
        let (dir, _) = fresh();
        let key = dir.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = FleetCa::load_or_create(dir.path(), 0).err().unwrap();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        assert!(err.to_string().contains("chmod 600"), "the fix: {err}");
    }

    #[test]
    fn missing_ca_with_machines_on_record_is_refused_not_recreated() {
        let (dir, _) = fresh();
        for f in [CA_CERT_FILE, CA_KEY_FILE] {
            fs::remove_file(dir.path().join(f)).unwrap();
        }
        let err = FleetCa::load_or_create(dir.path(), 2).err().unwrap();
        let msg = err.to_string();
        assert!(
            matches!(err, PkiError::CaMissing { machines: 2, .. }),
            "{msg}"
        );
        for needle in [
            "ca.pem",
            "ca-key.pem",
            "backup",
            "state.json",
            "audit --terminate",
        ] {
            assert!(msg.contains(needle), "{needle} not in: {msg}");
        }
        assert!(
            !dir.path().join(CA_CERT_FILE).exists(),
            "no new CA was made"
        );
        // With no machine on record, a new CA (and a client certificate from it).
        let ca = FleetCa::load_or_create(dir.path(), 0).unwrap();
        assert!(matches!(
            ca.check_client_cert(dir.path(), Utc::now()),
            ClientCertCheck::Usable(_)
        ));
    }

    #[test]
    fn half_a_ca_is_refused_even_without_machines() {
        let (dir, _) = fresh();
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = FleetCa::load_or_create(dir.path(), 0).err().unwrap();
        assert!(matches!(err, PkiError::CaIncomplete { .. }), "{err}");
        assert!(err.to_string().contains("ca-key.pem does not"), "{err}");
    }

    #[test]
    fn ca_name_does_not_depend_on_the_fleet_and_survives_a_reload() {
        let (dir, ca) = fresh();
        let c = fs::read(dir.path().join(CA_CERT_FILE)).unwrap();
        let der = rustls_pemfile::certs(&mut c.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let subject = parse_der(&der).unwrap().subject().to_string();
        assert!(subject.contains(CA_NAME), "{subject}");
        // Certificates issued after a reload chain to the CA on disk.
        let reloaded = FleetCa::load_or_create(dir.path(), 1).unwrap();
        assert_eq!(reloaded.cert_pem(), ca.cert_pem());
        let leaf = reloaded.issue_server("m-1").unwrap();
        let leaf_der = rustls_pemfile::certs(&mut leaf.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(parse_der(&leaf_der).unwrap().issuer().to_string(), subject);
    }

    /// A CA made before name constraints, with the fleet in its name, as older daemons did.
    #[test]
    fn a_ca_from_an_older_daemon_keeps_its_name_and_still_issues() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Flotilla CA (old-fleet-name)");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        write_private(&dir.path().join(CA_KEY_FILE), &key.serialize_pem(), 0o600).unwrap();
        write_private(&dir.path().join(CA_CERT_FILE), &cert.pem(), 0o644).unwrap();
        let ca = FleetCa::load_or_create(dir.path(), 1).unwrap();
        let server = ca.issue_server("m-1").unwrap();
        verify_server(&ca, &server.cert_pem, &machine_dns_name("m-1")).unwrap();
        assert!(matches!(
            ca.check_client_cert(dir.path(), Utc::now()),
            ClientCertCheck::Usable(_)
        ));
    }

    fn verify_server(ca: &FleetCa, cert_pem: &str, name: &str) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn name_constraints_confine_the_ca_to_machine_names() {
        let (dir, ca) = fresh();
        let now = Utc::now();
        let day = std::time::Duration::from_secs(86_400);
        // A machine certificate verifies.
        let machine = ca.issue_server("m-ok").unwrap();
        verify_server(&ca, &machine.cert_pem, &machine_dns_name("m-ok")).unwrap();
        // What a stolen CA key could mint for another name is refused by the client's
        // verifier, even when the client is asked for exactly that name.
        for other in ["gitlab.example.com", "flotilla.internal", "evil.internal"] {
            let forged = ca
                .issue(
                    vec![other.into()],
                    other,
                    ExtendedKeyUsagePurpose::ServerAuth,
                    now,
                    day,
                )
                .unwrap();
            let err = verify_server(&ca, &forged.cert_pem, other).unwrap_err();
            assert!(
                format!("{err:?}").contains("NameConstraint"),
                "{other}: {err:?}"
            );
        }
        let forged_ip = ca
            .issue(
                vec!["127.0.0.1".into()],
                "ip",
                ExtendedKeyUsagePurpose::ServerAuth,
                now,
                day,
            )
            .unwrap();
        verify_server(&ca, &forged_ip.cert_pem, "127.0.0.1").unwrap_err();
        // The stage client certificate (no SAN) is not affected by the constraints.
        assert!(matches!(
            ca.check_client_cert(dir.path(), now),
            ClientCertCheck::Usable(_)
        ));
    }

    /// Replaces the client certificate files with one issued by `ca` over `validity`.
    fn plant_client(dir: &Path, ca: &FleetCa, from: DateTime<Utc>, days: u64) {
        let c = ca
            .issue(
                vec![],
                "flotilla-stages",
                ExtendedKeyUsagePurpose::ClientAuth,
                from,
                std::time::Duration::from_secs(days * 86_400),
            )
            .unwrap();
        write_private(
            &dir.join(CLIENT_PEM_FILE),
            &format!("{}{}", c.cert_pem, c.key_pem),
            0o600,
        )
        .unwrap();
    }

    #[test]
    fn expired_or_ageing_client_certificate_is_renewed_fresh_one_is_kept() {
        let (dir, ca) = fresh();
        let now = Utc::now();
        assert_eq!(ca.renew_client_cert(dir.path(), now).unwrap(), None);
        // 365 days old: the certificate older daemons issued, on day 366.
        plant_client(dir.path(), &ca, now - chrono::Duration::days(366), 365);
        assert_eq!(
            ca.check_client_cert(dir.path(), now),
            ClientCertCheck::Renew(RenewReason::Expired)
        );
        let r = ca.renew_client_cert(dir.path(), now).unwrap().unwrap();
        assert_eq!(r.reason, RenewReason::Expired);
        let left = r.validity.not_after - now;
        assert!(left >= chrono::Duration::days(29), "{left}");
        assert!(matches!(
            ca.check_client_cert(dir.path(), now),
            ClientCertCheck::Usable(_)
        ));
        // The separate files carry the same certificate and key.
        let both = fs::read_to_string(dir.path().join(CLIENT_PEM_FILE)).unwrap();
        let cert = fs::read_to_string(dir.path().join(CLIENT_CERT_FILE)).unwrap();
        let key = fs::read_to_string(dir.path().join(CLIENT_KEY_FILE)).unwrap();
        assert_eq!(both, format!("{cert}{key}"));
        // Twenty-one days into thirty: renewed ahead of expiry.
        plant_client(dir.path(), &ca, now - chrono::Duration::days(21), 30);
        assert_eq!(
            ca.renew_client_cert(dir.path(), now)
                .unwrap()
                .unwrap()
                .reason,
            RenewReason::ExpiresSoon
        );
        // Nineteen days in: kept.
        plant_client(dir.path(), &ca, now - chrono::Duration::days(19), 30);
        assert_eq!(ca.renew_client_cert(dir.path(), now).unwrap(), None);
    }

    #[test]
    fn client_certificate_from_another_ca_or_garbage_is_renewed() {
        let (dir, ca) = fresh();
        let other_dir = tempfile::tempdir().unwrap();
        let other = FleetCa::load_or_create(other_dir.path(), 0).unwrap();
        plant_client(dir.path(), &other, Utc::now(), 30);
        assert!(matches!(
            ca.check_client_cert(dir.path(), Utc::now()),
            ClientCertCheck::Renew(RenewReason::Unusable(_))
        ));
        fs::write(dir.path().join(CLIENT_PEM_FILE), "garbage").unwrap();
        assert!(matches!(
            ca.renew_client_cert(dir.path(), Utc::now())
                .unwrap()
                .unwrap()
                .reason,
            RenewReason::Unusable(_)
        ));
        for f in [CLIENT_PEM_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE] {
            fs::remove_file(dir.path().join(f)).unwrap();
        }
        assert_eq!(
            ca.renew_client_cert(dir.path(), Utc::now())
                .unwrap()
                .unwrap()
                .reason,
            RenewReason::Missing
        );
    }

    #[test]
    fn an_older_daemons_state_directory_gets_the_combined_file_at_start() {
        let (dir, _) = fresh();
        fs::remove_file(dir.path().join(CLIENT_PEM_FILE)).unwrap();
        // What stages read meanwhile: the separate files.
        crate::tls::machine_client_config(dir.path()).unwrap();
        FleetCa::load_or_create(dir.path(), 1).unwrap();
        assert_eq!(mode(&dir.path().join(CLIENT_PEM_FILE)), 0o600);
    }
}

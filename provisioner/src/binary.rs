//! The `flotilla` binary the runner hosts install, resolved before any network use: by
//! default the `flotilla` file next to the running `flotilla-provision`, or
//! `--flotilla-bin PATH`; nothing at all when the stack sets `runner_hosts.flotilla_url`
//! (that URL wins). The file is read once: its SHA-256 (which names its S3 key and goes
//! into the user data, so a new binary is a new user-data hash) and the architecture in
//! its ELF header (checked against the runner hosts' AMI before anything is launched).
//!
//! Invariant: no network here; the upload itself is `s3::ensure_binary`.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::stack::Stack;

/// The name of the binary, next to `flotilla-provision` and in its S3 key.
pub(crate) const BINARY_NAME: &str = "flotilla";
/// Where uploaded binaries live in the stack's bucket: `flotilla/bin/<sha256>/flotilla`.
/// The runner-host role may read exactly this prefix.
pub(crate) const BIN_PREFIX: &str = "flotilla/bin/";

/// The S3 key of a binary with this SHA-256 (lower-case hex).
pub(crate) fn s3_key(sha256: &str) -> String {
    format!("{BIN_PREFIX}{sha256}/{BINARY_NAME}")
}

/// A local `flotilla` binary to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBinary {
    pub(crate) path: PathBuf,
    /// Lower-case hex.
    pub(crate) sha256: String,
    pub(crate) size: u64,
    /// As EC2 names image architectures (`x86_64`, `arm64`), from the ELF header.
    pub(crate) arch: String,
}

impl LocalBinary {
    pub(crate) fn key(&self) -> String {
        s3_key(&self.sha256)
    }
}

/// Why no binary could be resolved; each names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error(
        "no flotilla binary to install on the runner hosts: {} (next to flotilla-provision) \
         does not exist; pass --flotilla-bin PATH (a Linux build of `cargo build --release -p \
         flotilla`), or set runner_hosts.flotilla_url and runner_hosts.flotilla_sha256 in {}",
        path.display(),
        stack.display()
    )]
    NoSibling { path: PathBuf, stack: PathBuf },
    #[error("cannot find the flotilla-provision executable to look for its sibling flotilla binary: {0}; pass --flotilla-bin PATH")]
    NoCurrentExe(#[source] std::io::Error),
    #[error("--flotilla-bin {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: not a 64-bit little-endian Linux executable (ELF) for x86_64 or arm64: the \
         runner hosts could not run it; pass --flotilla-bin with a Linux build",
        path.display()
    )]
    NotLinux { path: PathBuf },
}

/// Where the hosts get the binary from, as the command line resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// `runner_hosts.flotilla_url` is set: nothing to upload.
    Url,
    Local(LocalBinary),
}

/// Resolves the binary for `stack` (loaded from `stack_path`): `explicit` is
/// `--flotilla-bin`, `exe` the running executable (`std::env::current_exe`).
pub fn resolve(
    stack: &Stack,
    stack_path: &Path,
    explicit: Option<&Path>,
    exe: std::io::Result<PathBuf>,
) -> Result<Resolved, BinaryError> {
    if let Some(url) = &stack.runner_hosts.flotilla_url {
        if let Some(path) = explicit {
            tracing::warn!(
                "--flotilla-bin {} is ignored: runner_hosts.flotilla_url ({url}) is set and wins",
                path.display()
            );
        }
        return Ok(Resolved::Url);
    }
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => {
            let exe = exe.map_err(BinaryError::NoCurrentExe)?;
            let sibling = exe
                .parent()
                .map(|d| d.join(BINARY_NAME))
                .unwrap_or_else(|| PathBuf::from(BINARY_NAME));
            if !sibling.is_file() {
                return Err(BinaryError::NoSibling {
                    path: sibling,
                    stack: stack_path.to_owned(),
                });
            }
            sibling
        }
    };
    read(&path).map(Resolved::Local)
}

/// Hashes the file and reads the architecture from its ELF header.
pub(crate) fn read(path: &Path) -> Result<LocalBinary, BinaryError> {
    let io = |source| BinaryError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut header = Vec::with_capacity(64);
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        if header.len() < 64 {
            let take = (64 - header.len()).min(n);
            header.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let arch = elf_arch(&header).ok_or_else(|| BinaryError::NotLinux {
        path: path.to_owned(),
    })?;
    Ok(LocalBinary {
        path: path.to_owned(),
        sha256: hex::encode(hasher.finalize()),
        size,
        arch: arch.to_owned(),
    })
}

/// The EC2 architecture name of a 64-bit little-endian ELF executable's machine.
pub(crate) fn elf_arch(header: &[u8]) -> Option<&'static str> {
    const EM_X86_64: u16 = 62;
    const EM_AARCH64: u16 = 183;
    let magic_ok = header.get(..4) == Some(b"\x7fELF".as_slice());
    // EI_CLASS 2: 64-bit; EI_DATA 1: little-endian.
    if !magic_ok || header.get(4) != Some(&2) || header.get(5) != Some(&1) {
        return None;
    }
    let machine = u16::from_le_bytes([*header.get(18)?, *header.get(19)?]);
    match machine {
        EM_X86_64 => Some("x86_64"),
        EM_AARCH64 => Some("arm64"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::tests::GOOD;

    /// A minimal ELF header for `arch` (`x86_64` or `arm64`) followed by `payload`.
    fn fake_elf(arch: &str, payload: &[u8]) -> Vec<u8> {
        let machine: u16 = if arch == "arm64" { 183 } else { 62 };
        let mut v = vec![0u8; 64];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2;
        v[5] = 1;
        v[6] = 1;
        v[16] = 2; // ET_EXEC
        v[18..20].copy_from_slice(&machine.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn stack() -> Stack {
        Stack::from_toml(GOOD).unwrap()
    }

    #[test]
    fn the_sibling_of_the_executable_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("flotilla-provision");
        let bin = dir.path().join("flotilla");
        std::fs::write(&bin, fake_elf("x86_64", b"v1")).unwrap();
        let r = resolve(&stack(), Path::new("s.toml"), None, Ok(exe.clone())).unwrap();
        let Resolved::Local(b) = r else {
            panic!("{r:?}")
        };
        assert_eq!(b.path, bin);
        assert_eq!(b.arch, "x86_64");
        assert_eq!(
            b.sha256,
            hex::encode(Sha256::digest(fake_elf("x86_64", b"v1")))
        );
        assert_eq!(b.key(), format!("flotilla/bin/{}/flotilla", b.sha256));
        assert_eq!(b.size, 66);

        // An explicit path wins over the sibling.
        let other = dir.path().join("other");
        std::fs::write(&other, fake_elf("arm64", b"v2")).unwrap();
        let Resolved::Local(b) =
            resolve(&stack(), Path::new("s.toml"), Some(&other), Ok(exe)).unwrap()
        else {
            panic!()
        };
        assert_eq!((b.path, b.arch.as_str()), (other, "arm64"));
    }

    #[test]
    fn a_missing_sibling_names_both_options() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("flotilla-provision");
        let e = resolve(&stack(), Path::new("stack.toml"), None, Ok(exe))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&dir.path().join("flotilla").display().to_string()),
            "{e}"
        );
        assert!(e.contains("--flotilla-bin"), "{e}");
        assert!(e.contains("runner_hosts.flotilla_url"), "{e}");
        assert!(e.contains("stack.toml"), "{e}");
        let e = resolve(
            &stack(),
            Path::new("stack.toml"),
            Some(&dir.path().join("nope")),
            Ok(dir.path().join("x")),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--flotilla-bin "), "{e}");
    }

    #[test]
    fn a_url_in_the_stack_wins() {
        let mut s = stack();
        s.runner_hosts.flotilla_url = Some("https://example.com/flotilla".into());
        let r = resolve(
            &s,
            Path::new("s.toml"),
            None,
            Err(std::io::Error::other("no exe")),
        )
        .unwrap();
        assert_eq!(r, Resolved::Url);
    }

    #[test]
    fn only_linux_executables_are_accepted() {
        assert_eq!(elf_arch(&fake_elf("x86_64", b"")), Some("x86_64"));
        assert_eq!(elf_arch(&fake_elf("arm64", b"")), Some("arm64"));
        assert_eq!(elf_arch(b"\xcf\xfa\xed\xfe"), None, "Mach-O");
        assert_eq!(elf_arch(b"#!/bin/sh\n"), None);
        let mut big_endian = fake_elf("x86_64", b"");
        big_endian[5] = 2;
        assert_eq!(elf_arch(&big_endian), None);
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("flotilla");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let e = read(&script).unwrap_err().to_string();
        assert!(
            e.contains("not a 64-bit little-endian Linux executable"),
            "{e}"
        );
    }
}

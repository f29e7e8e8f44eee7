//! One-layer images assembled from host files ([`HostImage`]): the busybox base every
//! sandbox test image starts from, plus host executables with the shared libraries `ldd`
//! lists for them, inline files, symlinks and directories. The layer tar is deterministic
//! (fixed mtimes and owners, sorted paths, parents before children), so the same inputs
//! give the same digests; [`HostImage::build_cached`] keeps big layers on disk across
//! sandboxes.
//!
//! Owns: the layer tar format of the sandbox's images and the image config they carry.
//! [`crate::registry`] pushes what this builds.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::registry::{BusyboxImage, APPLETS};

/// Modification time of every tar entry (2026-01-01T00:00:00Z).
const MTIME: u64 = 1_767_225_600;

/// What one path of the image is made of.
#[derive(Debug, Clone)]
enum Node {
    Dir {
        mode: u32,
        uid: u64,
    },
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    /// A host file copied as it is at build time; with `libs`, also every library `ldd`
    /// lists for it, at their host paths.
    Host {
        path: PathBuf,
        libs: bool,
    },
    Symlink {
        target: String,
    },
}

/// A one-layer image made from host files. Paths are image paths (leading `/` optional);
/// a later entry for the same path replaces an earlier one; missing parent directories
/// are created (0755, root).
#[derive(Debug, Clone)]
pub struct HostImage {
    nodes: BTreeMap<String, Node>,
    config: serde_json::Map<String, serde_json::Value>,
}

impl HostImage {
    /// Starts from the same busybox base layer as the sandbox's test images (dirs,
    /// /bin/busybox + applets, /etc/passwd, /etc/group, /etc/flotilla-image = flavour).
    pub fn new(flavour: &str) -> Self {
        let mut img = Self {
            nodes: BTreeMap::new(),
            config: serde_json::Map::new(),
        };
        for (dir, mode, uid) in [
            ("bin", 0o755, 0),
            ("dev", 0o755, 0),
            ("etc", 0o755, 0),
            ("home", 0o755, 0),
            ("home/build", 0o755, 1000),
            ("proc", 0o555, 0),
            ("root", 0o700, 0),
            ("sys", 0o555, 0),
            ("tmp", 0o1777, 0),
            ("usr", 0o755, 0),
            ("usr/bin", 0o755, 0),
            ("var", 0o755, 0),
            ("var/tmp", 0o1777, 0),
        ] {
            img.nodes.insert(dir.to_owned(), Node::Dir { mode, uid });
        }
        img.nodes.insert(
            "bin/busybox".to_owned(),
            Node::Host {
                path: PathBuf::from("/bin/busybox"),
                libs: false,
            },
        );
        img = img.applets(APPLETS).symlink("/usr/bin/env", "/bin/busybox");
        img = img
            .file(
                "/etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\nbuild:x:1000:1000:build:/home/build:/bin/sh\n\
                  nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                    .to_vec(),
                0o644,
            )
            .file(
                "/etc/group",
                b"root:x:0:\nbuild:x:1000:\nnogroup:x:65534:\n".to_vec(),
                0o644,
            )
            .file(
                "/etc/flotilla-image",
                format!("{flavour}\n").into_bytes(),
                0o644,
            )
            .file("/etc/hostname", b"sandbox\n".to_vec(), 0o644);
        img.config(serde_json::json!({
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            "Labels": {"org.flotilla.sandbox.image": flavour},
        }))
    }

    /// Copies a host executable to `image_path` plus every shared library `ldd` lists for
    /// it (and the dynamic loader) at their host paths.
    pub fn binary(mut self, host_path: impl AsRef<Path>, image_path: &str) -> Self {
        self.nodes.insert(
            key(image_path),
            Node::Host {
                path: host_path.as_ref().to_owned(),
                libs: true,
            },
        );
        self
    }

    /// Copies a host file (following symlinks) to `image_path` as it is, without its
    /// libraries (data files, plugins whose libraries the image already has).
    pub fn host_file(mut self, host_path: impl AsRef<Path>, image_path: &str) -> Self {
        self.nodes.insert(
            key(image_path),
            Node::Host {
                path: host_path.as_ref().to_owned(),
                libs: false,
            },
        );
        self
    }

    /// Copies every regular file directly in the host directory `host_dir` to the same
    /// name under `image_dir` (not recursive; symlinks followed). A missing directory is
    /// an error of [`build`](Self::build).
    pub fn host_dir(mut self, host_dir: impl AsRef<Path>, image_dir: &str) -> Self {
        let host_dir = host_dir.as_ref();
        match std::fs::read_dir(host_dir) {
            Ok(entries) => {
                let mut names: Vec<_> = entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .map(|e| e.file_name())
                    .collect();
                names.sort();
                for name in names {
                    let image_path = format!(
                        "{}/{}",
                        image_dir.trim_end_matches('/'),
                        name.to_string_lossy()
                    );
                    self = self.host_file(host_dir.join(&name), &image_path);
                }
            }
            // Deferred: build() reports the missing path.
            Err(_) => self = self.host_file(host_dir, image_dir),
        }
        self
    }

    pub fn file(mut self, image_path: &str, bytes: Vec<u8>, mode: u32) -> Self {
        self.nodes
            .insert(key(image_path), Node::Bytes { data: bytes, mode });
        self
    }

    pub fn symlink(mut self, image_path: &str, target: &str) -> Self {
        self.nodes.insert(
            key(image_path),
            Node::Symlink {
                target: target.to_owned(),
            },
        );
        self
    }

    pub fn dir(mut self, image_path: &str, mode: u32) -> Self {
        self.nodes
            .insert(key(image_path), Node::Dir { mode, uid: 0 });
        self
    }

    /// Links busybox applets into /bin (`/bin/<applet> -> busybox`).
    pub fn applets(mut self, applets: &[&str]) -> Self {
        for a in applets {
            self = self.symlink(&format!("/bin/{a}"), "busybox");
        }
        self
    }

    /// Merged into the image config's "config" object (Entrypoint, Cmd, Env,
    /// ExposedPorts, WorkingDir...): each top-level key given replaces the base's.
    pub fn config(mut self, config: serde_json::Value) -> Self {
        if let serde_json::Value::Object(map) = config {
            for (k, v) in map {
                self.config.insert(k, v);
            }
        }
        self
    }

    /// Builds the layer (gzipped) and the image config.
    pub fn build(&self) -> Result<BusyboxImage> {
        let entries = self.resolve()?;
        let (layer_gz, diff_id) = write_layer(&entries, Vec::new())?;
        self.image(layer_gz, &diff_id)
    }

    /// [`build`](Self::build), with the layer kept under `cache_dir` keyed by the sha256 of
    /// the inputs (image paths, modes, inline bytes, and each host file's path, size,
    /// mtime and inode): only the first build of the same inputs on this host pays for
    /// the tar and gzip. Safe across processes (a lock per key).
    pub fn build_cached(&self, cache_dir: &Path) -> Result<BusyboxImage> {
        let entries = self.resolve()?;
        let key = cache_key(&entries)?;
        std::fs::create_dir_all(cache_dir)
            .with_context(|| format!("creating {}", cache_dir.display()))?;
        let lock_file = File::create(cache_dir.join(format!("{key}.lock")))?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking the image cache entry {key}: {e}"))?;
        let gz_path = cache_dir.join(format!("{key}.tar.gz"));
        let id_path = cache_dir.join(format!("{key}.diff-id"));
        if let (Ok(layer_gz), Ok(diff_id)) =
            (std::fs::read(&gz_path), std::fs::read_to_string(&id_path))
        {
            if diff_id.starts_with("sha256:") {
                // Used: not pruned for another CACHE_KEEP.
                for p in [&gz_path, &id_path] {
                    if let Ok(f) = File::options().append(true).open(p) {
                        let _ = f.set_modified(std::time::SystemTime::now());
                    }
                }
                return self.image(layer_gz, diff_id.trim());
            }
        }
        let (layer_gz, diff_id) = write_layer(&entries, Vec::new())?;
        let tmp = cache_dir.join(format!("{key}.tar.gz.tmp"));
        std::fs::write(&tmp, &layer_gz).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &gz_path)?;
        std::fs::write(&id_path, &diff_id)?;
        prune_cache(cache_dir);
        self.image(layer_gz, &diff_id)
    }

    fn image(&self, layer_gz: Vec<u8>, diff_id: &str) -> Result<BusyboxImage> {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2026-01-01T00:00:00Z",
            "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "flotilla-sandbox"}],
        });
        Ok(BusyboxImage {
            layer_gz,
            config: serde_json::to_vec(&config)?,
        })
    }

    /// Every tar entry, parents included, in tar order; host files checked to exist and
    /// libraries resolved.
    fn resolve(&self) -> Result<Vec<(String, Entry)>> {
        let mut out: BTreeMap<String, Entry> = BTreeMap::new();
        let mut libs: BTreeMap<String, PathBuf> = BTreeMap::new();
        for (path, node) in &self.nodes {
            let entry = match node {
                Node::Dir { mode, uid } => Entry::Dir {
                    mode: *mode,
                    uid: *uid,
                },
                Node::Bytes { data, mode } => Entry::Bytes {
                    data: data.clone(),
                    mode: *mode,
                },
                Node::Symlink { target } => Entry::Symlink {
                    target: target.clone(),
                },
                Node::Host {
                    path: host,
                    libs: with_libs,
                } => {
                    let entry = host_entry(host)?;
                    if *with_libs {
                        for lib in ldd(host)? {
                            libs.insert(key(&lib.to_string_lossy()), lib);
                        }
                    }
                    entry
                }
            };
            out.insert(path.clone(), entry);
        }
        for (path, host) in libs {
            if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(path) {
                slot.insert(host_entry(&host)?);
            }
        }
        // Parents as directories, and no entry below a non-directory.
        let paths: Vec<String> = out.keys().cloned().collect();
        for path in paths {
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                parent = p;
                match out.get(parent) {
                    Some(Entry::Dir { .. }) => {}
                    Some(_) => bail!("image path /{path}: its parent /{parent} is not a directory"),
                    None => {
                        out.insert(
                            parent.to_owned(),
                            Entry::Dir {
                                mode: 0o755,
                                uid: 0,
                            },
                        );
                    }
                }
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// A resolved tar entry.
#[derive(Debug)]
enum Entry {
    Dir {
        mode: u32,
        uid: u64,
    },
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Host {
        path: PathBuf,
        mode: u32,
        len: u64,
        mtime: i64,
        ino: u64,
    },
    Symlink {
        target: String,
    },
}

fn host_entry(host: &Path) -> Result<Entry> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(host)
        .with_context(|| format!("host file {} for the image", host.display()))?;
    if !meta.is_file() {
        bail!(
            "host file {} for the image is not a regular file",
            host.display()
        );
    }
    Ok(Entry::Host {
        path: host.to_owned(),
        mode: meta.mode() & 0o7777,
        len: meta.len(),
        mtime: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ino: meta.ino(),
    })
}

/// Cache entries unused for this long are removed when a new one is written (inputs
/// change with every rebuild of a test binary or an upgrade of docker.io).
const CACHE_KEEP: std::time::Duration = std::time::Duration::from_secs(3 * 24 * 3600);

/// Removes cache files not used for [`CACHE_KEEP`]; best effort.
fn prune_cache(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > CACHE_KEEP);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Image path as a tar path: no leading or trailing `/`, no empty or `.` components.
fn key(image_path: &str) -> String {
    image_path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// The libraries (and loader) `ldd` lists for a host executable; none for a static one.
fn ldd(host: &Path) -> Result<Vec<PathBuf>> {
    if !host.exists() {
        bail!("host executable {} does not exist", host.display());
    }
    let out = Command::new("ldd")
        .arg(host)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ldd {}", host.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}{}",
            host.display(),
            text.trim(),
            err.trim()
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let p = rest.split_whitespace().next().unwrap_or("");
                if p == "not" {
                    bail!("ldd {}: {} not found", host.display(), name.trim());
                }
                p
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// sha256 over a description of every entry (host files by metadata, not content).
fn cache_key(entries: &[(String, Entry)]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"flotilla-host-image-v1\n");
    for (path, e) in entries {
        let line = match e {
            Entry::Dir { mode, uid } => format!("D {path} {mode:o} {uid}\n"),
            Entry::Bytes { data, mode } => {
                format!("B {path} {mode:o} {}\n", hex::encode(Sha256::digest(data)))
            }
            Entry::Host {
                path: host,
                mode,
                len,
                mtime,
                ino,
            } => format!("H {path} {} {mode:o} {len} {mtime} {ino}\n", host.display()),
            Entry::Symlink { target } => format!("L {path} {target}\n"),
        };
        h.update(line.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes the gzipped layer tar into `out`; returns it with the tar's `sha256:` digest
/// (the image's diff id).
fn write_layer(entries: &[(String, Entry)], out: Vec<u8>) -> Result<(Vec<u8>, String)> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut b = tar::Builder::new(Hashing {
        inner: gz,
        hasher: Sha256::new(),
    });
    let header = |kind: tar::EntryType, mode: u32, size: u64, uid: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(MTIME);
        h
    };
    for (path, e) in entries {
        match e {
            Entry::Dir { mode, uid } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0, *uid);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::Bytes { data, mode } => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64, 0);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Host {
                path: host,
                mode,
                len,
                ..
            } => {
                let file = File::open(host)
                    .with_context(|| format!("opening host file {}", host.display()))?;
                let mut h = header(tar::EntryType::Regular, *mode, *len, 0);
                // Exactly `len` bytes even if the file changed since it was looked at.
                let reader = file.take(*len).chain(std::io::repeat(0)).take(*len);
                b.append_data(&mut h, path, reader)
                    .with_context(|| format!("adding host file {}", host.display()))?;
            }
            Entry::Symlink { target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    let hashing = b.into_inner()?;
    let diff_id = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    let layer_gz = hashing.inner.finish()?;
    Ok((layer_gz, diff_id))
}

/// Hashes what goes through it.
struct Hashing<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Where [`HostImage::build_cached`] keeps the Docker-in-Docker layers across sandboxes.
pub fn image_cache_dir() -> PathBuf {
    std::env::temp_dir().join("flotilla-image-cache")
}

/// The DinD service image's entrypoint, modelled on docker:dind's `dockerd-entrypoint.sh`
/// and `dind`: securityfs and /tmp mounts, cgroup v2 nesting (processes moved to a child
/// cgroup, controllers enabled for the children), then dockerd with the vfs storage
/// driver. With `DOCKER_TLS_CERTDIR` set (e.g. `/certs`): a CA, server and client
/// certificates under `$DOCKER_TLS_CERTDIR/{ca,server,client}` (client: `ca.pem`,
/// `cert.pem`, `key.pem`, readable by any user of a shared volume), and dockerd on
/// tcp://0.0.0.0:2376 with `--tlsverify`; without it, plain tcp://0.0.0.0:2375. Extra
/// arguments go to dockerd (or, when the first is not a flag, are run instead).
pub const DIND_ENTRYPOINT: &str = r#"#!/bin/sh
# flotilla-sandbox's docker:dind entrypoint (see tests/src/images.rs).
set -eu

_tls_san() {
	{
		ip -oneline address | awk '{ gsub(/\/.+$/, "", $4); print "IP:" $4 }'
		{
			cat /etc/hostname
			echo 'docker'
			echo 'localhost'
			hostname -f 2>/dev/null || :
			hostname -s 2>/dev/null || :
		} | sed 's/^/DNS:/'
		[ -z "${DOCKER_TLS_SAN:-}" ] || echo "$DOCKER_TLS_SAN"
	} | grep -v '^DNS:$' | sort -u | xargs printf '%s,' | sed "s/,\$//"
}

_tls_key() {
	[ -s "$1" ] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

_tls_generate_certs() {
	dir="$1"
	mkdir -p "$dir/ca" "$dir/server" "$dir/client"
	if [ ! -s "$dir/ca/cert.pem" ]; then
		_tls_key "$dir/ca/key.pem"
		openssl req -new -key "$dir/ca/key.pem" -out "$dir/ca/cert.pem" \
			-subj '/CN=docker:dind CA' -x509 -days 825
	fi
	if [ ! -s "$dir/server/cert.pem" ]; then
		_tls_key "$dir/server/key.pem"
		openssl req -new -key "$dir/server/key.pem" -out "$dir/server/csr.pem" \
			-subj '/CN=docker:dind server'
		printf '[ x509_exts ]\nsubjectAltName = %s\nextendedKeyUsage = serverAuth\n' "$(_tls_san)" \
			> "$dir/server/openssl.cnf"
		openssl x509 -req -in "$dir/server/csr.pem" -CA "$dir/ca/cert.pem" \
			-CAkey "$dir/ca/key.pem" -CAcreateserial -out "$dir/server/cert.pem" -days 825 \
			-extfile "$dir/server/openssl.cnf" -extensions x509_exts 2>/dev/null
		cp "$dir/ca/cert.pem" "$dir/server/ca.pem"
		openssl verify -CAfile "$dir/server/ca.pem" "$dir/server/cert.pem"
	fi
	if [ ! -s "$dir/client/cert.pem" ]; then
		# Written under other names first: a job waiting for cert.pem finds all three.
		_tls_key "$dir/client/.key.pem"
		openssl req -new -key "$dir/client/.key.pem" -out "$dir/client/csr.pem" \
			-subj '/CN=docker:dind client'
		printf '[ x509_exts ]\nextendedKeyUsage = clientAuth\n' > "$dir/client/openssl.cnf"
		openssl x509 -req -in "$dir/client/csr.pem" -CA "$dir/ca/cert.pem" \
			-CAkey "$dir/ca/key.pem" -CAcreateserial -out "$dir/client/.cert.pem" -days 825 \
			-extfile "$dir/client/openssl.cnf" -extensions x509_exts 2>/dev/null
		cp "$dir/ca/cert.pem" "$dir/client/ca.pem"
		openssl verify -CAfile "$dir/client/ca.pem" "$dir/client/.cert.pem"
		rm -f "$dir/client/csr.pem" "$dir/client/openssl.cnf"
		chmod 0644 "$dir/client/.key.pem" "$dir/client/.cert.pem" "$dir/client/ca.pem"
		mv "$dir/client/.key.pem" "$dir/client/key.pem"
		mv "$dir/client/.cert.pem" "$dir/client/cert.pem"
	fi
}

# docker's hack/dind
container=docker
export container
if [ -d /sys/kernel/security ] && ! grep -q ' /sys/kernel/security ' /proc/mounts; then
	mount -t securityfs none /sys/kernel/security || {
		echo >&2 'Could not mount /sys/kernel/security.'
		echo >&2 'AppArmor detection and --privileged mode might break.'
	}
fi
if ! grep -q ' /tmp ' /proc/mounts; then
	mount -t tmpfs none /tmp
fi
# cgroup v2: enable nesting. Move the processes of the root group to /init, otherwise
# writing subtree_control fails with EBUSY.
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
	mkdir -p /sys/fs/cgroup/init
	xargs -rn1 < /sys/fs/cgroup/cgroup.procs > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
	sed -e 's/ / +/g' -e 's/^/+/' < /sys/fs/cgroup/cgroup.controllers \
		> /sys/fs/cgroup/cgroup.subtree_control
fi

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
	exec "$@"
fi
if [ -n "${DOCKER_TLS_CERTDIR:-}" ]; then
	_tls_generate_certs "$DOCKER_TLS_CERTDIR"
	set -- --host=unix:///var/run/docker.sock --host=tcp://0.0.0.0:2376 --tlsverify \
		--tlscacert "$DOCKER_TLS_CERTDIR/server/ca.pem" \
		--tlscert "$DOCKER_TLS_CERTDIR/server/cert.pem" \
		--tlskey "$DOCKER_TLS_CERTDIR/server/key.pem" "$@"
else
	set -- --host=unix:///var/run/docker.sock --host=tcp://0.0.0.0:2375 --tls=false "$@"
fi
exec dockerd --storage-driver=vfs "$@"
"#;

/// busybox applets the DinD entrypoint uses beyond [`APPLETS`].
const DIND_APPLETS: &[&str] = &["ip", "mount", "umount", "sh", "xargs", "sort", "sed", "awk"];

/// The host's iptables multi-call binary (what `iptables` on the host resolves to).
fn host_iptables() -> PathBuf {
    ["/usr/sbin/iptables", "/sbin/iptables"]
        .iter()
        .find_map(|p| std::fs::canonicalize(p).ok())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/iptables"))
}

/// A `docker:dind`-like service image from the host's docker.io binaries: dockerd,
/// containerd, the runc shim, runc, docker-init, docker-proxy, iptables (the variant the
/// host's `iptables` points to, with its xtables modules) and openssl, each with its
/// shared libraries; entrypoint [`DIND_ENTRYPOINT`]; ports 2375 and 2376; a volume at
/// /var/lib/docker. No default `DOCKER_TLS_CERTDIR`: set it to get TLS on 2376.
pub fn dind_image() -> HostImage {
    let iptables = host_iptables();
    let multi = iptables
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "iptables".into());
    let mut img = HostImage::new("dind")
        .applets(DIND_APPLETS)
        .binary("/usr/sbin/dockerd", "/usr/local/bin/dockerd")
        .binary("/usr/bin/containerd", "/usr/local/bin/containerd")
        .binary(
            "/usr/bin/containerd-shim-runc-v2",
            "/usr/local/bin/containerd-shim-runc-v2",
        )
        .binary("/usr/sbin/runc", "/usr/local/bin/runc")
        .binary("/usr/bin/docker-init", "/usr/local/bin/docker-init")
        .binary("/usr/sbin/docker-proxy", "/usr/local/bin/docker-proxy")
        .binary("/usr/bin/openssl", "/usr/bin/openssl")
        .host_file("/etc/ssl/openssl.cnf", "/usr/lib/ssl/openssl.cnf")
        .binary(&iptables, &format!("/usr/sbin/{multi}"))
        .host_dir(
            "/usr/lib/x86_64-linux-gnu/xtables",
            "/usr/lib/x86_64-linux-gnu/xtables",
        )
        .host_file("/etc/protocols", "/etc/protocols")
        .host_file("/etc/services", "/etc/services")
        .host_file("/etc/ethertypes", "/etc/ethertypes")
        .dir("/run", 0o755)
        .symlink("/var/run", "/run")
        .dir("/var/lib/docker", 0o711)
        .dir("/certs", 0o1777)
        .dir("/certs/client", 0o1777)
        .file(
            "/usr/local/bin/dockerd-entrypoint.sh",
            DIND_ENTRYPOINT.as_bytes().to_vec(),
            0o755,
        );
    for name in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        if name != multi {
            img = img.symlink(&format!("/usr/sbin/{name}"), &multi);
        }
    }
    img.config(serde_json::json!({
        "Entrypoint": ["dockerd-entrypoint.sh"],
        "Cmd": [],
        "ExposedPorts": {"2375/tcp": {}, "2376/tcp": {}},
        "Volumes": {"/var/lib/docker": {}},
    }))
}

/// A job image with busybox and the host's docker CLI (Debian's docker.io client; the
/// legacy builder, `DOCKER_BUILDKIT=0`).
pub fn docker_cli_image() -> HostImage {
    let cli = ["/usr/bin/docker", "/usr/local/bin/docker"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/usr/bin/docker");
    HostImage::new("docker-cli")
        .binary(cli, "/usr/local/bin/docker")
        .host_file("/etc/services", "/etc/services")
        .config(serde_json::json!({
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "DOCKER_BUILDKIT=0",
            ],
            "Cmd": ["sh"],
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_entries(image: &BusyboxImage) -> BTreeMap<String, (tar::EntryType, Vec<u8>)> {
        let gz = flate2::read::GzDecoder::new(image.layer_gz.as_slice());
        let mut ar = tar::Archive::new(gz);
        let mut out = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let mut data = Vec::new();
            if kind == tar::EntryType::Symlink {
                data = e.link_name_bytes().unwrap().into_owned();
            } else {
                e.read_to_end(&mut data).unwrap();
            }
            out.insert(path, (kind, data));
        }
        out
    }

    #[test]
    fn a_binary_comes_with_its_libraries_and_parents() {
        let image = HostImage::new("t")
            .binary("/usr/bin/openssl", "/opt/tools/bin/openssl")
            .file("/etc/deep/a/b.conf", b"x=1\n".to_vec(), 0o600)
            .symlink("/usr/local/bin/ssl", "/opt/tools/bin/openssl")
            .config(serde_json::json!({"Entrypoint": ["openssl"]}))
            .build()
            .unwrap();
        let entries = tar_entries(&image);
        let openssl = std::fs::read("/usr/bin/openssl").unwrap();
        assert_eq!(entries["opt/tools/bin/openssl"].1, openssl);
        for dir in [
            "opt/",
            "opt/tools/",
            "opt/tools/bin/",
            "etc/deep/a/",
            "usr/local/",
        ] {
            assert_eq!(entries[dir].0, tar::EntryType::Directory, "{dir}");
        }
        assert!(
            entries.keys().any(|p| p.ends_with("/libc.so.6")),
            "libc is in the image: {:?}",
            entries.keys().collect::<Vec<_>>()
        );
        assert!(
            entries.keys().any(|p| p.contains("ld-linux")),
            "the loader too"
        );
        assert!(entries.keys().any(|p| p.ends_with("/libcrypto.so.3")));
        assert_eq!(entries["bin/sh"].1, b"busybox");
        assert_eq!(entries["etc/flotilla-image"].1, b"t\n");
        assert_eq!(entries["usr/local/bin/ssl"].0, tar::EntryType::Symlink);
        let config: serde_json::Value = serde_json::from_slice(&image.config).unwrap();
        assert_eq!(config["config"]["Entrypoint"][0], "openssl");
        assert_eq!(config["config"]["Cmd"][0], "sh", "base config kept");
        // Deterministic: the same inputs give the same layer.
        let again = HostImage::new("t")
            .binary("/usr/bin/openssl", "/opt/tools/bin/openssl")
            .file("/etc/deep/a/b.conf", b"x=1\n".to_vec(), 0o600)
            .symlink("/usr/local/bin/ssl", "/opt/tools/bin/openssl")
            .config(serde_json::json!({"Entrypoint": ["openssl"]}))
            .build()
            .unwrap();
        assert_eq!(again.config, image.config);
    }

    #[test]
    fn a_missing_host_file_is_named() {
        let err = HostImage::new("t")
            .binary("/nonexistent/flotilla-tool", "/bin/tool")
            .build()
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("/nonexistent/flotilla-tool"), "{err}");
    }

    #[test]
    fn the_cache_gives_the_same_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = HostImage::new("c").binary("/usr/bin/openssl", "/bin/openssl");
        let first = img.build_cached(dir.path()).unwrap();
        let second = img.build_cached(dir.path()).unwrap();
        assert_eq!(first.config, second.config);
        assert_eq!(first.layer_gz, second.layer_gz);
        assert_eq!(first.config, img.build().unwrap().config);
    }

    #[test]
    fn the_dind_entrypoint_is_valid_shell() {
        let status = Command::new("/bin/busybox")
            .args(["sh", "-n", "-c", DIND_ENTRYPOINT])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Builds both Docker-in-Docker images through the cache and prints the time.
    #[test]
    #[ignore = "slow the first time (builds ~150 MB of layers); run by hand"]
    fn dind_images_build() {
        for (name, img) in [("dind", dind_image()), ("docker-cli", docker_cli_image())] {
            let start = std::time::Instant::now();
            let built = img.build_cached(&image_cache_dir()).unwrap();
            eprintln!(
                "{name}: {} bytes gzipped in {:?}",
                built.layer_gz.len(),
                start.elapsed()
            );
        }
    }
}

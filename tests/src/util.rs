//! Small process, port, polling and slot helpers shared by the sandbox's parts.
//!
//! Invariant: every child the harness starts is owned by a [`Child`]-holding guard that
//! stops it (SIGTERM, then SIGKILL) when dropped, so a failing test never leaks processes.

use std::fs::File;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Polls `check` every `every` until it returns `Some`; fails at once when `check` fails
/// and after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check()
            .await
            .with_context(|| format!("while waiting for {what}"))?
        {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Blocking twin of [`wait_until`] for sync contexts (Drop, spawn_blocking).
pub fn wait_until_blocking<T>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Stops a child we started: SIGTERM (to its process group when `group`), waits up to
/// `grace`, then SIGKILL. Returns whether it exited within the grace period.
pub fn stop_child(child: &mut Child, grace: Duration, group: bool) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = if group {
        killpg(pid, Signal::SIGTERM)
    } else {
        kill(pid, Signal::SIGTERM)
    };
    let exited = wait_until_blocking(grace, Duration::from_millis(50), || {
        matches!(child.try_wait(), Ok(Some(_))).then_some(())
    })
    .is_some();
    if !exited {
        let _ = if group {
            killpg(pid, Signal::SIGKILL)
        } else {
            kill(pid, Signal::SIGKILL)
        };
        let _ = child.wait();
    }
    exited
}

/// Whether a process with this pid exists (and is not a zombie we could reap).
pub fn pid_alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    // A zombie still answers kill(0); treat it as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            all[from..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A short, unique-enough token: pid, time and a process-wide counter.
pub fn unique_token() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}{n:x}", std::process::id() % 0xffff, t % 0xfffff)
}

/// Directory of the cross-process slot locks.
fn slot_dir() -> PathBuf {
    std::env::temp_dir().join("flotilla-sandbox-slots")
}

/// First and last slot number. A slot N gives the sandbox 127.N.0.0/16 for its VPC and
/// 10.N.0.0/16 for its machines' Docker networks, so the range avoids the host's own
/// 10.x networks as far as we know them (checked again at allocation).
const SLOTS: std::ops::RangeInclusive<u8> = 100..=199;

/// A number held exclusively (flock) by one sandbox across all processes on the host,
/// released when dropped.
#[derive(Debug)]
pub struct Slot {
    pub n: u8,
    _lock: Flock<File>,
}

impl Slot {
    pub fn acquire() -> Result<Self> {
        let dir = slot_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let busy = host_ten_networks();
        for n in SLOTS {
            if busy.contains(&n) {
                continue;
            }
            let path = dir.join(format!("{n}.lock"));
            let file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok(Self { n, _lock: lock });
            }
        }
        bail!(
            "all sandbox slots {}..={} are taken (locks in {})",
            SLOTS.start(),
            SLOTS.end(),
            dir.display()
        )
    }
}

/// Second octets of 10.x.0.0/16 networks that the host routes already use.
fn host_ten_networks() -> Vec<u8> {
    let Ok(text) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let dest = l.split_whitespace().nth(1)?;
            let v = u32::from_str_radix(dest, 16).ok()?;
            // /proc/net/route stores the address little-endian.
            let [a, b, _, _] = v.to_le_bytes();
            (a == 10).then_some(b)
        })
        .collect()
}

/// Writes `text` to `path` with the given mode, creating parent directories.
pub fn write_file(path: &Path, text: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    Ok(())
}

/// Notes a child's pid in `<dir>/pids` so a later start in the same directory can stop
/// what a crashed run left behind.
pub fn record_pid(dir: &Path, what: &str, pid: u32) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pids"))
    {
        let _ = writeln!(f, "{what} {pid}");
    }
}

/// Stops the processes a previous run in `dir` recorded (`<dir>/pids`, and the dockerd
/// pid files under `<dir>/m/*/docker.pid`) that are still alive and still what they were,
/// and removes the network interfaces it noted (`<dir>/links`).
pub fn stop_leftovers(dir: &Path) {
    crate::gitlab_stub::remove_leftover_links(dir);
    let mut pids: Vec<(String, i32)> = std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (what, pid) = l.split_once(' ')?;
            Some((what.to_owned(), pid.trim().parse().ok()?))
        })
        .collect();
    if let Ok(machines) = std::fs::read_dir(dir.join("m")) {
        for m in machines.flatten() {
            if let Ok(text) = std::fs::read_to_string(m.path().join("docker.pid")) {
                if let Ok(pid) = text.trim().parse() {
                    pids.push(("dockerd".into(), pid));
                }
            }
        }
    }
    for (what, pid) in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !pid_alive(pid) || !cmdline.contains(&what) {
            continue;
        }
        eprintln!("sandbox: stopping leftover {what} (pid {pid}) of a previous run");
        let p = Pid::from_raw(pid);
        let _ = kill(p, Signal::SIGTERM);
        if wait_until_blocking(Duration::from_secs(15), Duration::from_millis(100), || {
            (!pid_alive(pid)).then_some(())
        })
        .is_none()
        {
            let _ = kill(p, Signal::SIGKILL);
        }
    }
}

/// Waits until the server `child` started answers `GET url` with a status `expect` accepts
/// (a status it refuses is an error at once), failing early if the process exits. On
/// failure the message carries the tail of `log`.
pub async fn wait_for_http(
    what: &str,
    child: &mut Child,
    url: &str,
    timeout: Duration,
    log: &Path,
    expect: fn(u16) -> Result<bool>,
) -> Result<()> {
    let ready = wait_until(
        &format!("{what} to answer GET {url}"),
        timeout,
        Duration::from_millis(100),
        || {
            let url = url.to_owned();
            let exited = child.try_wait().ok().flatten();
            async move {
                if let Some(status) = exited {
                    bail!("{what} exited with {status}");
                }
                let status = tokio::task::spawn_blocking(move || {
                    match ureq::get(&url).timeout(Duration::from_secs(2)).call() {
                        Ok(r) => Some(r.status()),
                        Err(ureq::Error::Status(code, _)) => Some(code),
                        Err(_) => None,
                    }
                })
                .await?;
                match status {
                    Some(code) => Ok(expect(code)?.then_some(())),
                    None => Ok(None),
                }
            }
        },
    )
    .await;
    ready.map_err(|e| anyhow::anyhow!("{e:#}\n{what} log:\n{}", tail(log, 30)))
}

/// The peak resident set size in KiB of the live process `pid` so far (`VmHWM` in
/// `/proc/<pid>/status`), or `None` once it has exited. The high-water mark of its own
/// address space only: `wait4`'s `ru_maxrss` is not, since a child spawned with
/// `posix_spawn` (vfork) is charged at exec with the spawning process's peak, here the test
/// binary's, which grows with every test running beside it.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes waiting in the pipe whose read end is `fd` (FIONREAD), and the pipe's capacity
/// (F_GETPIPE_SZ): a writer is blocked on the pipe once the two are within a page.
pub fn pipe_fill(fd: std::os::fd::BorrowedFd<'_>) -> Result<(usize, usize)> {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points to a local.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) } < 0 {
        return Err(std::io::Error::last_os_error()).context("FIONREAD on a pipe");
    }
    let capacity = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
        .context("F_GETPIPE_SZ on a pipe")?;
    Ok((
        usize::try_from(queued).unwrap_or(0),
        usize::try_from(capacity).unwrap_or(0),
    ))
}

//! Durable pool state: a snapshot (`state.json`, the one before it kept as
//! `state.json.prev`) plus journals of lease operations (`journal-<seq>.journal`), so a
//! lease costs one small append instead of rewriting the whole pool: O(1) per job however
//! many machines the daemon tracks.
//!
//! - Lease grants and releases are appended to the current journal while the pool lock is
//!   held, so journal order is pool order. Everything else (launch, ready, broken,
//!   terminate, drain) is rare and written as a snapshot.
//! - A snapshot is serialized under the pool lock together with a switch to a fresh journal
//!   (`journal_seq` in the snapshot names the first journal it does not contain). Loading
//!   replays every journal from `journal_seq` on, in order, so a crash at any point loses
//!   nothing and applies nothing twice.
//! - Snapshots group-commit: a change bumps a generation under the pool lock; whoever gets
//!   the write lock first writes the latest snapshot, later callers return at once.
//!
//! # Journal records
//!
//! One line per record: `<len> <crc> <json>\n`, where `<json>` is the operation as JSON
//! (which never contains a raw newline), `<len>` its length in bytes (decimal) and `<crc>`
//! its CRC-32C (8 lowercase hex digits). Text rather than a binary frame so an operator
//! can still read a journal with `cut -d' ' -f3- | jq`; the length tells a record cut
//! short from a complete one, and the checksum catches what a power loss can leave where
//! a record should be (a file extended with zeros or stale blocks) and bit rot. CRC-32C
//! because this guards against accidents, not adversaries (it catches every burst error up
//! to 32 bits) and fits in a few lines without a dependency. Journals of the unframed
//! format of earlier builds (`journal-*.jsonl`) are refused with an error saying so; no
//! released install wrote them.
//!
//! Loading reads each journal front to back. A bad record with no valid record after it is
//! a torn tail (killed or powered off mid-append: that operation was never acknowledged);
//! the file is truncated to the last good record with a warning naming the file and byte
//! offset. A bad record *followed* by a valid one is damage, not a torn write: loading
//! refuses ([`StoreError::JournalCorrupt`], file and offset), because replaying around it
//! could lose a lease grant and hand a busy machine to a second job. Nothing is truncated
//! or moved before every file has been checked.
//!
//! A record is written under the pool lock ([`StateStore::append`]) and made durable
//! (`fdatasync`) after the lock is released, before the operation is acknowledged
//! ([`StateStore::flush`]): flushes are serialized and each covers every record written
//! before it, so concurrent leases share one flush (group commit) and the pool lock is
//! never held across a disk flush. If the write fails (a full disk), the file is cut back
//! to its previous length so no half record is left to look like corruption once later
//! records follow it, and the error goes to the caller, which does not grant the lease. If
//! even the cut fails, the journal is marked damaged and the next append first retries the
//! cut, then moves to a fresh journal (the damaged one then ends in a torn tail, which
//! loading truncates). If a flush fails, what reached the disk is unknown and a later flush
//! may wrongly succeed (Linux drops the failed pages), so the store journals nothing more
//! and no lease is granted until the daemon is restarted and reads back what is there.
//!
//! # Snapshots
//!
//! Written to a temporary file, fsynced, the current `state.json` hard-linked to
//! `state.json.prev`, renamed over `state.json`, directory fsynced. Journals are deleted
//! only once neither snapshot needs them (older than `state.json.prev`'s `journal_seq`).
//! Loading uses `state.json`; if it is missing or unreadable, `state.json.prev` plus its
//! journals (the bad `state.json` is renamed `state.json.corrupt-<time>`). If neither can
//! be used, or a journal is damaged or missing, loading fails with an error
//! ([`StoreError::is_unreadable_state`]) and the daemon refuses to start: starting empty
//! would reap every running instance as an orphan. [`move_aside`] is the way out the
//! daemon offers (`flotilla daemon --adopt`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use flotilla_proto::api::ReleaseOutcome;
use serde::{Deserialize, Serialize};

use crate::pool::{LeaseRecord, Pool};

pub const STATE_FILE: &str = "state.json";
pub const PREV_STATE_FILE: &str = "state.json.prev";
const PREV_TMP_FILE: &str = ".state.json.prev.tmp";
const CORRUPT_PREFIX: &str = "state.json.corrupt-";
const JOURNAL_PREFIX: &str = "journal-";
const JOURNAL_SUFFIX: &str = ".journal";
/// The unframed journals of earlier builds.
const OLD_JOURNAL_SUFFIX: &str = ".jsonl";
/// Where [`move_aside`] puts an unreadable state.
pub const UNREADABLE_PREFIX: &str = "unreadable-";

const WAYS_OUT: &str = "the daemon will not start on it, because an empty pool would \
reap the fleet's running instances as orphans. Either repair or move aside what is \
named above, or start once with `flotilla daemon --adopt`, which moves the pool state \
into an unreadable-<time>/ directory in the state directory and adopts the fleet's \
running instances (health-checked, drained, terminated once no job runs on them)";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing a journal record failed; nothing of it was left in the journal.
    #[error("{path}: could not journal at byte offset {offset}: {source}")]
    Append {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: could not flush the journal to disk: {source}")]
    Flush {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not journaling after an earlier failure ({why}); restart the daemon")]
    Unflushable { why: String },
    #[error("{path}: cannot read the journal ({source}); {}", WAYS_OUT)]
    JournalUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: corrupt journal record at byte offset {offset} ({detail}); {}",
        WAYS_OUT
    )]
    JournalCorrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error("{path}: journal in the unframed format of an earlier build, which this version does not read; {}", WAYS_OUT)]
    JournalFormat { path: PathBuf },
    #[error(
        "{path}: missing, but {needed_by} needs every journal from {first} on; {}",
        WAYS_OUT
    )]
    JournalMissing {
        path: PathBuf,
        needed_by: String,
        first: u64,
    },
    #[error("no usable pool state in {dir}: {state}; {prev}; {}", WAYS_OUT)]
    NoUsableState {
        dir: PathBuf,
        state: String,
        prev: String,
    },
}

impl StoreError {
    /// The pool state on disk cannot be loaded (as opposed to an operational failure):
    /// the case `flotilla daemon --adopt` exists for.
    pub fn is_unreadable_state(&self) -> bool {
        matches!(
            self,
            Self::JournalUnreadable { .. }
                | Self::JournalCorrupt { .. }
                | Self::JournalFormat { .. }
                | Self::JournalMissing { .. }
                | Self::NoUsableState { .. }
        )
    }
}

/// One journaled lease operation; replayed through the same [`Pool`] code as live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JournalOp {
    Leased {
        lease: LeaseRecord,
    },
    Released {
        lease_id: String,
        outcome: ReleaseOutcome,
        reason: Option<String>,
        at: DateTime<Utc>,
    },
}

impl JournalOp {
    pub fn apply(&self, pool: &mut Pool) {
        match self {
            Self::Leased { lease } => {
                pool.restore_lease(lease);
            }
            Self::Released {
                lease_id,
                outcome,
                reason,
                at,
            } => {
                pool.release(lease_id, *outcome, reason.clone(), *at);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Record framing

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

/// CRC-32C (Castagnoli), as in iSCSI, ext4 and LevelDB.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c = CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// `<len> <crc> <json>\n`
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = format!("{} {:08x} ", body.len(), crc32c(body)).into_bytes();
    out.extend_from_slice(body);
    out.push(b'\n');
    out
}

#[derive(Debug, PartialEq, Eq)]
enum FrameError {
    /// No end of line: the write stopped part-way.
    Incomplete,
    Malformed(&'static str),
    Length {
        declared: usize,
        actual: usize,
    },
    Checksum {
        declared: u32,
        actual: u32,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Incomplete => write!(f, "record without an end of line"),
            Self::Malformed(what) => write!(f, "not a record: {what}"),
            Self::Length { declared, actual } => {
                write!(f, "record says {declared} bytes, has {actual}")
            }
            Self::Checksum { declared, actual } => {
                write!(f, "checksum {declared:08x} expected, {actual:08x} found")
            }
        }
    }
}

/// Parses the record at the start of `b`: its JSON and the bytes it spans.
fn parse_frame(b: &[u8]) -> Result<(&[u8], usize), FrameError> {
    let nl = b
        .iter()
        .position(|&c| c == b'\n')
        .ok_or(FrameError::Incomplete)?;
    let line = &b[..nl];
    let mut parts = line.splitn(3, |&c| c == b' ');
    let len = parts.next().unwrap_or_default();
    let crc = parts.next().unwrap_or_default();
    let body = parts
        .next()
        .ok_or(FrameError::Malformed("fewer than three fields"))?;
    if len.is_empty() || len.len() > 10 || !len.iter().all(u8::is_ascii_digit) {
        return Err(FrameError::Malformed("bad length field"));
    }
    if crc.len() != 8 || !crc.iter().all(u8::is_ascii_hexdigit) {
        return Err(FrameError::Malformed("bad checksum field"));
    }
    // Both fields are ASCII digits by now.
    let declared: usize = std::str::from_utf8(len)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(FrameError::Malformed("bad length field"))?;
    let declared_crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or(FrameError::Malformed("bad checksum field"))?;
    if body.len() != declared {
        return Err(FrameError::Length {
            declared,
            actual: body.len(),
        });
    }
    let actual = crc32c(body);
    if actual != declared_crc {
        return Err(FrameError::Checksum {
            declared: declared_crc,
            actual,
        });
    }
    Ok((body, nl + 1))
}

/// The offset of the first valid record starting at a line boundary after `from`.
fn next_valid_frame(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(nl) = bytes[at..].iter().position(|&c| c == b'\n') {
        at += nl + 1;
        if at >= bytes.len() {
            return None;
        }
        if parse_frame(&bytes[at..]).is_ok() {
            return Some(at);
        }
    }
    None
}

/// One journal file, read and checked.
#[derive(Debug)]
struct JournalScan {
    ops: Vec<JournalOp>,
    /// Where a torn tail starts (everything from there is dropped), and what was wrong.
    torn: Option<(u64, String)>,
}

fn scan_journal(path: &Path, bytes: &[u8]) -> Result<JournalScan, StoreError> {
    let mut ops = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        match parse_frame(&bytes[offset..]) {
            Ok((body, used)) => {
                let op = serde_json::from_slice::<JournalOp>(body).map_err(|e| {
                    StoreError::JournalCorrupt {
                        path: path.to_owned(),
                        offset: offset as u64,
                        detail: format!(
                            "the checksum matches but it is not a lease operation: {e}"
                        ),
                    }
                })?;
                ops.push(op);
                offset += used;
            }
            Err(e) => {
                if let Some(next) = next_valid_frame(bytes, offset) {
                    return Err(StoreError::JournalCorrupt {
                        path: path.to_owned(),
                        offset: offset as u64,
                        detail: format!("{e}; a valid record follows at byte offset {next}"),
                    });
                }
                return Ok(JournalScan {
                    ops,
                    torn: Some((offset as u64, e.to_string())),
                });
            }
        }
    }
    Ok(JournalScan { ops, torn: None })
}

// ---------------------------------------------------------------------------------------
// Files

#[derive(Serialize)]
struct SnapshotRef<'a> {
    journal_seq: u64,
    pool: &'a Pool,
}

#[derive(Deserialize)]
struct Snapshot {
    journal_seq: u64,
    pool: Pool,
}

fn journal_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{JOURNAL_PREFIX}{seq:020}{JOURNAL_SUFFIX}"))
}

fn dir_entries(dir: &Path) -> Result<Vec<String>, StoreError> {
    let io = |source| StoreError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        if let Ok(name) = entry.map_err(io)?.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

fn journal_seqs(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut seqs: Vec<u64> = dir_entries(dir)?
        .iter()
        .filter_map(|name| {
            name.strip_prefix(JOURNAL_PREFIX)?
                .strip_suffix(JOURNAL_SUFFIX)?
                .parse()
                .ok()
        })
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// Reads a snapshot: `Ok(None)` when there is none, `Err(why)` when it cannot be used.
fn read_snapshot(path: &Path) -> Result<Option<Snapshot>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    match serde_json::from_slice::<Snapshot>(&bytes) {
        Ok(s) => Ok(Some(s)),
        // A bare pool (written by hand or by the benchmarks, no journal yet) is accepted.
        Err(e) => match serde_json::from_slice::<Pool>(&bytes) {
            Ok(pool) => Ok(Some(Snapshot {
                journal_seq: 0,
                pool,
            })),
            Err(_) => Err(format!("{}: corrupt ({e})", path.display())),
        },
    }
}

/// Whether the journals from `first` on are all there: `first` itself and no gap after it
/// (or none at all, for a snapshot no journal was ever started for). Returns the first
/// missing one.
fn first_missing_journal(seqs: &[u64], first: u64) -> Option<u64> {
    (first..)
        .zip(seqs.iter().filter(|s| **s >= first))
        .find(|(want, have)| want != *have)
        .map(|(want, _)| want)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })
}

fn timestamp(now: DateTime<Utc>) -> String {
    now.format("%Y%m%dT%H%M%SZ").to_string()
}

// ---------------------------------------------------------------------------------------
// The store

struct Journal {
    file: Arc<File>,
    seq: u64,
    /// Bytes of whole records in the file.
    len: u64,
    /// A failed append left bytes the journal could not cut away.
    damaged: bool,
    /// Test seam: the next write stops after this many bytes with ENOSPC (a disk filling
    /// up part-way through a record).
    #[cfg(test)]
    disk_full_after: Option<usize>,
    /// Test seam: cutting a failed record away fails too.
    #[cfg(test)]
    truncate_fails: bool,
}

impl Journal {
    fn open(dir: &Path, seq: u64) -> Result<Self, StoreError> {
        let path = journal_path(dir, seq);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|f| f.metadata().map(|m| (f, m.len())))
            .map_err(|source| StoreError::Io { path, source });
        let (file, len) = file?;
        Ok(Self {
            file: Arc::new(file),
            seq,
            len,
            damaged: false,
            #[cfg(test)]
            disk_full_after: None,
            #[cfg(test)]
            truncate_fails: false,
        })
    }

    fn write_record(&mut self, frame: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.disk_full_after.take() {
            (&*self.file).write_all(&frame[..n.min(frame.len())])?;
            return Err(nix::errno::Errno::ENOSPC.into());
        }
        (&*self.file).write_all(frame)
    }

    fn truncate_to_len(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.truncate_fails {
            return Err(nix::errno::Errno::EIO.into());
        }
        self.file.set_len(self.len)
    }
}

/// Which snapshots are on disk, so journals are deleted only when neither needs them.
struct Snapshots {
    /// Latest generation written.
    gen: u64,
    /// `journal_seq` of the snapshot in `state.json`, if it is one this store trusts.
    current: Option<u64>,
    /// `journal_seq` of `state.json.prev`, if it is usable.
    prev: Option<u64>,
}

/// A journal record written but maybe not yet on disk: pass it to [`StateStore::flush`]
/// before acknowledging the operation.
#[must_use = "a journaled operation is durable only once flushed"]
pub struct Written {
    file: Arc<File>,
    seq: u64,
    /// Where the record ends in its journal.
    end: u64,
}

/// How far the journals are known to be on disk.
#[derive(Default)]
struct Flushed {
    seq: u64,
    upto: u64,
    /// Test seam: fdatasync calls made, and whether the next one fails.
    #[cfg(test)]
    syncs: usize,
    #[cfg(test)]
    fail_next: bool,
}

pub struct StateStore {
    dir: PathBuf,
    generation: AtomicU64,
    snapshots: tokio::sync::Mutex<Snapshots>,
    journal: Mutex<Journal>,
    /// Held while flushing: flushes are serialized, and whoever waits here finds its record
    /// flushed by the one before (group commit). Never taken under the pool lock.
    flushed: Mutex<Flushed>,
    /// A flush failed: what is on disk is unknown, so nothing more is journaled (and no
    /// lease granted) until the daemon restarts and reads back what is really there.
    failed: std::sync::atomic::AtomicBool,
    failure: Mutex<String>,
}

/// Where the pool was loaded from.
enum Base {
    Current,
    /// `state.json` missing or unusable (`why`, and whether the file exists).
    Prev {
        why: String,
        exists: bool,
    },
    /// Never snapshotted: the empty pool plus every journal from 0.
    Empty,
}

impl StateStore {
    /// Loads the snapshot and replays the journals after it, truncating torn tails; falls
    /// back to `state.json.prev` when `state.json` cannot be used; refuses damage.
    pub fn open(state_dir: &Path) -> Result<(Self, Pool), StoreError> {
        if let Some(old) = dir_entries(state_dir)?
            .into_iter()
            .find(|n| n.starts_with(JOURNAL_PREFIX) && n.ends_with(OLD_JOURNAL_SUFFIX))
        {
            return Err(StoreError::JournalFormat {
                path: state_dir.join(old),
            });
        }
        let seqs = journal_seqs(state_dir)?;
        let state_path = state_dir.join(STATE_FILE);
        let prev_path = state_dir.join(PREV_STATE_FILE);
        let current = read_snapshot(&state_path);
        let prev = read_snapshot(&prev_path);
        let prev_seq = prev
            .as_ref()
            .ok()
            .and_then(|p| p.as_ref().map(|p| p.journal_seq));

        let (pool, first, base) = match (current, prev) {
            (Ok(Some(s)), _) => (s.pool, s.journal_seq, Base::Current),
            (Ok(None), Ok(None)) => {
                if seqs.first().is_some_and(|s| *s != 0) {
                    return Err(StoreError::NoUsableState {
                        dir: state_dir.to_owned(),
                        state: format!(
                            "{} is missing but journals from {} on exist (the pool they apply to is gone)",
                            state_path.display(),
                            journal_path(state_dir, seqs[0]).display()
                        ),
                        prev: format!("{} is missing", prev_path.display()),
                    });
                }
                (Pool::default(), 0, Base::Empty)
            }
            (current, Ok(Some(p))) if first_missing_journal(&seqs, p.journal_seq).is_none() => {
                let (why, exists) = match current {
                    Err(why) => (why, true),
                    _ => (format!("{} is missing", state_path.display()), false),
                };
                (p.pool, p.journal_seq, Base::Prev { why, exists })
            }
            (current, prev) => {
                let state = match current {
                    Err(why) => why,
                    _ => format!("{} is missing", state_path.display()),
                };
                let prev = match prev {
                    Err(why) => why,
                    Ok(None) => format!("{} is missing", prev_path.display()),
                    Ok(Some(p)) => format!(
                        "{} needs {}, which is missing",
                        prev_path.display(),
                        journal_path(
                            state_dir,
                            first_missing_journal(&seqs, p.journal_seq).unwrap_or_default()
                        )
                        .display()
                    ),
                };
                return Err(StoreError::NoUsableState {
                    dir: state_dir.to_owned(),
                    state,
                    prev,
                });
            }
        };
        if let Some(missing) = first_missing_journal(&seqs, first) {
            return Err(StoreError::JournalMissing {
                path: journal_path(state_dir, missing),
                needed_by: match base {
                    Base::Prev { .. } => prev_path.display().to_string(),
                    _ => state_path.display().to_string(),
                },
                first,
            });
        }

        // Read and check everything before changing anything.
        let mut pool = pool;
        let mut torn = Vec::new();
        let mut replayed = 0usize;
        for &seq in seqs.iter().filter(|s| **s >= first) {
            let path = journal_path(state_dir, seq);
            let bytes = std::fs::read(&path).map_err(|source| StoreError::JournalUnreadable {
                path: path.clone(),
                source,
            })?;
            let scan = scan_journal(&path, &bytes)?;
            for op in &scan.ops {
                op.apply(&mut pool);
            }
            replayed += scan.ops.len();
            if let Some((offset, why)) = scan.torn {
                torn.push((path, offset, why));
            }
        }

        for (path, offset, why) in torn {
            tracing::warn!(
                file = %path.display(),
                offset,
                reason = %why,
                "journal ends in a torn record (interrupted append, never acknowledged); truncating it"
            );
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| {
                    f.set_len(offset)?;
                    f.sync_all()
                })
                .map_err(|source| StoreError::Io { path, source })?;
        }
        let snapshots = match base {
            Base::Current => Snapshots {
                gen: 0,
                current: Some(first),
                prev: prev_seq,
            },
            Base::Prev { why, exists } => {
                tracing::warn!(
                    reason = %why,
                    "recovered the pool from {} and its journals",
                    prev_path.display()
                );
                if exists {
                    let aside =
                        state_dir.join(format!("{CORRUPT_PREFIX}{}", timestamp(Utc::now())));
                    std::fs::rename(&state_path, &aside).map_err(|source| StoreError::Io {
                        path: state_path.clone(),
                        source,
                    })?;
                    sync_dir(state_dir)?;
                    tracing::warn!(moved_to = %aside.display(), "kept the unusable snapshot for inspection");
                }
                Snapshots {
                    gen: 0,
                    current: None,
                    prev: Some(first),
                }
            }
            Base::Empty => Snapshots {
                gen: 0,
                current: None,
                prev: None,
            },
        };
        if replayed > 0 {
            tracing::info!(operations = replayed, "replayed lease journal");
        }
        let seq = seqs.last().map_or(first, |last| (last + 1).max(first));
        let journal = Journal::open(state_dir, seq)?;
        Ok((
            Self {
                dir: state_dir.to_owned(),
                generation: AtomicU64::new(0),
                snapshots: tokio::sync::Mutex::new(snapshots),
                journal: Mutex::new(journal),
                flushed: Mutex::new(Flushed::default()),
                failed: std::sync::atomic::AtomicBool::new(false),
                failure: Mutex::new(String::new()),
            },
            pool,
        ))
    }

    /// Writes one lease operation to the journal. Call with the pool lock held, so journal
    /// order is pool order; then, with the lock released, [`StateStore::flush`] it before
    /// acknowledging the operation. On error nothing of the record is left in the journal
    /// and the caller must not acknowledge the operation.
    pub fn append(&self, op: &JournalOp) -> Result<Written, StoreError> {
        if let Some(why) = self.flush_failure() {
            return Err(StoreError::Unflushable { why });
        }
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let body = serde_json::to_vec(op).map_err(|e| StoreError::Append {
            path: journal_path(&self.dir, j.seq),
            offset: j.len,
            source: std::io::Error::other(e),
        })?;
        if j.damaged {
            self.repair(&mut j)?;
        }
        let record = frame(&body);
        match j.write_record(&record) {
            Ok(()) => {
                j.len += record.len() as u64;
                Ok(Written {
                    file: j.file.clone(),
                    seq: j.seq,
                    end: j.len,
                })
            }
            Err(source) => {
                let path = journal_path(&self.dir, j.seq);
                if let Err(e) = j.truncate_to_len() {
                    tracing::error!(file = %path.display(), offset = j.len, error = %e, "cannot cut a failed journal record away; the next append starts a fresh journal");
                    j.damaged = true;
                }
                Err(StoreError::Append {
                    path,
                    offset: j.len,
                    source,
                })
            }
        }
    }

    /// Makes a written record durable (`fdatasync`). Flushes are serialized and each one
    /// covers every record written before it started, so concurrent operations share
    /// flushes. Call without the pool lock. A failed flush leaves the journal's content
    /// unknown (and a later flush could wrongly succeed), so the store then journals
    /// nothing more: no lease is granted until the daemon restarts.
    pub fn flush(&self, w: Written) -> Result<(), StoreError> {
        let mut f = self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = self.flush_failure() {
            return Err(StoreError::Unflushable { why });
        }
        if f.seq == w.seq && f.upto >= w.end {
            return Ok(());
        }
        // Everything written to this journal so far is covered by the flush about to start.
        let upto = {
            let j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            if j.seq == w.seq {
                j.len
            } else {
                w.end
            }
        };
        #[cfg(test)]
        {
            f.syncs += 1;
        }
        #[cfg(test)]
        let result = if std::mem::take(&mut f.fail_next) {
            Err(nix::errno::Errno::EIO.into())
        } else {
            w.file.sync_data()
        };
        #[cfg(not(test))]
        let result = w.file.sync_data();
        match result {
            Ok(()) => {
                if (w.seq, upto) > (f.seq, f.upto) {
                    (f.seq, f.upto) = (w.seq, upto);
                }
                Ok(())
            }
            Err(source) => {
                let path = journal_path(&self.dir, w.seq);
                let why = format!("{}: flush failed: {source}", path.display());
                tracing::error!(error = %why, "the lease journal could not be flushed to disk; no lease will be granted until the daemon is restarted");
                *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = why;
                self.failed.store(true, Ordering::SeqCst);
                Err(StoreError::Flush { path, source })
            }
        }
    }

    fn flush_failure(&self) -> Option<String> {
        self.failed.load(Ordering::SeqCst).then(|| {
            self.failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    /// A failed append left bytes behind: cut them again or move to a fresh journal.
    fn repair(&self, j: &mut Journal) -> Result<(), StoreError> {
        if j.truncate_to_len().is_ok() {
            j.damaged = false;
            return Ok(());
        }
        let next = Journal::open(&self.dir, j.seq + 1).map_err(|e| match e {
            StoreError::Io { path, source } => StoreError::Append {
                path,
                offset: 0,
                source,
            },
            other => other,
        })?;
        tracing::warn!(
            damaged = %journal_path(&self.dir, j.seq).display(),
            next = %journal_path(&self.dir, next.seq).display(),
            "continuing in a fresh journal (the damaged one ends in a torn record, truncated at the next start)"
        );
        *j = next;
        Ok(())
    }

    /// Records that the pool changed in a way only a snapshot captures; call with the
    /// pool lock held. Returns the generation to pass to [`StateStore::persist`].
    pub fn bump(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Makes sure generation `gen` (or a later one) is in a snapshot on disk (fsynced; the
    /// previous snapshot kept as `state.json.prev`).
    pub async fn persist(&self, pool: &Mutex<Pool>, gen: u64) -> Result<(), StoreError> {
        let mut snapshots = self.snapshots.lock().await;
        if snapshots.gen >= gen {
            return Ok(());
        }
        let (bytes, snapshot_gen, new_seq) = {
            let pool = pool.lock().unwrap_or_else(|p| p.into_inner());
            let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            let new_seq = j.seq + 1;
            let bytes = serde_json::to_vec(&SnapshotRef {
                journal_seq: new_seq,
                pool: &pool,
            })
            .map_err(|e| StoreError::Io {
                path: self.dir.join(STATE_FILE),
                source: std::io::Error::other(e),
            })?;
            *j = Journal::open(&self.dir, new_seq)?;
            (bytes, self.generation.load(Ordering::SeqCst), new_seq)
        };
        let dir = self.dir.clone();
        let (current, prev) = (snapshots.current, snapshots.prev);
        let prev = tokio::task::spawn_blocking(move || write_snapshot(&dir, &bytes, current, prev))
            .await
            .map_err(|e| StoreError::Io {
                path: self.dir.join(STATE_FILE),
                source: std::io::Error::other(e),
            })??;
        snapshots.prev = prev;
        snapshots.current = Some(new_seq);
        snapshots.gen = snapshot_gen;
        Ok(())
    }
}

/// Writes `state.json` durably, keeping the one it replaces as `state.json.prev`, then
/// deletes the journals neither needs. `current` / `prev` are the `journal_seq`s of the
/// snapshots on disk; returns the new `prev`.
fn write_snapshot(
    dir: &Path,
    bytes: &[u8],
    current: Option<u64>,
    prev: Option<u64>,
) -> Result<Option<u64>, StoreError> {
    let path = dir.join(STATE_FILE);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    tmp.write_all(bytes).map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;

    let mut prev = prev;
    if let Some(seq) = current {
        // Keep the snapshot being replaced. A hard link (then rename) leaves `state.json`
        // in place at every instant; copying is the fallback where links are refused.
        let prev_tmp = dir.join(PREV_TMP_FILE);
        let _ = std::fs::remove_file(&prev_tmp);
        if std::fs::hard_link(&path, &prev_tmp).is_err() {
            std::fs::copy(&path, &prev_tmp)
                .and_then(|_| File::open(&prev_tmp)?.sync_all())
                .map_err(io(&prev_tmp))?;
        }
        std::fs::rename(&prev_tmp, dir.join(PREV_STATE_FILE)).map_err(io(&prev_tmp))?;
        prev = Some(seq);
    }
    tmp.persist(&path).map_err(|e| StoreError::Io {
        path: path.clone(),
        source: e.error,
    })?;
    sync_dir(dir)?;

    // `state.json.prev` needs the journals from its `journal_seq`; `state.json` needs
    // fewer. Without a previous snapshot, the empty pool (journal 0 on) is the fallback.
    let keep_from = prev.unwrap_or(0);
    for seq in journal_seqs(dir)?.into_iter().filter(|s| *s < keep_from) {
        let _ = std::fs::remove_file(journal_path(dir, seq));
    }
    Ok(prev)
}

/// `flotilla daemon --adopt`: moves the pool state (snapshots, journals, earlier
/// unreadable snapshots) into a new `unreadable-<time>/` directory of the state directory,
/// so the next [`StateStore::open`] starts empty. Keys and certificates stay. Returns the
/// directory.
pub fn move_aside(state_dir: &Path, now: DateTime<Utc>) -> Result<PathBuf, StoreError> {
    let mut aside = state_dir.join(format!("{UNREADABLE_PREFIX}{}", timestamp(now)));
    let mut n = 1;
    while aside.exists() {
        aside = state_dir.join(format!("{UNREADABLE_PREFIX}{}-{n}", timestamp(now)));
        n += 1;
    }
    std::fs::create_dir(&aside).map_err(|source| StoreError::Io {
        path: aside.clone(),
        source,
    })?;
    for name in dir_entries(state_dir)? {
        let is_state = name == STATE_FILE
            || name == PREV_STATE_FILE
            || name == PREV_TMP_FILE
            || name.starts_with(CORRUPT_PREFIX)
            || (name.starts_with(JOURNAL_PREFIX)
                && (name.ends_with(JOURNAL_SUFFIX) || name.ends_with(OLD_JOURNAL_SUFFIX)));
        if is_state {
            let from = state_dir.join(&name);
            std::fs::rename(&from, aside.join(&name))
                .map_err(|source| StoreError::Io { path: from, source })?;
        }
    }
    sync_dir(&aside)?;
    sync_dir(state_dir)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Machine;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn pool_with_idle(n: usize) -> Pool {
        let mut p = Pool::default();
        for i in 0..n {
            let id = format!("m-{i:05}");
            let mut m = Machine::booting(id.clone(), "c".into(), "t3.micro".into(), t(0));
            m.instance_id = format!("i-{i}");
            p.insert_for_test(m);
            p.mark_ready(&id, t(1));
        }
        p
    }

    /// Leases the way the daemon does: mutate and journal under the pool lock.
    fn lease(store: &StateStore, pool: &Mutex<Pool>, job: &str, id: &str) {
        try_lease(store, pool, job, id).unwrap();
    }

    /// Leases the way the daemon does: mutate and write under the pool lock, flush after,
    /// undo if either failed.
    fn try_lease(
        store: &StateStore,
        pool: &Mutex<Pool>,
        job: &str,
        id: &str,
    ) -> Result<(), StoreError> {
        let (record, written) = {
            let mut p = pool.lock().unwrap();
            let record = p.try_lease(job, "c", id.into(), t(2)).unwrap().clone();
            let written = store.append(&JournalOp::Leased {
                lease: record.clone(),
            });
            (record, written)
        };
        let r = written.and_then(|w| store.flush(w));
        if r.is_err() {
            // Not on disk, so not granted.
            let mut p = pool.lock().unwrap();
            p.undo_lease(&record.lease_id);
        }
        r
    }

    fn release(store: &StateStore, pool: &Mutex<Pool>, id: &str) {
        let written = {
            let mut p = pool.lock().unwrap();
            let op = JournalOp::Released {
                lease_id: id.into(),
                outcome: ReleaseOutcome::Healthy,
                reason: None,
                at: t(3),
            };
            op.apply(&mut p);
            store.append(&op).unwrap()
        };
        store.flush(written).unwrap();
    }

    fn current_journal(store: &StateStore) -> PathBuf {
        journal_path(&store.dir, store.journal.lock().unwrap().seq)
    }

    fn assert_same(loaded: &Pool, live: &Mutex<Pool>) {
        let live = live.lock().unwrap();
        assert_eq!(loaded.leases(), live.leases());
        assert_eq!(loaded.machines(), live.machines());
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn frames_round_trip_and_damage_is_detected() {
        let f = frame(br#"{"op":"x"}"#);
        let text = String::from_utf8(f.clone()).unwrap();
        assert_eq!(
            text,
            format!("10 {:08x} {{\"op\":\"x\"}}\n", crc32c(br#"{"op":"x"}"#))
        );
        assert_eq!(parse_frame(&f), Ok((&br#"{"op":"x"}"#[..], f.len())));
        assert_eq!(parse_frame(&f[..f.len() - 1]), Err(FrameError::Incomplete));
        let mut flipped = f.clone();
        flipped[14] ^= 1;
        assert!(matches!(
            parse_frame(&flipped),
            Err(FrameError::Checksum { .. })
        ));
        assert!(matches!(
            parse_frame(b"\0\0\0\0\n"),
            Err(FrameError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn journaled_leases_survive_a_restart_without_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(3));
        let gen = store.bump();
        store.persist(&pool, gen).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        lease(&store, &pool, "job-2", "l2");
        release(&store, &pool, "l1");
        drop(store); // "SIGKILL": no snapshot after the lease operations
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_same(&loaded, &pool);
        assert_eq!(loaded.lease_for_job("job-2").unwrap().lease_id, "l2");
    }

    #[tokio::test]
    async fn leases_before_the_first_snapshot_are_replayed_onto_the_empty_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (store, empty) = StateStore::open(dir.path()).unwrap();
        assert!(empty.machines().is_empty());
        // Machines known only in memory (never snapshotted); the lease is journaled.
        let pool = Mutex::new(pool_with_idle(1));
        lease(&store, &pool, "job-1", "l1");
        drop(store);
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_eq!(loaded.leases(), pool.lock().unwrap().leases());
    }

    #[tokio::test]
    async fn snapshot_then_more_leases_replays_only_the_new_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(2));
        lease(&store, &pool, "job-1", "l1");
        let gen = store.bump();
        store.persist(&pool, gen).await.unwrap();
        release(&store, &pool, "l1");
        lease(&store, &pool, "job-2", "l2");
        drop(store);
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_same(&loaded, &pool);
    }

    #[tokio::test]
    async fn journals_are_kept_while_the_previous_snapshot_needs_them() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(2));
        for i in 0..4 {
            lease(&store, &pool, &format!("job-{i}"), &format!("l{i}"));
            release(&store, &pool, &format!("l{i}"));
            store.persist(&pool, store.bump()).await.unwrap();
        }
        let prev = read_snapshot(&dir.path().join(PREV_STATE_FILE))
            .unwrap()
            .unwrap();
        let current = read_snapshot(&dir.path().join(STATE_FILE))
            .unwrap()
            .unwrap();
        let seqs = journal_seqs(dir.path()).unwrap();
        assert_eq!(seqs.first(), Some(&prev.journal_seq), "{seqs:?}");
        assert_eq!(seqs.last(), Some(&current.journal_seq), "{seqs:?}");
        assert_eq!(first_missing_journal(&seqs, prev.journal_seq), None);
    }

    #[tokio::test]
    async fn torn_tail_is_truncated_and_later_appends_work() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(2));
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        let path = current_journal(&store);
        let good_len = std::fs::metadata(&path).unwrap().len();
        // Killed mid-append: half a record, no end of line.
        let half = frame(br#"{"op":"released","lease_id":"l1","outcome":"healthy"}"#);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&half[..20])
            .unwrap();
        drop(store);

        let (store, loaded) = StateStore::open(dir.path()).unwrap();
        assert_same(&loaded, &pool);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            good_len,
            "cut back to the last good record"
        );
        let pool = Mutex::new(loaded);
        release(&store, &pool, "l1");
        lease(&store, &pool, "job-2", "l2");
        drop(store);
        let (_, again) = StateStore::open(dir.path()).unwrap();
        assert_same(&again, &pool);
    }

    #[tokio::test]
    async fn a_tail_of_zeros_from_a_power_loss_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(1));
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        let path = current_journal(&store);
        let good_len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(good_len + 4096).unwrap();
        drop(store);
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_same(&loaded, &pool);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
    }

    #[tokio::test]
    async fn corruption_followed_by_good_records_is_refused_with_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(2));
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        let path = current_journal(&store);
        let second = std::fs::metadata(&path).unwrap().len();
        lease(&store, &pool, "job-2", "l2");
        release(&store, &pool, "l1");
        drop(store);
        // Flip one byte inside the second record's JSON.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = second as usize + 30;
        bytes[at] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();

        let err = StateStore::open(dir.path()).err().unwrap();
        let msg = err.to_string();
        assert!(err.is_unreadable_state(), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("offset {second}")), "{msg}");
        assert!(msg.contains("--adopt"), "{msg}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "a refused journal is left as it was"
        );
    }

    #[tokio::test]
    async fn a_valid_checksum_on_something_else_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let path = current_journal(&store);
        drop(store);
        std::fs::write(&path, frame(br#"{"op":"from_the_future"}"#)).unwrap();
        let err = StateStore::open(dir.path()).err().unwrap();
        assert!(
            matches!(err, StoreError::JournalCorrupt { offset: 0, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn disk_full_mid_record_leaves_no_half_record() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(2));
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        let path = current_journal(&store);
        let before = std::fs::metadata(&path).unwrap().len();

        store.journal.lock().unwrap().disk_full_after = Some(17);
        let err = try_lease(&store, &pool, "job-2", "l2").unwrap_err();
        assert!(
            matches!(&err, StoreError::Append { offset, .. } if *offset == before),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        assert!(!pool.lock().unwrap().leases().contains_key("l2"));

        // The disk has room again: later records follow the last good one directly.
        lease(&store, &pool, "job-3", "l3");
        release(&store, &pool, "l1");
        drop(store);
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_same(&loaded, &pool);
        assert!(loaded.lease_for_job("job-2").is_none());
    }

    #[tokio::test]
    async fn a_half_record_that_cannot_be_cut_moves_appends_to_a_fresh_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(3));
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        let damaged = current_journal(&store);
        {
            let mut j = store.journal.lock().unwrap();
            j.disk_full_after = Some(25);
            j.truncate_fails = true;
        }
        try_lease(&store, &pool, "job-2", "l2").unwrap_err();
        lease(&store, &pool, "job-3", "l3");
        assert_ne!(current_journal(&store), damaged);
        drop(store);
        // The damaged journal ends in a torn record; the next journal's records still count.
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_same(&loaded, &pool);
        assert!(loaded.lease_for_job("job-3").is_some());
        assert!(loaded.lease_for_job("job-2").is_none());
    }

    #[tokio::test]
    async fn corrupt_state_json_recovers_from_prev_and_its_journals() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(3));
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-2", "l2");
        release(&store, &pool, "l1");
        drop(store);
        std::fs::write(dir.path().join(STATE_FILE), b"{\"journal_seq\": 7, \"po").unwrap();

        let (store, loaded) = StateStore::open(dir.path()).unwrap();
        assert_same(&loaded, &pool);
        assert!(
            !dir.path().join(STATE_FILE).exists(),
            "the bad snapshot is moved aside"
        );
        let kept = dir_entries(dir.path()).unwrap();
        assert!(
            kept.iter().any(|n| n.starts_with(CORRUPT_PREFIX)),
            "{kept:?}"
        );

        // The next snapshots must not replace the good .prev with nothing usable.
        let pool = Mutex::new(loaded);
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-3", "l3");
        drop(store);
        std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
        let (_, again) = StateStore::open(dir.path()).unwrap();
        assert_same(&again, &pool);
    }

    #[tokio::test]
    async fn both_snapshots_unusable_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(1));
        store.persist(&pool, store.bump()).await.unwrap();
        store.persist(&pool, store.bump()).await.unwrap();
        drop(store);
        std::fs::write(dir.path().join(STATE_FILE), b"\0\0\0").unwrap();
        std::fs::write(dir.path().join(PREV_STATE_FILE), b"{").unwrap();
        let err = StateStore::open(dir.path()).err().unwrap();
        let msg = err.to_string();
        assert!(err.is_unreadable_state(), "{msg}");
        assert!(msg.contains("state.json: corrupt"), "{msg}");
        assert!(msg.contains("state.json.prev: corrupt"), "{msg}");
        assert!(msg.contains("--adopt"), "{msg}");
    }

    #[tokio::test]
    async fn prev_without_its_journals_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(1));
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        store.persist(&pool, store.bump()).await.unwrap();
        drop(store);
        let prev = read_snapshot(&dir.path().join(PREV_STATE_FILE))
            .unwrap()
            .unwrap();
        // The journal holding job-1's lease is gone: .prev alone would hand its machine out.
        std::fs::remove_file(journal_path(dir.path(), prev.journal_seq)).unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"garbage").unwrap();
        let err = StateStore::open(dir.path()).err().unwrap();
        assert!(
            matches!(&err, StoreError::NoUsableState { prev, .. } if prev.contains("missing")),
            "{err}"
        );
    }

    #[test]
    fn missing_state_with_journals_left_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(journal_path(dir.path(), 5), b"").unwrap();
        let err = StateStore::open(dir.path()).err().unwrap();
        assert!(err.is_unreadable_state(), "{err}");
    }

    #[test]
    fn a_gap_in_the_journals_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = serde_json::to_vec(&SnapshotRef {
            journal_seq: 3,
            pool: &Pool::default(),
        })
        .unwrap();
        std::fs::write(dir.path().join(STATE_FILE), snapshot).unwrap();
        std::fs::write(journal_path(dir.path(), 3), b"").unwrap();
        std::fs::write(journal_path(dir.path(), 5), b"").unwrap();
        let err = StateStore::open(dir.path()).err().unwrap();
        assert!(
            matches!(&err, StoreError::JournalMissing { path, .. } if *path == journal_path(dir.path(), 4)),
            "{err}"
        );
    }

    #[test]
    fn unframed_journal_of_an_earlier_build_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("journal-00000000000000000001.jsonl");
        std::fs::write(&old, b"{\"op\":\"released\"}\n").unwrap();
        let err = StateStore::open(dir.path()).err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains(&old.display().to_string()), "{msg}");
        assert!(msg.contains("unframed"), "{msg}");
        assert!(err.is_unreadable_state());
    }

    #[test]
    fn bare_pool_snapshot_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_with_idle(2);
        std::fs::write(
            dir.path().join(STATE_FILE),
            serde_json::to_vec(&pool).unwrap(),
        )
        .unwrap();
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_eq!(loaded.machines(), pool.machines());
    }

    #[tokio::test]
    async fn move_aside_keeps_keys_and_leaves_an_empty_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(1));
        store.persist(&pool, store.bump()).await.unwrap();
        store.persist(&pool, store.bump()).await.unwrap();
        drop(store);
        std::fs::write(dir.path().join("ca.key"), b"key").unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"garbage").unwrap();
        std::fs::write(dir.path().join(PREV_STATE_FILE), b"garbage").unwrap();
        assert!(StateStore::open(dir.path()).is_err());

        let aside = move_aside(dir.path(), t(0)).unwrap();
        assert!(aside.starts_with(dir.path()));
        assert!(aside.join(STATE_FILE).exists());
        assert!(aside.join(PREV_STATE_FILE).exists());
        assert!(dir.path().join("ca.key").exists(), "keys stay");
        let (_, fresh) = StateStore::open(dir.path()).unwrap();
        assert!(fresh.machines().is_empty());
        assert_ne!(move_aside(dir.path(), t(0)).unwrap(), aside, "never reused");
    }

    #[tokio::test]
    async fn a_failed_flush_stops_all_journaling() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(3));
        store.persist(&pool, store.bump()).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        store.flushed.lock().unwrap().fail_next = true;
        let err = try_lease(&store, &pool, "job-2", "l2").unwrap_err();
        assert!(matches!(err, StoreError::Flush { .. }), "{err}");
        let err = try_lease(&store, &pool, "job-3", "l3").unwrap_err();
        assert!(
            err.to_string().contains("restart the daemon"),
            "no later flush is trusted: {err}"
        );
        assert_eq!(pool.lock().unwrap().leases().len(), 1);
    }

    #[test]
    fn concurrent_leases_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(202));
        std::thread::scope(|s| {
            for thread in 0..8 {
                let (store, pool) = (&store, &pool);
                s.spawn(move || {
                    for i in 0..25 {
                        lease(
                            store,
                            pool,
                            &format!("job-{thread}-{i}"),
                            &format!("l{thread}-{i}"),
                        );
                    }
                });
            }
        });
        let syncs = store.flushed.lock().unwrap().syncs;
        eprintln!("200 leases from 8 threads: {syncs} flushes");
        assert!(syncs <= 200, "{syncs}");
        // And a record flushed by someone else's flush is not flushed again.
        let (a, b) = {
            let mut p = pool.lock().unwrap();
            let a = p
                .try_lease("job-a", "c", "la".into(), t(2))
                .unwrap()
                .clone();
            let a = store.append(&JournalOp::Leased { lease: a }).unwrap();
            let b = p
                .try_lease("job-b", "c", "lb".into(), t(2))
                .unwrap()
                .clone();
            (a, store.append(&JournalOp::Leased { lease: b }).unwrap())
        };
        let before = store.flushed.lock().unwrap().syncs;
        store.flush(b).unwrap();
        store.flush(a).unwrap();
        assert_eq!(store.flushed.lock().unwrap().syncs, before + 1);
        drop(store);
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert!(
            loaded.leases() == pool.lock().unwrap().leases(),
            "every lease replayed"
        );
    }

    /// Prints what a lease costs with 1000 machines tracked (journal append and flush, one
    /// lease at a time: no flush shared) against a full snapshot, so a regression of the
    /// lease path to O(machines) shows in --nocapture.
    #[tokio::test]
    async fn lease_cost_does_not_grow_with_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(1000));
        let t0 = std::time::Instant::now();
        store.persist(&pool, store.bump()).await.unwrap();
        let snapshot = t0.elapsed();
        let t0 = std::time::Instant::now();
        for i in 0..100 {
            lease(&store, &pool, &format!("job-{i}"), &format!("l{i}"));
        }
        let per_lease = t0.elapsed() / 100;
        eprintln!(
            "1000 machines: snapshot {snapshot:?}, lease (journal append and flush) {per_lease:?}"
        );
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_eq!(loaded.leases().len(), 100);
    }
}

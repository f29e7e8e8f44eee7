//! Durable pool state: a snapshot (`state.json`) plus a journal of lease operations
//! (`journal-<seq>.jsonl`), so a lease costs one small append instead of rewriting the
//! whole pool: O(1) per job however many machines the daemon tracks.
//!
//! - Lease grants and releases are appended to the current journal while the pool lock is
//!   held, so journal order is pool order. Everything else (launch, ready, broken,
//!   terminate, drain) is rare and written as a snapshot.
//! - A snapshot is serialized under the pool lock together with a switch to a fresh journal
//!   (`journal_seq` in the snapshot names the first journal it does not contain), written by
//!   atomic rename, and only then are older journals deleted. Loading replays every journal
//!   from `journal_seq` on, so a crash at any point loses nothing and applies nothing twice.
//! - Snapshots group-commit: a change bumps a generation under the pool lock; whoever gets
//!   the write lock first writes the latest snapshot, later callers return at once.
//!
//! Durability: writes survive the daemon being killed at any point (the page cache outlives
//! the process). Snapshots after launches and terminations are also fsynced; journal
//! appends are not, because a host crash ends that host's jobs anyway and the instances it
//! launched are adopted by tag or reaped as orphans.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use flotilla_proto::api::{MachineState, ReleaseOutcome};
use serde::{Deserialize, Serialize};

use crate::pool::{LeaseRecord, Pool};

pub const STATE_FILE: &str = "state.json";
const JOURNAL_PREFIX: &str = "journal-";
const JOURNAL_SUFFIX: &str = ".jsonl";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt state file ({source}); move it aside to start with an empty pool (running instances are then reaped as orphans after orphan_grace)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
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
                if let Some(m) = pool.machines.get_mut(&lease.machine_id) {
                    m.state = MachineState::Leased;
                    m.lease_id = Some(lease.lease_id.clone());
                }
                pool.leases.insert(lease.lease_id.clone(), lease.clone());
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

struct Journal {
    file: File,
    seq: u64,
}

pub struct StateStore {
    dir: PathBuf,
    path: PathBuf,
    generation: AtomicU64,
    written: tokio::sync::Mutex<u64>,
    journal: Mutex<Journal>,
}

fn journal_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{JOURNAL_PREFIX}{seq:020}{JOURNAL_SUFFIX}"))
}

fn journal_seqs(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let io = |source| StoreError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix(JOURNAL_PREFIX)?
                .strip_suffix(JOURNAL_SUFFIX)?
                .parse()
                .ok()
        })
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

fn open_journal(dir: &Path, seq: u64) -> Result<File, StoreError> {
    let path = journal_path(dir, seq);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| StoreError::Io { path, source })
}

impl StateStore {
    /// Loads the snapshot and replays the journals after it.
    pub fn open(state_dir: &Path) -> Result<(Self, Pool), StoreError> {
        let path = state_dir.join(STATE_FILE);
        let (mut pool, first_seq) = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Snapshot>(&bytes) {
                Ok(s) => (s.pool, s.journal_seq),
                // A bare pool (no journal yet) is accepted too.
                Err(_) => (
                    serde_json::from_slice::<Pool>(&bytes).map_err(|source| {
                        StoreError::Corrupt {
                            path: path.clone(),
                            source,
                        }
                    })?,
                    0,
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Pool::default(), 0),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let seqs = journal_seqs(state_dir)?;
        let mut replayed = 0usize;
        for &seq in seqs.iter().filter(|s| **s >= first_seq) {
            let jpath = journal_path(state_dir, seq);
            let file = File::open(&jpath).map_err(|source| StoreError::Io {
                path: jpath.clone(),
                source,
            })?;
            for line in std::io::BufReader::new(file).lines() {
                let Ok(line) = line else { break };
                // A torn last line (killed mid-append) is the only way a line can be bad:
                // that operation was never acknowledged.
                match serde_json::from_str::<JournalOp>(&line) {
                    Ok(op) => {
                        op.apply(&mut pool);
                        replayed += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        if replayed > 0 {
            tracing::info!(operations = replayed, "replayed lease journal");
        }
        let seq = seqs.last().copied().unwrap_or(0).max(first_seq) + 1;
        let file = open_journal(state_dir, seq)?;
        Ok((
            Self {
                dir: state_dir.to_owned(),
                path,
                generation: AtomicU64::new(0),
                written: tokio::sync::Mutex::new(0),
                journal: Mutex::new(Journal { file, seq }),
            },
            pool,
        ))
    }

    /// Appends one lease operation. Call with the pool lock held (so journal order is pool
    /// order); it is one small write.
    pub fn append(&self, op: &JournalOp) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(op).map_err(|e| StoreError::Io {
            path: self.dir.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let seq = j.seq;
        j.file.write_all(&line).map_err(|source| StoreError::Io {
            path: journal_path(&self.dir, seq),
            source,
        })
    }

    /// Records that the pool changed in a way only a snapshot captures; call with the
    /// pool lock held. Returns the generation to pass to [`StateStore::persist`].
    pub fn bump(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Makes sure generation `gen` (or a later one) is in a snapshot; `durable` fsyncs.
    pub async fn persist(
        &self,
        pool: &Mutex<Pool>,
        gen: u64,
        durable: bool,
    ) -> Result<(), StoreError> {
        let mut written = self.written.lock().await;
        if *written >= gen && !durable {
            return Ok(());
        }
        let (bytes, snapshot_gen, old_seq) = {
            let pool = pool.lock().unwrap_or_else(|p| p.into_inner());
            let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            let new_seq = j.seq + 1;
            let file = open_journal(&self.dir, new_seq)?;
            let old_seq = std::mem::replace(&mut *j, Journal { file, seq: new_seq }).seq;
            let bytes = serde_json::to_vec(&SnapshotRef {
                journal_seq: new_seq,
                pool: &pool,
            })
            .map_err(|e| StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })?;
            (bytes, self.generation.load(Ordering::SeqCst), old_seq)
        };
        let path = self.path.clone();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            write_atomic(&path, &bytes, durable)?;
            for seq in journal_seqs(&dir)?.into_iter().filter(|s| *s <= old_seq) {
                let _ = std::fs::remove_file(journal_path(&dir, seq));
            }
            Ok::<(), StoreError>(())
        })
        .await
        .map_err(|e| StoreError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })??;
        *written = snapshot_gen;
        Ok(())
    }
}

fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    if durable {
        tmp.as_file().sync_all().map_err(io)?;
    }
    tmp.persist(path).map_err(|e| io(e.error))?;
    if durable {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
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
            p.machines.insert(id.clone(), m);
            p.mark_ready(&id, t(1));
        }
        p
    }

    /// Leases the way the daemon does: mutate and journal under the pool lock.
    fn lease(store: &StateStore, pool: &Mutex<Pool>, job: &str, id: &str) {
        let mut p = pool.lock().unwrap();
        let record = p.try_lease(job, "c", id.into(), t(2)).unwrap().clone();
        store.append(&JournalOp::Leased { lease: record }).unwrap();
    }

    fn release(store: &StateStore, pool: &Mutex<Pool>, id: &str) {
        let mut p = pool.lock().unwrap();
        let op = JournalOp::Released {
            lease_id: id.into(),
            outcome: ReleaseOutcome::Healthy,
            reason: None,
            at: t(3),
        };
        op.apply(&mut p);
        store.append(&op).unwrap();
    }

    #[tokio::test]
    async fn journaled_leases_survive_a_restart_without_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(3));
        let gen = store.bump();
        store.persist(&pool, gen, true).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        lease(&store, &pool, "job-2", "l2");
        release(&store, &pool, "l1");
        drop(store); // "SIGKILL": no snapshot after the lease operations
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        let live = pool.lock().unwrap();
        assert_eq!(loaded.leases, live.leases);
        assert_eq!(loaded.machines, live.machines);
        assert_eq!(loaded.lease_for_job("job-2").unwrap().lease_id, "l2");
    }

    #[tokio::test]
    async fn snapshot_then_more_leases_replays_only_the_new_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(2));
        lease(&store, &pool, "job-1", "l1");
        let gen = store.bump();
        store.persist(&pool, gen, false).await.unwrap();
        release(&store, &pool, "l1");
        lease(&store, &pool, "job-2", "l2");
        drop(store);
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        let live = pool.lock().unwrap();
        assert_eq!(
            loaded.machines, live.machines,
            "release applied exactly once"
        );
        assert_eq!(loaded.leases, live.leases);
        assert_eq!(
            journal_seqs(dir.path()).unwrap().len(),
            2,
            "old journals deleted"
        );
    }

    #[tokio::test]
    async fn torn_last_journal_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(1));
        store.persist(&pool, store.bump(), false).await.unwrap();
        lease(&store, &pool, "job-1", "l1");
        {
            let mut j = store.journal.lock().unwrap();
            j.file.write_all(b"{\"op\":\"released\",\"lease_").unwrap();
        }
        drop(store);
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert!(loaded.leases.contains_key("l1"));
    }

    /// Prints what a lease costs with 1000 machines tracked (journal append) against a full
    /// snapshot, so a regression of the lease path to O(machines) shows in --nocapture.
    #[tokio::test]
    async fn lease_cost_does_not_grow_with_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let pool = Mutex::new(pool_with_idle(1000));
        let t0 = std::time::Instant::now();
        store.persist(&pool, store.bump(), false).await.unwrap();
        let snapshot = t0.elapsed();
        let t0 = std::time::Instant::now();
        for i in 0..100 {
            lease(&store, &pool, &format!("job-{i}"), &format!("l{i}"));
        }
        let per_lease = t0.elapsed() / 100;
        eprintln!("1000 machines: snapshot {snapshot:?}, lease (journal append) {per_lease:?}");
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_eq!(loaded.leases.len(), 100);
    }

    #[test]
    fn corrupt_state_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = StateStore::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("state.json"), "{err}");
    }
}

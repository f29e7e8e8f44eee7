//! Durable pool state: one JSON file in the state directory, replaced atomically (temp
//! file, fsync, rename, fsync of the directory), so a crash at any instant leaves either
//! the old or the new state, never a torn one.
//!
//! Writers group-commit: a change bumps a generation under the pool lock; whoever gets the
//! write lock first writes the latest snapshot, and callers whose generation is already on
//! disk return at once. A lease is acknowledged only after it is on disk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::pool::Pool;

pub const STATE_FILE: &str = "state.json";

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

pub struct StateStore {
    path: PathBuf,
    generation: AtomicU64,
    written: tokio::sync::Mutex<u64>,
}

impl StateStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(STATE_FILE),
            generation: AtomicU64::new(0),
            written: tokio::sync::Mutex::new(0),
        }
    }

    pub fn load(&self) -> Result<Pool, StoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pool::default()),
            Err(source) => Err(StoreError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Records that the pool changed; call with the pool lock held. Returns the generation
    /// to pass to [`StateStore::persist`].
    pub fn bump(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Makes sure generation `gen` (or a later one) is on disk.
    pub async fn persist(&self, pool: &Mutex<Pool>, gen: u64) -> Result<(), StoreError> {
        let mut written = self.written.lock().await;
        if *written >= gen {
            return Ok(());
        }
        let (bytes, snapshot_gen) = {
            let pool = pool.lock().unwrap_or_else(|p| p.into_inner());
            let bytes = serde_json::to_vec(&*pool).map_err(|e| StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })?;
            (bytes, self.generation.load(Ordering::SeqCst))
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })??;
        *written = snapshot_gen;
        Ok(())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Machine;

    #[tokio::test]
    async fn persisted_pool_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let pool = Mutex::new(Pool::default());
        let gen = {
            let mut p = pool.lock().unwrap();
            p.machines.insert(
                "m1".into(),
                Machine::booting(
                    "m1".into(),
                    "c".into(),
                    "t3.micro".into(),
                    chrono::Utc::now(),
                ),
            );
            store.bump()
        };
        store.persist(&pool, gen).await.unwrap();
        let loaded = StateStore::new(dir.path()).load().unwrap();
        assert_eq!(loaded.machines["m1"], pool.lock().unwrap().machines["m1"]);
    }

    #[test]
    fn corrupt_state_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = StateStore::new(dir.path()).load().unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
    }
}

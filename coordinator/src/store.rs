//! The coordinator's durable state: job records in an embedded redb database under the data
//! directory, so a restarted coordinator still knows its jobs.

use crate::job::Job;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use swarm_sharding::JobId;

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs_v1");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the coordinator store {path}: {source}; is another `swarm up` using this --data-dir?")]
    Open { path: PathBuf, source: redb::DatabaseError },
    #[error("coordinator store {path}: {what}: {detail}")]
    Io { path: PathBuf, what: &'static str, detail: String },
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `<data_dir>/coordinator.redb`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Io {
            path: data_dir.to_path_buf(),
            what: "creating the data directory",
            detail: e.to_string(),
        })?;
        let path = data_dir.join("coordinator.redb");
        // A coordinator that was just killed may hold the file lock for a moment longer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Database::create(&path) {
                Ok(db) => return Ok(Store { db, path }),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(source) => return Err(StoreError::Open { path, source }),
            }
        }
    }

    fn io(&self, what: &'static str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io { path: self.path.clone(), what, detail: e.to_string() }
    }

    pub fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(job).map_err(|e| self.io("encoding a job", e))?;
        let txn = self.db.begin_write().map_err(|e| self.io("starting a write", e))?;
        {
            let mut t = txn.open_table(JOBS).map_err(|e| self.io("opening the jobs table", e))?;
            t.insert(job.id.0, bytes.as_slice()).map_err(|e| self.io("writing a job", e))?;
        }
        txn.commit().map_err(|e| self.io("committing", e))
    }

    pub fn load_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io("starting a read", e))?;
        let t = match txn.open_table(JOBS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.io("opening the jobs table", e)),
        };
        let mut jobs = Vec::new();
        for row in t.iter().map_err(|e| self.io("reading jobs", e))? {
            let (k, v) = row.map_err(|e| self.io("reading a job", e))?;
            let job: Job = serde_json::from_slice(v.value())
                .map_err(|e| self.io("decoding a job", format!("{}: {e}", JobId(k.value()))))?;
            jobs.push(job);
        }
        Ok(jobs)
    }
}

//! The controller's durable state: an embedded SQLite database in WAL mode. Jobs and nodes are
//! stored as JSON rows of the core's own types (one row per job and node, rewritten when it
//! changes); events are appended and never rewritten. Every change set of the core is written in
//! one transaction before the API answers, so a controller killed at any instant restarts with
//! everything it acknowledged.

use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

use myriad_core::{Changes, Job, Node};
use proto::api::{Event, JobId};

#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "state database: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError(format!("corrupt row: {e}"))
    }
}

pub struct Store {
    conn: Connection,
}

/// What a restarting controller rebuilds its core from.
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub jobs: Vec<Job>,
    pub next_job_id: u64,
    pub next_event_seq: u64,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        // synchronous=FULL: every commit is on disk (the WAL fsynced) before a call that waited
        // for it is answered, so an acknowledged submit survives a power cut, not only a killed
        // process. Group commit keeps that to one fsync per batch of calls.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, row TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, row TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS events (
                 seq INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, job_id INTEGER, node TEXT,
                 kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
             CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);",
        )?;
        Ok(Store { conn })
    }

    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let meta = |key: &str| -> Result<Option<u64>, StoreError> {
            Ok(self
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get::<_, i64>(0))
                .optional()?
                .map(|v| v as u64))
        };
        let mut nodes = Vec::new();
        let mut stmt = self.conn.prepare("SELECT row FROM nodes ORDER BY name")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            nodes.push(serde_json::from_str(&row?)?);
        }
        let mut jobs = Vec::new();
        let mut stmt = self.conn.prepare("SELECT row FROM jobs ORDER BY id")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            jobs.push(serde_json::from_str(&row?)?);
        }
        let max_seq: Option<i64> = self.conn.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
        Ok(Snapshot {
            nodes,
            jobs,
            next_job_id: meta("next_job_id")?.unwrap_or(1),
            next_event_seq: meta("next_event_seq")?.unwrap_or(1).max(max_seq.map_or(1, |s| s as u64 + 1)),
        })
    }

    pub fn save(&mut self, changes: &Changes) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for node in &changes.nodes {
            tx.execute(
                "INSERT OR REPLACE INTO nodes (name, row) VALUES (?1, ?2)",
                params![node.name, serde_json::to_string(node)?],
            )?;
        }
        for job in &changes.jobs {
            tx.execute(
                "INSERT OR REPLACE INTO jobs (id, row) VALUES (?1, ?2)",
                params![job.id as i64, serde_json::to_string(job)?],
            )?;
        }
        for e in &changes.events {
            tx.execute(
                "INSERT INTO events (seq, time_ms, job_id, node, kind, message, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    e.seq as i64,
                    e.time_ms as i64,
                    e.job_id.map(|j| j as i64),
                    e.node,
                    e.kind,
                    e.message,
                    e.data.as_ref().map(|d| d.to_string())
                ],
            )?;
        }
        for (key, value) in [("next_job_id", changes.next_job_id), ("next_event_seq", changes.next_event_seq)]
        {
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![key, value as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Events after `after_seq`, oldest first, at most `limit`; of one job when `job_id` is given.
    pub fn events(
        &self,
        job_id: Option<JobId>,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, time_ms, job_id, node, kind, message, data FROM events
             WHERE seq > ?1 AND (?2 IS NULL OR job_id = ?2) ORDER BY seq LIMIT ?3",
        )?;
        let rows =
            stmt.query_map(params![after_seq as i64, job_id.map(|j| j as i64), limit as i64], |r| {
                Ok(Event {
                    seq: r.get::<_, i64>(0)? as u64,
                    time_ms: r.get::<_, i64>(1)? as u64,
                    job_id: r.get::<_, Option<i64>>(2)?.map(|j| j as u64),
                    node: r.get(3)?,
                    kind: r.get(4)?,
                    message: r.get(5)?,
                    data: r.get::<_, Option<String>>(6)?.and_then(|d| serde_json::from_str(&d).ok()),
                })
            })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

//! Snapshot metadata in an embedded, crash-safe database (redb: ACID, copy-on-write).
//!
//! Every change is one write transaction. Directories are created before the transaction that
//! records them commits and removed after the one that forgets them, so a crash leaves at worst
//! an orphan directory, which start-up and `Cleanup` remove.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SnapError};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Snapshot kind (values as containerd's `Kind` enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only view of a parent.
    View,
    /// Writable, not yet committed.
    Active,
    /// Immutable, can be a parent.
    Committed,
}

/// Disk usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes.
    pub size: i64,
    /// Inodes.
    pub inodes: i64,
}

/// One snapshot's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Directory id under `snapshots/`.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Parent key (committed).
    pub parent: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time (ns since epoch).
    pub created_ns: i128,
    /// Last update time (ns since epoch).
    pub updated_ns: i128,
    /// Usage, recorded at commit.
    pub usage: Option<Usage>,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// The metadata store.
pub struct MetaStore {
    db: Database,
}

fn decode(key: &str, b: &[u8]) -> Result<Snapshot> {
    serde_json::from_slice(b)
        .map_err(|e| SnapError::Internal(format!("snapshot {key}: corrupt record: {e}")))
}

impl MetaStore {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<MetaStore> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(MetaStore { db })
    }

    /// Creates a snapshot. `make_dirs` runs with the new id inside the transaction, before it
    /// commits.
    pub fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: BTreeMap<String, String>,
        make_dirs: impl FnOnce(u64) -> std::io::Result<()>,
    ) -> Result<Snapshot> {
        if key.is_empty() {
            return Err(SnapError::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        let tx = self.db.begin_write()?;
        let snap = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            if t.get(key)?.is_some() {
                return Err(SnapError::AlreadyExists(format!("snapshot {key}")));
            }
            if let Some(p) = parent {
                let rec = t
                    .get(p)?
                    .ok_or_else(|| SnapError::NotFound(format!("parent snapshot {p}")))?;
                let ps = decode(p, rec.value())?;
                if ps.kind != Kind::Committed {
                    return Err(SnapError::InvalidArgument(format!(
                        "parent {p} is not a committed snapshot"
                    )));
                }
            }
            let mut c = tx.open_table(COUNTERS)?;
            let id = c.get("next_id")?.map(|v| v.value()).unwrap_or(1);
            c.insert("next_id", id + 1)?;
            let now = now_ns();
            let snap = Snapshot {
                id,
                kind,
                parent: parent.map(str::to_string),
                labels,
                created_ns: now,
                updated_ns: now,
                usage: None,
            };
            make_dirs(id)?;
            t.insert(key, serde_json::to_vec(&snap)?.as_slice())?;
            snap
        };
        tx.commit()?;
        Ok(snap)
    }

    /// Looks a snapshot up.
    pub fn get(&self, key: &str) -> Result<Snapshot> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let rec = t
            .get(key)?
            .ok_or_else(|| SnapError::NotFound(format!("snapshot {key}")))?;
        decode(key, rec.value())
    }

    /// The snapshot and its ancestors, nearest first.
    pub fn chain(&self, key: &str) -> Result<Vec<(String, Snapshot)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        let mut next = Some(key.to_string());
        while let Some(k) = next {
            let rec = t
                .get(k.as_str())?
                .ok_or_else(|| SnapError::NotFound(format!("snapshot {k}")))?;
            let s = decode(&k, rec.value())?;
            next = s.parent.clone();
            out.push((k, s));
            if out.len() > 10_000 {
                return Err(SnapError::Internal(
                    "parent chain too long or cyclic".into(),
                ));
            }
        }
        Ok(out)
    }

    /// Commits active snapshot `key` as `name` (same directory).
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<Snapshot> {
        if name.is_empty() {
            return Err(SnapError::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        let tx = self.db.begin_write()?;
        let snap = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            if t.get(name)?.is_some() {
                return Err(SnapError::AlreadyExists(format!("snapshot {name}")));
            }
            let mut s = {
                let rec = t
                    .get(key)?
                    .ok_or_else(|| SnapError::NotFound(format!("snapshot {key}")))?;
                decode(key, rec.value())?
            };
            if s.kind != Kind::Active {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            s.kind = Kind::Committed;
            s.labels = labels;
            s.usage = Some(usage);
            // A new snapshot, as upstream's metastore makes it: created now, updated == created.
            s.created_ns = now_ns();
            s.updated_ns = s.created_ns;
            t.remove(key)?;
            t.insert(name, serde_json::to_vec(&s)?.as_slice())?;
            s
        };
        tx.commit()?;
        Ok(snap)
    }

    /// Removes a snapshot without children; returns it (the caller deletes its directory).
    pub fn remove(&self, key: &str) -> Result<Snapshot> {
        let tx = self.db.begin_write()?;
        let snap = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let s = {
                let rec = t
                    .get(key)?
                    .ok_or_else(|| SnapError::NotFound(format!("snapshot {key}")))?;
                decode(key, rec.value())?
            };
            for item in t.iter()? {
                let (k, v) = item?;
                if decode(k.value(), v.value())?.parent.as_deref() == Some(key) {
                    return Err(SnapError::FailedPrecondition(format!(
                        "cannot remove snapshot {key}: snapshot {} depends on it",
                        k.value()
                    )));
                }
            }
            t.remove(key)?;
            s
        };
        tx.commit()?;
        Ok(snap)
    }

    /// Replaces labels (all, or only the `labels.<key>` paths given).
    pub fn update_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot> {
        let tx = self.db.begin_write()?;
        let snap = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let mut s = {
                let rec = t
                    .get(key)?
                    .ok_or_else(|| SnapError::NotFound(format!("snapshot {key}")))?;
                decode(key, rec.value())?
            };
            if paths.is_empty() || paths.iter().any(|p| p == "labels") {
                s.labels = labels;
            } else {
                for p in paths {
                    let Some(l) = p.strip_prefix("labels.") else {
                        return Err(SnapError::InvalidArgument(format!(
                            "cannot update field {p:?}"
                        )));
                    };
                    match labels.get(l) {
                        Some(v) => s.labels.insert(l.to_string(), v.clone()),
                        None => s.labels.remove(l),
                    };
                }
            }
            s.updated_ns = now_ns();
            t.insert(key, serde_json::to_vec(&s)?.as_slice())?;
            s
        };
        tx.commit()?;
        Ok(snap)
    }

    /// All snapshots.
    pub fn list(&self) -> Result<Vec<(String, Snapshot)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = MetaStore::open(&dir.path().join("meta.db")).unwrap();
        let ok = |_| Ok(());
        let a = s
            .create("a", None, Kind::Active, BTreeMap::new(), ok)
            .unwrap();
        assert!(matches!(
            s.create("a", None, Kind::Active, BTreeMap::new(), ok),
            Err(SnapError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create("b", Some("a"), Kind::Active, BTreeMap::new(), ok),
            Err(SnapError::InvalidArgument(_))
        ));
        assert!(matches!(
            s.create("b", Some("zz"), Kind::Active, BTreeMap::new(), ok),
            Err(SnapError::NotFound(_))
        ));
        let c = s
            .commit("a", "A", BTreeMap::new(), Usage::default())
            .unwrap();
        assert_eq!(c.id, a.id);
        assert!(matches!(s.get("a"), Err(SnapError::NotFound(_))));
        assert!(matches!(
            s.commit("A", "B", BTreeMap::new(), Usage::default()),
            Err(SnapError::FailedPrecondition(_))
        ));
        s.create("b", Some("A"), Kind::Active, BTreeMap::new(), ok)
            .unwrap();
        assert!(matches!(
            s.remove("A"),
            Err(SnapError::FailedPrecondition(_))
        ));
        assert_eq!(s.chain("b").unwrap().len(), 2);
        s.remove("b").unwrap();
        s.remove("A").unwrap();
        // A failing directory step leaves nothing behind.
        assert!(s
            .create("x", None, Kind::Active, BTreeMap::new(), |_| Err(
                std::io::Error::other("disk")
            ))
            .is_err());
        assert!(s.get("x").is_err());
        drop(s);
        let s = MetaStore::open(&dir.path().join("meta.db")).unwrap();
        let l = s.list().unwrap();
        assert!(l.is_empty());
        let n = s
            .create("y", None, Kind::Active, BTreeMap::new(), ok)
            .unwrap();
        assert!(n.id > a.id, "ids are never reused");
    }
}

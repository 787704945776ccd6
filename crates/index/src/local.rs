//! The local artifacts database: which SOCI indexes and zTOCs `soci create`/`soci convert`
//! made, for which image, manifest, layer and platform, and where their blobs are.
//!
//! Upstream keeps this in a bbolt file (`<root>/artifacts.db`) that `soci index list`,
//! `soci ztoc list`, `soci push` and `soci rebuild-db` read. We keep the same facts in our own
//! JSON file next to it (`<root>/soci-rs-artifacts.json`) rather than writing a bbolt file: a
//! second writer of upstream's format would risk corrupting an installation that still runs
//! upstream tools. `soci rebuild-db` rebuilds ours from the content stores, so nothing is lost.
//! Writes replace the file atomically (write + rename).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// File name of the database under the root directory.
pub const DB_FILE: &str = "soci-rs-artifacts.json";
/// Largest database file read.
const MAX_DB_BYTES: u64 = 256 << 20;

/// Failure reading or writing the database.
#[derive(Debug, thiserror::Error)]
#[error("artifacts database {path}: {message}")]
pub struct LocalError {
    /// Database path.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// Kind of artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A SOCI index manifest.
    Index,
    /// A zTOC.
    Ztoc,
}

/// One artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactEntry {
    /// Index or zTOC.
    pub kind: ArtifactKind,
    /// Digest of the artifact.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Index: the image manifest it indexes. zTOC: the layer it indexes.
    pub original_digest: String,
    /// Index: the image (target) digest it was made for.
    #[serde(default)]
    pub image_digest: String,
    /// Index: platform (`os/arch[/variant]`).
    #[serde(default)]
    pub platform: String,
    /// Media type of the artifact.
    pub media_type: String,
    /// Index: SOCI artifact type (v1 or v2).
    #[serde(default)]
    pub artifact_type: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Where the blob is: `containerd:<namespace>` or `soci`.
    pub location: String,
    /// Index: digests of its zTOCs.
    #[serde(default)]
    pub ztocs: Vec<String>,
    /// zTOC: the annotations of its descriptor in the index (span size, layer media type),
    /// so a later `soci create` can reuse it.
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// The database (loaded whole; it holds a few entries per image).
#[derive(Debug, Clone)]
pub struct ArtifactsDb {
    path: PathBuf,
    /// Entries, oldest first.
    pub entries: Vec<ArtifactEntry>,
}

/// Now, in Unix seconds.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ArtifactsDb {
    /// Opens (or starts empty) the database under `root`.
    pub fn open(root: &Path) -> Result<ArtifactsDb, LocalError> {
        let path = root.join(DB_FILE);
        let e = |m: String| LocalError {
            path: path.display().to_string(),
            message: m,
        };
        let entries = match std::fs::metadata(&path) {
            Ok(m) if m.len() > MAX_DB_BYTES => {
                return Err(e(format!("larger than {MAX_DB_BYTES} bytes")))
            }
            Ok(_) => {
                let b = std::fs::read(&path).map_err(|x| e(x.to_string()))?;
                serde_json::from_slice(&b).map_err(|x| {
                    e(format!(
                        "unreadable ({x}); `soci rebuild-db` recreates it from the content store"
                    ))
                })?
            }
            Err(x) if x.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(x) => return Err(e(x.to_string())),
        };
        Ok(ArtifactsDb { path, entries })
    }

    /// Writes the database atomically.
    pub fn save(&self) -> Result<(), LocalError> {
        let e = |m: String| LocalError {
            path: self.path.display().to_string(),
            message: m,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|x| e(x.to_string()))?;
        }
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let body = serde_json::to_vec_pretty(&self.entries).map_err(|x| e(x.to_string()))?;
        std::fs::write(&tmp, body).map_err(|x| e(x.to_string()))?;
        std::fs::rename(&tmp, &self.path).map_err(|x| e(x.to_string()))
    }

    /// Adds or replaces (same digest and kind) an entry.
    pub fn put(&mut self, entry: ArtifactEntry) {
        self.entries
            .retain(|x| !(x.digest == entry.digest && x.kind == entry.kind));
        self.entries.push(entry);
    }

    /// The entry with this digest.
    pub fn get(&self, digest: &str) -> Option<&ArtifactEntry> {
        self.entries.iter().find(|e| e.digest == digest)
    }

    /// Index entries.
    pub fn indexes(&self) -> impl Iterator<Item = &ArtifactEntry> {
        self.entries
            .iter()
            .filter(|e| e.kind == ArtifactKind::Index)
    }

    /// zTOC entries.
    pub fn ztocs(&self) -> impl Iterator<Item = &ArtifactEntry> {
        self.entries.iter().filter(|e| e.kind == ArtifactKind::Ztoc)
    }

    /// Removes an index entry and the zTOC entries no other index uses. Returns the removed
    /// index and the orphaned zTOC digests, or None when `digest` is not an index.
    pub fn remove_index(&mut self, digest: &str) -> Option<(ArtifactEntry, Vec<String>)> {
        let pos = self
            .entries
            .iter()
            .position(|e| e.kind == ArtifactKind::Index && e.digest == digest)?;
        let idx = self.entries.remove(pos);
        let orphans: Vec<String> = idx
            .ztocs
            .iter()
            .filter(|z| !self.indexes().any(|i| i.ztocs.contains(z)))
            .cloned()
            .collect();
        self.entries
            .retain(|e| !(e.kind == ArtifactKind::Ztoc && orphans.contains(&e.digest)));
        Some((idx, orphans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: ArtifactKind, digest: &str, ztocs: &[&str]) -> ArtifactEntry {
        ArtifactEntry {
            kind,
            digest: digest.into(),
            size: 1,
            original_digest: "sha256:m".into(),
            image_digest: String::new(),
            platform: "linux/amd64".into(),
            media_type: "x".into(),
            artifact_type: String::new(),
            created_at: 1,
            location: "soci".into(),
            ztocs: ztocs.iter().map(|s| s.to_string()).collect(),
            annotations: Default::default(),
        }
    }

    #[test]
    fn put_save_open_and_remove_keeps_shared_ztocs() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = ArtifactsDb::open(dir.path()).unwrap();
        assert!(db.entries.is_empty());
        db.put(entry(ArtifactKind::Ztoc, "z1", &[]));
        db.put(entry(ArtifactKind::Ztoc, "z2", &[]));
        db.put(entry(ArtifactKind::Index, "i1", &["z1", "z2"]));
        db.put(entry(ArtifactKind::Index, "i2", &["z2"]));
        db.put(entry(ArtifactKind::Index, "i2", &["z2"]));
        db.save().unwrap();
        let mut db = ArtifactsDb::open(dir.path()).unwrap();
        assert_eq!(db.entries.len(), 4);
        let (i, orphans) = db.remove_index("i1").unwrap();
        assert_eq!(i.digest, "i1");
        assert_eq!(orphans, vec!["z1".to_string()]);
        assert!(db.get("z1").is_none());
        assert!(db.get("z2").is_some());
        assert!(db.remove_index("z2").is_none());
        std::fs::write(dir.path().join(DB_FILE), b"garbage").unwrap();
        let e = ArtifactsDb::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("rebuild-db"), "{e}");
    }
}

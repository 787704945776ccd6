//! Snapshot directories, overlay mounts and disk usage.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::proto::types::Mount;
use crate::store::{Kind, Snapshot, Usage};

/// Paths of snapshot directories under the daemon root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    /// Whether the kernel's overlay supports `index=off`.
    index_off: bool,
}

impl Layout {
    /// Layout under `root`.
    pub fn new(root: &Path) -> Layout {
        let index_off = Path::new("/sys/module/overlay/parameters/index").exists();
        Layout {
            root: root.to_path_buf(),
            index_off,
        }
    }

    /// `snapshots/` directory.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// Its filesystem (upper) directory.
    pub fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// Its overlay work directory.
    pub fn work(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Creates the directories of a new snapshot (replacing leftovers of a crashed attempt).
    pub fn make_dirs(&self, id: u64, kind: Kind) -> std::io::Result<()> {
        let d = self.dir(id);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        std::fs::create_dir_all(self.fs(id))?;
        if kind == Kind::Active {
            std::fs::create_dir_all(self.work(id))?;
        }
        Ok(())
    }

    /// Mounts for `snap` whose committed ancestors' ids are `parents` (nearest first).
    pub fn mounts(&self, snap: &Snapshot, parents: &[u64]) -> Vec<Mount> {
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let bind = |source: PathBuf, rw: bool| Mount {
            r#type: "bind".into(),
            source: s(source),
            target: String::new(),
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
        };
        if parents.is_empty() {
            return vec![bind(self.fs(snap.id), snap.kind == Kind::Active)];
        }
        let lower = parents
            .iter()
            .map(|&p| s(self.fs(p)))
            .collect::<Vec<_>>()
            .join(":");
        if snap.kind != Kind::Active {
            if parents.len() == 1 {
                return vec![bind(self.fs(parents[0]), false)];
            }
            return vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![format!("lowerdir={lower}")],
            }];
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        options.push(format!("workdir={}", s(self.work(snap.id))));
        options.push(format!("upperdir={}", s(self.fs(snap.id))));
        options.push(format!("lowerdir={lower}"));
        vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]
    }
}

/// Disk usage of a directory tree: allocated bytes and distinct inodes (like containerd's
/// `fs.DiskUsage`). Does not cross into other filesystems.
pub fn disk_usage(dir: &Path) -> std::io::Result<Usage> {
    let root_dev = std::fs::symlink_metadata(dir)?.dev();
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if md.dev() != root_dev {
            continue;
        }
        if seen.insert(md.ino()) {
            usage.inodes += 1;
            usage.size += (md.blocks() * 512) as i64;
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(usage)
}

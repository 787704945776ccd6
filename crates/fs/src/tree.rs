//! The inode tree of a layer, built from its zTOC and presented the way overlayfs expects a
//! lower layer: `.wh.NAME` becomes a 0/0 character device `NAME`, `.wh..wh..opq` marks its
//! directory opaque with `trusted.overlay.opaque=y`.

use std::collections::BTreeMap;

use soci_ztoc::{normalize_name, EntryKind, Ztoc};

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// xattr overlayfs reads to find opaque directories.
pub const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Error building a layer tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A name with `..`, NUL, or an empty component after normalisation.
    #[error("unsafe path {0:?} in zTOC")]
    UnsafePath(String),
    /// A hardlink whose target is missing or not a regular file.
    #[error("hardlink {0:?} points to {1:?}, which is not an earlier regular file")]
    BadHardlink(String, String),
    /// A whiteout whose hidden name is empty, `.` or `..` (it would name its directory or the
    /// parent): containerd refuses such a layer, and so does the full-pull unpacker.
    #[error("invalid whiteout name {0:?} in zTOC")]
    InvalidWhiteout(String),
    /// Too many entries.
    #[error("layer has more than {0} entries")]
    TooManyEntries(usize),
}

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Character device (also overlay whiteouts, 0/0).
    Char,
    /// Block device.
    Block,
    /// FIFO.
    Fifo,
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    /// Kind.
    pub kind: NodeKind,
    /// Permission bits (incl. setuid/setgid/sticky).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: (i64, u32),
    /// File size (files), target length (symlinks).
    pub size: u64,
    /// Offset of the file data in the uncompressed layer.
    pub offset: u64,
    /// Device number.
    pub rdev: u32,
    /// Symlink target.
    pub link: Vec<u8>,
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Link count.
    pub nlink: u32,
    /// Parent directory inode.
    pub parent: u64,
    /// Children by name (directories).
    pub children: Children,
}

/// A directory's entries sorted by name: lookup is a binary search, and a listing resumes at
/// an index (the READDIR offset) without walking the entries before it. Built once from the
/// ordered map used while the tree is assembled; the tree never changes after that.
#[derive(Debug, Clone, Default)]
pub struct Children(Box<[(Vec<u8>, u64)]>);

impl Children {
    /// The inode of child `name`.
    pub fn get(&self, name: &[u8]) -> Option<u64> {
        self.0
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .ok()
            .map(|i| self.0[i].1)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries from index `start` on, in name order (none if `start` is past the end).
    pub fn from_index(&self, start: usize) -> impl Iterator<Item = (&[u8], u64)> {
        self.0
            .get(start..)
            .unwrap_or_default()
            .iter()
            .map(|(n, i)| (n.as_slice(), *i))
    }

    /// All entries in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u64)> {
        self.from_index(0)
    }
}

impl Node {
    fn dir(parent: u64) -> Node {
        Node {
            kind: NodeKind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            size: 4096,
            offset: 0,
            rdev: 0,
            link: Vec::new(),
            xattrs: BTreeMap::new(),
            nlink: 2,
            parent,
            children: Children::default(),
        }
    }
}

/// All inodes of a layer; inode `n` is `nodes[n - 1]`.
#[derive(Debug)]
pub struct LayerTree {
    nodes: Vec<Node>,
    /// Sum of regular file sizes.
    pub total_file_bytes: u64,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn components(name: &[u8]) -> Result<Vec<&[u8]>, TreeError> {
    let n = normalize_name(name);
    if n.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&[u8]> = n
        .split(|&c| c == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    if parts.iter().any(|c| *c == b".." || c.contains(&0)) || n.contains(&0) {
        return Err(TreeError::UnsafePath(lossy(name)));
    }
    Ok(parts)
}

/// A tree being assembled: directory entries in ordered maps (cheap inserts and removals as
/// later tar entries replace earlier ones), frozen into [`Children`] at the end.
struct Build {
    t: LayerTree,
    /// Entries of inode `n` at `dirs[n - 1]` (empty for non-directories).
    dirs: Vec<BTreeMap<Vec<u8>, u64>>,
}

impl std::ops::Deref for Build {
    type Target = LayerTree;
    fn deref(&self) -> &LayerTree {
        &self.t
    }
}

impl std::ops::DerefMut for Build {
    fn deref_mut(&mut self) -> &mut LayerTree {
        &mut self.t
    }
}

impl Build {
    fn push(&mut self, n: Node) -> u64 {
        self.t.nodes.push(n);
        self.dirs.push(BTreeMap::new());
        self.t.nodes.len() as u64
    }

    fn children(&mut self, dir: u64) -> &mut BTreeMap<Vec<u8>, u64> {
        &mut self.dirs[(dir - 1) as usize]
    }

    /// The tree, each directory's map turned into its sorted [`Children`].
    fn finish(mut self) -> LayerTree {
        for (n, map) in self.t.nodes.iter_mut().zip(self.dirs) {
            n.children = Children(map.into_iter().collect());
        }
        self.t
    }

    fn remove_child(&mut self, parent: u64, name: &[u8]) {
        if let Some(old) = self.children(parent).remove(name) {
            let was_dir = self.node(old).kind == NodeKind::Dir;
            let o = self.node_mut(old);
            o.nlink = o.nlink.saturating_sub(1);
            if was_dir {
                let p = self.node_mut(parent);
                p.nlink = p.nlink.saturating_sub(1);
            }
        }
    }

    fn ensure_dirs(&mut self, parts: &[&[u8]]) -> u64 {
        let mut cur = ROOT_INO;
        for p in parts {
            cur = match self.dirs[(cur - 1) as usize].get(*p) {
                Some(&c) if self.node(c).kind == NodeKind::Dir => c,
                _ => {
                    self.remove_child(cur, p);
                    let ino = self.push(Node::dir(cur));
                    self.children(cur).insert(p.to_vec(), ino);
                    self.node_mut(cur).nlink += 1;
                    ino
                }
            };
        }
        cur
    }

    fn lookup_path(&self, parts: &[&[u8]]) -> Option<u64> {
        let mut cur = ROOT_INO;
        for p in parts {
            cur = *self.dirs[(cur - 1) as usize].get(*p)?;
        }
        Some(cur)
    }
}

/// Largest number of entries accepted in one layer.
pub const MAX_ENTRIES: usize = 4_000_000;

impl LayerTree {
    /// Builds the tree of a zTOC.
    #[tracing::instrument(level = "debug", name = "layer_tree", skip_all, fields(files = z.entries.len()))]
    pub fn build(z: &Ztoc) -> Result<LayerTree, TreeError> {
        if z.entries.len() > MAX_ENTRIES {
            return Err(TreeError::TooManyEntries(MAX_ENTRIES));
        }
        let mut t = Build {
            t: LayerTree {
                nodes: vec![Node::dir(ROOT_INO)],
                total_file_bytes: 0,
            },
            dirs: vec![BTreeMap::new()],
        };
        for e in &z.entries {
            let parts = components(&e.name)?;
            let (dir_parts, base) = match parts.split_last() {
                Some((base, dirs)) => (dirs, *base),
                None => {
                    // "./": metadata of the root itself.
                    if e.kind == EntryKind::Directory {
                        t.apply_meta(ROOT_INO, e);
                    }
                    continue;
                }
            };
            let parent = t.ensure_dirs(dir_parts);
            if base == OPAQUE {
                t.node_mut(parent)
                    .xattrs
                    .insert(OPAQUE_XATTR.to_vec(), b"y".to_vec());
                continue;
            }
            let (name, whiteout) = match base.strip_prefix(WHITEOUT_PREFIX) {
                Some(b"" | b"." | b"..") => return Err(TreeError::InvalidWhiteout(lossy(&e.name))),
                Some(n) => (n, true),
                None => (base, false),
            };
            if e.kind == EntryKind::Hardlink && !whiteout {
                let target = components(&e.linkname)?;
                let ino = t
                    .lookup_path(&target)
                    .filter(|&i| t.node(i).kind != NodeKind::Dir);
                let ino =
                    ino.ok_or_else(|| TreeError::BadHardlink(lossy(&e.name), lossy(&e.linkname)))?;
                t.remove_child(parent, name);
                t.dirs[(parent - 1) as usize].insert(name.to_vec(), ino);
                t.node_mut(ino).nlink += 1;
                // Like containerd's unpack: the link's header sets owner, mode and time of the
                // shared inode.
                t.apply_meta(ino, e);
                continue;
            }
            let kind = if whiteout {
                NodeKind::Char
            } else {
                match e.kind {
                    EntryKind::Directory => NodeKind::Dir,
                    EntryKind::Regular => NodeKind::File,
                    EntryKind::Symlink => NodeKind::Symlink,
                    EntryKind::Char => NodeKind::Char,
                    EntryKind::Block => NodeKind::Block,
                    EntryKind::Fifo => NodeKind::Fifo,
                    EntryKind::Hardlink => unreachable!("handled above"),
                }
            };
            // A directory entry for an existing directory updates it in place.
            if let Some(&existing) = t.dirs[(parent - 1) as usize].get(name) {
                if kind == NodeKind::Dir && t.node(existing).kind == NodeKind::Dir {
                    t.apply_meta(existing, e);
                    continue;
                }
                t.remove_child(parent, name);
            }
            let mut n = Node::dir(parent);
            n.kind = kind;
            n.nlink = if kind == NodeKind::Dir { 2 } else { 1 };
            let ino = t.push(n);
            t.dirs[(parent - 1) as usize].insert(name.to_vec(), ino);
            if kind == NodeKind::Dir {
                t.node_mut(parent).nlink += 1;
            }
            if whiteout {
                let n = t.node_mut(ino);
                n.perm = 0;
                n.size = 0;
                n.mtime = e.mtime().unwrap_or((0, 0));
                continue;
            }
            t.apply_meta(ino, e);
            let n = t.node_mut(ino);
            match kind {
                NodeKind::File => {
                    n.size = e.size;
                    n.offset = e.offset;
                    t.t.total_file_bytes += e.size;
                }
                NodeKind::Symlink => {
                    n.link = e.linkname.clone();
                    n.size = e.linkname.len() as u64;
                }
                NodeKind::Char | NodeKind::Block => {
                    n.rdev = libc::makedev(e.devmajor as u32, e.devminor as u32) as u32;
                    n.size = 0;
                }
                _ => {}
            }
        }
        Ok(t.finish())
    }

    fn apply_meta(&mut self, ino: u64, e: &soci_ztoc::TocEntry) {
        let n = self.node_mut(ino);
        n.perm = (e.mode & 0o7777) as u16;
        n.uid = e.uid;
        n.gid = e.gid;
        n.mtime = e.mtime().unwrap_or((0, 0));
        for (k, v) in e.xattrs() {
            n.xattrs.insert(k.to_vec(), v.to_vec());
        }
    }

    /// The node of an inode, if it exists.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    fn node(&self, ino: u64) -> &Node {
        &self.nodes[(ino - 1) as usize]
    }

    fn node_mut(&mut self, ino: u64) -> &mut Node {
        &mut self.nodes[(ino - 1) as usize]
    }

    /// Child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.get(parent)?.children.get(name)
    }

    /// Number of inodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree has only its root.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use soci_ztoc::{build, BuildOptions};

    fn ztoc_of(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Ztoc {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        let t = b.into_inner().unwrap();
        build(t.as_slice(), &BuildOptions::default()).unwrap()
    }

    fn add(
        b: &mut tar::Builder<Vec<u8>>,
        name: &str,
        kind: tar::EntryType,
        data: &[u8],
        link: Option<&str>,
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o640);
        h.set_uid(7);
        h.set_size(data.len() as u64);
        match link {
            Some(l) => b.append_link(&mut h, name, l).unwrap(),
            None => b.append_data(&mut h, name, data).unwrap(),
        }
    }

    #[test]
    fn whiteouts_hardlinks_and_implicit_dirs() {
        let z = ztoc_of(|b| {
            add(b, "a/b/file", tar::EntryType::Regular, b"abc", None);
            add(b, "a/hard", tar::EntryType::Link, b"", Some("a/b/file"));
            add(b, "a/.wh.gone", tar::EntryType::Regular, b"", None);
            add(b, "a/b/.wh..wh..opq", tar::EntryType::Regular, b"", None);
            add(b, "./link", tar::EntryType::Symlink, b"", Some("a/b/file"));
        });
        let t = LayerTree::build(&z).unwrap();
        let a = t.lookup(ROOT_INO, b"a").unwrap();
        let b = t.lookup(a, b"b").unwrap();
        let f = t.lookup(b, b"file").unwrap();
        assert_eq!(t.lookup(a, b"hard"), Some(f));
        assert_eq!(t.get(f).unwrap().nlink, 2);
        assert_eq!(t.get(f).unwrap().uid, 7);
        let w = t.get(t.lookup(a, b"gone").unwrap()).unwrap();
        assert_eq!((w.kind, w.rdev), (NodeKind::Char, 0));
        assert_eq!(
            t.get(b)
                .unwrap()
                .xattrs
                .get(OPAQUE_XATTR)
                .map(Vec::as_slice),
            Some(&b"y"[..])
        );
        assert!(t.lookup(b, b".wh..wh..opq").is_none());
        let l = t.get(t.lookup(ROOT_INO, b"link").unwrap()).unwrap();
        assert_eq!(l.link, b"a/b/file");
        assert_eq!(t.get(ROOT_INO).unwrap().nlink, 3);
    }

    #[test]
    fn unsafe_paths_are_rejected() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        // The tar crate refuses '..' in set_path, so write the name bytes directly.
        h.as_old_mut().name[..9].copy_from_slice(b"a/../../x");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let t = b.into_inner().unwrap();
        let z = build(t.as_slice(), &BuildOptions::default()).unwrap();
        assert!(matches!(
            LayerTree::build(&z),
            Err(TreeError::UnsafePath(_))
        ));
    }

    #[test]
    fn invalid_whiteouts_are_rejected() {
        for name in [".wh..", ".wh.", ".wh...", "a/.wh..", "a/b/.wh..."] {
            let z = ztoc_of(|b| add(b, name, tar::EntryType::Regular, b"", None));
            assert!(
                matches!(LayerTree::build(&z), Err(TreeError::InvalidWhiteout(_))),
                "{name}"
            );
        }
    }
}

//! The daemon's full-pull unpacker on hostile layers: raw tar bytes, or (odd first byte) a tar
//! built from the input out of the names and links attackers use (`..`, `.wh.*`, symlinks to
//! absolute and relative targets outside, hardlinks to them, set-id modes). Each input is
//! unpacked into a fresh scratch dir inside a sandbox; afterwards the canary dir next to it
//! (known content, modes, owners, times, ctimes) must be unchanged and nothing else may have
//! appeared in the sandbox. Needs root (chown, mknod, trusted xattrs), like the daemon.
#![no_main]
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

type Seen = BTreeMap<PathBuf, (u32, u32, u32, u64, i64, i64, i64, Vec<u8>)>;

fn observe(dir: &Path, out: &mut Seen) {
    let m = std::fs::symlink_metadata(dir).expect("canary");
    out.insert(
        dir.to_path_buf(),
        (
            m.mode(),
            m.uid(),
            m.gid(),
            m.nlink(),
            m.mtime(),
            m.ctime(),
            m.ctime_nsec(),
            vec![],
        ),
    );
    for e in std::fs::read_dir(dir).expect("canary") {
        let p = e.expect("canary").path();
        let m = std::fs::symlink_metadata(&p).expect("canary");
        if m.is_dir() {
            observe(&p, out);
            continue;
        }
        let body = if m.file_type().is_symlink() {
            std::fs::read_link(&p)
                .expect("canary")
                .as_os_str()
                .as_bytes()
                .to_vec()
        } else {
            std::fs::read(&p).expect("canary")
        };
        out.insert(
            p,
            (
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                m.mtime(),
                m.ctime(),
                m.ctime_nsec(),
                body,
            ),
        );
    }
}

struct Sandbox {
    top: PathBuf,
    canary: PathBuf,
    seen: Seen,
}

fn sandbox() -> &'static Sandbox {
    static S: OnceLock<Sandbox> = OnceLock::new();
    S.get_or_init(|| {
        let top = std::env::temp_dir().join(format!("soci-fuzz-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let canary = top.join("canary");
        std::fs::create_dir_all(canary.join("dir")).expect("sandbox");
        std::fs::write(canary.join("file"), b"canary").expect("sandbox");
        std::fs::write(canary.join("dir/inner"), b"inner").expect("sandbox");
        std::os::unix::fs::symlink("file", canary.join("link")).expect("sandbox");
        let mut seen = Seen::new();
        observe(&canary, &mut seen);
        Sandbox { top, canary, seen }
    })
}

/// A ustar header block (no validation: any name bytes).
fn header(out: &mut Vec<u8>, name: &[u8], kind: u8, link: &[u8], mode: u32, uid: u32, size: usize) {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    let oct = |h: &mut [u8], at: usize, len: usize, v: u64| {
        let s = format!("{:0w$o}", v, w = len - 1);
        h[at..at + len - 1].copy_from_slice(&s.as_bytes()[s.len() - (len - 1)..]);
    };
    oct(&mut h, 100, 8, u64::from(mode & 0o7777));
    oct(&mut h, 108, 8, u64::from(uid % 65536));
    oct(&mut h, 116, 8, u64::from(uid % 65536));
    oct(&mut h, 124, 12, size as u64);
    oct(&mut h, 136, 12, 1);
    h[156] = kind;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    oct(&mut h, 329, 8, 1);
    oct(&mut h, 337, 8, 3);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    oct(&mut h, 148, 7, u64::from(sum));
    out.extend_from_slice(&h);
}

fn pax(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let mut rec = Vec::new();
    let body_len = key.len() + value.len() + 3;
    let mut len = body_len + 1;
    while format!("{len}").len() + body_len != len {
        len += 1;
    }
    rec.extend_from_slice(format!("{len} {key}=").as_bytes());
    rec.extend_from_slice(value);
    rec.push(b'\n');
    header(out, b"pax", b'x', b"", 0o644, 0, rec.len());
    out.extend_from_slice(&rec);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// A tar from the input: each 5 bytes pick a kind, a name, a link target, a mode and an owner.
fn structured(data: &[u8], canary: &Path) -> Vec<u8> {
    const PARTS: &[&[u8]] = &[
        b"a",
        b"b",
        b"d",
        b"l",
        b"..",
        b".",
        b"",
        b".wh.",
        b".wh..",
        b".wh...",
        b".wh.a",
        b".wh.d",
        b".wh.l",
        b".wh..wh..opq",
        b".wh..wh.plnk",
        b"canary",
    ];
    let abs_file = canary.join("file");
    let abs_dir = canary.join("dir");
    let abs_link = canary.join("link");
    let links: Vec<&[u8]> = vec![
        abs_file.as_os_str().as_bytes(),
        abs_dir.as_os_str().as_bytes(),
        abs_link.as_os_str().as_bytes(),
        canary.as_os_str().as_bytes(),
        b"../canary",
        b"../canary/file",
        b"../../canary/dir",
        b"a",
        b"l",
        b"d",
        b"a/b",
        b"..",
        b"d/..",
        b"l/file",
    ];
    const MODES: &[u32] = &[0o4777, 0o7777, 0o644, 0o755, 0o000, 0o2755];
    let mut out = Vec::new();
    for op in data.chunks_exact(5) {
        let mut name = Vec::new();
        let ncomp = 1 + usize::from(op[1] >> 6);
        for i in 0..ncomp {
            if i > 0 {
                name.push(b'/');
            }
            let sel = (usize::from(op[1]) >> (i * 2)) ^ (usize::from(op[2]) >> (4 * (i & 1)));
            name.extend_from_slice(PARTS[sel % PARTS.len()]);
        }
        if op[0] & 0x80 != 0 {
            name.insert(0, b'/');
        }
        let link = links[usize::from(op[3]) % links.len()];
        let mode = MODES[usize::from(op[4]) % MODES.len()];
        let uid = u32::from(op[4]);
        match op[0] & 0x0f {
            0 | 1 => {
                let body = b"payload";
                header(&mut out, &name, b'0', b"", mode, uid, body.len());
                out.extend_from_slice(body);
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
            2 | 3 => header(&mut out, &name, b'5', b"", mode, uid, 0),
            4 | 5 => header(&mut out, &name, b'2', link, mode, uid, 0),
            6 | 7 => header(&mut out, &name, b'1', link, mode, uid, 0),
            8 => header(&mut out, &name, b'6', b"", mode, uid, 0),
            9 => header(&mut out, &name, b'3', b"", mode, uid, 0),
            10 => {
                pax(&mut out, "SCHILY.xattr.trusted.overlay.opaque", b"y");
                header(&mut out, &name, b'5', b"", mode, uid, 0);
            }
            11 => {
                pax(&mut out, "SCHILY.xattr.user.k", b"v");
                header(&mut out, &name, b'2', link, mode, uid, 0);
            }
            12 => {
                // PAX path: names longer than 100 bytes or with odd bytes.
                let mut long = name.clone();
                long.extend_from_slice(b"/");
                long.extend_from_slice(&[b'x'; 120]);
                pax(&mut out, "path", &long);
                header(&mut out, b"ignored", b'0', b"", mode, uid, 0);
            }
            _ => {
                pax(&mut out, "linkpath", link);
                header(&mut out, &name, b'1', b"", mode, uid, 0);
            }
        }
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fuzz_target!(|data: &[u8]| {
    let s = sandbox();
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let tar = if first & 1 == 1 {
        structured(rest, &s.canary)
    } else {
        rest.to_vec()
    };
    static N: AtomicU64 = AtomicU64::new(0);
    let scratch = s
        .top
        .join(format!("scratch-{}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir(&scratch).expect("scratch");
    let _ = soci_snapshotter::unpack::unpack(tar.as_slice(), &scratch);
    let mut now = Seen::new();
    observe(&s.canary, &mut now);
    assert_eq!(now, s.seen, "canary changed by an unpack");
    let mut names: Vec<_> = std::fs::read_dir(&s.top)
        .expect("sandbox")
        .map(|e| e.expect("sandbox").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            std::ffi::OsString::from("canary"),
            scratch.file_name().expect("name").to_owned()
        ],
        "something appeared next to the scratch dir"
    );
    std::fs::remove_dir_all(&scratch).expect("removing scratch");
});

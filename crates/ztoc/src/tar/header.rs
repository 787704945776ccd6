//! Tar header blocks and PAX records, parsed as Go's `archive/tar` does.

use std::collections::BTreeMap;

use super::{invalid, TarError};

/// Header fields before PAX and GNU overrides.
pub(super) struct RawHeader {
    pub(super) name: Vec<u8>,
    pub(super) linkname: Vec<u8>,
    pub(super) size: i64,
    pub(super) mode: i64,
    pub(super) uid: i64,
    pub(super) gid: i64,
    pub(super) mtime: (i64, u32),
    pub(super) uname: Vec<u8>,
    pub(super) gname: Vec<u8>,
    pub(super) devmajor: i64,
    pub(super) devminor: i64,
}

pub(super) fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

pub(super) fn parse_octal(b: &[u8]) -> Option<i64> {
    let start = b.iter().position(|&c| c != b' ' && c != 0);
    let Some(start) = start else { return Some(0) };
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != 0)
        .map_or(0, |e| e + 1);
    let s = cstr(&b[start..end]);
    if s.is_empty() {
        return Some(0);
    }
    let mut x: u64 = 0;
    for &c in s {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        x = x.checked_mul(8)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(x as i64)
}

pub(super) fn parse_numeric(b: &[u8]) -> Option<i64> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        let inv: u8 = if b[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &c) in b.iter().enumerate() {
            let mut c = c ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 > 0 {
                return None;
            }
            x = (x << 8) | u64::from(c);
        }
        if x >> 63 > 0 {
            return None;
        }
        return Some(if inv == 0xff { !(x as i64) } else { x as i64 });
    }
    parse_octal(b)
}

pub(super) fn parse_header(blk: &[u8; 512], off: u64) -> Result<RawHeader, TarError> {
    let num = |range: std::ops::Range<usize>, what: &str| {
        parse_numeric(&blk[range]).ok_or_else(|| invalid(off, format!("bad {what} field")))
    };
    let stored = parse_octal(&blk[148..156]).ok_or_else(|| invalid(off, "bad checksum field"))?;
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &c) in blk.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += i64::from(c);
        signed += i64::from(c as i8);
    }
    if stored != unsigned && stored != signed {
        return Err(invalid(off, "checksum mismatch"));
    }
    let magic = &blk[257..263];
    let version = &blk[263..265];
    let is_ustar = magic == b"ustar\0";
    let is_star = is_ustar && &blk[508..512] == b"tar\0";
    let is_gnu = magic == b"ustar " && version == b" \0";
    let mut h = RawHeader {
        name: cstr(&blk[0..100]).to_vec(),
        linkname: cstr(&blk[157..257]).to_vec(),
        size: num(124..136, "size")?,
        mode: num(100..108, "mode")?,
        uid: num(108..116, "uid")?,
        gid: num(116..124, "gid")?,
        mtime: (num(136..148, "mtime")?, 0),
        uname: Vec::new(),
        gname: Vec::new(),
        devmajor: 0,
        devminor: 0,
    };
    if is_ustar || is_gnu {
        h.uname = cstr(&blk[265..297]).to_vec();
        h.gname = cstr(&blk[297..329]).to_vec();
        h.devmajor = num(329..337, "devmajor")?;
        h.devminor = num(337..345, "devminor")?;
        let prefix = if is_star {
            cstr(&blk[345..476])
        } else if is_ustar {
            cstr(&blk[345..500])
        } else {
            &[][..]
        };
        if !prefix.is_empty() {
            let mut n = prefix.to_vec();
            n.push(b'/');
            n.extend_from_slice(&h.name);
            h.name = n;
        }
    }
    Ok(h)
}

/// Parses the records of a PAX extended header (`"%d %s=%s\n"`).
pub(super) fn parse_pax(mut data: &[u8], off: u64) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, TarError> {
    let mut map = BTreeMap::new();
    while !data.is_empty() {
        let sp = data
            .iter()
            .position(|&c| c == b' ')
            .ok_or_else(|| invalid(off, "PAX record without length"))?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(off, "PAX record length"))?;
        if len < 5 || len > data.len() || sp + 1 > len {
            return Err(invalid(off, "PAX record length out of range"));
        }
        let rec = &data[sp + 1..len];
        let Some((&b'\n', rec)) = rec.split_last() else {
            return Err(invalid(off, "PAX record not newline-terminated"));
        };
        let eq = rec
            .iter()
            .position(|&c| c == b'=')
            .ok_or_else(|| invalid(off, "PAX record without '='"))?;
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        let nul_checked: &[u8] = match k {
            b"path" | b"linkpath" | b"uname" | b"gname" => v,
            _ => k,
        };
        if k.is_empty() || nul_checked.contains(&0) {
            return Err(invalid(off, "invalid PAX record"));
        }
        map.insert(k.to_vec(), v.to_vec());
        data = &data[len..];
    }
    Ok(map)
}

pub(super) fn parse_pax_int(v: &[u8], off: u64) -> Result<i64, TarError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| invalid(off, "PAX numeric value"))
}

pub(super) fn parse_pax_time(v: &[u8], off: u64) -> Result<(i64, u32), TarError> {
    let bad = || invalid(off, "PAX time value");
    let (ss, sn) = match v.iter().position(|&c| c == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    let secs = parse_pax_int(ss, off).map_err(|_| bad())?;
    if sn.is_empty() {
        return Ok((secs, 0));
    }
    if !sn.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let mut nanos: u32 = 0;
    for i in 0..9 {
        nanos = nanos * 10 + sn.get(i).map_or(0, |&c| u32::from(c - b'0'));
    }
    if ss.first() == Some(&b'-') && nanos > 0 {
        // time.Unix(secs, -nanos) normalised.
        return Ok((secs - 1, 1_000_000_000 - nanos));
    }
    Ok((secs, nanos))
}

pub(super) fn merge_pax(
    h: &mut RawHeader,
    records: &BTreeMap<Vec<u8>, Vec<u8>>,
    off: u64,
) -> Result<(), TarError> {
    for (k, v) in records {
        if v.is_empty() {
            continue;
        }
        match k.as_slice() {
            b"path" => h.name = v.clone(),
            b"linkpath" => h.linkname = v.clone(),
            b"uname" => h.uname = v.clone(),
            b"gname" => h.gname = v.clone(),
            b"uid" => h.uid = parse_pax_int(v, off)?,
            b"gid" => h.gid = parse_pax_int(v, off)?,
            b"mtime" => h.mtime = parse_pax_time(v, off)?,
            b"atime" | b"ctime" => {
                parse_pax_time(v, off)?;
            }
            b"size" => h.size = parse_pax_int(v, off)?,
            _ => {}
        }
    }
    Ok(())
}

//! zTOC flatbuffer encoding and decoding.
//!
//! Writing uses the `flatbuffers` builder, adding tables and fields in exactly the order of
//! upstream's Go marshaler so the bytes are identical. Reading is a small bounds-checked
//! decoder of our own instead of the generated accessors: tar names and PAX values may be any
//! bytes (e.g. binary `security.capability` xattrs), which the Rust flatbuffers verifier would
//! reject as non-UTF-8 strings, and every read here is checked so malformed input gives an
//! error, never a panic, without table-count limits.

use std::collections::BTreeMap;

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::error::{Result, ZtocError};
use crate::fbs::{zinfo, ztoc as fb};
use crate::model::{CompressionAlgorithm, CompressionInfo, SpanDigest, TocEntry, Ztoc};
use crate::tar::EntryKind;

type Off = WIPOffset<flatbuffers::UnionWIPOffset>;

fn bytes_off(b: &mut FlatBufferBuilder<'_>, s: &[u8]) -> Off {
    b.create_byte_string(s).as_union_value()
}

/// Serialises a zTOC to upstream-identical flatbuffer bytes.
pub fn encode(z: &Ztoc) -> Vec<u8> {
    let mut b = FlatBufferBuilder::with_capacity(1024 + z.entries.len() * 256);
    let version = bytes_off(&mut b, z.version.as_bytes());
    let tool = bytes_off(&mut b, z.build_tool_identifier.as_bytes());

    // TOC: entries are created from the last to the first, as upstream does.
    let mut entry_offs = vec![None; z.entries.len()];
    for (i, e) in z.entries.iter().enumerate().rev() {
        entry_offs[i] = Some(encode_entry(&mut b, e));
    }
    let entry_offs: Vec<Off> = entry_offs.into_iter().flatten().collect();
    let metadata = b.create_vector(&entry_offs);
    let t = b.start_table();
    b.push_slot_always(fb::TOC::VT_METADATA, metadata);
    let toc = b.end_table(t);

    let checkpoints = b.create_vector(&z.compression.checkpoints);
    let digest_offs: Vec<Off> = z
        .compression
        .span_digests
        .iter()
        .map(|d| bytes_off(&mut b, d.to_string().as_bytes()))
        .collect();
    let digests = b.create_vector(&digest_offs);
    let t = b.start_table();
    b.push_slot::<i32>(
        fb::CompressionInfo::VT_MAX_SPAN_ID,
        z.compression.max_span_id,
        0,
    );
    b.push_slot_always(fb::CompressionInfo::VT_SPAN_DIGESTS, digests);
    b.push_slot_always(fb::CompressionInfo::VT_CHECKPOINTS, checkpoints);
    let algo = match z.compression.algorithm {
        CompressionAlgorithm::Gzip => fb::CompressionAlgorithm::Gzip,
        CompressionAlgorithm::Uncompressed => fb::CompressionAlgorithm::Uncompressed,
    };
    b.push_slot::<i8>(
        fb::CompressionInfo::VT_COMPRESSION_ALGORITHM,
        algo.0,
        fb::CompressionAlgorithm::Gzip.0,
    );
    let info = b.end_table(t);

    let t = b.start_table();
    b.push_slot_always(fb::Ztoc::VT_VERSION, version);
    b.push_slot_always(fb::Ztoc::VT_BUILD_TOOL_IDENTIFIER, tool);
    b.push_slot_always(fb::Ztoc::VT_TOC, toc);
    b.push_slot::<i64>(
        fb::Ztoc::VT_COMPRESSED_ARCHIVE_SIZE,
        z.compressed_archive_size as i64,
        0,
    );
    b.push_slot::<i64>(
        fb::Ztoc::VT_UNCOMPRESSED_ARCHIVE_SIZE,
        z.uncompressed_archive_size as i64,
        0,
    );
    b.push_slot_always(fb::Ztoc::VT_COMPRESSION_INFO, info);
    let root = b.end_table(t);
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

fn encode_entry(b: &mut FlatBufferBuilder<'_>, e: &TocEntry) -> Off {
    let name = bytes_off(b, &e.name);
    let kind = bytes_off(b, e.kind.as_str().as_bytes());
    let linkname = bytes_off(b, &e.linkname);
    let uname = bytes_off(b, &e.uname);
    let gname = bytes_off(b, &e.gname);
    let mod_time = bytes_off(b, e.mod_time.as_bytes());
    let mut xattr_offs = Vec::with_capacity(e.pax.len());
    for (k, v) in &e.pax {
        let k = bytes_off(b, k);
        let v = bytes_off(b, v);
        let t = b.start_table();
        b.push_slot_always(fb::Xattr::VT_KEY, k);
        b.push_slot_always(fb::Xattr::VT_VALUE, v);
        xattr_offs.push(b.end_table(t).as_union_value());
    }
    let xattrs = b.create_vector(&xattr_offs);
    let t = b.start_table();
    b.push_slot_always(fb::FileMetadata::VT_NAME, name);
    b.push_slot_always(fb::FileMetadata::VT_TYPE_, kind);
    b.push_slot::<i64>(fb::FileMetadata::VT_UNCOMPRESSED_OFFSET, e.offset as i64, 0);
    b.push_slot::<i64>(fb::FileMetadata::VT_UNCOMPRESSED_SIZE, e.size as i64, 0);
    b.push_slot_always(fb::FileMetadata::VT_LINKNAME, linkname);
    b.push_slot::<i64>(fb::FileMetadata::VT_MODE, e.mode, 0);
    b.push_slot::<u32>(fb::FileMetadata::VT_UID, e.uid, 0);
    b.push_slot::<u32>(fb::FileMetadata::VT_GID, e.gid, 0);
    b.push_slot_always(fb::FileMetadata::VT_UNAME, uname);
    b.push_slot_always(fb::FileMetadata::VT_GNAME, gname);
    b.push_slot_always(fb::FileMetadata::VT_MOD_TIME, mod_time);
    b.push_slot::<i64>(fb::FileMetadata::VT_DEVMAJOR, e.devmajor, 0);
    b.push_slot::<i64>(fb::FileMetadata::VT_DEVMINOR, e.devminor, 0);
    b.push_slot_always(fb::FileMetadata::VT_XATTRS, xattrs);
    b.end_table(t).as_union_value()
}

/// Serialises the `TarZinfo` of an uncompressed layer.
pub(crate) fn encode_tar_zinfo(version: i32, span_size: i64, size: i64) -> Vec<u8> {
    let mut b = FlatBufferBuilder::with_capacity(64);
    let t = b.start_table();
    b.push_slot::<i32>(zinfo::TarZinfo::VT_VERSION, version, 0);
    b.push_slot::<i64>(zinfo::TarZinfo::VT_SPAN_SIZE, span_size, 0);
    b.push_slot::<i64>(zinfo::TarZinfo::VT_SIZE, size, 0);
    let root = b.end_table(t);
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

/// Parses a `TarZinfo`: (version, span size, size).
pub(crate) fn decode_tar_zinfo(buf: &[u8]) -> Result<(i32, i64, i64), String> {
    let t = Table::root(buf)?;
    Ok((
        t.scalar(zinfo::TarZinfo::VT_VERSION, 0i32)?,
        t.scalar(zinfo::TarZinfo::VT_SPAN_SIZE, 0i64)?,
        t.scalar(zinfo::TarZinfo::VT_SIZE, 0i64)?,
    ))
}

fn malformed(e: String) -> ZtocError {
    ZtocError::Malformed(e)
}

/// Parses zTOC flatbuffer bytes.
pub fn decode(buf: &[u8]) -> Result<Ztoc> {
    let root = Table::root(buf).map_err(malformed)?;
    let text = |t: &Table<'_>, slot, what: &str| -> Result<String> {
        let b = t.bytes(slot).map_err(malformed)?.unwrap_or_default();
        String::from_utf8(b.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
    };
    let version = text(&root, fb::Ztoc::VT_VERSION, "version")?;
    let build_tool_identifier = text(&root, fb::Ztoc::VT_BUILD_TOOL_IDENTIFIER, "build tool")?;
    let size = |slot, what: &str| -> Result<u64> {
        let v: i64 = root.scalar(slot, 0).map_err(malformed)?;
        u64::try_from(v).map_err(|_| malformed(format!("negative {what}")))
    };
    let compressed_archive_size = size(fb::Ztoc::VT_COMPRESSED_ARCHIVE_SIZE, "compressed size")?;
    let uncompressed_archive_size =
        size(fb::Ztoc::VT_UNCOMPRESSED_ARCHIVE_SIZE, "uncompressed size")?;

    let mut entries = Vec::new();
    if let Some(toc) = root.table(fb::Ztoc::VT_TOC).map_err(malformed)? {
        if let Some(v) = toc.vector(fb::TOC::VT_METADATA).map_err(malformed)? {
            entries.reserve(v.len);
            for i in 0..v.len {
                let t = v.table(i).map_err(malformed)?;
                entries.push(decode_entry(&t).map_err(|e| malformed(format!("entry {i}: {e}")))?);
            }
        }
    }

    let info = root
        .table(fb::Ztoc::VT_COMPRESSION_INFO)
        .map_err(malformed)?
        .ok_or_else(|| malformed("no compression info".into()))?;
    let algo: i8 = info
        .scalar(fb::CompressionInfo::VT_COMPRESSION_ALGORITHM, 1)
        .map_err(malformed)?;
    let algorithm = match algo {
        1 => CompressionAlgorithm::Gzip,
        2 => CompressionAlgorithm::Uncompressed,
        n => return Err(malformed(format!("unknown compression algorithm {n}"))),
    };
    let max_span_id: i32 = info
        .scalar(fb::CompressionInfo::VT_MAX_SPAN_ID, 0)
        .map_err(malformed)?;
    let mut span_digests = Vec::new();
    if let Some(v) = info
        .vector(fb::CompressionInfo::VT_SPAN_DIGESTS)
        .map_err(malformed)?
    {
        span_digests.reserve(v.len);
        for i in 0..v.len {
            let s = v.bytes(i).map_err(malformed)?;
            let d = SpanDigest::parse(s)
                .ok_or_else(|| malformed(format!("span digest {i} is not sha256:<hex>")))?;
            span_digests.push(d);
        }
    }
    let checkpoints = info
        .bytes(fb::CompressionInfo::VT_CHECKPOINTS)
        .map_err(malformed)?
        .unwrap_or_default()
        .to_vec();
    Ok(Ztoc {
        version,
        build_tool_identifier,
        compressed_archive_size,
        uncompressed_archive_size,
        entries,
        compression: CompressionInfo {
            algorithm,
            max_span_id,
            span_digests,
            checkpoints,
        },
    })
}

fn decode_entry(t: &Table<'_>) -> Result<TocEntry, String> {
    let bytes =
        |slot| -> Result<Vec<u8>, String> { Ok(t.bytes(slot)?.unwrap_or_default().to_vec()) };
    let kind_name = bytes(fb::FileMetadata::VT_TYPE_)?;
    let kind = EntryKind::from_name(&kind_name)
        .ok_or_else(|| format!("unknown type {:?}", String::from_utf8_lossy(&kind_name)))?;
    let nonneg = |slot, what: &str| -> Result<u64, String> {
        let v: i64 = t.scalar(slot, 0)?;
        u64::try_from(v).map_err(|_| format!("negative {what}"))
    };
    let mut pax = BTreeMap::new();
    if let Some(v) = t.vector(fb::FileMetadata::VT_XATTRS)? {
        for i in 0..v.len {
            let x = v.table(i)?;
            let k = x.bytes(fb::Xattr::VT_KEY)?.unwrap_or_default().to_vec();
            let val = x.bytes(fb::Xattr::VT_VALUE)?.unwrap_or_default().to_vec();
            pax.insert(k, val);
        }
    }
    let mod_time = String::from_utf8(bytes(fb::FileMetadata::VT_MOD_TIME)?)
        .map_err(|_| "mod_time is not UTF-8".to_string())?;
    Ok(TocEntry {
        name: bytes(fb::FileMetadata::VT_NAME)?,
        kind,
        offset: nonneg(fb::FileMetadata::VT_UNCOMPRESSED_OFFSET, "offset")?,
        size: nonneg(fb::FileMetadata::VT_UNCOMPRESSED_SIZE, "size")?,
        linkname: bytes(fb::FileMetadata::VT_LINKNAME)?,
        mode: t.scalar(fb::FileMetadata::VT_MODE, 0)?,
        uid: t.scalar(fb::FileMetadata::VT_UID, 0)?,
        gid: t.scalar(fb::FileMetadata::VT_GID, 0)?,
        uname: bytes(fb::FileMetadata::VT_UNAME)?,
        gname: bytes(fb::FileMetadata::VT_GNAME)?,
        mod_time,
        devmajor: t.scalar(fb::FileMetadata::VT_DEVMAJOR, 0)?,
        devminor: t.scalar(fb::FileMetadata::VT_DEVMINOR, 0)?,
        pax,
    })
}

/// Little-endian scalars readable from a flatbuffer.
trait Scalar: Sized + Copy {
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
}

macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_le(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}
scalar!(i8, u16, i32, u32, i64);

fn read<T: Scalar>(buf: &[u8], pos: usize) -> Result<T, String> {
    pos.checked_add(T::SIZE)
        .and_then(|end| buf.get(pos..end))
        .map(T::from_le)
        .ok_or_else(|| format!("read of {} bytes at {pos} out of bounds", T::SIZE))
}

/// Follows the uoffset stored at `pos`.
fn follow(buf: &[u8], pos: usize) -> Result<usize, String> {
    let off: u32 = read(buf, pos)?;
    pos.checked_add(off as usize)
        .filter(|&p| p < buf.len())
        .ok_or_else(|| format!("offset at {pos} points outside the buffer"))
}

/// A table located in the buffer, with its vtable checked.
struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
    object_len: usize,
}

impl<'a> Table<'a> {
    fn root(buf: &'a [u8]) -> Result<Self, String> {
        Table::at(buf, follow(buf, 0)?)
    }

    fn at(buf: &'a [u8], pos: usize) -> Result<Self, String> {
        let soff: i32 = read(buf, pos)?;
        let vtable = (pos as i64 - i64::from(soff)) as usize;
        if vtable >= buf.len() {
            return Err(format!("vtable of table at {pos} out of bounds"));
        }
        let vtable_len = usize::from(read::<u16>(buf, vtable)?);
        let object_len = usize::from(read::<u16>(buf, vtable + 2)?);
        if vtable_len < 4 || vtable_len % 2 != 0 || vtable + vtable_len > buf.len() {
            return Err(format!("bad vtable at {vtable}"));
        }
        if object_len < 4 || pos + object_len > buf.len() {
            return Err(format!("table at {pos} overruns the buffer"));
        }
        Ok(Table {
            buf,
            pos,
            vtable,
            vtable_len,
            object_len,
        })
    }

    /// Position of a field, if present.
    fn field(&self, slot: u16, size: usize) -> Result<Option<usize>, String> {
        let slot = usize::from(slot);
        if slot + 2 > self.vtable_len {
            return Ok(None);
        }
        let off = usize::from(read::<u16>(self.buf, self.vtable + slot)?);
        if off == 0 {
            return Ok(None);
        }
        if off + size > self.object_len {
            return Err(format!("field {slot} of table at {} overruns it", self.pos));
        }
        Ok(Some(self.pos + off))
    }

    fn scalar<T: Scalar>(&self, slot: u16, default: T) -> Result<T, String> {
        match self.field(slot, T::SIZE)? {
            Some(p) => read(self.buf, p),
            None => Ok(default),
        }
    }

    fn bytes(&self, slot: u16) -> Result<Option<&'a [u8]>, String> {
        match self.field(slot, 4)? {
            Some(p) => bytes_at(self.buf, follow(self.buf, p)?).map(Some),
            None => Ok(None),
        }
    }

    fn table(&self, slot: u16) -> Result<Option<Table<'a>>, String> {
        match self.field(slot, 4)? {
            Some(p) => Table::at(self.buf, follow(self.buf, p)?).map(Some),
            None => Ok(None),
        }
    }

    fn vector(&self, slot: u16) -> Result<Option<OffsetVector<'a>>, String> {
        let Some(p) = self.field(slot, 4)? else {
            return Ok(None);
        };
        let start = follow(self.buf, p)?;
        let len = read::<u32>(self.buf, start)? as usize;
        len.checked_mul(4)
            .and_then(|n| n.checked_add(start + 4))
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("vector at {start} overruns the buffer"))?;
        Ok(Some(OffsetVector {
            buf: self.buf,
            start: start + 4,
            len,
        }))
    }
}

/// Length-prefixed bytes (a flatbuffer string or `[ubyte]`) at `pos`.
fn bytes_at(buf: &[u8], pos: usize) -> Result<&[u8], String> {
    let len = read::<u32>(buf, pos)? as usize;
    buf.get(pos + 4..)
        .and_then(|b| b.get(..len))
        .ok_or_else(|| format!("byte string at {pos} overruns the buffer"))
}

/// A vector of offsets (to tables or strings).
struct OffsetVector<'a> {
    buf: &'a [u8],
    start: usize,
    len: usize,
}

impl<'a> OffsetVector<'a> {
    fn table(&self, i: usize) -> Result<Table<'a>, String> {
        Table::at(self.buf, follow(self.buf, self.start + 4 * i)?)
    }

    fn bytes(&self, i: usize) -> Result<&'a [u8], String> {
        bytes_at(self.buf, follow(self.buf, self.start + 4 * i)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DEFAULT_BUILD_TOOL_IDENTIFIER;

    fn sample() -> Ztoc {
        let entry = |name: &str, kind, offset, size| TocEntry {
            name: name.as_bytes().to_vec(),
            kind,
            offset,
            size,
            linkname: Vec::new(),
            mode: 0o644,
            uid: 0,
            gid: 7,
            uname: b"root".to_vec(),
            gname: Vec::new(),
            mod_time: "2023-11-14T22:13:20Z".into(),
            devmajor: 0,
            devminor: 0,
            pax: BTreeMap::from([(b"path".to_vec(), name.as_bytes().to_vec())]),
        };
        Ztoc {
            version: "0.9".into(),
            build_tool_identifier: DEFAULT_BUILD_TOOL_IDENTIFIER.into(),
            compressed_archive_size: 1234,
            uncompressed_archive_size: 10240,
            entries: vec![
                entry("a/", EntryKind::Directory, 512, 0),
                entry("a/b", EntryKind::Regular, 1024, 5),
            ],
            compression: CompressionInfo {
                algorithm: CompressionAlgorithm::Gzip,
                max_span_id: 1,
                span_digests: vec![SpanDigest([1; 32]), SpanDigest([2; 32])],
                checkpoints: vec![9; 40],
            },
        }
    }

    #[test]
    fn generated_verifier_accepts_our_bytes() {
        let z = sample();
        let bytes = encode(&z);
        let fbz = fb::root_as_ztoc(&bytes).expect("flatc verifier");
        assert_eq!(fbz.version(), Some("0.9"));
        assert_eq!(fbz.compressed_archive_size(), 1234);
        let md = fbz.toc().unwrap().metadata().unwrap();
        assert_eq!(md.len(), 2);
        assert_eq!(md.get(1).name(), Some("a/b"));
        assert_eq!(md.get(1).gid(), 7);
        assert_eq!(md.get(0).xattrs().unwrap().get(0).key(), Some("path"));
        let ci = fbz.compression_info().unwrap();
        assert_eq!(ci.max_span_id(), 1);
        assert_eq!(ci.compression_algorithm(), fb::CompressionAlgorithm::Gzip);
        assert_eq!(
            ci.span_digests().unwrap().get(1),
            SpanDigest([2; 32]).to_string()
        );
        assert_eq!(decode(&bytes).unwrap(), z);
    }

    #[test]
    fn tar_zinfo_round_trip() {
        let b = encode_tar_zinfo(2, 4096, 10000);
        let t = zinfo::root_as_tar_zinfo(&b).expect("flatc verifier");
        assert_eq!((t.version(), t.span_size(), t.size()), (2, 4096, 10000));
        assert_eq!(decode_tar_zinfo(&b).unwrap(), (2, 4096, 10000));
    }

    #[test]
    fn truncations_are_errors() {
        let bytes = encode(&sample());
        for n in 0..bytes.len() {
            let _ = decode(&bytes[..n]);
        }
        assert!(decode(&[]).is_err());
        assert!(decode(&[0xff, 0xff, 0xff, 0x7f]).is_err());
    }
}

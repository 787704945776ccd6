//! zTOC flatbuffer encoding and decoding.
//!
//! Writing uses the `flatbuffers` builder, adding tables and fields in exactly the order of
//! upstream's Go marshaler so the bytes are identical. Reading goes through our own
//! bounds-checked reader ([`crate::flat`]) instead of the generated accessors and verifier
//! (tar names and PAX values may be any bytes, which that verifier rejects as non-UTF-8), and
//! charges everything it copies to a budget in proportion to the blob ([`crate::limits`]), so a
//! blob whose offsets all point at one big object is refused instead of decoded copy by copy.

use std::collections::BTreeMap;

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::error::{Result, ZtocError};
use crate::fbs::{zinfo, ztoc as fb};
use crate::flat::Table;
use crate::limits::DecodeBudget;
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

/// Parses zTOC flatbuffer bytes. Everything copied out of `buf` is charged to a budget in
/// proportion to `buf.len()` first (see [`crate::limits`]).
pub fn decode(buf: &[u8]) -> Result<Ztoc> {
    decode_parts(buf, None)
}

/// [`decode`], except that with `records` (the checkpoint records' bytes, left out of `buf`:
/// see `windows.rs`) only the checkpoint blob's header is copied.
pub(crate) fn decode_parts(buf: &[u8], records: Option<std::ops::Range<usize>>) -> Result<Ztoc> {
    // In proportion to the bytes that arrived: the records left out are not input.
    let left_out = records.as_ref().map_or(0, |r| r.len());
    let mut budget = DecodeBudget::new(buf.len().saturating_sub(left_out));
    let root = Table::root(buf).map_err(malformed)?;
    let mut text = |t: &Table<'_>, slot, what: &str| -> Result<String> {
        let b = t.bytes(slot).map_err(malformed)?.unwrap_or_default();
        budget.bytes(what, b.len())?;
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
            budget.entries(v.len)?;
            entries.reserve_exact(v.len);
            for i in 0..v.len {
                let t = v
                    .table(i)
                    .map_err(|e| malformed(format!("entry {i}: {e}")))?;
                entries.push(decode_entry(&t, i, &mut budget)?);
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
        budget.digests(v.len)?;
        span_digests.reserve_exact(v.len);
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
        .unwrap_or_default();
    let checkpoints = match records {
        Some(_) => checkpoints
            .get(..crate::checkpoint::HEADER_SIZE)
            .ok_or_else(|| malformed("checkpoints shorter than their header".into()))?,
        None => checkpoints,
    };
    budget.bytes("checkpoints", checkpoints.len())?;
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
            checkpoints: checkpoints.to_vec(),
        },
    })
}

/// Decodes entry `i`, charging what it copies to `budget` before copying it.
fn decode_entry(t: &Table<'_>, i: usize, budget: &mut DecodeBudget) -> Result<TocEntry> {
    let bad = |e: String| malformed(format!("entry {i}: {e}"));
    let mut bytes = |slot, field: &str| -> Result<Vec<u8>> {
        let b = t.bytes(slot).map_err(bad)?.unwrap_or_default();
        budget.field(i, field, b.len())?;
        Ok(b.to_vec())
    };
    let kind_name = bytes(fb::FileMetadata::VT_TYPE_, "type")?;
    let kind = EntryKind::from_name(&kind_name).ok_or_else(|| {
        bad(format!(
            "unknown type {:?}",
            String::from_utf8_lossy(&kind_name)
        ))
    })?;
    let name = bytes(fb::FileMetadata::VT_NAME, "name")?;
    let linkname = bytes(fb::FileMetadata::VT_LINKNAME, "linkname")?;
    let uname = bytes(fb::FileMetadata::VT_UNAME, "uname")?;
    let gname = bytes(fb::FileMetadata::VT_GNAME, "gname")?;
    let mod_time = String::from_utf8(bytes(fb::FileMetadata::VT_MOD_TIME, "mod_time")?)
        .map_err(|_| bad("mod_time is not UTF-8".into()))?;
    let nonneg = |slot, what: &str| -> Result<u64> {
        let v: i64 = t.scalar(slot, 0).map_err(bad)?;
        u64::try_from(v).map_err(|_| bad(format!("negative {what}")))
    };
    let mut pax = BTreeMap::new();
    if let Some(v) = t.vector(fb::FileMetadata::VT_XATTRS).map_err(bad)? {
        let mut total = 0usize;
        for j in 0..v.len {
            let x = v.table(j).map_err(bad)?;
            let k = x.bytes(fb::Xattr::VT_KEY).map_err(bad)?.unwrap_or_default();
            let val = x
                .bytes(fb::Xattr::VT_VALUE)
                .map_err(bad)?
                .unwrap_or_default();
            let this = k.len() + val.len();
            total = total.saturating_add(this);
            budget.pax_record(i, j + 1, total, this)?;
            pax.insert(k.to_vec(), val.to_vec());
        }
    }
    Ok(TocEntry {
        name,
        kind,
        offset: nonneg(fb::FileMetadata::VT_UNCOMPRESSED_OFFSET, "offset")?,
        size: nonneg(fb::FileMetadata::VT_UNCOMPRESSED_SIZE, "size")?,
        linkname,
        mode: t.scalar(fb::FileMetadata::VT_MODE, 0).map_err(bad)?,
        uid: t.scalar(fb::FileMetadata::VT_UID, 0).map_err(bad)?,
        gid: t.scalar(fb::FileMetadata::VT_GID, 0).map_err(bad)?,
        uname,
        gname,
        mod_time,
        devmajor: t.scalar(fb::FileMetadata::VT_DEVMAJOR, 0).map_err(bad)?,
        devminor: t.scalar(fb::FileMetadata::VT_DEVMINOR, 0).map_err(bad)?,
        pax,
    })
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

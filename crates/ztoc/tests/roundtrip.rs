//! Property tests: random tar trees -> gzip (one or several members) or plain tar -> zTOC ->
//! every file extracted through the zTOC equals what a plain tar reader returns.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use flate2::{write::GzEncoder, Compression};
use proptest::prelude::*;
use soci_ztoc::{build, BuildOptions, CompressionAlgorithm, EntryKind, Ztoc, ZtocError};

#[derive(Debug, Clone)]
struct FileSpec {
    name: String,
    data: Vec<u8>,
}

fn file_strategy() -> impl Strategy<Value = FileSpec> {
    let name = prop::collection::vec("[a-z]{1,12}", 1..4).prop_map(|p| p.join("/"));
    let data = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2000),
        // Compressible and larger than small spans.
        (1usize..200_000, any::<u8>())
            .prop_map(|(n, b)| (0..n).map(|i| b.wrapping_add((i / 7) as u8)).collect()),
        (1usize..120_000).prop_map(|n| (0..n).map(|i| ((i * 7919) % 251) as u8).collect()),
    ];
    (name, data).prop_map(|(name, data)| FileSpec { name, data })
}

fn make_tar(files: &[FileSpec]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (i, f) in files.iter().enumerate() {
        let mut h = tar::Header::new_gnu();
        h.set_size(f.data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000 + i as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, format!("{i}/{}", f.name), f.data.as_slice())
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip_members(data: &[u8], cuts: &[usize], level: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.sort_unstable();
    points.push(data.len());
    for end in points {
        if end < start {
            continue;
        }
        let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
        e.write_all(&data[start..end]).unwrap();
        out.extend(e.finish().unwrap());
        start = end;
    }
    out
}

/// name -> contents, as the `tar` crate reads the archive.
fn reference(tar_bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut a = tar::Archive::new(tar_bytes);
    let mut m = BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut v = Vec::new();
        e.read_to_end(&mut v).unwrap();
        m.insert(name, v);
    }
    m
}

fn check_all_files(blob: &[u8], tar_bytes: &[u8], span_size: u64) {
    let opts = BuildOptions {
        span_size,
        ..Default::default()
    };
    let z = build(blob, &opts).unwrap();
    assert_eq!(z.compressed_archive_size, blob.len() as u64);
    // Encoding round trip.
    let bytes = z.to_bytes();
    let z2 = Ztoc::from_bytes(&bytes).unwrap();
    assert_eq!(z, z2);
    assert_eq!(z2.to_bytes(), bytes);
    let spans = z2.spans().unwrap();
    let mut src: &[u8] = blob;
    let expected = reference(tar_bytes);
    assert_eq!(expected.len(), z2.entries.len());
    for (name, data) in &expected {
        let got = z2.read_file(&spans, &mut src, name.as_bytes()).unwrap();
        assert_eq!(&got, data, "file {name}");
    }
}

/// What follows the tar's end-of-archive marker in a layer. Upstream's uncompressed archive size
/// stops at the marker while its checkpoints cover the whole gzip stream, so the last
/// checkpoints may lie past that size; such zTOCs are valid and must load.
#[derive(Debug, Clone)]
enum Trailer {
    /// Zero padding (tar record padding; stored-gzip layers have block ends in it).
    Padding(usize),
    /// A second archive (concatenated tars; a tar reader stops at the first marker).
    Archive(Vec<FileSpec>),
}

fn trailer_strategy() -> impl Strategy<Value = Trailer> {
    prop_oneof![
        (1usize..600).prop_map(|n| Trailer::Padding(n * 512)),
        prop::collection::vec(file_strategy(), 1..5).prop_map(Trailer::Archive),
    ]
}

fn with_trailer(t: &[u8], trailer: &Trailer) -> Vec<u8> {
    let mut layer = t.to_vec();
    match trailer {
        Trailer::Padding(n) => layer.resize(t.len() + n, 0),
        Trailer::Archive(files) => layer.extend(make_tar(files)),
    }
    layer
}

/// The uncompressed offset of the last gzip checkpoint.
fn last_checkpoint_out(z: &Ztoc) -> u64 {
    let cps = soci_ztoc::GzipCheckpoints::parse(z.compression.checkpoints.clone()).unwrap();
    cps.points().last().unwrap().uncompressed_offset
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn gzip_layers_extract_every_file(
        files in prop::collection::vec(file_strategy(), 1..12),
        cuts in prop::collection::vec(any::<usize>(), 0..3),
        level in 0u32..10,
        span_size in prop_oneof![Just(1u64 << 10), Just(8u64 << 10), Just(64u64 << 10), Just(1u64 << 22)],
    ) {
        let t = make_tar(&files);
        let gz = gzip_members(&t, &cuts, level);
        check_all_files(&gz, &t, span_size);
    }

    #[test]
    fn checkpoints_past_the_archive_end_load(
        files in prop::collection::vec(file_strategy(), 1..8),
        trailer in trailer_strategy(),
        cuts in prop::collection::vec(any::<usize>(), 0..3),
        level in 0u32..10,
        span_size in prop_oneof![Just(1u64 << 10), Just(8u64 << 10), Just(64u64 << 10)],
    ) {
        let t = make_tar(&files);
        let gz = gzip_members(&with_trailer(&t, &trailer), &cuts, level);
        check_all_files(&gz, &t, span_size);
    }

    #[test]
    fn tar_layers_extract_every_file(
        files in prop::collection::vec(file_strategy(), 1..8),
        span_size in prop_oneof![Just(512u64), Just(5000u64), Just(1u64 << 22)],
    ) {
        let t = make_tar(&files);
        let opts = BuildOptions { span_size, ..Default::default() };
        let z = build(t.as_slice(), &opts).unwrap();
        prop_assert_eq!(z.compression.algorithm, CompressionAlgorithm::Uncompressed);
        check_all_files(&t, &t, span_size);
    }

    #[test]
    fn corrupt_ztoc_bytes_never_panic(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let files = vec![FileSpec { name: "a/b".into(), data: vec![5; 70_000] }, FileSpec { name: "c".into(), data: b"hi".to_vec() }];
        let t = make_tar(&files);
        let gz = gzip_members(&t, &[], 6);
        let z = build(gz.as_slice(), &BuildOptions { span_size: 16 << 10, ..Default::default() }).unwrap();
        let mut bytes = z.to_bytes();
        for (pos, val) in flips {
            let n = bytes.len();
            bytes[pos % n] ^= val;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        if let Ok(z) = Ztoc::from_bytes(&bytes) {
            if let Ok(spans) = z.spans() {
                let mut src: &[u8] = &gz;
                for e in &z.entries {
                    // Must not panic; a wrong digest or range is an error, never wrong bytes.
                    if let Ok(data) = z.read_file(&spans, &mut src, &e.name) {
                        prop_assert!(data.len() as u64 == e.size);
                    }
                }
            }
        }
    }
}

fn sample_layer() -> (Vec<u8>, Vec<u8>) {
    let files: Vec<FileSpec> = (0..6)
        .map(|i| {
            let mut x: u32 = 0x9e37_79b9 ^ i;
            let data = (0..50_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            FileSpec {
                name: format!("f{i}"),
                data,
            }
        })
        .collect();
    let t = make_tar(&files);
    (gzip_members(&t, &[], 6), t)
}

#[test]
fn tampered_span_is_detected() {
    let (gz, _) = sample_layer();
    let z = build(
        gz.as_slice(),
        &BuildOptions {
            span_size: 32 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    let spans = z.spans().unwrap();
    assert!(spans.len() > 2);
    let s = spans.span(1).unwrap();
    let mut bad = gz.clone();
    bad[(s.compressed.start + 5) as usize] ^= 0x40;
    let mut src: &[u8] = &bad;
    let mut mismatches = 0;
    for e in &z.entries {
        match z.read_file(&spans, &mut src, &e.name) {
            Err(ZtocError::SpanDigestMismatch { span: 1, .. }) => mismatches += 1,
            Ok(data) => {
                let mut clean: &[u8] = &gz;
                assert_eq!(data, z.read_file(&spans, &mut clean, &e.name).unwrap());
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(mismatches > 0);
}

#[test]
fn bad_layers_give_typed_errors() {
    let (gz, t) = sample_layer();
    let opts = BuildOptions::default();
    assert!(matches!(
        build(&gz[..gz.len() / 2], &opts),
        Err(ZtocError::Gzip(_))
    ));
    let mut corrupt = gz.clone();
    corrupt[gz.len() / 2] ^= 0xff;
    corrupt[gz.len() / 2 + 1] ^= 0xff;
    assert!(build(corrupt.as_slice(), &opts).is_err());
    assert!(matches!(
        build(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0][..], &opts),
        Err(ZtocError::Zstd)
    ));
    assert!(build(&t[..700], &opts).is_err());
    assert!(build(&b"not a tar at all, just some text"[..], &opts).is_err());
    let mut trailing = gz.clone();
    trailing.extend_from_slice(b"garbage");
    assert!(build(trailing.as_slice(), &opts).is_err());
}

#[test]
fn entry_metadata_and_kinds() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_uid(1000);
    h.set_gid(1001);
    h.set_username("alice").unwrap();
    h.set_groupname("staff").unwrap();
    h.set_mtime(1_700_000_000);
    h.set_size(0);
    b.append_data(&mut h, "dir/", &b""[..]).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.color", &b"blue"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    h.set_mode(0o600);
    b.append_data(&mut h, "dir/file", &b"abc"[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "dir/hard", "dir/file").unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Char);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_size(0);
    b.append_data(&mut h, "dev/null", &b""[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Fifo);
    h.set_size(0);
    b.append_data(&mut h, "dir/.wh..wh..opq", &b""[..]).unwrap();
    let t = b.into_inner().unwrap();
    let z = build(t.as_slice(), &BuildOptions::default()).unwrap();
    let kinds: Vec<_> = z.entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EntryKind::Directory,
            EntryKind::Regular,
            EntryKind::Hardlink,
            EntryKind::Char,
            EntryKind::Fifo
        ]
    );
    let d = &z.entries[0];
    assert_eq!((d.uid, d.gid, d.mode), (1000, 1001, 0o755));
    assert_eq!(
        (d.uname.as_slice(), d.gname.as_slice()),
        (&b"alice"[..], &b"staff"[..])
    );
    assert_eq!(d.mod_time, "2023-11-14T22:13:20Z");
    let f = z.find(b"./dir/file").unwrap();
    assert_eq!(
        f.xattrs().collect::<Vec<_>>(),
        [(&b"user.color"[..], &b"blue"[..])]
    );
    assert!(z.has_xattrs());
    assert_eq!((z.entries[3].devmajor, z.entries[3].devminor), (1, 3));
    let spans = z.spans().unwrap();
    let mut src: &[u8] = &t;
    assert_eq!(z.read_file(&spans, &mut src, b"dir/hard").unwrap(), b"abc");
    assert!(matches!(
        z.read_file(&spans, &mut src, b"nope"),
        Err(ZtocError::NotFound(_))
    ));
}

fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn concatenated_archive_with_small_spans_loads() {
    let first = vec![FileSpec {
        name: "a".into(),
        data: noise(40_000, 1),
    }];
    let second_data = noise(60_000, 2);
    let second = vec![FileSpec {
        name: "b".into(),
        data: second_data.clone(),
    }];
    let t = make_tar(&first);
    let layer = with_trailer(&t, &Trailer::Archive(second));
    let gz = gzip_members(&layer, &[], 6);
    let opts = BuildOptions {
        span_size: 1 << 10,
        ..Default::default()
    };
    let z = build(gz.as_slice(), &opts).unwrap();
    assert_eq!(z.uncompressed_archive_size, t.len() as u64);
    assert!(last_checkpoint_out(&z) > z.uncompressed_archive_size);
    let z = Ztoc::from_bytes(&z.to_bytes()).unwrap();
    let spans = z
        .spans()
        .expect("checkpoints past the archive end are valid");
    let mut src: &[u8] = &gz;
    assert_eq!(
        z.read_file(&spans, &mut src, b"0/a").unwrap(),
        first[0].data
    );
    // The spans cover the stream up to the last checkpoint, so an entry there is readable, not
    // past the end: an entry pointing into the second archive's file reads its bytes.
    let off = t.len() as u64 + 512;
    let covered = last_checkpoint_out(&z);
    let mut z2 = z.clone();
    z2.entries[0].offset = off;
    z2.entries[0].size = covered - off;
    let spans = z2.spans().expect("entry within the spans' coverage");
    assert_eq!(
        z2.read_file(&spans, &mut src, b"0/a").unwrap(),
        second_data[..(covered - off) as usize]
    );
    // One byte more is past what the spans can produce (the last span's end is unknown).
    z2.entries[0].size += 1;
    assert!(matches!(z2.spans(), Err(ZtocError::EntryPastEnd { .. })));
}

#[test]
fn stored_gzip_with_record_padding_loads() {
    let files = vec![FileSpec {
        name: "f".into(),
        data: (0..100_000).map(|i| (i * 7 % 256) as u8).collect(),
    }];
    let t = make_tar(&files);
    let gz = gzip_members(&with_trailer(&t, &Trailer::Padding(300 << 10)), &[], 0);
    check_all_files(&gz, &t, 1 << 10);
    let z = build(
        gz.as_slice(),
        &BuildOptions {
            span_size: 1 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(last_checkpoint_out(&z) > z.uncompressed_archive_size);
}

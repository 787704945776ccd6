//! The tar walker: headers, PAX and GNU extensions, typed errors.

use super::header::{parse_numeric, parse_octal, parse_pax_time};
use super::*;

fn walk(data: &[u8]) -> Result<(Vec<TarEntry>, u64), TarError> {
    let mut w = TarWalker::new(data);
    let mut v = Vec::new();
    while let Some(e) = w.next_entry()? {
        v.push(e);
    }
    Ok((v, w.position()))
}

fn build(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    f(&mut b);
    b.into_inner().unwrap()
}

#[test]
fn numeric_fields() {
    assert_eq!(parse_octal(b"0000644\0"), Some(0o644));
    assert_eq!(parse_octal(b"  644 \0\0"), Some(0o644));
    assert_eq!(parse_octal(b"\0\0\0\0"), Some(0));
    assert_eq!(parse_octal(b"0009"), None);
    assert_eq!(
        parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
        Some(256)
    );
    assert_eq!(parse_numeric(&[0xff; 8]), Some(-1));
}

#[test]
fn pax_time() {
    assert_eq!(
        parse_pax_time(b"1350244992.023960108", 0).unwrap(),
        (1350244992, 23960108)
    );
    assert_eq!(parse_pax_time(b"1.5", 0).unwrap(), (1, 500_000_000));
    assert_eq!(parse_pax_time(b"-1.5", 0).unwrap(), (-2, 500_000_000));
    assert_eq!(parse_pax_time(b"1.1234567891", 0).unwrap(), (1, 123456789));
    assert!(parse_pax_time(b"1.x", 0).is_err());
}

#[test]
fn long_names_pax_and_offsets() {
    let long = "d/".repeat(80) + "file.txt";
    let data = build(|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o640);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "link", "x".repeat(150)).unwrap();
    });
    let (entries, end) = walk(&data).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].name, long.as_bytes());
    assert_eq!(entries[0].kind, EntryKind::Regular);
    assert_eq!(entries[0].size, 5);
    assert_eq!(entries[0].mode, 0o640);
    assert_eq!(&data[entries[0].data_offset as usize..][..5], b"hello");
    assert_eq!(entries[1].kind, EntryKind::Symlink);
    assert_eq!(entries[1].linkname.len(), 150);
    assert_eq!(end, data.len() as u64);
}

#[test]
fn pax_records_are_kept_and_applied() {
    let data = build(|b| {
        b.append_pax_extensions([
            ("SCHILY.xattr.user.k", &b"v\x00\xff"[..]),
            ("mtime", b"1700000000.5"),
            ("path", b"pax/name"),
        ])
        .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Directory);
        b.append_data(&mut h, "short/", &b""[..]).unwrap();
    });
    let (entries, _) = walk(&data).unwrap();
    assert_eq!(entries[0].name, b"pax/name");
    assert_eq!(entries[0].mtime, (1_700_000_000, 500_000_000));
    assert_eq!(entries[0].pax.len(), 3);
    assert_eq!(
        entries[0].pax[&b"SCHILY.xattr.user.k".to_vec()],
        b"v\x00\xff"
    );
}

#[test]
fn errors_are_typed() {
    let data = build(|b| {
        let mut h = tar::Header::new_ustar();
        h.set_size(600);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "f", &[7u8; 600][..]).unwrap();
    });
    assert!(matches!(
        walk(&data[..700]),
        Err(TarError::Truncated { .. })
    ));
    assert!(matches!(
        walk(&data[..100]),
        Err(TarError::Truncated { .. })
    ));
    let mut bad = data.clone();
    bad[0] ^= 1;
    assert!(matches!(walk(&bad), Err(TarError::InvalidHeader { .. })));
    let sparse = build(|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::GNUSparse);
        b.append_data(&mut h, "s", &b""[..]).unwrap();
    });
    assert!(matches!(
        walk(&sparse),
        Err(TarError::UnsupportedType { typeflag: 'S', .. })
    ));
}

#[test]
fn end_of_archive_positions() {
    // No end blocks at all: stops after the last entry's padded data.
    let data = build(|b| {
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        b.append_data(&mut h, "a", &b"abc"[..]).unwrap();
    });
    assert_eq!(walk(&data[..1024]).unwrap().1, 1024);
    // One zero block then EOF.
    assert_eq!(walk(&data[..1536]).unwrap().1, 1536);
    // Two zero blocks, record padding after them not counted.
    assert_eq!(walk(&data).unwrap().1, 2048);
    assert!(data.len() >= 2048);
    assert_eq!(walk(&[]).unwrap().0.len(), 0);
    // Ends right after the last entry's data (no padding, no end blocks), as umoci writes:
    // accepted like Go's reader; a partial padding is not.
    let (e, end) = walk(&data[..515]).unwrap();
    assert_eq!((e.len(), end), (1, 515));
    assert!(matches!(
        walk(&data[..600]),
        Err(TarError::Truncated { .. })
    ));
    assert!(matches!(
        walk(&data[..514]),
        Err(TarError::Truncated { .. })
    ));
}

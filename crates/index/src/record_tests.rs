use super::*;

fn rec(span_count: u64, spans: Vec<u64>) -> Vec<u8> {
    serde_json::to_vec(&RecordFile {
        version: RECORD_VERSION,
        snapshot: 7,
        image: "r/app:soci".into(),
        manifest: format!("sha256:{}", "a".repeat(64)),
        layer: format!("sha256:{}", "b".repeat(64)),
        ztoc: format!("sha256:{}", "c".repeat(64)),
        mounted_unix_ms: 1,
        span_count,
        uncompressed_size: 0,
        ranges: None,
        spans,
    })
    .unwrap()
}

#[test]
fn record_round_trip() {
    let r = RecordFile::parse(&rec(10, vec![5, 0, 9]), "f").unwrap();
    assert_eq!(r.spans, vec![5, 0, 9]);
    assert_eq!(r.snapshot, 7);
}

#[test]
fn hostile_records_are_refused() {
    for (bytes, why) in [
        (rec(10, vec![10]), "outside"),
        (rec(10, vec![1, 1]), "twice"),
        (rec(2, vec![0, 1, 2]), "spans listed"),
        (rec(MAX_RECORD_SPANS + 1, vec![]), "limit"),
        (b"{".to_vec(), "invalid JSON"),
        (vec![b' '; MAX_RECORD_BYTES as usize + 1], "limit"),
    ] {
        let e = RecordFile::parse(&bytes, "/root/record/3.json").unwrap_err();
        let s = e.to_string();
        assert!(s.contains(why) && s.contains("/root/record/3.json"), "{s}");
    }
    let mut v: serde_json::Value = serde_json::from_slice(&rec(3, vec![])).unwrap();
    v["version"] = 2.into();
    let e = RecordFile::parse(&serde_json::to_vec(&v).unwrap(), "f").unwrap_err();
    assert!(e.to_string().contains("version"), "{e}");
}

#[test]
fn artifact_merges_ranges_and_keeps_first_access_order_as_priority() {
    // Read order: 7, 8, 2, 3, 9, 0 -> ranges 0, 2..=3, 7..=9.
    let a = recorded_artifact(&[7, 8, 2, 3, 9, 0], "layer")
        .unwrap()
        .unwrap();
    let spans = a.spans();
    assert_eq!(
        spans
            .iter()
            .map(|s| (s.start_span, s.end_span, s.priority))
            .collect::<Vec<_>>(),
        vec![(0, 0, 2), (2, 3, 1), (7, 9, 0)]
    );
    let json = String::from_utf8(a.to_json()).unwrap();
    assert_eq!(
        json,
        r#"{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":0,"priority":2},{"start_span":2,"end_span":3,"priority":1},{"start_span":7,"end_span":9}]}"#
    );
    // Reads back as any artifact does, first-read first.
    let back = PrefetchArtifact::parse(json.as_bytes(), "d", "l", 10).unwrap();
    assert_eq!(back.span_ranges(), vec![7..=9, 2..=3, 0..=0]);
    // Adjacent ranges merge into one request, which goes out at its most urgent rank.
    let json = br#"{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":1,"priority":5},{"start_span":2,"end_span":2,"priority":1},{"start_span":6,"end_span":6,"priority":3}]}"#;
    let a = PrefetchArtifact::parse(json, "d", "l", 10).unwrap();
    assert_eq!(a.span_ranges(), vec![0..=2, 6..=6]);
    assert!(recorded_artifact(&[], "layer").unwrap().is_none());
}

#[test]
fn too_many_ranges_are_refused() {
    let order: Vec<u64> = (0..(MAX_PREFETCH_RANGES as u64 + 1))
        .map(|i| i * 2)
        .collect();
    let e = recorded_artifact(&order, "sha256:x").unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
}

#[test]
fn recorded_ranges_parse_and_hostile_ones_are_refused() {
    let r = RecordedRanges::parse(b"100 200\n0 50\n", "f.ranges", 1000).unwrap();
    assert_eq!(r.ranges, vec![100..200, 0..50]);
    assert!(r.complete);
    let r = RecordedRanges::parse(b"1 2\noverflow\n", "f.ranges", 10).unwrap();
    assert!(!r.complete);
    assert!(RecordedRanges::parse(b"", "f", 0)
        .unwrap()
        .ranges
        .is_empty());
    let many = "1 2\n".repeat(MAX_RECORD_RANGES + 1);
    for (bytes, why) in [
        (b"5 5\n".to_vec(), "not a range"),
        (b"0 1001\n".to_vec(), "not a range"),
        (
            b"18446744073709551614 18446744073709551615\n".to_vec(),
            "not a range",
        ),
        (b"1 2".to_vec(), "cut short"),
        (b"1 2 3\n".to_vec(), "START END"),
        (b"-1 2\n".to_vec(), "START END"),
        (b"overflow\n1 2\n".to_vec(), "after"),
        (many.into_bytes(), "lines"),
        (vec![b'\n'; MAX_RECORD_BYTES as usize + 1], "limit"),
    ] {
        let e = RecordedRanges::parse(&bytes, "/root/record/3.ranges", 1000).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains(why) && s.contains("/root/record/3.ranges"),
            "{s}"
        );
    }
}

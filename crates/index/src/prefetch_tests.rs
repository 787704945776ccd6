use super::*;

use soci_ztoc::{BuildOptions, CompressionAlgorithm};

/// Bytes Go's `json.Marshal` writes for upstream's `PrefetchArtifact` (struct tags
/// `version`, `prefetch_spans`, `start_span`, `end_span`, `priority,omitempty`), with the
/// values of upstream's `soci/prefetch_test.go`.
const GOLDEN_0_2: &str = r#"{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":2}]}"#;
const GOLDEN_5_10_P1: &str =
    r#"{"version":"1.0","prefetch_spans":[{"start_span":5,"end_span":10,"priority":1}]}"#;

fn span(a: i32, b: i32) -> PrefetchSpan {
    PrefetchSpan {
        start_span: a,
        end_span: b,
        priority: 0,
    }
}

#[test]
fn golden_bytes_and_descriptor_match_upstream() {
    let a = PrefetchArtifact::new(vec![span(0, 2)]);
    assert_eq!(String::from_utf8(a.to_json()).unwrap(), GOLDEN_0_2);
    let layer = Digest::of(b"layer");
    let (d, bytes) = a.descriptor(&layer);
    assert_eq!(
        d.digest.as_str(),
        "sha256:fae7e200f7ac3515abf897d7c407ef9bac9b5b2e736de1b1f733339ecec84dee"
    );
    assert_eq!(d.size, bytes.len() as u64);
    // As it appears in the SOCI index's layers: mediaType, digest, size, one annotation.
    let want = format!(
        r#"{{"mediaType":"application/vnd.amazon.soci.prefetch.v1+json","digest":"sha256:fae7e200f7ac3515abf897d7c407ef9bac9b5b2e736de1b1f733339ecec84dee","size":{},"annotations":{{"com.amazon.soci.image-layer-digest":"{layer}"}}}}"#,
        GOLDEN_0_2.len()
    );
    assert_eq!(String::from_utf8(to_go_json(&d)).unwrap(), want);

    let p = PrefetchArtifact {
        version: "1.0".into(),
        prefetch_spans: Some(vec![PrefetchSpan {
            start_span: 5,
            end_span: 10,
            priority: 1,
        }]),
    };
    assert_eq!(String::from_utf8(p.to_json()).unwrap(), GOLDEN_5_10_P1);
    assert_eq!(
        Digest::of(GOLDEN_5_10_P1.as_bytes()).as_str(),
        "sha256:dff4d28a171a317684b9af42612941574fe06dc45b292989cd6a21169b97d555"
    );
    let back = PrefetchArtifact::parse(GOLDEN_5_10_P1.as_bytes(), "x", "l", 11).unwrap();
    assert_eq!(back, p);
}

#[test]
fn parse_limits_and_errors_name_the_artifact() {
    let ok = br#"{"version":"1.0","prefetch_spans":[{"start_span":1,"end_span":3}],"extra":1}"#;
    let a = PrefetchArtifact::parse(ok, "sha256:art", "sha256:lay", 4).unwrap();
    assert_eq!(a.span_ranges(), vec![1..=3]);
    let cases: &[(&[u8], &str)] = &[
        (b"not-json", "invalid JSON"),
        (
            br#"{"version":"0.9","prefetch_spans":[{"start_span":1,"end_span":1}]}"#,
            "unsupported version",
        ),
        (
            br#"{"version":"1.0","prefetch_spans":[]}"#,
            "no span ranges",
        ),
        (
            br#"{"version":"1.0","prefetch_spans":null}"#,
            "no span ranges",
        ),
        (br#"{"version":"1.0"}"#, "no span ranges"),
        (
            br#"{"version":"1.0","prefetch_spans":[{"start_span":1,"end_span":4}]}"#,
            "outside layer",
        ),
        (
            br#"{"version":"1.0","prefetch_spans":[{"start_span":-1,"end_span":1}]}"#,
            "outside layer",
        ),
        (
            br#"{"version":"1.0","prefetch_spans":[{"start_span":3,"end_span":1}]}"#,
            "outside layer",
        ),
        (
            br#"{"version":"1.0","prefetch_spans":[{"start_span":1,"end_span":99999999999}]}"#,
            "invalid JSON",
        ),
    ];
    for (bytes, want) in cases {
        let e = PrefetchArtifact::parse(bytes, "sha256:art", "sha256:lay", 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
        assert!(e.contains("sha256:art"), "{e}");
    }
    let big = vec![b' '; MAX_PREFETCH_BYTES as usize + 1];
    let e = PrefetchArtifact::parse(&big, "sha256:art", "l", 4).unwrap_err();
    assert!(matches!(e, PrefetchError::TooLarge { .. }), "{e}");
    let many: Vec<String> = (0..=MAX_PREFETCH_RANGES)
        .map(|i| format!(r#"{{"start_span":{i},"end_span":{i}}}"#))
        .collect();
    let many = format!(
        r#"{{"version":"1.0","prefetch_spans":[{}]}}"#,
        many.join(",")
    );
    let e = PrefetchArtifact::parse(many.as_bytes(), "sha256:art", "l", 1 << 20).unwrap_err();
    assert!(matches!(e, PrefetchError::TooLarge { .. }), "{e}");
}

#[test]
fn normalize_merges_like_upstream() {
    assert!(normalize(vec![]).is_empty());
    assert_eq!(
        normalize(vec![
            span(5, 6),
            span(0, 1),
            span(2, 3),
            span(9, 12),
            span(10, 11)
        ]),
        vec![span(0, 3), span(5, 6), span(9, 12)]
    );
    assert_eq!(normalize(vec![span(1, 1), span(1, 1)]), vec![span(1, 1)]);
}

#[test]
fn clean_path_as_go_filepath_clean() {
    for (i, o) in [
        ("/app/x", "app/x"),
        ("app//x/", "app/x"),
        ("./app/./x", "app/x"),
        ("/../app/y/../x", "app/x"),
        ("/", ""),
    ] {
        assert_eq!(clean_path(i.as_bytes()), o.as_bytes(), "{i}");
    }
}

/// An uncompressed tar layer of `files` (name, size), zTOC with 1 KiB spans.
fn layer(files: &[(&str, usize)]) -> Ztoc {
    let mut b = tar::Builder::new(Vec::new());
    for (name, size) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(*size as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, name, &vec![7u8; *size][..]).unwrap();
    }
    let bytes = b.into_inner().unwrap();
    soci_ztoc::build(
        &bytes[..],
        &BuildOptions {
            span_size: 1024,
            build_tool_identifier: "test".into(),
            algorithm: Some(CompressionAlgorithm::Uncompressed),
        },
    )
    .unwrap()
}

#[test]
fn files_map_to_topmost_layer_spans_respecting_whiteouts() {
    // Layer 0: a (3000 bytes at 512), b, c/d. Layer 1: overrides a, deletes b, makes c opaque.
    let l0 = layer(&[("a", 3000), ("b", 10), ("c/d", 10), ("e", 5000)]);
    let l1 = layer(&[("./a", 100), (".wh.b", 0), ("c/.wh..wh..opq", 0)]);
    let (d0, d1) = (Digest::of(b"l0"), Digest::of(b"l1"));
    let layers = [
        LayerToc {
            layer: &d0,
            ztoc: &l0,
        },
        LayerToc {
            layer: &d1,
            ztoc: &l1,
        },
    ];
    let p = plan(
        &layers,
        &[
            "/a".into(),
            "b".into(),
            "/c/d".into(),
            "e".into(),
            "nope".into(),
        ],
    )
    .unwrap();
    // a: l1, header 512 bytes, data 512..612 -> span 0 (and span_of(612) = 0).
    assert_eq!(p.layers[d1.as_str()], vec![span(0, 0)]);
    // e in l0: after a (512+3072), b (512+512), c/d (512+512) and its own header -> data at
    // 6144..11144: spans 6..=10 (1 KiB spans).
    let e = l0.entries.iter().find(|e| e.name == b"e").unwrap();
    assert_eq!(e.offset, 6144);
    assert_eq!(p.layers[d0.as_str()], vec![span(6, 10)]);
    assert_eq!(p.not_found, vec!["b", "/c/d", "nope"]);
}

#[test]
fn index_lookups_tell_ztocs_and_prefetch_artifacts_apart() {
    use crate::soci::{ztoc_descriptor, SociIndex, SociVersion};
    let layer = Descriptor::new(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest::of(b"layer"),
        5,
    );
    let z = ztoc_descriptor(Digest::of(b"ztoc"), 4, &layer, 1 << 22, false);
    let (p, _) = PrefetchArtifact::new(vec![span(0, 1)]).descriptor(&layer.digest);
    // Both carry the layer digest annotation; the prefetch artifact listed first must not be
    // taken for the zTOC (and the index still parses and round-trips).
    let idx = SociIndex::new(SociVersion::V2, vec![p.clone(), z.clone()], None, "t");
    let back = SociIndex::parse(&idx.to_json()).unwrap();
    assert_eq!(back.ztoc_for(&layer.digest), Some(&z));
    assert_eq!(back.prefetch_for(&layer.digest), Some(&p));
    assert_eq!(back.prefetch_for(&Digest::of(b"other")), None);
}

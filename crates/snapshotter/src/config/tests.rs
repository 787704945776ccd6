//! Config parsing: defaults, upstream's shipped config, notes for what differs.

use super::*;

#[test]
fn defaults_and_overrides() {
    let (c, notes) =
        Config::parse("log_level = \"debug\"\n[unknown_upstream_section]\nx = 1\n").unwrap();
    assert_eq!(c.log_level, "debug");
    assert_eq!(
        notes,
        ["config key `unknown_upstream_section` is not supported by soci-rs and is ignored"]
    );
    assert_eq!(c.root_path, PathBuf::from(DEFAULT_ROOT));
    let shipped = include_str!("../../../../deploy/config.toml");
    let (c, notes) = Config::parse(shipped).unwrap();
    assert!(
        notes.is_empty(),
        "deploy/config.toml has only known keys: {notes:?}"
    );
    assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
    assert!(!c.pull_modes.soci_v1.enable && c.pull_modes.soci_v2.enable);
    assert_eq!(c.background_fetch.silence_period_msec, 30_000);
    let c: Config = toml::from_str("[pull_modes.soci_v1]\nenable = true\n").unwrap();
    assert!(c.pull_modes.soci_v1.enable && c.pull_modes.soci_v2.enable);
    assert!(Config::load(Path::new("/nonexistent/x.toml"), true).is_err());
    assert!(Config::load(Path::new("/nonexistent/x.toml"), false).is_ok());
}

#[test]
fn upstream_shipped_config_loads_with_notes_for_what_differs() {
    // upstream soci-snapshotter's config/config.toml, unchanged.
    let text = include_str!("../../testdata/upstream-config.toml");
    let (c, notes) = Config::parse(text).unwrap();
    assert_eq!(c.metrics_addr(), None, "metrics_address = '' means off");
    assert_eq!(c.blob.fetching_timeout_sec, 300);
    assert_eq!(c.blob.max_span_verification_retries, 0);
    assert!(!c.disable_verification);
    assert!(!c.pull_modes.soci_v1.enable && c.pull_modes.soci_v2.enable);
    assert!(!c.pull_modes.parallel_pull_unpack.enable);
    assert!(
        !c.pull_modes
            .parallel_pull_unpack
            .experimental_parallel_pull_as_fallback
    );
    assert!(!c.background_fetch.disable);
    assert!(!c.prefetch.enable && c.prefetch.max_concurrency == 0);
    for key in [
        "http",
        "directory_cache",
        "debug",
        "background_fetch.max_queue_size",
        "resolver.auth_client_ttl_sec",
    ] {
        let want = format!("config key `{key}` is not supported by soci-rs and is ignored");
        assert!(notes.contains(&want), "no note for {key}: {notes:#?}");
    }
    let p = &c.pull_modes.parallel_pull_unpack;
    assert_eq!(
        (
            p.max_concurrent_downloads,
            p.max_concurrent_downloads_per_image
        ),
        (-1, 3)
    );
    assert_eq!(
        (p.max_concurrent_unpacks, p.max_concurrent_unpacks_per_image),
        (-1, 1)
    );
    assert_eq!(p.chunk_size(), Ok(0));
    // Upstream's meaning since hand-back exists: containerd pulls what is not lazy.
    assert!(
        !notes
            .iter()
            .any(|n| n.contains("experimental_parallel_pull_as_fallback")),
        "explicit false means what it means upstream: {notes:#?}"
    );
    assert!(!p.discard_unpacked_layers, "upstream's default: blobs kept");
    assert_eq!(
        c.content_store.socket(),
        PathBuf::from("/run/containerd/containerd.sock")
    );
    assert!(
        notes.contains(
            &"config key `content_store.type` is not supported by soci-rs and is ignored"
                .to_string()
        ),
        "{notes:#?}"
    );
    assert!(!c.cri_keychain.enable_keychain);
    assert_eq!(
        c.cri_keychain.image_service_path,
        PathBuf::from("/run/containerd/containerd.sock")
    );
    for known in [
        "pull_modes.parallel_pull_unpack.max_concurrent_downloads",
        "cri_keychain",
        "metrics_address",
        "fuse.attr_timeout",
        "fuse.entry_timeout",
        "fuse.negative_timeout",
        "blob.fetching_timeout_sec",
        "prefetch.enable",
        "prefetch.max_concurrency",
    ] {
        assert!(
            !notes.iter().any(|n| n.contains(&format!("`{known}`"))),
            "{known} is supported: {notes:#?}"
        );
    }
}

#[test]
fn unimplemented_upstream_meaning_is_noted_and_dump_round_trips() {
    let (c, notes) = Config::parse("[pull_modes.parallel_pull_unpack]\nenable = true\n").unwrap();
    assert!(c.pull_modes.parallel_pull_unpack.enable);
    assert!(notes.is_empty(), "parallel mode is implemented: {notes:?}");
    let (_, notes) = Config::parse(
        "[pull_modes.parallel_pull_unpack]\nenable = true\ndiscard_unpacked_layers = false\n\
         [pull_modes.parallel_pull_unpack.decompress_streams.gzip]\npath = \"/usr/bin/unpigz\"\n",
    )
    .unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("decompress_streams"), "{notes:?}");
    let bad = "[pull_modes.parallel_pull_unpack]\nconcurrent_download_chunk_size = \"8 parsecs\"\n";
    assert!(Config::parse(bad).is_err());
    let (c, _) = Config::parse("metrics_address = \"127.0.0.1:9\"\n").unwrap();
    assert_eq!(c.metrics_addr(), Some("127.0.0.1:9"));
    let (back, notes) = Config::parse(&c.to_toml()).unwrap();
    assert!(notes.is_empty(), "dump has only known keys: {notes:?}");
    assert_eq!(back.to_toml(), c.to_toml());
    assert_eq!(back.metrics_address, "127.0.0.1:9");
}

#[test]
fn upstream_resolver_mirrors() {
    let text = "[[resolver.host.\"docker.io\".mirrors]]\nhost = \"mirror.example\"\n\n\
                [[resolver.host.\"docker.io\".mirrors]]\nhost = \"127.0.0.1:5000\"\n\
                request_timeout_sec = 5\n";
    let (c, notes) = Config::parse(text).unwrap();
    let m = c.mirrors();
    assert_eq!(m["docker.io"].len(), 2);
    assert_eq!(m["docker.io"][0].host, "mirror.example");
    assert!(!m["docker.io"][0].insecure);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("request_timeout_sec"), "{notes:?}");
}

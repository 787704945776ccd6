//! `soci --version`: what nerdctl's version check reads, stated truthfully.
//!
//! nerdctl (pkg/snapshotterutil/sociutil.go, `CheckSociVersion`) takes the first `x.y.z` in the
//! output and requires at least 0.10.0 before it calls `soci convert`. We are not upstream
//! 0.10.0, so the line leads with the upstream CLI version whose commands and formats we
//! implement (marked `-compat`), then names ourselves and our own version.

/// Upstream soci-snapshotter version whose CLI contract (convert/create/push/index/ztoc/
/// rebuild-db) and SOCI index manifest v1/v2 formats this binary implements.
pub const UPSTREAM_COMPAT: &str = "0.10.0";

/// The `--version` line.
pub fn line() -> String {
    format!(
        "soci version v{UPSTREAM_COMPAT}-compat (soci-rs {}: implements the soci-snapshotter \
         v{UPSTREAM_COMPAT} CLI and SOCI index manifest v1/v2; not upstream's binary)",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    /// nerdctl's regular expression, `v?(\d+\.\d+\.\d+)`, applied by hand: the first
    /// dotted triple must be the upstream version we implement, and at least 0.10.0.
    #[test]
    fn first_semver_is_the_upstream_compat_version() {
        let l = super::line();
        assert!(l.starts_with("soci version v"), "{l}");
        let first = l
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .find(|t| t.split('.').filter(|p| !p.is_empty()).count() == 3)
            .unwrap();
        assert_eq!(first, super::UPSTREAM_COMPAT);
        let parts: Vec<u64> = first.split('.').map(|p| p.parse().unwrap()).collect();
        assert!(parts >= vec![0, 10, 0]);
        assert!(l.contains(env!("CARGO_PKG_VERSION")));
    }
}

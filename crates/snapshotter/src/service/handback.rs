//! Hand-back: a layer the daemon cannot provide is given back to containerd.
//!
//! Why: containerd pulls a layer itself when a remote Prepare answers with mounts instead of
//! AlreadyExists (upstream soci-snapshotter and stargz-snapshotter do this). Failing the
//! Prepare instead aborts containerd's whole pull, although containerd could have fetched the
//! layer with its own credentials (CRI PullImage auth, which the daemon never sees) and its
//! own hosts configuration. So any failure of the daemon's own path (discovery, registry,
//! auth, corrupt zTOC followed by a failed full pull, the Prepare deadline) ends in an
//! ordinary active snapshot: a fresh, empty upper directory over the parent chain, which
//! containerd fills with the layer and commits. Nothing of the failed attempt is reused: its
//! record, lazy mount and half-unpacked directory are removed first and the hand-back gets a
//! new snapshot id (a blocking unpack still running after a deadline can only write into the
//! removed directory). Only errors containerd cannot recover from either (disk full, metadata
//! store failure) still fail the Prepare.
//!
//! The reason is a typed [`Cause`]; it becomes the `soci.fallback-reason` label
//! (`handed_back:<cause>`, kept on the committed snapshot), the
//! `soci_layers_handed_back_total{reason}` metric, and one log line per image and cause.

use std::collections::BTreeMap;
use std::sync::Arc;

use soci_index::labels as label;
use tonic::Status;
use tracing::warn;

use super::Service;
use crate::proto::types::Mount;
use crate::remote::{Remote, RemoteError};
use crate::store::Kind;

/// Prefix of the `soci.fallback-reason` label value of a handed-back layer.
pub use soci_index::labels::HANDED_BACK;

/// Why a layer was handed back to containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The registry refused the daemon's credentials (or it has none).
    Auth,
    /// Discovery or the layer list failed: registry unreachable or erroring.
    Registry,
    /// The daemon's own download or unpack of the layer failed.
    FullPull,
    /// The Prepare deadline passed.
    Deadline,
    /// Not lazy, and `experimental_parallel_pull_as_fallback = false`: containerd pulls the
    /// layer, as upstream does in that setting.
    ContainerdPulls,
}

impl Cause {
    /// Every cause, for metrics that show zero counts.
    pub const ALL: [Cause; 5] = [
        Cause::Auth,
        Cause::Registry,
        Cause::FullPull,
        Cause::Deadline,
        Cause::ContainerdPulls,
    ];

    /// Short label for metrics and snapshot labels.
    pub const fn label(self) -> &'static str {
        match self {
            Cause::Auth => "auth",
            Cause::Registry => "registry",
            Cause::FullPull => "full_pull_failed",
            Cause::Deadline => "deadline",
            Cause::ContainerdPulls => "fallback_disabled",
        }
    }

    /// The cause of a failed remote attempt; `default` unless the registry refused
    /// authentication.
    pub fn classify(error: &RemoteError, default: Cause) -> Cause {
        if error.is_auth() {
            Cause::Auth
        } else {
            default
        }
    }
}

/// The `soci.fallback-reason` value of a handed-back layer; `after` is the reason the layer
/// was not lazy in the first place, if any.
pub fn reason_label(cause: Cause, after: Option<&str>) -> String {
    match after {
        Some(a) if !a.is_empty() => format!("{HANDED_BACK}{};after={a}", cause.label()),
        _ => format!("{HANDED_BACK}{}", cause.label()),
    }
}

impl Service {
    /// Answers a remote Prepare with an ordinary active snapshot `key` on `parent` (a new,
    /// empty upper directory) so containerd unpacks the layer itself; records why.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn hand_back(
        &self,
        remote: &Arc<Remote>,
        key: String,
        parent: String,
        mut labels: BTreeMap<String, String>,
        cause: Cause,
        after: Option<&str>,
        detail: &str,
    ) -> Result<Vec<Mount>, Status> {
        // containerd applies the layer over the parent chain: it must be served.
        self.inner.ensure_chain_served(&parent).await?;
        let image = labels.get(label::IMAGE_REF).cloned().unwrap_or_default();
        let layer = labels.get(label::LAYER_DIGEST).cloned().unwrap_or_default();
        labels.insert(label::FALLBACK_REASON.into(), reason_label(cause, after));
        labels.remove(label::MODE);
        labels.remove(label::REMOTE);
        labels.remove(label::ZTOC_DIGEST);
        let k = key.clone();
        let mounts = self
            .blocking(move |s| {
                let p = (!parent.is_empty()).then_some(parent.as_str());
                s.create_record(&k, p, Kind::Active, labels)?;
                s.mounts_of(&k)
            })
            .await?;
        if remote.note_hand_back(&image, cause.label()) {
            warn!(image = %image, layer = %layer, reason = cause.label(), detail, "layers of this image are handed back to containerd to pull itself");
        }
        Ok(mounts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_failures_are_told_apart() {
        let text = |s: &str| RemoteError::Manifest(s.into());
        let e = text("manifest of r: authentication to 127.0.0.1:5000 failed (401); configure …");
        assert_eq!(Cause::classify(&e, Cause::Registry), Cause::Auth);
        assert_eq!(
            Cause::classify(&text("connection refused"), Cause::Registry),
            Cause::Registry
        );
        assert_eq!(
            Cause::classify(&text("digest mismatch"), Cause::FullPull),
            Cause::FullPull
        );
        let typed = RemoteError::from(soci_registry::RegistryError::Unauthorized {
            what: "blob".into(),
            registry: "r".into(),
            detail: "401".into(),
        });
        assert_eq!(Cause::classify(&typed, Cause::FullPull), Cause::Auth);
    }

    #[test]
    fn labels_name_cause_and_earlier_reason() {
        assert_eq!(reason_label(Cause::Auth, None), "handed_back:auth");
        assert_eq!(
            reason_label(Cause::FullPull, Some("corrupt_ztoc")),
            "handed_back:full_pull_failed;after=corrupt_ztoc"
        );
    }

    #[test]
    fn only_a_full_disk_is_fatal() {
        let e = RemoteError::io(
            "unpacking layer sha256:ab",
            std::io::Error::from_raw_os_error(28),
        );
        assert!(e.is_no_space());
        assert!(!RemoteError::Manifest("registry answered 503".into()).is_no_space());
    }
}

//! The resolver: discovery of an image's SOCI index (shared by the layers of one pull) and
//! preparation of each lazy layer's zTOC (fetched, verified and parsed into a tree ahead of
//! its Prepare), and the plan of how a layer is provided.
//!
//! Why apart from mounting: this half only talks to the registry and decides; it mounts
//! nothing, so its rules (what is definitive, what is retried) read without FUSE around them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use soci_fs::metrics::op as UpOp;
use soci_fs::LayerTree;
use soci_index::labels as label;
use soci_index::{discover, DiscoverOptions, NoSoci, SociImage};
use soci_registry::{Descriptor, Digest, Reference};

use super::singleflight::SingleFlight;
use super::{LayerPlan, Remote, RemoteError, Result};

/// Discoveries by image reference, manifest and index digest.
pub(super) type Discoveries = SingleFlight<String, Result<Arc<SociImage>, NoSoci>>;

/// How long a definitive "no lazy loading for this manifest" answer is shared (by the layers
/// of one pull) before the image is looked at again.
const DEFINITIVE_ANSWER_TTL: Duration = Duration::from_secs(60);

/// Whether a discovery result is a fact about the (digest-pinned) image rather than a failure
/// of the attempt: such answers may be shared for a while, failures never outlive their attempt.
fn definitive(reason: &NoSoci) -> bool {
    matches!(
        reason,
        NoSoci::NoIndex(_)
            | NoSoci::V1Only(_)
            | NoSoci::ZstdLayer(_)
            | NoSoci::CorruptZtoc(..)
            | NoSoci::CorruptIndex(..)
            | NoSoci::NoPlatform(_)
    )
}

/// A layer ready to mount: its validated span table and inode tree.
#[derive(Clone)]
pub(super) struct PreparedLayer {
    pub(super) spans: soci_ztoc::Spans,
    pub(super) tree: Arc<LayerTree>,
}

/// Prepared zTOCs by [`prepared_key`].
pub(super) type PreparedLayers = SingleFlight<Digest, Result<PreparedLayer>>;

/// The key a prepared layer is shared under: the zTOC digest, and its checkpoint index when it
/// has one. Windows loaded on demand are verified against that index, which the zTOC digest does
/// not bind: two images naming the same zTOC with different indexes must not share them.
pub(super) fn prepared_key(ztoc: &Descriptor) -> Digest {
    match ztoc
        .annotations
        .get(soci_index::ANNOTATION_CHECKPOINT_INDEX)
    {
        Some(idx) => Digest::of(format!("{}\n{idx}", ztoc.digest).as_bytes()),
        None => ztoc.digest.clone(),
    }
}

/// The resolver's state: discoveries shared by the layers of a pull, zTOCs prepared ahead.
#[derive(Default)]
pub(super) struct ResolverState {
    /// Discoveries by image reference, manifest and index digest.
    pub(super) images: Discoveries,
    /// zTOCs fetched and parsed ahead of the layer's Prepare, by zTOC digest.
    pub(super) prepared: PreparedLayers,
}

impl Remote {
    /// Discovers an image's SOCI index once per (reference, manifest) and shares the result.
    async fn image(
        self: &Arc<Self>,
        image_ref: &str,
        manifest: Option<&str>,
        index_digest: Option<&str>,
    ) -> Result<Arc<SociImage>, NoSoci> {
        let key = format!(
            "{image_ref}@{} {}",
            manifest.unwrap_or(""),
            index_digest.unwrap_or("")
        );
        let cell = self.resolver.images.cell(&key);
        let result = cell
            .get_or_init(|| async {
                let index_digest = index_digest
                    .map(|d| {
                        Digest::parse(d).ok_or_else(|| {
                            NoSoci::CorruptIndex(
                                d.into(),
                                format!("invalid {} label", label::SOCI_INDEX_DIGEST),
                            )
                        })
                    })
                    .transpose()?;
                // As upstream, an index named by the client is used even with v1/v2 off.
                if index_digest.is_none() && !self.cfg.pull_modes.soci_v2.enable {
                    return Err(NoSoci::NoIndex(
                        "SOCI v2 is disabled in the configuration".into(),
                    ));
                }
                let r = Reference::parse(image_ref).map_err(NoSoci::Registry)?;
                let opts = DiscoverOptions {
                    allow_v1: self.cfg.pull_modes.soci_v1.enable,
                    index_digest,
                    ..Default::default()
                };
                let started = std::time::Instant::now();
                let img = discover(&self.client, &r, &opts).await?;
                self.observe(
                    UpOp::SOCI_INDEX_FETCH,
                    img.index_desc.digest.as_str(),
                    started,
                );
                if let Some(m) = manifest {
                    if img.manifest_desc.digest.as_str() != m {
                        return Err(NoSoci::DigestMismatch(format!(
                            "{image_ref} resolves to manifest {}, containerd pulls {m}",
                            img.manifest_desc.digest
                        )));
                    }
                }
                let img = Arc::new(img);
                // containerd prepares layers one after another: fetch every zTOC now, in
                // parallel, so no layer waits for its own round trip.
                for (layer, ztoc) in img.layer_ztocs() {
                    if let Some(z) = ztoc {
                        let (me, img) = (self.clone(), img.clone());
                        tokio::spawn(async move {
                            if let Ok(p) = me.prepare_layer(&img, &z, &layer).await {
                                // Its prefetch need not wait for the layers below it.
                                me.prefetch_early(&img, &layer, &p.spans).await;
                            }
                        });
                    }
                }
                Ok(img)
            })
            .await
            .clone();
        if let Err(reason) = &result {
            if manifest.is_some() && definitive(reason) {
                // A fact about immutable content: the other layers of this pull share it, and
                // it is looked up again after a short while (the image may get an index).
                let (me, cell) = (self.clone(), cell.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(DEFINITIVE_ANSWER_TTL).await;
                    me.resolver.images.forget(&key, &cell);
                });
            } else {
                // Transient (registry, a moving tag): the next layer or pull tries again.
                self.resolver.images.forget(&key, &cell);
            }
        }
        result
    }

    /// Decides how a layer is provided.
    pub async fn plan(self: &Arc<Self>, labels: &BTreeMap<String, String>) -> Result<LayerPlan> {
        let image_ref = labels
            .get(label::IMAGE_REF)
            .ok_or(RemoteError::Label("no image reference label"))?;
        let layer_digest = labels
            .get(label::LAYER_DIGEST)
            .and_then(|d| Digest::parse(d))
            .ok_or(RemoteError::Label("no valid layer digest label"))?;
        let r = Reference::parse(image_ref).map_err(RemoteError::Reference)?;
        if self.cfg.pull_modes.parallel_pull_unpack.enable {
            return self.plan_full(&r, labels, &layer_digest, None).await;
        }
        match self
            .image(
                image_ref,
                labels.get(label::MANIFEST_DIGEST).map(String::as_str),
                labels.get(label::SOCI_INDEX_DIGEST).map(String::as_str),
            )
            .await
        {
            Ok(img) => {
                let layer = img
                    .manifest
                    .layers
                    .iter()
                    .find(|l| l.digest == layer_digest)
                    .cloned()
                    .ok_or_else(|| RemoteError::LayerNotInImage {
                        layer: layer_digest.clone(),
                        image: image_ref.clone(),
                    })?;
                match img.index.ztoc_for(&layer_digest).cloned() {
                    Some(ztoc) => Ok(LayerPlan::Lazy {
                        image: img,
                        ztoc,
                        layer,
                    }),
                    None => {
                        let unindexed: Vec<Descriptor> = img
                            .manifest
                            .layers
                            .iter()
                            .filter(|l| img.index.ztoc_for(&l.digest).is_none())
                            .cloned()
                            .collect();
                        let key = format!("{image_ref}@{}", img.manifest_desc.digest);
                        let limits = self
                            .full
                            .layer_list(&key, async { Ok(unindexed) })
                            .await?
                            .limits
                            .clone();
                        self.full.start_downloads(
                            &r.repository,
                            labels,
                            &img.manifest.layers,
                            &limits,
                            |d| img.index.ztoc_for(d).is_none(),
                        );
                        Ok(LayerPlan::Full {
                            repo: r.repository,
                            layer,
                            reason: None,
                            limits,
                        })
                    }
                }
            }
            Err(reason) => {
                self.note_fallback(image_ref, &reason);
                self.plan_full(&r, labels, &layer_digest, Some(reason))
                    .await
            }
        }
    }

    /// Fetches, verifies and parses a layer's zTOC and builds its tree, once per zTOC (and
    /// checkpoint index: [`prepared_key`]).
    #[tracing::instrument(level = "debug", name = "prepare_layer", skip_all, fields(image = %img.reference, layer = %layer.digest))]
    pub(super) async fn prepare_layer(
        &self,
        img: &SociImage,
        ztoc: &Descriptor,
        layer: &Descriptor,
    ) -> Result<PreparedLayer> {
        self.resolver
            .prepared
            .run(&prepared_key(ztoc), async {
                let started = std::time::Instant::now();
                let (z, spans) = img
                    .fetch_ztoc_for_mount(&self.client, ztoc, layer)
                    .await
                    .map_err(|e| RemoteError::Ztoc(e.to_string()))?;
                self.observe(UpOp::ZTOC_FETCH, layer.digest.as_str(), started);
                let span = tracing::Span::current();
                let tree =
                    tokio::task::spawn_blocking(move || span.in_scope(|| LayerTree::build(&z)))
                        .await?
                        .map_err(|e| RemoteError::Ztoc(format!("zTOC {}: {e}", ztoc.digest)))?;
                Ok(PreparedLayer {
                    spans,
                    tree: Arc::new(tree),
                })
            })
            .await
    }
}

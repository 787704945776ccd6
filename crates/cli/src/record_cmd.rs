//! `soci prefetch record`: prefetch recorded from a real run (stargz's "optimize" without
//! rewriting a layer).
//!
//! The image is pulled lazily into a scratch containerd namespace of its own, so every
//! indexed layer is mounted afresh (new snapshots, empty span caches, no kernel page cache):
//! the recording sees the container's real first reads whatever the user's namespaces hold.
//! The container runs once (`ctr run`), until it exits or `--run-timeout` (then it is
//! killed). The daemon keeps, per lazy layer, the spans its FUSE reads touched in first-access
//! order (`<daemon root>/record/<snapshot>.json`) and the byte ranges they asked for
//! (`<snapshot>.ranges`); those of this pull become the prefetch artifacts of a new SOCI index
//! v2, bound to the image as `soci convert` binds. The scratch namespace is removed afterwards.
//!
//! By default each recorded gzip layer also gets a refined zTOC ([`refine`]): same TOC, extra
//! checkpoints around the bytes read, so its prefetch fetches small spans instead of whole
//! 4 MiB ones; `--keep-spans` keeps the original zTOCs (prefetch of the recorded spans).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use soci_index::record::{bound_image, rebind, RECORD_DIR};
use soci_index::{ImageLocation, ImageStore};
use soci_registry::Platform;

use crate::{artifacts, Globals, RegistryArgs};

mod artifacts_of;
mod refine;
mod run;

use artifacts_of::artifacts_of;
use run::{run_and_collect, RunSpec};

#[derive(Args)]
pub struct RecordArgs {
    /// Where the new image index goes (default: IMAGE itself, re-tagged). Same store as
    /// IMAGE: a containerd image name, or docker://REF in the same repository.
    #[arg(long)]
    dst: Option<String>,
    /// Stop the container after this long (Go duration: 30s, 5m); the spans read so far are
    /// recorded.
    #[arg(long, default_value = "2m", value_parser = crate::duration::parse)]
    run_timeout: Duration,
    /// Root of the soci-snapshotter-grpc daemon (where it keeps `record/`); default `--root`.
    #[arg(long)]
    daemon_root: Option<PathBuf>,
    /// containerd namespace for the recording run (created, then removed; must not exist).
    /// Default `soci-record-<pid>`; also the container id.
    #[arg(long)]
    scratch_namespace: Option<String>,
    /// `ctr` executable.
    #[arg(long, default_value = "ctr")]
    ctr: PathBuf,
    /// Snapshotter name of the soci daemon in containerd.
    #[arg(long, default_value = "soci")]
    snapshotter: String,
    /// Extra argument for `ctr run`, before the image (repeatable), e.g. `--ctr-arg=--net-host`.
    #[arg(long = "ctr-arg", value_name = "ARG", allow_hyphen_values = true)]
    ctr_args: Vec<String>,
    /// Keep the layers' zTOCs as they are: the prefetch lists the recorded spans (whole
    /// span-size spans). By default each recorded gzip layer gets a refined zTOC (same TOC,
    /// extra checkpoints around the bytes the run read: small spans; the layer blob is
    /// downloaded once for it), pushed and named by the new SOCI index.
    #[arg(long)]
    keep_spans: bool,
    /// Refining: hot byte ranges closer than this (compressed bytes) share a span. A cut costs
    /// 32785 bytes of zTOC every mount fetches, and each separate hot span one more prefetch
    /// request.
    #[arg(long, default_value_t = soci_ztoc::CutPolicy::default().min_gap)]
    refine_gap: u64,
    /// Refining: most extra checkpoints per layer (more hot ranges are merged until they fit).
    #[arg(long, default_value_t = soci_ztoc::CutPolicy::default().max_extra as u64,
          value_parser = clap::value_parser!(u64).range(0..=soci_ztoc::MAX_EXTRA_CHECKPOINTS as u64))]
    refine_max_checkpoints: u64,
    #[command(flatten)]
    registry: RegistryArgs,
    /// SOCI-enabled image (from `soci convert`): a name in containerd's store (pulled from the
    /// registry of that name for the run) or docker://REF.
    image: String,
    /// Command and arguments for the container (default: the image's).
    #[arg(last = true)]
    args: Vec<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn record(a: RecordArgs, g: &Globals) -> Result<()> {
    let loc = ImageLocation::parse_explicit(&a.image)?;
    let (pull_ref, dst_tag) = match &loc {
        ImageLocation::Registry(r) => {
            let tag = match a.dst.as_deref() {
                None => r.tag.clone().unwrap_or_else(|| "latest".into()),
                Some(d) => match ImageLocation::parse_explicit(d)? {
                    ImageLocation::Registry(dr) if dr.repository == r.repository => dr
                        .tag
                        .clone()
                        .ok_or_else(|| anyhow!("--dst {d}: a tag is needed"))?,
                    _ => bail!(
                        "--dst {d}: must be docker:// in the repository of {}",
                        a.image
                    ),
                },
            };
            (r.to_string(), tag)
        }
        ImageLocation::Containerd { name } => {
            let dst = a.dst.clone().unwrap_or_else(|| name.clone());
            if !matches!(
                ImageLocation::parse_explicit(&dst)?,
                ImageLocation::Containerd { .. }
            ) {
                bail!("--dst {dst}: must be an image name in containerd's store, as IMAGE");
            }
            crate::convert_cmd::verify_dst_name(&dst)?;
            (name.clone(), dst)
        }
        ImageLocation::Layout { .. } => {
            bail!(
                "{}: an OCI layout cannot be run; push it to a registry first",
                a.image
            )
        }
    };
    let scratch = a
        .scratch_namespace
        .clone()
        .unwrap_or_else(|| format!("soci-record-{}", std::process::id()));
    let daemon_root = a.daemon_root.clone().unwrap_or_else(|| g.root.clone());
    let record_dir = daemon_root.join(RECORD_DIR);

    // The image as the store has it: its zTOCs decide what is recorded.
    let mut ctd = None;
    if matches!(loc, ImageLocation::Containerd { .. }) {
        let mut c = artifacts::connect(g).await?;
        c.begin().await?;
        ctd = Some(Arc::new(c));
    }
    let store = ImageStore::open(&loc, a.registry.client()?, ctd.clone())?;
    let result = async {
        let img = bound_image(&store, &loc.object(), &Platform::host())
            .await
            .with_context(|| format!("reading SOCI-enabled image {}", a.image))?;
        let run = RunSpec {
            ctr: &a.ctr,
            address: &g.address,
            ns: &scratch,
            snapshotter: &a.snapshotter,
            image: &pull_ref,
            ctr_args: &a.ctr_args,
            args: &a.args,
            timeout: a.run_timeout,
        };
        let started = now_ms();
        let mdigest = img.index.manifests[img.entry].digest.to_string();
        let indexed: Vec<String> = img
            .manifest
            .layers
            .iter()
            .filter(|l| img.soci.ztoc_for(&l.digest).is_some())
            .map(|l| l.digest.to_string())
            .collect();
        let records = run_and_collect(
            &run,
            &a.registry,
            &record_dir,
            started,
            &mdigest,
            &indexed,
            g,
        )?;
        let recorded = artifacts_of(&store, &img, &records).await?;
        let policy = soci_ztoc::CutPolicy {
            min_gap: a.refine_gap,
            max_extra: a.refine_max_checkpoints as usize,
        };
        let tmp = std::env::temp_dir();
        let mut artifacts = BTreeMap::new();
        let mut ztocs = BTreeMap::new();
        for rec in recorded {
            let refined = if a.keep_spans {
                None
            } else {
                refine::refine_layer(&store, &rec, &policy, &tmp).await?
            };
            let artifact = match refined {
                Some(r) => {
                    ztocs.insert(rec.layer.digest.clone(), r.ztoc_desc);
                    r.artifact
                }
                None => rec.artifact,
            };
            if let Some(art) = artifact {
                artifacts.insert(rec.layer.digest.clone(), art);
            }
        }
        let report = rebind(&store, img, &artifacts, &ztocs, &dst_tag).await?;
        Ok::<_, anyhow::Error>(report)
    }
    .await;
    if let (Ok(report), Some(c)) = (&result, &ctd) {
        let mut db = soci_index::ArtifactsDb::open(&g.root)?;
        let dst = ImageStore::Containerd(c.clone());
        artifacts::record_v2(&mut db, &dst, report).await?;
        db.save()?;
    }
    if let Some(c) = ctd {
        let mut c = Arc::try_unwrap(c).unwrap_or_else(|a| (*a).clone());
        c.end().await?;
    }
    let report = result?;
    for p in &report.platforms {
        eprintln!(
            "{}: manifest {} soci index {}",
            p.platform,
            p.manifest,
            p.soci_index
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_default()
        );
    }
    println!("{}", report.index);
    Ok(())
}

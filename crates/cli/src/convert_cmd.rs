//! `soci convert`: upstream's meaning first. SRC and DST are image names in containerd's image
//! store (namespace `--namespace`); `docker://REF` selects a registry and `oci:DIR[:TAG]` an OCI
//! image layout explicitly; `--standalone` converts an OCI layout directory or archive on disk.
//!
//! Before this was upstream-compatible, `soci convert SRC DST` meant registry to registry. An
//! old invocation must not silently change meaning, so registry-only flags without a
//! `docker://` side, and a containerd source that does not exist, fail with the new spelling.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use soci_index::{
    convert as convert_image, ConvertOptions, ImageLocation, ImageStore, PlatformSelection,
    DEFAULT_MIN_LAYER_SIZE, LAYOUT_PREFIX, REGISTRY_PREFIX,
};
use soci_registry::Platform;

use crate::artifacts::{self, Optimizations};
use crate::{Globals, RegistryArgs};

#[derive(Args)]
pub struct ConvertArgs {
    /// Convert only this platform (os/arch[/variant]); repeatable. Default: the host's.
    #[arg(short = 'p', long, conflicts_with = "all_platforms")]
    platform: Vec<String>,
    /// Convert every platform of a multi-platform image.
    #[arg(long)]
    all_platforms: bool,
    /// Span size in uncompressed bytes.
    #[arg(long, default_value_t = soci_ztoc::DEFAULT_SPAN_SIZE)]
    span_size: u64,
    /// Layers smaller than this (compressed bytes) get no zTOC.
    #[arg(long, default_value_t = DEFAULT_MIN_LAYER_SIZE)]
    min_layer_size: u64,
    #[command(flatten)]
    optimizations: Optimizations,
    /// File to prefetch when the image is run lazily (repeatable): its spans are written as a
    /// prefetch artifact in the SOCI index (upstream's format).
    #[arg(long = "prefetch-file", value_name = "PATH")]
    prefetch_file: Vec<String>,
    /// JSON file with an array of paths to prefetch (upstream's `--prefetch-files-json`).
    #[arg(long, value_name = "FILE")]
    prefetch_files_json: Option<PathBuf>,
    /// Leave out the checkpoint index annotation on zTOC descriptors (soci-rs's own: lets the
    /// daemon fetch a zTOC without its checkpoint windows): the SOCI index then carries only
    /// what upstream's format defines; lazy starts fetch whole zTOCs.
    #[arg(long)]
    no_checkpoint_index: bool,
    /// Rebuild zTOCs even if the artifacts database has them.
    #[arg(short = 'f', long)]
    force: bool,
    /// Convert an OCI image layout (directory or tar archive) on disk without containerd;
    /// SRC and DST are paths.
    #[arg(long)]
    standalone: bool,
    /// Output of --standalone: oci-archive (tar) or oci-dir (directory).
    #[arg(long, default_value = "oci-archive", value_parser = ["oci-archive", "oci-dir"])]
    format: String,
    /// Use plain HTTP for docker:// images.
    #[arg(long)]
    plain_http: bool,
    /// containerd hosts directory (`<host>/hosts.toml`) for docker:// images.
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Source image: a name in containerd's store, docker://REF or oci:DIR[:TAG].
    src: String,
    /// Destination image: a tagged name in containerd's store, docker://REF or oci:DIR[:TAG].
    dst: String,
}

/// The hint for invocations written for the old registry-to-registry meaning.
fn registry_hint() -> String {
    format!(
        "`soci convert SRC DST` converts images in containerd's image store, as upstream soci does. \
         To convert between registries, write both sides as {REGISTRY_PREFIX}REF \
         (e.g. `soci convert --plain-http {REGISTRY_PREFIX}host:5000/app:v1 {REGISTRY_PREFIX}host:5000/app:v1-soci`); \
         for OCI layouts write {LAYOUT_PREFIX}DIR[:TAG]"
    )
}

/// Upstream's rule for a containerd destination: a tagged reference without a digest.
pub fn verify_dst_name(name: &str) -> Result<()> {
    let last = name.rsplit('/').next().unwrap_or(name);
    if name.contains('@') || !last.contains(':') {
        bail!(
            "the destination image must be a tagged ref of the form \"registry/repository:tag\": {name:?}"
        );
    }
    Ok(())
}

pub async fn convert(a: ConvertArgs, g: &Globals) -> Result<()> {
    let platforms = if a.all_platforms {
        PlatformSelection::All
    } else if a.platform.is_empty() {
        PlatformSelection::Host
    } else {
        PlatformSelection::Some(
            a.platform
                .iter()
                .map(|p| Platform::parse(p).with_context(|| format!("invalid platform {p:?}")))
                .collect::<Result<_>>()?,
        )
    };
    a.optimizations.check()?;
    let mut opts = ConvertOptions {
        span_size: a.span_size,
        min_layer_size: a.min_layer_size,
        platforms,
        force: a.force,
        checkpoint_index: !a.no_checkpoint_index,
        prefetch_files: soci_index::prefetch::cli_files(
            &a.prefetch_file,
            a.prefetch_files_json.as_deref(),
        )
        .map_err(anyhow::Error::msg)?,
        ..Default::default()
    };
    let registry = RegistryArgs {
        plain_http: a.plain_http,
        hosts_dir: a
            .hosts_dir
            .clone()
            .unwrap_or_else(|| "/etc/containerd/certs.d".into()),
    };
    if a.standalone {
        return standalone(&a, &opts, &registry).await;
    }
    let src_loc = ImageLocation::parse_explicit(&a.src)?;
    let dst_loc = ImageLocation::parse_explicit(&a.dst)?;
    let any_registry = [&src_loc, &dst_loc]
        .iter()
        .any(|l| matches!(l, ImageLocation::Registry(_)));
    if !any_registry && (a.plain_http || a.hosts_dir.is_some()) {
        bail!(
            "--plain-http/--hosts-dir only apply to {REGISTRY_PREFIX} images. {}",
            registry_hint()
        );
    }
    let dst_tag = match &dst_loc {
        ImageLocation::Layout { tag, .. } => tag.clone(),
        ImageLocation::Registry(r) => {
            if r.digest.is_some() {
                bail!("destination {} must be a tag, not a digest", a.dst);
            }
            r.tag.clone().unwrap_or_else(|| "latest".into())
        }
        ImageLocation::Containerd { name } => {
            verify_dst_name(name)?;
            name.clone()
        }
    };
    let uses_ctd = [&src_loc, &dst_loc]
        .iter()
        .any(|l| matches!(l, ImageLocation::Containerd { .. }));
    let mut ctd = None;
    if uses_ctd {
        let mut c = artifacts::connect(g).await?;
        c.begin().await?;
        ctd = Some(Arc::new(c));
    }
    if let ImageLocation::Containerd { name } = &src_loc {
        let c = ctd.as_ref().context("containerd connection")?;
        if c.image_target(name).await?.is_none() {
            bail!(
                "image {name:?} not found in containerd namespace {:?} (address {}). {}",
                g.namespace,
                g.address,
                registry_hint()
            );
        }
    }
    let client = registry.client()?;
    let src = ImageStore::open(&src_loc, client.clone(), ctd.clone())?;
    let dst = ImageStore::open(&dst_loc, client, ctd.clone())?;
    let mut db = None;
    if matches!(dst_loc, ImageLocation::Containerd { .. }) {
        let d = soci_index::ArtifactsDb::open(&g.root)?;
        opts.existing_ztocs = artifacts::existing_ztocs(&d, &artifacts::location_of(&dst));
        db = Some(d);
    }
    let result = run(&a, &src, &src_loc, &dst, &dst_tag, &opts).await;
    if let (Ok(report), Some(db)) = (&result, db.as_mut()) {
        artifacts::record_v2(db, &dst, report).await?;
        db.save()?;
    }
    if let Some(c) = ctd {
        // The image record now references everything through GC labels.
        let mut c = Arc::try_unwrap(c).unwrap_or_else(|a| (*a).clone());
        c.end().await?;
    }
    let report = result?;
    println!("{}", report.index);
    Ok(())
}

async fn run(
    a: &ConvertArgs,
    src: &ImageStore,
    src_loc: &ImageLocation,
    dst: &ImageStore,
    dst_tag: &str,
    opts: &ConvertOptions,
) -> Result<soci_index::ConvertReport> {
    let tty = std::io::stderr().is_terminal();
    let progress = move |line: &str| {
        if tty {
            eprintln!("{line}");
        }
    };
    let report = convert_image(src, &src_loc.object(), dst, dst_tag, opts, &progress)
        .await
        .with_context(|| format!("converting {} to {}", a.src, a.dst))?;
    for p in &report.platforms {
        for (layer, why) in &p.skipped {
            eprintln!("{}: layer {layer} skipped: {why}", p.platform);
        }
        let idx = p
            .soci_index
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_else(|| "none".into());
        eprintln!(
            "{}: manifest {} soci index {idx} ({} zTOCs)",
            p.platform, p.manifest, p.ztocs
        );
    }
    Ok(report)
}

/// `--standalone`: OCI layout (dir or tar) in, OCI layout (dir, or tar with oci-archive) out.
async fn standalone(a: &ConvertArgs, opts: &ConvertOptions, registry: &RegistryArgs) -> Result<()> {
    let work = tempfile::tempdir().context("temp dir")?;
    let src_path = Path::new(&a.src);
    let src_dir = if src_path.is_dir() {
        src_path.to_path_buf()
    } else {
        let d = work.path().join("in");
        let f = std::fs::File::open(src_path)
            .with_context(|| format!("opening OCI archive {}", src_path.display()))?;
        tar::Archive::new(f)
            .unpack(&d)
            .with_context(|| format!("unpacking OCI archive {}", src_path.display()))?;
        d
    };
    let index: soci_registry::ImageIndex = serde_json::from_slice(
        &std::fs::read(src_dir.join("index.json"))
            .with_context(|| format!("{}: not an OCI image layout", a.src))?,
    )
    .with_context(|| format!("{}/index.json", a.src))?;
    let root = match index.manifests.as_slice() {
        [one] => one.clone(),
        [] => bail!("{}: index.json lists no image", a.src),
        _ => bail!(
            "{}: index.json lists {} images; standalone conversion takes a layout with one image",
            a.src,
            index.manifests.len()
        ),
    };
    let out_dir = if a.format == "oci-dir" {
        PathBuf::from(&a.dst)
    } else {
        work.path().join("out")
    };
    let tag = root
        .annotations
        .get("org.opencontainers.image.ref.name")
        .cloned()
        .unwrap_or_else(|| "latest".into());
    let client = registry.client()?;
    let src = ImageStore::open(
        &ImageLocation::Layout {
            dir: src_dir.clone(),
            tag: tag.clone(),
        },
        client.clone(),
        None,
    )?;
    let dst = ImageStore::open(
        &ImageLocation::Layout {
            dir: out_dir.clone(),
            tag: tag.clone(),
        },
        client,
        None,
    )?;
    // Blobs of unconverted platforms are copied too: the output is a complete layout.
    let tty = std::io::stderr().is_terminal();
    let progress = move |line: &str| {
        if tty {
            eprintln!("{line}");
        }
    };
    let report = convert_image(&src, root.digest.as_str(), &dst, &tag, opts, &progress)
        .await
        .with_context(|| format!("converting {} to {}", a.src, a.dst))?;
    if a.format == "oci-archive" {
        let f = std::fs::File::create(&a.dst)
            .with_context(|| format!("creating OCI archive {}", a.dst))?;
        let mut b = tar::Builder::new(f);
        b.append_dir_all(".", &out_dir)
            .with_context(|| format!("writing OCI archive {}", a.dst))?;
        b.finish()
            .with_context(|| format!("writing OCI archive {}", a.dst))?;
    }
    println!("{}", report.index);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_must_be_tagged() {
        assert!(verify_dst_name("127.0.0.1:5000/cli/app:soci").is_ok());
        assert!(verify_dst_name("docker.io/library/busybox:latest").is_ok());
        assert!(verify_dst_name("127.0.0.1:5000/cli/app").is_err());
        assert!(verify_dst_name("app@sha256:abc").is_err());
    }

    #[test]
    fn spellings() {
        assert!(matches!(
            ImageLocation::parse_explicit("127.0.0.1:5000/a:b").unwrap(),
            ImageLocation::Containerd { .. }
        ));
        assert!(matches!(
            ImageLocation::parse_explicit("docker://127.0.0.1:5000/a:b").unwrap(),
            ImageLocation::Registry(_)
        ));
        assert!(matches!(
            ImageLocation::parse_explicit("oci:/tmp/x:v").unwrap(),
            ImageLocation::Layout { .. }
        ));
        assert!(ImageLocation::parse_explicit("https://x/a:b").is_err());
        assert!(registry_hint().contains("docker://"));
    }
}

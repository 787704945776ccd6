//! `soci ztoc list|info|get-file` by digest over the local artifacts database and content
//! store, with upstream's output shapes.

use std::fs::File;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use soci_index::{ArtifactKind, ArtifactsDb, ImageStore, SociIndex};
use soci_registry::{Descriptor, Digest};
use soci_ztoc::Ztoc;

use crate::artifacts::{connect, local_store, platform_manifests};
use crate::local_cmd::print_table;
use crate::Globals;

async fn load(
    g: &Globals,
    d: &Digest,
) -> Result<(Ztoc, u64, Option<Arc<soci_index::containerd::Containerd>>)> {
    let db = ArtifactsDb::open(&g.root)?;
    let e = db
        .get(d.as_str())
        .ok_or_else(|| anyhow!("{d}: not in the artifacts database (try `soci rebuild-db`)"))?;
    if e.kind == ArtifactKind::Index {
        bail!("the provided digest belongs to a SOCI index. Use `soci index info` to get the detailed information about it");
    }
    let store = local_store(g, None).await?;
    let bytes = store
        .get_blob(&Descriptor::new("", d.clone(), e.size))
        .await?;
    let z = Ztoc::from_bytes(&bytes).with_context(|| format!("parsing zTOC {d}"))?;
    let ctd = match &store {
        ImageStore::Containerd(c) => Some(c.clone()),
        _ => None,
    };
    Ok((z, e.size, ctd))
}

/// Upstream's `ztoc info` JSON.
pub async fn info(g: &Globals, d: &Digest) -> Result<()> {
    let (z, size, _) = load(g, d).await?;
    let spans = z.spans()?;
    let span_size = match spans.len() {
        0 => 0,
        _ => {
            let s = spans.span(0)?;
            s.uncompressed.end - s.uncompressed.start
        }
    };
    let mut multi = 0;
    let files: Vec<_> = z
        .entries
        .iter()
        .map(|e| {
            let r = spans.spans_for(&(e.offset..e.offset + e.size.max(1)));
            let (start, end) = (r.start, r.end.saturating_sub(1).max(r.start));
            if start != end {
                multi += 1;
            }
            json!({
                "filename": String::from_utf8_lossy(&e.name),
                "offset": e.offset,
                "size": e.size,
                "type": e.kind.as_str(),
                "start_span": start,
                "end_span": end,
            })
        })
        .collect();
    let out = json!({
        "version": z.version,
        "build_tool": z.build_tool_identifier,
        "size": size,
        "span_size": span_size,
        "num_spans": spans.len(),
        "num_files": z.entries.len(),
        "num_multi_span_files": multi,
        "files": files,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The zTOC and its layer (copied from containerd's content store to a temp file).
pub async fn open_for_get_file(g: &Globals, d: &Digest) -> Result<(Ztoc, File, String)> {
    let (z, _, ctd) = load(g, d).await?;
    let db = ArtifactsDb::open(&g.root)?;
    let layer = db
        .get(d.as_str())
        .and_then(|e| Digest::parse(&e.original_digest))
        .ok_or_else(|| anyhow!("zTOC {d}: the artifacts database does not name its layer"))?;
    let c = match ctd {
        Some(c) => c,
        None => Arc::new(connect(g).await?),
    };
    let tmp = tempfile::NamedTempFile::new().context("temp file")?;
    c.read_to_file(&layer, tmp.path()).await.with_context(|| {
        format!(
            "layer {layer} of zTOC {d} (is the image pulled into namespace {:?}?)",
            g.namespace
        )
    })?;
    let f = tmp.reopen().context("temp file")?;
    Ok((z, f, d.to_string()))
}

pub async fn list(
    g: &Globals,
    ztoc_digest: Option<String>,
    image_ref: Option<String>,
    quiet: bool,
) -> Result<()> {
    let db = ArtifactsDb::open(&g.root)?;
    let mut rows: Vec<_> = match &image_ref {
        None => db
            .ztocs()
            .filter(|e| ztoc_digest.as_deref().is_none_or(|z| z == e.digest))
            .cloned()
            .collect(),
        Some(name) => {
            let c = Arc::new(connect(g).await?);
            let target = c.image_target(name).await?.ok_or_else(|| {
                anyhow!(
                    "image {name:?} not found in containerd namespace {:?}",
                    g.namespace
                )
            })?;
            let store = ImageStore::Containerd(c.clone());
            let local = local_store(g, Some(c)).await?;
            let manifests: Vec<String> = platform_manifests(&store, &target, &[], true)
                .await?
                .into_iter()
                .map(|(_, d)| d.digest.to_string())
                .collect();
            let mut out = Vec::new();
            for idx in db
                .indexes()
                .filter(|i| manifests.contains(&i.original_digest))
            {
                let Some(d) = Digest::parse(&idx.digest) else {
                    continue;
                };
                let Ok((_, bytes)) = local.get_manifest(d.as_str()).await else {
                    continue;
                };
                let Ok(si) = SociIndex::parse(&bytes) else {
                    continue;
                };
                for z in si.ztocs {
                    let e = db.get(z.digest.as_str()).ok_or_else(|| {
                        anyhow!("failed to get ztoc {} from artifacts store (try running \"soci rebuild-db\" first)", z.digest)
                    })?;
                    if ztoc_digest.as_deref().is_none_or(|x| x == e.digest) && !out.contains(e) {
                        out.push(e.clone());
                    }
                }
            }
            if ztoc_digest.is_some() && out.is_empty() {
                bail!("the specified ztoc doesn't exist or is not associated with the specified image");
            }
            out
        }
    };
    rows.dedup_by(|a, b| a.digest == b.digest);
    let mut out = std::io::stdout().lock();
    if quiet {
        for r in &rows {
            use std::io::Write;
            writeln!(out, "{}", r.digest)?;
        }
        return Ok(());
    }
    let mut table = vec![["DIGEST".to_string(), "SIZE".into(), "LAYER DIGEST".into()]];
    for r in rows {
        table.push([r.digest, r.size.to_string(), r.original_digest]);
    }
    print_table(&mut out, &table)
}

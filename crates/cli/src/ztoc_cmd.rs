//! `soci ztoc list|info|get-file` (upstream: by digest over the local store) and our file
//! modes (`build`, `info FILE`, `get-file --layer LAYER FILE PATH`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;
use soci_registry::Digest;
use soci_ztoc::{build, BuildOptions, CompressionAlgorithm, Ztoc, DEFAULT_SPAN_SIZE};

use crate::Globals;

/// Largest zTOC file accepted (zTOCs of very large layers are tens of MiB).
const MAX_ZTOC_BYTES: u64 = 1 << 30;

#[derive(Subcommand)]
pub enum ZtocCommand {
    /// Build the zTOC of a layer blob (gzip or uncompressed tar) into a file.
    Build {
        /// Layer blob.
        layer: PathBuf,
        /// Output zTOC file.
        #[arg(short, long)]
        output: PathBuf,
        /// Span size in uncompressed bytes.
        #[arg(long, default_value_t = DEFAULT_SPAN_SIZE)]
        span_size: u64,
    },
    /// List the zTOCs of the local store.
    #[command(alias = "ls")]
    List {
        /// Only this zTOC.
        #[arg(long)]
        ztoc_digest: Option<String>,
        /// Only zTOCs of this image (name in containerd).
        #[arg(long)]
        image_ref: Option<String>,
        /// Only display the digests.
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Detailed info about a zTOC: by digest from the local store (upstream's JSON), or a
    /// zTOC file (header, spans, entries).
    Info {
        /// zTOC digest (local store) or zTOC file.
        ztoc: String,
        /// File mode: print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Extract one file through a zTOC: by digest (the layer is read from containerd's content
    /// store, as upstream), or with --layer from a local layer blob and a zTOC file.
    GetFile {
        /// File mode: the layer blob the zTOC file was built from.
        #[arg(long)]
        layer: Option<PathBuf>,
        /// zTOC digest, or with --layer a zTOC file.
        ztoc: String,
        /// Path inside the layer.
        path: String,
        /// Write here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

pub async fn run(cmd: ZtocCommand, g: &Globals) -> Result<()> {
    match cmd {
        ZtocCommand::Build {
            layer,
            output,
            span_size,
        } => {
            let f =
                File::open(&layer).with_context(|| format!("opening layer {}", layer.display()))?;
            let opts = BuildOptions {
                span_size,
                ..Default::default()
            };
            let z =
                build(f, &opts).with_context(|| format!("building zTOC of {}", layer.display()))?;
            let bytes = z.to_bytes();
            std::fs::write(&output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "zTOC of {}: {} entries, {} spans, {} bytes -> {}",
                layer.display(),
                z.entries.len(),
                z.span_count(),
                bytes.len(),
                output.display()
            );
            Ok(())
        }
        ZtocCommand::List {
            ztoc_digest,
            image_ref,
            quiet,
        } => crate::ztoc_local::list(g, ztoc_digest, image_ref, quiet).await,
        ZtocCommand::Info { ztoc, json } => match Digest::parse(&ztoc) {
            Some(d) => crate::ztoc_local::info(g, &d).await,
            None => {
                let path = PathBuf::from(&ztoc);
                if !path.exists() {
                    bail!("{ztoc:?} is neither a zTOC digest (sha256:...) nor a zTOC file");
                }
                let z = load(&path)?;
                print_info(&z, json)
            }
        },
        ZtocCommand::GetFile {
            layer,
            ztoc,
            path,
            output,
        } => {
            let (z, mut src, what): (Ztoc, File, String) = match layer {
                Some(layer) => {
                    let zp = PathBuf::from(&ztoc);
                    let z = load(&zp)?;
                    let src = File::open(&layer)
                        .with_context(|| format!("opening layer {}", layer.display()))?;
                    (z, src, zp.display().to_string())
                }
                None => {
                    let d = Digest::parse(&ztoc).ok_or_else(|| {
                        anyhow::anyhow!(
                            "{ztoc:?} is not a zTOC digest: `soci ztoc get-file DIGEST FILE` reads the local store; \
                             for a zTOC file pass the layer blob with --layer"
                        )
                    })?;
                    crate::ztoc_local::open_for_get_file(g, &d).await?
                }
            };
            let spans = z.spans().with_context(|| format!("zTOC {what}"))?;
            let data = z
                .read_file(&spans, &mut src, path.as_bytes())
                .with_context(|| format!("extracting {path} with zTOC {what}"))?;
            match output {
                Some(o) => {
                    std::fs::write(&o, &data).with_context(|| format!("writing {}", o.display()))?
                }
                None => std::io::stdout().lock().write_all(&data)?,
            }
            Ok(())
        }
    }
}

fn load(path: &std::path::Path) -> Result<Ztoc> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_ZTOC_BYTES {
        bail!(
            "zTOC {} is {len} bytes, larger than the {MAX_ZTOC_BYTES}-byte limit",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ztoc::from_bytes(&bytes).with_context(|| format!("parsing zTOC {}", path.display()))
}

fn print_info(z: &Ztoc, as_json: bool) -> Result<()> {
    let spans = z.spans()?;
    let span_list: Vec<_> = (0..spans.len())
        .map(|i| {
            let s = spans.span(i)?;
            Ok(json!({
                "span_id": i,
                "digest": z.compression.span_digests[i].to_string(),
                "compressed_start": s.compressed.start,
                "compressed_end": s.compressed.end,
                "uncompressed_start": s.uncompressed.start,
                "uncompressed_end": s.uncompressed.end,
            }))
        })
        .collect::<Result<_>>()?;
    let entries: Vec<_> = z
        .entries
        .iter()
        .map(|e| {
            json!({
                "filename": String::from_utf8_lossy(&e.name),
                "type": e.kind.as_str(),
                "offset": e.offset,
                "size": e.size,
                "linkname": String::from_utf8_lossy(&e.linkname),
                "mode": e.mode,
                "uid": e.uid,
                "gid": e.gid,
                "mod_time": e.mod_time,
            })
        })
        .collect();
    let info = json!({
        "version": z.version,
        "build_tool": z.build_tool_identifier,
        "compression_algorithm": z.compression.algorithm.as_str(),
        "compressed_archive_size": z.compressed_archive_size,
        "uncompressed_archive_size": z.uncompressed_archive_size,
        "max_span_id": z.compression.max_span_id,
        "span_size": match z.compression.algorithm {
            CompressionAlgorithm::Gzip => soci_ztoc::GzipCheckpoints::parse(z.compression.checkpoints.clone())?.span_size(),
            CompressionAlgorithm::Uncompressed => spans.span(0).map(|s| (s.uncompressed.end - s.uncompressed.start) as i64).unwrap_or(0),
        },
        "num_entries": z.entries.len(),
        "spans": span_list,
        "files": entries,
    });
    let mut out = BufWriter::new(std::io::stdout().lock());
    if as_json {
        serde_json::to_writer_pretty(&mut out, &info)?;
        writeln!(out)?;
    } else {
        writeln!(out, "version:                   {}", z.version)?;
        writeln!(
            out,
            "build tool:                {}",
            z.build_tool_identifier
        )?;
        writeln!(
            out,
            "compression:               {}",
            z.compression.algorithm.as_str()
        )?;
        writeln!(
            out,
            "compressed archive size:   {}",
            z.compressed_archive_size
        )?;
        writeln!(
            out,
            "uncompressed archive size: {}",
            z.uncompressed_archive_size
        )?;
        writeln!(out, "spans:                     {}", spans.len())?;
        writeln!(out, "entries:                   {}", z.entries.len())?;
        for e in &z.entries {
            writeln!(
                out,
                "{:>8} {:>12} {:o} {}",
                e.kind.as_str(),
                e.size,
                e.mode,
                String::from_utf8_lossy(&e.name)
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

//! `soci prefetch record`: prefetch recorded from a real run (stargz's "optimize" without
//! rewriting a layer).
//!
//! The image is pulled lazily into a scratch containerd namespace of its own, so every
//! indexed layer is mounted afresh (new snapshots, empty span caches, no kernel page cache):
//! the recording sees the container's real first reads whatever the user's namespaces hold.
//! The container runs once (`ctr run`), until it exits or `--run-timeout` (then it is
//! killed). The daemon keeps, per lazy layer, the spans its FUSE reads touched in first-access
//! order (`<daemon root>/record/<snapshot>.json`); those of this pull become the prefetch
//! artifacts of a new SOCI index v2 (same zTOCs), bound to the image as `soci convert` binds.
//! The scratch namespace is removed afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use soci_index::prefetch::PrefetchArtifact;
use soci_index::record::{bound_image, rebind, recorded_artifact, RecordFile, RECORD_DIR};
use soci_index::{ImageLocation, ImageStore};
use soci_registry::{Digest, Platform};

use crate::{artifacts, Globals, RegistryArgs};

/// How long the scratch namespace's clean-up commands may take, each.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the killed container's `ctr run` gets to exit.
const KILL_GRACE: Duration = Duration::from_secs(30);

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
        let artifacts = artifacts_of(&store, &img, &records).await?;
        let report = rebind(&store, img, &artifacts, &dst_tag).await?;
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

/// The `ctr run` of the recording.
struct RunSpec<'a> {
    ctr: &'a Path,
    address: &'a str,
    ns: &'a str,
    snapshotter: &'a str,
    image: &'a str,
    ctr_args: &'a [String],
    args: &'a [String],
    timeout: Duration,
}

impl RunSpec<'_> {
    fn ctr(&self) -> Command {
        let mut c = Command::new(self.ctr);
        c.args(["-a", self.address, "-n", self.ns]);
        c
    }
}

/// Pulls lazily into the scratch namespace, runs the container, reads the records of this
/// pull, and removes the namespace (whatever happened).
fn run_and_collect(
    run: &RunSpec<'_>,
    registry: &RegistryArgs,
    record_dir: &Path,
    started: u64,
    manifest: &str,
    indexed: &[String],
    g: &Globals,
) -> Result<Vec<(PathBuf, RecordFile)>> {
    let namespaces = run_bounded(
        Command::new(run.ctr).args(["-a", run.address, "namespaces", "ls", "-q"]),
        CLEANUP_TIMEOUT,
    )?;
    if namespaces.lines().any(|l| l.trim() == run.ns) {
        bail!(
            "containerd namespace {:?} exists: the recording needs a namespace of its own (--scratch-namespace)",
            run.ns
        );
    }
    // containerd shares a committed layer snapshot between namespaces: a layer the daemon
    // serves already would not be mounted afresh, and its reads would be missed.
    let layers: BTreeSet<&str> = indexed.iter().map(String::as_str).collect();
    let warm: Vec<(PathBuf, RecordFile)> = read_records(record_dir, 0)?
        .into_iter()
        .filter(|(_, r)| layers.contains(r.layer.as_str()))
        .collect();
    if let Some((p, r)) = warm.first() {
        bail!(
            "layer {} of {} is already mounted by the soci snapshotter (pulled as {}; {}): a recording needs \
             cold mounts. Remove the image from every containerd namespace that pulled it with the soci \
             snapshotter (`ctr -n NAMESPACE images rm --sync {}`), then record again",
            r.layer,
            run.image,
            r.image,
            p.display(),
            r.image
        );
    }
    let r = pull_run_read(run, registry, record_dir, started, g);
    cleanup(run);
    let records = r?;
    // The records of this pull, for this image manifest (the registry's must be the store's).
    let mine: Vec<(PathBuf, RecordFile)> = records
        .into_iter()
        .filter(|(_, r)| r.manifest == manifest)
        .collect();
    if mine.is_empty() {
        bail!(
            "the daemon recorded no lazily mounted layer of {} manifest {manifest} (records in {}): \
             is the daemon's root there (--daemon-root), is the registry's image the one in the store \
             (push it first), and is its SOCI index usable for a lazy pull?",
            run.image,
            record_dir.display()
        );
    }
    Ok(mine)
}

fn pull_run_read(
    run: &RunSpec<'_>,
    registry: &RegistryArgs,
    record_dir: &Path,
    started: u64,
    g: &Globals,
) -> Result<Vec<(PathBuf, RecordFile)>> {
    let exe = std::env::current_exe().context("finding the soci executable")?;
    let mut pull = Command::new(exe);
    pull.args(["-a", run.address, "-n", run.ns, "image", "rpull"]);
    pull.args(["--snapshotter", run.snapshotter]);
    if registry.plain_http {
        pull.arg("--plain-http");
    }
    pull.arg("--hosts-dir").arg(&registry.hosts_dir);
    pull.arg(run.image);
    let _ = g;
    let mode = run_bounded(&mut pull, run.timeout.max(CLEANUP_TIMEOUT))
        .with_context(|| format!("lazy pull of {} into namespace {}", run.image, run.ns))?;
    eprint!("{mode}");

    let mut c = run.ctr();
    c.args(["run", "--rm", "--snapshotter", run.snapshotter]);
    c.args(run.ctr_args);
    c.args([run.image, run.ns]);
    c.args(run.args);
    // The container's output goes to stderr: stdout carries the new index digest only.
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("running {}", run.ctr.display()))?;
    let mut out = child.stdout.take().context("container stdout")?;
    let copier = std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::stderr());
    });
    let deadline = std::time::Instant::now() + run.timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if std::time::Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    match status {
        Some(s) if s.success() => {}
        Some(s) => {
            eprintln!("soci: the container exited with {s}; its reads are recorded all the same")
        }
        None => {
            eprintln!(
                "soci: the container ran longer than {:?} (--run-timeout): killed; its reads so far are recorded",
                run.timeout
            );
            let _ = run_bounded(
                run.ctr().args(["task", "kill", "-s", "SIGKILL", run.ns]),
                CLEANUP_TIMEOUT,
            );
            let until = std::time::Instant::now() + KILL_GRACE;
            while child.try_wait()?.is_none() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait()?.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let _ = copier.join();
    std::io::stderr().flush().ok();
    read_records(record_dir, started)
}

/// Record files of layers mounted since `started` (ms since the epoch).
fn read_records(dir: &Path, started: u64) -> Result<Vec<(PathBuf, RecordFile)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in entries {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let meta = std::fs::metadata(&p)?;
        if meta.len() > soci_index::record::MAX_RECORD_BYTES {
            bail!(
                "demand record {}: {} bytes, limit {}",
                p.display(),
                meta.len(),
                soci_index::record::MAX_RECORD_BYTES
            );
        }
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        // Only the header is needed to filter; a record of this run must parse in full.
        #[derive(serde::Deserialize)]
        struct Header {
            mounted_unix_ms: u64,
        }
        match serde_json::from_slice::<Header>(&bytes) {
            Ok(h) if h.mounted_unix_ms < started => continue,
            _ => {}
        }
        let r = RecordFile::parse(&bytes, &p.display().to_string())?;
        out.push((p, r));
    }
    Ok(out)
}

/// Removes what the recording put in the scratch namespace, then the namespace; best effort.
fn cleanup(run: &RunSpec<'_>) {
    let steps: [&[&str]; 3] = [
        &["containers", "rm", run.ns],
        &["images", "rm", "--sync", run.image],
        &["namespaces", "rm", run.ns],
    ];
    for s in steps {
        if let Err(e) = run_bounded(run.ctr().args(s), CLEANUP_TIMEOUT) {
            if s[0] == "namespaces" {
                eprintln!(
                    "soci: removing scratch namespace {}: {e:#} (remove it with `ctr -n {} ...`)",
                    run.ns, run.ns
                );
            }
        }
    }
}

/// Runs a command to completion within `timeout`; its stdout, or an error with its stderr.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let (mut so, mut se) = (
        child.stdout.take().context("stdout")?,
        child.stderr.take().context("stderr")?,
    );
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut so, &mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut se, &mut s);
        s
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what}: no answer within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (t1.join().unwrap_or_default(), t2.join().unwrap_or_default());
    if !status.success() {
        bail!("{what}: {status}: {}", err.trim());
    }
    Ok(out)
}

/// Checks each record against the image's SOCI index and zTOCs and makes the artifacts.
async fn artifacts_of(
    store: &ImageStore,
    img: &soci_index::record::BoundImage,
    records: &[(PathBuf, RecordFile)],
) -> Result<BTreeMap<Digest, PrefetchArtifact>> {
    let mut by_layer: BTreeMap<String, &(PathBuf, RecordFile)> = BTreeMap::new();
    for rec in records {
        if let Some(prev) = by_layer.insert(rec.1.layer.clone(), rec) {
            bail!(
                "two records of layer {} since the recording started ({} and {}): another pull of this image ran at the same time; record again",
                rec.1.layer,
                prev.0.display(),
                rec.0.display()
            );
        }
    }
    let mut out = BTreeMap::new();
    let mut any = false;
    for layer in &img.manifest.layers {
        let Some(z) = img.soci.ztoc_for(&layer.digest) else {
            continue;
        };
        let Some((path, rec)) = by_layer.get(layer.digest.as_str()).copied() else {
            eprintln!(
                "soci: layer {}: not mounted lazily afresh in the recording run (pulled in full, or \
                 mounted by another pull meanwhile); no prefetch for it",
                layer.digest
            );
            continue;
        };
        any = true;
        if rec.ztoc != z.digest.as_str() {
            bail!(
                "demand record {}: layer {} was served from zTOC {}, the image's SOCI index has {}: the registry's image differs from {}",
                path.display(),
                layer.digest,
                rec.ztoc,
                z.digest,
                "the one recorded into"
            );
        }
        let bytes = store.get_blob(z).await?;
        let spans = soci_ztoc::Ztoc::from_bytes(&bytes)
            .with_context(|| format!("zTOC {} of layer {}", z.digest, layer.digest))?
            .span_count() as u64;
        if rec.span_count != spans {
            bail!(
                "demand record {}: {} spans, zTOC {} has {spans}",
                path.display(),
                rec.span_count,
                z.digest
            );
        }
        let artifact = recorded_artifact(&rec.spans, layer.digest.as_str())?;
        eprintln!(
            "layer {}: {} of {spans} spans read ({} ranges)",
            layer.digest,
            rec.spans.len(),
            artifact.as_ref().map(|a| a.spans().len()).unwrap_or(0)
        );
        if let Some(a) = artifact {
            out.insert(layer.digest.clone(), a);
        }
    }
    if !any {
        bail!(
            "no indexed layer of the image was recorded: the records found are of another image (is the registry's image the one in the store?)"
        );
    }
    Ok(out)
}

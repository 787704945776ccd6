//! The recording run: a lazy pull into a scratch containerd namespace, one `ctr run`, the
//! daemon's demand records of this pull read back, and the namespace removed.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use soci_index::record::RecordFile;

use crate::{Globals, RegistryArgs};

/// How long the scratch namespace's clean-up commands may take, each.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the killed container's `ctr run` gets to exit.
const KILL_GRACE: Duration = Duration::from_secs(30);

/// The `ctr run` of the recording.
pub(super) struct RunSpec<'a> {
    pub(super) ctr: &'a Path,
    pub(super) address: &'a str,
    pub(super) ns: &'a str,
    pub(super) snapshotter: &'a str,
    pub(super) image: &'a str,
    pub(super) ctr_args: &'a [String],
    pub(super) args: &'a [String],
    pub(super) timeout: Duration,
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
pub(super) fn run_and_collect(
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
        // Records of earlier runs (the warm check, `started` = 0) only matter if usable: one
        // that is gone, too big or malformed is skipped, never a reason to refuse this run.
        let strict = started > 0;
        let meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        if meta.len() > soci_index::record::MAX_RECORD_BYTES {
            if !strict {
                eprintln!(
                    "warning: skipping demand record {}: {} bytes",
                    p.display(),
                    meta.len()
                );
                continue;
            }
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
        let mut r = match RecordFile::parse(&bytes, &p.display().to_string()) {
            Ok(r) => r,
            Err(e) if !strict => {
                eprintln!("warning: skipping demand record: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        // The byte ranges next to it (read now: the file goes with the snapshot).
        let rp = p.with_extension(soci_index::record::RANGES_EXTENSION);
        match std::fs::File::open(&rp) {
            Ok(f) => {
                let mut b = Vec::new();
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(f, soci_index::record::MAX_RECORD_BYTES + 1),
                    &mut b,
                )
                .with_context(|| format!("reading {}", rp.display()))?;
                r.set_ranges(&b, &rp.display().to_string())?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", rp.display())),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unusable_old_record_is_skipped_but_one_of_this_run_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("7.json"),
            b"{\"mounted_unix_ms\": 5, \"junk\"",
        )
        .unwrap();
        std::fs::write(d.path().join("8.json"), b"{ not json").unwrap();
        let old = read_records(d.path(), 0).expect("warm check is not refused");
        assert!(old.is_empty());
        let e = read_records(d.path(), 1).unwrap_err().to_string();
        assert!(e.contains(".json"), "{e}");
    }
}

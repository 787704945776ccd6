//! A layer spooled to a temp file, read by its unpacker while it is still being written.
//!
//! Why: a layer that found no free unpack slot (upstream's default is one per image) is
//! downloaded to a temp file. Unpacking it only after its download ended left the unpack of the
//! biggest layer after the last byte arrived (1.5 s of a 19 s pull of a 408 MiB image); read
//! from the growing file, the unpack starts as soon as a slot frees and finishes about when the
//! download does. The bytes unpacked are the ones the download hashed: the staging directory is
//! used only if the whole blob's digest matched, as when a layer streams into its unpacker.
//!
//! The writer reports progress on a watch channel; the reader, at the file's current end, waits
//! for the next report (bounded: a writer gone without saying the download ended is an error).

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::sync::watch;

/// How far a spooled download got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Bytes are still being written.
    Writing,
    /// Every byte is in the file (flushed) and the blob's digest matched.
    Complete,
    /// The download failed: the file holds a prefix at best.
    Failed,
}

/// Longest wait for a progress report before the reader looks at the file again.
const RECHECK: Duration = Duration::from_millis(250);

/// The write half: a file writer that reports each write, and finally the download's outcome.
pub(crate) struct SpoolWriter<W> {
    inner: W,
    tx: watch::Sender<Progress>,
}

/// Starts a spool over `inner`; the reader follows `Progress` on the returned receiver.
pub(crate) fn spool<W>(inner: W) -> (SpoolWriter<W>, watch::Receiver<Progress>) {
    let (tx, rx) = watch::channel(Progress::Writing);
    (SpoolWriter { inner, tx }, rx)
}

impl<W> SpoolWriter<W> {
    /// Says how the download ended (call after flushing: the reader treats `Complete` as
    /// "every byte is readable").
    pub fn finish(&self, ok: bool) {
        self.tx.send_replace(if ok {
            Progress::Complete
        } else {
            Progress::Failed
        });
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SpoolWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(_)) = r {
            // A tokio file may still hold these bytes; they reach the file before the next
            // write is taken, whose report wakes the reader again (and it rechecks anyway).
            me.tx.send_modify(|_| {});
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            me.tx.send_modify(|_| {});
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The read half, used on a blocking thread: reads the file, and at its end waits for more
/// until the download reports `Complete` (then end of file) or `Failed` (an error).
pub(crate) struct SpoolReader {
    file: std::fs::File,
    rx: watch::Receiver<Progress>,
    rt: tokio::runtime::Handle,
}

impl SpoolReader {
    /// Follows `file` (opened on the spool's temp file) as `rx` reports.
    pub fn new(
        file: std::fs::File,
        rx: watch::Receiver<Progress>,
        rt: tokio::runtime::Handle,
    ) -> SpoolReader {
        SpoolReader { file, rx, rt }
    }
}

impl Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            // The state is read before the file: if the download was complete then, a read of
            // nothing is the real end.
            let state = *self.rx.borrow_and_update();
            if state == Progress::Writing && self.rx.has_changed().is_err() {
                if *self.rx.borrow() != Progress::Writing {
                    continue; // its last word came just now
                }
                // The download was dropped (its Prepare gave up): stop now, not at the end of
                // what it had spooled.
                return Err(std::io::Error::other(
                    "the layer's download stopped without finishing",
                ));
            }
            let n = self.file.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match state {
                Progress::Complete => return Ok(0),
                Progress::Failed => {
                    return Err(std::io::Error::other("the layer's download failed"))
                }
                Progress::Writing => {
                    let rx = &mut self.rx;
                    let changed = self
                        .rt
                        .block_on(async { tokio::time::timeout(RECHECK, rx.changed()).await });
                    if let Ok(Err(_)) = changed {
                        // The writer is gone; its last word decides (it may have said it).
                        if *self.rx.borrow() == Progress::Writing {
                            return Err(std::io::Error::other(
                                "the layer's download stopped without finishing",
                            ));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn read_all(
        path: std::path::PathBuf,
        rx: watch::Receiver<Progress>,
    ) -> std::io::Result<Vec<u8>> {
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut r = SpoolReader::new(std::fs::File::open(path)?, rx, rt);
            let mut out = Vec::new();
            r.read_to_end(&mut out)?;
            Ok(out)
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_follows_the_writer_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let (mut w, rx) = spool(tokio::fs::File::create(&path).await.unwrap());
        let reader = tokio::spawn(read_all(path.clone(), rx));
        let mut want = Vec::new();
        for i in 0..50u8 {
            let chunk = vec![i; 1000 + i as usize * 37];
            w.write_all(&chunk).await.unwrap();
            want.extend_from_slice(&chunk);
            if i % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(
            !reader.is_finished(),
            "the reader waits for the download's end"
        );
        w.flush().await.unwrap();
        w.finish(true);
        let got = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("bounded")
            .unwrap()
            .unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_or_abandoned_download_is_an_error_not_an_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let (mut w, rx) = spool(tokio::fs::File::create(&path).await.unwrap());
        let reader = tokio::spawn(read_all(path.clone(), rx));
        w.write_all(b"some bytes").await.unwrap();
        w.flush().await.unwrap();
        w.finish(false);
        let e = reader.await.unwrap().expect_err("failed download");
        assert!(e.to_string().contains("failed"), "{e}");

        let (mut w, rx) = spool(tokio::fs::File::create(&path).await.unwrap());
        let reader = tokio::spawn(read_all(path.clone(), rx));
        w.write_all(b"some bytes").await.unwrap();
        drop(w);
        let e = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("bounded")
            .unwrap()
            .expect_err("writer gone");
        assert!(e.to_string().contains("without finishing"), "{e}");
    }
}

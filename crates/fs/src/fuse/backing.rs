//! Passthrough backing files written from a mounted layer's verified spans (see
//! [`crate::passthrough`]): on open of a file that became local, and for the whole layer once
//! the background fetch completed it.

use std::sync::Arc;

use super::LayerFs;
use crate::tree::NodeKind;

impl LayerFs {
    /// Starts writing the backing file of regular file `ino` if all its spans are local and
    /// it has none yet.
    pub(super) fn materialize_if_local(&self, ino: u64) {
        let (Some(p), Some(n)) = (&self.passthrough, self.tree.get(ino)) else {
            return;
        };
        if n.kind != NodeKind::File {
            return;
        }
        let extent = (n.offset, n.size);
        if p.claim(extent, || self.spans.is_local(n.offset..n.offset + n.size)) {
            self.rt.spawn(p.clone().write(self.spans.clone(), extent));
        }
    }

    /// Writes backing files for every regular file whose spans are all local (after the
    /// background fetch completed the layer), one at a time.
    pub async fn materialize_local_files(self: Arc<Self>) {
        let Some(p) = &self.passthrough else { return };
        for ino in 1..=self.tree.len() as u64 {
            let Some(n) = self.tree.get(ino) else {
                continue;
            };
            if n.kind != NodeKind::File {
                continue;
            }
            let extent = (n.offset, n.size);
            if p.claim(extent, || self.spans.is_local(n.offset..n.offset + n.size)) {
                p.clone().write(self.spans.clone(), extent).await;
            }
        }
    }
}

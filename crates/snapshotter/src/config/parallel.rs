//! `[pull_modes.parallel_pull_unpack]`: upstream's parallel pull mode keys, with upstream's
//! meanings and defaults (upstream `config/parallel.go`, `docs/parallel-mode.md`), and
//! upstream's size strings for `concurrent_download_chunk_size`.

use serde::{Deserialize, Serialize};

/// `[pull_modes.parallel_pull_unpack]`: upstream's keys, meanings and defaults (upstream
/// `config/parallel.go`, `docs/parallel-mode.md`); a negative limit means unbounded.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ParallelPullUnpack {
    /// Lazy loading off: every layer of every image is downloaded and unpacked by the daemon
    /// up front, in parallel (within the limits below). Default false.
    pub enable: bool,
    /// Images without a usable SOCI index (lazy loading on) are pulled by the daemon with
    /// this mode's parallel download and unpack instead of one layer at a time. Ignored when
    /// `enable` is true. Default true in soci-rs (upstream: false, where containerd then pulls
    /// the image itself; soci-rs always pulls such layers itself, one at a time when false).
    pub experimental_parallel_pull_as_fallback: bool,
    /// HTTP requests for layer blobs at once, all images. Default -1 (unbounded).
    pub max_concurrent_downloads: i64,
    /// HTTP requests for layer blobs at once, per image. Default 3.
    pub max_concurrent_downloads_per_image: i64,
    /// Bytes per range request when a layer is fetched as several parallel range requests
    /// (`"8mb"`, `"512kb"`, `"1gb"`, a number of bytes); empty or 0: one request per layer.
    /// Default empty.
    pub concurrent_download_chunk_size: String,
    /// Layers being unpacked at once, all images. Default -1 (unbounded).
    pub max_concurrent_unpacks: i64,
    /// Layers being unpacked at once, per image. Default 1.
    pub max_concurrent_unpacks_per_image: i64,
    /// As upstream: false writes each layer blob the daemon downloads (this mode, and the
    /// fallback full pull) into containerd's content store (`[content_store]
    /// containerd_address`, the pull's namespace) while unpacking it, so the image can be
    /// exported and pushed; true keeps only the unpacked layer. Default false.
    pub discard_unpacked_layers: bool,
}

impl Default for ParallelPullUnpack {
    fn default() -> Self {
        ParallelPullUnpack {
            enable: false,
            experimental_parallel_pull_as_fallback: true,
            max_concurrent_downloads: -1,
            max_concurrent_downloads_per_image: 3,
            concurrent_download_chunk_size: String::new(),
            max_concurrent_unpacks: -1,
            max_concurrent_unpacks_per_image: 1,
            discard_unpacked_layers: false,
        }
    }
}

impl ParallelPullUnpack {
    /// `concurrent_download_chunk_size` in bytes; 0 means one request per layer. Upstream's
    /// grammar: a number with an optional `b`, `kb`, `mb` or `gb` (powers of 1024, any case).
    pub fn chunk_size(&self) -> Result<u64, String> {
        parse_size(&self.concurrent_download_chunk_size)
    }
}

/// Upstream's size strings (`config/parallel.go` `parseSize`): empty or zero means unset.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    if t.is_empty() {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let mult: f64 = match unit {
        "" | "b" => 1.0,
        "kb" => 1024.0,
        "mb" => 1024.0 * 1024.0,
        "gb" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("invalid size format: {text:?}")),
    };
    let valid_num = !num.is_empty()
        && !num.starts_with('.')
        && !num.ends_with('.')
        && num.matches('.').count() <= 1;
    let n: f64 = num
        .parse()
        .ok()
        .filter(|_| valid_num)
        .ok_or_else(|| format!("invalid size format: {text:?}"))?;
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_size_strings() {
        for (text, want) in [
            ("", 0),
            ("0", 0),
            ("8mb", 8 << 20),
            ("16MB", 16 << 20),
            (" 512 kb ", 512 << 10),
            ("1.5gb", 3 << 29),
            ("4096", 4096),
            ("10b", 10),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text:?}");
        }
        for bad in ["-1", "8tb", "mb", "1..2mb", ".5mb", "x"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}

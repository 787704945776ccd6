//! Credentials the kubelet passed in PullImage, by image, kept in a root-only file.
//!
//! Why a file: upstream keeps them in memory only, so after a daemon restart the lazy layers of
//! running pods can no longer fetch what they have not read yet (the kubelet does not pull an
//! image it already has). Here they survive restarts, within a bounded lifetime (`ttl`), in
//! `<root>/cri-credentials.json` (mode 0600, written whole to a temporary file and renamed).
//! A newer pull of the same image replaces them; RemoveImage, expiry, or the removal of the
//! image's last snapshot drops them. Nothing here logs a secret: `Debug` is redacted.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use soci_registry::auth::{decode_auth, Credentials};
use soci_registry::{CredentialSource, Reference, RegistryError};
use tracing::{info, warn};

use crate::proto::runtime::v1::AuthConfig;

/// File name under the daemon root.
pub const FILE_NAME: &str = "cri-credentials.json";

/// Largest credentials file read at start (a node has at most thousands of images).
const MAX_FILE_BYTES: u64 = 16 << 20;

/// The credentials of one pulled image.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredAuth {
    /// Registry host as the registry client names it (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository name (`library/busybox`).
    pub repository: String,
    /// CRI `AuthConfig` fields.
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    #[allow(missing_docs)]
    pub password: String,
    #[serde(default)]
    #[allow(missing_docs)]
    pub auth: String,
    #[serde(default)]
    #[allow(missing_docs)]
    pub server_address: String,
    #[serde(default)]
    #[allow(missing_docs)]
    pub identity_token: String,
    #[serde(default)]
    #[allow(missing_docs)]
    pub registry_token: String,
    /// When stored (seconds since the epoch); the newest entry for a repository wins.
    pub stored_at: u64,
    /// When dropped (seconds since the epoch).
    pub expires_at: u64,
}

impl std::fmt::Debug for StoredAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StoredAuth({}/{}, user {:?}, <redacted>, expires_at {})",
            self.registry, self.repository, self.username, self.expires_at
        )
    }
}

impl StoredAuth {
    /// The credentials to present, as upstream's `ParseAuth` picks them: username and
    /// password, else identity token, else `auth` (base64 user:password); then the registry
    /// token (which upstream ignores). `None` when the entry's `server_address` names
    /// another host, or it holds nothing.
    fn credentials(&self, registry: &str) -> Result<Option<Credentials>, RegistryError> {
        if !self.server_address.is_empty() && server_host(&self.server_address) != registry {
            return Ok(None);
        }
        if !self.username.is_empty() {
            return Ok(Some(Credentials::password(&self.username, &self.password)));
        }
        if !self.identity_token.is_empty() {
            return Ok(Some(Credentials::password("", &self.identity_token)));
        }
        if !self.auth.is_empty() {
            let what = format!("CRI PullImage auth for {}/{}", registry, self.repository);
            return decode_auth(&self.auth, &what).map(Some);
        }
        if !self.registry_token.is_empty() {
            return Ok(Some(Credentials::registry_token(&self.registry_token)));
        }
        Ok(None)
    }

    fn is_empty(&self) -> bool {
        [
            &self.username,
            &self.password,
            &self.auth,
            &self.identity_token,
            &self.registry_token,
        ]
        .iter()
        .all(|s| s.is_empty())
    }
}

/// Host of a `server_address` (`https://host:port/v1/` or bare `host:port`), with Docker
/// Hub's names mapped to the client's `docker.io`.
fn server_host(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        h => h,
    }
}

/// The image reference as containerd's CRI plugin normalizes it (`docker.io/library/x:latest`),
/// which is also the `containerd.io/snapshot/cri.image-ref` label of its snapshots.
pub fn normalize_image(image: &str) -> Result<(String, Reference), String> {
    let mut r = Reference::parse(image)?;
    if r.tag.is_none() && r.digest.is_none() {
        r.tag = Some("latest".into());
    }
    Ok((r.to_string(), r))
}

#[derive(Serialize, Deserialize, Default)]
struct FileFormat {
    version: u32,
    images: BTreeMap<String, StoredAuth>,
}

/// Credentials from PullImage requests, by normalized image reference.
pub struct CredentialStore {
    path: PathBuf,
    ttl: Duration,
    images: Mutex<BTreeMap<String, StoredAuth>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl CredentialStore {
    /// Opens the store under `root`, dropping expired entries. An unreadable or corrupt file
    /// is set aside (renamed `.bad`) with a warning: the daemon still starts, and images whose
    /// lazy layers needed those credentials fail with an authentication error naming the
    /// registry.
    pub fn open(root: &Path, ttl: Duration) -> CredentialStore {
        let path = root.join(FILE_NAME);
        let images = match Self::read(&path) {
            Ok(f) => f.images,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "CRI credentials file unusable; set aside");
                let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                BTreeMap::new()
            }
        };
        let store = CredentialStore {
            path,
            ttl,
            images: Mutex::new(images),
        };
        let now = now_secs();
        let mut images = store.lock();
        let before = images.len();
        images.retain(|_, a| a.expires_at > now);
        if images.len() != before || store.path.exists() {
            // Rewritten also to reset the file's mode if someone changed it.
            store.persist(&images);
        }
        if !images.is_empty() {
            info!(
                images = images.len(),
                "CRI credentials of earlier pulls restored"
            );
        }
        drop(images);
        store
    }

    fn read(path: &Path) -> Result<FileFormat, String> {
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileFormat::default()),
            Err(e) => return Err(e.to_string()),
        };
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        if len > MAX_FILE_BYTES {
            return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
        }
        serde_json::from_reader(std::io::BufReader::new(f)).map_err(|e| e.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StoredAuth>> {
        self.images.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the whole map: temporary file (0600) in the same directory, fsync, rename.
    /// Failure is logged, not returned: the credentials still work from memory.
    fn persist(&self, images: &BTreeMap<String, StoredAuth>) {
        if let Err(e) = self.try_persist(images) {
            warn!(path = %self.path.display(), error = %e, "cannot save CRI credentials; they will not survive a restart");
        }
    }

    fn try_persist(&self, images: &BTreeMap<String, StoredAuth>) -> std::io::Result<()> {
        let body = serde_json::to_vec(&FileFormat {
            version: 1,
            images: images.clone(),
        })
        .map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&body)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Keeps `auth` for `image` (replacing what an earlier pull left). Returns what it
    /// replaced, for [`Self::restore`] if the pull fails. An empty or absent `auth` removes the
    /// image's entry (the image is public, or its credentials come from elsewhere).
    pub fn remember(
        &self,
        image: &str,
        auth: Option<&AuthConfig>,
    ) -> Result<Option<StoredAuth>, String> {
        let (key, r) = normalize_image(image)?;
        let now = now_secs();
        let entry = auth.map(|a| StoredAuth {
            registry: r.repository.registry.clone(),
            repository: r.repository.name.clone(),
            username: a.username.clone(),
            password: a.password.clone(),
            auth: a.auth.clone(),
            server_address: a.server_address.clone(),
            identity_token: a.identity_token.clone(),
            registry_token: a.registry_token.clone(),
            stored_at: now,
            expires_at: now.saturating_add(self.ttl.as_secs()),
        });
        let mut images = self.lock();
        let old = match entry.filter(|e| !e.is_empty()) {
            Some(e) => images.insert(key, e),
            None => images.remove(&key),
        };
        self.persist(&images);
        Ok(old)
    }

    /// Puts back what [`Self::remember`] replaced for `image` (a pull with new credentials
    /// failed: the credentials that worked stay).
    pub fn restore(&self, image: &str, old: Option<StoredAuth>) {
        let Ok((key, _)) = normalize_image(image) else {
            return;
        };
        let mut images = self.lock();
        match old {
            Some(o) => images.insert(key, o),
            None => images.remove(&key),
        };
        self.persist(&images);
    }

    /// Drops `image`'s credentials (RemoveImage, or its last snapshot removed).
    pub fn forget(&self, image: &str) {
        let Ok((key, _)) = normalize_image(image) else {
            return;
        };
        let mut images = self.lock();
        if images.remove(&key).is_some() {
            self.persist(&images);
            info!(image = %key, "CRI credentials of the image dropped");
        }
    }

    /// The images with credentials (for tests and diagnostics).
    pub fn images(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The file the store is kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl CredentialSource for CredentialStore {
    /// The newest unexpired credentials stored for any image of `repository` on `registry`.
    fn credentials(
        &self,
        registry: &str,
        repository: &str,
    ) -> Result<Option<Credentials>, RegistryError> {
        let now = now_secs();
        let images = self.lock();
        let mut matching: Vec<&StoredAuth> = images
            .values()
            .filter(|a| a.registry == registry && a.repository == repository && a.expires_at > now)
            .collect();
        matching.sort_by_key(|a| std::cmp::Reverse(a.stored_at));
        for a in matching {
            if let Some(c) = a.credentials(registry)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

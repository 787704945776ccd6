//! Where credentials come from, asked again at every authentication.
//!
//! Why: a daemon runs for months. Credentials read once at start go stale: a later
//! `docker login` rewrites `config.json`, credential helpers hand out tokens that expire, and
//! on Kubernetes nodes the credentials of an image arrive only with the kubelet's PullImage
//! (see the snapshotter's CRI keychain). So the client holds a [`Keychain`] of
//! [`CredentialSource`]s and asks it each time a registry challenges it (401, a 403 on an
//! expired token, or a cached token's expiry), never caching credentials itself.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::auth::{docker_config_path, Credentials, DockerConfig};
use crate::error::Result;

/// A source of registry credentials, asked per registry host and repository.
pub trait CredentialSource: Send + Sync {
    /// Credentials for `repository` (e.g. `library/busybox`) on `registry` (host[:port]),
    /// if this source has any.
    fn credentials(&self, registry: &str, repository: &str) -> Result<Option<Credentials>>;
}

impl CredentialSource for DockerConfig {
    fn credentials(&self, registry: &str, _repository: &str) -> Result<Option<Credentials>> {
        DockerConfig::credentials(self, registry)
    }
}

/// Sources asked in order; the first that has credentials wins.
#[derive(Clone, Default)]
pub struct Keychain {
    sources: Vec<Arc<dyn CredentialSource>>,
}

impl Keychain {
    /// An empty keychain (anonymous access only).
    pub fn new() -> Keychain {
        Keychain::default()
    }

    /// The docker config file at its default place ([`docker_config_path`]), read again
    /// whenever it changes.
    pub fn docker_default() -> Keychain {
        Keychain::new().with(Arc::new(DockerConfigFile::default_location()))
    }

    /// Adds a source after the existing ones.
    pub fn with(mut self, source: Arc<dyn CredentialSource>) -> Keychain {
        self.sources.push(source);
        self
    }

    /// Adds a source before the existing ones.
    pub fn with_first(mut self, source: Arc<dyn CredentialSource>) -> Keychain {
        self.sources.insert(0, source);
        self
    }

    /// Credentials from the first source that has some.
    pub fn credentials(&self, registry: &str, repository: &str) -> Result<Option<Credentials>> {
        for s in &self.sources {
            if let Some(c) = s.credentials(registry, repository)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// A docker `config.json` read again when it changes (a stat per lookup; lookups happen only
/// when a registry asks for authentication). Credential helpers it names
/// (`credHelpers`/`credsStore`) run at every lookup, so their fresh tokens are used.
pub struct DockerConfigFile {
    path: Option<PathBuf>,
    loaded: Mutex<(Option<Stamp>, Arc<DockerConfig>)>,
}

impl DockerConfigFile {
    /// The file at [`docker_config_path`] (resolved now: DOCKER_CONFIG, HOME, passwd home).
    pub fn default_location() -> DockerConfigFile {
        DockerConfigFile::at(docker_config_path())
    }

    /// A specific file (`None`: never any credentials).
    pub fn at(path: Option<PathBuf>) -> DockerConfigFile {
        DockerConfigFile {
            path,
            loaded: Mutex::new((None, Arc::new(DockerConfig::default()))),
        }
    }

    /// The file read, or `None`.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn current(&self) -> Result<Arc<DockerConfig>> {
        let Some(path) = &self.path else {
            return Ok(Arc::new(DockerConfig::default()));
        };
        let now = stamp(path);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 != now || now.is_none() {
            let cfg = Arc::new(DockerConfig::load(path)?);
            if now.is_some() {
                tracing::debug!(path = %path.display(), "docker config (re)loaded");
            }
            *loaded = (now, cfg);
        }
        Ok(loaded.1.clone())
    }
}

impl CredentialSource for DockerConfigFile {
    fn credentials(&self, registry: &str, _repository: &str) -> Result<Option<Credentials>> {
        self.current()?.credentials(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_written_or_changed_later_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let kc = Keychain::new().with(Arc::new(DockerConfigFile::at(Some(p.clone()))));
        assert!(kc.credentials("reg.example", "a/b").unwrap().is_none());
        // `docker login` after start.
        std::fs::write(&p, r#"{"auths":{"reg.example":{"auth":"dTE6cDE="}}}"#).unwrap();
        let c = kc.credentials("reg.example", "a/b").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.secret.as_str()), ("u1", "p1"));
        // A second login replaces the file (new inode, as docker writes it).
        let tmp = dir.path().join("config.json.tmp");
        std::fs::write(&tmp, r#"{"auths":{"reg.example":{"auth":"dTI6cDI="}}}"#).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        let c = kc.credentials("reg.example", "a/b").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.secret.as_str()), ("u2", "p2"));
        // Logout.
        std::fs::remove_file(&p).unwrap();
        assert!(kc.credentials("reg.example", "a/b").unwrap().is_none());
    }

    struct Fixed(&'static str);
    impl CredentialSource for Fixed {
        fn credentials(&self, registry: &str, repo: &str) -> Result<Option<Credentials>> {
            Ok((registry == "r" && repo == self.0).then(|| Credentials::password(self.0, "x")))
        }
    }

    #[test]
    fn first_source_with_credentials_wins() {
        let kc = Keychain::new()
            .with(Arc::new(Fixed("a")))
            .with(Arc::new(Fixed("b")));
        assert_eq!(kc.credentials("r", "b").unwrap().unwrap().username, "b");
        assert_eq!(kc.credentials("r", "a").unwrap().unwrap().username, "a");
        assert!(kc.credentials("r", "c").unwrap().is_none());
        let kc = kc.with_first(Arc::new(Fixed("b")));
        assert_eq!(kc.sources.len(), 3);
    }
}

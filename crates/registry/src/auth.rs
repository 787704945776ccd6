//! Credentials (docker config file, credential helpers) and `WWW-Authenticate` challenges.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{RegistryError, Result};

/// Username and secret for one registry. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (empty with an identity token).
    pub username: String,
    /// Password or identity token.
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.username)
    }
}

#[derive(Deserialize, Default)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// Credentials from a docker `config.json`.
#[derive(Default)]
pub struct DockerConfig {
    file: DockerConfigFile,
}

impl DockerConfig {
    /// Loads `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`; missing file = empty.
    pub fn load_default() -> Result<Self> {
        let path = match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => PathBuf::from(d).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".docker/config.json"),
                None => return Ok(DockerConfig::default()),
            },
        };
        Self::load(&path)
    }

    /// Loads a specific file; missing file = empty.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(b) => {
                let file = serde_json::from_slice(&b).map_err(|e| {
                    RegistryError::Config(format!("docker config {}: {e}", path.display()))
                })?;
                Ok(DockerConfig { file })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DockerConfig::default()),
            Err(e) => Err(RegistryError::Io {
                what: format!("reading {}", path.display()),
                source: e,
            }),
        }
    }

    /// Credentials for `registry` (host[:port]), if configured.
    pub fn credentials(&self, registry: &str) -> Result<Option<Credentials>> {
        let keys: Vec<String> = if registry == crate::reference::DOCKER_HUB {
            vec![
                "https://index.docker.io/v1/".into(),
                "index.docker.io".into(),
                "docker.io".into(),
            ]
        } else {
            vec![
                registry.to_string(),
                format!("https://{registry}"),
                format!("http://{registry}"),
            ]
        };
        if let Some(helper) = keys.iter().find_map(|k| self.file.cred_helpers.get(k)) {
            return run_helper(helper, &keys[0]);
        }
        for k in &keys {
            if let Some(e) = self.file.auths.get(k) {
                if let Some(c) = entry_credentials(e, registry)? {
                    return Ok(Some(c));
                }
            }
        }
        match &self.file.creds_store {
            Some(store) => run_helper(store, &keys[0]),
            None => Ok(None),
        }
    }
}

fn entry_credentials(e: &AuthEntry, registry: &str) -> Result<Option<Credentials>> {
    if let Some(t) = &e.identity_token {
        return Ok(Some(Credentials {
            username: String::new(),
            secret: t.clone(),
        }));
    }
    if let Some(a) = &e.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|_| {
                RegistryError::Config(format!("docker config: invalid auth for {registry}"))
            })?;
        let s = String::from_utf8(raw).map_err(|_| {
            RegistryError::Config(format!("docker config: invalid auth for {registry}"))
        })?;
        let (u, p) = s.split_once(':').ok_or_else(|| {
            RegistryError::Config(format!("docker config: invalid auth for {registry}"))
        })?;
        return Ok(Some(Credentials {
            username: u.into(),
            secret: p.into(),
        }));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials {
            username: u.clone(),
            secret: p.clone(),
        })),
        _ => Ok(None),
    }
}

/// Runs `docker-credential-<helper> get` with the server URL on stdin.
fn run_helper(helper: &str, server: &str) -> Result<Option<Credentials>> {
    use std::io::Write;
    if !helper
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
    {
        return Err(RegistryError::Config(format!(
            "invalid credential helper name {helper:?}"
        )));
    }
    let prog = format!("docker-credential-{helper}");
    let mut child = std::process::Command::new(&prog)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| RegistryError::Config(format!("running {prog}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| RegistryError::Config(format!("running {prog}: {e}")))?;
    if !out.status.success() {
        // Helpers exit non-zero when they have no credentials for the server.
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct HelperOut {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let h: HelperOut = serde_json::from_slice(&out.stdout)
        .map_err(|_| RegistryError::Config(format!("{prog} printed invalid JSON")))?;
    let username = if h.username == "<token>" {
        String::new()
    } else {
        h.username
    };
    Ok(Some(Credentials {
        username,
        secret: h.secret,
    }))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `basic` or `bearer` (lower case).
    pub scheme: String,
    /// Parameters (`realm`, `service`, `scope`, ...).
    pub params: BTreeMap<String, String>,
}

/// Parses the first challenge of a `WWW-Authenticate` header.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = match h.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (h, ""),
    };
    let mut params = BTreeMap::new();
    let mut s = rest.trim_start();
    while !s.is_empty() {
        let eq = s.find('=')?;
        let key = s[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        s = &s[eq + 1..];
        let value;
        if let Some(r) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = r.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            s = &r[end?..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = &s[end..];
        }
        params.insert(key, value);
        s = s.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example/token");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
    }

    #[test]
    fn docker_config_entries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"},"other":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        let c = DockerConfig::load(&p).unwrap();
        let cr = c.credentials("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!((cr.username.as_str(), cr.secret.as_str()), ("user", "pass"));
        assert!(!format!("{cr:?}").contains("pass"));
        assert_eq!(c.credentials("other").unwrap().unwrap().secret, "p");
        assert!(c.credentials("nope").unwrap().is_none());
        assert!(DockerConfig::load(&dir.path().join("missing"))
            .unwrap()
            .credentials("x")
            .unwrap()
            .is_none());
    }
}

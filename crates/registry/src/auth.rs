//! Credentials (docker config file, credential helpers) and `WWW-Authenticate` challenges.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{RegistryError, Result};

/// Username and secret for one registry. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (empty with an identity token or a registry token).
    pub username: String,
    /// Password, identity token or registry token (see `kind`).
    pub secret: String,
    /// What `secret` is.
    pub kind: SecretKind,
}

/// What a [`Credentials`] secret is, which decides how it is presented to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// A password (or an identity token used as one): basic auth, also towards the token
    /// endpoint of a bearer challenge.
    Password,
    /// A bearer token for the registry itself (docker's `registrytoken`, CRI's
    /// `registry_token`): sent as `Authorization: Bearer` without asking a token endpoint.
    RegistryToken,
}

impl Credentials {
    /// Username and password (or identity token with an empty username).
    pub fn password(username: impl Into<String>, secret: impl Into<String>) -> Credentials {
        Credentials {
            username: username.into(),
            secret: secret.into(),
            kind: SecretKind::Password,
        }
    }

    /// A registry bearer token.
    pub fn registry_token(token: impl Into<String>) -> Credentials {
        Credentials {
            username: String::new(),
            secret: token.into(),
            kind: SecretKind::RegistryToken,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials({:?}, {:?}, <redacted>)",
            self.username, self.kind
        )
    }
}

/// Where the docker config file is: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`, else (HOME unset or empty, as for a systemd unit without
/// `User=`) the home directory of the process's user from the passwd database, as docker's
/// own lookup does. `None` when no home directory is known.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(passwd_home)?;
    Some(home.join(".docker/config.json"))
}

/// The home directory of the effective user in the passwd database (getpwuid).
fn passwd_home() -> Option<PathBuf> {
    nix::unistd::User::from_uid(nix::unistd::Uid::effective())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .filter(|d| !d.as_os_str().is_empty())
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
    #[serde(default, rename = "registrytoken")]
    registry_token: Option<String>,
}

/// Credentials from a docker `config.json`.
#[derive(Default)]
pub struct DockerConfig {
    file: DockerConfigFile,
}

impl DockerConfig {
    /// Loads the file at [`docker_config_path`]; missing file = empty.
    pub fn load_default() -> Result<Self> {
        match docker_config_path() {
            Some(p) => Self::load(&p),
            None => Ok(DockerConfig::default()),
        }
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
    if let Some(t) = e.registry_token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credentials::registry_token(t.clone())));
    }
    if let Some(t) = &e.identity_token {
        return Ok(Some(Credentials::password("", t.clone())));
    }
    if let Some(a) = e.auth.as_ref().filter(|a| !a.trim().is_empty()) {
        return decode_auth(a, &format!("docker config: auth for {registry}")).map(Some);
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials::password(u.clone(), p.clone()))),
        _ => Ok(None),
    }
}

/// Decodes a base64 `user:password` (docker's and CRI's `auth` field). `what` names where it
/// came from in the error, which never contains the value.
pub fn decode_auth(auth: &str, what: &str) -> Result<Credentials> {
    let invalid = || RegistryError::Config(format!("{what}: invalid base64 user:password"));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| invalid())?;
    let s = String::from_utf8(raw).map_err(|_| invalid())?;
    let (u, p) = s.split_once(':').ok_or_else(invalid)?;
    Ok(Credentials::password(u, p.trim_end_matches('\0')))
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
    Ok(Some(Credentials::password(username, h.secret)))
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

    #[test]
    fn docker_config_path_falls_back_to_the_passwd_home_without_home() {
        // The only test in this crate touching these variables; restored below.
        let (dc, home) = (std::env::var_os("DOCKER_CONFIG"), std::env::var_os("HOME"));
        std::env::remove_var("DOCKER_CONFIG");
        std::env::set_var("HOME", "/tmp/soci-home-test");
        let with_home = docker_config_path();
        std::env::remove_var("HOME");
        let without_home = docker_config_path();
        std::env::set_var("HOME", "");
        let empty_home = docker_config_path();
        std::env::set_var("DOCKER_CONFIG", "/tmp/soci-dc-test");
        let with_dc = docker_config_path();
        match home {
            Some(h) => std::env::set_var("HOME", h),
            None => std::env::remove_var("HOME"),
        }
        match dc {
            Some(d) => std::env::set_var("DOCKER_CONFIG", d),
            None => std::env::remove_var("DOCKER_CONFIG"),
        }
        assert_eq!(
            with_home,
            Some(PathBuf::from("/tmp/soci-home-test/.docker/config.json"))
        );
        let pw = nix::unistd::User::from_uid(nix::unistd::Uid::effective())
            .unwrap()
            .unwrap()
            .dir;
        assert_eq!(without_home, Some(pw.join(".docker/config.json")));
        assert_eq!(empty_home, without_home);
        assert_eq!(
            with_dc,
            Some(PathBuf::from("/tmp/soci-dc-test/config.json"))
        );
    }

    #[test]
    fn registry_token_and_padded_auth() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"a":{"registrytoken":"rt"},"b":{"auth":"dTpwAA=="}}}"#,
        )
        .unwrap();
        let c = DockerConfig::load(&p).unwrap();
        let a = c.credentials("a").unwrap().unwrap();
        assert_eq!(
            (a.kind, a.secret.as_str()),
            (SecretKind::RegistryToken, "rt")
        );
        assert!(!format!("{a:?}").contains("rt\""));
        assert_eq!(c.credentials("b").unwrap().unwrap().secret, "p");
    }
}

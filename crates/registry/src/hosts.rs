//! Registry endpoints: containerd's `certs.d/<host>/hosts.toml` (mirrors, plain HTTP,
//! `skip_verify`) and plain-HTTP hosts given on the command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{RegistryError, Result};

/// One place to send requests for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]` with no trailing slash.
    pub base: String,
    /// Path prefix to use instead of `/v2` (containerd's `override_path`).
    pub path_prefix: String,
    /// Host allowed to pull from.
    pub pull: bool,
    /// Host allowed to resolve tags.
    pub resolve: bool,
    /// Host allowed to push to.
    pub push: bool,
    /// Skip TLS verification (only when configured).
    pub skip_verify: bool,
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct HostsConfig {
    /// Directory with `<host>/hosts.toml` files (containerd `config_path`).
    pub hosts_dir: Option<PathBuf>,
    /// Use plain HTTP for every registry (`--plain-http`).
    pub plain_http: bool,
    /// Registries reached over plain HTTP.
    pub plain_http_hosts: Vec<String>,
    /// Pull mirrors by registry host (upstream's `[[resolver.host."HOST".mirrors]]`), tried
    /// before `hosts.toml` mirrors and the registry itself.
    pub mirrors: BTreeMap<String, Vec<Mirror>>,
}

/// A pull mirror from the daemon config: `host[:port][/path]`, over HTTPS unless `insecure`
/// (or a loopback host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port]`, optionally followed by a path prefix.
    pub host: String,
    /// Plain HTTP instead of HTTPS.
    pub insecure: bool,
}

impl HostsConfig {
    /// Endpoints for `registry`, mirrors first, the registry itself last.
    pub fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>> {
        let plain = self.plain_http
            || is_localhost(registry)
            || self.plain_http_hosts.iter().any(|h| h == registry);
        let default_server = if registry == crate::reference::DOCKER_HUB {
            "https://registry-1.docker.io".to_string()
        } else if plain {
            format!("http://{registry}")
        } else {
            format!("https://{registry}")
        };
        let mut out: Vec<Endpoint> = self
            .mirrors
            .get(registry)
            .into_iter()
            .flatten()
            .filter_map(mirror_endpoint)
            .collect();
        let mut server = default_server.clone();
        if let Some(dir) = &self.hosts_dir {
            if let Some((s, hosts)) = cached_hosts_toml(dir, registry)? {
                if let Some(s) = s {
                    server = s;
                }
                out.extend(hosts);
            }
        }
        out.push(Endpoint {
            base: server.trim_end_matches('/').to_string(),
            path_prefix: "/v2".into(),
            pull: true,
            resolve: true,
            push: true,
            skip_verify: false,
        });
        Ok(out)
    }
}

/// The pull endpoint of a config mirror (`None` for an empty host). As upstream: a scheme in
/// `host` is ignored (plain HTTP only when `insecure` or a loopback host), and a path, when
/// given, is the API root as is (`/v2` otherwise).
fn mirror_endpoint(m: &Mirror) -> Option<Endpoint> {
    let spec = m.host.trim();
    let spec = spec
        .split_once("://")
        .map_or(spec, |(_, rest)| rest)
        .trim_end_matches('/');
    let (host, path) = match spec.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (spec, "/v2".to_string()),
    };
    if host.is_empty() {
        return None;
    }
    let scheme = if m.insecure || is_localhost(host) {
        "http"
    } else {
        "https"
    };
    Some(Endpoint {
        base: format!("{scheme}://{host}"),
        path_prefix: path,
        pull: true,
        resolve: true,
        push: false,
        skip_verify: false,
    })
}

/// Whether `registry` (`host[:port]`) is this machine: `localhost`, 127.0.0.0/8 or `::1`.
/// Such registries are reached over plain HTTP by default, as containerd
/// (`docker.MatchLocalhost`), upstream soci-snapshotter and stargz-snapshotter do.
pub fn is_localhost(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How long a looked-up `hosts.toml` is used before the file is checked again. Endpoints are
/// resolved for every range request, so the lookup must not touch the disk each time (a
/// blocking stat + parse on an async worker); an edited file still takes effect within this.
const HOSTS_RECHECK: Duration = Duration::from_secs(1);

/// Parsed `hosts.toml`: the `server` and the `[host]` endpoints.
type Parsed = (Option<String>, Vec<Endpoint>);

/// One registry's lookup in one hosts directory.
struct Cached {
    checked: Instant,
    /// The file found, with the (mtime, len) it had when parsed.
    file: Option<(PathBuf, Option<SystemTime>, u64)>,
    parsed: Option<Parsed>,
}

/// Process-wide cache of `hosts.toml` lookups by (hosts dir, registry). Bounded: cleared
/// when it outgrows [`MAX_CACHED_HOSTS`] (registry names come from image references).
static HOSTS_CACHE: Mutex<BTreeMap<(PathBuf, String), Cached>> = Mutex::new(BTreeMap::new());
const MAX_CACHED_HOSTS: usize = 1024;

/// The `hosts.toml` for `registry` under `dir` (`host_port`, `_default`, then `host:port`
/// directories, as containerd), parsed at most once per change of the file.
fn cached_hosts_toml(dir: &Path, registry: &str) -> Result<Option<Parsed>> {
    let key = (dir.to_path_buf(), registry.to_string());
    let now = Instant::now();
    {
        let cache = HOSTS_CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&key) {
            if now.duration_since(c.checked) < HOSTS_RECHECK {
                return Ok(c.parsed.clone());
            }
        }
    }
    let found = [registry, "_default"]
        .iter()
        .map(|h| dir.join(h.replace(':', "_")).join("hosts.toml"))
        .chain(std::iter::once(dir.join(registry).join("hosts.toml")))
        .find_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.modified().ok(), m.len()))
        });
    let mut cache = HOSTS_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = cache.get_mut(&key) {
        if c.file == found {
            c.checked = now;
            return Ok(c.parsed.clone());
        }
    }
    drop(cache);
    let parsed = match &found {
        Some((p, _, _)) => Some(parse_hosts_toml(p)?),
        None => None,
    };
    let mut cache = HOSTS_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= MAX_CACHED_HOSTS {
        cache.clear();
    }
    cache.insert(
        key,
        Cached {
            checked: now,
            file: found,
            parsed: parsed.clone(),
        },
    );
    Ok(parsed)
}

fn parse_hosts_toml(path: &Path) -> Result<(Option<String>, Vec<Endpoint>)> {
    let bad = |why: String| RegistryError::Config(format!("{}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| RegistryError::Io {
        what: format!("reading {}", path.display()),
        source: e,
    })?;
    let table: toml::Table = text.parse().map_err(|e| bad(format!("{e}")))?;
    let server = table
        .get("server")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let mut out = Vec::new();
    if let Some(hosts) = table.get("host").and_then(|v| v.as_table()) {
        for (url, cfg) in hosts {
            let cfg = cfg
                .as_table()
                .ok_or_else(|| bad(format!("host {url:?} is not a table")))?;
            let caps: Vec<&str> = match cfg.get("capabilities") {
                Some(v) => v
                    .as_array()
                    .ok_or_else(|| bad("capabilities must be a list".into()))?
                    .iter()
                    .filter_map(|c| c.as_str())
                    .collect(),
                None => vec!["pull", "resolve"],
            };
            let base = if url.contains("://") {
                url.clone()
            } else {
                format!("https://{url}")
            };
            let override_path = cfg
                .get("override_path")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let (base, path_prefix) = if override_path {
                match base
                    .find("://")
                    .and_then(|i| base[i + 3..].find('/').map(|j| i + 3 + j))
                {
                    Some(p) => (
                        base[..p].to_string(),
                        base[p..].trim_end_matches('/').to_string(),
                    ),
                    None => (base.clone(), String::new()),
                }
            } else {
                (base.trim_end_matches('/').to_string(), "/v2".to_string())
            };
            out.push(Endpoint {
                base,
                path_prefix,
                pull: caps.contains(&"pull"),
                resolve: caps.contains(&"resolve"),
                push: caps.contains(&"push"),
                skip_verify: cfg
                    .get("skip_verify")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            });
        }
    }
    Ok((server, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_plain() {
        let h = HostsConfig {
            plain_http_hosts: vec!["127.0.0.1:5000".into()],
            ..Default::default()
        };
        assert_eq!(
            h.endpoints("127.0.0.1:5000").unwrap()[0].base,
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            h.endpoints("example.com").unwrap()[0].base,
            "https://example.com"
        );
        assert_eq!(
            h.endpoints("docker.io").unwrap()[0].base,
            "https://registry-1.docker.io"
        );
    }

    #[test]
    fn hosts_toml_mirrors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("example.com");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            "server = \"https://example.com\"\n[host.\"http://127.0.0.1:9999\"]\n  capabilities = [\"pull\", \"resolve\"]\n[host.\"https://m2.example/sub/v2\"]\n  override_path = true\n  skip_verify = true\n",
        )
        .unwrap();
        let h = HostsConfig {
            hosts_dir: Some(dir.path().into()),
            ..Default::default()
        };
        let e = h.endpoints("example.com").unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].base, "http://127.0.0.1:9999");
        assert!(e[0].pull && !e[0].push);
        assert_eq!(
            (e[1].base.as_str(), e[1].path_prefix.as_str()),
            ("https://m2.example", "/sub/v2")
        );
        assert!(e[1].skip_verify);
        assert_eq!(e[2].base, "https://example.com");
        assert!(e[2].push);
    }

    #[test]
    fn loopback_registries_are_plain_http_by_default() {
        for (r, plain) in [
            ("localhost:5000", true),
            ("LOCALHOST", true),
            ("127.0.0.1:5000", true),
            ("127.9.8.7", true),
            ("[::1]:5000", true),
            ("::1", false), // not a valid host:port form: the last colon is taken as the port
            ("example.com:5000", false),
            ("10.0.0.1:5000", false),
            ("localhost.example.com", false),
        ] {
            assert_eq!(is_localhost(r), plain, "{r}");
        }
        let e = HostsConfig::default().endpoints("127.0.0.1:5000").unwrap();
        assert_eq!(e.last().unwrap().base, "http://127.0.0.1:5000");
        let e = HostsConfig::default().endpoints("example.com").unwrap();
        assert_eq!(e.last().unwrap().base, "https://example.com");
    }

    #[test]
    fn config_mirrors_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("example.com");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            "[host.\"https://fromhosts.example\"]\n  capabilities = [\"pull\"]\n",
        )
        .unwrap();
        let mirrors = [(
            "example.com".to_string(),
            vec![
                Mirror {
                    host: "https://mirror.example:5000/cache/v2/".into(),
                    insecure: false,
                },
                Mirror {
                    host: "10.0.0.9".into(),
                    insecure: true,
                },
                Mirror {
                    host: String::new(),
                    insecure: false,
                },
            ],
        )]
        .into_iter()
        .collect();
        let h = HostsConfig {
            hosts_dir: Some(dir.path().into()),
            mirrors,
            ..Default::default()
        };
        let e = h.endpoints("example.com").unwrap();
        let got: Vec<(&str, &str, bool)> = e
            .iter()
            .map(|e| (e.base.as_str(), e.path_prefix.as_str(), e.push))
            .collect();
        assert_eq!(
            got,
            [
                ("https://mirror.example:5000", "/cache/v2", false),
                ("http://10.0.0.9", "/v2", false),
                ("https://fromhosts.example", "/v2", false),
                ("https://example.com", "/v2", true),
            ]
        );
        assert_eq!(h.endpoints("other.example").unwrap().len(), 1);
    }

    #[test]
    fn hosts_toml_is_parsed_once_and_reloaded_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("reload.example");
        std::fs::create_dir_all(&d).unwrap();
        let write = |mirror: &str| {
            std::fs::write(
                d.join("hosts.toml"),
                format!("[host.\"https://{mirror}\"]\n  capabilities = [\"pull\"]\n"),
            )
            .unwrap()
        };
        write("one.example");
        let h = HostsConfig {
            hosts_dir: Some(dir.path().into()),
            ..Default::default()
        };
        let first = |h: &HostsConfig| h.endpoints("reload.example").unwrap()[0].base.clone();
        assert_eq!(first(&h), "https://one.example");
        // Within the recheck interval the disk is not consulted: a removed file still counts.
        std::fs::remove_file(d.join("hosts.toml")).unwrap();
        assert_eq!(first(&h), "https://one.example");
        // After it, an edited file is read again.
        write("second.example");
        std::thread::sleep(HOSTS_RECHECK + Duration::from_millis(100));
        assert_eq!(first(&h), "https://second.example");
    }
}

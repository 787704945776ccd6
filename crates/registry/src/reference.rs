//! Image references: `[host[:port]/]path[:tag][@digest]`, docker.io defaults applied.

use crate::digest::Digest;

/// Registry host used for Docker Hub names.
pub const DOCKER_HUB: &str = "docker.io";

/// A repository in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repository {
    /// Registry host (and port), e.g. `127.0.0.1:5000` or `docker.io`.
    pub registry: String,
    /// Repository path, e.g. `library/busybox`.
    pub name: String,
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The repository.
    pub repository: Repository,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest, if any (wins over the tag).
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses a reference, applying Docker Hub defaults for short names.
    pub fn parse(s: &str) -> Result<Reference, String> {
        let bad = |why: &str| format!("invalid image reference {s:?}: {why}");
        if s.is_empty() || s.len() > 4096 {
            return Err(bad("empty or too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d).ok_or_else(|| bad("bad digest"))?)),
            None => (s, None),
        };
        let (rest, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_string())),
            _ => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
            if !ok {
                return Err(bad("bad tag"));
            }
        }
        let (registry, name) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ if !rest.contains('/') => (DOCKER_HUB.to_string(), format!("library/{rest}")),
            _ => (DOCKER_HUB.to_string(), rest.to_string()),
        };
        let name_ok = !name.is_empty()
            && name.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !name_ok {
            return Err(bad("bad repository name"));
        }
        Ok(Reference {
            repository: Repository { registry, name },
            tag,
            digest,
        })
    }

    /// The digest if present, else the tag, else `latest`: what goes in `/manifests/<here>`.
    pub fn object(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// The same repository at `digest`.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.repository.registry, self.repository.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (r.repository.registry.as_str(), r.repository.name.as_str()),
            ("docker.io", "library/busybox")
        );
        assert_eq!(r.object(), "latest");
        let r = Reference::parse("127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(r.repository.registry, "127.0.0.1:5000");
        assert_eq!(r.repository.name, "a/b");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let d = Digest::of(b"x");
        let r = Reference::parse(&format!("localhost/x@{d}")).unwrap();
        assert_eq!(r.object(), d.to_string());
        assert_eq!(r.to_string(), format!("localhost/x@{d}"));
        assert!(Reference::parse("UPPER/case").is_err());
        assert!(Reference::parse("a:b:c").is_err());
        assert!(Reference::parse("host:5000/x@sha256:12").is_err());
    }
}

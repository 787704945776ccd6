use std::os::unix::fs::PermissionsExt;

use super::*;

fn auth(user: &str, pass: &str) -> AuthConfig {
    AuthConfig {
        username: user.into(),
        password: pass.into(),
        ..Default::default()
    }
}

fn creds(s: &CredentialStore, reg: &str, repo: &str) -> Option<(String, String)> {
    s.credentials(reg, repo)
        .unwrap()
        .map(|c| (c.username, c.secret))
}

#[test]
fn persisted_root_only_and_restored_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = CredentialStore::open(dir.path(), Duration::from_secs(3600));
    s.remember("reg.example:5000/cri/app:v1", Some(&auth("u", "s3cret")))
        .unwrap();
    let file = dir.path().join(FILE_NAME);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!dir.path().join("cri-credentials.json.tmp").exists());
    drop(s);
    let s = CredentialStore::open(dir.path(), Duration::from_secs(3600));
    assert_eq!(
        creds(&s, "reg.example:5000", "cri/app"),
        Some(("u".into(), "s3cret".into()))
    );
    assert_eq!(creds(&s, "reg.example:5000", "cri/other"), None);
    assert_eq!(creds(&s, "other:5000", "cri/app"), None);
}

#[test]
fn expired_entries_are_not_used_and_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = CredentialStore::open(dir.path(), Duration::from_secs(0));
    s.remember("reg.example/cri/app:v1", Some(&auth("u", "p")))
        .unwrap();
    assert_eq!(creds(&s, "reg.example", "cri/app"), None, "expired at once");
    drop(s);
    let s = CredentialStore::open(dir.path(), Duration::from_secs(3600));
    assert!(s.images().is_empty());
    let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
    assert!(!text.contains("reg.example"), "{text}");
}

#[test]
fn newer_pull_replaces_and_failed_pull_restores() {
    let dir = tempfile::tempdir().unwrap();
    let s = CredentialStore::open(dir.path(), Duration::from_secs(3600));
    s.remember("reg.example/cri/app:v1", Some(&auth("u", "old")))
        .unwrap();
    let old = s
        .remember("reg.example/cri/app:v1", Some(&auth("u", "new")))
        .unwrap();
    assert_eq!(
        creds(&s, "reg.example", "cri/app").unwrap().1,
        "new",
        "fresh credentials replace stale ones"
    );
    // A pull with wrong credentials failed: the ones that worked come back.
    let replaced = s
        .remember("reg.example/cri/app:v1", Some(&auth("u", "wrong")))
        .unwrap();
    s.restore("reg.example/cri/app:v1", replaced);
    assert_eq!(creds(&s, "reg.example", "cri/app").unwrap().1, "new");
    assert_eq!(old.unwrap().password, "old");
    // Without auth (a public image): nothing kept.
    s.remember("reg.example/cri/app:v1", None).unwrap();
    assert_eq!(creds(&s, "reg.example", "cri/app"), None);
}

#[test]
fn forget_removes_from_memory_and_file_with_normalized_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = CredentialStore::open(dir.path(), Duration::from_secs(3600));
    s.remember("busybox", Some(&auth("u", "p"))).unwrap();
    assert_eq!(s.images(), ["docker.io/library/busybox:latest"]);
    assert!(creds(&s, "docker.io", "library/busybox").is_some());
    s.forget("docker.io/library/busybox:latest");
    assert!(s.images().is_empty());
    let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
    assert!(!text.contains("busybox"), "{text}");
}

#[test]
fn auth_field_identity_and_registry_tokens_and_server_address() {
    let dir = tempfile::tempdir().unwrap();
    let s = CredentialStore::open(dir.path(), Duration::from_secs(3600));
    let a = AuthConfig {
        auth: "dXNlcjpwYXNz".into(), // user:pass
        ..Default::default()
    };
    s.remember("r.example/a:1", Some(&a)).unwrap();
    assert_eq!(
        creds(&s, "r.example", "a"),
        Some(("user".into(), "pass".into()))
    );
    let t = AuthConfig {
        identity_token: "idt".into(),
        ..Default::default()
    };
    s.remember("r.example/b:1", Some(&t)).unwrap();
    assert_eq!(
        creds(&s, "r.example", "b"),
        Some((String::new(), "idt".into()))
    );
    let rt = AuthConfig {
        registry_token: "rt".into(),
        ..Default::default()
    };
    s.remember("r.example/c:1", Some(&rt)).unwrap();
    let c = s.credentials("r.example", "c").unwrap().unwrap();
    assert_eq!(c.kind, soci_registry::auth::SecretKind::RegistryToken);
    // Credentials for another server are not sent to this one.
    let other = AuthConfig {
        server_address: "https://elsewhere.example/v1/".into(),
        ..auth("u", "p")
    };
    s.remember("r.example/d:1", Some(&other)).unwrap();
    assert_eq!(creds(&s, "r.example", "d"), None);
    let hub = AuthConfig {
        server_address: "https://index.docker.io/v1/".into(),
        ..auth("u", "p")
    };
    s.remember("cri/e", Some(&hub)).unwrap();
    assert!(creds(&s, "docker.io", "cri/e").is_some());
}

#[test]
fn debug_never_prints_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let s = CredentialStore::open(dir.path(), Duration::from_secs(3600));
    let a = AuthConfig {
        username: "u".into(),
        password: "pw-s3cret".into(),
        auth: "YXV0aC1zM2NyZXQ=".into(),
        identity_token: "id-s3cret".into(),
        registry_token: "rt-s3cret".into(),
        server_address: String::new(),
    };
    let printed = format!("{a:?}");
    assert!(
        !printed.contains("s3cret") && !printed.contains("YXV0"),
        "{printed}"
    );
    s.remember("r.example/a:1", Some(&a)).unwrap();
    let old = s.remember("r.example/a:1", Some(&a)).unwrap().unwrap();
    let printed = format!("{old:?}");
    assert!(
        !printed.contains("s3cret") && !printed.contains("YXV0"),
        "{printed}"
    );
    let req = crate::proto::runtime::v1::PullImageRequest {
        auth: Some(a),
        ..Default::default()
    };
    let printed = format!("{req:?}");
    assert!(!printed.contains("s3cret"), "{printed}");
}

#[test]
fn corrupt_file_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
    let s = CredentialStore::open(dir.path(), Duration::from_secs(3600));
    assert!(s.images().is_empty());
    assert!(dir.path().join("cri-credentials.json.bad").exists());
}

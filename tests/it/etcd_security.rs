//! Global rules through an etcd that demands TLS with client certificates
//! (certificates made by the test with `openssl`), and through one with
//! user/password authentication; wrong credentials get a clear error.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{HEAVY, ProcessDaemon, code, etcd_state, rlctl, stderr, wait_for};

/// A single-member etcd started by a test, stopped (by PID) on drop.
struct SecureEtcd {
    child: Child,
    endpoint: String,
    /// etcdctl flags reaching it (TLS files or user).
    ctl: Vec<String>,
    _data: tempfile::TempDir,
}

impl Drop for SecureEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Client and peer ports for the `n`th cluster of this process: 22000-22999,
/// apart per process, below the other test clusters and the ephemeral range.
fn ports(n: u16) -> (u16, u16) {
    let base = 22_000 + (std::process::id() % 50) as u16 * 20 + n * 4;
    (base, base + 1)
}

impl SecureEtcd {
    /// Starts etcd with `extra` flags; `scheme` is the client URL scheme.
    fn start(n: u16, scheme: &str, extra: &[String], ctl: Vec<String>) -> Option<SecureEtcd> {
        if Command::new("etcd").arg("--version").output().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "etcd is missing under CI (scripts/test installs etcd-server)"
            );
            eprintln!("skipped: etcd is not installed (run scripts/test)");
            return None;
        }
        let data =
            tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let (client, peer) = ports(n);
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(data.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "s", "--data-dir"])
            .arg(data.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg(format!("--initial-cluster=s={peer_url}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        let etcd = SecureEtcd {
            child,
            endpoint,
            ctl,
            _data: data,
        };
        wait_for(Duration::from_secs(20), || {
            etcd.etcdctl(&["endpoint", "health"]).status.success()
        });
        Some(etcd)
    }

    fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint, "--dial-timeout", "2s"])
            .args(&self.ctl)
            .args(args)
            .output()
            .expect("etcdctl (scripts/deps test installs etcd-client)")
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (scripts/deps test installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// signed by it, in `dir`: ca.pem, server.pem/key, client.pem/key.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=rld test CA",
    ]);
    openssl(dir, &ca);
    for (name, usage) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&ext), usage).unwrap();
        let mut req = vec!["req"];
        req.extend(ec);
        let subject = format!("/CN=rld-{name}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

/// Starts rld as `node` with `config` (TOML) in `dir/node`.
fn daemon(dir: &Path, node: &str, config: &str) -> ProcessDaemon {
    let sub = dir.join(node);
    std::fs::create_dir_all(&sub).unwrap();
    let file = sub.join("rld.toml");
    std::fs::write(&file, config).unwrap();
    ProcessDaemon::start(
        &sub,
        &["--config", file.to_str().unwrap(), "--node-id", node],
    )
}

fn wait_state(d: &ProcessDaemon, want: &str) {
    wait_for(Duration::from_secs(20), || etcd_state(&d.socket) == want);
}

/// Two daemons share a global limit of 10 per hour through `etcd`: between
/// them they admit some and never more than 10, and the bucket lives in etcd.
fn global_rule_is_shared(etcd: &SecureEtcd, dir: &Path, config: &str) {
    let a = daemon(dir, "a", config);
    let b = daemon(dir, "b", config);
    wait_state(&a, "healthy");
    wait_state(&b, "healthy");
    let set = rlctl(
        &a.socket,
        &[
            "rules",
            "set",
            "g",
            "--client",
            "*",
            "--resource",
            "job",
            "--limit",
            "10",
            "--window",
            "1h",
            "--scope",
            "global",
            "--on-failure",
            "closed",
        ],
    );
    assert_eq!(code(&set), 0, "{}", stderr(&set));
    let mut allowed = 0;
    for d in [&a, &b, &a, &b] {
        // Both daemons see the rule (b through its watch) before acquiring.
        let start = Instant::now();
        while code(&rlctl(&d.socket, &["rules", "get", "g"])) != 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "rule reached {}",
                d.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for _ in 0..10 {
            if code(&rlctl(&d.socket, &["acquire", "c", "job"])) == 0 {
                allowed += 1;
            }
        }
    }
    assert!(
        (1..=10).contains(&allowed),
        "{allowed} admitted of a global 10"
    );
    let keys = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/rld/v2/members/"]);
    assert!(keys.status.success(), "{}", stderr(&keys));
    assert_eq!(
        String::from_utf8_lossy(&keys.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .count(),
        2,
        "both daemons hold their shares through etcd"
    );
}

/// Writes `text` to `dir/name`, mode 0600.
fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

fn path_str(p: PathBuf) -> String {
    p.to_str().unwrap().to_owned()
}

#[test]
fn global_rules_work_through_etcd_with_tls_and_client_certificates() {
    let _group = HEAVY.blocking_read();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    make_certificates(certs);
    let file = |f: &str| path_str(certs.join(f));
    let server = [
        format!("--cert-file={}", file("server.pem")),
        format!("--key-file={}", file("server.key")),
        format!("--trusted-ca-file={}", file("ca.pem")),
        "--client-cert-auth".to_owned(),
    ];
    let ctl = vec![
        format!("--cacert={}", file("ca.pem")),
        format!("--cert={}", file("client.pem")),
        format!("--key={}", file("client.key")),
    ];
    let Some(etcd) = SecureEtcd::start(0, "https", &server, ctl) else {
        return;
    };
    let config = format!(
        "etcd = [{:?}]\netcd_tls_ca = {:?}\netcd_tls_cert = {:?}\netcd_tls_key = {:?}\n",
        etcd.endpoint,
        file("ca.pem"),
        file("client.pem"),
        file("client.key")
    );
    global_rule_is_shared(&etcd, dir.path(), &config);

    // Without a client certificate etcd refuses the handshake: rld serves
    // degraded and says why.
    let no_cert = format!(
        "etcd = [{:?}]\netcd_tls_ca = {:?}\n",
        etcd.endpoint,
        file("ca.pem")
    );
    let c = daemon(dir.path(), "c", &no_cert);
    wait_state(&c, "degraded");
    // An http:// endpoint with TLS settings is refused before starting.
    let mixed = format!(
        "etcd = ['http://127.0.0.1:1']\netcd_tls_ca = {:?}\n",
        file("ca.pem")
    );
    std::fs::write(dir.path().join("mixed.toml"), mixed).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_rld"))
        .args(["--check-config", "--config"])
        .arg(dir.path().join("mixed.toml"))
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2));
    assert!(
        stderr(&check).contains("etcd_tls_ca: TLS settings need https://"),
        "{}",
        stderr(&check)
    );
}

#[test]
fn global_rules_work_through_etcd_with_authentication() {
    let _group = HEAVY.blocking_read();
    let Some(mut etcd) = SecureEtcd::start(1, "http", &[], vec![]) else {
        return;
    };
    let add = etcd.etcdctl(&[
        "user",
        "add",
        "root",
        "--new-user-password=s3cret-pw",
        "--interactive=false",
    ]);
    assert!(add.status.success(), "{}", stderr(&add));
    let enable = etcd.etcdctl(&["auth", "enable"]);
    assert!(enable.status.success(), "{}", stderr(&enable));
    etcd.ctl = vec!["--user=root:s3cret-pw".to_owned()];
    let dir = tempfile::tempdir().unwrap();
    let secret = private_file(dir.path(), "etcd-password", "s3cret-pw\n");
    let config = format!(
        "etcd = [{:?}]\netcd_user = 'root'\netcd_password_file = {:?}\n",
        etcd.endpoint,
        path_str(secret.clone())
    );
    global_rule_is_shared(&etcd, dir.path(), &config);

    // A wrong password is refused at start with etcd's reason.
    let wrong = private_file(dir.path(), "wrong-password", "nope\n");
    let config = format!(
        "etcd = [{:?}]\netcd_user = 'root'\netcd_password_file = {:?}\n",
        etcd.endpoint,
        path_str(wrong)
    );
    let sub = dir.path().join("c");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join("rld.toml"), config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rld"))
        .arg("--config")
        .arg(sub.join("rld.toml"))
        .arg("--socket")
        .arg(sub.join("rld.sock"))
        .arg("--state-dir")
        .arg(sub.join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("authentication failed"),
        "{}",
        stderr(&out)
    );
}

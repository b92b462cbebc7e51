//! Operations: the systemd units are valid and hardened, readiness is
//! signalled after the socket is bound, and socket activation works.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{code, rlctl, stderr};

fn systemd_tools_present() -> bool {
    let present = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        present || std::env::var("CI").as_deref() != Ok("true"),
        "systemd-analyze is missing under CI (scripts/test installs it)"
    );
    present
}

#[test]
fn unit_files_verify_cleanly_and_are_hardened() {
    if !systemd_tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    // verify checks that ExecStart exists: point it at the built binary.
    let service = std::fs::read_to_string(dist.join("rld.service"))
        .unwrap()
        .replace("/usr/bin/rld", env!("CARGO_BIN_EXE_rld"));
    std::fs::write(dir.path().join("rld.service"), service).unwrap();
    std::fs::copy(dist.join("rld.socket"), dir.path().join("rld.socket")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "rld.service", "rld.socket"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    // A misspelt key only warns (exit 0), so stderr must be empty too.
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        stderr(&out)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "rld.service"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exposure above 2.0 (threshold 20 of 100):\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn readiness_is_signalled_once_the_socket_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let socket = dir.path().join("rld.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rld"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("a readiness message");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // Ready means ready: the socket answers at once.
    let out = rlctl(&socket, &["health"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn socket_activation_uses_the_inherited_socket() {
    if !systemd_tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(env!("CARGO_BIN_EXE_rld"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("unused.sock"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The first connection starts rld, which takes over the listening socket.
    let out = rlctl(&socket, &["health"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        !dir.path().join("unused.sock").exists(),
        "rld did not bind its own socket"
    );
    let _ = child.kill();
    let _ = child.wait();
}

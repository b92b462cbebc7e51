//! Operations: the systemd units are valid and hardened, readiness is
//! signalled after the socket is bound, and socket activation works.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{code, rlctl, stderr};

/// Kills and reaps a child still running when a test ends (a failed
/// assertion must not leave a daemon behind).
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

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
    let mut child = Reaper(
        Command::new(env!("CARGO_BIN_EXE_rld"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("a readiness message");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // Ready means ready: the socket answers at once.
    let out = rlctl(&socket, &["health"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The socket's default mode: owner and group read-write, others nothing.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "{mode:o}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.0.wait().unwrap().success());
}

/// Under `WatchdogSec=` (WATCHDOG_USEC) rld pings the watchdog at half the
/// interval: here 200 ms, so several pings within seconds.
#[test]
fn the_systemd_watchdog_is_pinged() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // systemd names the watched process: WATCHDOG_PID is rld's own PID,
    // which `exec` gives it from the shell.
    let mut child = Reaper(
        Command::new("sh")
            .arg("-c")
            .arg("WATCHDOG_PID=$$ exec \"$0\" --socket \"$1\" --state-dir \"$2\"")
            .arg(env!("CARGO_BIN_EXE_rld"))
            .arg(dir.path().join("rld.sock"))
            .arg(dir.path().join("state"))
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "200000")
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut pings = 0;
    let mut buf = [0u8; 256];
    // Bounded: at most 100 messages, each within 20 s.
    for _ in 0..100 {
        let n = notify.recv(&mut buf).expect("a notification");
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            pings += 1;
            if pings == 3 {
                break;
            }
        }
    }
    assert_eq!(pings, 3, "three watchdog pings");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn socket_activation_uses_the_inherited_socket() {
    if !systemd_tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut child = Reaper(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&socket)
            .arg(env!("CARGO_BIN_EXE_rld"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("unused.sock"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
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
    let _ = child.0.kill();
    let _ = child.0.wait();
}

/// The unit runs `User=rld` with `RuntimeDirectory=rld` and
/// `StateDirectory=rld`: without --socket and --state-dir, rld listens in
/// `$RUNTIME_DIRECTORY` and keeps its rules in `$STATE_DIRECTORY`.
#[test]
fn systemd_runtime_and_state_directories_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut child = Reaper(
        Command::new(env!("CARGO_BIN_EXE_rld"))
            .env("RUNTIME_DIRECTORY", &runtime)
            .env("STATE_DIRECTORY", &state)
            .env_remove("RLD_SOCKET")
            .env_remove("RLD_CONFIG")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let socket = runtime.join("rld.sock");
    assert!(
        crate::harness::socket_answers_within(&socket, Duration::from_secs(20)),
        "no socket in $RUNTIME_DIRECTORY"
    );
    let set = rlctl(
        &socket,
        &[
            "rules",
            "set",
            "r",
            "--client",
            "*",
            "--resource",
            "x",
            "--limit",
            "1",
            "--window",
            "1h",
        ],
    );
    assert_eq!(code(&set), 0, "{}", stderr(&set));
    let kept = std::fs::read_to_string(state.join("rules.toml")).unwrap();
    assert!(kept.contains("id = \"r\""), "{kept}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.0.wait().unwrap().success());
    assert!(!socket.exists(), "its own socket is removed at exit");
}

/// A daemon stopping removes its socket file only if it is still its own:
/// here a second rld has taken the path over meanwhile.
#[test]
fn stopping_leaves_a_socket_another_rld_took_over() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let a = crate::harness::ProcessDaemon::start(&a_dir, &[]);
    // Someone removes a's socket file and starts b on the same path.
    std::fs::remove_file(&a.socket).unwrap();
    let socket = a.socket.clone();
    let mut b = Reaper(
        Command::new(env!("CARGO_BIN_EXE_rld"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(b_dir.join("state"))
            .env_remove("RLD_CONFIG")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        crate::harness::socket_answers_within(&socket, Duration::from_secs(20)),
        "b did not start"
    );
    let a_log = a.stderr_path.clone();
    let status = a.terminate();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&a_log).unwrap_or_default()
    );
    assert!(socket.exists(), "a removed b's socket");
    let answered = code(&rlctl(&socket, &["health"]));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(b.0.wait().unwrap().success());
    assert_eq!(answered, 0, "b still serves on the path");
}

/// Under a low open-file limit (ulimit -n 256, hard limit too), rld lowers
/// max_connections to fit and says so; clients beyond it are refused with an
/// answer right away, never left hanging on failing accepts.
#[test]
fn connections_beyond_the_open_file_limit_are_refused_not_hung() {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rld.sock");
    let log = dir.path().join("rld.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rld"));
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("RLD_CONFIG")
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 256, 256)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = Reaper(cmd.spawn().unwrap());
    assert!(
        crate::harness::socket_answers_within(&socket, Duration::from_secs(20)),
        "rld did not start"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("max_connections lowered to 156"), "{text}");
    let mut conns: Vec<std::os::unix::net::UnixStream> = (0..260)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    // Every connection gets an answer within seconds: HelloOk on the (at
    // most 156) served ones, a too_many_connections error on the others.
    // (Which ones are served is not fixed: the start-up probe's connection
    // may still hold a slot for a moment.)
    let (mut served, mut refused) = (0, 0);
    for s in &mut conns {
        use std::io::Write;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A refused connection may be closed already; its answer is readable.
        let _ = s.write_all(&[0, 0, 0, 3, 1, 0, 1]);
        let mut header = [0u8; 4];
        s.read_exact(&mut header).unwrap_or_else(|e| {
            panic!(
                "an answer, not a hang: {e}; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        s.read_exact(&mut body).unwrap();
        match rld::protocol::codec::decode_response(&body)
            .unwrap()
            .response
        {
            rld::protocol::Response::HelloOk { .. } => served += 1,
            rld::protocol::Response::Error(e) => {
                assert_eq!(
                    e.code,
                    rld::protocol::ErrorCode::TOO_MANY_CONNECTIONS,
                    "{e}"
                );
                refused += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(served <= 156, "{served} served");
    assert!(refused >= 260 - 156, "{refused} refused");
    drop(conns);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.0.wait().unwrap().success());
}

/// `scripts/install --destdir` stages everything where Debian expects it,
/// and a second run keeps an edited config.
#[test]
fn the_install_script_puts_every_file_in_place() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_rld")).parent().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install");
    let install = || {
        let out = Command::new(&script)
            .arg("--destdir")
            .arg(root.path())
            .arg("--from")
            .arg(bin_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    install();
    let at = |p: &str| root.path().join(p.trim_start_matches('/'));
    for bin in ["/usr/bin/rld", "/usr/bin/rlctl"] {
        let mode = std::fs::metadata(at(bin)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{bin}");
    }
    for page in [
        "/usr/share/man/man8/rld.8.gz",
        "/usr/share/man/man1/rlctl.1.gz",
        "/usr/share/man/man1/rlctl-rules-set.1.gz",
        "/usr/share/man/man5/rld.toml.5.gz",
        "/usr/share/man/man7/rld-protocol.7.gz",
    ] {
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(at(page))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(".TH "), "{page}");
    }
    for (file, marker) in [
        ("/usr/share/bash-completion/completions/rlctl", "_rlctl"),
        ("/usr/share/zsh/vendor-completions/_rlctl", "#compdef rlctl"),
        (
            "/usr/share/fish/vendor_completions.d/rlctl.fish",
            "complete -c rlctl",
        ),
        (
            "/usr/lib/systemd/system/rld.service",
            "ExecStart=/usr/bin/rld --config",
        ),
        ("/usr/lib/systemd/system/rld.socket", "ListenStream="),
    ] {
        let text = std::fs::read_to_string(at(file)).unwrap();
        assert!(text.contains(marker), "{file}: no {marker:?}");
    }
    let sample =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/rld.toml"))
            .unwrap();
    assert_eq!(
        std::fs::read_to_string(at("/etc/rld/rld.toml")).unwrap(),
        sample
    );
    // An operator's edits survive a reinstall; the new sample lands beside.
    std::fs::write(at("/etc/rld/rld.toml"), "# mine\n").unwrap();
    install();
    assert_eq!(
        std::fs::read_to_string(at("/etc/rld/rld.toml")).unwrap(),
        "# mine\n"
    );
    assert_eq!(
        std::fs::read_to_string(at("/etc/rld/rld.toml.dist")).unwrap(),
        sample
    );
}

//! Real `rld` processes: rules survive restarts and `kill -9`, SIGTERM drains
//! and removes the socket, a stale socket is replaced, a live one refused,
//! SIGHUP reloads the config file's rules.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::BytesMut;
use nix::sys::signal::Signal;
use rld::protocol::codec::{decode_response, encode};
use rld::protocol::{Acquire, ErrorCode, Request, RequestFrame, Response};

use crate::harness::{ProcessDaemon, code, rlctl, stderr, stdout, wait_for};

fn set_rule(socket: &std::path::Path, id: &str, limit: &str) {
    let out = rlctl(
        socket,
        &[
            "rules",
            "set",
            id,
            "--client",
            "*",
            "--resource",
            id,
            "--limit",
            limit,
            "--window",
            "1h",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

fn rule_ids(socket: &std::path::Path) -> Vec<String> {
    let out = rlctl(socket, &["rules", "list", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn rules_survive_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &[]);
    set_rule(&d.socket, "alpha", "5");
    set_rule(&d.socket, "beta", "7");
    assert_eq!(
        rlctl(&d.socket, &["rules", "delete", "beta"]).status.code(),
        Some(0)
    );
    let socket = d.socket.clone();
    let status = d.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(!socket.exists(), "the socket file is removed on shutdown");
    let d = ProcessDaemon::start(dir.path(), &[]);
    assert_eq!(rule_ids(&d.socket), ["alpha"]);
}

#[test]
fn rules_survive_kill_9_and_the_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &[]);
    for i in 0..20 {
        set_rule(&d.socket, &format!("r{i}"), "3");
    }
    let socket = d.socket.clone();
    d.kill9();
    assert!(socket.exists(), "kill -9 leaves the socket file behind");
    let d = ProcessDaemon::start(dir.path(), &[]);
    assert_eq!(rule_ids(&d.socket).len(), 20);
    assert!(d.log().contains("replacing stale socket"), "{}", d.log());
}

#[test]
fn a_second_daemon_on_a_live_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = ProcessDaemon::start(dir.path(), &[]);
    let other_state = dir.path().join("other-state");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rld"))
        .arg("--socket")
        .arg(dir.path().join("rld.sock"))
        .arg("--state-dir")
        .arg(&other_state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("another rld is already serving"),
        "{}",
        stderr(&out)
    );
    // And a second daemon on the same state directory is refused too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rld"))
        .arg("--socket")
        .arg(dir.path().join("other.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("in use by another rld"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sigterm_answers_requests_already_sent() {
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let mut bytes = vec![0, 0, 0, 3, 1, 0, 1];
    for _ in 0..1000 {
        bytes.extend_from_slice(&[0, 0, 0, 9, 2, 1, 1, b'a', 1, b'b', 1, 1, 0]);
    }
    s.write_all(&bytes).unwrap();
    let mut first = [0u8; 4];
    s.read_exact(&mut first).unwrap();
    d.signal(Signal::SIGTERM);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    // The HelloOk plus 1000 decisions, all complete.
    let mut frames = 0;
    let mut all = first.to_vec();
    all.extend(rest);
    let mut at = 0;
    while at + 4 <= all.len() {
        let len = u32::from_be_bytes(all[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len;
        frames += 1;
    }
    assert_eq!((frames, at), (1001, all.len()));
    let status = d.wait();
    assert!(status.success());
}

/// A client pipelining without pause across SIGTERM: every request is
/// answered in order, first with decisions, then (once the drain has taken
/// what was sent before the stop) with shutting_down, never a decision after
/// a shutting_down, and the connection then closes cleanly.
#[test]
fn sigterm_answers_later_requests_shutting_down() {
    // A flat-out load: not alongside the timing-sensitive fault tests.
    let _heavy = crate::harness::HEAVY.blocking_write();
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.write_all(&[0, 0, 0, 3, 1, 0, 1]).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        // Ids 2.. until the daemon closes; bounded at 500,000 requests.
        let mut id = 2u64;
        let mut chunk = Vec::new();
        while id < 500_000 {
            chunk.clear();
            for _ in 0..4096 {
                let mut frame = BytesMut::new();
                let request = Request::Acquire(Acquire::new("a", "b"));
                encode(&RequestFrame { id, request }, &mut frame).unwrap();
                chunk.extend_from_slice(&frame);
                id += 1;
            }
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    // HelloOk and the first decision: the stop comes while requests flow.
    let mut all = Vec::new();
    for _ in 0..2 {
        let mut header = [0u8; 4];
        s.read_exact(&mut header).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        s.read_exact(&mut body).unwrap();
        all.extend_from_slice(&header);
        all.extend(body);
    }
    d.signal(Signal::SIGTERM);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest); // EOF, or a reset after the close
    all.extend(rest);
    let (mut decided, mut refused, mut next_id, mut at) = (0u64, 0u64, 2u64, 0);
    while at + 4 <= all.len() {
        let len = u32::from_be_bytes(all[at..at + 4].try_into().unwrap()) as usize;
        let Some(body) = all.get(at + 4..at + 4 + len) else {
            panic!("a cut answer frame")
        };
        at += 4 + len;
        let frame = decode_response(body).unwrap();
        match frame.response {
            Response::HelloOk { .. } => continue,
            Response::Decision(_) => {
                assert_eq!(refused, 0, "a decision after a shutting_down");
                decided += 1;
            }
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::SHUTTING_DOWN, "{e}");
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(frame.id, next_id, "answers in order, none skipped");
        next_id += 1;
    }
    eprintln!("across SIGTERM: {decided} decided, then {refused} shutting_down");
    assert!(decided > 0);
    drop(s);
    sending.join().unwrap();
    assert!(d.wait().success());
}

#[test]
fn sighup_reloads_config_rules_and_keeps_them_when_the_file_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rld.toml");
    let write = |limit: &str| {
        std::fs::write(
            &config,
            format!("[[rule]]\nid = \"cfg\"\nclient = \"*\"\nresource = \"*\"\nlimit = {limit}\nwindow = \"1h\"\n"),
        )
        .unwrap()
    };
    write("5");
    let d = ProcessDaemon::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let limit = |d: &ProcessDaemon| {
        let out = rlctl(&d.socket, &["rules", "get", "cfg", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["limit"].as_u64().unwrap(),
            v["source"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(limit(&d), (5, "config".into()));
    let del = rlctl(&d.socket, &["rules", "delete", "cfg"]);
    assert_eq!(code(&del), 2);
    assert!(stderr(&del).contains("config file"), "{}", stderr(&del));
    write("9");
    d.signal(Signal::SIGHUP);
    wait_for(Duration::from_secs(5), || limit(&d).0 == 9);
    std::fs::write(&config, "[[rule]]\nid = \"cfg\"\nlimit = \"lots\"\n").unwrap();
    d.signal(Signal::SIGHUP);
    wait_for(Duration::from_secs(5), || {
        d.log().contains("reload refused")
    });
    assert_eq!(limit(&d).0, 9, "the last good rules stay in force");
}

#[test]
fn check_config_reports_problems_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rld.toml");
    std::fs::write(
        &config,
        "[[rule]]\nid = \"a\"\nclient = \"x\"\nresource = \"*\"\nlimit = 1\nwindow = \"1s\"\n\
         [[rule]]\nid = \"b\"\nclient = \"x\"\nresource = \"*\"\nlimit = 2\nwindow = \"1s\"\n",
    )
    .unwrap();
    let run = |path: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rld"))
            .args(["--check-config", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = run(&config);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("same client and resource patterns"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&config, "max_buckets = 10\n[[rule]]\nid = \"a\"\nclient = \"x\"\nresource = \"*\"\nlimit = 1\nwindow = \"1s\"\n").unwrap();
    let out = run(&config);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("config OK"), "{}", stdout(&out));
}

/// The state directory and its files are 0750/0640 whatever the umask, the
/// previous generation of the rules file is kept, and `--check-config`
/// catches a config rule whose id clashes with a persisted one (naming the
/// file) instead of letting the start fail.
#[test]
fn state_files_are_private_keep_a_generation_and_are_checked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &[]);
    for limit in ["5", "6"] {
        let out = rlctl(
            &d.socket,
            &[
                "rules",
                "set",
                "x",
                "--client",
                "*",
                "--resource",
                "r",
                "--limit",
                limit,
                "--window",
                "1m",
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    assert!(d.terminate().success());
    let state = dir.path().join("state");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o750);
    assert_eq!(mode(&state.join("rules.toml")), 0o640);
    let prev = std::fs::read_to_string(state.join("rules.toml.prev")).unwrap();
    assert!(prev.contains("limit = 5"), "{prev}");
    assert!(
        std::fs::read_to_string(state.join("rules.toml"))
            .unwrap()
            .contains("limit = 6")
    );

    let config = dir.path().join("rld.toml");
    std::fs::write(
        &config,
        "[[rule]]\nid = \"x\"\nclient = \"*\"\nresource = \"other\"\nlimit = 1\nwindow = \"1s\"\n",
    )
    .unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_rld"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2), "{}", stderr(&check));
    assert!(
        stderr(&check).contains("rules.toml"),
        "the error names the state file: {}",
        stderr(&check)
    );
}

/// Patterns with control or bidirectional characters are refused when set,
/// by rlctl (exit 2, the field named) and by the daemon (a client that is
/// not rlctl); one loaded from an older state file still loads, and rlctl
/// shows it escaped: no ESC reaches the terminal, no newline splits a row.
#[test]
fn patterns_with_control_characters_are_refused_and_old_ones_shown_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("rules.toml"),
        "[[rule]]\nid = \"old\"\nclient = \"a\\u001b[31mRED\"\nresource = \"line\\nbreak\"\n\
         limit = 5\nwindow = \"1m\"\n",
    )
    .unwrap();
    let d = ProcessDaemon::start(dir.path(), &[]);

    let list = rlctl(&d.socket, &["rules", "list"]);
    assert_eq!(code(&list), 0, "{}", stderr(&list));
    let text = stdout(&list);
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert!(text.contains("a\\u{1b}[31mRED"), "{text}");
    assert!(text.contains("line\\nbreak"), "{text}");
    assert_eq!(text.lines().count(), 2, "a header and one row: {text}");
    let get = rlctl(&d.socket, &["rules", "get", "old"]);
    assert_eq!(code(&get), 0, "{}", stderr(&get));
    assert!(!stdout(&get).contains('\u{1b}'), "{}", stdout(&get));
    assert!(
        stdout(&get).contains("resource      line\\nbreak"),
        "{}",
        stdout(&get)
    );

    for (flag, value) in [
        ("--client", "x\u{1b}[2J"),
        ("--resource", "a\nb"),
        ("--client", "\u{202E}gnp.exe"),
    ] {
        let mut args = vec!["rules", "set", "new", "--limit", "1", "--window", "1s"];
        args.extend(["--client", "*", "--resource", "r"]);
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
        let out = rlctl(&d.socket, &args);
        assert_eq!(code(&out), 2, "{value:?}: {}", stderr(&out));
        let field = flag.trim_start_matches("--");
        assert!(stderr(&out).contains(field), "{value:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains('\u{1b}'), "{}", stderr(&out));
    }
    // The daemon refuses it from any client.
    let mut client = rld::protocol::client::blocking::Client::connect(&d.socket).unwrap();
    let spec = rld::rule::RuleSpec::new("new", "x\u{1b}[2J", "r", 1, Duration::from_secs(1));
    let err = client.rule_set(vec![spec]).unwrap_err().to_string();
    assert!(err.contains("client"), "{err}");
    // Ids refuse bidirectional controls too.
    let spec = rld::rule::RuleSpec::new("a\u{202E}b", "*", "r", 1, Duration::from_secs(1));
    let err = client.rule_set(vec![spec]).unwrap_err().to_string();
    assert!(err.contains("id"), "{err}");
    assert_eq!(rule_ids(&d.socket), vec!["old".to_string()]);
}

/// A state path of the wrong type says what is wrong at start, not "could
/// not save rules" (nothing was being saved).
#[test]
fn a_state_path_of_the_wrong_type_says_what_is_wrong() {
    let run = |state: &std::path::Path, socket: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rld"))
            .arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(state)
            .output()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state-file");
    std::fs::write(&file, "").unwrap();
    let out = run(&file, &dir.path().join("a.sock"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not a directory"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("could not save"), "{}", stderr(&out));

    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("rules.toml")).unwrap();
    let out = run(&state, &dir.path().join("b.sock"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("rules.toml: this state file is a directory"),
        "{}",
        stderr(&out)
    );
}

//! `rlctl` as shell scripts use it: output, `--json`, and exit codes
//! (0 ok, 1 denied, 2 bad input, 3 daemon unreachable or failed).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::harness::{TestDaemon, code, rlctl_async, rule, stderr, stdout};

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_exit_codes_follow_the_decision() {
    let d = TestDaemon::start(vec![]).await;
    let s = &d.socket;
    let set = rlctl_async(
        s,
        &[
            "rules",
            "set",
            "jobs",
            "--client",
            "*",
            "--resource",
            "nightly",
            "--limit",
            "1",
            "--window",
            "1h",
        ],
    )
    .await;
    assert_eq!(code(&set), 0, "{}", stderr(&set));
    let ok = rlctl_async(s, &["acquire", "host-1", "nightly"]).await;
    assert_eq!(code(&ok), 0);
    assert!(stdout(&ok).contains("allowed"), "{}", stdout(&ok));
    let denied = rlctl_async(s, &["acquire", "host-1", "nightly"]).await;
    assert_eq!(code(&denied), 1);
    assert!(
        stdout(&denied).contains("retry after"),
        "{}",
        stdout(&denied)
    );
    let quiet = rlctl_async(s, &["acquire", "-q", "host-1", "nightly"]).await;
    assert_eq!((code(&quiet), stdout(&quiet).as_str()), (1, ""));
    let json = rlctl_async(s, &["acquire", "--json", "host-2", "nightly"]).await;
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["outcome"], "allowed");
    assert_eq!(v["rule"], "jobs");
    let too_big = rlctl_async(s, &["acquire", "--cost", "5", "host-3", "nightly"]).await;
    assert_eq!(code(&too_big), 2);
    assert!(
        stderr(&too_big).contains("can never be allowed"),
        "{}",
        stderr(&too_big)
    );
    let usage = rlctl_async(s, &["acquire", "--priority", "urgent", "a", "b"]).await;
    assert_eq!(code(&usage), 2);
    let unreachable = rlctl_async(&d.dir.path().join("nope.sock"), &["acquire", "a", "b"]).await;
    assert_eq!(code(&unreachable), 3);
    let err = stderr(&unreachable);
    assert!(
        err.contains("is rld running?") && err.lines().count() == 1,
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_sleeps_for_retry_after_and_times_out() {
    // Hourly: the next token is far beyond any --timeout here, whatever the
    // machine's speed. Per second: a wait of at most a second succeeds.
    let d = TestDaemon::start(vec![
        rule("slow", "*", "r", 1, HOUR),
        rule("soon", "*", "s", 1, Duration::from_secs(1)),
    ])
    .await;
    let s = &d.socket;
    assert_eq!(code(&rlctl_async(s, &["acquire", "c", "r"]).await), 0);
    // The next token is an hour away, beyond the 10 s timeout: rlctl gives
    // up at once (exit 1), without waiting the 10 s.
    let asked = std::time::Instant::now();
    let gave_up = rlctl_async(s, &["acquire", "c", "r", "--wait", "--timeout", "10s"]).await;
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "it did not wait out the timeout"
    );
    assert_eq!(code(&gave_up), 1, "{}", stdout(&gave_up));
    assert!(
        stderr(&gave_up).contains("gave up waiting"),
        "{}",
        stderr(&gave_up)
    );
    assert_eq!(code(&rlctl_async(s, &["acquire", "c", "s"]).await), 0);
    let waited = rlctl_async(s, &["acquire", "c", "s", "--wait", "--timeout", "30s"]).await;
    assert_eq!(code(&waited), 0, "{}", stdout(&waited));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_executes_only_when_allowed() {
    let d = TestDaemon::start(vec![rule("once", "*", "deploy", 1, HOUR)]).await;
    let marker = d.dir.path().join("ran");
    let m = marker.to_str().unwrap();
    let args = [
        "run",
        "--client",
        "ci",
        "--resource",
        "deploy",
        "--",
        "touch",
        m,
    ];
    let first = rlctl_async(&d.socket, &args).await;
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    assert!(marker.exists());
    std::fs::remove_file(&marker).unwrap();
    let second = rlctl_async(&d.socket, &args).await;
    assert_eq!(
        code(&second),
        75,
        "denied is EX_TEMPFAIL, not the command's 1"
    );
    assert!(!marker.exists(), "a denied command is not run");
    assert!(
        stderr(&second).contains("not running touch"),
        "{}",
        stderr(&second)
    );
    // The command's own status passes through.
    let d2 = TestDaemon::start(vec![]).await;
    let fail = rlctl_async(
        &d2.socket,
        &[
            "run",
            "--client",
            "c",
            "--resource",
            "r",
            "--",
            "sh",
            "-c",
            "exit 7",
        ],
    )
    .await;
    assert_eq!(code(&fail), 7);
    let mut denied = args.to_vec();
    denied.splice(1..1, ["--denied-exit", "9"]);
    assert_eq!(code(&rlctl_async(&d.socket, &denied).await), 9);
    // A command that cannot start: 127 / 126 like a shell, and no token is
    // taken for it (the one-per-hour token of a fresh client is still there).
    let missing = rlctl_async(
        &d.socket,
        &[
            "run",
            "--client",
            "fresh",
            "--resource",
            "deploy",
            "--",
            "no-such-command-rld",
        ],
    )
    .await;
    assert_eq!(code(&missing), 127, "{}", stderr(&missing));
    let script = d.dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let not_exec = rlctl_async(
        &d.socket,
        &[
            "run",
            "--client",
            "fresh",
            "--resource",
            "deploy",
            "--",
            script.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code(&not_exec), 126, "{}", stderr(&not_exec));
    let still = rlctl_async(&d.socket, &["acquire", "fresh", "deploy"]).await;
    assert_eq!(
        code(&still),
        0,
        "no token was spent on unstartable commands"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_commands_round_trip_and_import_is_all_or_nothing() {
    let d = TestDaemon::start(vec![]).await;
    let s = &d.socket;
    let file = d.dir.path().join("rules.toml");
    std::fs::write(
        &file,
        "[[rule]]\nid = \"a\"\nclient = \"team-*\"\nresource = \"*\"\nlimit = 10\nwindow = \"1m\"\n\
         [[rule]]\nid = \"b\"\nclient = \"*\"\nresource = \"search\"\nlimit = 5\nwindow = \"1s\"\nburst = 20\n",
    )
    .unwrap();
    let import = rlctl_async(s, &["rules", "import", file.to_str().unwrap()]).await;
    assert_eq!(code(&import), 0, "{}", stderr(&import));
    let list = rlctl_async(s, &["rules", "list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["burst"], 20);
    assert_eq!(v[1]["window"], "1s");
    let table = stdout(&rlctl_async(s, &["rules", "list"]).await);
    assert!(
        table.starts_with("ID") && table.contains("team-*"),
        "{table}"
    );

    // A file with the same id twice, differently: refused, nothing changes.
    std::fs::write(
        &file,
        "[[rule]]\nid = \"c\"\nclient = \"x\"\nresource = \"*\"\nlimit = 1\nwindow = \"1s\"\n\
         [[rule]]\nid = \"c\"\nclient = \"x\"\nresource = \"*\"\nlimit = 2\nwindow = \"1s\"\n",
    )
    .unwrap();
    let dup = rlctl_async(s, &["rules", "import", file.to_str().unwrap()]).await;
    assert_eq!(code(&dup), 2);
    assert!(stderr(&dup).contains("defined twice"), "{}", stderr(&dup));
    std::fs::write(
        &file,
        "[[rule]]\nid = \"d\"\nclient = \"x\"\nresource = \"*\"\nlimit = 1\nwindow = \"often\"\n",
    )
    .unwrap();
    let bad = rlctl_async(s, &["rules", "import", file.to_str().unwrap()]).await;
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("window"), "{}", stderr(&bad));

    let get = rlctl_async(s, &["rules", "get", "b", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["source"].as_str()),
        (Some("b"), Some("runtime"))
    );
    assert_eq!(code(&rlctl_async(s, &["rules", "delete", "b"]).await), 0);
    let gone = rlctl_async(s, &["rules", "get", "b"]).await;
    assert_eq!(code(&gone), 2);
    assert!(
        stderr(&gone).contains("no rule with id"),
        "{}",
        stderr(&gone)
    );
    let count = stdout(&rlctl_async(s, &["rules", "list", "--json"]).await);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&count)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rules_from_flags_exit_2() {
    let d = TestDaemon::start(vec![]).await;
    let s = &d.socket;
    for (args, needle) in [
        (vec!["--limit", "0", "--window", "1s"], "limit"),
        (vec!["--limit", "1", "--window", "0s"], "window"),
        (vec!["--limit", "1", "--window", "fortnightly"], "window"),
        (
            vec!["--limit", "1", "--window", "1s", "--burst", "0"],
            "burst",
        ),
        (
            vec!["--limit", "1", "--window", "1s", "--scope", "global"],
            "etcd",
        ),
        (
            vec!["--limit", "1", "--window", "1s", "--accuracy", "2%/10s"],
            "accuracy",
        ),
    ] {
        let mut full = vec!["rules", "set", "r", "--client", "*", "--resource", "*"];
        full.extend(args);
        let out = rlctl_async(s, &full).await;
        assert_eq!(code(&out), 2, "{full:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{full:?}: {}", stderr(&out));
    }
    assert_eq!(d.shared.limiter.rules().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_health_json_have_the_documented_fields() {
    let d = TestDaemon::start(vec![rule("r", "*", "*", 1, HOUR)]).await;
    let s = &d.socket;
    rlctl_async(s, &["acquire", "a", "b"]).await;
    rlctl_async(s, &["acquire", "a", "b"]).await;
    let stats = rlctl_async(s, &["stats", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(v["allowed"].as_u64(), Some(1));
    assert_eq!(v["rejected"].as_u64(), Some(1));
    assert_eq!(v["buckets"].as_u64(), Some(1));
    assert!(v["latency"]["p99_ns"].as_u64().is_some());
    let text = stdout(&rlctl_async(s, &["stats"]).await);
    assert!(
        text.contains("allowed 1  rejected 1") && text.contains("p99"),
        "{text}"
    );
    let health = rlctl_async(s, &["health", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(v["state"], "ok");
    assert_eq!(code(&health), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_change_rules_but_anyone_who_connects_may_acquire() {
    if !nix::unistd::geteuid().is_root() {
        // Acting as another user needs root; CI runs as root, so it never skips there.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run as root"
        );
        eprintln!("skipped: needs root to act as another user");
        return;
    }
    let d = TestDaemon::start_with(|c| c.socket_mode = 0o666).await;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A rule set by root (this process), which nobody may then delete.
    let keep = rld::rule::RuleSpec::new("keep", "*", "k", 5, Duration::from_secs(60));
    d.connect().await.rule_set(vec![keep]).await.unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_rlctl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args);
        cmd.output().expect("setpriv")
    };
    let denied = as_nobody(&[
        "rules",
        "set",
        "r",
        "--client",
        "*",
        "--resource",
        "*",
        "--limit",
        "1",
        "--window",
        "1s",
    ]);
    assert_eq!(code(&denied), 3, "{}", stderr(&denied));
    assert!(
        stderr(&denied).contains("may not set rules"),
        "{}",
        stderr(&denied)
    );
    let delete = as_nobody(&["rules", "delete", "keep"]);
    assert_eq!(code(&delete), 3, "{}", stderr(&delete));
    assert!(
        stderr(&delete).contains("may not delete rules"),
        "{}",
        stderr(&delete)
    );
    let acquire = as_nobody(&["acquire", "a", "b"]);
    assert_eq!(code(&acquire), 0, "{}", stderr(&acquire));
    let rules = d.shared.limiter.rules();
    assert_eq!(rules.len(), 1, "only root's rule");
    assert!(rules.get("keep").is_some());
}

/// Against a stopped daemon (SIGSTOP: the socket accepts, nothing answers)
/// rlctl gives up after --timeout with exit 3 and says so, in JSON too; a
/// wait is bounded by --timeout as a whole.
#[test]
fn a_stopped_daemon_cannot_hang_rlctl() {
    use nix::sys::signal::Signal;
    let dir = tempfile::tempdir().unwrap();
    let d = crate::harness::ProcessDaemon::start(dir.path(), &[]);
    let set = crate::harness::rlctl(
        &d.socket,
        &[
            "rules",
            "set",
            "once",
            "--client",
            "*",
            "--resource",
            "r",
            "--limit",
            "1",
            "--window",
            "1h",
        ],
    );
    assert_eq!(code(&set), 0, "{}", stderr(&set));
    d.signal(Signal::SIGSTOP);
    let health = crate::harness::rlctl(&d.socket, &["health", "--timeout", "300ms"]);
    let json = crate::harness::rlctl(&d.socket, &["health", "--json", "--timeout", "300ms"]);
    let waited = crate::harness::rlctl(
        &d.socket,
        &["acquire", "c", "r", "--wait", "--timeout", "500ms"],
    );
    d.signal(Signal::SIGCONT);
    assert_eq!(code(&health), 3, "{}", stderr(&health));
    assert!(
        stderr(&health).contains("no answer from rld"),
        "{}",
        stderr(&health)
    );
    assert_eq!(code(&json), 3);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON on failure");
    assert_eq!(v["exit"], 3, "{v}");
    assert!(v["error"].as_str().unwrap().contains("no answer"), "{v}");
    assert_eq!(code(&waited), 3, "{}", stderr(&waited));
    // Serving again: the same commands answer.
    assert_eq!(code(&crate::harness::rlctl(&d.socket, &["health"])), 0);
}

/// Completion scripts for the shells, generated from the same definitions:
/// the bash one is valid bash and knows the subcommands.
#[test]
fn completions_are_generated_for_the_shells() {
    let bash = std::process::Command::new(env!("CARGO_BIN_EXE_rlctl"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert_eq!(code(&bash), 0, "{}", stderr(&bash));
    let script = stdout(&bash);
    assert!(script.contains("_rlctl") && script.contains("acquire") && script.contains("rules"));
    let mut check = std::process::Command::new("bash")
        .arg("-n")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(
        check.wait().unwrap().success(),
        "bash -n rejects the script"
    );
    for (shell, marker) in [("zsh", "#compdef rlctl"), ("fish", "complete -c rlctl")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlctl"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(stdout(&out).contains(marker), "{shell}");
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_rlctl"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(code(&bad), 2);
}

/// Admin by the admin group, primary or supplementary, decided from the
/// credentials taken at connect (SO_PEERCRED / SO_PEERGROUPS), and refused
/// otherwise. Needs root to run rlctl as other users.
#[test]
fn admin_group_members_by_primary_or_supplementary_group_may_change_rules() {
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this test needs root under CI"
        );
        eprintln!("skipped: needs root to act as other users");
        return;
    }
    const ADMIN: u32 = 4242;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("rld.toml");
    std::fs::write(&config, "socket_mode = \"0666\"\n").unwrap();
    let d = crate::harness::ProcessDaemon::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--admin-group",
            &ADMIN.to_string(),
        ],
    );
    let as_user = |uid: u32, gid: u32, groups: &'static [u32], id: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rlctl"));
        cmd.args(["-s", d.socket.to_str().unwrap()])
            .args(["rules", "set", id, "--client", "*", "--resource", id])
            .args(["--limit", "1", "--window", "1h"]);
        // SAFETY: only async-signal-safe credential calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let gids: Vec<nix::unistd::Gid> = groups
                    .iter()
                    .map(|g| nix::unistd::Gid::from_raw(*g))
                    .collect();
                nix::unistd::setgroups(&gids)?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
                Ok(())
            });
        }
        cmd.output().unwrap()
    };
    let supplementary = as_user(23001, 23001, &[ADMIN], "by-supplementary");
    assert_eq!(code(&supplementary), 0, "{}", stderr(&supplementary));
    let primary = as_user(23002, ADMIN, &[], "by-primary");
    assert_eq!(code(&primary), 0, "{}", stderr(&primary));
    let outsider = as_user(23003, 23003, &[23003], "by-outsider");
    assert_ne!(code(&outsider), 0);
    assert!(
        stderr(&outsider).contains("may not"),
        "{}",
        stderr(&outsider)
    );
}

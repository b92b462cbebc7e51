//! Stacked limits from the shell: rules keyed per client, per resource or
//! not at all apply together, all or nothing; shadows; the README's example;
//! bad values; clients of protocol version 2.

use crate::harness::{TestDaemon, code, rlctl_async, stderr, stdout};

async fn set(socket: &std::path::Path, args: &[&str]) {
    let mut all = vec!["rules", "set"];
    all.extend_from_slice(args);
    let out = rlctl_async(socket, &all).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_example_works_as_written() {
    let d = TestDaemon::start(vec![]).await;
    let s = &d.socket;
    // As README.md's Rules section shows it.
    for line in [
        "search-each  --client '*' --resource 'search/*' --limit 100   --window 1m --per client",
        "search-vip   --client vip --resource 'search/*' --limit 1000  --window 1m --per client",
        "search-total --client '*' --resource 'search/*' --limit 10000 --window 1m --per none",
    ] {
        let args: Vec<String> = line
            .split_whitespace()
            .map(|a| a.trim_matches('\'').to_owned())
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        set(s, &args).await;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (client, expected) in [
        ("alice", "allowed: 99 remaining (rule search-each)"),
        ("vip", "allowed: 999 remaining (rule search-vip)"),
    ] {
        assert!(
            readme.contains(&format!("# {expected}")),
            "README shows {expected:?}"
        );
        let out = rlctl_async(s, &["acquire", client, "search/books"]).await;
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(stdout(&out).trim(), expected);
    }
    let list = stdout(&rlctl_async(s, &["rules", "list"]).await);
    let row = |id: &str| {
        list.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no {id} in {list}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(list.starts_with("ID") && list.lines().next().unwrap().contains("PER"));
    assert_eq!(row("search-each")[3], "client");
    assert_eq!(row("search-total")[3], "none");
    // search-total admitted both requests, each of the others one.
    assert_eq!(row("search-total").last().unwrap(), "0");
    assert_eq!(row("search-total")[row("search-total").len() - 2], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_total_stacked_on_per_client_limits_charges_nothing_it_denies() {
    let d = TestDaemon::start(vec![]).await;
    let s = &d.socket;
    set(
        s,
        &[
            "each",
            "--client",
            "*",
            "--resource",
            "jobs",
            "--limit",
            "2",
            "--window",
            "1h",
            "--per",
            "client",
        ],
    )
    .await;
    set(
        s,
        &[
            "total",
            "--client",
            "*",
            "--resource",
            "jobs",
            "--limit",
            "3",
            "--window",
            "1h",
            "--per",
            "none",
        ],
    )
    .await;
    let ask = |c: &'static str| async move {
        let out = rlctl_async(s, &["acquire", c, "jobs"]).await;
        (code(&out), stdout(&out))
    };
    assert_eq!(ask("a").await.0, 0);
    assert_eq!(ask("a").await.0, 0);
    let (c, out) = ask("a").await;
    assert_eq!(c, 1);
    assert!(out.contains("rule each"), "{out}");
    assert_eq!(ask("b").await.0, 0);
    // The total is spent: b is denied by it, and b's own bucket keeps its
    // token (the denied request charged nothing).
    let (c, out) = ask("b").await;
    assert_eq!(c, 1);
    assert!(out.contains("rule total"), "{out}");
    let get = rlctl_async(s, &["rules", "get", "each", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(
        (v["allowed"].as_u64(), v["rejected"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(v["per"], serde_json::json!(["client"]));
    // Requests, not rule counts, in the totals.
    let stats = rlctl_async(s, &["stats", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(
        (v["allowed"].as_u64(), v["rejected"].as_u64()),
        (Some(3), Some(2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_never_denies_and_counts_what_it_would_have_done() {
    let d = TestDaemon::start(vec![]).await;
    let s = &d.socket;
    set(
        s,
        &[
            "cap",
            "--client",
            "*",
            "--resource",
            "x",
            "--limit",
            "1",
            "--window",
            "1h",
            "--per",
            "none",
            "--shadow",
        ],
    )
    .await;
    for _ in 0..3 {
        let out = rlctl_async(s, &["acquire", "a", "x"]).await;
        assert_eq!(code(&out), 0, "a shadow never denies: {}", stdout(&out));
    }
    let get = stdout(&rlctl_async(s, &["rules", "get", "cap"]).await);
    assert!(get.contains("would allow 1  would deny 2"), "{get}");
    assert!(get.contains("shadow        yes"), "{get}");
    let list = stdout(&rlctl_async(s, &["rules", "list"]).await);
    assert!(list.contains("none (shadow)"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_per_and_shadow_values_are_refused_naming_the_field() {
    let d = TestDaemon::start(vec![]).await;
    let s = &d.socket;
    set(
        s,
        &[
            "keep",
            "--client",
            "*",
            "--resource",
            "x",
            "--limit",
            "1",
            "--window",
            "1h",
        ],
    )
    .await;
    let bad = rlctl_async(
        s,
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
            "--per",
            "tenant",
        ],
    )
    .await;
    assert_eq!(code(&bad), 2);
    assert!(
        stderr(&bad).contains("--per") && stderr(&bad).contains("client,resource"),
        "{}",
        stderr(&bad)
    );
    let bad = rlctl_async(
        s,
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
            "--shadow",
            "--scope",
            "global",
            "--on-failure",
            "open",
        ],
    )
    .await;
    assert_eq!(code(&bad), 2);
    assert!(
        stderr(&bad).contains("on_failure") && stderr(&bad).contains("shadow"),
        "{}",
        stderr(&bad)
    );
    // The same patterns with another per stack; with the same per they are
    // ambiguous, as before.
    set(
        s,
        &[
            "keep-total",
            "--client",
            "*",
            "--resource",
            "x",
            "--limit",
            "5",
            "--window",
            "1h",
            "--per",
            "none",
        ],
    )
    .await;
    let clash = rlctl_async(
        s,
        &[
            "rules",
            "set",
            "clash",
            "--client",
            "*",
            "--resource",
            "x",
            "--limit",
            "5",
            "--window",
            "1h",
        ],
    )
    .await;
    assert_eq!(code(&clash), 2, "{}", stderr(&clash));
    assert!(stderr(&clash).contains("same per"), "{}", stderr(&clash));
    // A TOML file with a bad per: refused naming the field; nothing changes.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(
        &file,
        "[[rule]]\nid = \"t\"\nclient = \"*\"\nresource = \"y\"\nlimit = 1\nwindow = \"1s\"\nper = [\"client\", \"client\"]\n",
    )
    .unwrap();
    let import = rlctl_async(s, &["rules", "import", file.to_str().unwrap()]).await;
    assert_eq!(code(&import), 2);
    assert!(
        stderr(&import).contains("per names \"client\" twice"),
        "{}",
        stderr(&import)
    );
    let list = rlctl_async(s, &["rules", "list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["keep", "keep-total"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_client_sees_rules_in_its_layout_and_stacked_decisions() {
    use rld::protocol::codec::{decode_response, encode};
    use rld::protocol::{Request, RequestFrame, Response};
    use std::io::{Read, Write};
    let d = TestDaemon::start(vec![]).await;
    let s = d.socket.clone();
    set(
        &s,
        &[
            "each",
            "--client",
            "*",
            "--resource",
            "x",
            "--limit",
            "1",
            "--window",
            "1h",
            "--per",
            "client",
        ],
    )
    .await;
    let answers = tokio::task::spawn_blocking(move || {
        let mut sock = std::os::unix::net::UnixStream::connect(&s).unwrap();
        let mut call = |id: u64, request: Request<'static>| {
            let mut buf = bytes::BytesMut::new();
            encode(&RequestFrame { id, request }, &mut buf).unwrap();
            sock.write_all(&buf).unwrap();
            let mut len = [0u8; 4];
            sock.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            sock.read_exact(&mut body).unwrap();
            decode_response(&body).unwrap().response
        };
        vec![
            call(1, Request::Hello { version: 2 }),
            call(2, Request::RuleGet { id: "each".into() }),
            call(3, Request::Acquire(rld::protocol::Acquire::new("a", "x"))),
            call(4, Request::Acquire(rld::protocol::Acquire::new("a", "x"))),
        ]
    })
    .await
    .unwrap();
    assert!(
        matches!(answers[0], Response::Welcome(_)),
        "{:?}",
        answers[0]
    );
    match &answers[1] {
        Response::Rule(info) => assert_eq!(info.spec.id, "each"),
        other => panic!("{other:?}"),
    }
    match (&answers[2], &answers[3]) {
        (Response::Decision(a), Response::Decision(b)) => {
            assert_eq!(a.outcome, rld::protocol::Outcome::Allowed);
            assert_eq!(b.outcome, rld::protocol::Outcome::Denied);
            assert_eq!(b.rule, "each");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_every_rule_and_spends_nothing() {
    let d = TestDaemon::start(vec![]).await;
    let s = &d.socket;
    set(
        s,
        &[
            "each",
            "--client",
            "*",
            "--resource",
            "api/*",
            "--limit",
            "2",
            "--window",
            "1h",
            "--per",
            "client",
        ],
    )
    .await;
    set(
        s,
        &[
            "vip",
            "--client",
            "vip",
            "--resource",
            "api/*",
            "--limit",
            "5",
            "--window",
            "1h",
            "--per",
            "client",
        ],
    )
    .await;
    set(
        s,
        &[
            "total",
            "--client",
            "*",
            "--resource",
            "api/*",
            "--limit",
            "100",
            "--window",
            "1h",
            "--per",
            "none",
        ],
    )
    .await;
    set(
        s,
        &[
            "next",
            "--client",
            "*",
            "--resource",
            "*",
            "--limit",
            "1",
            "--window",
            "1h",
            "--per",
            "resource",
            "--shadow",
        ],
    )
    .await;
    let explain = |args: &'static [&'static str]| async move {
        let out = rlctl_async(s, args).await;
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    for _ in 0..3 {
        let v = explain(&["explain", "vip", "api/x", "--json"]).await;
        assert_eq!(v["allowed"], true);
        assert_eq!(v["rule"], "vip");
        assert_eq!(v["remaining"], 4);
        let rules = v["rules"].as_array().unwrap();
        let ids: Vec<&str> = rules.iter().map(|r| r["id"].as_str().unwrap()).collect();
        // Grouped by per, most specific first: vip overrides each.
        assert_eq!(ids, ["vip", "each", "next", "total"]);
        assert_eq!(rules[1]["overridden_by"], "vip");
        assert_eq!(rules[1]["applies"], false);
        assert_eq!(rules[0]["tokens"], 5, "nothing spent: {v}");
        assert_eq!(rules[2]["shadow"], true);
        assert_eq!(rules[3]["bucket"], "(one for all)");
    }
    // Spend two of "each" for bob; explain then says denied by it, and
    // still spends nothing.
    for _ in 0..2 {
        assert_eq!(
            code(&rlctl_async(s, &["acquire", "-q", "bob", "api/x"]).await),
            0
        );
    }
    let v = explain(&["explain", "bob", "api/y", "--json"]).await;
    assert_eq!(
        (v["allowed"].as_bool(), v["rule"].as_str()),
        (Some(false), Some("each"))
    );
    // vip does not match bob: each, next, total.
    let total = &v["rules"].as_array().unwrap()[2];
    assert_eq!(
        (total["id"].as_str(), total["tokens"].as_u64()),
        (Some("total"), Some(98))
    );
    assert_eq!(total["outcome"], "allowed");
    let text = stdout(&rlctl_async(s, &["explain", "bob", "api/y", "--cost", "3"]).await);
    assert!(text.starts_with("would be   rate limited"), "{text}");
    assert!(text.contains("never (cost above its burst)"), "{text}");
    assert!(
        text.contains("overridden by") || !text.contains("vip"),
        "{text}"
    );
    let get = rlctl_async(s, &["rules", "get", "total", "--json"]).await;
    let g: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(g["allowed"], 2, "explain decided nothing: {g}");
    // Bad names: a clear error, exit 2.
    let bad = rlctl_async(s, &["explain", "", "api/x"]).await;
    assert_eq!(code(&bad), 2, "{}", stderr(&bad));
}

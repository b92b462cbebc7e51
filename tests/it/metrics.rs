//! The Prometheus endpoint (`--metrics-listen`): what a scrape reports
//! agrees with `rlctl stats`, passes `promtool check metrics`, is read back
//! through a real Prometheus server, and bad addresses are refused at start.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Etcd, HEAVY, ProcessDaemon, code, rlctl, set_rule, stderr, wait_for};

/// An HTTP/1.0 request over `stream`: (status, head, body).
fn http(mut stream: impl Read + Write, request: &str) -> (u16, String, String) {
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn get(addr: &str, path: &str, accept: &str) -> (u16, String, String) {
    let stream = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    http(
        stream,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"),
    )
}

/// Samples of a text exposition by series (`name{labels}`).
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn sample(all: &HashMap<String, f64>, series: &str) -> f64 {
    *all.get(series)
        .unwrap_or_else(|| panic!("no {series} in the scrape"))
}

/// Runs Debian's `promtool check metrics` on `body` (required under CI).
fn promtool_check(body: &str) {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

/// A tool from the `prometheus` package, or `None` outside CI when it is
/// missing.
fn tool(name: &str) -> Option<&str> {
    if Command::new(name).arg("--version").output().is_ok() {
        return Some(name);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{name} is missing under CI: scripts/test installs Debian's prometheus package"
    );
    eprintln!("skipped: {name} is not installed (run scripts/test)");
    None
}

fn stats(socket: &Path) -> serde_json::Value {
    let out = rlctl(socket, &["stats", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn acquire(socket: &Path, resource: &str, n: usize) {
    for _ in 0..n {
        let out = rlctl(socket, &["acquire", "c", resource]);
        assert!(matches!(code(&out), 0 | 1), "{}", stderr(&out));
    }
}

#[test]
fn a_scrape_reports_what_stats_reports_and_passes_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let addr = d.metrics_addr();
    set_rule(&d.socket, "api", &["--limit", "5", "--window", "1h"]);
    acquire(&d.socket, "api", 8);
    // An unmatched request, and an invalid one (cost above the burst).
    acquire(&d.socket, "nothing-matches", 1);
    let out = rlctl(&d.socket, &["acquire", "c", "api", "--cost", "100"]);
    assert_ne!(code(&out), 0);
    let s = stats(&d.socket);

    let (status, head, body) = get(&addr, "/metrics", "*/*");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    promtool_check(&body);
    let m = samples(&body);
    let rule = &s["per_rule"][0];
    assert_eq!(rule["id"], "api");
    for outcome in ["allowed", "rejected", "bypassed"] {
        assert_eq!(
            sample(
                &m,
                &format!(r#"rld_decisions_total{{rule="api",outcome="{outcome}"}}"#)
            ),
            rule[outcome].as_f64().unwrap(),
            "{outcome}"
        );
    }
    assert_eq!(rule["allowed"], 5);
    assert_eq!(rule["rejected"], 3);
    assert_eq!(
        sample(&m, r#"rld_decisions_total{rule="",outcome="unmatched"}"#),
        s["unmatched"].as_f64().unwrap()
    );
    assert_eq!(s["unmatched"], 1);
    for (series, field) in [
        ("rld_buckets", "buckets"),
        ("rld_buckets_max", "max_buckets"),
        ("rld_rules", "rules"),
        ("rld_connections_accepted_total", "connections_total"),
        ("rld_protocol_errors_total", "protocol_errors"),
    ] {
        assert_eq!(sample(&m, series), s[field].as_f64().unwrap(), "{series}");
    }
    assert_eq!(
        sample(&m, r#"rld_error_answers_total{code="cost_exceeds_burst"}"#),
        1.0
    );
    // The latency histogram counts what stats counts, bucket by bucket
    // non-decreasing up to +Inf.
    let count = sample(&m, "rld_decision_duration_seconds_count");
    assert_eq!(count, s["latency"]["count"].as_f64().unwrap());
    assert!(count >= 1.0);
    assert_eq!(
        sample(&m, r#"rld_decision_duration_seconds_bucket{le="+Inf"}"#),
        count
    );
    assert!(
        body.contains(r#"rld_build_info{version=""#),
        "no build info: {body}"
    );
    // Standalone: no etcd families.
    assert!(!body.contains("rld_etcd_state"), "{body}");

    // OpenMetrics when asked for.
    let (status, head, body) = get(
        &addr,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(body.contains(r#"rld_decisions_total{rule="api",outcome="allowed"} 5"#));

    // Elsewhere: 404 and 405 with what to do.
    let (status, _, body) = get(&addr, "/", "*/*");
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");
    let stream = std::net::TcpStream::connect(&addr).unwrap();
    let (status, head, _) = http(
        stream,
        "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, 405);
    assert!(head.contains("allow: get, head"), "{head}");
}

#[test]
fn a_unix_socket_endpoint_serves_metrics_and_is_removed_at_exit() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.sock");
    let d = ProcessDaemon::start(dir.path(), &["--metrics-listen", path.to_str().unwrap()]);
    assert!(d.log().contains("metrics served on unix:"), "{}", d.log());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (status, _, body) = http(stream, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    assert!(samples(&body).contains_key("rld_uptime_seconds"), "{body}");
    assert!(d.terminate().success());
    assert!(!path.exists(), "the metrics socket outlived the daemon");
}

/// Runs `rld` expecting it to refuse to start: (exit code, stderr).
fn refused_start(dir: &Path, args: &[&str]) -> (i32, String) {
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_rld"))
        .arg("--socket")
        .arg(dir.join("rld.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .env_remove("RLD_SOCKET")
        .env_remove("RLD_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rld {args:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

#[test]
fn bad_metrics_addresses_are_refused_at_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let (status, err) = refused_start(dir.path(), &["--metrics-listen", "localhost:9464"]);
    assert_eq!(status, 2, "{err}");
    assert!(
        err.contains("--metrics-listen") && err.contains("127.0.0.1:9464"),
        "{err}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, err) = refused_start(dir.path(), &["--metrics-listen", &addr]);
    assert_eq!(status, 1, "{err}");
    assert!(
        err.contains(&addr) && err.contains("in use") && err.contains("--metrics-listen"),
        "{err}"
    );
    // The main socket was not left behind.
    assert!(!dir.path().join("rld.sock").exists());

    let config = dir.path().join("rld.toml");
    std::fs::write(&config, "metrics_listen = \"9464\"\n").unwrap();
    let (status, err) = refused_start(dir.path(), &["--config", config.to_str().unwrap()]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("metrics_listen"), "{err}");
}

/// Metric names the dashboard's queries use.
fn dashboard_metrics() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/grafana/rld.json");
    let text = std::fs::read_to_string(&path).expect("dist/grafana/rld.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("dist/grafana/rld.json is valid JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    if k == "expr" {
                        out.push(v.as_str().expect("expr is a string").to_owned());
                    } else {
                        walk(v, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 6,
        "the dashboard has {} queries",
        exprs.len()
    );
    let mut names: Vec<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("rld_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn etcd_mode_exports_cluster_state_and_lease_figures() {
    let Some(etcd) = Etcd::get() else { return };
    let _group = HEAVY.blocking_read();
    let dir = tempfile::tempdir().unwrap();
    let mut args = etcd.args("m1");
    // Traces on (towards nothing), so that their families are there too.
    args.extend(
        [
            "--metrics-listen",
            "127.0.0.1:0",
            "--otlp-endpoint",
            "http://127.0.0.1:9",
            "--trace-sample-ratio",
            "0",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = ProcessDaemon::start(dir.path(), &args);
    let addr = d.metrics_addr();
    set_rule(
        &d.socket,
        "g",
        &["--limit", "100", "--window", "1s", "--scope", "global"],
    );
    wait_for(Duration::from_secs(10), || {
        code(&rlctl(&d.socket, &["acquire", "c", "g"])) == 0
    });
    acquire(&d.socket, "g", 5);
    let mut m = HashMap::new();
    wait_for(Duration::from_secs(10), || {
        m = samples(&get(&addr, "/metrics", "*/*").2);
        m.get(r#"rld_etcd_state{state="healthy"}"#) == Some(&1.0)
            && m.contains_key(r#"rld_global_held_tokens{rule="g"}"#)
    });
    for state in ["suspect", "degraded", "recovering"] {
        assert_eq!(
            sample(&m, &format!(r#"rld_etcd_state{{state="{state}"}}"#)),
            0.0
        );
    }
    assert_eq!(sample(&m, "rld_etcd_members"), 1.0);
    assert!(sample(&m, r#"rld_lease_txns_total{result="answered"}"#) >= 1.0);
    assert_eq!(sample(&m, r#"rld_lease_txns_total{result="failed"}"#), 0.0);
    assert!(sample(&m, "rld_lease_txn_duration_seconds_count") >= 1.0);
    // One daemon alone holds the whole rule (count 1), in force for most of
    // its lease's TTL.
    assert_eq!(sample(&m, "rld_share_daemons"), 1.0);
    assert!(sample(&m, "rld_share_valid_seconds") > 1.0);
    assert_eq!(sample(&m, "rld_etcd_nospace"), 0.0);
    assert!(sample(&m, "rld_etcd_db_size_bytes") > 0.0);
    // The bound is the one `rlctl rules get` shows.
    let out = rlctl(&d.socket, &["rules", "get", "g", "--json"]);
    let rule: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        sample(&m, r#"rld_global_overadmission_bound_tokens{rule="g"}"#),
        rule["lease"]["bound"].as_f64().unwrap()
    );
    let body = get(&addr, "/metrics", "*/*").2;
    promtool_check(&body);
    // Every metric the Grafana dashboard queries exists.
    let families: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let known = |name: &str| {
        families.iter().any(|f| {
            name == *f
                || ["_bucket", "_sum", "_count", "_info"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f))
        })
    };
    for name in dashboard_metrics() {
        assert!(
            known(&name),
            "dist/grafana/rld.json queries {name}, which rld does not export"
        );
    }
    // README's table names every family rld exports, and only those.
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("\n## Metrics\n").nth(1).unwrap();
    let section = &section[..section.find("\n## ").unwrap()];
    let mut documented: Vec<&str> = section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.starts_with("rld_"))
        .map(|w| w.split('{').next().unwrap())
        .collect();
    documented.sort_unstable();
    documented.dedup();
    for name in &documented {
        assert!(
            known(name),
            "README documents {name}, which rld does not export"
        );
    }
    for family in &families {
        assert!(
            documented
                .iter()
                .any(|d| d == family || d.strip_suffix("_info") == Some(family)),
            "rld exports {family}, which README's Metrics table does not list"
        );
    }
}

/// A Prometheus server of our own, stopped by PID when dropped.
struct Prometheus {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free now (the kernel's choice, released for the server).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_prometheus_server_scrapes_rld_and_reads_back_the_decisions_counter() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let target = d.metrics_addr();
    set_rule(&d.socket, "api", &["--limit", "7", "--window", "1h"]);
    acquire(&d.socket, "api", 10);
    let allowed = stats(&d.socket)["per_rule"][0]["allowed"].as_u64().unwrap();
    assert_eq!(allowed, 7);

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rld\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("prometheus.log");
    let server = Prometheus {
        child: Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus"),
        log,
    };
    let query =
        "/api/v1/query?query=rld_decisions_total%7Brule%3D%22api%22%2Coutcome%3D%22allowed%22%7D";
    let mut last = String::new();
    let start = Instant::now();
    let found = loop {
        if let Ok(stream) = std::net::TcpStream::connect(&web) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let (status, _, body) = http(stream, &format!("GET {query} HTTP/1.0\r\n\r\n"));
            if status == 200 {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                if let Some(value) = v["data"]["result"][0]["value"][1].as_str() {
                    break Some(value.to_owned());
                }
            }
            last = body;
        }
        if start.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let Some(value) = found else {
        panic!(
            "Prometheus never had the counter; last answer {last}; its log:\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
    };
    assert_eq!(value, allowed.to_string());
}

#[test]
fn scrape_connections_beyond_the_cap_are_answered_503() {
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let addr = d.metrics_addr();
    // 16 connections that send nothing hold every slot...
    let idle: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // ...so the next scrape is told to come back (once the daemon has
    // accepted them all: poll).
    let mut last = 0;
    wait_for(Duration::from_secs(10), || {
        let (status, head, body) = get(&addr, "/metrics", "*/*");
        last = status;
        status == 503 && head.contains("retry-after: 1") && body.contains("retry shortly")
    });
    assert_eq!(last, 503);
    assert!(d.log().contains("answering 503"), "{}", d.log());
    // Their slots come back when they close.
    drop(idle);
    wait_for(Duration::from_secs(10), || {
        get(&addr, "/metrics", "*/*").0 == 200
    });
}

//! Documentation stays true: man pages are generated from the clap
//! definitions (regenerate with `RLD_BLESS=1 cargo test --test it docs`),
//! every page renders without groff warnings, and the README's commands exist.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("man")
}

/// Renders a command and its subcommands (`rlctl-rules-set.1`, ...).
fn render(cmd: clap::Command, section: &str, prefix: &str, pages: &mut Vec<(String, Vec<u8>)>) {
    let name = if prefix.is_empty() {
        cmd.get_name().to_owned()
    } else {
        format!("{prefix}-{}", cmd.get_name())
    };
    let cmd = cmd.name(name.clone()).version(env!("CARGO_PKG_VERSION"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(section)
        .date("2026-11-28")
        .source(format!("rld {}", env!("CARGO_PKG_VERSION")))
        .manual("rld manual")
        .render(&mut buf)
        .unwrap();
    match name.as_str() {
        "rld" => buf.extend_from_slice(rld::daemon::config::MAN_EXTRA.as_bytes()),
        "rlctl" => buf.extend_from_slice(rld::cli::MAN_EXTRA.as_bytes()),
        _ => {}
    }
    pages.push((format!("{name}.{section}"), buf));
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        render(sub.clone(), section, &name, pages);
    }
}

fn generated() -> Vec<(String, Vec<u8>)> {
    let mut pages = Vec::new();
    render(rld::daemon::Args::command(), "8", "", &mut pages);
    render(rld::cli::Args::command(), "1", "", &mut pages);
    pages
}

#[test]
fn man_pages_match_the_clap_definitions() {
    let bless = std::env::var_os("RLD_BLESS").is_some();
    let mut stale = Vec::new();
    for (name, text) in generated() {
        let path = man_dir().join(&name);
        if bless {
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read(&path).ok().as_deref() != Some(&text[..]) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "man pages out of date: {stale:?}; run `RLD_BLESS=1 cargo test --test it docs` and commit man/"
    );
}

#[test]
fn every_man_page_renders_cleanly() {
    if std::process::Command::new("groff")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "groff is missing under CI"
        );
        return;
    }
    let mut checked = 0;
    for entry in std::fs::read_dir(man_dir()).unwrap() {
        let path = entry.unwrap().path();
        let out = std::process::Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&path)
            .output()
            .unwrap();
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && warnings.is_empty(),
            "{}: {warnings}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 4);
}

/// Splits one shell command line into words: quotes and backslashes as sh
/// does for the simple lines a README shows (no globbing, `$(...)` kept as
/// one word).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '$' if chars.peek() == Some(&'(') => {
                in_word = true;
                let mut depth = 0;
                word.push('$');
                for c in chars.by_ref() {
                    word.push(c);
                    match c {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            // A comment runs to the end of the line.
            '#' if !in_word => break,
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Every `rld` and `rlctl` command in the README's shell blocks parses with
/// the real argument definitions: no command, subcommand or flag the
/// binaries do not have.
#[test]
fn the_readme_commands_exist() {
    use clap::Parser;
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut in_sh = false;
    let mut pending = String::new();
    let mut checked = 0;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line.trim() == "```sh";
            continue;
        }
        if !in_sh || line.trim_start().starts_with('#') {
            continue;
        }
        // Backslash continuations make one command.
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let full = std::mem::take(&mut pending) + line;
        // Separate commands: ; && || | and shell keywords.
        let normalized = full.replace("&&", ";").replace("||", ";").replace('|', ";");
        for part in normalized.split(';') {
            let mut words = shell_words(part);
            while words
                .first()
                .is_some_and(|w| ["if", "then", "else", "!", "exec"].contains(&w.as_str()))
            {
                words.remove(0);
            }
            let Some(first) = words.first() else { continue };
            let result = match first.as_str() {
                "rlctl" => rld::cli::Args::try_parse_from(&words).map(drop),
                "rld" => rld::daemon::Args::try_parse_from(&words).map(drop),
                _ => continue,
            };
            if let Err(e) = result {
                // --help/--version are fine; anything else is a README bug.
                assert!(
                    matches!(
                        e.kind(),
                        clap::error::ErrorKind::DisplayHelp
                            | clap::error::ErrorKind::DisplayVersion
                    ),
                    "README command `{}` does not parse: {e}",
                    words.join(" ")
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} commands found in README.md");
}

/// Each default rld.toml(5) states is the code's default.
#[test]
fn the_config_page_states_the_real_defaults() {
    let page = std::fs::read_to_string(man_dir().join("rld.toml.5")).unwrap();
    let stated = |key: &str| -> String {
        let line = page
            .lines()
            .find(|l| l.starts_with(&format!(".BR {key} ")))
            .unwrap_or_else(|| panic!("rld.toml(5) does not document {key}"));
        let at = line
            .find("default ")
            .unwrap_or_else(|| panic!("{key}: no default in {line:?}"))
            + "default ".len();
        let rest = &line[at..];
        let end = rest.find([')', ',']).unwrap_or(rest.len());
        rest[..end].replace("\\(dq", "").trim().to_owned()
    };
    let c = rld::daemon::Config::default();
    let e = rld::daemon::config::EtcdConfig::defaults(vec![]);
    let dur = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let expected: Vec<(&str, String)> = vec![
        ("socket_mode", format!("{:04o}", c.socket_mode)),
        ("max_buckets", c.max_buckets.to_string()),
        ("max_frame", c.max_frame.to_string()),
        ("max_connections", c.max_connections.to_string()),
        ("idle_timeout", dur(c.idle_timeout.unwrap())),
        ("write_timeout", dur(c.write_timeout)),
        ("answer_memory", c.answer_memory.to_string()),
        (
            "admin_connections",
            c.connections_kept_for_admins().to_string(),
        ),
        ("drain_timeout", dur(c.drain_timeout)),
        ("sweep_interval", dur(c.sweep_interval)),
        ("etcd_prefix", e.prefix.clone()),
        ("etcd_timeout", dur(e.timeout)),
        ("etcd_compact_interval", dur(e.compact_every)),
        ("fallback_slack", e.fallback_slack.to_string()),
        ("max_buckets_per_rule", e.max_buckets_per_rule.to_string()),
    ];
    assert_eq!(
        format!("{:?}", c.default_action).to_lowercase(),
        stated("default_action")
    );
    assert_eq!(
        format!("{:?}", e.default_on_failure).to_lowercase(),
        stated("default_on_failure")
    );
    for (key, value) in expected {
        assert_eq!(stated(key), value, "rld.toml(5) default of {key}");
    }
    assert!(
        page.contains(".BR max_connections_per_uid \" (integer, default: max_connections / 8)")
    );
    assert_eq!(c.per_uid_connections(), c.max_connections / 8);
    assert!(
        page.contains(".BR max_table_bytes \" (integer, default: a quarter of physical memory")
    );
}

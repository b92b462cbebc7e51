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

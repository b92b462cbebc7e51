//! Where `rlctl` output goes: stdout, as text or JSON. A closed pipe
//! (`rlctl rules list | head -1`) ends the command quietly instead of failing.

use std::fmt::Display;
use std::io::{self, Write};

use serde::Serialize;

use super::{CliError, Exit};
use crate::rule::escape_text;

/// Writes command output and remembers whether stdout went away.
#[derive(Debug)]
pub struct Output {
    json: bool,
    pipe_closed: bool,
}

impl Output {
    pub fn new(json: bool) -> Output {
        Output {
            json,
            pipe_closed: false,
        }
    }

    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Whether a write found stdout closed.
    pub fn pipe_closed(&self) -> bool {
        self.pipe_closed
    }

    /// Writes text followed by a newline.
    ///
    /// # Errors
    /// stdout is closed or failing.
    pub fn line(&mut self, text: impl Display) -> Result<(), CliError> {
        let mut stdout = io::stdout().lock();
        let result = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
        self.check(result)
    }

    /// Writes a value as pretty JSON.
    ///
    /// # Errors
    /// stdout is closed or failing.
    pub fn json_value<T: Serialize>(&mut self, value: &T) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| CliError::failure(format!("cannot encode JSON: {e}")))?;
        self.line(text)
    }

    /// Writes aligned columns with a header row.
    ///
    /// # Errors
    /// stdout is closed or failing.
    /// Every cell is shown escaped ([`escape_text`]): cells hold what
    /// clients named (ids, patterns), and a control character there would
    /// drive the terminal or split the row.
    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) -> Result<(), CliError> {
        let rows: Vec<Vec<String>> = rows
            .iter()
            .map(|row| row.iter().map(|c| escape_text(c).into_owned()).collect())
            .collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let render = |cells: &mut dyn Iterator<Item = &str>| {
            let mut line = String::new();
            for (i, (cell, w)) in cells.zip(&widths).enumerate() {
                if i + 1 == widths.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  "));
                }
            }
            line
        };
        let mut text = render(&mut header.iter().copied());
        for row in &rows {
            text.push('\n');
            text.push_str(&render(&mut row.iter().map(String::as_str)));
        }
        self.line(text)
    }

    fn check(&mut self, result: io::Result<()>) -> Result<(), CliError> {
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.pipe_closed = true;
                Err(CliError {
                    exit: Exit::Ok,
                    message: String::new(),
                })
            }
            Err(e) => Err(CliError::failure(format!("cannot write output: {e}"))),
        }
    }
}

/// A duration in nanoseconds for humans: `850ns`, `12.5µs`, `3.2ms`, `1.50s`, `2m 5s`.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        1_000_000_000..60_000_000_000 => format!("{:.2}s", ns as f64 / 1e9),
        _ => humantime::format_duration(std::time::Duration::from_secs(ns / 1_000_000_000))
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations() {
        assert_eq!(fmt_ns(850), "850ns");
        assert_eq!(fmt_ns(12_500), "12.5µs");
        assert_eq!(fmt_ns(3_200_000), "3.2ms");
        assert_eq!(fmt_ns(1_500_000_000), "1.50s");
        assert_eq!(fmt_ns(125_000_000_000), "2m 5s");
    }
}

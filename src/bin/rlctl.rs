//! `rlctl`: parse arguments, run the command, exit with its status.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    rld::cli::run(rld::cli::Args::parse())
}

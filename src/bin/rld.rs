//! `rld`: parse arguments and config, set up logging, run the daemon, and map
//! the outcome to an exit status (0 clean stop, 1 runtime failure, 2 bad
//! configuration).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use rld::daemon::{self, Args, Config};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("rld: invalid --log-level {:?}: {e}", args.log_level);
            return ExitCode::from(2);
        }
    };
    // Under systemd the journal adds its own timestamps.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }

    let config = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rld: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        return match daemon::check_config(&config) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rld: {e}");
                ExitCode::from(2)
            }
        };
    }
    // Sockets are checked for readiness every 8 task polls rather than 61:
    // a busy worker runs heavy turns of a few hundred decisions (see
    // `daemon::turns`), and a light client's request waits for the next
    // check, not for 61 of those turns.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .event_interval(8)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rld: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rld: {e}");
            ExitCode::from(1)
        }
    }
}

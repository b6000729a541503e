//! `pio`: run language models from the command line.
//!
//! Every subcommand resolves its arguments, loads what it needs through `pio-model`, and runs
//! through `pio-engine`. Errors print `error: ...` on stderr and exit with status 1.

mod args;
mod bench;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::FAILURE;
        }
        // Read once by the kernels' thread pool; set before any kernel runs (no threads yet).
        std::env::set_var("PIO_THREADS", n.to_string());
    }
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed stdout (`pio ... | head`) is not an error worth reporting.
            if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

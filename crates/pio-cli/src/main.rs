//! `pio`: run language models from the command line.
//!
//! Every subcommand resolves its arguments, loads what it needs through `pio-model`, and runs
//! through `pio-engine`. Errors print `error: ...` on stderr and exit with status 1.

mod args;
mod bench;
mod commands;
mod perplexity;
mod quantize;
mod serve;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    keep_freed_memory();
    // Usage errors exit 1 like every other error (clap's own default is 2); --help and --version
    // print and exit 0.
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { ExitCode::FAILURE } else { ExitCode::SUCCESS };
            let _ = e.print();
            return code;
        }
    };
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::FAILURE;
        }
        // Before any kernel runs: the pool is made at the first split.
        if !pio_kernels::parallel::set_num_threads(n) {
            eprintln!("error: the thread count was fixed before --threads could set it");
            return ExitCode::FAILURE;
        }
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

/// A forward pass allocates and frees activation buffers of a few MiB per layer. glibc returns
/// such blocks to the kernel (mmap'd chunks, or a trimmed heap top) and every next pass pays page
/// faults and page zeroing for them again: about a tenth of a 512-token prefill, measured with
/// `perf`. Keeping freed memory in the heap makes the buffers reusable. (Peak RSS is unchanged:
/// it is the largest set of buffers live at once either way.)
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

//! `pio`: run language models from the command line.
//!
//! Every subcommand resolves its arguments, loads what it needs through `pio-model`, and runs
//! through `pio-engine`. Errors print `error: ...` on stderr and exit with status 1.

mod args;
mod bench;
mod commands;
mod kv_cache;
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
    // The kernels' threads: an explicit pool for everything this command runs, the engine
    // thread included (it runs on the pool current where it is spawned).
    let pool = match cli.threads {
        Some(0) => {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::FAILURE;
        }
        Some(n) => pio_kernels::parallel::ThreadPool::new(n),
        None => pio_kernels::parallel::ThreadPool::default_pool(),
    };
    match pool.install(|| commands::run(cli)) {
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

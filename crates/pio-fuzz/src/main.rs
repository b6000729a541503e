//! `pio-fuzz`: the fuzz targets from the command line.
//!
//! - `pio-fuzz list`: the targets;
//! - `pio-fuzz seed DIR [TARGET...]`: writes each target's seed corpus to `DIR/<target>/`
//!   (what cargo-fuzz starts from);
//! - `pio-fuzz run TARGET SECONDS [SEED]`: the mutational driver (stable Rust, no coverage);
//! - `pio-fuzz replay TARGET FILE...`: runs the target on each file (a crash reproduced).

use std::process::ExitCode;
use std::time::Duration;

use pio_fuzz::{driver, seeds, target, TARGETS};

fn main() -> ExitCode {
    let code = run();
    pio_fuzz::remove_scratch();
    code
}

fn run() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: pio-fuzz list | seed DIR [TARGET...] | run TARGET SECONDS [SEED] | replay TARGET FILE...";
    let names = |given: &[String]| -> Vec<String> {
        if given.is_empty() {
            TARGETS.iter().map(|t| t.name.to_string()).collect()
        } else {
            given.to_vec()
        }
    };
    match args.first().map(String::as_str) {
        Some("list") => {
            for t in TARGETS {
                println!("{:<18} {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        Some("seed") if args.len() >= 2 => {
            for name in names(&args[2..]) {
                if target(&name).is_none() {
                    eprintln!("error: no target {name:?} (pio-fuzz list)");
                    return ExitCode::FAILURE;
                }
                let dir = std::path::Path::new(&args[1]).join(&name);
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    eprintln!("error: {}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
                let s = seeds(&name);
                for (i, input) in s.iter().enumerate() {
                    if let Err(e) = std::fs::write(dir.join(format!("seed-{i:03}")), input) {
                        eprintln!("error: {}: {e}", dir.display());
                        return ExitCode::FAILURE;
                    }
                }
                println!("{name}: {} seeds in {}", s.len(), dir.display());
            }
            ExitCode::SUCCESS
        }
        Some("run") if args.len() >= 3 => {
            let Some(t) = target(&args[1]) else {
                eprintln!("error: no target {:?} (pio-fuzz list)", args[1]);
                return ExitCode::FAILURE;
            };
            let Ok(secs) = args[2].parse::<f64>() else {
                eprintln!("{usage}");
                return ExitCode::FAILURE;
            };
            let seed = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
            match driver::fuzz(t, seeds(t.name), Duration::from_secs_f64(secs), seed) {
                Ok(s) => {
                    println!(
                        "{}: {} executions in {:.1} s ({:.0}/s), corpus {}, slowest {:.3} s, no crash",
                        t.name,
                        s.execs,
                        s.secs,
                        s.execs as f64 / s.secs.max(1e-9),
                        s.corpus,
                        s.slowest
                    );
                    ExitCode::SUCCESS
                }
                Err(c) => {
                    eprintln!("{}: crash: {}", t.name, c.message);
                    if let Some(p) = c.saved {
                        eprintln!("input saved to {}", p.display());
                    }
                    ExitCode::FAILURE
                }
            }
        }
        Some("replay") if args.len() >= 3 => {
            let Some(t) = target(&args[1]) else {
                eprintln!("error: no target {:?} (pio-fuzz list)", args[1]);
                return ExitCode::FAILURE;
            };
            for f in &args[2..] {
                match std::fs::read(f) {
                    Ok(input) => {
                        (t.run)(&input);
                        println!("{f}: ok");
                    }
                    Err(e) => {
                        eprintln!("error: {f}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{usage}");
            ExitCode::FAILURE
        }
    }
}

//! Every fuzz target, briefly, on stable Rust: its seeds and regression inputs first, then
//! random mutations of them for `PIO_FUZZ_SECONDS` seconds each (30 in CI, 3 otherwise). A
//! panic fails the test, naming the target, the message and where the input was saved.
//! (The targets run one after another in one test: a panic hook is process-wide.)

use std::time::Duration;

#[test]
fn every_target_survives_its_seeds_and_their_mutations() {
    let default = if std::env::var_os("CI").is_some() { 30.0 } else { 3.0 };
    let secs: f64 = std::env::var("PIO_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let mut failures = Vec::new();
    for t in pio_fuzz::TARGETS {
        let seeds = pio_fuzz::seeds(t.name);
        assert!(!seeds.is_empty(), "{}: no seeds", t.name);
        match pio_fuzz::driver::fuzz(t, seeds, Duration::from_secs_f64(secs), 7) {
            Ok(s) => eprintln!("{}: {} executions in {:.1} s, slowest {:.3} s", t.name, s.execs, s.secs, s.slowest),
            Err(c) => failures.push(format!("{}: {} (input: {:?})", t.name, c.message, c.saved)),
        }
    }
    assert!(failures.is_empty(), "crashes:\n{}", failures.join("\n"));
}

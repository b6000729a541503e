#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(t) = pio_fuzz::target("image") {
        (t.run)(data);
    }
});

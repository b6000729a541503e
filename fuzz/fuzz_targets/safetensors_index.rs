#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(t) = pio_fuzz::target("safetensors_index") {
        (t.run)(data);
    }
});

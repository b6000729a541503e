//! `pio quantize`: a model's weights quantized and written as a GGUF file (see
//! `pio_model::quantize` for which format each tensor gets).

use std::time::Instant;

use anyhow::Result;

use crate::args::QuantizeArgs;

pub fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let start = Instant::now();
    let summary = pio_model::quantize::write_quantized_gguf(&a.model, a.quant, &a.out)?;
    let types: Vec<String> = summary
        .weight_types
        .iter()
        .map(|(d, n, b)| format!("{d} x{n} ({:.1} MiB)", *b as f64 / (1 << 20) as f64))
        .collect();
    eprintln!(
        "wrote {}: {}; {:.1} MB in {:.1}s",
        a.out.display(),
        types.join(", "),
        summary.file_bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    if let Some((path, bytes)) = &summary.mmproj {
        eprintln!("wrote {} (the vision tower, llama.cpp's mmproj): {:.1} MB", path.display(), *bytes as f64 / 1e6);
    }
    Ok(())
}

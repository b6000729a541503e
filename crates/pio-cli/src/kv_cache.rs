//! `pio kv-cache`: what a model's KV cache costs per token in each cache type, and how many
//! tokens a memory budget holds, from its config alone (no weights are read); for a model with
//! recurrent layers, also the state every sequence keeps however long it is.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pio_model::config::ModelConfig;
use pio_model::{CacheSpec, KvCacheDtype, KvCacheType};
use serde_json::json;

use crate::commands::out;

#[derive(Debug, Args)]
pub struct KvCacheArgs {
    /// A Hugging Face config.json, or a model directory holding one.
    #[arg(long)]
    pub config: PathBuf,
    /// The memory budget to fill (as `pio serve --kv-cache-mem`: bytes, or with a unit: 512MiB).
    #[arg(long, default_value = "1GiB", value_parser = crate::serve::parse_size)]
    pub kv_cache_mem: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Tokens per block, as the engine allocates them.
const BLOCK_SIZE: usize = 16;

pub fn cmd_kv_cache(a: KvCacheArgs) -> Result<()> {
    let path = if a.config.is_dir() { a.config.join("config.json") } else { a.config.clone() };
    let config = ModelConfig::from_hf_file(&path).with_context(|| format!("reading {}", path.display()))?;
    let spec = CacheSpec::from_config(&config);
    let mut types: Vec<KvCacheType> = KvCacheDtype::ALL.into_iter().map(KvCacheType::both).collect();
    types.push(KvCacheType { k: KvCacheDtype::Q8_0, v: KvCacheDtype::Q4_0 });
    let rows: Vec<serde_json::Value> = types
        .iter()
        .map(|&t| match spec.check(t) {
            Ok(()) => {
                let per_block = spec.bytes_per_block(t, BLOCK_SIZE);
                json!({
                    "cache_type_k": t.k.name(),
                    "cache_type_v": t.v.name(),
                    "bytes_per_token": per_block as f64 / BLOCK_SIZE as f64,
                    "tokens": a.kv_cache_mem / per_block * BLOCK_SIZE,
                })
            }
            Err(e) => json!({"cache_type_k": t.k.name(), "cache_type_v": t.v.name(), "error": e}),
        })
        .collect();
    if a.json {
        let v = json!({
            "config": path.display().to_string(),
            "arch": config.arch_name,
            "num_layers": config.num_layers,
            "kv_cache_mem": a.kv_cache_mem,
            "block_size": BLOCK_SIZE,
            "state_bytes_per_sequence": spec.state_bytes_per_seq(),
            "types": rows,
        });
        return out(&format!("{v}\n"));
    }
    out(&format!(
        "{} ({} layers): KV cache per token, and tokens in {} bytes ({:.2} GiB)\n",
        config.arch_name,
        config.num_layers,
        a.kv_cache_mem,
        a.kv_cache_mem as f64 / (1u64 << 30) as f64
    ))?;
    let state = spec.state_bytes_per_seq();
    if state > 0 {
        let recurrent = spec.layers.iter().filter(|l| matches!(l, pio_model::LayerCache::Recurrent { .. })).count();
        out(&format!(
            "recurrent state per sequence ({recurrent} of {} layers, f32, any length): {state} bytes ({:.2} MiB)\n",
            config.num_layers,
            state as f64 / (1u64 << 20) as f64
        ))?;
    }
    out(&format!("{:<8} {:<8} {:>14} {:>12}\n", "K", "V", "bytes/token", "tokens"))?;
    for r in &rows {
        let (k, v) = (r["cache_type_k"].as_str().unwrap_or(""), r["cache_type_v"].as_str().unwrap_or(""));
        match r.get("error") {
            Some(e) => out(&format!("{k:<8} {v:<8} {}\n", e.as_str().unwrap_or("")))?,
            None => out(&format!(
                "{k:<8} {v:<8} {:>14.1} {:>12}\n",
                r["bytes_per_token"].as_f64().unwrap_or(0.0),
                r["tokens"].as_u64().unwrap_or(0)
            ))?,
        }
    }
    Ok(())
}

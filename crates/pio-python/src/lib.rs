//! The native half of the Python package `inference_pio` (`inference_pio._native`): a loaded
//! model behind the Rust engine ([`pio_engine::plugin::EnginePlugin`]), its requests run to the
//! end or streamed. The package's Python half (`python/inference_pio`) builds the plugin API and
//! the `LLM` class on it.
//!
//! The GIL is released while a model loads, while a request waits for the engine and while the
//! engine stops, so requests from several Python threads batch together in the engine.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pio_engine::engine::{FinishReason, RequestOutput, RequestParams, TokenLogprob};
use pio_engine::handle::{Event, RequestStream};
use pio_engine::plugin::{EnginePlugin, ModelPlugin, PluginOptions};
use pio_engine::sampler::SamplingParams;
use pio_engine::spec::{SpecConfig, SpecMethod};
use pio_engine::EngineError;
use pio_kernels::DType;
use pio_model::{KvCacheDtype, KvCacheType, LoadOptions};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

create_exception!(
    inference_pio._native,
    InferencePIOError,
    PyException,
    "The engine failed: a model that does not load (missing, truncated or corrupt file, unknown architecture), an unloaded model, a stopped engine, a full queue."
);

/// An engine error as a Python exception: `ValueError` for what the caller asked wrongly (bad
/// sampling values, a prompt longer than the context, an image the model cannot take),
/// [`InferencePIOError`] for the rest.
fn py_err(e: EngineError) -> PyErr {
    match e {
        EngineError::Invalid(_) | EngineError::Sampling(_) | EngineError::PromptTooLong { .. } => {
            PyValueError::new_err(e.to_string())
        }
        EngineError::Model(pio_model::Error::Image(_) | pio_model::Error::Template(_)) => {
            PyValueError::new_err(e.to_string())
        }
        _ => InferencePIOError::new_err(e.to_string()),
    }
}

/// A value of `params[key]`, converted, or a `ValueError` naming the key.
fn get<'py, T: FromPyObjectOwned<'py>>(params: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<T>> {
    match params.get_item(key)? {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v.extract::<T>().map(Some).map_err(|e| {
            let e: PyErr = e.into();
            PyValueError::new_err(format!("{key}: {e}"))
        }),
    }
}

/// The keys [`request_params`] takes (the package's `SamplingParams` fields).
const PARAM_KEYS: [&str; 15] = [
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "logit_bias",
];

/// A request's parameters from a dict of [`PARAM_KEYS`] (absent or `None`: greedy, no limit
/// but the context, the model's end-of-sequence tokens). The engine checks the values' ranges.
fn request_params(params: Option<&Bound<'_, PyDict>>) -> PyResult<RequestParams> {
    let mut p = RequestParams::default();
    let Some(d) = params else { return Ok(p) };
    for key in d.keys() {
        let key: String = key.extract()?;
        if !PARAM_KEYS.contains(&key.as_str()) {
            return Err(PyValueError::new_err(format!("unknown sampling parameter {key:?}")));
        }
    }
    let greedy = SamplingParams::greedy();
    p.sampling = SamplingParams {
        temperature: get(d, "temperature")?.unwrap_or(greedy.temperature),
        top_k: get(d, "top_k")?.unwrap_or(greedy.top_k),
        top_p: get(d, "top_p")?.unwrap_or(greedy.top_p),
        min_p: get(d, "min_p")?.unwrap_or(greedy.min_p),
        repetition_penalty: get(d, "repetition_penalty")?.unwrap_or(greedy.repetition_penalty),
        presence_penalty: get(d, "presence_penalty")?.unwrap_or(greedy.presence_penalty),
        frequency_penalty: get(d, "frequency_penalty")?.unwrap_or(greedy.frequency_penalty),
        seed: get(d, "seed")?,
    };
    p.max_tokens = get(d, "max_tokens")?;
    p.min_tokens = get(d, "min_tokens")?.unwrap_or(0);
    p.stop = get(d, "stop")?.unwrap_or_default();
    p.stop_token_ids = get(d, "stop_token_ids")?.unwrap_or_default();
    p.ignore_eos = get(d, "ignore_eos")?.unwrap_or(false);
    p.logprobs = get(d, "logprobs")?;
    let bias: Option<std::collections::HashMap<u32, f32>> = get(d, "logit_bias")?;
    p.logit_bias = bias.map(|b| b.into_iter().collect()).unwrap_or_default();
    Ok(p)
}

/// A KV cache type by name (`f16`, `q8_0`, ...).
fn kv_dtype(name: Option<&str>) -> PyResult<KvCacheDtype> {
    match name {
        None => Ok(KvCacheDtype::default()),
        Some(n) => n.parse().map_err(|e| PyValueError::new_err(format!("{e}"))),
    }
}

/// One finished request or one streamed step, as Python values.
#[derive(Default)]
struct Output {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Option<Vec<TokenLogprob>>,
    finish_reason: Option<FinishReason>,
    prompt_tokens: usize,
    cached_tokens: usize,
}

impl Output {
    fn add(&mut self, o: RequestOutput, want_logprobs: bool) {
        self.text.push_str(&o.text);
        self.token_ids.extend(o.token_ids);
        if want_logprobs {
            self.logprobs.get_or_insert_with(Vec::new).extend(o.logprobs);
        }
        self.finish_reason = o.finish_reason.or(self.finish_reason);
        self.prompt_tokens = o.num_prompt_tokens;
        self.cached_tokens = o.num_cached_tokens;
    }

    fn into_dict(self, py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("text", self.text)?;
        d.set_item("token_ids", self.token_ids)?;
        d.set_item("finish_reason", self.finish_reason.map(FinishReason::as_str))?;
        d.set_item("prompt_tokens", self.prompt_tokens)?;
        d.set_item("cached_tokens", self.cached_tokens)?;
        match self.logprobs {
            None => d.set_item("logprobs", py.None())?,
            Some(lps) => {
                let list = PyList::empty(py);
                for lp in lps {
                    let e = PyDict::new(py);
                    e.set_item("token_id", lp.token)?;
                    e.set_item("logprob", lp.logprob)?;
                    e.set_item("top", lp.top)?;
                    list.append(e)?;
                }
                d.set_item("logprobs", list)?;
            }
        }
        Ok(d)
    }
}

/// A model loaded behind its engine. Its methods may be called from several threads at once;
/// their requests batch together.
#[pyclass(frozen, module = "inference_pio._native")]
struct Engine {
    plugin: Mutex<Option<Arc<EnginePlugin>>>,
}

impl Engine {
    fn plugin(&self) -> PyResult<Arc<EnginePlugin>> {
        let p = self.plugin.lock().unwrap_or_else(|e| e.into_inner()).clone();
        p.ok_or_else(|| InferencePIOError::new_err("the model is unloaded"))
    }

    /// The prompt's token ids and the request's parameters: `ids` as given, `text` tokenized,
    /// or `messages` (JSON) through the chat template; `images` (encoded files) for a
    /// vision-language model, besides those of the messages' `image_url` parts.
    fn prepare(
        &self,
        prompt: Prompt,
        images: Vec<Vec<u8>>,
        mut p: RequestParams,
    ) -> PyResult<(Arc<EnginePlugin>, Vec<u32>, RequestParams)> {
        let plugin = self.plugin()?;
        for img in &images {
            p.images.push(plugin.image(img).map_err(py_err)?);
        }
        let ids = match prompt {
            Prompt::Ids(ids) => ids,
            Prompt::Text(t) => plugin.text_prompt(&t, p.images.len()).map_err(py_err)?,
            Prompt::Messages(json) => {
                let messages: Vec<serde_json::Value> = serde_json::from_str(&json)
                    .map_err(|e| PyValueError::new_err(format!("messages are not a JSON list of objects: {e}")))?;
                plugin.chat_prompt(&messages, &mut p).map_err(py_err)?
            }
        };
        Ok((plugin, ids, p))
    }

    /// Prepares and queues a request; images decode and prompts tokenize without the GIL too.
    fn start(
        &self,
        py: Python<'_>,
        spec: Prompt,
        images: Vec<Vec<u8>>,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Started> {
        let p = request_params(params)?;
        py.detach(|| {
            let (plugin, ids, p) = self.prepare(spec, images, p)?;
            let inner = plugin.submit(ids.clone(), &p).map_err(py_err)?;
            Ok(Started { plugin, prompt_token_ids: ids, want_logprobs: p.logprobs.is_some(), inner })
        })
    }
}

/// A queued request, as [`Engine::start`] leaves it.
struct Started {
    plugin: Arc<EnginePlugin>,
    prompt_token_ids: Vec<u32>,
    want_logprobs: bool,
    inner: RequestStream,
}

/// What a request continues.
enum Prompt {
    Ids(Vec<u32>),
    Text(String),
    Messages(String),
}

fn prompt_of(ids: Option<Vec<u32>>, text: Option<String>, messages_json: Option<String>) -> PyResult<Prompt> {
    match (ids, text, messages_json) {
        (Some(ids), None, None) => Ok(Prompt::Ids(ids)),
        (None, Some(t), None) => Ok(Prompt::Text(t)),
        (None, None, Some(m)) => Ok(Prompt::Messages(m)),
        _ => Err(PyValueError::new_err("give exactly one of prompt_token_ids, prompt and messages_json")),
    }
}

#[pymethods]
impl Engine {
    /// Loads the model at `path` (a GGUF file or a Hugging Face directory) and starts its
    /// engine. Options as the CLI's: `quant` (quantize at load: q8_0, q4_k, ...), `threads`,
    /// `kv_cache_bytes`, `cache_type_k` / `cache_type_v` (f16, bf16, f32, q8_0, q4_0),
    /// `max_model_len`, `max_num_seqs`, `mmproj` (a Qwen3-VL GGUF's vision file), `repack`,
    /// `bf16_activations`, `max_memory` (bytes: stream what does not fit from disk).
    #[new]
    #[pyo3(signature = (path, *, quant=None, threads=None, kv_cache_bytes=None, cache_type_k=None,
        cache_type_v=None, max_model_len=None, max_num_seqs=16, mmproj=None, repack=true,
        bf16_activations=true, max_memory=None, spec_method=None, spec_tokens=8, spec_ngram=5,
        spec_ngram_min=3, spec_draft_model=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        quant: Option<&str>,
        threads: Option<usize>,
        kv_cache_bytes: Option<usize>,
        cache_type_k: Option<&str>,
        cache_type_v: Option<&str>,
        max_model_len: Option<usize>,
        max_num_seqs: usize,
        mmproj: Option<PathBuf>,
        repack: bool,
        bf16_activations: bool,
        max_memory: Option<usize>,
        spec_method: Option<&str>,
        spec_tokens: usize,
        spec_ngram: usize,
        spec_ngram_min: usize,
        spec_draft_model: Option<PathBuf>,
    ) -> PyResult<Engine> {
        let quant = match quant {
            None => None,
            Some(q) => Some(DType::from_name(q).ok_or_else(|| {
                let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
                PyValueError::new_err(format!("quant {q:?}: unknown format (known: {})", names.join(", ")))
            })?),
        };
        let spec = match spec_method {
            None => None,
            Some(m) => match m.parse::<SpecMethod>().map_err(PyValueError::new_err)? {
                SpecMethod::Ngram => {
                    if spec_tokens == 0 || spec_tokens > 64 || spec_ngram_min == 0 || spec_ngram < spec_ngram_min {
                        return Err(PyValueError::new_err(format!(
                            "speculative decoding: need 1 <= num_speculative_tokens <= 64 (got {spec_tokens}) and \
                             1 <= prompt_lookup_min <= prompt_lookup_max (got {spec_ngram_min}, {spec_ngram})"
                        )));
                    }
                    Some(SpecConfig::ngram(spec_tokens, spec_ngram, spec_ngram_min))
                }
                method @ (SpecMethod::Draft | SpecMethod::Mtp) => {
                    if spec_tokens == 0 || spec_tokens > 64 {
                        return Err(PyValueError::new_err(format!(
                            "speculative decoding: need 1 <= num_speculative_tokens <= 64 (got {spec_tokens})"
                        )));
                    }
                    Some(if method == SpecMethod::Mtp {
                        SpecConfig::mtp(spec_tokens)
                    } else {
                        SpecConfig::draft(spec_tokens)
                    })
                }
            },
        };
        let draft_model = match (spec.map(|s| s.method), spec_draft_model) {
            (Some(SpecMethod::Draft), Some(p)) => {
                if !p.exists() {
                    return Err(InferencePIOError::new_err(format!("{}: no such file or directory", p.display())));
                }
                Some(p)
            }
            (Some(SpecMethod::Draft), None) => {
                return Err(PyValueError::new_err("speculative_config: a draft model needs its 'model' path"))
            }
            (_, Some(_)) => {
                return Err(PyValueError::new_err(
                    "speculative_config: a 'model' is a draft model (method draft_model)",
                ))
            }
            (_, None) => None,
        };
        let options = PluginOptions {
            load: LoadOptions { quant, repack, bf16_activations, max_memory, mmproj, ..Default::default() },
            kv_cache_type: KvCacheType { k: kv_dtype(cache_type_k)?, v: kv_dtype(cache_type_v)? },
            kv_cache_bytes,
            max_model_len,
            max_num_seqs,
            threads,
            spec,
            draft_model,
        };
        if !path.exists() {
            return Err(InferencePIOError::new_err(format!("{}: no such file or directory", path.display())));
        }
        let plugin = py.detach(|| EnginePlugin::load_with(&path, &options)).map_err(py_err)?;
        Ok(Engine { plugin: Mutex::new(Some(Arc::new(plugin))) })
    }

    /// Runs a request to its end: a dict of `text`, `token_ids`, `finish_reason` ("stop",
    /// "length"), `prompt_tokens`, `cached_tokens`, `prompt_token_ids` and `logprobs` (a list of
    /// `token_id`, `logprob`, `top` when `params["logprobs"]` asks, else None).
    #[pyo3(signature = (*, prompt_token_ids=None, prompt=None, messages_json=None, images=Vec::new(), params=None))]
    fn complete<'py>(
        &self,
        py: Python<'py>,
        prompt_token_ids: Option<Vec<u32>>,
        prompt: Option<String>,
        messages_json: Option<String>,
        images: Vec<Vec<u8>>,
        params: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.stream(py, prompt_token_ids, prompt, messages_json, images, params)?.collect(py)
    }

    /// Starts a request and returns its steps as they come ([`Stream`]).
    #[pyo3(signature = (*, prompt_token_ids=None, prompt=None, messages_json=None, images=Vec::new(), params=None))]
    fn stream(
        &self,
        py: Python<'_>,
        prompt_token_ids: Option<Vec<u32>>,
        prompt: Option<String>,
        messages_json: Option<String>,
        images: Vec<Vec<u8>>,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Stream> {
        let spec = prompt_of(prompt_token_ids, prompt, messages_json)?;
        let s = self.start(py, spec, images, params)?;
        Ok(Stream {
            inner: Mutex::new(Some(s.inner)),
            want_logprobs: s.want_logprobs,
            prompt_token_ids: s.prompt_token_ids,
            _plugin: s.plugin,
        })
    }

    /// Token ids of `text`, with the model's BOS rule.
    fn tokenize(&self, text: &str) -> PyResult<Vec<u32>> {
        self.plugin()?.tokenize(text).map_err(py_err)
    }

    /// The text of `ids`, special tokens included.
    fn detokenize(&self, ids: Vec<u32>) -> PyResult<String> {
        self.plugin()?.detokenize(&ids).map_err(py_err)
    }

    /// The checkpoint's generation defaults: `eos_token_ids` and the sampling values it names
    /// (`temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`; None where it names none).
    fn defaults<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let plugin = self.plugin()?;
        let g = plugin.defaults();
        let d = PyDict::new(py);
        d.set_item("eos_token_ids", g.eos_token_ids.clone())?;
        d.set_item("temperature", g.temperature)?;
        d.set_item("top_k", g.top_k)?;
        d.set_item("top_p", g.top_p)?;
        d.set_item("min_p", g.min_p)?;
        d.set_item("repetition_penalty", g.repetition_penalty)?;
        Ok(d)
    }

    /// What the engine reports: the model (architecture, parameters, weight formats and bytes,
    /// what was quantized or repacked at load), the KV cache, counters and mean latencies.
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.plugin()?.report();
        let d = PyDict::new(py);
        let info = &r.info;
        d.set_item("path", info.path.display().to_string())?;
        d.set_item("format", info.format)?;
        d.set_item("arch", &info.arch)?;
        d.set_item("num_params", info.num_params)?;
        d.set_item("weight_bytes", info.weight_bytes)?;
        d.set_item("decode_bytes_per_token", info.decode_bytes_per_token)?;
        let types: Vec<(String, usize, usize)> =
            info.weight_types.iter().map(|(t, n, b)| (t.name().to_string(), *n, *b)).collect();
        d.set_item("weight_types", types)?;
        d.set_item("quantized_at_load", info.quantized.map(|(t, s)| (t.name(), s)))?;
        d.set_item("repacked", info.repacked)?;
        d.set_item("kv_cache_bytes", r.kv_cache_bytes)?;
        d.set_item("kv_blocks_total", r.kv_blocks_total)?;
        d.set_item("kv_blocks_used", r.kv_blocks_used)?;
        d.set_item("max_model_len", r.max_model_len)?;
        d.set_item("prompt_tokens", r.prompt_tokens)?;
        d.set_item("generated_tokens", r.generated_tokens)?;
        d.set_item("prefix_cache_hit_tokens", r.prefix_cache_hit_tokens)?;
        d.set_item("preemptions", r.preemptions)?;
        d.set_item("spec_decode_num_draft_tokens", r.spec_draft_tokens)?;
        d.set_item("spec_decode_num_accepted_tokens", r.spec_accepted_tokens)?;
        d.set_item("mean_time_to_first_token_s", r.mean_time_to_first_token)?;
        d.set_item("mean_inter_token_latency_s", r.mean_inter_token_latency)?;
        d.set_item("decode_tokens_per_s", r.mean_inter_token_latency.filter(|&s| s > 0.0).map(|s| 1.0 / s))?;
        Ok(d)
    }

    /// Stops the engine and frees the weights and the cache (streams still open end). Later
    /// calls raise InferencePIOError.
    fn unload(&self, py: Python<'_>) {
        let plugin = self.plugin.lock().unwrap_or_else(|e| e.into_inner()).take();
        // The engine thread stops when the last reference (this one, or an open stream's) goes.
        py.detach(move || drop(plugin));
    }

    /// Whether the model is loaded.
    #[getter]
    fn loaded(&self) -> bool {
        self.plugin.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// A request's steps as they come: an iterator of dicts as [`Engine::complete`] returns, each
/// with the step's new text and tokens; the last has a `finish_reason`. Closing it (or
/// dropping it) before the end cancels the request.
#[pyclass(frozen, module = "inference_pio._native")]
struct Stream {
    inner: Mutex<Option<RequestStream>>,
    want_logprobs: bool,
    /// The prompt as the engine got it (before image placeholders grow to their images).
    #[pyo3(get)]
    prompt_token_ids: Vec<u32>,
    /// Keeps the engine running while the stream is open.
    _plugin: Arc<EnginePlugin>,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let event = py.detach(|| {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let event = guard.as_mut().and_then(RequestStream::blocking_recv);
            if event.is_none() {
                *guard = None;
            }
            event
        });
        match event {
            None => Ok(None),
            Some(Event::Error(e)) => {
                self.close(py);
                Err(py_err(EngineError::Invalid(e)))
            }
            Some(Event::Output(o)) => {
                let mut out = Output::default();
                out.add(o, self.want_logprobs);
                out.into_dict(py).map(Some)
            }
        }
    }

    /// The rest of the request, to its end, as one dict (as [`Engine::complete`] returns, with
    /// the text and tokens not yet read), gathered without the GIL.
    fn collect<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let want = self.want_logprobs;
        let out = py.detach(|| -> Result<Output, EngineError> {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let mut out = Output::default();
            if let Some(stream) = guard.as_mut() {
                while let Some(e) = stream.blocking_recv() {
                    match e {
                        Event::Output(o) => out.add(o, want),
                        Event::Error(e) => return Err(EngineError::Invalid(e)),
                    }
                }
            }
            *guard = None;
            Ok(out)
        });
        let d = out.map_err(py_err)?.into_dict(py)?;
        d.set_item("prompt_token_ids", self.prompt_token_ids.clone())?;
        Ok(d)
    }

    /// Cancels the request if it is still running.
    fn close(&self, py: Python<'_>) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(move || drop(inner));
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Stream>()?;
    m.add("InferencePIOError", m.py().get_type::<InferencePIOError>())?;
    m.add("SAMPLING_KEYS", PARAM_KEYS.to_vec())?;
    m.add("simd_level", pio_kernels::cpu::label())?;
    Ok(())
}

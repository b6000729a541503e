"""Inference-PIO from Python: large language models from their real checkpoints (GGUF files,
Hugging Face directories) on CPU, through the Rust engine, without a server in between.

Two ways in:

* the plugin API, one factory per model::

      from inference_pio import create_qwen3_0_6b_plugin
      plugin = create_qwen3_0_6b_plugin("Qwen3-0.6B-Q8_0.gguf")
      plugin.initialize()
      plugin.load_model()
      print(plugin.infer("Solve: 2x + 5 = 15"))
      plugin.cleanup()

* an ``LLM`` class as vLLM users know it::

      from inference_pio import LLM, SamplingParams
      llm = LLM(model="Qwen3-0.6B-Q8_0.gguf")
      for out in llm.generate(["The capital of France is"], SamplingParams(max_tokens=16)):
          print(out.outputs[0].text)

Requests from several Python threads (or several prompts of one ``generate`` call) run batched
in the engine; the GIL is released while they run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

from . import _native
from ._native import InferencePIOError

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "InferencePIOError",
    "InferencePIOPlugin",
    "find_model",
    "create_qwen3_0_6b_plugin",
    "create_qwen3_4b_instruct_2507_plugin",
    "create_qwen3_coder_30b_plugin",
    "create_glm_4_7_flash_plugin",
    "create_qwen3_coder_next_plugin",
    "create_qwen3_vl_2b_plugin",
]

#: The SIMD level the kernels run at on this CPU (``PIO_SIMD`` can lower it): ``scalar``,
#: ``avx2``, ``avxvnni`` (AVX2 with AVX-VNNI), ``avx512`` or ``amx`` (AVX-512 with AMX tiles).
simd_level: str = _native.simd_level

Message = Dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class SamplingParams:
    """How to pick tokens, as vLLM's ``SamplingParams``. ``None`` takes the model's default (its
    ``generation_config``), else the CLI's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05.
    ``temperature=0`` is greedy."""

    max_tokens: Optional[int] = 256
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Union[None, str, List[str]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    #: Return the sampled token's log-probability and this many alternatives per token.
    logprobs: Optional[int] = None
    #: Added to these token ids' logits before sampling (-100 bans a token, 100 all but forces it).
    logit_bias: Optional[Dict[int, float]] = None

    #: The fields the engine takes (the native module's list).
    _KEYS = tuple(_native.SAMPLING_KEYS)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "SamplingParams":
        """Sampling keyword arguments (as ``infer`` and ``generate_text`` take them)."""
        unknown = sorted(set(kwargs) - set(cls._KEYS))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def _resolve(self, defaults: Dict[str, Any]) -> Dict[str, Any]:
        """The parameters the engine takes, with the model's defaults filled in."""
        fallback = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0}
        p: Dict[str, Any] = {}
        for key in fallback:
            value = getattr(self, key)
            if value is None:
                value = defaults.get(key)
            p[key] = fallback[key] if value is None else value
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, not {self.max_tokens!r}")
        p["max_tokens"] = self.max_tokens
        p["presence_penalty"] = self.presence_penalty
        p["frequency_penalty"] = self.frequency_penalty
        p["seed"] = self.seed
        p["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        # The checkpoint's end-of-turn tokens always stop (as the CLI does), beside the caller's.
        p["stop_token_ids"] = list(self.stop_token_ids or []) + list(defaults.get("eos_token_ids") or [])
        p["ignore_eos"] = self.ignore_eos
        p["min_tokens"] = self.min_tokens
        p["logprobs"] = self.logprobs
        p["logit_bias"] = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        return p


@dataclass
class CompletionOutput:
    """One generated sequence, as vLLM's."""

    index: int
    text: str
    token_ids: List[int]
    #: "stop" (a stop token or string) or "length" (max_tokens or the context).
    finish_reason: Optional[str]
    #: Per token, when asked: a dict ``{token_id: logprob}`` of the sampled token and the top ones.
    logprobs: Optional[List[Dict[int, float]]] = None
    cumulative_logprob: Optional[float] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one prompt, as vLLM's."""

    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool = True
    #: Prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0


def _completion(raw: Dict[str, Any]) -> CompletionOutput:
    logprobs = None
    cumulative = None
    if raw.get("logprobs") is not None:
        logprobs = []
        cumulative = 0.0
        for entry in raw["logprobs"]:
            step = {int(t): float(lp) for t, lp in entry["top"]}
            step[int(entry["token_id"])] = float(entry["logprob"])
            logprobs.append(step)
            cumulative += float(entry["logprob"])
    return CompletionOutput(0, raw["text"], list(raw["token_ids"]), raw["finish_reason"], logprobs, cumulative)


# ---------------------------------------------------------------------------------------------
# Inputs


def _parse_size(value: Union[None, int, str]) -> Optional[int]:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2GB"``, ``"1g"``."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"a memory size must be positive, not {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"{value!r} is not a memory size (e.g. 512MiB, 2GiB, 1000000)")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    base = 1024 if suffix.startswith("i") or suffix == "" and unit else 1000
    scale = {"": 1, "k": base, "m": base**2, "g": base**3, "t": base**4}[unit]
    return int(number * scale)


def _image_bytes(image: Union[str, bytes, os.PathLike]) -> bytes:
    """An image's encoded bytes from bytes, a path, a ``file://`` URL or a ``data:`` URL."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    text = os.fspath(image)
    if text.startswith("data:"):
        try:
            return base64.b64decode(text.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as e:
            raise ValueError(f"a malformed data: URL ({e})") from None
    if text.startswith(("http://", "https://")):
        raise ValueError("http(s) image URLs are not supported: give a path, bytes or a data: URL")
    if text.startswith("file://"):
        text = text[len("file://") :]
    try:
        return Path(text).read_bytes()
    except OSError as e:
        raise ValueError(f"image {text}: {e.strerror or e}") from None


def _messages_json(messages: Sequence[Message]) -> str:
    """OpenAI-style messages as JSON for the engine, their images inline as ``data:`` URLs
    (``image_url`` parts with a path, ``file://`` or ``data:`` URL; ``image`` parts with a path
    or bytes)."""
    if isinstance(messages, (str, bytes)) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of dicts such as {'role': 'user', 'content': '...'}")
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image_url", "image"):
                    src = part.get("image_url", part.get("image"))
                    if isinstance(src, dict):
                        src = src.get("url")
                    if src is None:
                        raise ValueError(f"an {kind} part without an image: {part!r}")
                    data = base64.b64encode(_image_bytes(src)).decode("ascii")
                    parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
                else:
                    parts.append(part)
            m = dict(m, content=parts)
        out.append(m)
    return json.dumps(out)


# ---------------------------------------------------------------------------------------------
# The LLM class


class LLM:
    """A model loaded behind the engine, as vLLM's ``LLM``.

    ``model``: a GGUF file or a Hugging Face model directory. Options mirror the CLI's:
    ``quant`` (quantize at load: ``"q8_0"``, ``"q4_k"``, ...), ``threads``, ``kv_cache_mem``
    (bytes or ``"2GiB"``), ``cache_type_k`` / ``cache_type_v`` (``f16``, ``bf16``, ``f32``,
    ``q8_0``, ``q4_0``), ``max_model_len``, ``max_num_seqs``, ``mmproj`` (a Qwen3-VL GGUF's vision
    file), ``max_memory`` (stream what does not fit from disk), ``repack``, ``bf16_activations``,
    and ``speculative_config`` as vLLM takes it: ``{"method": "ngram", "num_speculative_tokens": 8,
    "prompt_lookup_max": 5, "prompt_lookup_min": 3}`` (prompt lookup) or ``{"model": PATH,
    "num_speculative_tokens": 4}`` (a draft model with the same tokenizer; ``"method":
    "draft_model"`` may be given) or ``{"method": "mtp", "num_speculative_tokens": 1}`` (the
    model's own multi-token-prediction layer, GLM-4.7-Flash); the outputs are the same tokens as
    without it.
    """

    def __init__(
        self,
        model: Union[str, os.PathLike],
        *,
        quant: Optional[str] = None,
        threads: Optional[int] = None,
        kv_cache_mem: Union[None, int, str] = None,
        cache_type_k: Optional[str] = None,
        cache_type_v: Optional[str] = None,
        max_model_len: Optional[int] = None,
        max_num_seqs: int = 16,
        mmproj: Union[None, str, os.PathLike] = None,
        max_memory: Union[None, int, str] = None,
        repack: bool = True,
        bf16_activations: bool = True,
        speculative_config: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.model = os.fspath(model)
        spec = dict(speculative_config or {})
        known = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown} (known: {sorted(known)})")
        if "model" in spec:
            spec.setdefault("method", "draft_model")
        if spec and "method" not in spec:
            raise ValueError("speculative_config needs a 'method' (\"ngram\") or a draft 'model'")
        draft = spec.get("model")
        self._engine = _native.Engine(
            self.model,
            quant=quant,
            threads=threads,
            kv_cache_bytes=_parse_size(kv_cache_mem),
            cache_type_k=cache_type_k,
            cache_type_v=cache_type_v,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            mmproj=None if mmproj is None else os.fspath(mmproj),
            repack=repack,
            bf16_activations=bf16_activations,
            max_memory=_parse_size(max_memory),
            spec_method=spec.get("method"),
            spec_tokens=spec.get("num_speculative_tokens", 8),
            spec_ngram=spec.get("prompt_lookup_max", 5),
            spec_ngram_min=spec.get("prompt_lookup_min", 3),
            spec_draft_model=None if draft is None else os.fspath(draft),
        )
        self._defaults = self._engine.defaults()

    # -- requests

    def _params(self, sampling_params: Optional[SamplingParams]) -> Dict[str, Any]:
        return (sampling_params or SamplingParams())._resolve(self._defaults)

    @staticmethod
    def _prompt_kwargs(prompt: Any) -> Dict[str, Any]:
        if isinstance(prompt, str):
            return {"prompt": prompt}
        if isinstance(prompt, dict) and ("prompt_token_ids" in prompt or "prompt" in prompt):
            images = (prompt.get("multi_modal_data") or {}).get("image", []) or []
            if isinstance(images, (str, bytes, bytearray, os.PathLike)):
                images = [images]
            images = [_image_bytes(i) for i in images]
            if "prompt_token_ids" in prompt:
                return {"prompt_token_ids": list(prompt["prompt_token_ids"]), "images": images}
            return {"prompt": prompt["prompt"], "images": images}
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return {"prompt_token_ids": list(prompt)}
        raise ValueError(f"a prompt is a string, a list of token ids or a dict with 'prompt'/'prompt_token_ids', not {prompt!r}")

    def _run_all(self, requests: List[Dict[str, Any]], sampling_params: Any) -> List[RequestOutput]:
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(requests):
                raise ValueError(f"{len(sampling_params)} sampling params for {len(requests)} prompts")
            params = [self._params(s) for s in sampling_params]
        else:
            params = [self._params(sampling_params)] * len(requests)
        # Every request is queued before any is read, so the engine batches them all.
        streams = []
        try:
            for req, p in zip(requests, params):
                streams.append(self._engine.stream(params=p, **req))
            outputs = []
            for req, stream in zip(requests, streams):
                raw = stream.collect()
                outputs.append(
                    RequestOutput(req.get("prompt"), raw["prompt_token_ids"], [_completion(raw)], True, raw["cached_tokens"])
                )
            return outputs
        finally:
            for s in streams:
                s.close()

    def generate(
        self,
        prompts: Union[str, Sequence[Any]],
        sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
        use_tqdm: bool = False,
    ) -> List[RequestOutput]:
        """Continues each prompt (a string, a list of token ids, or a dict with ``prompt`` or
        ``prompt_token_ids``, and ``multi_modal_data: {"image": [paths or bytes]}`` for a vision
        model, each image standing for the next ``<|image_pad|>`` run); one output per prompt,
        in order. All prompts run batched."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        return self._run_all([self._prompt_kwargs(p) for p in prompts], sampling_params)

    def chat(
        self,
        messages: Union[Sequence[Message], Sequence[Sequence[Message]]],
        sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
        use_tqdm: bool = False,
    ) -> List[RequestOutput]:
        """Answers a conversation (a list of OpenAI-style message dicts) or a list of them,
        through the model's chat template; one output per conversation, batched."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        requests = [{"messages_json": _messages_json(c)} for c in conversations]
        return self._run_all(requests, sampling_params)

    def stream(
        self,
        prompt: Union[str, Sequence[int], Sequence[Message]],
        sampling_params: Optional[SamplingParams] = None,
    ) -> Iterator[str]:
        """The text of one prompt (or a conversation, as ``chat`` takes it) as it is generated,
        delta by delta. Leaving the loop early cancels the request."""
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            kwargs: Dict[str, Any] = {"messages_json": _messages_json(prompt)}
        else:
            kwargs = self._prompt_kwargs(prompt)
        stream = self._engine.stream(params=self._params(sampling_params), **kwargs)
        return _deltas(stream)

    # -- the rest

    def tokenize(self, text: str) -> List[int]:
        return self._engine.tokenize(text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self._engine.detokenize(list(token_ids))

    def report(self) -> Dict[str, Any]:
        """What the engine reports: the model, memory, KV cache, counters, mean latencies."""
        return self._engine.report()

    def shutdown(self) -> None:
        """Stops the engine and frees the model; later calls raise InferencePIOError."""
        self._engine.unload()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _deltas(stream: Any) -> Iterator[str]:
    try:
        for step in stream:
            if step["text"]:
                yield step["text"]
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------
# Finding a model on disk


def find_model(repo_id: str) -> Optional[Path]:
    """Where a model lies, when not given: ``$INFERENCE_PIO_MODEL_DIR/<name>`` (a directory or a
    GGUF file whose name starts with the model's name, in any case), else the Hugging Face cache
    (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``,
    ``models--<org>--<name>/snapshots/<revision>``)."""
    name = repo_id.split("/")[-1]
    roots = [os.environ.get("INFERENCE_PIO_MODEL_DIR")]
    for root in filter(None, roots):
        base = Path(root)
        if (base / name).exists():
            return base / name
        if base.is_dir():
            ggufs = sorted(p for p in base.glob("*.gguf") if p.name.lower().startswith(name.lower()))
            ggufs = [p for p in ggufs if not p.name.lower().startswith("mmproj")]
            if ggufs:
                return ggufs[0]
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "hub"
    )
    snapshots = Path(hub) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if snapshots.is_dir():
        revisions = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if revisions:
            return revisions[-1]
    return None


# ---------------------------------------------------------------------------------------------
# The plugin API


class InferencePIOPlugin:
    """One model with the lifecycle of the original design: ``initialize()`` (settle the
    options and find the model), ``load_model()``, then ``infer`` / ``generate_text`` / ``chat``
    / ``tokenize`` / ``detokenize`` / ``get_report``, and ``cleanup()``. Methods called out of
    that order raise InferencePIOError. Several threads may call at once; their requests batch
    together."""

    #: The model's Hugging Face id (for finding it on disk).
    repo_id: str = ""
    #: Whether the model takes images.
    vision: bool = False

    def __init__(self, model_path: Union[None, str, os.PathLike] = None, **options: Any) -> None:
        self.model_path: Optional[str] = None if model_path is None else os.fspath(model_path)
        self.options: Dict[str, Any] = dict(options)
        self._sampling: Dict[str, Any] = {}
        self._llm: Optional[LLM] = None
        self._initialized = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1]

    @property
    def is_loaded(self) -> bool:
        return self._llm is not None

    def initialize(self, **options: Any) -> bool:
        """Settles the options (more may be given here: any of ``LLM``'s, and default sampling
        values such as ``temperature`` or ``max_tokens``) and finds the model: the path given, else
        :func:`find_model`. Raises InferencePIOError when there is none."""
        self.options.update(options)
        sampling = {k: self.options.pop(k) for k in list(self.options) if k in SamplingParams._KEYS}
        self._sampling.update(sampling)
        path = self.options.pop("model_path", None) or self.model_path
        if path is None:
            found = find_model(self.repo_id)
            if found is None:
                raise InferencePIOError(
                    f"no {self.name} model given and none found: pass model_path (a GGUF file or a Hugging Face "
                    f"directory), or put it in $INFERENCE_PIO_MODEL_DIR/{self.name}"
                )
            path = str(found)
        if not os.path.exists(path):
            raise InferencePIOError(f"{path}: no such file or directory")
        self.model_path = os.fspath(path)
        self._initialized = True
        return True

    def load_model(self) -> "InferencePIOPlugin":
        """Loads the model and starts its engine (after ``initialize()``)."""
        with self._lock:
            if not self._initialized:
                raise InferencePIOError("call initialize() before load_model()")
            if self._llm is None:
                assert self.model_path is not None
                self._llm = LLM(self.model_path, **self.options)
        return self

    def _loaded(self) -> LLM:
        llm = self._llm
        if llm is None:
            raise InferencePIOError(
                "the model is not loaded: call initialize() and load_model() first"
                if not self._initialized
                else "the model is not loaded: call load_model() first (or again after cleanup())"
            )
        return llm

    def _params(self, sampling: Dict[str, Any]) -> SamplingParams:
        return SamplingParams.from_kwargs(**{**self._sampling, **sampling})

    def infer(self, prompt_or_messages: Union[str, Sequence[Message]], **sampling: Any) -> str:
        """The answer to a prompt or a conversation: text goes through the model's chat
        template as one user message (use ``generate_text`` for a raw continuation)."""
        if isinstance(prompt_or_messages, str):
            prompt_or_messages = [{"role": "user", "content": prompt_or_messages}]
        return self.chat(prompt_or_messages, **sampling)

    def generate_text(
        self, prompt: str, *, images: Sequence[Any] = (), stream: bool = False, **sampling: Any
    ) -> Union[str, Iterator[str]]:
        """The continuation of ``prompt`` (no chat template). ``images`` (paths, bytes) for a
        vision model; ``stream=True`` gives an iterator of text deltas."""
        llm = self._loaded()
        request: Any = {"prompt": prompt, "multi_modal_data": {"image": list(images)}} if images else prompt
        if stream:
            return llm.stream(request, self._params(sampling))
        return llm.generate([request], self._params(sampling))[0].outputs[0].text

    def chat(self, messages: Sequence[Message], *, stream: bool = False, **sampling: Any) -> Union[str, Iterator[str]]:
        """The answer to OpenAI-style ``messages`` (images as ``image_url`` parts for a vision
        model); ``stream=True`` gives an iterator of text deltas."""
        llm = self._loaded()
        if stream:
            return llm.stream(list(messages), self._params(sampling))
        return llm.chat(list(messages), self._params(sampling))[0].outputs[0].text

    def tokenize(self, text: str) -> List[int]:
        return self._loaded().tokenize(text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self._loaded().detokenize(token_ids)

    def get_report(self) -> Dict[str, Any]:
        """What the engine reports (see ``LLM.report``), with the plugin's name."""
        report = self._loaded().report()
        report["plugin"] = self.name
        return report

    def cleanup(self) -> bool:
        """Stops the engine and frees the model. ``load_model()`` may load it again."""
        with self._lock:
            llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
        return True

    def __enter__(self) -> "InferencePIOPlugin":
        if not self._initialized:
            self.initialize()
        return self.load_model()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "loaded" if self.is_loaded else "initialized" if self._initialized else "new"
        return f"<{type(self).__name__} {self.name} ({state}) {self.model_path or ''}>"


def _plugin_class(class_name: str, repo_id: str, vision: bool = False) -> type:
    return type(class_name, (InferencePIOPlugin,), {"repo_id": repo_id, "vision": vision, "__doc__": f"{repo_id}."})


Qwen3_0_6B_Plugin = _plugin_class("Qwen3_0_6B_Plugin", "Qwen/Qwen3-0.6B")
Qwen3_4B_Instruct_2507_Plugin = _plugin_class("Qwen3_4B_Instruct_2507_Plugin", "Qwen/Qwen3-4B-Instruct-2507")
Qwen3_Coder_30B_Plugin = _plugin_class("Qwen3_Coder_30B_Plugin", "Qwen/Qwen3-Coder-30B-A3B-Instruct")
GLM_4_7_Flash_Plugin = _plugin_class("GLM_4_7_Flash_Plugin", "zai-org/GLM-4.7-Flash")
Qwen3_Coder_Next_Plugin = _plugin_class("Qwen3_Coder_Next_Plugin", "Qwen/Qwen3-Coder-Next")
Qwen3_VL_2B_Plugin = _plugin_class("Qwen3_VL_2B_Plugin", "Qwen/Qwen3-VL-2B-Instruct", vision=True)


def create_qwen3_0_6b_plugin(model_path: Union[None, str, os.PathLike] = None, **options: Any) -> InferencePIOPlugin:
    """A plugin for Qwen3-0.6B: ``model_path`` (GGUF or Hugging Face directory; found on disk
    when omitted, see :func:`find_model`) and options as ``LLM`` takes them, or sampling defaults."""
    return Qwen3_0_6B_Plugin(model_path, **options)


def create_qwen3_4b_instruct_2507_plugin(
    model_path: Union[None, str, os.PathLike] = None, **options: Any
) -> InferencePIOPlugin:
    """A plugin for Qwen3-4B-Instruct-2507 (arguments as :func:`create_qwen3_0_6b_plugin`)."""
    return Qwen3_4B_Instruct_2507_Plugin(model_path, **options)


def create_qwen3_coder_30b_plugin(model_path: Union[None, str, os.PathLike] = None, **options: Any) -> InferencePIOPlugin:
    """A plugin for Qwen3-Coder-30B-A3B-Instruct (arguments as :func:`create_qwen3_0_6b_plugin`;
    ``max_memory`` streams the experts that do not fit from disk)."""
    return Qwen3_Coder_30B_Plugin(model_path, **options)


def create_glm_4_7_flash_plugin(model_path: Union[None, str, os.PathLike] = None, **options: Any) -> InferencePIOPlugin:
    """A plugin for GLM-4.7-Flash (arguments as :func:`create_qwen3_0_6b_plugin`)."""
    return GLM_4_7_Flash_Plugin(model_path, **options)


def create_qwen3_coder_next_plugin(model_path: Union[None, str, os.PathLike] = None, **options: Any) -> InferencePIOPlugin:
    """A plugin for Qwen3-Coder-Next (arguments as :func:`create_qwen3_0_6b_plugin`)."""
    return Qwen3_Coder_Next_Plugin(model_path, **options)


def create_qwen3_vl_2b_plugin(model_path: Union[None, str, os.PathLike] = None, **options: Any) -> InferencePIOPlugin:
    """A plugin for Qwen3-VL-2B-Instruct (arguments as :func:`create_qwen3_0_6b_plugin`; a GGUF
    model takes its vision file as ``mmproj=``, found beside it when named ``mmproj-<file>``)."""
    return Qwen3_VL_2B_Plugin(model_path, **options)

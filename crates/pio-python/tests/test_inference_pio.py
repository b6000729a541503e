"""The Python package on the real SmolLM2-135M-Instruct (fetched by scripts/fetch-models.sh;
skipped outside CI without it, required in CI). Run by scripts/test.sh after it builds and
installs the wheel."""

import base64
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

import inference_pio as ip

ROOT = Path(__file__).resolve().parents[3]
MODEL = Path(os.environ.get("PIO_MODELS_DIR", ROOT / "models")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
PIO = Path(os.environ.get("PIO_BIN", ROOT / "target" / "release" / "pio"))
# Small caches: every test loads its own models beside the shared one.
OPTS = dict(threads=2, kv_cache_mem="64MiB", max_model_len=2048)
GREEDY = ip.SamplingParams(temperature=0, max_tokens=16)

if not MODEL.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{MODEL} is missing in CI: scripts/test.sh must fetch it")
    pytest.skip(f"{MODEL} not found (run scripts/fetch-models.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def llm():
    llm = ip.LLM(MODEL, **OPTS)
    yield llm
    llm.shutdown()


FACTORIES = [
    ip.create_qwen3_0_6b_plugin,
    ip.create_qwen3_4b_instruct_2507_plugin,
    ip.create_qwen3_coder_30b_plugin,
    ip.create_glm_4_7_flash_plugin,
    ip.create_qwen3_coder_next_plugin,
    ip.create_qwen3_vl_2b_plugin,
]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_each_factory_has_the_original_lifecycle(factory):
    plugin = factory(MODEL, **OPTS)
    # Out of order: clear errors, not crashes.
    with pytest.raises(ip.InferencePIOError, match="initialize"):
        plugin.infer("hi")
    with pytest.raises(ip.InferencePIOError, match="initialize"):
        plugin.load_model()
    assert plugin.initialize() is True
    with pytest.raises(ip.InferencePIOError, match="load_model"):
        plugin.generate_text("hi")
    plugin.load_model()
    assert plugin.is_loaded
    answer = plugin.infer("Solve: 2x + 5 = 15", temperature=0, max_tokens=24)
    assert isinstance(answer, str) and answer.strip()
    text = plugin.generate_text("Explain quantum computing.", temperature=0, max_tokens=8)
    assert isinstance(text, str) and text
    ids = plugin.tokenize("The capital of France is")
    assert plugin.detokenize(ids) == "The capital of France is"
    report = plugin.get_report()
    assert report["plugin"] == plugin.name and report["arch"] == "llama"
    assert report["generated_tokens"] > 0 and report["kv_cache_bytes"] > 0
    assert plugin.cleanup() is True
    assert not plugin.is_loaded
    with pytest.raises(ip.InferencePIOError, match="load_model"):
        plugin.infer("hi")
    # It loads again after cleanup.
    plugin.load_model()
    assert plugin.infer("Hi", temperature=0, max_tokens=4)
    plugin.cleanup()


def test_the_model_is_found_under_the_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("INFERENCE_PIO_MODEL_DIR", str(tmp_path))
    with pytest.raises(ip.InferencePIOError, match="none found"):
        ip.create_qwen3_0_6b_plugin(**OPTS).initialize()
    (tmp_path / "Qwen3-0.6B-Q4_1.gguf").symlink_to(MODEL)
    plugin = ip.create_qwen3_0_6b_plugin(**OPTS)
    plugin.initialize()
    assert plugin.model_path == str(tmp_path / "Qwen3-0.6B-Q4_1.gguf")


def test_greedy_output_equals_pio_generate(llm):
    if not PIO.exists():
        pytest.skip(f"{PIO} not built")
    prompt = "The capital of France is"
    cli = subprocess.run(
        [str(PIO), "--threads", "2", "generate", "--model", str(MODEL), "--prompt", prompt,
         "--temperature", "0", "--max-tokens", "16", "--json"],
        check=True, capture_output=True, text=True,
    )
    want = json.loads(cli.stdout)
    got = llm.generate(prompt, GREEDY)[0]
    assert got.prompt_token_ids == want["prompt_token_ids"]
    assert got.outputs[0].token_ids == want["token_ids"]
    assert got.outputs[0].text == want["text"]


def test_a_batch_of_prompts_equals_each_alone(llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", [1, 504, 3575]]
    batch = llm.generate(prompts, GREEDY)
    assert len(batch) == len(prompts)
    for prompt, out in zip(prompts, batch):
        alone = llm.generate([prompt], GREEDY)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, prompt
        assert out.outputs[0].finish_reason in ("stop", "length")


def test_threads_call_at_once_and_get_what_they_get_alone(llm):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    alone = [llm.generate(p, GREEDY)[0].outputs[0].text for p in prompts]
    got = [None] * len(prompts)

    def work(i):
        got[i] = llm.generate(prompts[i], GREEDY)[0].outputs[0].text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_the_gil_is_released_while_the_engine_works(llm):
    done = threading.Event()
    ticks = 0

    def work():
        llm.generate("Write a long story about a dragon.", ip.SamplingParams(temperature=0, max_tokens=64))
        done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        ticks += 1
    t.join()
    # With the GIL held through the call, this thread could not have run while it lasted.
    assert ticks > 10000


def test_streaming_gives_the_same_text_and_stops_early(llm):
    prompt = "The capital of France is"
    whole = llm.generate(prompt, GREEDY)[0].outputs[0].text
    assert "".join(llm.stream(prompt, GREEDY)) == whole
    plugin_like = llm.stream([{"role": "user", "content": "Say hello."}], GREEDY)
    assert "".join(plugin_like) == llm.chat([{"role": "user", "content": "Say hello."}], GREEDY)[0].outputs[0].text
    # Leaving a stream early cancels its request; the engine goes on serving others.
    it = llm.stream(prompt, ip.SamplingParams(temperature=0, max_tokens=200))
    next(it)
    it.close()
    assert llm.generate(prompt, GREEDY)[0].outputs[0].text == whole


def test_chat_takes_a_list_of_conversations_and_logprobs(llm):
    convs = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Name a color."}]]
    outs = llm.chat(convs, ip.SamplingParams(temperature=0, max_tokens=6, logprobs=3))
    assert len(outs) == 2
    for out in outs:
        c = out.outputs[0]
        assert len(c.logprobs) == len(c.token_ids)
        for token, step in zip(c.token_ids, c.logprobs):
            assert token in step and all(lp <= 0 for lp in step.values())
            # Greedy: the sampled token is the most likely one.
            assert step[token] == max(step.values())
        assert c.cumulative_logprob == pytest.approx(sum(s[t] for t, s in zip(c.token_ids, c.logprobs)))


def test_bad_input_raises_python_exceptions(llm, tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("x", ip.SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("x", ip.SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="unknown sampling"):
        ip.SamplingParams.from_kwargs(temprature=0.5)
    with pytest.raises(ValueError, match="messages"):
        llm.chat(["not a dict"])
    with pytest.raises(ValueError):
        llm.generate({"no": "prompt"})
    with pytest.raises(ValueError, match="vocabulary"):
        llm.detokenize([10**9])
    # A text model given an image.
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    with pytest.raises(ValueError, match="image"):
        llm.generate({"prompt": "x", "multi_modal_data": {"image": [png]}})
    with pytest.raises(ValueError, match="http"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    # A prompt longer than the context.
    short = ip.LLM(MODEL, threads=2, kv_cache_mem="16MiB", max_model_len=32)
    with pytest.raises(ValueError, match="context"):
        short.generate("word " * 100)
    short.shutdown()
    with pytest.raises(ip.InferencePIOError, match="unloaded"):
        short.generate("x")
    # Missing, truncated and foreign files.
    with pytest.raises(ip.InferencePIOError, match="no such file"):
        ip.LLM(tmp_path / "missing.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(MODEL.read_bytes()[: 1 << 20])
    with pytest.raises(ip.InferencePIOError):
        ip.LLM(truncated, **OPTS)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ip.InferencePIOError):
        ip.LLM(junk, **OPTS)
    with pytest.raises(ValueError, match="quant"):
        ip.LLM(MODEL, quant="q9_9")
    with pytest.raises(ValueError):
        ip.LLM(MODEL, kv_cache_mem="lots")


def test_help_shows_docstrings():
    assert "initialize" in (ip.InferencePIOPlugin.__doc__ or "")
    assert "vLLM" in (ip.LLM.__doc__ or "")
    assert ip.create_glm_4_7_flash_plugin.__doc__
    assert ip._native.Engine.complete.__doc__


def test_a_gguf_gets_its_publishers_sampling(llm):
    # The SmolLM2 card's temperature 0.2 and top-p 0.9 (a GGUF file carries no generation_config),
    # and its end-of-turn token.
    d = llm._engine.defaults()
    assert d["temperature"] == pytest.approx(0.2) and d["top_p"] == pytest.approx(0.9)
    assert 2 in d["eos_token_ids"]


def test_speculative_decoding_gives_the_same_tokens(llm):
    task = (ROOT / "crates" / "pio-cli" / "tests" / "data" / "spec" / "rename_5.txt").read_text()
    messages = [{"role": "user", "content": task}]
    params = ip.SamplingParams(temperature=0, max_tokens=96)
    plain = llm.chat(messages, params)[0].outputs[0].token_ids
    spec = ip.LLM(MODEL, speculative_config={"method": "ngram", "num_speculative_tokens": 6}, **OPTS)
    try:
        assert spec.chat(messages, params)[0].outputs[0].token_ids == plain
        assert spec.report()["spec_decode_num_accepted_tokens"] > 0
    finally:
        spec.shutdown()
    with pytest.raises(ValueError, match="unknown keys"):
        ip.LLM(MODEL, speculative_config={"method": "ngram", "k": 3}, **OPTS)
    with pytest.raises(ValueError, match="speculation method"):
        ip.LLM(MODEL, speculative_config={"method": "eagle"}, **OPTS)


def test_a_draft_model_gives_the_same_tokens(llm):
    # The model drafting for itself (vLLM's form: a draft "model" path): every greedy proposal
    # is accepted, and the tokens are plain decoding's.
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    params = ip.SamplingParams(temperature=0, max_tokens=40)
    plain = llm.chat(messages, params)[0].outputs[0].token_ids
    assert len(plain) > 8
    spec = ip.LLM(MODEL, speculative_config={"model": MODEL, "num_speculative_tokens": 4}, **OPTS)
    try:
        assert spec.chat(messages, params)[0].outputs[0].token_ids == plain
        r = spec.report()
        assert r["spec_decode_num_draft_tokens"] > 0
        assert r["spec_decode_num_accepted_tokens"] == r["spec_decode_num_draft_tokens"]
    finally:
        spec.shutdown()
    with pytest.raises(ValueError, match="needs its 'model' path"):
        ip.LLM(MODEL, speculative_config={"method": "draft_model"}, **OPTS)
    with pytest.raises(ip.InferencePIOError, match="no such file"):
        ip.LLM(MODEL, speculative_config={"model": "/nonexistent.gguf"}, **OPTS)


def test_logit_bias_forces_and_bans_tokens(llm):
    prompt = "Once upon a time"
    params = ip.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    plain = llm.generate(prompt, params)[0].outputs[0].token_ids
    forced = ip.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logit_bias={42: 100})
    assert llm.generate(prompt, forced)[0].outputs[0].token_ids == [42] * 4
    banned = ip.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logit_bias={plain[0]: -100})
    assert llm.generate(prompt, banned)[0].outputs[0].token_ids[0] != plain[0]
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(prompt, ip.SamplingParams(max_tokens=1, logit_bias={1: 500}))

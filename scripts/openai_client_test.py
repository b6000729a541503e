#!/usr/bin/env python3
"""Integration test of `pio serve` driven by the official `openai` Python client.

Usage:
    python3 -m pip install -q --target target/pydeps openai
    PYTHONPATH=target/pydeps python3 scripts/openai_client_test.py \
        --pio target/release/pio --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--vision-model DIR --image PNG] [--agent-model models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf]

It starts the servers itself (`pio serve --port 0`, the port read from the first stderr line)
and kills them on exit, failure included:

  * main server, `--max-model-len 256` (a too-long prompt is cheap): models, chat and
    completions (streamed and not), n/seed, logprobs, stop strings, max_tokens/min_tokens,
    chat_template_kwargs, error classes;
  * a second one with `--api-key secret`: authentication;
  * a third one with `--max-num-seqs 1 --max-queued-requests 1` and a long context (so that a
    2000-token request is still running while the test looks): the queue cap (429) and the
    freeing of KV blocks when clients go away;
  * with --vision-model (a Qwen3-VL directory with a tokenizer, e.g. one `pio synth` wrote): a
    chat with a base64 image part, streamed and not, and an http(s) image URL refused;
  * with --agent-model (a model whose chat template writes tool calls): `tool_choice` required
    and named (calls valid under their tool's schema, streamed and not), a tool result answered
    in text, bad tools refused, and `response_format` JSON schemas, streamed and not.

Prints one PASS/FAIL line per check and a summary; exits 1 if any check failed. The model
must have a chat template (SmolLM2-135M-Instruct does).
"""

import argparse
import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

try:
    import openai
except ImportError:  # pragma: no cover
    sys.exit("the `openai` package is missing: python3 -m pip install -q --target target/pydeps openai "
             "and run with PYTHONPATH=target/pydeps")


# ---------------------------------------------------------------------------------------------
# Servers


_servers = []


class Server:
    """One `pio serve` subprocess on a free port."""

    def __init__(self, pio, model, args, label):
        self.label = label
        self.lines = []  # stderr, kept for failure reports
        cmd = [pio, "serve", "--model", model, "--host", "127.0.0.1", "--port", "0"] + list(args)
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        _servers.append(self)
        first = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                first.set()
            first.set()

        threading.Thread(target=drain, daemon=True).start()
        if not first.wait(120) or not self.lines:
            self.stop()
            raise RuntimeError(f"{label}: the server printed nothing (exit {self.proc.poll()}): {' '.join(cmd)}")
        m = re.match(r"serving (\S+) on http://([^\s:/]+):(\d+)", self.lines[0])
        if not m:
            self.stop()
            raise RuntimeError(f"{label}: unexpected first stderr line {self.lines[0]!r}; stderr: {self.stderr()}")
        self.name, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
        self.url = f"http://{self.host}:{self.port}"
        print(f"[{label}] {self.lines[0]}", flush=True)

    def stderr(self):
        return "\n".join(self.lines[-20:])

    def client(self, api_key="unused", **kw):
        kw.setdefault("timeout", 60.0)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)

    def get(self, path, headers=None):
        """(status, body text) of a GET, without the openai client."""
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self, headers=None):
        status, text = self.get("/metrics", headers)
        assert status == 200, f"GET /metrics answered {status}: {text[:200]}"
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
        return out

    def wait_metrics(self, cond, what, timeout=10.0):
        """Polls /metrics until `cond(metrics)`; fails naming `what` and the last values."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if cond(m):
                return m
            if time.monotonic() > deadline:
                keys = ["pio_num_requests_running", "pio_num_requests_waiting", "pio_kv_cache_blocks_used"]
                raise AssertionError(f"after {timeout:.0f} s, not {what}: " + ", ".join(f"{k}={m.get(k)}" for k in keys))
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self in _servers:
            _servers.remove(self)


def _stop_all():
    for s in list(_servers):
        try:
            s.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            if s.proc.poll() is None:
                s.proc.kill()


atexit.register(_stop_all)


def _on_signal(signum, _frame):
    _stop_all()
    sys.exit(128 + signum)


for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


# ---------------------------------------------------------------------------------------------
# Checks


RESULTS = []


def check(name, fn, *args):
    t = time.monotonic()
    try:
        fn(*args)
    except AssertionError as e:
        RESULTS.append((name, False))
        print(f"FAIL  {name} ({time.monotonic() - t:.1f}s): {e}", flush=True)
        return False
    except Exception as e:  # noqa: BLE001 - any other error is a failure of the check too
        RESULTS.append((name, False))
        print(f"FAIL  {name} ({time.monotonic() - t:.1f}s): {type(e).__name__}: {e}", flush=True)
        if os.environ.get("VERBOSE"):
            traceback.print_exc()
        return False
    RESULTS.append((name, True))
    print(f"PASS  {name} ({time.monotonic() - t:.1f}s)", flush=True)
    return True


def fail(name, msg):
    RESULTS.append((name, False))
    print(f"FAIL  {name}: {msg}", flush=True)


def info(msg):
    print(f"INFO  {msg}", flush=True)


def expect_error(cls, status, fn):
    """Runs fn, which must raise `cls` with HTTP `status`; returns the exception."""
    try:
        r = fn()
    except cls as e:
        assert e.status_code == status, f"{cls.__name__} with status {e.status_code}, expected {status}"
        return e
    except openai.APIStatusError as e:
        raise AssertionError(f"expected {cls.__name__} ({status}), got {type(e).__name__} "
                             f"({e.status_code}): {e.message}") from None
    raise AssertionError(f"expected {cls.__name__} ({status}), but the request succeeded: {str(r)[:300]}")


CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
PROMPT = "Once upon a time, in a small village by the sea, there lived"
PROMPT2 = "The three most important inventions of the last century are"


class Ctx:
    """Values the checks share."""

    greedy_text = None
    greedy_usage = None
    completion_lp = None


def run_main_checks(srv):
    c = srv.client()
    m = srv.name

    def models():
        ids = [x.id for x in c.models.list().data]
        assert srv.name in ids, f"models.list() gave {ids}, expected it to contain {srv.name!r}"
        base = os.path.basename(ARGS.model)
        expected = base[:-5] if base.endswith(".gguf") else base
        assert srv.name == expected, f"served name {srv.name!r}, expected the file name without .gguf {expected!r}"

    def chat_greedy():
        r = c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=16)
        assert r.object == "chat.completion", f"object {r.object!r}"
        assert len(r.choices) == 1, f"{len(r.choices)} choices"
        ch = r.choices[0]
        assert ch.message.role == "assistant", f"role {ch.message.role!r}"
        assert ch.message.content, f"empty message: {ch.message!r}"
        assert ch.finish_reason in ("stop", "length"), f"finish_reason {ch.finish_reason!r}"
        u = r.usage
        assert u is not None, "no usage"
        assert u.prompt_tokens > 0 and u.completion_tokens > 0, f"usage {u}"
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens, f"total != prompt + completion: {u}"
        assert u.completion_tokens <= 16, f"{u.completion_tokens} completion tokens with max_tokens 16"
        if ch.finish_reason == "length":
            assert u.completion_tokens == 16, f"finish length after {u.completion_tokens} of 16 tokens"
        r2 = c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=16)
        assert r2.choices[0].message.content == ch.message.content, (
            f"greedy not deterministic: {ch.message.content!r} vs {r2.choices[0].message.content!r}")
        Ctx.greedy_text, Ctx.greedy_usage = ch.message.content, u
        info(f"greedy chat text: {ch.message.content!r} ({ch.finish_reason}, {u.prompt_tokens}+{u.completion_tokens} tokens)")

    def chat_stream():
        assert Ctx.greedy_text is not None, "needs the greedy chat check"
        chunks = list(c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=16, stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks, "no chunks"
        assert all(x.object == "chat.completion.chunk" for x in chunks), "a chunk's object is not chat.completion.chunk"
        assert len({x.id for x in chunks}) == 1, "the chunks' ids differ"
        last = chunks[-1]
        assert last.choices == [], f"the last chunk has choices: {last.choices}"
        assert last.usage is not None, "the last chunk has no usage"
        assert all(x.usage is None for x in chunks[:-1]), "a chunk before the last has usage"
        text = "".join(ch.delta.content or "" for x in chunks for ch in x.choices)
        assert text == Ctx.greedy_text, f"streamed {text!r} != non-streamed {Ctx.greedy_text!r}"
        finishes = [ch.finish_reason for x in chunks for ch in x.choices if ch.finish_reason]
        assert len(finishes) == 1 and finishes[0] in ("stop", "length"), f"finish reasons {finishes}"
        assert chunks[0].choices[0].delta.role == "assistant", "the first chunk has no assistant role"
        g, u = Ctx.greedy_usage, last.usage
        assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
            g.prompt_tokens, g.completion_tokens, g.total_tokens), f"stream usage {u} != non-stream usage {g}"

    def completions():
        r = c.completions.create(model=m, prompt=PROMPT, temperature=0, max_tokens=12)
        assert r.object == "text_completion", f"object {r.object!r}"
        text = r.choices[0].text
        assert text, "empty completion"
        assert r.choices[0].finish_reason in ("stop", "length"), f"finish_reason {r.choices[0].finish_reason!r}"
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > r.usage.prompt_tokens > 0, \
            f"usage {r.usage}"
        chunks = list(c.completions.create(model=m, prompt=PROMPT, temperature=0, max_tokens=12, stream=True,
                                           stream_options={"include_usage": True}))
        streamed = "".join(ch.text for x in chunks for ch in x.choices)
        assert streamed == text, f"streamed {streamed!r} != non-streamed {text!r}"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None, "no usage-only last chunk"
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens, \
            f"stream usage {chunks[-1].usage} != {r.usage}"
        # Without stream_options: no usage anywhere.
        plain = list(c.completions.create(model=m, prompt=PROMPT, temperature=0, max_tokens=4, stream=True))
        assert all(x.usage is None for x in plain), "usage sent without stream_options.include_usage"
        two = c.completions.create(model=m, prompt=[PROMPT, PROMPT2], temperature=0, max_tokens=8)
        idx = sorted(ch.index for ch in two.choices)
        assert idx == [0, 1], f"two prompts gave choice indices {idx}"
        assert all(ch.text for ch in two.choices), "an empty choice for the two prompts"
        p1 = c.completions.create(model=m, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
        p2 = c.completions.create(model=m, prompt=PROMPT2, max_tokens=1).usage.prompt_tokens
        assert two.usage.prompt_tokens == p1 + p2, f"two prompts' prompt_tokens {two.usage.prompt_tokens} != {p1}+{p2}"
        first = next(ch for ch in two.choices if ch.index == 0).text
        if first != c.completions.create(model=m, prompt=PROMPT, temperature=0, max_tokens=8).choices[0].text:
            info("greedy text of prompt 0 differs batched with another prompt vs alone (not batch-invariant)")

    def n_seed():
        def ask():
            return c.chat.completions.create(model=m, messages=CHAT, temperature=1.0, seed=1234, n=3, max_tokens=10)
        r1, r2 = ask(), ask()
        assert len(r1.choices) == 3, f"{len(r1.choices)} choices for n=3"
        assert sorted(ch.index for ch in r1.choices) == [0, 1, 2], f"indices {[ch.index for ch in r1.choices]}"
        t1 = [ch.message.content for ch in sorted(r1.choices, key=lambda ch: ch.index)]
        t2 = [ch.message.content for ch in sorted(r2.choices, key=lambda ch: ch.index)]
        assert t1 == t2, f"same seed, different texts:\n  {t1}\n  {t2}"
        assert len(set(t1)) > 1, f"the 3 samples at temperature 1 are identical: {t1}"
        one = c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=4)
        assert r1.usage.prompt_tokens == one.usage.prompt_tokens, (
            f"n=3 prompt_tokens {r1.usage.prompt_tokens}, expected the prompt once ({one.usage.prompt_tokens})")
        assert r1.usage.completion_tokens <= 30, f"n=3 x max_tokens 10 gave {r1.usage.completion_tokens} tokens"
        # Streamed with the same seed: the same texts, per index.
        s = list(c.chat.completions.create(model=m, messages=CHAT, temperature=1.0, seed=1234, n=3, max_tokens=10,
                                           stream=True))
        ts = ["".join(ch.delta.content or "" for x in s for ch in x.choices if ch.index == i) for i in range(3)]
        assert ts == t1, f"streamed n=3 with the same seed differs:\n  {ts}\n  {t1}"

    def logprobs():
        r = c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
        ch = r.choices[0]
        assert ch.logprobs is not None and ch.logprobs.content, f"no logprobs.content: {ch.logprobs}"
        content = ch.logprobs.content
        assert len(content) == r.usage.completion_tokens, \
            f"{len(content)} logprob entries for {r.usage.completion_tokens} tokens"
        for i, e in enumerate(content):
            assert len(e.top_logprobs) == 3, f"entry {i} has {len(e.top_logprobs)} top_logprobs, expected 3"
            assert e.logprob <= 0, f"entry {i} logprob {e.logprob} > 0"
            tops = [t.logprob for t in e.top_logprobs]
            assert all(t <= 0 for t in tops) and tops == sorted(tops, reverse=True), f"entry {i} top {tops}"
            assert e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4, (
                f"greedy entry {i}: token {e.token!r} ({e.logprob}) is not the top one "
                f"{e.top_logprobs[0].token!r} ({e.top_logprobs[0].logprob})")
            assert e.bytes == list(e.token.encode()), f"entry {i} bytes {e.bytes} do not encode {e.token!r}"
        joined = "".join(e.token for e in content)
        assert joined == ch.message.content, f"tokens join to {joined!r}, content is {ch.message.content!r}"
        # Streamed chat logprobs: one entry per token.
        s = list(c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=8, logprobs=True,
                                           top_logprobs=2, stream=True))
        es = [e for x in s for c_ in x.choices if c_.logprobs and c_.logprobs.content for e in c_.logprobs.content]
        assert [e.token for e in es] == [e.token for e in content], "streamed logprob tokens differ"
        assert all(len(e.top_logprobs) == 2 for e in es), "streamed entries without 2 top_logprobs"
        # Completions: integer logprobs.
        r = c.completions.create(model=m, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=2)
        lp, text = r.choices[0].logprobs, r.choices[0].text
        n = r.usage.completion_tokens
        assert lp is not None, "no logprobs in the completion"
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n, (
            f"lengths tokens {len(lp.tokens)}, token_logprobs {len(lp.token_logprobs)}, top_logprobs "
            f"{len(lp.top_logprobs)}, text_offset {len(lp.text_offset)}; {n} completion tokens")
        assert all(x <= 0 for x in lp.token_logprobs), f"token_logprobs {lp.token_logprobs}"
        for i, top in enumerate(lp.top_logprobs):
            assert 2 <= len(top) <= 3, f"top_logprobs[{i}] has {len(top)} entries for logprobs=2: {top}"
            assert lp.tokens[i] in top, f"greedy token {lp.tokens[i]!r} not in top_logprobs[{i}] {top}"
        assert "".join(lp.tokens) == text, f"tokens join to {''.join(lp.tokens)!r}, text is {text!r}"
        offs = [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
        assert lp.text_offset == offs, f"text_offset {lp.text_offset}, expected {offs}"
        Ctx.completion_lp = (lp.tokens, lp.text_offset)

    def logprobs_stream_offsets():
        toks, offs = Ctx.completion_lp
        s = list(c.completions.create(model=m, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=2, stream=True))
        st, so = [], []
        for x in s:
            for ch in x.choices:
                if ch.logprobs:
                    st += ch.logprobs.tokens
                    so += ch.logprobs.text_offset
        assert st == toks, f"streamed tokens {st} != {toks}"
        assert so == offs, f"streamed text_offset {so} != non-streamed {offs} (OpenAI/vLLM offsets are cumulative)"

    def stop_strings():
        g = Ctx.greedy_text
        assert g, "needs the greedy chat check"
        words = g.split()
        order = sorted(range(len(words)), key=lambda i: (abs(i - len(words) // 2), -len(words[i])))
        word = next((words[i] for i in order if len(words[i]) >= 3 and g.find(words[i]) > 0), None)
        word = word or next((w for w in words if g.find(w) > 0), None)
        assert word, f"no usable stop word in {g!r}"
        expected = g[:g.find(word)]
        r = c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=16, stop=[word, "@@@never@@@"])
        ch = r.choices[0]
        assert ch.message.content == expected, f"stop={word!r}: got {ch.message.content!r}, expected {expected!r}"
        assert ch.finish_reason == "stop", f"stop={word!r}: finish_reason {ch.finish_reason!r}"
        chunks = list(c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=16, stop=word,
                                                stream=True))
        st = "".join(x.delta.content or "" for k in chunks for x in k.choices)
        assert st == expected, f"streamed with stop={word!r}: {st!r}, expected {expected!r}"
        fin = [x.finish_reason for k in chunks for x in k.choices if x.finish_reason]
        assert fin == ["stop"], f"streamed finish reasons {fin}"
        info(f"stop={word!r} -> {expected!r}")

    def token_limits():
        r = c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=1)
        assert r.choices[0].finish_reason == "length", f"max_tokens=1: finish_reason {r.choices[0].finish_reason!r}"
        assert r.usage.completion_tokens == 1, f"max_tokens=1: {r.usage.completion_tokens} completion tokens"
        r = c.chat.completions.create(model=m, messages=CHAT, max_completion_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2, f"max_completion_tokens=2: {r.usage.completion_tokens} tokens"
        for prompt in (CHAT, [{"role": "user", "content": "Say OK."}]):
            r = c.chat.completions.create(model=m, messages=prompt, temperature=0, max_tokens=5,
                                          extra_body={"ignore_eos": True, "min_tokens": 5})
            assert r.usage.completion_tokens == 5, f"ignore_eos+min_tokens 5: {r.usage.completion_tokens} tokens"
            assert r.choices[0].finish_reason == "length", f"finish_reason {r.choices[0].finish_reason!r}"

    def template_kwargs():
        r = c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=4,
                                      extra_body={"chat_template_kwargs": {"enable_thinking": False, "foo": 1}})
        assert r.choices[0].message.content is not None, "no message"

    def errors():
        e = expect_error(openai.NotFoundError, 404, lambda: c.chat.completions.create(
            model="no-such-model", messages=CHAT, max_tokens=2))
        assert "no-such-model" in e.message, f"404 message does not name the model: {e.message}"
        expect_error(openai.NotFoundError, 404, lambda: c.completions.create(
            model="no-such-model", prompt="x", max_tokens=2))
        expect_error(openai.BadRequestError, 400, lambda: c.chat.completions.create(
            model=m, messages=CHAT, temperature=-1, max_tokens=2))
        for bad in ({"max_tokens": 0}, {"n": 0}, {"top_p": 0}, {"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 99},
                    {"max_tokens": 2, "extra_body": {"min_tokens": 5}}):
            kw = {"max_tokens": 2, **bad}
            try:
                expect_error(openai.BadRequestError, 400, lambda kw=kw: c.chat.completions.create(
                    model=m, messages=CHAT, **kw))
            except AssertionError as e:
                raise AssertionError(f"{bad}: {e}") from None
        expect_error(openai.BadRequestError, 400, lambda: c.completions.create(model=m, prompt="hi", max_tokens=2,
                                                                               logprobs=21))

    def content_parts():
        g = Ctx.greedy_text
        assert g, "needs the greedy chat check"
        parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
        r = c.chat.completions.create(model=m, messages=parts, temperature=0, max_tokens=16)
        assert r.choices[0].message.content == g, \
            f"content as text parts gave {r.choices[0].message.content!r}, as a string {g!r}"

    def too_long():
        long_text = "hello world " * 300
        e = expect_error(openai.BadRequestError, 400, lambda: c.chat.completions.create(
            model=m, messages=[{"role": "user", "content": long_text}], max_tokens=4))
        nums = [int(x) for x in re.findall(r"\d+", e.message)]
        assert 256 in nums and any(x > 256 for x in nums), \
            f"the message does not give the context (256) and the prompt length: {e.message!r}"
        e = expect_error(openai.BadRequestError, 400, lambda: c.completions.create(
            model=m, prompt=long_text, max_tokens=4))
        nums = [int(x) for x in re.findall(r"\d+", e.message)]
        assert 256 in nums and any(x > 256 for x in nums), f"completions: {e.message!r}"
        info(f"too-long message: {e.message!r} (code {e.code!r}, param {getattr(e, 'param', None)!r})")

    check("models.list returns the served name", models)
    check("chat non-streaming greedy + determinism", chat_greedy)
    check("chat streaming == non-streaming, usage chunk", chat_stream)
    check("completions (string, stream, list of 2 prompts)", completions)
    check("n=3 with seed: 3 choices, reproducible", n_seed)
    check("logprobs (chat top_logprobs=3, completions logprobs=2)", logprobs)
    if Ctx.completion_lp:
        check("completions streaming logprobs text_offset", logprobs_stream_offsets)
    check("stop strings (non-streaming and streaming)", stop_strings)
    check("max_tokens=1, max_completion_tokens, ignore_eos+min_tokens", token_limits)
    check("chat_template_kwargs accepted", template_kwargs)
    check("error classes (404, 400)", errors)
    check("chat content as a list of text parts", content_parts)
    check("prompt longer than the context -> 400 naming lengths", too_long)
    # Informational probes of behaviour where pio may differ from OpenAI/vLLM.
    try:
        r = c.chat.completions.create(model=m, messages=[], max_tokens=2)
        info(f"messages=[] was accepted (OpenAI answers 400): {r.choices[0].message.content!r}")
    except openai.APIStatusError as e:
        info(f"messages=[]: {e.status_code} {e.message}")
    # What happens when max_tokens cannot fit (vLLM answers 400 here).
    try:
        r = c.completions.create(model=m, prompt=PROMPT, max_tokens=1000, temperature=0, extra_body={"ignore_eos": True})
        info(f"prompt {r.usage.prompt_tokens} + max_tokens 1000 > context 256 was accepted: "
             f"{r.usage.completion_tokens} tokens, finish_reason {r.choices[0].finish_reason!r}")
    except openai.APIStatusError as e:
        info(f"prompt + max_tokens > context: {e.status_code} {e.message}")


def run_auth_checks(srv):
    def auth():
        bad = srv.client(api_key="wrong")
        expect_error(openai.AuthenticationError, 401, lambda: bad.models.list())
        expect_error(openai.AuthenticationError, 401, lambda: bad.chat.completions.create(
            model=srv.name, messages=CHAT, max_tokens=2))
        good = srv.client(api_key="secret")
        assert srv.name in [x.id for x in good.models.list().data], "models.list with the right key"
        r = good.chat.completions.create(model=srv.name, messages=CHAT, max_tokens=2, temperature=0)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1, "chat with the right key"
        status, body = srv.get("/health")
        assert status == 200, f"GET /health without a key: {status} {body[:200]}"
        status, _ = srv.get("/metrics")
        info(f"GET /metrics without a key: {status} (vLLM serves /metrics without the key)")

    check("API key: wrong key 401, right key ok, /health open", auth)


def run_queue_checks(srv):
    c = srv.client()
    m = srv.name

    def first_content(stream):
        """Reads chunks until one carries generated text."""
        for chunk in stream:
            if any(ch.delta.content for ch in chunk.choices):
                return chunk
        raise AssertionError("the stream ended without content")

    def long_request(client=c):
        return client.chat.completions.create(model=m, messages=CHAT, max_tokens=2000, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})

    def queue_cap():
        a = long_request()
        b = None
        try:
            first_content(a)
            b = long_request()  # queued: the response (headers, role chunk) arrives, no tokens yet
            srv.wait_metrics(lambda x: x.get("pio_num_requests_waiting", 0) >= 1, "B waiting", timeout=5)
            expect_error(openai.RateLimitError, 429, lambda: c.chat.completions.create(
                model=m, messages=CHAT, max_tokens=4, stream=True))
            expect_error(openai.RateLimitError, 429, lambda: c.completions.create(
                model=m, prompt=PROMPT, max_tokens=4))
            a.close()
            srv.wait_metrics(lambda x: x["pio_num_requests_running"] <= 1 and x["pio_num_requests_waiting"] == 0,
                             "running <= 1 and waiting 0 after A closed")
            first_content(b)  # B got admitted and generates
            b.close()
            srv.wait_metrics(lambda x: x["pio_num_requests_running"] == 0 and x["pio_kv_cache_blocks_used"] == 0,
                             "running 0 and blocks_used 0 after B closed")
        finally:
            a.close()
            if b is not None:
                b.close()

    def cancel_queued():
        aborts0 = srv.metrics().get('pio_request_success_total{finished_reason="abort"}', 0)
        a = long_request()
        b = d = None
        try:
            first_content(a)
            b = long_request()
            srv.wait_metrics(lambda x: x.get("pio_num_requests_waiting", 0) >= 1, "B waiting", timeout=5)
            b.close()
            srv.wait_metrics(lambda x: x["pio_num_requests_waiting"] == 0, "waiting 0 after the queued B closed")
            try:
                d = long_request()  # the slot B held must be free again
            except openai.RateLimitError as e:
                raise AssertionError(f"a request after the queued one was cancelled got 429: {e.message}") from None
        finally:
            for x in (a, b, d):
                if x is not None:
                    x.close()
        # Idle, and all three requests counted as aborted: the last one's request can reach the
        # engine (and be aborted there) after the server first looks idle, which the next check,
        # counting aborts, would otherwise see.
        srv.wait_metrics(lambda x: x["pio_num_requests_running"] == 0 and x["pio_num_requests_waiting"] == 0
                         and x["pio_kv_cache_blocks_used"] == 0
                         and x.get('pio_request_success_total{finished_reason="abort"}', 0) == aborts0 + 3,
                         "idle with no blocks used and 3 aborts after closing all")

    def disconnect_stream():
        aborts0 = srv.metrics().get('pio_request_success_total{finished_reason="abort"}', 0)
        s = long_request()
        try:
            got = 0
            for chunk in s:
                if any(ch.delta.content for ch in chunk.choices):
                    got += 1
                    if got == 3:
                        break
            m1 = srv.metrics()
            assert m1["pio_kv_cache_blocks_used"] > 0 and m1["pio_num_requests_running"] == 1, \
                f"while streaming: running {m1['pio_num_requests_running']}, blocks {m1['pio_kv_cache_blocks_used']}"
        finally:
            s.close()
        m2 = srv.wait_metrics(lambda x: x["pio_num_requests_running"] == 0 and x["pio_kv_cache_blocks_used"] == 0,
                              "running 0 and blocks_used 0 after the client closed")
        aborts = m2.get('pio_request_success_total{finished_reason="abort"}', 0)
        assert aborts == aborts0 + 1, f"abort counter went {aborts0} -> {aborts}"

    def disconnect_nonstream():
        quick = srv.client(timeout=1.5)
        try:
            quick.chat.completions.create(model=m, messages=CHAT, max_tokens=2000, temperature=0,
                                          extra_body={"ignore_eos": True})
            raise AssertionError("a 2000-token request finished within 1.5 s; cannot test the disconnect")
        except openai.APITimeoutError:
            pass
        srv.wait_metrics(lambda x: x["pio_num_requests_running"] == 0 and x["pio_kv_cache_blocks_used"] == 0,
                         "running 0 and blocks_used 0 after a non-streaming client timed out")

    check("queue cap: 3rd request -> 429, queued one runs after cancel", queue_cap)
    check("cancelling a queued request frees its queue slot", cancel_queued)
    check("disconnect mid-stream frees the KV blocks", disconnect_stream)
    check("disconnect of a non-streaming request frees the KV blocks", disconnect_nonstream)


def run_vision_checks(srv, image_path):
    """A vision-language model: chat with a base64 image part, streamed and not."""
    import base64

    c = srv.client()
    m = srv.name
    with open(image_path, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()

    def messages(u):
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": u}},
            {"type": "text", "text": "What is in this picture?"}]}]

    def image_chat():
        r = c.chat.completions.create(model=m, messages=messages(url), temperature=0, max_tokens=8,
                                      extra_body={"ignore_eos": True})
        ch = r.choices[0]
        assert ch.message.content, f"empty message: {ch.message!r}"
        assert r.usage.completion_tokens == 8, f"usage {r.usage}"
        # The image's tokens are part of the prompt.
        text_only = c.chat.completions.create(
            model=m, messages=[{"role": "user", "content": "What is in this picture?"}], max_tokens=1)
        assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 16, (
            f"{r.usage.prompt_tokens} prompt tokens with the image, {text_only.usage.prompt_tokens} without")
        stream = c.chat.completions.create(model=m, messages=messages(url), temperature=0, max_tokens=8,
                                           stream=True, extra_body={"ignore_eos": True})
        streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert streamed == ch.message.content, f"streamed {streamed!r} != {ch.message.content!r}"
        info(f"image chat text: {ch.message.content!r} ({r.usage.prompt_tokens} prompt tokens)")

    def remote_url_refused():
        e = expect_error(openai.BadRequestError, 400,
                         lambda: c.chat.completions.create(model=m, messages=messages("https://example.com/a.png"),
                                                           max_tokens=4))
        assert "data: URL" in str(e), f"message {e}"

    check("chat with a base64 image part, streamed and not", image_chat)
    check("an http(s) image URL is refused with 400", remote_url_refused)

def validate(value, schema, at="$"):
    """A small JSON-schema check (type, properties, required, additionalProperties, enum, items,
    maxItems, minimum): enough for the schemas below, with no third-party package."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = schema.get("type")
    if t == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{at}: {value!r} is not an integer"
    elif t == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{at}: {value!r} is not a number"
    elif t is not None:
        assert isinstance(value, types[t]), f"{at}: {value!r} is not of type {t}"
    if "enum" in schema:
        assert value in schema["enum"], f"{at}: {value!r} not in {schema['enum']}"
    if "minimum" in schema:
        assert value >= schema["minimum"], f"{at}: {value!r} < {schema['minimum']}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            assert k in value, f"{at}: `{k}` is missing from {value!r}"
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(props)
            assert not extra, f"{at}: unexpected {sorted(extra)}"
        for k, v in value.items():
            if k in props:
                validate(v, props[k], f"{at}.{k}")
    if isinstance(value, list):
        if "maxItems" in schema:
            assert len(value) <= schema["maxItems"], f"{at}: more than {schema['maxItems']} items"
        for i, v in enumerate(value):
            validate(v, schema.get("items", {}), f"{at}[{i}]")


WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather forecast for a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time in a time zone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def run_agent_checks(srv):
    """An agent's requests on a model that writes tool calls: required and named calls that
    validate against their tool's schema, a tool result answered in text, and JSON-schema
    outputs, streamed and not, at temperature 0 and 1."""
    import json

    c = srv.client(timeout=120.0)
    m = srv.name
    ask = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]

    def check_call(name, arguments):
        assert name in SCHEMAS, f"call of an unknown function {name!r}"
        args = json.loads(arguments)
        validate(args, SCHEMAS[name])
        return args

    def required_call():
        for temperature in (0, 1):
            r = c.chat.completions.create(model=m, messages=ask, tools=TOOLS, tool_choice="required",
                                          temperature=temperature, seed=5, max_tokens=120)
            ch = r.choices[0]
            assert ch.finish_reason == "tool_calls", f"finish_reason {ch.finish_reason!r}: {ch.message!r}"
            assert ch.message.tool_calls, f"no tool calls: {ch.message!r}"
            for call in ch.message.tool_calls:
                assert call.type == "function" and call.id, f"{call!r}"
                args = check_call(call.function.name, call.function.arguments)
            info(f"required, temperature {temperature}: {ch.message.tool_calls[0].function.name}({args})")

    def required_call_streamed():
        stream = c.chat.completions.create(model=m, messages=ask, tools=TOOLS, tool_choice="required",
                                           temperature=1, seed=9, max_tokens=120, stream=True)
        calls, finish = {}, None
        for chunk in stream:
            if not chunk.choices:
                continue
            ch = chunk.choices[0]
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or d.id
                if d.function:
                    entry["name"] += d.function.name or ""
                    entry["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
        assert calls, "no tool-call deltas"
        assert finish == "tool_calls", f"finish_reason {finish!r}"
        for call in calls.values():
            assert call["id"], f"{call}"
            check_call(call["name"], call["arguments"])

    def named_call():
        r = c.chat.completions.create(model=m, messages=ask, tools=TOOLS, temperature=1, seed=2, max_tokens=120,
                                      tool_choice={"type": "function", "function": {"name": "get_time"}})
        calls = r.choices[0].message.tool_calls
        assert calls and len(calls) == 1, f"{r.choices[0].message!r}"
        assert calls[0].function.name == "get_time", f"{calls[0]!r}"
        check_call("get_time", calls[0].function.arguments)

    def tool_result_answered():
        r = c.chat.completions.create(model=m, messages=ask, tools=TOOLS, tool_choice="required", temperature=0,
                                      max_tokens=120)
        call = r.choices[0].message.tool_calls[0]
        history = ask + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id,
             "content": json.dumps({"forecast": ["sunny, 24 C", "cloudy, 19 C", "rain, 15 C"]})},
        ]
        r = c.chat.completions.create(model=m, messages=history, tools=TOOLS, temperature=0, max_tokens=80)
        ch = r.choices[0]
        assert ch.finish_reason in ("stop", "length"), f"finish_reason {ch.finish_reason!r}: {ch.message!r}"
        assert not ch.message.tool_calls, f"another call instead of an answer: {ch.message!r}"
        assert ch.message.content and ch.message.content.strip(), f"no text answer: {ch.message!r}"
        info(f"answer to the tool result: {ch.message.content[:100]!r}")

    def bad_tool_requests():
        e = expect_error(openai.BadRequestError, 400, lambda: c.chat.completions.create(
            model=m, messages=ask, tools=TOOLS, max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "get_stock_price"}}))
        assert e.body and e.body.get("param") == "tool_choice", f"{e.body}"
        e = expect_error(openai.BadRequestError, 400, lambda: c.chat.completions.create(
            model=m, messages=ask, max_tokens=4, tool_choice="required",
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]))
        assert e.body and e.body.get("param") == "tools", f"{e.body}"

    person = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "age", "languages"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}}
    describe = [{"role": "user", "content": "Describe a fictional programmer as JSON."}]

    def schema_output():
        for temperature in (0, 1):
            r = c.chat.completions.create(model=m, messages=describe, response_format=fmt, temperature=temperature,
                                          seed=4, max_tokens=150)
            text = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop", f"finish_reason {r.choices[0].finish_reason!r}: {text!r}"
            validate(json.loads(text), person)
            stream = c.chat.completions.create(model=m, messages=describe, response_format=fmt,
                                               temperature=temperature, seed=4, max_tokens=150, stream=True)
            streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            validate(json.loads(streamed), person)
            if temperature == 0:
                assert streamed == text, f"streamed {streamed!r} != {text!r}"
            info(f"json_schema, temperature {temperature}: {text[:100]!r}")

    check("tool_choice required: calls valid under their tool's schema (temperature 0 and 1)", required_call)
    check("tool_choice required, streamed: tool-call deltas assemble into a valid call", required_call_streamed)
    check("tool_choice naming a function: one call of it", named_call)
    check("a tool result is answered in text", tool_result_answered)
    check("an unknown named function or a bad tool schema is a 400 naming the field", bad_tool_requests)
    check("response_format json_schema: valid JSON, streamed and not, temperature 0 and 1", schema_output)


# ---------------------------------------------------------------------------------------------


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pio", required=True, help="path of the pio binary")
    p.add_argument("--model", required=True, help="a GGUF model with a chat template")
    p.add_argument("--vision-model", help="also: a vision-language model (Hugging Face directory with a tokenizer)")
    p.add_argument("--image", help="the PNG image for --vision-model")
    p.add_argument("--agent-model", help="also: tool calls and JSON-schema outputs on this GGUF model (one whose "
                   "chat template writes tool calls, e.g. Qwen2.5-Coder-0.5B-Instruct)")
    ARGS = p.parse_args()
    t0 = time.monotonic()
    print(f"openai {openai.__version__}, pio {ARGS.pio}, model {ARGS.model}", flush=True)

    phases = [
        ("main", ["--max-model-len", "256"], run_main_checks),
        ("auth", ["--max-model-len", "256", "--max-num-seqs", "4", "--api-key", "secret"], run_auth_checks),
        ("queue", ["--max-model-len", "4096", "--max-num-seqs", "1", "--max-queued-requests", "1"], run_queue_checks),
    ]
    runs = [(ARGS.model, label, args, fn) for label, args, fn in phases]
    if ARGS.vision_model:
        runs.append((ARGS.vision_model, "vision", [], lambda srv: run_vision_checks(srv, ARGS.image)))
    if ARGS.agent_model:
        runs.append((ARGS.agent_model, "agent", ["--max-model-len", "4096"], run_agent_checks))
    for model, label, args, fn in runs:
        try:
            srv = Server(ARGS.pio, model, args, label)
        except Exception as e:  # noqa: BLE001
            fail(f"start the {label} server", e)
            continue
        try:
            fn(srv)
            if srv.proc.poll() is not None:
                fail(f"{label} server still alive", f"it exited with {srv.proc.returncode}: {srv.stderr()}")
        finally:
            srv.stop()

    failed = [n for n, ok in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed in {time.monotonic() - t0:.1f} s", flush=True)
    for n in failed:
        print(f"  failed: {n}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        _stop_all()
    sys.exit(code)

#!/usr/bin/env python3
"""Speculative decoding (n-gram / prompt lookup) on code-editing prompts: decode tokens/s with
and without it, acceptance, and that the tokens are the same; optionally beside llama.cpp's
llama-server with its own speculative setting on the same prompts and file, and with N
concurrent requests through `pio serve`.

    scripts/bench-spec.py --model models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf [--rounds 3]
        [--prompts crates/pio-cli/tests/data/spec] [--max-tokens 700] [--threads 2]
        [--spec-args "--spec ngram"] [--concurrency 8]
        [--llama-server PATH --llama-spec-args "--spec-type ngram-simple"]
    scripts/bench-spec.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf --open-ended

Single-request figures come from `pio generate --json` (decode tokens over decode time), each
run a fresh process; with and without alternate in every round, and medians are printed.
`--open-ended` uses chat prompts whose answers do not repeat the prompt (where proposals rarely
hit), to measure what speculation costs there. Standard library only; loopback only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPEN_ENDED = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three good habits for staying healthy? Explain each briefly.",
    "Describe a walk through a forest in autumn.",
    "Give me some ideas for a birthday party for a ten-year-old.",
    "Why is the sky blue? Explain it to a child.",
]


def generate(a, prompt, extra):
    cmd = [a.pio, "--threads", str(a.threads), "generate", "--model", a.model, "--chat", "--prompt", prompt,
           "--temperature", "0", "--max-tokens", str(a.max_tokens), "--json"] + extra
    d = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return d["timings"]["decode_tokens_per_s"], d["token_ids"], d.get("spec") or {}


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(url, proc, what):
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    sys.exit(f"{what} did not start")


def llama_server(a, prompts, spec_args, port=8191):
    """Decode tokens/s per prompt from llama-server's own timings (one request at a time)."""
    cmd = [a.llama_server, "-m", a.model, "-t", str(a.threads), "-c", "4096", "--port", str(port), "-np", "1"]
    proc = subprocess.Popen(cmd + spec_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, "llama-server")
        out = []
        for p in prompts:
            d = post(f"http://127.0.0.1:{port}/v1/chat/completions", {
                "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": a.max_tokens,
                "cache_prompt": False,
            })
            t = d.get("timings", {})
            out.append((t.get("predicted_per_second", 0.0), t.get("draft_n"), t.get("draft_n_accepted")))
        return out
    finally:
        proc.terminate()
        proc.wait()


def concurrent(a, prompts, spec_args, n, port=8192):
    """Aggregate completion tokens/s of `n` requests at once through `pio serve`."""
    cmd = [a.pio, "--threads", str(a.threads), "serve", "--model", a.model, "--port", str(port),
           "--served-model-name", "m", "--max-num-seqs", str(n)] + spec_args
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, "pio serve")
        tokens = [0] * n

        def one(i):
            d = post(f"http://127.0.0.1:{port}/v1/chat/completions", {
                "model": "m", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "temperature": 0, "max_tokens": a.max_tokens,
            })
            tokens[i] = d["usage"]["completion_tokens"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(tokens) / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pio", default=str(ROOT / "target" / "release" / "pio"))
    ap.add_argument("--prompts", default=str(ROOT / "crates" / "pio-cli" / "tests" / "data" / "spec"))
    ap.add_argument("--open-ended", action="store_true", help="open-ended chat prompts instead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=700)
    ap.add_argument("--spec-args", default="--spec ngram")
    ap.add_argument("--concurrency", type=int, default=0)
    ap.add_argument("--llama-server")
    ap.add_argument("--llama-spec-args", default="")
    a = ap.parse_args()
    spec_args = a.spec_args.split()
    if a.open_ended:
        prompts = OPEN_ENDED
        names = [f"open-{i + 1}" for i in range(len(prompts))]
    else:
        files = sorted(Path(a.prompts).glob("*.txt"))
        prompts = [f.read_text() for f in files]
        names = [f.stem for f in files]
    m = statistics.median
    ratios = []
    for name, p in zip(names, prompts) if a.rounds > 0 else []:
        plain, spec, acc = [], [], []
        for r in range(a.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            got = {}
            for use in order:
                got[use] = generate(a, p, spec_args if use else [])
            if got[True][1] != got[False][1]:
                sys.exit(f"{name}: tokens differ with speculation")
            plain.append(got[False][0])
            spec.append(got[True][0])
            s = got[True][2]
            acc.append((s.get("accepted_tokens", 0), s.get("draft_tokens", 0), len(got[True][1])))
        ratio = m(s / p for s, p in zip(spec, plain))
        ratios.append(ratio)
        a_tok, d_tok, n = acc[0]
        print(f"{name}: {n} tokens, plain {m(plain):.1f} tok/s, spec {m(spec):.1f} tok/s, {ratio:.2f}x "
              f"(per-round ratios' median); accepted {a_tok}/{d_tok} proposed ({100 * a_tok / max(d_tok, 1):.0f}%), "
              f"same tokens", flush=True)
    if ratios:
        print(f"median speedup over {len(prompts)} prompts: {m(ratios):.2f}x")
    if a.llama_server:
        for label, extra in [("llama.cpp plain", []), ("llama.cpp spec", a.llama_spec_args.split())]:
            rows = llama_server(a, prompts, extra)
            for name, (tps, dn, da) in zip(names, rows):
                print(f"{label} {name}: {tps:.1f} tok/s" + (f", accepted {da}/{dn}" if dn else ""), flush=True)
            print(f"{label}: median {m(r[0] for r in rows):.1f} tok/s")
    if a.concurrency:
        for label, extra in [("plain", []), ("spec", spec_args)]:
            tps = concurrent(a, prompts, extra, a.concurrency)
            print(f"{a.concurrency} concurrent requests, {label}: {tps:.1f} tok/s aggregate", flush=True)


if __name__ == "__main__":
    main()

"""Decode speed through the Python package against the CLI on the same model and prompt, and
the aggregate decode of N Python threads calling at once against one.

    python3 crates/pio-python/bench.py MODEL.gguf [--pio target/release/pio] [--tokens 128]
        [--threads 2] [--callers 8] [--rounds 3]

Decode tokens/s: the CLI's own figure (`pio generate --json`: decode steps over decode time);
Python's from the stream (tokens after the first over the time from the first to the last, as
a caller sees them). Rounds alternate which goes first; medians are printed.

Both sides of the comparison run in fresh processes (Python: this script with `--child`), one
at a time: on the VM this was measured on, a process decodes ~10% faster while another process
holds a gigabyte of memory (the CLI alone 59-67 tok/s, beside an idle 1 GB allocation 68-73), so
a CLI run beside a long-lived process holding the model would be flattered.
"""

import argparse
import json
import statistics
import subprocess
import threading
import time

import sys

import inference_pio as ip

PROMPT = "Write a long story about a dragon who learns to sing."


def cli_decode(pio, model, tokens, threads):
    out = subprocess.run(
        [pio, "--threads", str(threads), "generate", "--model", model, "--prompt", PROMPT, "--temperature", "0",
         "--ignore-eos", "--max-tokens", str(tokens), "--json"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)["timings"]["decode_tokens_per_s"]


def python_decode(llm, tokens):
    params = ip.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    stream = llm._engine.stream(prompt=PROMPT, params=params._resolve(llm._defaults))
    n, first, last = 0, None, None
    for step in stream:
        now = time.perf_counter()
        k = len(step["token_ids"])
        if k:
            if first is None:
                first, n = now, k - 1
            else:
                n += k
            last = now
    return n / (last - first)


def child_decode(model, tokens, threads):
    """Decode tokens/s of one request in a fresh Python process."""
    out = subprocess.run(
        [sys.executable, __file__, model, "--child", "--tokens", str(tokens), "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    )
    return float(out.stdout.split()[-1])


def aggregate(llm, callers, tokens):
    params = ip.SamplingParams(temperature=0.8, seed=1, max_tokens=tokens, ignore_eos=True)
    counts = [0] * callers

    def work(i):
        counts[i] = len(llm.generate(f"Story {i}: {PROMPT}", params)[0].outputs[0].token_ids)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--pio", default="target/release/pio")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--callers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help="load, decode once, print tokens/s")
    a = ap.parse_args()
    if a.child:
        llm = ip.LLM(a.model, threads=a.threads, max_model_len=4096)
        print(python_decode(llm, a.tokens))
        llm.shutdown()
        return
    m = statistics.median
    cli, py = [], []
    for r in range(a.rounds):
        # Which goes first alternates, so a drift of the machine's speed hurts both alike.
        pair = [lambda: cli.append(cli_decode(a.pio, a.model, a.tokens, a.threads)),
                lambda: py.append(child_decode(a.model, a.tokens, a.threads))]
        for run in pair if r % 2 == 0 else pair[::-1]:
            run()
        print(f"round {r + 1}: cli {cli[-1]:.1f}  python {py[-1]:.1f} tok/s", flush=True)
    print(f"decode tok/s, medians of {a.rounds}: CLI {m(cli):.1f}, Python {m(py):.1f} "
          f"({(m(py) / m(cli) - 1) * 100:+.1f}%)", flush=True)
    llm = ip.LLM(a.model, threads=a.threads, max_model_len=4096)
    one, many = [], []
    for r in range(a.rounds):
        one.append(aggregate(llm, 1, a.tokens))
        many.append(aggregate(llm, a.callers, a.tokens))
        print(f"round {r + 1}: 1 caller {one[-1]:.1f}  {a.callers} callers {many[-1]:.1f} tok/s", flush=True)
    print(f"aggregate decode tok/s: 1 caller {m(one):.1f}, {a.callers} callers {m(many):.1f} "
          f"({m(many) / m(one):.2f}x)")
    llm.shutdown()


if __name__ == "__main__":
    main()

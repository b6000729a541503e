#!/usr/bin/env python3
"""Load test of an OpenAI-compatible server (pio serve), Python standard library only.

Usage:
    python3 scripts/load_test.py --url http://127.0.0.1:PORT --model NAME \
        [--clients 32] [--duration 60] [--max-tokens 128] [--prompt-tokens 100] \
        [--pid SERVER_PID] [--api-key KEY] [--json] [--json-schema FILE]
    python3 scripts/load_test.py ... --compare-single --clients 16 [--min-speedup 6]

Each of --clients clients loops for --duration seconds: a streaming chat completion with a
prompt of its own (a unique head, then ~--prompt-tokens random words, so the prefix cache does
not help), `ignore_eos: true` so every request generates --max-tokens tokens, and
`stream_options.include_usage` for the exact token count. At the deadline the requests still
running are cut off (their tokens so far still count for the aggregate throughput, they do not
count as completed). The SSE stream is read over raw asyncio sockets (chunked transfer decoding
and `data:` parsing by hand).

Figures: requests completed, requests/s, aggregate decode tokens/s (every generated token
received before the deadline / wall time; prefill time included, so it ramps up), the same over
the second half of the window only (text chunks counted, close to steady state), per-stream
decode tokens/s (median over requests with >= 2 tokens, cut-off ones included, of
(tokens - 1) / (last token time - first token time)), TTFT p50/p99 (requests that got a first
token; those that had none at the deadline are counted apart), inter-chunk gap p50/p99, errors
(HTTP status != 200, `error` events, connection failures, streams without [DONE]), the server's
own count of generated tokens (from /metrics) and, with --pid, the server's RSS (VmRSS) before
and after and its peak (VmHWM).

Keep --prompt-tokens + --max-tokens within the server's --max-model-len.

--compare-single runs one client first, then --clients clients, and checks that the aggregate
decode throughput with many streams is at least --min-speedup times the single stream's (exit 1
if not). The same check by hand: run once with --clients 1 and once with --clients 16.
"""

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.parse
import urllib.request

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact river mountain garden window kitchen market music story "
    "history science language question answer reason memory energy system program letter paper picture "
    "country city village ocean forest winter summer autumn spring morning evening night light shadow color "
    "green yellow purple orange silver golden quiet loud gentle brave clever ancient modern simple strange "
    "happy careful honest bright dark warm cold fast slow early late small large short long young old "
    "build write read speak listen travel remember forget imagine explain discover follow gather carry "
    "open close begin finish change grow learn teach bring hold turn move play run walk sing paint dream"
).split()


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(xs):
    return statistics.median(xs) if xs else None


def read_rss(pid):
    """(VmRSS, VmHWM) of a process in MiB, or (None, None)."""
    if not pid:
        return None, None
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0]) / 1024.0  # kB -> MiB
    except OSError:
        return None, None
    return out.get("VmRSS"), out.get("VmHWM")


def server_metrics(base, api_key):
    """The server's Prometheus counters, or {} if /metrics cannot be read."""
    req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode()
    except Exception:  # noqa: BLE001 - optional figures
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


class HttpError(Exception):
    pass


class Request:
    """What one request got: its start, the arrival of each chunk with text, its usage."""

    def __init__(self, t0):
        self.t0 = t0
        self.times = []
        self.usage = None
        self.completed = False

    def tokens(self):
        """Generated tokens: usage's count when complete, else the text chunks received."""
        return self.usage["completion_tokens"] if self.completed and self.usage else len(self.times)


class Stats:
    def __init__(self):
        self.requests = []
        self.errors = {}  # kind -> count
        self.error_samples = []

    def error(self, kind, detail):
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {detail}"[:300])


async def read_body(reader, headers):
    """Yields the body's bytes as they come (chunked, Content-Length or until EOF)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await reader.readline()
            if not line:
                raise HttpError("connection closed inside a chunked body")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            yield await reader.readexactly(n)
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def one_request(args, host, port, path, prompt, stats, deadline):
    req = {
        "model": args.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if args.json_schema:
        req["response_format"] = {"type": "json_schema", "json_schema": {"name": "load", "schema": args.json_schema}}
    body = json.dumps(req).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n")
    if args.api_key:
        head += f"Authorization: Bearer {args.api_key}\r\n"
    rec = Request(time.monotonic())
    stats.requests.append(rec)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split()
        if len(parts) < 2:
            raise HttpError(f"bad status line {status_line!r}")
        status = int(parts[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 200:
            text = b"".join([c async for c in read_body(reader, headers)]).decode(errors="replace")
            stats.error(f"http {status}", text)
            return False
        buf = b""
        done = False
        async for data in read_body(reader, headers):
            buf += data.replace(b"\r\n", b"\n")
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
                if not payload:
                    continue  # keep-alive comment
                if payload == b"[DONE]":
                    done = True
                    continue
                obj = json.loads(payload)
                if "error" in obj:
                    stats.error("error event", obj["error"].get("message") if isinstance(obj["error"], dict) else obj)
                    return False
                if obj.get("usage"):
                    rec.usage = obj["usage"]
                if any((c.get("delta") or {}).get("content") for c in obj.get("choices") or []):
                    rec.times.append(time.monotonic())
        if not done:
            stats.error("no [DONE]", "the stream ended without data: [DONE]")
            return False
        if not rec.times:
            stats.error("no tokens", "the stream carried no generated text")
            return False
        if rec.usage is None:
            stats.error("no usage", "no usage chunk despite stream_options.include_usage")
        rec.completed = True
        return True
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:  # noqa: BLE001
            pass


def make_prompt(rng, client, i, n_words):
    head = f"Request {client}-{i}-{rng.randrange(1 << 30)}: write a long, detailed story using these words:"
    return head + " " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def prompt_tokens_of(args, n_words):
    """The server's prompt_tokens for a prompt of n_words words (one 1-token request)."""
    u = urllib.parse.urlparse(args.url)
    body = json.dumps({"model": args.model, "max_tokens": 1, "temperature": 0,
                       "messages": [{"role": "user", "content": make_prompt(random.Random(0), "c", 0, n_words)}]})
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    req = urllib.request.Request(f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}/v1/chat/completions",
                                 data=body.encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["usage"]["prompt_tokens"]


def calibrate(args):
    """Words per prompt so that the templated prompt has about --prompt-tokens tokens."""
    n = max(1, args.prompt_tokens - 40)
    for _ in range(3):
        got = prompt_tokens_of(args, n)
        if abs(got - args.prompt_tokens) <= 2:
            break
        n = max(1, n + args.prompt_tokens - got)  # random common words are about a token each
    return n, got


async def client_loop(args, host, port, path, cid, stats, deadline):
    rng = random.Random(cid * 7919 + int(time.time()))
    i = 0
    n_words = args.n_words
    while time.monotonic() < deadline:
        i += 1
        try:
            ok = await one_request(args, host, port, path, make_prompt(rng, cid, i, n_words), stats, deadline)
        except asyncio.CancelledError:
            raise
        except (OSError, HttpError, asyncio.IncompleteReadError, ValueError) as e:
            stats.error(type(e).__name__, str(e))
            ok = False
        if not ok:
            await asyncio.sleep(0.2)  # no hot loop on refusals


async def run_phase(args, clients):
    u = urllib.parse.urlparse(args.url)
    host, port = u.hostname, u.port or 80
    path = (u.path.rstrip("/") or "") + "/v1/chat/completions"
    base = f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}"
    stats = Stats()
    rss0, _ = read_rss(args.pid)
    m0 = server_metrics(base, args.api_key)
    t0 = time.monotonic()
    deadline = t0 + args.duration
    tasks = [asyncio.create_task(client_loop(args, host, port, path, c, stats, deadline)) for c in range(clients)]
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    for t in tasks:
        t.cancel()  # cuts off the requests still running: the server sees the clients go away
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.monotonic() - t0
    m1 = server_metrics(base, args.api_key)
    rss1, hwm = read_rss(args.pid)
    gen_key = "pio_generation_tokens_total"
    server_tokens = m1[gen_key] - m0[gen_key] if gen_key in m0 and gen_key in m1 else None
    reqs = stats.requests
    done = [q for q in reqs if q.completed]
    # Tokens received before the deadline; a chunk carrying several tokens (held-back text)
    # counts them all when usage says so (complete requests), else once.
    tokens = 0
    for q in reqs:
        n_in = sum(1 for t in q.times if t <= deadline)
        tokens += q.tokens() if q.completed and q.times and q.times[-1] <= deadline else n_in
    half = t0 + args.duration / 2
    late_chunks = sum(1 for q in reqs for t in q.times if half <= t <= deadline)
    ttft = [q.times[0] - q.t0 for q in reqs if q.times]
    gaps = [b - a for q in reqs for a, b in zip(q.times, q.times[1:])]
    stream_tps = [(q.tokens() - 1) / (q.times[-1] - q.times[0])
                  for q in reqs if len(q.times) >= 2 and q.times[-1] > q.times[0]]
    prompt_tokens = [q.usage["prompt_tokens"] for q in done if q.usage]
    r = {
        "clients": clients,
        "duration_s": round(wall, 2),
        "max_tokens": args.max_tokens,
        "prompt_tokens_mean": round(statistics.mean(prompt_tokens), 1) if prompt_tokens else args.prompt_tokens_calibrated,
        "requests_started": len(reqs),
        "requests_completed": len(done),
        "requests_per_s": round(len(done) / wall, 3),
        "tokens_received": tokens,
        "aggregate_decode_tok_s": round(tokens / wall, 2),
        "aggregate_decode_tok_s_2nd_half": round(late_chunks / (args.duration / 2), 2),
        "server_generated_tokens": server_tokens,
        "server_generated_tok_s": round(server_tokens / wall, 2) if server_tokens is not None else None,
        "per_stream_decode_tok_s_p50": rnd(median(stream_tps), 2),
        "per_stream_samples": len(stream_tps),
        "ttft_p50_s": rnd(percentile(ttft, 50), 3),
        "ttft_p99_s": rnd(percentile(ttft, 99), 3),
        "ttft_samples": len(ttft),
        "requests_without_first_token": sum(1 for q in reqs if not q.times),
        "itl_p50_ms": rnd(ms(percentile(gaps, 50)), 1),
        "itl_p99_ms": rnd(ms(percentile(gaps, 99)), 1),
        "short_requests": sum(1 for q in done if q.tokens() < args.max_tokens),
        "errors": sum(stats.errors.values()),
        "errors_by_kind": stats.errors,
        "error_samples": stats.error_samples,
        "rss_before_mib": rnd(rss0, 1),
        "rss_after_mib": rnd(rss1, 1),
        "rss_peak_mib": rnd(hwm, 1),
    }
    return r


def rnd(x, n):
    return None if x is None else round(x, n)


def ms(x):
    return None if x is None else x * 1000.0


def table(r):
    def f(v, unit=""):
        return "-" if v is None else f"{v}{unit}"

    rows = [
        ("clients", f(r["clients"])),
        ("wall time", f(r["duration_s"], " s")),
        ("prompt tokens (mean)", f(r["prompt_tokens_mean"])),
        ("requests completed", f"{r['requests_completed']} (of {r['requests_started']} started; the rest cut off)"),
        ("requests/s", f(r["requests_per_s"])),
        ("aggregate decode tok/s", f(r["aggregate_decode_tok_s"])),
        ("  in the 2nd half (text chunks)", f(r["aggregate_decode_tok_s_2nd_half"])),
        ("  server's count tok/s", f(r["server_generated_tok_s"])),
        ("per-stream decode tok/s p50", f"{f(r['per_stream_decode_tok_s_p50'])} ({r['per_stream_samples']} streams)"),
        ("TTFT p50 / p99", f"{f(r['ttft_p50_s'], ' s')} / {f(r['ttft_p99_s'], ' s')} ({r['ttft_samples']} requests; "
                           f"{r['requests_without_first_token']} had no token yet)"),
        ("inter-chunk gap p50 / p99", f"{f(r['itl_p50_ms'], ' ms')} / {f(r['itl_p99_ms'], ' ms')}"),
        ("short requests (< max_tokens)", f(r["short_requests"])),
        ("errors", f"{r['errors']} {r['errors_by_kind'] or ''}".strip()),
        ("server RSS before / after / peak",
         f"{f(r['rss_before_mib'], ' MiB')} / {f(r['rss_after_mib'], ' MiB')} / {f(r['rss_peak_mib'], ' MiB')}"),
    ]
    w = max(len(k) for k, _ in rows)
    out = "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
    for s in r["error_samples"]:
        out += f"\n  error sample: {s}"
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=100, help="rough prompt length, chat template included")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--pid", type=int, help="the server's process id, for its RSS")
    p.add_argument("--api-key")
    p.add_argument("--compare-single", action="store_true",
                   help="run 1 client first, then --clients, and compare the aggregate throughputs")
    p.add_argument("--min-speedup", type=float, default=6.0, help="what --compare-single demands")
    p.add_argument("--json", action="store_true", help="also print one JSON line with all figures")
    p.add_argument("--json-schema", metavar="FILE", type=lambda f: json.load(open(f)),
                   help="every request asks for JSON under this schema (response_format), to measure what "
                        "constrained decoding costs")
    args = p.parse_args()

    try:
        args.n_words, args.prompt_tokens_calibrated = calibrate(args)
    except Exception as e:  # noqa: BLE001
        print(f"cannot reach the server at {args.url}: {e}", file=sys.stderr)
        return 2
    phases = [1, args.clients] if args.compare_single else [args.clients]
    results = []
    for n in phases:
        print(f"running {n} client(s) for {args.duration:g} s, max_tokens {args.max_tokens}, "
              f"~{args.prompt_tokens} prompt tokens ...", file=sys.stderr, flush=True)
        r = asyncio.run(run_phase(args, n))
        results.append(r)
        print(f"\n{n} client(s):\n{table(r)}", flush=True)
    code = 0
    summary = {"url": args.url, "model": args.model, "phases": results}
    if args.compare_single:
        single, many = results[0]["aggregate_decode_tok_s"], results[1]["aggregate_decode_tok_s"]
        speedup = many / single if single else None
        ok = speedup is not None and speedup >= args.min_speedup
        summary["speedup"] = rnd(speedup, 2)
        summary["speedup_ok"] = ok
        print(f"\naggregate decode with {args.clients} streams / 1 stream = "
              f"{'-' if speedup is None else f'{speedup:.2f}'}x (want >= {args.min_speedup:g}x): "
              f"{'PASS' if ok else 'FAIL'}", flush=True)
        code = 0 if ok else 1
    if any(r["errors"] for r in results):
        code = code or 2
    if args.json:
        print(json.dumps(summary if args.compare_single else results[0]), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

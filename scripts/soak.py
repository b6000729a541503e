#!/usr/bin/env python3
"""Soak test of `pio serve`: sustained mixed load with malformed requests and clients that
vanish mid-stream, watching the server's memory, descriptors and KV cache. Standard library
only; loopback only; bounded in time.

    scripts/soak.py --pio target/release/pio --model FILE [--duration 3600] [--clients 16]
        [--malformed 0.1] [--disconnect 0.1] [--sample-every 5] [--warmup 0.2] [--json]
        [--slowloris 200] [-- extra pio serve arguments]

It starts the server itself (`pio serve --port 0`), then for --duration seconds runs --clients
client threads, each looping over random requests: chat or completion, streamed or not, random
prompt, max_tokens, temperature, n, stop strings, logprobs (so each token can be counted); a
share --malformed of them broken on purpose (bad JSON, wrong types, unknown fields' values, a
prompt over the context, unknown model, bad route), which must get a 4xx; a share --disconnect
of the streamed ones dropped after a few events. Every --sample-every seconds it reads the
server's RSS and open descriptors (/proc) and /metrics.

With --slowloris N it instead measures what N slow clients (each sending its headers a byte
every second, reconnecting when cut off) do to a normal client's time to first token: median of
requests with and without them.

Fails (exit 1) on: any 5xx; a request whose tokens (logprobs entries) differ from its `usage`;
a malformed request that is not answered 4xx; RSS after warm-up growing by more than
max(64 MiB, 10%), or descriptors by more than 16 (median of the last quarter of samples
against that of the first after warm-up); KV blocks still in use once idle; the server dying.
"""

import argparse
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "river mountain code function value server token model memory engine light story house garden").split()


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


class Server:
    def __init__(self, pio, model, extra):
        cmd = [pio, "serve", "--model", model, "--host", "127.0.0.1", "--port", "0"] + extra
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.lines = []
        first = self.proc.stderr.readline()
        m = re.match(r"serving (\S+) on http://([^\s:/]+):(\d+)", first)
        if not m:
            self.proc.kill()
            sys.exit(f"the server did not start: {first!r}")
        self.name, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
        m = re.search(r"context (\d+) tokens", first)
        self.context = int(m.group(1)) if m else 4096
        threading.Thread(target=lambda: [self.lines.append(l) for l in self.proc.stderr], daemon=True).start()

    def rss_and_fds(self):
        pid = self.proc.pid
        rss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))

    def metrics(self):
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.served = 0
        self.by_status = {}
        self.failures = []
        self.ttft = []
        self.disconnects = 0
        self.malformed = 0

    def fail(self, msg):
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(msg)


def sse_events(resp):
    """The `data:` payloads of a streamed answer, as they come."""
    buf = b""
    while True:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:].decode()


def valid_request(rng, srv):
    chat = rng.random() < 0.6
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
    body = {"model": srv.name, "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.7, 1.0]),
            "seed": rng.randint(0, 1 << 30)}
    if rng.random() < 0.3:
        body["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.2:
        body["n"] = 2
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
        body["logprobs"] = True
        path = "/v1/chat/completions"
    else:
        body["prompt"] = words
        body["logprobs"] = 0
        path = "/v1/completions"
    return path, body, chat


MALFORMED = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 1000}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "model": "nope"}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                         "response_format": {"type": "json_schema"}}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "x"}]}).encode()),
    ("/v1/completions", json.dumps({"prompt": [1, "a"]}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10 ** 9}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 99}).encode()),
    ("/v1/nothing", b"{}"),
    ("/detokenize", json.dumps({"tokens": [-1]}).encode()),
]


def client(args, srv, stats, cid, deadline):
    rng = random.Random(args.seed * 1000 + cid)
    while time.monotonic() < deadline:
        if rng.random() < args.malformed:
            path, raw = rng.choice(MALFORMED)
            if path == "/v1/completions" and b"10 ** 9" in raw:
                raw = json.dumps({"prompt": "x " * (srv.context + 8), "max_tokens": 4}).encode()
            try:
                c = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
                c.request("POST", path, raw, {"Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                c.close()
            except OSError as e:
                stats.fail(f"malformed request to {path}: {e}")
                continue
            with stats.lock:
                stats.by_status[r.status] = stats.by_status.get(r.status, 0) + 1
                stats.malformed += 1
            if not 400 <= r.status < 500:
                stats.fail(f"malformed request {raw[:80]!r} to {path} answered {r.status}")
            continue
        path, body, chat = valid_request(rng, srv)
        stream = rng.random() < 0.6
        drop = stream and rng.random() < args.disconnect
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        t0 = time.monotonic()
        try:
            c = http.client.HTTPConnection(srv.host, srv.port, timeout=300)
            c.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
            r = c.getresponse()
            status = r.status
            with stats.lock:
                stats.by_status[status] = stats.by_status.get(status, 0) + 1
            if status != 200:
                text = r.read()[:200]
                if status >= 500 or status != 429:
                    stats.fail(f"{path} answered {status}: {text!r}")
                c.close()
                continue
            if not stream:
                v = json.loads(r.read())
                c.close()
                counted = 0
                for ch in v["choices"]:
                    lp = ch.get("logprobs") or {}
                    counted += len(lp.get("content") or []) if chat else len(lp.get("tokens") or [])
                if counted != v["usage"]["completion_tokens"]:
                    stats.fail(f"{path}: {counted} tokens with logprobs, usage says {v['usage']['completion_tokens']}")
                with stats.lock:
                    stats.served += 1
                continue
            counted, usage, first, events = 0, None, None, 0
            for data in sse_events(r):
                if data == "[DONE]":
                    break
                v = json.loads(data)
                if "error" in v:
                    stats.fail(f"{path}: error event {data[:200]}")
                    break
                events += 1
                for ch in v.get("choices") or []:
                    lp = ch.get("logprobs") or {}
                    n = len(lp.get("content") or []) if chat else len(lp.get("tokens") or [])
                    if n and first is None:
                        first = time.monotonic() - t0
                    counted += n
                if v.get("usage"):
                    usage = v["usage"]
                if drop and events >= 3:
                    break
            c.close()
            if drop:
                with stats.lock:
                    stats.disconnects += 1
                continue
            if usage is None or counted != usage["completion_tokens"]:
                stats.fail(f"{path} (streamed): {counted} tokens with logprobs, usage {usage}")
            with stats.lock:
                stats.served += 1
                if first is not None:
                    stats.ttft.append(first)
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            stats.fail(f"{path}: {type(e).__name__}: {e}")


def ttft_once(srv):
    body = {"model": srv.name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2,
            "stream": True, "temperature": 0}
    t0 = time.monotonic()
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
    c.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    r = c.getresponse()
    for data in sse_events(r):
        v = json.loads(data) if data != "[DONE]" else {}
        if any((ch.get("delta") or {}).get("content") for ch in v.get("choices") or []):
            c.close()
            return time.monotonic() - t0
    c.close()
    return None


def slowloris(srv, n, stop):
    """n connections dribbling their headers a byte a second, reopened when cut off."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000
    socks = []

    def connect():
        try:
            s = socket.create_connection((srv.host, srv.port), timeout=5)
            s.setblocking(False)
            return [s, 0]
        except OSError:
            return None

    while not stop.is_set():
        while len(socks) < n:
            s = connect()
            if s is None:
                break
            socks.append(s)
        alive = []
        for s in socks:
            try:
                s[0].send(head[s[1]:s[1] + 1])
                s[1] += 1
                alive.append(s)
            except (BlockingIOError, InterruptedError):
                alive.append(s)
            except OSError:
                s[0].close()
        socks = alive
        stop.wait(1.0)
    for s in socks:
        s[0].close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pio", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--duration", type=float, default=3600)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--malformed", type=float, default=0.1)
    p.add_argument("--disconnect", type=float, default=0.1)
    p.add_argument("--sample-every", type=float, default=5)
    p.add_argument("--warmup", type=float, default=0.2, help="share of the duration before growth is measured")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slowloris", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("extra", nargs="*", help="more `pio serve` arguments (after --)")
    a = p.parse_args()
    srv = Server(a.pio, a.model, a.extra)
    print(f"serving {srv.name} on {srv.host}:{srv.port} (pid {srv.proc.pid})", flush=True)
    failures = []
    try:
        if a.slowloris:
            base = [t for t in (ttft_once(srv) for _ in range(10)) if t is not None]
            stop = threading.Event()
            th = threading.Thread(target=slowloris, args=(srv, a.slowloris, stop), daemon=True)
            th.start()
            time.sleep(3)
            _, fds = srv.rss_and_fds()
            under = [t for t in (ttft_once(srv) for _ in range(10)) if t is not None]
            stop.set()
            th.join(10)
            b, u = statistics.median(base), statistics.median(under) if under else float("inf")
            result = {"slow_connections": a.slowloris, "server_fds_under_attack": fds,
                      "ttft_ms_median_without": round(1e3 * b, 1), "ttft_ms_median_with": round(1e3 * u, 1),
                      "ratio": round(u / b, 2)}
            print(json.dumps(result) if a.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
            if len(under) < 10 or u > 2 * b:
                failures.append(f"with {a.slowloris} slow connections the TTFT median went {b:.3f} -> {u:.3f} s")
            return report(failures)
        stats = Stats()
        start = time.monotonic()
        deadline = start + a.duration
        threads = [threading.Thread(target=client, args=(a, srv, stats, i, deadline), daemon=True)
                   for i in range(a.clients)]
        for t in threads:
            t.start()
        samples = []
        while time.monotonic() < deadline:
            time.sleep(min(a.sample_every, max(0.0, deadline - time.monotonic())))
            if srv.proc.poll() is not None:
                failures.append(f"the server exited with {srv.proc.returncode}")
                break
            rss, fds = srv.rss_and_fds()
            m = srv.metrics()
            samples.append((time.monotonic() - start, rss, fds, m.get("pio_kv_cache_blocks_used", 0)))
            if not a.json:
                print(f"{samples[-1][0]:7.0f} s  served {stats.served}  RSS {rss / 2**20:.0f} MiB  fds {fds}  "
                      f"KV blocks {samples[-1][3]:.0f}  statuses {dict(sorted(stats.by_status.items()))}", flush=True)
        for t in threads:
            t.join(330)
        # Idle: nothing running, no blocks held.
        idle_blocks = None
        for _ in range(100):
            m = srv.metrics()
            if m.get("pio_num_requests_running", 1) == 0 and m.get("pio_num_requests_waiting", 1) == 0:
                idle_blocks = m.get("pio_kv_cache_blocks_used")
                if idle_blocks == 0:
                    break
            time.sleep(0.1)
        failures += stats.failures
        five = sum(v for k, v in stats.by_status.items() if k >= 500)
        if five:
            failures.append(f"{five} answers with a 5xx status")
        if idle_blocks != 0:
            failures.append(f"{idle_blocks} KV blocks still in use once idle")
        after = [s for s in samples if s[0] >= a.warmup * a.duration]
        rss0 = rss1 = fds0 = fds1 = None
        if len(after) >= 4:
            q = max(1, len(after) // 4)
            rss0, rss1 = statistics.median(s[1] for s in after[:q]), statistics.median(s[1] for s in after[-q:])
            fds0, fds1 = statistics.median(s[2] for s in after[:q]), statistics.median(s[2] for s in after[-q:])
            if rss1 - rss0 > max(64 * 2**20, 0.1 * rss0):
                failures.append(f"RSS grew from {rss0 / 2**20:.0f} to {rss1 / 2**20:.0f} MiB after warm-up")
            if fds1 - fds0 > 16:
                failures.append(f"open descriptors grew from {fds0} to {fds1} after warm-up")
        result = {
            "duration_s": round(time.monotonic() - start, 1), "clients": a.clients, "served": stats.served,
            "malformed": stats.malformed, "disconnects": stats.disconnects,
            "statuses": dict(sorted(stats.by_status.items())), "status_5xx": five,
            "rss_mib_first": samples[0][1] / 2**20 if samples else None,
            "rss_mib_after_warmup": rss0 and rss0 / 2**20, "rss_mib_end": rss1 and rss1 / 2**20,
            "fds_first": samples[0][2] if samples else None, "fds_after_warmup": fds0, "fds_end": fds1,
            "kv_blocks_idle": idle_blocks,
            "ttft_ms_p50": percentile(stats.ttft, 50) and round(1e3 * percentile(stats.ttft, 50), 1),
            "ttft_ms_p99": percentile(stats.ttft, 99) and round(1e3 * percentile(stats.ttft, 99), 1),
        }
        print(json.dumps(result) if a.json else "\n".join(f"{k}: {v}" for k, v in result.items()), flush=True)
        return report(failures)
    finally:
        srv.stop()


def report(failures):
    for f in failures:
        print(f"FAIL {f}", flush=True)
    print("FAILED" if failures else "PASSED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

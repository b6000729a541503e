#!/bin/bash
# with-memory.sh GIB CMD...: runs CMD while a balloon process holds all but about GIB of the
# memory available (touched anonymous memory: with no swap it cannot be reclaimed), after
# dropping the page cache (root only; skipped otherwise). For comparing engines "under the same
# memory": each run sees the same MemAvailable.
set -u
keep=$1; shift
ready=$(mktemp)
rm -f "$ready"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
python3 - "$keep" "$ready" <<'PY' &
import sys, time
keep = int(float(sys.argv[1]) * (1 << 30))
avail = int([l for l in open('/proc/meminfo') if l.startswith('MemAvailable:')][0].split()[1]) * 1024
n, chunks = max(0, avail - keep), []
while n > 0:
    c = min(1 << 30, n)
    chunks.append(bytearray(b'\x01') * c)
    n -= c
print(f"balloon holds {sum(map(len, chunks)) / (1 << 30):.2f} GiB", flush=True)
open(sys.argv[2], 'w').write('ready')
time.sleep(86400)
PY
balloon=$!
while [ ! -f "$ready" ]; do
    kill -0 $balloon 2>/dev/null || { echo "balloon failed" >&2; exit 1; }
    sleep 0.5
done
grep MemAvailable /proc/meminfo
"$@"
rc=$?
kill $balloon; wait $balloon 2>/dev/null
rm -f "$ready"
exit $rc

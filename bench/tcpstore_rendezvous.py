"""The alternative to radit's coordinator at scale: PyTorch's c10d TCPStore, the store behind torchrun's rendezvous
and its keep-alive heartbeats, with the same simulated workload as `radit coordinator bench`.

A separate process hosts the store (its CPU is read from /proc); N client threads in this process each open their
own store connection, "join" (add to a counter, then wait for a key the last joiner sets), then heartbeat at H Hz
for SECONDS twice:
- one-way: `set` hb/<rank> to the time. TCPStore answers no `set` (strace of the store: 2,000 sets, 173 reads,
  no write), so this is the store's cheapest possible beat;
- round trip: `compare_set` of the same key, which the store answers, as a heartbeat that must hear back (radit's
  carries the stop flag and proves the coordinator alive; torchrun's rendezvous keep-alive is a `compare_set` of
  the whole rendezvous state).
The store's CPU is read for each phase on its own. Prints one JSON line.

usage: tcpstore_rendezvous.py RANKS HZ SECONDS
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVER = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False,
                      timeout=timedelta(seconds=600))
print("ready", flush=True)
sys.stdin.read()
"""


def main():
    ranks, hz, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout.readline().strip() == "ready"
    period = 1.0 / hz
    beats = max(1, round(seconds * hz))
    latencies, failures, lock = {"one_way": [], "round_trip": []}, [0], threading.Lock()
    joined = threading.Semaphore(0)
    # Every rank and the clock-keeper (this thread) start and end each phase together.
    phase_start, phase_end = threading.Barrier(ranks + 1), threading.Barrier(ranks + 1)
    threading.stack_size(256 << 10)

    def rank_main(rank):
        try:
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=600))
            if store.add("joined", 1) == ranks:
                store.set("world", str(ranks))
            store.wait(["world"])
        except Exception:
            with lock:
                failures[0] += 1
            store = None  # still meets the phase barriers, without beating
        joined.release()
        key, last = f"hb/{rank}", ""
        for phase in ("one_way", "round_trip"):
            phase_start.wait()
            t0 = time.monotonic() + period * rank / ranks
            mine = []
            for k in range(beats if store is not None else 0):
                due = t0 + period * k
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent = time.monotonic()
                try:
                    now = str(time.time())
                    if phase == "one_way":
                        store.set(key, now)
                    else:
                        store.compare_set(key, last, now)
                    last = now
                    if k >= 2:
                        mine.append((time.monotonic() - sent) * 1e3)
                except Exception:
                    with lock:
                        failures[0] += 1
            with lock:
                latencies[phase].extend(mine)
            phase_end.wait()

    cpu0 = cpu_seconds(server.pid)
    start = time.monotonic()
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for _ in range(ranks):
        joined.acquire()
    join_seconds = time.monotonic() - start
    join_cpu = cpu_seconds(server.pid) - cpu0
    report = {"ranks": ranks, "heartbeat_hz": hz, "join_seconds": join_seconds, "join_store_cpu_seconds": join_cpu}
    for phase in ("one_way", "round_trip"):
        phase_start.wait()
        cpu1, hb_start = cpu_seconds(server.pid), time.monotonic()
        phase_end.wait()
        hb_seconds = time.monotonic() - hb_start
        cpu = cpu_seconds(server.pid) - cpu1
        lat = sorted(latencies[phase])
        pct = lambda p: lat[round((len(lat) - 1) * p)] if lat else 0.0
        prefix = "" if phase == "one_way" else "round_trip_"
        report.update(
            {
                f"{prefix}heartbeat_seconds": hb_seconds,
                f"{prefix}heartbeat_p50_ms": pct(0.5),
                f"{prefix}heartbeat_p99_ms": pct(0.99),
                f"{prefix}heartbeat_max_ms": lat[-1] if lat else 0.0,
                f"{prefix}store_cpu_percent": 100.0 * cpu / hb_seconds,
                f"{prefix}heartbeats": ranks * beats,
                f"{prefix}store_cpu_seconds": cpu,
            }
        )
    for t in threads:
        t.join()
    server.stdin.close()
    server.wait()
    report["failed_requests"] = failures[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""The alternative to radit's coordinator at scale: PyTorch's c10d TCPStore, the store behind torchrun's rendezvous
and its keep-alive heartbeats, with the same simulated workload as `radit coordinator bench`.

A separate process hosts the store (its CPU is read from /proc); N client threads in this process each open their
own store connection, "join" (add to a counter, then wait for a key the last joiner sets), then heartbeat at H Hz
(set hb/<rank> to the time, as torchrun's agents write their keep-alive keys). Prints one JSON line.

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
    latencies, failures, lock = [], [0], threading.Lock()
    joined = threading.Semaphore(0)
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
            joined.release()
            return
        joined.release()
        t0 = time.monotonic() + period * rank / ranks
        mine = []
        for k in range(beats):
            due = t0 + period * k
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = time.monotonic()
            try:
                store.set(f"hb/{rank}", str(time.time()))
                if k >= 2:
                    mine.append((time.monotonic() - sent) * 1e3)
            except Exception:
                with lock:
                    failures[0] += 1
        with lock:
            latencies.extend(mine)

    cpu0 = cpu_seconds(server.pid)
    start = time.monotonic()
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for _ in range(ranks):
        joined.acquire()
    join_seconds = time.monotonic() - start
    join_cpu = cpu_seconds(server.pid) - cpu0
    cpu1, hb_start = cpu_seconds(server.pid), time.monotonic()
    for t in threads:
        t.join()
    hb_seconds = time.monotonic() - hb_start
    cpu = cpu_seconds(server.pid) - cpu1
    server.stdin.close()
    server.wait()
    latencies.sort()
    pct = lambda p: latencies[round((len(latencies) - 1) * p)] if latencies else 0.0
    print(
        json.dumps(
            {
                "ranks": ranks,
                "heartbeat_hz": hz,
                "join_seconds": join_seconds,
                "join_store_cpu_seconds": join_cpu,
                "heartbeat_seconds": hb_seconds,
                "heartbeat_p50_ms": pct(0.5),
                "heartbeat_p99_ms": pct(0.99),
                "heartbeat_max_ms": latencies[-1] if latencies else 0.0,
                "store_cpu_percent": 100.0 * cpu / hb_seconds,
                "heartbeats": ranks * beats,
                "store_cpu_seconds": cpu,
                "failed_requests": failures[0],
            }
        )
    )


if __name__ == "__main__":
    main()

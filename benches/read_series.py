#!/usr/bin/env python3
"""Reads FILE sequentially in 1 MiB blocks and records its throughput every
100 ms into OUT (CSV: seconds, MiB/s over the interval, event), SIGKILLing
nodes on the way: node 1 at --kill-node-at of the file (restarted with
--restart-cmd at --restart-at; its new PID goes to --pid-file), then the
leader of the file's metadata group (asked of the cluster then) at
--kill-leader-at. Fails if a read fails or the bytes' MD5 differs.
Used by benches/read-bench.sh."""
import argparse, hashlib, json, os, signal, subprocess, sys, threading, time

p = argparse.ArgumentParser()
p.add_argument("file"); p.add_argument("out"); p.add_argument("md5")
p.add_argument("--kill-node-at", type=float, required=True)
p.add_argument("--restart-at", type=float, required=True)
p.add_argument("--restart-cmd", required=True, help="shell command that starts node 1")
p.add_argument("--pid-file", required=True)
p.add_argument("--kill-leader-at", type=float, required=True)
p.add_argument("--group", type=int, required=True)
p.add_argument("--seeds", required=True)
p.add_argument("--musicfs", required=True)
p.add_argument("--pids", required=True, help="ID=PID,...")
a = p.parse_args()
pids = {int(k): int(v) for k, v in (x.split("=") for x in a.pids.split(",") if x)}
size = os.path.getsize(a.file)
events = []  # (seconds, text)
start = time.monotonic()

def kill(node, why):
    os.kill(pids[node], signal.SIGKILL)
    events.append((time.monotonic() - start, f"node {node} killed ({why})"))

def restart():
    proc = subprocess.Popen(["bash", "-c", "exec " + a.restart_cmd])
    pids[1] = proc.pid
    with open(a.pid_file, "w") as f:
        f.write(str(proc.pid))
    events.append((time.monotonic() - start, "node 1 restarted"))

leader = []
stop = threading.Event()

def follow_leader():
    """Keeps asking the cluster which node leads the file's group, so the
    kill hits the leader of that moment (a status call takes a moment)."""
    while not stop.is_set():
        out = subprocess.run([a.musicfs, "status", "--cluster", a.seeds, "--json"],
                             capture_output=True, text=True).stdout
        try:
            v = json.loads(out)
            l = next((g["leader"] for g in v["groups"] if g["id"] == a.group), None)
            if l in pids:
                leader[:] = [l]
        except ValueError:
            pass
        stop.wait(0.2)

h = hashlib.md5()
rows = []
done = 0
last_t, last_done = 0.0, 0
node_killed = restarted = asked = leader_killed = False
with open(a.file, "rb", buffering=0) as f:
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        h.update(b)
        done += len(b)
        if not node_killed and done >= a.kill_node_at * size:
            node_killed = True
            kill(1, "storage node the reader uses")
        if not restarted and done >= a.restart_at * size:
            restarted = True
            restart()
        if not asked and done >= a.restart_at * size:
            asked = True
            threading.Thread(target=follow_leader, daemon=True).start()
        if not leader_killed and leader and done >= a.kill_leader_at * size:
            leader_killed = True
            stop.set()
            kill(leader[0], f"leader of group {a.group}")
        t = time.monotonic() - start
        if t - last_t >= 0.1:
            rows.append((t, (done - last_done) / (1 << 20) / (t - last_t)))
            last_t, last_done = t, done
stop.set()
total = time.monotonic() - start
if total > last_t:
    rows.append((total, (done - last_done) / (1 << 20) / (total - last_t)))
if done != size or h.hexdigest() != a.md5:
    sys.exit(f"read {done} of {size} bytes, md5 {h.hexdigest()} (want {a.md5})")
with open(a.out, "w") as o:
    o.write("seconds,mib_per_s,event\n")
    for t, r in rows:
        o.write(f"{t:.2f},{r:.1f},\n")
    for t, e in events:
        o.write(f"{t:.2f},,{e}\n")
slow = min(r for _, r in rows)
print(f"read {size >> 20} MiB in {total:.1f} s ({size / (1 << 20) / total:.0f} MiB/s average), "
      f"slowest 100 ms: {slow:.0f} MiB/s; events: " + "; ".join(f"{e} at {s:.1f} s" for s, e in events))

#!/usr/bin/env python3
"""Single-threaded create / stat / unlink of N empty files in one directory.
Prints one JSON object with operations per second for each phase."""
import json
import os
import sys
import time

def main():
    root, n = sys.argv[1], int(sys.argv[2])
    d = os.path.join(root, "meta-bench")
    os.makedirs(d, exist_ok=True)
    names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    out = {}
    t = time.perf_counter()
    for p in names:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    out["create_per_s"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for p in names:
        os.stat(p)
    out["stat_per_s"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for p in names:
        os.unlink(p)
    out["unlink_per_s"] = n / (time.perf_counter() - t)
    os.rmdir(d)
    print(json.dumps({k: round(v) for k, v in out.items()}))

if __name__ == "__main__":
    main()

"""Creates PER empty files in each of THREADS directories (one thread per
directory) under ROOT and prints the rate: the FUSE create benchmark that
benches/meta-scale.sh runs on MusicFS and on the peer beside it.
Usage: fuse_creates.py ROOT THREADS PER LABEL"""
import os
import sys
import threading
import time

root, threads, per, label = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.makedirs(root)
dirs = [os.path.join(root, f"album{t}") for t in range(threads)]
for d in dirs:
    os.mkdir(d)


def work(d):
    for i in range(per):
        os.close(os.open(os.path.join(d, f"{i:04d}.flac"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))


ts = [threading.Thread(target=work, args=(d,)) for d in dirs]
t = time.perf_counter()
for x in ts:
    x.start()
for x in ts:
    x.join()
print(f"{label} FUSE creates, {threads} thread(s): {threads * per / (time.perf_counter() - t):.0f}/s")

"""Re-tags every Nth track of a library: a new title, as a tag editor would.

Usage: retag.py LIBRARY N   (prints the re-tagged paths, one per line)
Needs python3-mutagen (Debian); run it with the system Python
(/usr/bin/python3 -I) so the Debian package is found.
"""
import os
import sys

import mutagen

root, every = sys.argv[1], int(sys.argv[2])
tracks = sorted(
    os.path.join(d, f)
    for d, _, fs in os.walk(root)
    for f in fs
    if f.rsplit(".", 1)[-1] in ("flac", "mp3", "ogg", "opus")
)
for i, path in enumerate(tracks):
    if i % every:
        continue
    f = mutagen.File(path, easy=True)
    f["title"] = [f"{f.get('title', ['?'])[0]} (remastered)"]
    f.save()
    print(path)

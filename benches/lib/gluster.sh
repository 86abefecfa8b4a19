# The peer measured beside MusicFS (../shared/notes/peers.md §2.1):
# GlusterFS, a replica-3 volume of three bricks on this host, FUSE-mounted.
# Source after benches/lib/cluster.sh; `start_gluster DIR` mounts it at DIR,
# and the cleanup on exit unmounts it, deletes the volume and stops glusterd
# (by PID).
gluster_pid=""
start_gluster() {
  command -v glusterd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends glusterfs-server glusterfs-client >/dev/null
  mkdir -p "$work/gluster/b1" "$work/gluster/b2" "$work/gluster/b3" "$1"
  glusterd -N --log-file="$work/gluster/glusterd.log" --log-level=WARNING >/dev/null 2>&1 &
  gluster_pid=$!
  # The CLI refuses 127.0.0.1 as a brick host; this host's name maps to it.
  local host; host=$(hostname)
  for _ in $(seq 1 100); do gluster --mode=script volume list >/dev/null 2>&1 && break; sleep 0.2; done
  gluster --mode=script volume create mfsbench replica 3 \
    "$host:$work/gluster/b1" "$host:$work/gluster/b2" "$host:$work/gluster/b3" force >/dev/null
  gluster --mode=script volume start mfsbench >/dev/null
  glusterfs --volfile-server="$host" --volfile-id=mfsbench --log-file="$work/gluster/client.log" "$1"
  for _ in $(seq 1 100); do mountpoint -q "$1" && return; sleep 0.1; done
  echo "gluster mount did not appear" >&2; exit 1
}
stop_gluster() {
  [ -n "$gluster_pid" ] || return 0
  mountpoint -q "$work/gluster-mnt" && umount "$work/gluster-mnt"
  gluster --mode=script volume stop mfsbench >/dev/null 2>&1 || true
  gluster --mode=script volume delete mfsbench >/dev/null 2>&1 || true
  # Stopping the volume stops its brick and self-heal daemons.
  kill -TERM "$gluster_pid" 2>/dev/null; wait "$gluster_pid" 2>/dev/null || true
  gluster_pid=""
}

# Shared by the benchmark scripts: a three-node cluster on 127.0.0.1 in a
# scratch directory, a FUSE mount of it, and cleanup of everything started
# (by PID) on exit. Source it from the repository root; it sets BIN (unless set), work,
# port, pid, peers, seeds.
BIN=${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/musicfs/target}/release}
work=$(mktemp -d /var/tmp/musicfs-bench.XXXXXX)
declare -A pid port
mount_pid=""
cleanup() {
  if declare -F stop_gluster >/dev/null; then stop_gluster; fi
  [ -n "$mount_pid" ] && kill -TERM "$mount_pid" 2>/dev/null && wait "$mount_pid" 2>/dev/null || true
  for i in "${!pid[@]}"; do kill -TERM "${pid[$i]}" 2>/dev/null || true; done
  for i in "${!pid[@]}"; do wait "${pid[$i]}" 2>/dev/null || true; done
  mountpoint -q "$work/mnt" 2>/dev/null && umount -l "$work/mnt"
  rm -rf "$work" /dev/shm/musicfs-bench.bin
}
trap cleanup EXIT

# Four distinct free ports (the sockets stay open until all are chosen):
# three cluster nodes and a spare for a node added later.
read -r -a ports < <(python3 -c '
import socket
s = [socket.socket() for _ in range(4)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')
peers=""; seeds=""
for i in 1 2 3 4; do port[$i]=${ports[$((i - 1))]}; done
for i in 1 2 3; do
  peers="$peers${peers:+,}$i=127.0.0.1:${port[$i]}"; seeds="$seeds${seeds:+,}127.0.0.1:${port[$i]}"
done
# The nodes' shared secret (nodes on plain TCP need one).
"$BIN/musicfs" certs secret --out "$work/cluster-secret" >/dev/null
# start_node ID [extra musicfs-node flags...]; NODE_FLAGS go to every node.
start_node() {
  "$BIN/musicfs-node" --id "$1" --listen "127.0.0.1:${port[$1]}" --data "$work/node$1" --cluster-secret-file "$work/cluster-secret" ${NODE_FLAGS:-} "${@:2}" 2>>"$work/node$1.log" &
  pid[$1]=$!
}
# Starts all three nodes and initialises GROUPS groups (nodes take a moment
# to listen; init refuses until all answer).
start_cluster() {
  for i in 1 2 3; do start_node $i; done
  for _ in $(seq 1 150); do "$BIN/musicfs" cluster init --insecure --groups "$1" --peers "$peers" >/dev/null 2>&1 && break; sleep 0.2; done
  "$BIN/musicfs" status --cluster "$seeds" >/dev/null
}
start_mount() {
  mkdir -p "$work/mnt"
  # MOUNT_FLAGS go to `musicfs mount`.
  "$BIN/musicfs" mount --cluster "$seeds" ${MOUNT_FLAGS:-} "$work/mnt" 2>>"$work/mount.log" &
  mount_pid=$!
  for _ in $(seq 1 200); do mountpoint -q "$work/mnt" && return; sleep 0.1; done
  echo "mount did not appear" >&2; exit 1
}
rss() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }
hwm() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

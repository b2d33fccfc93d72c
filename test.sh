#!/usr/bin/env bash
# Runs every freezeframe test: unit, simulation, FUSE, multi-process and
# end-to-end cluster tests. Installs the Debian packages the tests use when
# they are missing (as root), or names them in one line.
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v mkfs.ext4   >/dev/null 2>&1 || need+=(e2fsprogs)
command -v losetup     >/dev/null 2>&1 || need+=(mount)
command -v tar         >/dev/null 2>&1 || need+=(tar)
command -v python3     >/dev/null 2>&1 || need+=(python3)
command -v fsfreeze    >/dev/null 2>&1 || need+=(util-linux)
command -v restic      >/dev/null 2>&1 || need+=(restic)
# Cuts links between nodes in the fault matrix (tests/faults.rs).
command -v nft         >/dev/null 2>&1 || need+=(nftables)
# Benchmark peers whose results tests/bench.rs checks.
command -v rsync       >/dev/null 2>&1 || need+=(rsync)
command -v bindfs      >/dev/null 2>&1 || need+=(bindfs)
command -v borg        >/dev/null 2>&1 || need+=(borgbackup)
command -v mkfs.xfs    >/dev/null 2>&1 || need+=(xfsprogs)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "test.sh: missing packages: ${need[*]} (as root: apt-get install -y ${need[*]})" >&2
    exit 1
  fi
fi
if [ ! -e /dev/fuse ]; then
  echo "test.sh: /dev/fuse is missing (modprobe fuse, or run on a machine with FUSE)" >&2
  exit 1
fi

cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast

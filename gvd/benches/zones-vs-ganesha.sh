#!/bin/sh
# GrapeVineFS against nfs-ganesha (FSAL VFS) with the same client, files and disk: installs
# what the comparison needs (Debian packages, as root) and runs the zones bench with it.
# Usage: gvd/benches/zones-vs-ganesha.sh [bench arguments, e.g. --big-mb 500 --rounds 3]
set -eu
if [ "$(id -u)" != 0 ]; then
  echo "run as root: nfs-ganesha and rpcbind run in a network namespace of their own" >&2
  exit 2
fi
missing=""
command -v nfs-cp >/dev/null 2>&1 || missing="$missing libnfs-utils"
command -v ganesha.nfsd >/dev/null 2>&1 || missing="$missing nfs-ganesha nfs-ganesha-vfs"
command -v rpcbind >/dev/null 2>&1 || missing="$missing rpcbind"
if [ -n "$missing" ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi
cd "$(dirname "$0")/../.."
exec cargo bench -p gvd --bench zones -- --ganesha "$@"

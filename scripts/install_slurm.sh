#!/usr/bin/env bash
# Installs SLURM and munge from Debian (as root) for the one-machine test cluster of tests/slurm_cluster.py.
# Idempotent: installs nothing when the daemons and clients are already there; makes the munge key once.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "install_slurm.sh: run as root (apt-get, /etc/munge); the test cluster's daemons run as root too" >&2
  exit 1
fi
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin, which a non-login PATH may lack
missing=0
for tool in slurmctld slurmd munged mungekey sbatch srun scontrol sinfo squeue scancel; do
  command -v "$tool" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
  echo "installing slurmctld slurmd munge slurm-client (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd munge slurm-client >/dev/null
fi
# The munge package makes a key on install; a slimmed image may lack it, and munged will not start without one.
key=/etc/munge/munge.key
if [ ! -s "$key" ]; then
  mkdir -p /etc/munge
  mungekey --create --keyfile="$key" --force
  if id munge >/dev/null 2>&1; then chown munge:munge "$key"; fi
  chmod 400 "$key"
fi

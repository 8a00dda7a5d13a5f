#!/usr/bin/env bash
# Stops the cluster slurm/local/up.sh started in DIR (default .slurm-local) and removes DIR.
set -uo pipefail
DIR=$(realpath -m "${1:-.slurm-local}")
[ -d "$DIR" ] || { echo "[slurm-down] nothing at $DIR"; exit 0; }
stop() {  # pid file, name: TERM, then KILL if it lingers
    [ -f "$1" ] || return 0
    local pid; pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
}
[ -f "$DIR/slurm.conf" ] && SLURM_CONF="$DIR/slurm.conf" scancel --full --quiet --user="$(id -un)" 2>/dev/null
stop "$DIR/slurmd.pid"
stop "$DIR/slurmctld.pid"
stop "$DIR/slurmdbd.pid"
stop "$DIR/mysql/mariadbd.pid"
stop "$DIR/munge/munged.pid"
# The default-path link that up.sh made with LINK_DEFAULT=1, only if it is ours.
[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$DIR/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
rm -rf "$DIR"
echo "[slurm-down] stopped and removed $DIR"

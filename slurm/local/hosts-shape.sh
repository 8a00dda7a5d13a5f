#!/usr/bin/env bash
# Limits what every simulated host (hosts-up.sh DIR) sends to RATE, like a NIC of that speed:
#   slurm/local/hosts-shape.sh DIR RATE     (tc rates: 100mbit, 1gbit, 25gbit, ...)
#   slurm/local/hosts-shape.sh DIR none     (back to unshaped)
# A token bucket (tc tbf) on each host's eth0; its bucket is small (32 KiB) so a message pays
# the rate from its first bytes, as on a real link, instead of leaving in one free burst.
# This kernel's tc has no netem: bandwidth can be shaped, latency cannot.
set -euo pipefail
DIR=$(realpath -m "$1")
RATE=${2:?usage: hosts-shape.sh DIR RATE|none}
[ -f "$DIR/hosts" ] || { echo "[hosts-shape] error: $DIR/hosts not found (run hosts-up.sh first)" >&2; exit 2; }
while read -r _ _ ns _; do
    if [ "$RATE" = none ]; then
        ip netns exec "$ns" tc qdisc del dev eth0 root 2>/dev/null || true
    else
        ip netns exec "$ns" tc qdisc replace dev eth0 root tbf rate "$RATE" burst 32kb latency 100ms \
            || { echo "[hosts-shape] error: tc refused rate $RATE" >&2; exit 2; }
    fi
done < "$DIR/hosts"
echo "[hosts-shape] $(wc -l < "$DIR/hosts") hosts of $DIR: ${RATE/none/unshaped}"

#!/usr/bin/env bash
# Removes what hosts-up.sh DIR made (namespaces, veths, bridge, /etc/hosts lines), in
# reverse, from DIR/names; safe to run twice or on a half-made set.
set -uo pipefail
DIR=$(realpath -m "$1")
[ -f "$DIR/names" ] || { echo "[hosts-down] nothing recorded in $DIR"; exit 0; }
tac "$DIR/names" | while read -r kind name; do
    case "$kind" in
        netns) ip netns pids "$name" 2>/dev/null | xargs -r kill -9 2>/dev/null; ip netns del "$name" 2>/dev/null ;;
        link) ip link del "$name" 2>/dev/null ;;
        etchosts) sed -i "/^# hosts-up $name\$/,/^# hosts-up $name end\$/d" /etc/hosts ;;
    esac
done
rm -f "$DIR/names"
echo "[hosts-down] removed the simulated hosts of $DIR"

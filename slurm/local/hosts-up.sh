#!/usr/bin/env bash
# Simulated hosts on this machine (root): N network namespaces on one bridge, each with its
# own address; commands run in them get their own hostname (a UTS namespace), so OpenMPI
# and Horovod see N separate nodes talking over TCP. Usage:
#   slurm/local/hosts-up.sh DIR [N] [SLOTS]      (default 2 hosts, 1 slot each)
# Writes DIR/agent (mpirun's --mca plm_rsh_agent: runs a command "on" a host), DIR/hostfile,
# DIR/hosts (name address namespace cores per line), DIR/mpirun-args (the --mca flags), DIR/env
# (the same as OMPI_MCA_* exports) and DIR/names (what to remove, for hosts-down.sh).
# Each host gets its own share of this machine's cores (nproc / N of them, shared round-robin
# when there are more hosts than cores): what runs "on" it is confined to them, as a real
# node's processes are to its own CPUs.
# Names carry a unique id, so parallel runs never clash. Remove with hosts-down.sh DIR.
set -euo pipefail
DIR=$(realpath -m "$1")
N=${2:-2}
SLOTS=${3:-1}
die() { printf '[hosts-up] error: %s\n' "$*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "simulated hosts need root (network namespaces)"
command -v ip >/dev/null || die "ip (iproute2) not found"
mkdir -p "$DIR"
ID=$(printf '%04x' $(( ($$ + RANDOM) % 65536 )))
BR="plbr$ID"
NET="10.$(( 0x${ID:0:2} % 200 + 20 )).$(( 0x${ID:2:2} ))"   # a /24 of its own
NCPU=$(nproc)
PER=$(( NCPU / N )); [ "$PER" -ge 1 ] || PER=1
: > "$DIR/names"
trap 'bash "$(dirname "$0")/hosts-down.sh" "$DIR" >/dev/null 2>&1 || true' ERR

ip link add "$BR" type bridge
echo "link $BR" >> "$DIR/names"
ip addr add "$NET.254/24" dev "$BR"
ip link set "$BR" up
: > "$DIR/hosts"
: > "$DIR/hostfile"
for i in $(seq 1 "$N"); do
    host="sim$ID-h$i"
    ns="pl$ID-h$i"
    ip netns add "$ns"
    echo "netns $ns" >> "$DIR/names"
    ip link add "pv$ID$i" type veth peer name "pw$ID$i"
    echo "link pv$ID$i" >> "$DIR/names"
    ip link set "pv$ID$i" master "$BR" up
    ip link set "pw$ID$i" netns "$ns"
    ip -n "$ns" link set "pw$ID$i" name eth0
    ip -n "$ns" addr add "$NET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    first=$(( (i - 1) * PER % NCPU ))
    echo "$host $NET.$i $ns $first-$(( first + PER - 1 ))" >> "$DIR/hosts"
    echo "$host slots=$SLOTS" >> "$DIR/hostfile"
done

# Hostnames resolve for every namespace (they share /etc/hosts): added, removed by down.
{ echo "# hosts-up $ID"; awk '{print $2, $1}' "$DIR/hosts"; echo "# hosts-up $ID end"; } >> /etc/hosts
echo "etchosts $ID" >> "$DIR/names"

# mpirun calls: AGENT [options] HOST COMMAND...; the command runs in HOST's namespace with
# HOST as its hostname, on HOST's cores. It inherits this machine's file system, as on a
# shared-FS cluster.
cat > "$DIR/agent" <<AGENT
#!/usr/bin/env bash
while [ "\${1:-}" != "\${1#-}" ]; do shift; done   # ssh-style options mpirun may pass
host=\$1; shift
read -r name _ ns cpus < <(awk -v h="\$host" '\$1 == h || \$2 == h' "$DIR/hosts")
[ -n "\$ns" ] || { echo "agent: unknown host \$host" >&2; exit 255; }
exec ip netns exec "\$ns" taskset -c "\$cpus" unshare --uts /bin/sh -c 'hostname "\$0" && exec /bin/sh -c "\$*"' "\$name" "\$@"
AGENT
chmod +x "$DIR/agent"
# OpenMPI: start daemons with the agent, talk only on this bridge's subnet, TCP between nodes.
# Binding is left to the hosts' cores: every simulated host has the same hardware view (the
# whole machine), so mpirun would bind each host's first rank to the same core 0.
echo "--mca plm_rsh_agent $DIR/agent --mca oob_tcp_if_include $NET.0/24 --mca btl_tcp_if_include $NET.0/24 --mca btl tcp,self --mca hwloc_base_binding_policy none" \
    > "$DIR/mpirun-args"
# The same settings as environment variables: a launch command built elsewhere (pipeline slurm
# command --hostfile DIR/hostfile) then runs unchanged.
cat > "$DIR/env" <<ENV
export OMPI_MCA_plm_rsh_agent=$DIR/agent
export OMPI_MCA_oob_tcp_if_include=$NET.0/24
export OMPI_MCA_btl_tcp_if_include=$NET.0/24
export OMPI_MCA_btl=tcp,self
export OMPI_MCA_hwloc_base_binding_policy=none
ENV
trap - ERR
echo "[hosts-up] $N hosts ($(awk '{print $1}' "$DIR/hosts" | tr '\n' ' ')) on $BR $NET.0/24; state in $DIR"

#!/usr/bin/env bash
# Two real "nodes" on one machine, for multi-node DeepSpeed runs without a cluster.
#
#   launch/emulate_nodes.sh check          # can this machine do it? (exit 0, or 1 with the reason)
#   launch/emulate_nodes.sh up             # create the nodes; prints the hostfile path
#   launch/emulate_nodes.sh exec N CMD...  # run CMD on node N (1 or 2), in the current directory
#   launch/emulate_nodes.sh down           # remove everything `up` made
#
# Each node is a Linux network namespace with its own address (10.77.0.11, 10.77.0.12 on a bridge in a
# third "switch" namespace; nothing is added to the host's interfaces), its own hostname (UTS namespace:
# dsq-node1, dsq-node2), its own /etc/hosts and /etc/ssh (via /etc/netns/<ns>/), an sshd that accepts
# one key made for it, and a node-local directory: $STATE/local is $STATE/dsq-nodeN.local inside node N
# and an empty directory everywhere else. Launch multi-node jobs from node 1, as on a cluster:
#
#   launch/emulate_nodes.sh exec 1 deepspeed --hostfile $STATE/hostfile --launcher pdsh --num_gpus 1 ...
#
# Needs root. Installs openssh-server and pdsh with apt-get when they are missing.
# DSQ_NODES_ID (default empty) names a separate set, so concurrent sets do not collide.
set -euo pipefail

ID=${DSQ_NODES_ID:-}
STATE=${DSQ_NODES_STATE:-/tmp/ds_quant_nodes$ID}
P="dsq$ID"              # prefix of namespace and interface names (interface names: <= 15 chars)
SWITCH="${P}sw"
NODES=(1 2)
addr() { echo "10.77.0.1$1"; }
ns() { echo "${P}n$1"; }

die() { echo "emulate_nodes: $*" >&2; exit 1; }

check() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces, sshd on port 22 inside them)"
    command -v ip >/dev/null || die "needs iproute2 ('ip')"
    command -v unshare >/dev/null && command -v nsenter >/dev/null || die "needs util-linux (unshare, nsenter)"
    local probe="${P}probe$$"
    ip netns add "$probe" 2>/dev/null || die "cannot create network namespaces here ('ip netns add' failed)"
    if ! ip -n "$probe" link add "${P}pb0" type bridge 2>/dev/null; then
        ip netns del "$probe"; die "cannot create a bridge inside a network namespace"
    fi
    ip netns del "$probe"
    unshare --uts --mount true 2>/dev/null || die "cannot create UTS/mount namespaces ('unshare' failed)"
}

install_packages() {
    local missing=()
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    command -v ssh >/dev/null || missing+=(openssh-client)
    command -v pdsh >/dev/null || missing+=(pdsh)
    [ ${#missing[@]} = 0 ] && return
    echo "emulate_nodes: installing ${missing[*]} (apt-get)" >&2
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

up() {
    check
    install_packages
    [ -e "$STATE/hostfile" ] && die "already up ($STATE); run '$0 down' first"
    mkdir -p "$STATE/local" /run/sshd
    ssh-keygen -q -t ed25519 -N '' -C ds_quant-emulated-nodes -f "$STATE/id_ed25519"
    cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
    ip netns add "$SWITCH"
    ip -n "$SWITCH" link add br0 type bridge
    ip -n "$SWITCH" link set br0 up
    local hosts="127.0.0.1 localhost"$'\n'
    for n in "${NODES[@]}"; do hosts+="$(addr "$n") dsq-node$n"$'\n'; done
    : > "$STATE/hostfile"
    for n in "${NODES[@]}"; do
        local NS; NS=$(ns "$n")
        ip netns add "$NS"
        ip -n "$NS" link set lo up
        ip link add "${P}v$n" netns "$NS" type veth peer name "${P}p$n" netns "$SWITCH"
        ip -n "$SWITCH" link set "${P}p$n" master br0 up
        ip -n "$NS" addr add "$(addr "$n")/24" dev "${P}v$n"
        ip -n "$NS" link set "${P}v$n" up
        # `ip netns exec` bind-mounts /etc/netns/<ns>/X over /etc/X: the node's own hosts file and ssh config.
        mkdir -p "/etc/netns/$NS/ssh" "$STATE/dsq-node$n.local"
        printf '%s' "$hosts" > "/etc/netns/$NS/hosts"
        ssh-keygen -q -t ed25519 -N '' -f "/etc/netns/$NS/ssh/ssh_host_ed25519_key"
        cat > "/etc/netns/$NS/ssh/sshd_config" <<EOF
ListenAddress $(addr "$n")
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile $STATE/dsq-node$n.sshd.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
EOF
        cat > "/etc/netns/$NS/ssh/ssh_config" <<EOF
Host *
    IdentityFile $STATE/id_ed25519
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
EOF
        # sshd (daemonized) keeps this UTS + mount namespace; every ssh session on the node runs in it.
        ip netns exec "$NS" unshare --uts sh -c \
            "hostname dsq-node$n && mount --bind '$STATE/dsq-node$n.local' '$STATE/local' && exec /usr/sbin/sshd"
        echo "dsq-node$n slots=2" >> "$STATE/hostfile"
    done
    for n in "${NODES[@]}"; do
        for _ in $(seq 50); do [ -s "$STATE/dsq-node$n.sshd.pid" ] && break; sleep 0.1; done
        node_exec 1 ssh "dsq-node$n" true || die "ssh to dsq-node$n failed"
    done
    echo "$STATE/hostfile"
}

node_exec() {
    local n=$1; shift
    local pid; pid=$(cat "$STATE/dsq-node$n.sshd.pid" 2>/dev/null) || die "node $n is not up ($STATE)"
    nsenter --target "$pid" --mount --net --uts -- sh -c 'cd "$0" && exec "$@"' "$PWD" "$@"
}

down() {
    for n in "${NODES[@]}"; do
        local pidfile="$STATE/dsq-node$n.sshd.pid"
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
        ip netns del "$(ns "$n")" 2>/dev/null || true
        rm -rf "/etc/netns/$(ns "$n")"
    done
    ip netns del "$SWITCH" 2>/dev/null || true
    rm -rf "$STATE"
}

case "${1:-}" in
    check) check; echo "ok" ;;
    up) up ;;
    exec) shift; [ $# -ge 2 ] || die "usage: $0 exec N CMD..."; node_exec "$@" ;;
    down) down ;;
    *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

#!/bin/sh
# Start (or restart: reboot) a testbed node: install the host key and authorized key the testbed
# copied into /etc/trtllm-testbed, start this node's own Docker engine in the background, run sshd in the
# foreground.
set -eu
given=/etc/trtllm-testbed
install -m 600 -o root -g root "$given/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
install -m 644 -o root -g root "$given/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
install -d -m 700 -o spark -g spark /home/spark/.ssh
# A restart of this container is the node's reboot: the user's files stay (keys that ssh.setup
# added to authorized_keys included), and what a reboot clears (/run) is cleared.
auth=/home/spark/.ssh/authorized_keys
if [ -f "$auth" ]; then
    grep -qxF -- "$(cat "$given/authorized_keys")" "$auth" || cat "$given/authorized_keys" >> "$auth"
else
    install -m 600 -o spark -g spark "$given/authorized_keys" "$auth"
fi
rm -rf /run/docker /run/containerd /run/docker.pid /run/docker.sock /run/dockerd.pid

# The fabric ports (trtllm_deploy/testbed/fabric.py): each cable's interface, found by the address
# Docker gave it, renamed the way a Spark names its ConnectX-7 ports, left with no address but its
# IPv6 link-local one. On every start: Docker makes the interfaces anew when the node restarts.
# The host's bridge is the one thing on a cable that a real cable lacks: what it sends in on the
# port is dropped (its MAC learned over ARP first), so neighbour discovery hears only the nodes.
if [ -s "$given/fabric" ]; then
    while read -r address name rdma bridge; do
        current=$(ip -o -4 addr show | awk -v want="$address" \
            '{ split($4, cidr, "/"); if (cidr[1] == want) { print $2; exit } }')
        if [ -z "$current" ]; then
            echo "testbed-node: no interface has $address, the address of $name ($rdma)" >&2
            exit 1
        fi
        ping -n -q -c 1 -W 2 "$bridge" >/dev/null 2>&1 || true
        mac=$(ip neigh show to "$bridge" dev "$current" \
            | awk '{ for (i = 1; i < NF; i++) if ($i == "lladdr") print $(i + 1) }')
        ip link set dev "$current" down
        [ "$current" = "$name" ] || ip link set dev "$current" name "$name"
        ip -4 addr flush dev "$name"
        ip -6 addr flush dev "$name" scope global
        ip neigh flush dev "$name"
        if [ -z "$mac" ] || ! ip6tables -A INPUT -i "$name" -m mac --mac-source "$mac" -j DROP; then
            echo "testbed-node: $name: the host's bridge ($bridge) stays visible on this cable" >&2
        fi
        ip link set dev "$name" up
    done <"$given/fabric"
fi

# The inner engine: overlay2 where the kernel allows it on this tmpfs, otherwise vfs (always works,
# but every image layer is a full copy).
start_dockerd() {
    dockerd --storage-driver "$1" >/var/log/dockerd.log 2>&1 &
    echo $! >/run/dockerd.pid
    for _ in $(seq 100); do
        docker info >/dev/null 2>&1 && return 0
        kill -0 "$(cat /run/dockerd.pid)" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
(
    if ! start_dockerd overlay2; then
        kill "$(cat /run/dockerd.pid)" 2>/dev/null || true
        sleep 1
        mv /var/log/dockerd.log /var/log/dockerd-overlay2.log
        start_dockerd vfs || echo "testbed-node: dockerd did not start; see /var/log/dockerd.log" >&2
    fi
) &
exec /usr/sbin/sshd -D -e

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

#!/usr/bin/env bash
# Installs the swarm binary and its systemd units on this machine.
#   ops/install.sh worker   # or: coordinator
set -euo pipefail
role="${1:?usage: ops/install.sh worker|coordinator}"
case "$role" in worker|coordinator) ;; *) echo "role must be worker or coordinator, got $role" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
cargo build --release
sudo install -m 0755 target/release/swarm /usr/local/bin/swarm
id swarm >/dev/null 2>&1 || sudo useradd --system --create-home --home-dir /var/lib/swarm swarm
sudo install -m 0644 "ops/swarm-$role.service" /etc/systemd/system/
sudo systemctl daemon-reload
sudo systemctl enable --now "swarm-$role"
echo "swarm-$role installed and started; logs: journalctl -u swarm-$role -f"

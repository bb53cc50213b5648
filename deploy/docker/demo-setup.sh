#!/bin/sh
# First start of the dev stack: with relay-a's bootstrap admin key, creates the fleet
# `demo` and registers `demo-device` in it, then writes the device's agent config (and the
# relays' dev certificate) to the device's volume. Later starts find the config and stop.
set -eu
if [ -s /device/agent.toml ]; then
  echo "setup: the demo device is registered already"
  exit 0
fi
export XDG_CONFIG_HOME=/tmp/cloudlink-setup
cloudlink login --api https://relay-a:8443 --ca /relay-a/relay-cert.pem \
  --key-file /relay-a/admin.key >/dev/null
cloudlink fleet create demo --allow-port 22222 >/dev/null
registered=$(cloudlink device register demo --name demo-device 2>/dev/null)
uuid=$(printf '%s\n' "$registered" | awk '$1 == "uuid" { print $2 }')
key=$(printf '%s\n' "$registered" | awk '$1 == "key" { print $2 }')
cp /relay-a/relay-cert.pem /device/relay-cert.pem
umask 077
cat >/device/agent.toml.tmp <<TOML
# Written by demo-setup.sh on the stack's first start.
relay = ["relay-a:4433", "relay-b:4433"]
uuid = "$uuid"
key = "$key"
ca = "/etc/cloudlink/relay-cert.pem"
api = "https://relay-a:8443"
root_login = "fleet-members"
status_file = "/run/cloudlink/agent-status"
authorized_keys_cache_dir = "/var/cache/cloudlink"
TOML
mv /device/agent.toml.tmp /device/agent.toml
echo "setup: registered demo-device $uuid in fleet demo"
echo "setup: log in from the host with the admin key in relay-a's data volume (README, Dev stack)"

#!/bin/sh
# Starts the demo device: its config from the setup service, sshd on 22222, then the agent
# (as the unprivileged cloudlink user) in the foreground.
set -eu
install -m 0640 -g cloudlink /device/agent.toml /etc/cloudlink/agent.toml
install -m 0644 /device/relay-cert.pem /etc/cloudlink/relay-cert.pem
ssh-keygen -A >/dev/null
/usr/sbin/sshd -e
exec setpriv --reuid=cloudlink --regid=cloudlink --init-groups \
  cloudlink agent --config /etc/cloudlink/agent.toml

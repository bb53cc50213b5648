# The dev stack's demo device: the Cloudlink agent and a real sshd on 22222 that takes the
# fleet members' cloud keys through `cloudlink agent authorized-keys` (root logins, as on
# balenaOS). Built FROM the Cloudlink image, so the agent is the one under test.
ARG BASE=cloudlink:dev
FROM ${BASE}
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-server \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_* /etc/motd /etc/update-motd.d \
 && install -d -o cloudlink -g cloudlink /run/cloudlink /var/cache/cloudlink \
 && install -d /run/sshd /etc/cloudlink
COPY demo-device-sshd.conf /etc/ssh/sshd_config.d/cloudlink.conf
COPY demo-device-entrypoint.sh /usr/local/bin/demo-device
ENV CLOUDLINK_AGENT_STATUS_FILE=/run/cloudlink/agent-status
HEALTHCHECK --interval=5s --timeout=5s --start-period=10s --retries=3 \
  CMD ["cloudlink", "healthcheck", "agent"]
ENTRYPOINT ["/bin/sh", "/usr/local/bin/demo-device"]
CMD []

//! balenaOS conventions that the CLI and the relay share: what runs on a device to reach
//! one of its services.

/// The default command that enters a service's container on a balenaOS device; `{service}`
/// is replaced by the service name. Used by `cloudlink device ssh --service` and by the
/// browser terminal.
pub const DEFAULT_SERVICE_COMMAND: &str = "sh -c 'id=$(balena-engine ps -q --filter name=^{service}_ | head -n1); \
     [ -n \"$id\" ] || { echo \"no running container for service {service}\" >&2; exit 1; }; \
     exec balena-engine exec -it \"$id\" sh -c \"command -v bash >/dev/null && exec bash || exec sh\"'";

//! Who is on a gateway connection, which device they mean, and how a refusal reads to
//! them: shared by ProxyJump channels and `host`/`enter` sessions.

use crate::relay::proxy::Refusal;
use crate::relay::state::Shared;
use crate::store::{DeviceFilter, Id};

/// Who logged in, with which of their keys.
#[derive(Clone, Copy)]
pub struct LoggedIn {
    pub user: Id,
    pub key: Id,
    /// Admins search every fleet for a short uuid or a name; others their own.
    pub is_admin: bool,
}

/// The shortest uuid prefix a target may give, as balena's CLI (its short uuids are 7
/// characters).
const MIN_PREFIX: usize = 7;

/// The device `target` names for `who`: `<uuid>`, `<uuid>.<device domain>`, a unique
/// prefix of at least [`MIN_PREFIX`] hex characters of one of their devices' uuids, or
/// the unique name of one. A full uuid is passed on as is, so that admission answers for
/// it (an unknown device and a forbidden one read the same); a short uuid or a name that
/// names none of theirs reads the same way.
pub async fn resolve(state: &Shared, who: LoggedIn, target: &str) -> Result<String, Refusal> {
    let host = target.trim();
    let host = match host.rsplit_once('.') {
        Some((name, domain))
            if state
                .config
                .device_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain)) =>
        {
            name
        }
        _ => host,
    };
    if let Some(uuid) = crate::proto::device_uuid(host) {
        return Ok(uuid);
    }
    let member = (!who.is_admin).then_some(who.user);
    let lookup = |filter: DeviceFilter| async move {
        state
            .store
            .list_devices(member, &filter)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "gateway: cannot look a device up");
                Refusal::StoreUnavailable
            })
    };
    let mut found = Vec::new();
    if host.len() >= MIN_PREFIX && host.bytes().all(|b| b.is_ascii_hexdigit()) {
        found = lookup(DeviceFilter {
            uuid_prefix: Some(host.to_ascii_lowercase()),
            name: None,
        })
        .await?;
    }
    if found.is_empty() && !host.is_empty() {
        found = lookup(DeviceFilter {
            uuid_prefix: None,
            name: Some(host.to_owned()),
        })
        .await?;
    }
    match found.len() {
        0 => Err(Refusal::Forbidden),
        1 => Ok(found.remove(0).uuid),
        n => Err(Refusal::BadRequest(format!(
            "{host:?} names {n} of your devices ({}); give more of the uuid.",
            found
                .iter()
                .map(|d| d.uuid.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A refusal as the gateway's user reads it. An offline device, which admission has
/// already shown the user may reach, says since when.
pub async fn explain(state: &Shared, device: &str, refusal: &Refusal) -> String {
    if let Refusal::DeviceOffline = refusal {
        if let Ok(Some(found)) = state.store.device(device).await {
            return match found
                .last_seen
                .and_then(chrono::DateTime::from_timestamp_millis)
            {
                Some(at) => format!(
                    "The device is offline since {}.",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                None => "The device has never connected.".into(),
            };
        }
    }
    refusal.message()
}

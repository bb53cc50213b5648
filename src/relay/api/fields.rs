//! How the API reads and writes fields: the names it accepts, the times it shows.

use super::error::ApiError;

/// Checks a user, fleet, device or key name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_name(what: &str, name: &str) -> Result<(), ApiError> {
    if crate::store::is_valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "The {what} must be 1 to 63 characters of a-z, 0-9, _ and -, starting with a \
             letter or digit."
        )))
    }
}

/// Unix milliseconds as RFC 3339 (UTC).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

//! The SQLite backend: the embedded default for a single relay.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;

use sqlx::AnyPool;

use super::model::Result;

/// Opens (creating if missing) the database file, turns on WAL, applies `migrations/sqlite`;
/// returns the pool.
///
/// WAL lets the API read while a tunnel's audit row is written; the setting is stored in
/// the file, so one `PRAGMA` at open is enough.
pub async fn pool(url: &str) -> Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&with_create_mode(url))
        .await?;
    sqlx::query("PRAGMA journal_mode=WAL")
        .execute(&pool)
        .await?;
    super::migrations::migrator(super::migrations::SQLITE)
        .run(&pool)
        .await?;
    Ok(pool)
}

/// Adds `mode=rwc` (create if missing) unless the URL already says how to open the file.
fn with_create_mode(url: &str) -> String {
    if url.contains("mode=") || url.contains(":memory:") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

/// Writes a consistent copy of the database at `url` to the new file `to`, while relays
/// keep using it (`VACUUM INTO`: one read transaction; writers carry on in the WAL).
pub async fn backup(url: &str, to: &std::path::Path) -> Result<()> {
    sqlx::any::install_default_drivers();
    let source = if url.contains("mode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=ro")
    } else {
        format!("{url}?mode=ro")
    };
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&source)
        .await?;
    let target = to.to_str().ok_or_else(|| {
        super::model::StoreError::UnsupportedUrl(format!("{}: not a UTF-8 path", to.display()))
    })?;
    sqlx::query("VACUUM INTO $1")
        .bind(target)
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

/// The default database URL for a data directory.
pub fn default_url(data_dir: &std::path::Path) -> String {
    format!("sqlite://{}", data_dir.join("cloudlink.db").display())
}

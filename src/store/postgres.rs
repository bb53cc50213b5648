//! The Postgres backend: production, shared by every relay of a cluster.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;

use super::model::Result;
use super::sql::SqlStore;

/// Connects, applies `migrations/postgres`, and returns the store.
///
/// The pool checks each connection before handing it out, so after the database restarts
/// the first request gets a fresh connection instead of a dead one; a short acquire timeout
/// turns an unreachable database into a prompt 503 instead of a hung request.
pub async fn open(url: &str) -> Result<SqlStore> {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(true)
        .connect(url)
        .await?;
    super::migrations::migrator(super::migrations::POSTGRES)
        .run(&pool)
        .await?;
    Ok(SqlStore::new(pool, "postgres", Some(url.to_owned())))
}

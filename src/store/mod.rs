//! The store: users, keys, fleets, devices, presence and the tunnel audit log.
//!
//! [`Store`] is the one interface the rest of the relay sees. [`open`] picks the backend from
//! the URL scheme, in this one place. Both backends share the queries in [`sql`]: the two
//! dialects differ in nothing those queries use (positional `$N` parameters, `RETURNING`,
//! `ON CONFLICT`), so a second copy of every query would only be a place for the two to drift.
//! What really differs per backend (connect options, migrations, pragmas, and the SQL
//! only Postgres has: `LISTEN/NOTIFY` for presence, the start-up advisory lock) lives in
//! [`postgres`] and [`sqlite`].

pub mod metered;
pub mod migrations;
mod model;
pub mod postgres;
pub mod sql;
pub mod sqlite;

use std::sync::Arc;

pub use model::*;

/// Opens the store the URL names and applies its migrations.
///
/// This is the one place the backend is picked from the scheme.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    let store = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        sql::SqlStore::new(postgres::pool(url).await?, "postgres", Some(url.to_owned()))
    } else if url.starts_with("sqlite:") {
        sql::SqlStore::new(sqlite::pool(url).await?, "sqlite", None)
    } else {
        return Err(StoreError::UnsupportedUrl(url.to_owned()));
    };
    Ok(Arc::new(store))
}

/// Applies the migrations for the URL's backend without starting anything else.
pub async fn migrate(url: &str) -> Result<()> {
    open(url).await.map(drop)
}

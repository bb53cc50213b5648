//! The store: users, keys, fleets, devices, presence and the tunnel audit log.
//!
//! [`Store`] is the one interface the rest of the relay sees. [`open`] picks the backend from
//! the URL scheme, in this one place. Both backends share the queries in [`sql`]: the two
//! dialects differ in nothing those queries use (positional `$N` parameters, `RETURNING`,
//! `ON CONFLICT`), so a second copy of every query would only be a place for the two to drift.
//! What really differs per backend (connect options, migrations, pragmas) lives in
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
        postgres::open(url).await?
    } else if url.starts_with("sqlite:") {
        sqlite::open(url).await?
    } else {
        return Err(StoreError::UnsupportedUrl(url.to_owned()));
    };
    Ok(Arc::new(store))
}

/// Applies the migrations for the URL's backend without starting anything else.
pub async fn migrate(url: &str) -> Result<()> {
    open(url).await.map(drop)
}

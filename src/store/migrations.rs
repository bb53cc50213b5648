//! The schema migrations, compiled into the binary.
//!
//! Listed here rather than found by sqlx's `migrate!` macro: that macro comes with sqlx's
//! query macros, which compile both database drivers a second time (for the compiler) in
//! every build. Each migration's version, description and checksum are exactly what
//! `migrate!` gives (a test compares them with sqlx's own reading of `migrations/`), so
//! databases migrated by earlier builds see no change.

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

/// One file of `migrations/<backend>/`: its name without `.sql`, and its SQL.
type File = (&'static str, &'static str);

macro_rules! files {
    ($dir:literal: $($stem:literal),* $(,)?) => {
        &[$(($stem, include_str!(concat!("../../migrations/", $dir, "/", $stem, ".sql")))),*]
    };
}

/// `migrations/sqlite`.
pub const SQLITE: &[File] = files!("sqlite":
    "0001_init", "0002_expiry_rotation", "0003_cluster", "0004_transport", "0005_terminal", "0006_resume");

/// `migrations/postgres`.
pub const POSTGRES: &[File] = files!("postgres":
    "0001_init", "0002_expiry_rotation", "0003_cluster", "0004_transport", "0005_terminal", "0006_resume");

/// The migrator for one backend's files. As sqlx names them: the version is the number
/// before the first `_`, the description the rest with `_` read as a space.
pub fn migrator(files: &[File]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|&(stem, sql)| {
                let (number, name) = stem.split_once('_').unwrap_or((stem, ""));
                // A malformed name reads as version 0; the test below catches it.
                let version = number.parse().unwrap_or_default();
                Migration::new(
                    version,
                    name.replace('_', " ").into(),
                    MigrationType::Simple,
                    AssertSqlSafe(sql).into_sql_str(),
                    sql.starts_with("-- no-transaction"),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What sqlx's `migrate!` would have embedded: its own reading of the directory.
    async fn from_directory(dir: &str) -> Vec<(i64, String, Vec<u8>, bool)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let migrator = Migrator::new(path).await.expect("read migrations/");
        migrator.iter().map(summary).collect()
    }

    fn summary(m: &Migration) -> (i64, String, Vec<u8>, bool) {
        (
            m.version,
            m.description.to_string(),
            m.checksum.to_vec(),
            m.no_tx,
        )
    }

    /// A file added to `migrations/` but not listed here, or a listed one that reads
    /// differently, fails this test: the binary would otherwise skip or change a migration.
    #[tokio::test]
    async fn the_lists_are_the_directories() {
        for (dir, files) in [
            ("migrations/sqlite", SQLITE),
            ("migrations/postgres", POSTGRES),
        ] {
            let ours: Vec<_> = migrator(files).iter().map(summary).collect();
            assert_eq!(ours, from_directory(dir).await, "{dir}");
        }
    }
}

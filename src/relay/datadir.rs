//! The relay's data directory: generated secrets and identities that must survive restarts.

use std::path::{Path, PathBuf};

/// A file in the data directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct DataDirError {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError {
        path: path.to_owned(),
        source,
    }
}

/// Creates the directory (mode 0700) if missing.
pub fn ensure(dir: &Path) -> Result<(), DataDirError> {
    crate::private_file::ensure_dir(dir).map_err(at(dir))
}

/// Writes `contents` to a new file readable only by its owner, whole or not at all;
/// refuses to overwrite.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
    crate::private_file::create_private(path, contents).map_err(at(path))
}

/// The file's contents, trimmed, or `None` if it does not exist.
pub fn read_trimmed(path: &Path) -> Result<Option<String>, DataDirError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(at(path)(e)),
    }
}

/// The value kept in `dir/name`, made by `make` and stored (0600) the first time.
pub fn persistent(
    dir: &Path,
    name: &str,
    make: impl FnOnce() -> String,
) -> Result<String, DataDirError> {
    let path = dir.join(name);
    if let Some(value) = read_trimmed(&path)? {
        if !value.is_empty() {
            return Ok(value);
        }
    }
    let value = make();
    write_private(&path, format!("{value}\n").as_bytes())?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn persistent_values_are_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let first = persistent(dir.path(), "secret", || "abc".into()).unwrap();
        let again = persistent(dir.path(), "secret", || "other".into()).unwrap();
        assert_eq!(first, "abc");
        assert_eq!(again, "abc");
        let mode = std::fs::metadata(dir.path().join("secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(write_private(&dir.path().join("secret"), b"x").is_err());
    }
}

//! Files written whole or not at all, most of them readable only by their owner: saved
//! logins, the relay's generated secrets, the agent's key cache and status file.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Creates `dir` (and its parents) with mode 0700 if it is missing.
pub fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Replaces `path` with `contents`, readable only by its owner (0600): see [`replace`].
pub fn replace_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    replace(path, contents, 0o600)
}

/// Replaces `path` with `contents` at `mode`: written to a fresh file beside it, synced,
/// then renamed over it, so a reader (or a crash) sees the old file or the new one, never
/// half of either.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let aside = written_aside(path, contents, mode)?;
    std::fs::rename(&aside, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&aside);
    })
}

/// Writes `contents` to a new file at `path` readable only by its owner, whole or not at
/// all; fails with `AlreadyExists` if `path` exists (it is never overwritten).
pub fn create_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let aside = written_aside(path, contents, 0o600)?;
    // A hard link fails if the name is taken, so the whole file appears under it at once
    // or not at all.
    let linked = std::fs::hard_link(&aside, path);
    let _ = std::fs::remove_file(&aside);
    linked
}

/// `contents` in a fresh, synced file at `mode` beside `path`; its name.
fn written_aside(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let aside = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&aside);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&aside)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&aside);
        return Err(e);
    }
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn replaced_whole_private_and_nothing_left_beside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        ensure_dir(path.parent().unwrap()).unwrap();
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        replace_private(&path, b"one").unwrap();
        replace_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        replace(&path, b"three", 0o644).unwrap();
        assert_eq!(mode(&path), 0o644);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["config.toml"], "no file left aside");
    }

    #[test]
    fn created_once_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        create_private(&path, b"first").unwrap();
        assert_eq!(mode(&path), 0o600);
        let again = create_private(&path, b"second").unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_that_is_missing_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/x");
        assert!(replace_private(&path, b"x").is_err());
        assert!(create_private(&path, b"x").is_err());
    }
}

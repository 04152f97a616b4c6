//! Files that are either whole or absent: [`write_atomic`] writes a temporary
//! file in the same directory, syncs it, renames it over the target and syncs
//! the directory; on failure the temporary file is removed (a partial write
//! would keep a full disk full).

use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory a file `path` goes into (`.` for a bare file name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The temporary name `path` is written under (same directory, ends in `.tmp`).
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    parent_of(path).join(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` durably and atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory. On failure the
/// temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // The partial file would keep a full disk full; it is nobody's data.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable once the directory is synced.
    std::fs::File::open(parent_of(path))?.sync_all()
}


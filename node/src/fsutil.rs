//! Files that are either whole or absent, and output paths checked before a run
//! rather than after it.
//!
//! [`write_atomic`] writes to a temporary file in the same directory, syncs it,
//! renames it over the target and syncs the directory: a reader (or a restart
//! after a crash or a full disk) sees the old file or the new one, never a
//! truncated one. When any step fails the temporary file is removed, so a full
//! disk is not kept full by the partial write.
//!
//! [`check_writable`] creates a directory and writes (and syncs, and removes) a
//! probe file there: a read-only, missing or full output location fails at the
//! start of a run with one line, not at its end.

use std::io::Write;
use std::path::Path;

pub use p2pml_lambda_grad::fsio::{parent_of, write_atomic};

/// Checks that files can be written in `dir` (created if missing): writes,
/// syncs and removes a probe file. `flag` names the option in the error line.
pub fn check_writable(dir: &Path, flag: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{flag} {}: cannot create the directory: {e}", dir.display()))?;
    if !dir.is_dir() {
        return Err(format!("{flag} {}: not a directory", dir.display()));
    }
    let probe = dir.join(format!(".p2pml-write-probe.{}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&probe)?;
        // A block's worth: a full disk refuses it (a zero-byte file needs no block).
        f.write_all(&[0u8; 4096])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    r.map_err(|e| format!("{flag} {}: cannot write there: {e}", dir.display()))
}

/// Checks a file output `path` given by `flag`: not a directory, and its
/// directory writable (created if missing).
pub fn check_writable_file(path: &Path, flag: &str) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("{flag} {} is a directory; give a file name", path.display()));
    }
    check_writable(&parent_of(path), flag)
}

/// The node's outputs, checked at start: `--state-dir` and `--report`.
pub fn check_node_outputs(p2p: &crate::config::P2pConfig) -> Result<(), String> {
    check_writable(&p2p.state_dir, "--state-dir")?;
    if let Some(r) = &p2p.report {
        check_writable_file(r, "--report")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn writes_replace_whole_files_and_a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("report.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        // A non-empty directory where the file must go: the rename fails.
        let d = dir.path().join("model.safetensors");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("x"), b"x").unwrap();
        assert!(write_atomic(&d, b"data").is_err());
        assert!(tmp_files(dir.path()).is_empty(), "{:?}", tmp_files(dir.path()));
    }

    #[test]
    fn unwritable_outputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = check_writable(&file.join("sub"), "--state-dir").unwrap_err();
        assert!(e.starts_with("--state-dir ") && e.contains("cannot create"), "{e}");
        let e = check_writable_file(&file.join("r.json"), "--report").unwrap_err();
        assert!(e.starts_with("--report "), "{e}");
        let e = check_writable_file(dir.path(), "--report").unwrap_err();
        assert!(e.contains("is a directory"), "{e}");
        check_writable(&dir.path().join("new/dir"), "--out").unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("new/dir")).unwrap().count(), 0, "the probe is removed");
    }
}

//! Helpers for the end-to-end tests in tests/tests/: where the built binaries
//! are, and bounded waits.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// target/<profile>/, where cargo put the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent().and_then(|p| p.parent()).expect("target/<profile>").to_path_buf()
}

/// The path of workspace binary `name`, built by `cargo build --workspace --bins`.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --release --workspace --bins` first (scripts/test.sh does)", p.display());
    p
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Debian package's Fashion-MNIST directory; the tests need it.
pub fn fashion_mnist() -> PathBuf {
    let p = PathBuf::from("/usr/share/datasets/fashion-mnist");
    assert!(
        p.join("train-images-idx3-ubyte.gz").exists(),
        "Fashion-MNIST missing: apt-get install dataset-fashion-mnist (scripts/setup.sh does)"
    );
    p
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

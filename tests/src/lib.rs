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

/// Node arguments of the small runs: a Fashion-MNIST subset on the CPU, one
/// batch per round (unless `extra` says otherwise), plus `extra`.
pub fn small_run(train: u32, test: u32, val: u32, epochs: u32, extra: &[&str]) -> Vec<String> {
    let data = fashion_mnist();
    let mut v: Vec<String> = vec!["--data-dir".into(), data.to_str().unwrap().into()];
    for (flag, n) in [("--limit-train", train), ("--limit-test", test), ("--val-size", val), ("--epochs", epochs)] {
        v.extend([flag.to_string(), n.to_string()]);
    }
    if !extra.contains(&"--batches-per-round") {
        v.extend(["--batches-per-round", "1"].map(String::from));
    }
    v.extend(["--device", "cpu"].map(String::from));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// `testnet run` with `testnet_args`, then `--` and `node_args`: (exit ok, report).
pub fn testnet(out: &std::path::Path, peers: usize, testnet_args: &[&str], node_args: &[String]) -> (bool, serde_json::Value) {
    testnet_env(out, peers, testnet_args, node_args, &[])
}

/// [`testnet`] with these environment variables set for testnet and its nodes.
pub fn testnet_env(out: &std::path::Path, peers: usize, testnet_args: &[&str], node_args: &[String], env: &[(&str, &str)]) -> (bool, serde_json::Value) {
    let o = std::process::Command::new(bin("testnet"))
        .envs(env.iter().copied())
        .args(["run", "--peers", &peers.to_string(), "--out", out.to_str().unwrap(), "--timeout", "600"])
        .args(testnet_args)
        .arg("--")
        .args(node_args)
        .output()
        .expect("run testnet");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap_or_default())
        .unwrap_or_else(|_| panic!("no report; testnet said: {}", String::from_utf8_lossy(&o.stderr)));
    (o.status.success(), report)
}


/// A real `testnet s3` process serving one bucket; killed when dropped.
pub struct S3Proc {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

impl Drop for S3Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `testnet s3` on port 0 with its buckets under `root`/data, creating
/// `bucket`, accepting `access_key`/`secret_key`; waits (bounded) for its address.
pub fn start_s3(root: &std::path::Path, bucket: &str, access_key: &str, secret_key: &str) -> S3Proc {
    use std::process::{Command, Stdio};
    std::fs::create_dir_all(root).expect("create the store's directory");
    let addr_file = root.join("s3.addr");
    let log = root.join("s3.log");
    let child = Command::new(bin("testnet"))
        .args(["s3", "--root"])
        .arg(root.join("data"))
        .args(["--listen", "127.0.0.1:0", "--bucket", bucket, "--access-key", access_key, "--secret-key", secret_key, "--addr-file"])
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the store's log"))
        .spawn()
        .expect("start testnet s3");
    let mut p = S3Proc { child, endpoint: String::new() };
    wait_for("testnet s3's address file", Duration::from_secs(30), || {
        let exited = p.child.try_wait().expect("poll testnet s3").is_some();
        assert!(!exited, "testnet s3 exited early: {}", std::fs::read_to_string(&log).unwrap_or_default());
        addr_file.exists()
    });
    p.endpoint = std::fs::read_to_string(&addr_file).expect("read the address file");
    assert!(p.endpoint.starts_with("http://127.0.0.1:"), "{}", p.endpoint);
    p
}

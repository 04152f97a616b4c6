//! The function tier of a testnet: the local S3 server (in this process) and the
//! local function host (`lambda-grad host`, a child process), started when the
//! nodes run with `--executor lambda`.

use anyhow::{bail, Context};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// Local credentials shared by the store, the host's functions and the nodes.
pub(crate) const ACCESS_KEY: &str = crate::s3::LOCAL_ACCESS_KEY;
pub(crate) const SECRET_KEY: &str = crate::s3::LOCAL_SECRET_KEY;

pub(crate) struct TierSettings {
    pub(crate) concurrency: usize,
    pub(crate) timeout_s: f64,
    pub(crate) memory_mb: u64,
    /// Give the function host a store of its own (a misconfigured deployment:
    /// the functions find none of the nodes' objects).
    pub(crate) separate_store: bool,
}

/// The bucket the nodes and the functions use.
pub(crate) const BUCKET: &str = "p2pml";

pub(crate) struct FunctionTier {
    /// None while an outage (--store-outage) has it stopped.
    s3: Option<crate::s3::S3Server>,
    s3_root: PathBuf,
    s3_addr: SocketAddr,
    /// The function host's own store (--fn-separate-store).
    fn_s3: Option<crate::s3::S3Server>,
    host: Child,
    host_addr: String,
    pub(crate) s3_endpoint: String,
    pub(crate) lambda_endpoint: String,
}

impl FunctionTier {
    pub(crate) async fn start(out: &Path, lambda_bin: &Path, s: &TierSettings) -> anyhow::Result<FunctionTier> {
        let root = out.join("s3");
        std::fs::create_dir_all(root.join(BUCKET)).with_context(|| format!("cannot create {}", root.display()))?;
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let s3 = crate::s3::start(&root, listen, ACCESS_KEY, SECRET_KEY).await?;
        let s3_endpoint = s3.endpoint();
        let s3_addr = s3.addr();
        let fn_s3 = match s.separate_store {
            true => {
                let root = out.join("s3-functions");
                std::fs::create_dir_all(root.join(BUCKET)).with_context(|| format!("cannot create {}", root.display()))?;
                Some(crate::s3::start(&root, listen, ACCESS_KEY, SECRET_KEY).await?)
            }
            false => None,
        };
        let host_store = fn_s3.as_ref().map_or(s3_endpoint.clone(), |s| s.endpoint());
        let dir = out.join("function-host");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let addr_file = dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = Command::new(lambda_bin);
        cmd.arg("host")
            .args(["--listen", "127.0.0.1:0", "--concurrency", &s.concurrency.to_string()])
            .args(["--timeout-s", &s.timeout_s.to_string(), "--memory-mb", &s.memory_mb.to_string()])
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(Stdio::from(std::fs::File::create(dir.join("stdout.log"))?))
            .stderr(Stdio::from(std::fs::File::create(dir.join("stderr.log"))?))
            .kill_on_drop(true);
        for (k, v) in env(&host_store) {
            cmd.env(k, v);
        }
        let mut host = cmd.spawn().with_context(|| format!("cannot start {}", lambda_bin.display()))?;
        let started = Instant::now();
        let lambda_endpoint = loop {
            if let Ok(url) = std::fs::read_to_string(&addr_file) {
                break url.trim().to_string();
            }
            if let Ok(Some(status)) = host.try_wait() {
                let err = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                bail!("the function host exited ({status}): {}", err.lines().last().unwrap_or("no output"));
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the function host did not start within 30 s (see {})", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let host_addr = lambda_endpoint.trim_start_matches("http://").to_string();
        Ok(FunctionTier { s3: Some(s3), s3_root: root, s3_addr, fn_s3, host, host_addr, s3_endpoint, lambda_endpoint })
    }

    /// Arguments that point a node at this tier.
    pub(crate) fn node_args(&self) -> Vec<String> {
        vec!["--lambda-endpoint".into(), self.lambda_endpoint.clone(), "--s3-endpoint".into(), self.s3_endpoint.clone()]
    }

    /// Environment for the nodes (credentials of the local store and function host).
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        env(&self.s3_endpoint)
    }

    /// The host's counters (GET /p2pml/stats).
    pub(crate) async fn stats(&self) -> anyhow::Result<Value> {
        let fut = async {
            let mut s = tokio::net::TcpStream::connect(&self.host_addr).await?;
            let req = format!("GET /p2pml/stats HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.host_addr);
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            anyhow::Ok(buf)
        };
        let buf = tokio::time::timeout(Duration::from_secs(10), fut).await.context("function host stats: timed out")??;
        let text = String::from_utf8_lossy(&buf);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        serde_json::from_str(body.trim()).with_context(|| format!("function host stats: not JSON: {body}"))
    }

    /// An outage of the store: it stops, and its objects are lost (as an
    /// in-memory store's, or after a lifecycle rule) until [`FunctionTier::store_back`].
    pub(crate) async fn store_down(&mut self) -> anyhow::Result<()> {
        if let Some(s3) = self.s3.take() {
            s3.shutdown().await;
        }
        let bucket = self.s3_root.join(BUCKET);
        std::fs::remove_dir_all(&bucket).with_context(|| format!("cannot empty {}", bucket.display()))?;
        std::fs::create_dir_all(&bucket).with_context(|| format!("cannot create {}", bucket.display()))?;
        Ok(())
    }

    /// The store serves again, on the same address, empty.
    pub(crate) async fn store_back(&mut self) -> anyhow::Result<()> {
        if self.s3.is_none() {
            self.s3 = Some(crate::s3::start(&self.s3_root, self.s3_addr, ACCESS_KEY, SECRET_KEY).await?);
        }
        Ok(())
    }

    /// The objects left in the nodes' bucket, and their bytes.
    pub(crate) fn leftovers(&self) -> Value {
        fn walk(dir: &Path, n: &mut u64, bytes: &mut u64) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path(), n, bytes),
                    // s3s-fs keeps its metadata beside the objects, in hidden files.
                    Ok(_) if !e.file_name().to_string_lossy().starts_with('.') => {
                        *n += 1;
                        *bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                    _ => {}
                }
            }
        }
        let (mut n, mut bytes) = (0, 0);
        walk(&self.s3_root.join(BUCKET), &mut n, &mut bytes);
        serde_json::json!({ "objects": n, "bytes": bytes })
    }

    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.host.id() {
            // SIGTERM lets the host stop its environments; then make sure.
            let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
            if tokio::time::timeout(Duration::from_secs(10), self.host.wait()).await.is_err() {
                let _ = self.host.kill().await;
            }
        }
        if let Some(s3) = self.s3.take() {
            s3.shutdown().await;
        }
        if let Some(s3) = self.fn_s3.take() {
            s3.shutdown().await;
        }
    }
}

fn env(s3_endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
        ("P2PML_S3_ENDPOINT", s3_endpoint),
        ("P2PML_S3_BUCKET", BUCKET),
        ("P2PML_S3_PATH_STYLE", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `lambda-grad` next to the testnet binary.
pub(crate) fn lambda_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot locate the testnet binary")?;
    let p = me.with_file_name("lambda-grad");
    if !p.exists() {
        bail!("{} not found: build it (cargo build --release --workspace --bins)", p.display());
    }
    Ok(p)
}

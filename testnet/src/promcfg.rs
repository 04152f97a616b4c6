//! Prometheus for a testnet: OUT/prometheus.yml scrapes the targets listed in
//! OUT/prometheus/targets.json (file-based discovery), which testnet rewrites
//! as nodes start and restart on new ports; `--prometheus` also runs the
//! server on a free loopback port.

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub(crate) struct PromFiles {
    pub(crate) config: PathBuf,
    targets: PathBuf,
}

impl PromFiles {
    pub(crate) fn write(out: &Path) -> anyhow::Result<PromFiles> {
        let dir = out.join("prometheus");
        std::fs::create_dir_all(&dir)?;
        let dir = std::fs::canonicalize(&dir)?;
        let targets = dir.join("targets.json");
        std::fs::write(&targets, "[]\n")?;
        let config = out.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "# Written by testnet: every node's /metrics, each second.\n\
                 global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: p2pml\n    file_sd_configs:\n      - files: [\"{}\"]\n        refresh_interval: 5s\n",
                targets.display()
            ),
        )?;
        Ok(PromFiles { config, targets })
    }

    /// Rewrites the targets: node name → metrics URL (http://HOST:PORT/metrics).
    pub(crate) fn set_targets(&self, urls: &BTreeMap<String, String>) -> anyhow::Result<()> {
        let entries: Vec<serde_json::Value> = urls
            .iter()
            .filter_map(|(node, url)| {
                let hostport = url.strip_prefix("http://")?.split('/').next()?;
                Some(serde_json::json!({ "targets": [hostport], "labels": { "node": node } }))
            })
            .collect();
        // Written whole and renamed, so that Prometheus never reads half a file.
        let tmp = self.targets.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&entries)?)?;
        std::fs::rename(&tmp, &self.targets)?;
        Ok(())
    }
}

pub(crate) struct Prometheus {
    pub(crate) url: String,
    _child: Child,
}

/// Starts Prometheus on a free loopback port and waits until it is ready.
pub(crate) async fn start(bin: &Path, out: &Path, files: &PromFiles) -> anyhow::Result<Prometheus> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let data = out.join("prometheus").join("data");
    let log = std::fs::File::create(out.join("prometheus").join("prometheus.log"))?;
    let child = Command::new(bin)
        .arg(format!("--config.file={}", files.config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} (apt-get install prometheus, or pass --prometheus-bin)", bin.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready(port).await {
        if Instant::now() > deadline {
            bail!("Prometheus did not become ready within 30 s: see {}", out.join("prometheus/prometheus.log").display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(out.join("prometheus.url"), format!("{url}\n"))?;
    eprintln!("testnet: Prometheus at {url} (config {})", files.config.display());
    Ok(Prometheus { url, _child: child })
}

/// GET /-/ready answers 200.
async fn ready(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return false };
    let req = format!("GET /-/ready HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")
}

//! The object store's data plane on loopback: N puts and gets of a 4.8 MB
//! object (the size of the cnn's parameters and of a gradient output) through
//! `ObjectStore` against the in-process `testnet s3` server, beside a plain
//! file write and read of the same bytes as the reference.
//!
//!   cargo run --release -p p2pml-testnet --example objstore_bench -- [N] [BYTES] [legacy|current]
//!
//! Runs the current data plane and the legacy one (`P2PML_S3_LEGACY_DATA_PLANE=1`:
//! SDK checksums, signed payloads, s3s-fs's own get/put) in the same run.

#[allow(dead_code, unreachable_pub)]
#[path = "../src/s3.rs"]
mod s3;

use p2pml_lambda_grad::objstore::{ObjectStore, StoreConfig};
use std::time::Instant;

const LEGACY: &str = "P2PML_S3_LEGACY_DATA_PLANE";

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

struct Row {
    put: f64,
    get: f64,
}

/// Mean ms per put and per get over `n` rounds (after 2 warm-up rounds).
async fn bench_store(root: &std::path::Path, data: &[u8], n: usize) -> anyhow::Result<Row> {
    std::fs::create_dir_all(root.join("bench"))?;
    let server = s3::start(root, "127.0.0.1:0".parse()?, "bench", "bench-secret").await?;
    let cfg = StoreConfig { endpoint: Some(server.endpoint()), bucket: "bench".into(), region: "us-east-1".into(), path_style: true };
    let store = ObjectStore::with_credentials(&cfg, "bench", "bench-secret", None)?;
    let (mut put, mut get) = (0.0, 0.0);
    for i in 0..n + 2 {
        let key = format!("run/r{i}/params");
        let t = Instant::now();
        store.put(&key, data.to_vec()).await?;
        let p = ms(t);
        let t = Instant::now();
        let back = store.get(&key).await?;
        let g = ms(t);
        anyhow::ensure!(back == data, "round {i}: the object did not round-trip ({} bytes back)", back.len());
        if i >= 2 {
            put += p;
            get += g;
        }
    }
    server.shutdown().await;
    Ok(Row { put: put / n as f64, get: get / n as f64 })
}

fn bench_file(dir: &std::path::Path, data: &[u8], n: usize) -> anyhow::Result<Row> {
    let (mut put, mut get) = (0.0, 0.0);
    for i in 0..n + 2 {
        let path = dir.join(format!("f{i}"));
        let t = Instant::now();
        std::fs::write(&path, data)?;
        let p = ms(t);
        let t = Instant::now();
        let back = std::fs::read(&path)?;
        let g = ms(t);
        anyhow::ensure!(back == data);
        if i >= 2 {
            put += p;
            get += g;
        }
    }
    Ok(Row { put: put / n as f64, get: get / n as f64 })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let size: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4_800_000);
    let only = args.next();
    let run = |plane: &str| only.as_deref().is_none_or(|o| o == plane);
    let data: Vec<u8> = (0..size as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let file = bench_file(dir.path(), &data, n)?;
    let mut rows = vec![("file write/read", file)];
    if run("legacy") {
        std::env::set_var(LEGACY, "1");
        rows.push(("s3 legacy data plane", rt.block_on(bench_store(&dir.path().join("legacy"), &data, n))?));
        std::env::remove_var(LEGACY);
    }
    if run("current") {
        rows.push(("s3 current data plane", rt.block_on(bench_store(&dir.path().join("current"), &data, n))?));
    }
    let file = &rows[0].1;
    println!("{n} rounds of {size} bytes, ms per op (ratio to the file)");
    println!("{:<28} {:>8} {:>8} {:>8} {:>8}", "", "put", "x file", "get", "x file");
    for (name, r) in &rows {
        println!("{name:<28} {:>8.2} {:>8.1} {:>8.2} {:>8.1}", r.put, r.put / file.put, r.get, r.get / file.get);
    }
    Ok(())
}

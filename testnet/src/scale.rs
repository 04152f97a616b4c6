//! How a run scales: per round, the critical-path exchange latency (from the
//! last contributor's announcement to each peer's update done, on the nodes'
//! own clocks: they share this machine's), the bytes each peer sent and
//! received; over the run, the median round time, the peak memory of a node,
//! and (`--ideal`) the efficiency against the compute-bound ideal: the round's
//! samples at the rate of a single process training the same model on every
//! core, timed by testnet in the same run.

use crate::report::PeerSummary;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct RoundScale {
    pub(crate) round: u64,
    /// When the last contributor announced (Unix ms).
    pub(crate) last_announce_unix_ms: u64,
    /// From then to each peer's update done: the mean and the slowest peer, ms.
    pub(crate) exchange_ms_mean: f64,
    pub(crate) exchange_ms_max: f64,
    /// Payload bytes per peer in the round (mean over the peers).
    pub(crate) bytes_sent_per_peer: f64,
    pub(crate) bytes_received_per_peer: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Scale {
    pub(crate) rounds: Vec<RoundScale>,
    /// Median time between a peer's consecutive rounds, ms.
    pub(crate) round_ms_median: f64,
    /// Medians over the rounds of the per-round mean and slowest exchange latency, ms.
    pub(crate) exchange_ms_median: f64,
    pub(crate) exchange_ms_max_median: f64,
    /// Medians over (peer, round), round 0 (the start's traffic) left out.
    pub(crate) bytes_sent_per_peer_round: f64,
    pub(crate) bytes_received_per_peer_round: f64,
    /// The largest peak resident memory of a node, MB.
    pub(crate) peak_rss_mb_max: Option<f64>,
    /// `--ideal`: a single process's training rate here, the round time it
    /// implies for the swarm's samples per round, and that over the measured one.
    pub(crate) single_process_samples_per_s: Option<f64>,
    pub(crate) ideal_round_ms: Option<f64>,
    pub(crate) efficiency: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The scale figures of the peers' round logs (workers and servers have none of these).
pub(crate) fn summarize(peers: &[PeerSummary]) -> Scale {
    let peers: Vec<&PeerSummary> = peers.iter().filter(|p| p.role == "peer").collect();
    // round -> [(announced, done, sent, received)]
    let mut by_round: BTreeMap<u64, Vec<(Option<u64>, u64, u64, u64)>> = BTreeMap::new();
    let mut gaps = Vec::new();
    let (mut sent, mut received) = (Vec::new(), Vec::new());
    for p in &peers {
        let log = p.rounds_log.as_array().cloned().unwrap_or_default();
        let mut last_done = None;
        for r in &log {
            let (Some(round), Some(done)) = (r["round"].as_u64(), r["unix_ms"].as_u64()) else { continue };
            let (s, rc) = (r["bytes_sent"].as_u64().unwrap_or(0), r["bytes_received"].as_u64().unwrap_or(0));
            by_round.entry(round).or_default().push((r["announced_unix_ms"].as_u64(), done, s, rc));
            if let Some(prev) = last_done {
                gaps.push(done.saturating_sub(prev) as f64);
                sent.push(s as f64);
                received.push(rc as f64);
            }
            last_done = Some(done);
        }
    }
    let mut rounds = Vec::new();
    for (round, v) in by_round {
        let Some(last) = v.iter().filter_map(|x| x.0).max() else { continue };
        let lat: Vec<f64> = v.iter().map(|x| x.1.saturating_sub(last) as f64).collect();
        let n = v.len() as f64;
        rounds.push(RoundScale {
            round,
            last_announce_unix_ms: last,
            exchange_ms_mean: lat.iter().sum::<f64>() / n,
            exchange_ms_max: lat.iter().copied().fold(0.0, f64::max),
            bytes_sent_per_peer: v.iter().map(|x| x.2 as f64).sum::<f64>() / n,
            bytes_received_per_peer: v.iter().map(|x| x.3 as f64).sum::<f64>() / n,
        });
    }
    Scale {
        exchange_ms_median: median(rounds.iter().map(|r| r.exchange_ms_mean).collect()),
        exchange_ms_max_median: median(rounds.iter().map(|r| r.exchange_ms_max).collect()),
        rounds,
        round_ms_median: median(gaps),
        bytes_sent_per_peer_round: median(sent),
        bytes_received_per_peer_round: median(received),
        peak_rss_mb_max: peers.iter().filter_map(|p| p.peak_rss_mb).reduce(f64::max),
        ..Scale::default()
    }
}

/// The node flags a single-process reference run takes from the peers' arguments.
const TRAIN_FLAGS: &[&str] = &["--model", "--dataset", "--data-dir", "--normalization", "--batch-size", "--optimizer", "--lr", "--momentum", "--seed", "--device"];

/// Times `p2pml-node train` on every core for `samples` training samples of
/// the run's model and data: its samples per second.
pub(crate) fn single_process_rate(bin: &Path, node_args: &[String], out: &Path, samples: usize) -> anyhow::Result<f64> {
    let mut args: Vec<String> = vec!["train".into()];
    let mut i = 0;
    while i < node_args.len() {
        let a = &node_args[i];
        if let Some((flag, _)) = a.split_once('=').filter(|(f, _)| TRAIN_FLAGS.contains(f)) {
            let _ = flag;
            args.push(a.clone());
        } else if TRAIN_FLAGS.contains(&a.as_str()) && i + 1 < node_args.len() {
            args.extend([a.clone(), node_args[i + 1].clone()]);
            i += 1;
        }
        i += 1;
    }
    args.extend(["--epochs", "1", "--limit-test", "64", "--val-size", "64", "--threads", "0"].map(String::from));
    args.extend(["--limit-train".into(), (samples + 64).to_string(), "--out".into(), out.display().to_string()]);
    std::fs::create_dir_all(out)?;
    let o = std::process::Command::new(bin).args(&args).output()?;
    if !o.status.success() {
        anyhow::bail!("the single-process reference run failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""));
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json"))?)?;
    v["epochs"][0]["samples_per_second"].as_f64().filter(|r| *r > 0.0).ok_or_else(|| anyhow::anyhow!("the reference run reported no samples per second"))
}

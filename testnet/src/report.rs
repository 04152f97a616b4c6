//! The testnet's report: every node's own report, and the checks across them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PeerSummary {
    pub(crate) index: usize,
    /// "peer", "ps" or "worker".
    pub(crate) role: String,
    pub(crate) peer_id: String,
    pub(crate) exit_code: Option<i32>,
    pub(crate) final_digest: String,
    pub(crate) rounds: u64,
    pub(crate) epochs: u64,
    pub(crate) final_test_accuracy: f64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) gradient_bytes_sent: u64,
    pub(crate) invalid_messages: u64,
    /// Mean seconds per round in each stage.
    pub(crate) mean_stage_seconds: BTreeMap<String, f64>,
    /// Per-round timings by stage, as the node measured them.
    pub(crate) rounds_log: Value,
    pub(crate) epochs_log: Value,
    /// This peer's gossipsub score of each peer id it was connected to: {min, last}.
    pub(crate) peer_scores: Value,
    /// `--executor lambda`: the node's function-tier counters and stage sums.
    pub(crate) function_tier: Value,
    /// The node's cost row: measured billing and the paper's formula.
    pub(crate) cost: Value,
    /// The node's peak resident memory, MB.
    #[serde(default)]
    pub(crate) peak_rss_mb: Option<f64>,
}

/// The function tier across the run (`--executor lambda`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TierSummary {
    /// The function host's own counters: invocations, errors, timeouts, cold starts, GB-seconds.
    pub(crate) host: Value,
    pub(crate) invocations: u64,
    pub(crate) retries: u64,
    pub(crate) timeouts: u64,
    pub(crate) backups: u64,
    /// Tasks computed locally (the sum of `tasks_local`).
    pub(crate) fallbacks: u64,
    pub(crate) cold_starts: u64,
    /// Every planned task, once: in the tier (first try, after retries) or
    /// locally by cause. `tasks_ok + tasks_ok_after_retry + fallbacks == tasks_planned`.
    #[serde(default)]
    pub(crate) tasks_planned: u64,
    #[serde(default)]
    pub(crate) tasks_ok: u64,
    #[serde(default)]
    pub(crate) tasks_ok_after_retry: u64,
    #[serde(default)]
    pub(crate) tasks_local: BTreeMap<String, u64>,
    /// Objects the nodes put back after a function found them missing.
    #[serde(default)]
    pub(crate) reuploads: u64,
    #[serde(default)]
    pub(crate) params_uploads: u64,
    #[serde(default)]
    pub(crate) breaker_opens: u64,
    #[serde(default)]
    pub(crate) objects_deleted: u64,
    /// What the nodes' bucket held after the run: {objects, bytes}.
    #[serde(default)]
    pub(crate) store_at_end: Value,
}

/// A rogue node (--rogues) and what the peers thought of it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RogueSummary {
    pub(crate) index: usize,
    pub(crate) peer_id: String,
    pub(crate) exit_code: Option<i32>,
    /// "garbage" (--fault-garbage: invalid messages) or "heartbeat" (--rogue-heartbeat:
    /// signed heartbeats without a Hello).
    #[serde(default)]
    pub(crate) kind: String,
    pub(crate) garbage_sent: u64,
    /// Peer index → that peer's score of the rogue ({min, last}), for peers connected to it.
    pub(crate) scores_at_peers: BTreeMap<usize, Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) ok: bool,
    /// "sync" or "async": only synchronous runs must agree bit for bit.
    pub(crate) sync: String,
    pub(crate) peers: usize,
    pub(crate) node_args: Vec<String>,
    pub(crate) wall_seconds: f64,
    /// Rounds that every peer completed, and in how many all digests were equal.
    pub(crate) common_rounds: u64,
    pub(crate) rounds_with_equal_digests: u64,
    pub(crate) all_final_digests_equal: bool,
    /// Test accuracy after each epoch (from the first peer; equal on all when digests are).
    pub(crate) accuracy_by_epoch: Vec<f64>,
    pub(crate) problems: Vec<String>,
    pub(crate) peer_reports: Vec<PeerSummary>,
    pub(crate) rogues: Vec<RogueSummary>,
    pub(crate) function_tier: Option<TierSummary>,
    /// One row per peer: executor, wall seconds, requests, GB-seconds, USD (measured and paper formula).
    pub(crate) cost_table: Vec<Value>,
    /// Peers killed and not revived by the end (they wrote no report).
    pub(crate) down_at_end: Vec<usize>,
    /// The fault schedule as it fired, with each event's measured effect.
    pub(crate) faults: Vec<crate::faults::EventReport>,
    /// "p2p", or "ps" (a parameter server and --peers workers).
    pub(crate) role: String,
    /// Progress as testnet saw it: (seconds, rounds finished by the furthest node).
    pub(crate) progress: Vec<(f64, u64)>,
    /// Test accuracy as it was printed: (seconds, epoch, accuracy).
    pub(crate) accuracy_timeline: Vec<(f64, u64, f64)>,
    /// Seconds without progress: the sum over gaps between new rounds longer
    /// than twice the median round, less one median round each.
    pub(crate) stalled_seconds: f64,
    /// The run was stopped by SIGINT/SIGTERM/SIGHUP before it finished.
    #[serde(default)]
    pub(crate) interrupted: bool,
    /// The run was cut short (interrupted, --timeout, a node that failed): the
    /// peers' digests were not compared.
    #[serde(default)]
    pub(crate) cut_short: bool,
    /// Rounds that some peer closed on the straggler deadline without every
    /// expected member (union over the peers, sorted).
    #[serde(default)]
    pub(crate) deadline_rounds: Vec<u64>,
    /// Members demoted for withholding (missing rounds in a row), one entry per peer.
    #[serde(default)]
    pub(crate) withholding_demotions: Vec<Demotion>,
    /// Peers that sent heartbeats but never completed an accepted Hello, one entry per peer.
    #[serde(default)]
    pub(crate) unadmitted_peers: Vec<UnadmittedPeer>,
    /// Exchange latency, bytes per peer per round, memory, efficiency.
    #[serde(default)]
    pub(crate) scale: crate::scale::Scale,
}

/// A member demoted for withholding its gradient.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Demotion {
    pub(crate) peer: String,
    /// Its node index in this testnet, where known.
    pub(crate) index: Option<usize>,
    /// The peers (indices) that demoted it.
    pub(crate) by: Vec<usize>,
    /// The first round and epoch in which a peer demoted it.
    pub(crate) first_round: u64,
    pub(crate) epoch: u64,
}

/// A peer that heartbeat without being admitted.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct UnadmittedPeer {
    pub(crate) peer: String,
    /// Its node index in this testnet (a rogue's is past the peers), where known.
    pub(crate) index: Option<usize>,
    /// The most heartbeats any one peer ignored from it.
    pub(crate) heartbeats: u64,
    /// The peers (indices) that ignored it.
    pub(crate) seen_by: Vec<usize>,
}

/// The line of a node's stderr log (from byte `from`: this life's part) that says
/// why it failed: the first line starting with `error:`, else the first non-empty one.
pub(crate) fn error_line(log: &Path, from: u64) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines = || text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| l.starts_with("error:"))
        .or_else(|| lines().next())
        .map_or_else(|| "(no output on stderr)".to_string(), str::to_string)
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn collect(
    out: &Path,
    peers: usize,
    rogues: usize,
    args: &[String],
    wall: Duration,
    exits: &[Option<Option<i32>>],
    down_at_end: &[bool],
    host_stats: Option<(Value, Value)>,
    server: Option<usize>,
    ids: &[String],
    rogue_kind: &str,
    cut_short: bool,
) -> anyhow::Result<Report> {
    let dir = |i: usize| out.join("nodes").join(if Some(i) == server { "ps".to_string() } else { format!("n{i}") });
    let mut problems = Vec::new();
    let mut summaries = Vec::new();
    let mut digests_by_round: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut first_spec_sync: Option<String> = None;
    // (peer index, its report) of the peers that reported: who they did not count.
    let mut admission: Vec<(usize, Value)> = Vec::new();
    for i in 0..peers {
        if down_at_end.get(i).copied().unwrap_or(false) {
            continue;
        }
        let path = dir(i).join("report.json");
        let exit_code: Option<i32> = exits.get(i).copied().flatten().flatten();
        let v: Value = match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            Some(v) => v,
            // A run cut short stopped its nodes before they could report: no news.
            None if cut_short => continue,
            None => {
                let err = std::fs::read_to_string(dir(i).join("stderr.log")).unwrap_or_default();
                problems.push(format!(
                    "peer {i} wrote no report (exit {exit_code:?}): {}",
                    err.lines().rev().find(|l| l.contains("error")).unwrap_or("no error line")
                ));
                continue;
            }
        };
        admission.push((i, v.clone()));
        if exit_code != Some(0) && !cut_short {
            problems.push(format!("peer {i} exited with {exit_code:?}"));
        }
        if first_spec_sync.is_none() {
            first_spec_sync = Some(if v["spec"]["sync"].is_string() { "sync".into() } else { "async".into() });
        }
        let rounds_log = v["rounds_log"].clone();
        let mut stage_sum: BTreeMap<String, f64> = BTreeMap::new();
        let n_rounds = rounds_log.as_array().map_or(0, Vec::len);
        // A worker's round digests are those of the parameters it trained from.
        let worker = v["role"].as_str() == Some("worker");
        for r in rounds_log.as_array().into_iter().flatten() {
            if let (Some(round), Some(d), false) = (r["round"].as_u64(), r["digest"].as_str(), worker) {
                digests_by_round.entry(round).or_default().push(d.to_string());
            }
            if let Some(st) = r["stages"].as_object() {
                for (k, s) in st {
                    *stage_sum.entry(k.clone()).or_default() += s.as_f64().unwrap_or(0.0);
                }
            }
        }
        let mean_stage_seconds = stage_sum.into_iter().map(|(k, s)| (k, s / n_rounds.max(1) as f64)).collect();
        summaries.push(PeerSummary {
            index: i,
            role: v["role"].as_str().unwrap_or_default().to_string(),
            peer_id: v["peer_id"].as_str().unwrap_or_default().to_string(),
            exit_code,
            final_digest: v["final_digest"].as_str().unwrap_or_default().to_string(),
            rounds: u(&v, "rounds"),
            epochs: u(&v, "epochs"),
            final_test_accuracy: v["final_test_accuracy"].as_f64().unwrap_or(0.0),
            bytes_sent: u(&v, "gossip_bytes_sent") + u(&v, "fetch_bytes_sent"),
            bytes_received: u(&v, "gossip_bytes_received") + u(&v, "fetch_bytes_received"),
            gradient_bytes_sent: u(&v, "gradient_bytes_sent"),
            invalid_messages: u(&v, "invalid_messages"),
            mean_stage_seconds,
            rounds_log,
            epochs_log: v["epochs_log"].clone(),
            peer_scores: v["peer_scores"].clone(),
            function_tier: v["function_tier"].clone(),
            cost: v["cost"].clone(),
            peak_rss_mb: v["peak_rss_mb"].as_f64(),
        });
    }
    let mut rogue_summaries = Vec::new();
    for i in peers..peers + rogues {
        let exit_code: Option<i32> = exits.get(i).copied().flatten().flatten();
        let path = out.join("nodes").join(format!("n{i}")).join("report.json");
        let v: Value = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
        let peer_id = v["peer_id"].as_str().unwrap_or_default().to_string();
        let scores_at_peers = summaries
            .iter()
            .filter_map(|p| p.peer_scores.get(&peer_id).map(|s| (p.index, s.clone())))
            .collect();
        rogue_summaries.push(RogueSummary {
            index: i,
            peer_id,
            exit_code,
            kind: rogue_kind.into(),
            garbage_sent: u(&v, "garbage_sent"),
            scores_at_peers,
        });
    }
    // Peer id -> node index: the ids the nodes printed, and those in their reports.
    let mut index_of: BTreeMap<String, usize> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate().filter(|(_, id)| !id.is_empty()) {
        index_of.insert(id.clone(), i);
    }
    for (i, id) in summaries.iter().map(|p| (p.index, &p.peer_id)).chain(rogue_summaries.iter().map(|g| (g.index, &g.peer_id))) {
        if !id.is_empty() {
            index_of.insert(id.clone(), i);
        }
    }
    let (deadline_rounds, withholding_demotions, unadmitted_peers) = admission_summary(&admission, &index_of);
    for d in &withholding_demotions {
        problems.push(format!(
            "{} was demoted for withholding its gradient (by {}, first in round {})",
            label(&d.peer, d.index, peers),
            indices(&d.by),
            d.first_round
        ));
    }
    for g in &unadmitted_peers {
        problems.push(format!(
            "{} sent heartbeats but was never admitted (no accepted Hello; up to {} heartbeats ignored by {})",
            label(&g.peer, g.index, peers),
            g.heartbeats,
            indices(&g.seen_by)
        ));
    }
    // Asynchronous runs are not expected to agree bit for bit.
    let sync = first_spec_sync.as_deref() != Some("async");
    let with_digests = summaries.iter().filter(|s| s.role != "worker").count();
    let common: Vec<(&u64, &Vec<String>)> = digests_by_round.iter().filter(|(_, d)| d.len() == with_digests).collect();
    let equal = common.iter().filter(|(_, d)| d.windows(2).all(|w| w[0] == w[1])).count() as u64;
    // A run cut short has no final digests to compare: its cause is the problem.
    if sync && equal < common.len() as u64 && !cut_short {
        problems.push(format!("digests differ in {} of {} rounds", common.len() as u64 - equal, common.len()));
    }
    let all_final_equal = !summaries.is_empty() && summaries.windows(2).all(|w| w[0].final_digest == w[1].final_digest);
    if sync && !all_final_equal && !cut_short {
        problems.push("final parameter digests differ".into());
    }
    let expected = peers - down_at_end.iter().filter(|d| **d).count();
    if summaries.len() < expected && !cut_short {
        problems.push(format!("{} of {expected} peers reported", summaries.len()));
    }
    // The node that evaluated the most epochs (a restarted peer evaluated fewer; a worker none).
    let accuracy_by_epoch = summaries
        .iter()
        .max_by_key(|s| (s.epochs_log.as_array().map_or(0, Vec::len), std::cmp::Reverse(s.index)))
        .and_then(|s| s.epochs_log.as_array())
        .map(|es| es.iter().filter_map(|e| e["test_accuracy"].as_f64()).collect())
        .unwrap_or_default();
    Ok(Report {
        ok: problems.is_empty(),
        sync: if sync { "sync".into() } else { "async".into() },
        peers,
        node_args: args.to_vec(),
        wall_seconds: wall.as_secs_f64(),
        common_rounds: common.len() as u64,
        rounds_with_equal_digests: equal,
        all_final_digests_equal: all_final_equal,
        accuracy_by_epoch,
        problems,
        cost_table: summaries
            .iter()
            .map(|p| {
                let mut row = p.cost.clone();
                row["peer"] = p.index.into();
                row
            })
            .collect(),
        function_tier: host_stats.map(|(host, store_at_end)| {
            let sum = |k: &str| summaries.iter().map(|p| p.function_tier[k].as_u64().unwrap_or(0)).sum();
            let mut tasks_local = BTreeMap::new();
            for p in &summaries {
                for (cause, n) in p.function_tier["tasks_local"].as_object().into_iter().flatten() {
                    *tasks_local.entry(cause.clone()).or_insert(0) += n.as_u64().unwrap_or(0);
                }
            }
            TierSummary {
                tasks_planned: sum("tasks_planned"),
                tasks_ok: sum("tasks_ok"),
                tasks_ok_after_retry: sum("tasks_ok_after_retry"),
                tasks_local,
                reuploads: sum("reuploads"),
                params_uploads: sum("params_uploads"),
                breaker_opens: sum("breaker_opens"),
                objects_deleted: sum("objects_deleted"),
                store_at_end,
                cold_starts: host["cold_starts"].as_u64().unwrap_or(0),
                host,
                invocations: sum("invocations"),
                retries: sum("retries"),
                timeouts: sum("timeouts"),
                backups: sum("backups"),
                fallbacks: sum("fallbacks"),
            }
        }),
        peer_reports: summaries,
        rogues: rogue_summaries,
        down_at_end: down_at_end.iter().enumerate().filter(|(_, d)| **d).map(|(i, _)| i).collect(),
        faults: Vec::new(),
        role: String::new(),
        progress: Vec::new(),
        accuracy_timeline: Vec::new(),
        stalled_seconds: 0.0,
        interrupted: false,
        cut_short,
        deadline_rounds,
        withholding_demotions,
        unadmitted_peers,
        scale: Default::default(),
    })
}

/// `peer 3 (12D3…)`, `rogue 4 (12D3…)`, or the bare id of a node not ours.
fn label(id: &str, index: Option<usize>, peers: usize) -> String {
    match index {
        Some(i) if i >= peers => format!("rogue {i} ({id})"),
        Some(i) => format!("peer {i} ({id})"),
        None => format!("peer {id}"),
    }
}

fn indices(v: &[usize]) -> String {
    let s: Vec<String> = v.iter().map(usize::to_string).collect();
    format!("peer{} {}", if v.len() == 1 { "" } else { "s" }, s.join(", "))
}

/// The peers' `deadline_rounds`, `withholding_demotions` and `unadmitted` fields
/// (absent in older reports: empty), merged over the peers.
fn admission_summary(reports: &[(usize, Value)], index_of: &BTreeMap<String, usize>) -> (Vec<u64>, Vec<Demotion>, Vec<UnadmittedPeer>) {
    let list = |v: &Value, k: &str| v[k].as_array().cloned().unwrap_or_default();
    let mut rounds = std::collections::BTreeSet::new();
    let mut demotions: BTreeMap<String, Demotion> = BTreeMap::new();
    let mut unadmitted: BTreeMap<String, UnadmittedPeer> = BTreeMap::new();
    for (i, v) in reports {
        rounds.extend(list(v, "deadline_rounds").iter().filter_map(Value::as_u64));
        for d in list(v, "withholding_demotions") {
            let Some(peer) = d["peer"].as_str() else { continue };
            let (round, epoch) = (u(&d, "round"), u(&d, "epoch"));
            let e = demotions.entry(peer.to_string()).or_insert_with(|| Demotion {
                peer: peer.to_string(),
                index: index_of.get(peer).copied(),
                by: Vec::new(),
                first_round: round,
                epoch,
            });
            if !e.by.contains(i) {
                e.by.push(*i);
            }
            if round < e.first_round {
                (e.first_round, e.epoch) = (round, epoch);
            }
        }
        for g in list(v, "unadmitted") {
            let Some(peer) = g["peer"].as_str() else { continue };
            let e = unadmitted.entry(peer.to_string()).or_insert_with(|| UnadmittedPeer {
                peer: peer.to_string(),
                index: index_of.get(peer).copied(),
                heartbeats: 0,
                seen_by: Vec::new(),
            });
            e.heartbeats = e.heartbeats.max(u(&g, "heartbeats"));
            if !e.seen_by.contains(i) {
                e.seen_by.push(*i);
            }
        }
    }
    (rounds.into_iter().collect(), demotions.into_values().collect(), unadmitted.into_values().collect())
}

/// Seconds without progress in a (seconds, rounds) timeline: each gap between
/// new rounds longer than twice the median gap counts, less one median gap.
pub(crate) fn stalled_seconds(progress: &[(f64, u64)]) -> f64 {
    let mut gaps: Vec<f64> = progress.windows(2).map(|w| w[1].0 - w[0].0).collect();
    if gaps.is_empty() {
        return 0.0;
    }
    let all = gaps.clone();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    all.iter().filter(|g| **g > 2.0 * median).map(|g| g - median).sum()
}

pub(crate) fn print_summary(r: &Report) {
    if r.peer_reports.is_empty() {
        println!("no node wrote a report");
    } else {
        println!("{:<5} {:<6} {:<54} {:>6} {:>7} {:>9} {:>12} {:>12}", "node", "role", "id", "rounds", "epochs", "test acc", "sent", "received");
    }
    for p in &r.peer_reports {
        println!(
            "{:<5} {:<6} {:<54} {:>6} {:>7} {:>8.2}% {:>12} {:>12}",
            p.index,
            p.role,
            p.peer_id,
            p.rounds,
            p.epochs,
            100.0 * p.final_test_accuracy,
            crate::units::human_bytes(p.bytes_sent),
            crate::units::human_bytes(p.bytes_received)
        );
    }
    let acc: Vec<String> = r.accuracy_by_epoch.iter().map(|a| format!("{:.2}%", 100.0 * a)).collect();
    if !acc.is_empty() {
        println!("accuracy by epoch: {}", acc.join(" -> "));
    }
    if r.cut_short {
        println!("the run was cut short: final digests not compared");
    } else {
        println!(
            "digests equal in {} of {} rounds; final digests {}",
            r.rounds_with_equal_digests,
            r.common_rounds,
            if r.all_final_digests_equal { "equal" } else { "DIFFER" }
        );
    }
    if !r.deadline_rounds.is_empty() {
        let shown: Vec<String> = r.deadline_rounds.iter().take(20).map(u64::to_string).collect();
        let more = if r.deadline_rounds.len() > 20 { format!(" and {} more", r.deadline_rounds.len() - 20) } else { String::new() };
        println!(
            "warning: {} round(s) closed on the straggler deadline without every member: {}{more}",
            r.deadline_rounds.len(),
            shown.join(", ")
        );
    }
    if !r.withholding_demotions.is_empty() {
        let d: Vec<String> = r
            .withholding_demotions
            .iter()
            .map(|d| format!("{} by {} from round {}", label(&d.peer, d.index, r.peers), indices(&d.by), d.first_round))
            .collect();
        println!("demoted for withholding: {}", d.join("; "));
    }
    if !r.unadmitted_peers.is_empty() {
        let g: Vec<String> =
            r.unadmitted_peers.iter().map(|g| format!("{} ({} heartbeats)", label(&g.peer, g.index, r.peers), g.heartbeats)).collect();
        println!("heartbeats without admission: {}", g.join("; "));
    }
    if !r.faults.is_empty() {
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        println!(
            "{:<8} {:<34} {:>11} {:>9} {:>8} {:>7} {:>9} {:>13} {:>10}",
            "at s", "event", "detect s", "(last)", "stall s", "rounds", "rejoin s", "digest ok s", "in step s"
        );
        for e in &r.faults {
            println!(
                "{:<8.1} {:<34} {:>11} {:>9} {:>8} {:>7} {:>9} {:>13} {:>10}",
                e.at_s,
                e.spec,
                f(e.detection_s),
                f(e.detection_last_s),
                f(e.stalled_s),
                e.rounds_stalled.map_or("-".into(), |v| v.to_string()),
                f(e.rejoin_s),
                f(e.digest_match_s),
                f(e.in_step_s)
            );
        }
    }
    if let Some(t) = &r.function_tier {
        println!(
            "function tier: {} tasks: {} in the tier ({} after retries), {} computed locally {:?}; {} invocations, {} retries, {} timeouts, {} backups, {} cold starts, {} re-uploads, {} breaker openings; store at the end: {} objects",
            t.tasks_planned, t.tasks_ok + t.tasks_ok_after_retry, t.tasks_ok_after_retry, t.fallbacks, t.tasks_local,
            t.invocations, t.retries, t.timeouts, t.backups, t.cold_starts, t.reuploads, t.breaker_opens,
            t.store_at_end["objects"].as_u64().unwrap_or(0)
        );
    }
    if !r.cost_table.is_empty() {
        println!("{:<5} {:<8} {:>9} {:>9} {:>11} {:>12} {:>12} {:>12} {:>12}", "peer", "executor", "wall s", "requests", "GB-s", "lambda $", "instance $", "total $", "paper $");
        for c in &r.cost_table {
            let f = |k: &str| c[k].as_f64().unwrap_or(0.0);
            println!(
                "{:<5} {:<8} {:>9.1} {:>9} {:>11.3} {:>12.6} {:>12.6} {:>12.6} {:>12.6}",
                c["peer"].as_u64().unwrap_or(0),
                c["executor"].as_str().unwrap_or("?"),
                f("wall_seconds"),
                c["requests"].as_u64().unwrap_or(0),
                f("gb_seconds"),
                f("lambda_usd"),
                f("instance_usd"),
                f("total_usd"),
                f("paper_formula_usd")
            );
        }
    }
    for g in &r.rogues {
        let scores: Vec<String> =
            g.scores_at_peers.iter().map(|(i, s)| format!("peer {i}: {:.1}", s["min"].as_f64().unwrap_or(0.0))).collect();
        let what = match g.kind.as_str() {
            "heartbeat" => "sent heartbeats without a Hello".to_string(),
            _ => format!("sent {} invalid messages", g.garbage_sent),
        };
        println!("rogue {} {what}; lowest score given: {}", g.index, if scores.is_empty() { "none".to_string() } else { scores.join(", ") });
    }
    for p in &r.problems {
        println!("problem: {p}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(id: &str, extra: Value) -> Value {
        let mut v = json!({
            "role": "peer", "peer_id": id, "final_digest": "d", "rounds": 3, "epochs": 1,
            "spec": { "sync": "Sync" },
            "rounds_log": [{ "round": 0, "digest": "a" }, { "round": 1, "digest": "b" }],
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn withholding_and_unadmitted_peers_are_problems_deadline_rounds_are_not() {
        let out = std::env::temp_dir().join(format!("testnet-report-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let reports = [
            node("A", json!({ "deadline_rounds": [5, 3], "withholding_demotions": [{ "peer": "C", "round": 7, "epoch": 1 }],
                              "unadmitted": [{ "peer": "R", "heartbeats": 4 }] })),
            node("B", json!({ "deadline_rounds": [3, 4], "withholding_demotions": [{ "peer": "C", "round": 6, "epoch": 1 }],
                              "unadmitted": [{ "peer": "R", "heartbeats": 9 }, { "peer": "X", "heartbeats": 1 }] })),
            // An older report: none of the fields.
            node("C", json!({})),
        ];
        for (i, r) in reports.iter().enumerate() {
            let d = out.join("nodes").join(format!("n{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("report.json"), r.to_string()).unwrap();
        }
        let ids: Vec<String> = ["A", "B", "C", "R"].map(String::from).to_vec();
        let exits = vec![Some(Some(0)); 4];
        let r = collect(&out, 3, 1, &[], Duration::from_secs(1), &exits, &[false; 3], None, None, &ids, "heartbeat", false).unwrap();
        assert_eq!(r.deadline_rounds, vec![3, 4, 5]);
        assert_eq!(r.withholding_demotions, vec![Demotion { peer: "C".into(), index: Some(2), by: vec![0, 1], first_round: 6, epoch: 1 }]);
        assert_eq!(r.unadmitted_peers.len(), 2);
        assert_eq!(r.unadmitted_peers[0], UnadmittedPeer { peer: "R".into(), index: Some(3), heartbeats: 9, seen_by: vec![0, 1] });
        assert_eq!(r.unadmitted_peers[1].index, None);
        assert!(!r.ok);
        assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
        assert!(r.problems[0].starts_with("peer 2 (C) was demoted for withholding"), "{:?}", r.problems);
        assert!(r.problems[1].starts_with("rogue 3 (R) sent heartbeats"), "{:?}", r.problems);
        assert_eq!(r.rogues[0].kind, "heartbeat");
        // Deadline closures alone: a warning, not a problem.
        let only_deadline = node("A", json!({ "deadline_rounds": [2] }));
        for i in 0..3 {
            std::fs::write(out.join("nodes").join(format!("n{i}")).join("report.json"), only_deadline.to_string()).unwrap();
        }
        let r = collect(&out, 3, 0, &[], Duration::from_secs(1), &exits, &[false; 3], None, None, &ids, "garbage", false).unwrap();
        assert!(r.ok, "{:?}", r.problems);
        assert_eq!(r.deadline_rounds, vec![2]);
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn the_error_line_is_the_one_that_says_error() {
        let p = std::env::temp_dir().join(format!("testnet-errline-{}", std::process::id()));
        std::fs::write(&p, "error: an earlier life\nerror: unexpected argument '--x' found\n\n  tip: ...\n\nFor more information, try '--help'.\n").unwrap();
        assert_eq!(error_line(&p, 0), "error: an earlier life");
        let from = "error: an earlier life\n".len() as u64;
        assert_eq!(error_line(&p, from), "error: unexpected argument '--x' found");
        std::fs::write(&p, "\n  thread panicked somewhere\nmore\n").unwrap();
        assert_eq!(error_line(&p, 0), "thread panicked somewhere");
        let _ = std::fs::remove_file(&p);
    }
}

//! What a node reports: the JSON report written at the end of a run and the
//! records it is made of (rounds, epochs, membership, checkpoints, admission).

use crate::config::P2pConfig;
use crate::exec;
use crate::net::Traffic;
use anyhow::Context;
use libp2p::PeerId;
use p2pml_proto::line::{Line, MemberEvent};
use p2pml_proto::wire::{Digest, RunSpec};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Wall-clock seconds spent in each stage of one round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageTimes {
    /// Gradient time: local computation, or the function tier's whole phase
    /// (parameter upload, invocations, output download, local fallbacks).
    pub compute: f64,
    /// Function tier only: putting the round's parameters in the object store (part of compute).
    pub upload: f64,
    pub encode: f64,
    pub send: f64,
    pub barrier_wait: f64,
    pub decode: f64,
    pub aggregate: f64,
    pub update: f64,
}

/// One completed round as this peer saw it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRecord {
    pub round: u64,
    pub epoch: u64,
    pub contributors: usize,
    pub samples: u64,
    pub train_loss: f64,
    pub lr: f64,
    pub digest: String,
    pub finished_at: f64,
    /// When the round finished (Unix ms): testnet lines it up with its fault events.
    pub unix_ms: u64,
    pub stages: StageTimes,
    /// When this peer published its announcement of the round (Unix ms; None
    /// when it did not contribute): testnet's critical-path exchange latency
    /// runs from the last contributor's announcement to each peer's `unix_ms`.
    pub announced_unix_ms: Option<u64>,
    /// Payload bytes this node sent and received (gossip and request-response)
    /// since the previous round finished.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A change of the membership as this node saw it.
#[derive(Clone, Debug, Serialize)]
pub struct MembershipEvent {
    pub unix_ms: u64,
    pub peer: String,
    /// joined, rejoined, died, or refuted (somebody declared this node dead).
    pub event: String,
    pub incarnation: u64,
}

/// Checkpoints written and restored by this start of the node.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckpointStats {
    pub written: u64,
    /// Not written because the previous write was still in progress.
    pub skipped_busy: u64,
    pub failed: u64,
    pub last_round: Option<u64>,
    pub last_bytes: u64,
    /// The checkpoints' size on disk after the last write (records and index).
    pub disk_bytes: u64,
    pub write_secs_mean: f64,
    pub write_secs_max: f64,
    /// The checkpoint this start resumed from, how long loading it took, and the
    /// newer ones that failed verification (round, why).
    pub restored_round: Option<u64>,
    pub restore_secs: Option<f64>,
    pub restore_skipped: Vec<(u64, String)>,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Debug, Serialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub lr: f64,
}

/// The node's report, written as JSON at the end of the run.
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    /// "peer", or "rogue" for a --fault-garbage node that only sends invalid messages.
    pub role: String,
    pub peer_id: String,
    pub run_id: String,
    pub spec: RunSpec,
    pub device: String,
    pub threads: i32,
    pub rounds: u64,
    pub epochs: u64,
    pub final_digest: String,
    pub final_test_accuracy: f64,
    pub final_test_loss: f64,
    pub stopped_early: bool,
    pub gossip_bytes_sent: u64,
    pub gossip_bytes_received: u64,
    pub fetch_bytes_sent: u64,
    pub fetch_bytes_received: u64,
    pub gradient_bytes_sent: u64,
    pub invalid_messages: u64,
    pub digest_mismatches: u64,
    pub state_syncs: u64,
    pub wall_seconds: f64,
    pub rounds_log: Vec<RoundRecord>,
    pub epochs_log: Vec<EpochRecord>,
    /// This node's gossipsub score of each peer it was connected to.
    pub peer_scores: BTreeMap<String, ScoreSeen>,
    /// Rogue only: invalid messages published.
    pub garbage_sent: u64,
    /// `--executor lambda`: invocations, retries, backups, fallbacks, stage sums.
    pub function_tier: Option<exec::ExecStats>,
    /// This peer's cost: measured billing and the paper's formula.
    pub cost: exec::CostRow,
    /// This start's incarnation (1 at the first start of the state directory).
    pub incarnation: u64,
    pub started_unix_ms: u64,
    /// The process's peak resident memory (VmHWM) when the report was written.
    pub peak_rss_mb: Option<f64>,
    /// When this node first held the run's state (founded, resumed or synced).
    pub ready_unix_ms: Option<u64>,
    /// State syncs that caught up with peers more than a round ahead.
    pub catch_ups: u64,
    pub membership_log: Vec<MembershipEvent>,
    pub checkpoints: CheckpointStats,
    /// Worker (parameter-server mode): seconds spent retrying an unreachable server.
    pub server_unreachable_seconds: f64,
    /// Who counted, and who did not: deadline closures, withholding demotions,
    /// heartbeats of peers never admitted.
    #[serde(flatten)]
    pub admission: AdmissionReport,
}

/// What the straggler deadline and admission did in a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AdmissionReport {
    /// Rounds this node closed on the straggler deadline, without every expected member.
    pub deadline_rounds: Vec<u64>,
    /// Members this node demoted for missing rounds in a row.
    pub withholding_demotions: Vec<WithholdingDemotion>,
    /// Peers that sent heartbeats but never completed an accepted Hello with this node.
    pub unadmitted: Vec<Unadmitted>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WithholdingDemotion {
    pub peer: String,
    pub round: u64,
    pub epoch: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Unadmitted {
    pub peer: String,
    /// Heartbeats ignored.
    pub heartbeats: u64,
}

/// How this node scored a peer (gossipsub's peer score), sampled every heartbeat.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct ScoreSeen {
    pub min: f64,
    pub last: f64,
}

pub(crate) fn report_path(p2p: &P2pConfig) -> std::path::PathBuf {
    p2p.report.clone().unwrap_or_else(|| p2p.state_dir.join("report.json"))
}


/// What a role knows at its end; everything common to all roles is in [`ReportBuilder`].
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) rounds: u64,
    pub(crate) final_digest: String,
    pub(crate) stopped_early: bool,
    pub(crate) gradient_bytes_sent: u64,
    /// Invalid inputs the role counted itself (the server's refused pushes), on
    /// top of the network's invalid messages.
    pub(crate) invalid_inputs: u64,
    pub(crate) digest_mismatches: u64,
    pub(crate) state_syncs: u64,
    pub(crate) rounds_log: Vec<RoundRecord>,
    pub(crate) epochs_log: Vec<EpochRecord>,
    pub(crate) peer_scores: BTreeMap<String, ScoreSeen>,
    pub(crate) garbage_sent: u64,
    pub(crate) function_tier: Option<exec::ExecStats>,
    pub(crate) ready_unix_ms: Option<u64>,
    pub(crate) catch_ups: u64,
    pub(crate) membership_log: Vec<MembershipEvent>,
    pub(crate) checkpoints: CheckpointStats,
    pub(crate) server_unreachable_seconds: f64,
    pub(crate) admission: AdmissionReport,
}

/// The part of a node's report fixed at start (who, which run, where) and the
/// traffic counters read at the end: the one place a [`NodeReport`] is made.
pub(crate) struct ReportBuilder {
    pub(crate) role: &'static str,
    pub(crate) peer_id: String,
    pub(crate) spec: RunSpec,
    pub(crate) device: String,
    pub(crate) traffic: Arc<Traffic>,
    pub(crate) incarnation: u64,
    pub(crate) started_unix_ms: u64,
    pub(crate) exec: exec::ExecConfig,
    pub(crate) batches_per_round: usize,
}

impl ReportBuilder {
    pub(crate) fn build(&self, wall_seconds: f64, o: Outcome) -> NodeReport {
        let tr = &self.traffic;
        let final_eval = o.epochs_log.last().map(|e| (e.test_accuracy, e.test_loss)).unwrap_or((0.0, 0.0));
        let stats = o.function_tier.clone().unwrap_or_default();
        NodeReport {
            role: self.role.into(),
            peer_id: self.peer_id.clone(),
            run_id: self.spec.run_id(),
            spec: self.spec.clone(),
            device: self.device.clone(),
            threads: tch::get_num_threads(),
            rounds: o.rounds,
            epochs: o.epochs_log.len() as u64,
            final_digest: o.final_digest,
            final_test_accuracy: final_eval.0,
            final_test_loss: final_eval.1,
            stopped_early: o.stopped_early,
            gossip_bytes_sent: tr.gossip_bytes_sent.load(Ordering::Relaxed),
            gossip_bytes_received: tr.gossip_bytes_received.load(Ordering::Relaxed),
            fetch_bytes_sent: tr.rr_bytes_sent.load(Ordering::Relaxed),
            fetch_bytes_received: tr.rr_bytes_received.load(Ordering::Relaxed),
            gradient_bytes_sent: o.gradient_bytes_sent,
            invalid_messages: tr.invalid_messages.load(Ordering::Relaxed) + o.invalid_inputs,
            digest_mismatches: o.digest_mismatches,
            state_syncs: o.state_syncs,
            wall_seconds,
            rounds_log: o.rounds_log,
            epochs_log: o.epochs_log,
            peer_scores: o.peer_scores,
            garbage_sent: o.garbage_sent,
            function_tier: o.function_tier,
            cost: exec::cost(&self.exec, &stats, wall_seconds, self.batches_per_round),
            incarnation: self.incarnation,
            peak_rss_mb: peak_rss_mb(),
            started_unix_ms: self.started_unix_ms,
            ready_unix_ms: o.ready_unix_ms,
            catch_ups: o.catch_ups,
            membership_log: o.membership_log,
            checkpoints: o.checkpoints,
            server_unreachable_seconds: o.server_unreachable_seconds,
            admission: o.admission,
        }
    }
}

/// Writes the report (atomically) where --report says, and prints the done line.
pub(crate) fn write_report(p2p: &P2pConfig, report: &NodeReport) -> anyhow::Result<()> {
    let path = report_path(p2p);
    crate::fsutil::write_atomic(&path, serde_json::to_string_pretty(report)?.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    let report_s = path.display().to_string();
    let line = match report.role.as_str() {
        "rogue" => Line::DoneRogue { garbage_sent: report.garbage_sent, report: report_s },
        _ => Line::Done {
            rounds: report.rounds,
            test_acc_pct: 100.0 * report.final_test_accuracy,
            digest: report.final_digest.get(..16).unwrap_or("").to_string(),
            report: report_s,
        },
    };
    println!("{line}");
    Ok(())
}

/// The membership changes a node saw: printed (testnet times failure detection
/// by these lines), counted in the metrics, kept for the report.
#[derive(Default)]
pub(crate) struct MembershipLog {
    pub(crate) events: Vec<MembershipEvent>,
}

impl MembershipLog {
    pub(crate) fn record(&mut self, peer: &PeerId, event: MemberEvent, incarnation: u64) {
        println!("{}", Line::Member { event, peer: peer.to_string(), incarnation });
        crate::metrics::membership_event(event.as_str());
        self.events.push(MembershipEvent { unix_ms: unix_ms(), peer: peer.to_string(), event: event.as_str().into(), incarnation });
    }
}

/// The rounds and epochs a node finished, as it prints, meters and reports them.
pub(crate) struct Progress {
    pub(crate) rounds: Vec<RoundRecord>,
    pub(crate) epochs: Vec<EpochRecord>,
    /// Since the node held the run's state.
    pub(crate) wall: Instant,
    /// The node's traffic counters, and their totals (sent, received) at the last round.
    traffic: Option<Arc<crate::net::Traffic>>,
    last_traffic: (u64, u64),
    /// When the announcement of the round in progress was published.
    pub(crate) announced_unix_ms: Option<u64>,
}

/// One finished round, as every role that updates parameters reports it.
#[derive(Debug)]
pub(crate) struct RoundDone {
    pub(crate) round: u64,
    pub(crate) epoch: u64,
    pub(crate) contributors: usize,
    pub(crate) samples: u64,
    pub(crate) loss_total: f64,
    pub(crate) lr: f64,
    pub(crate) digest: Digest,
    pub(crate) stages: StageTimes,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress { rounds: Vec::new(), epochs: Vec::new(), wall: Instant::now(), traffic: None, last_traffic: (0, 0), announced_unix_ms: None }
    }

    /// Rounds record the traffic of `t` since the round before.
    pub(crate) fn with_traffic(t: Arc<crate::net::Traffic>) -> Self {
        let mut p = Progress::new();
        p.last_traffic = traffic_totals(&t);
        p.traffic = Some(t);
        p
    }

    pub(crate) fn wall_secs(&self) -> f64 {
        self.wall.elapsed().as_secs_f64()
    }

    /// The round line (testnet reads it), the metrics and the round's record.
    pub(crate) fn round(&mut self, r: RoundDone) {
        let train_loss = r.loss_total / r.samples.max(1) as f64;
        let digest = crate::train::hex(&r.digest);
        println!(
            "{}",
            Line::Round {
                round: r.round,
                epoch: r.epoch + 1,
                contributors: r.contributors,
                samples: r.samples,
                loss: train_loss,
                lr: r.lr,
                barrier_ms: r.stages.barrier_wait * 1000.0,
                digest: digest[..16].to_string(),
            }
        );
        crate::metrics::record_round(r.round, r.epoch, r.contributors, r.samples, &r.stages, train_loss, r.lr);
        let (mut bytes_sent, mut bytes_received) = (0, 0);
        if let Some(t) = &self.traffic {
            let now = traffic_totals(t);
            (bytes_sent, bytes_received) = (now.0.saturating_sub(self.last_traffic.0), now.1.saturating_sub(self.last_traffic.1));
            self.last_traffic = now;
        }
        self.rounds.push(RoundRecord {
            announced_unix_ms: self.announced_unix_ms.take(),
            bytes_sent,
            bytes_received,
            round: r.round,
            epoch: r.epoch,
            contributors: r.contributors,
            samples: r.samples,
            train_loss,
            lr: r.lr,
            digest,
            finished_at: self.wall_secs(),
            unix_ms: unix_ms(),
            stages: r.stages,
        });
    }

    /// An epoch's test evaluation: the epoch line, the metrics and the record
    /// (its validation figures, when this node has them).
    pub(crate) fn epoch(&mut self, epoch: u64, test: &p2pml_lambda_grad::Evaluation, val: Option<&p2pml_lambda_grad::Evaluation>, lr: f64) {
        println!("{}", Line::Epoch { epoch: epoch + 1, test_acc_pct: 100.0 * test.accuracy, test_loss: test.loss });
        crate::metrics::record_epoch(test.accuracy, test.loss);
        self.epochs.push(EpochRecord {
            epoch: epoch + 1,
            val_loss: val.map(|v| v.loss),
            val_accuracy: val.map(|v| v.accuracy),
            test_accuracy: test.accuracy,
            test_loss: test.loss,
            lr,
        });
    }
}

/// Payload bytes (sent, received) so far, gossip and request-response together.
fn traffic_totals(t: &crate::net::Traffic) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (t.gossip_bytes_sent.load(Relaxed) + t.rr_bytes_sent.load(Relaxed), t.gossip_bytes_received.load(Relaxed) + t.rr_bytes_received.load(Relaxed))
}

/// This process's peak resident set (VmHWM), in MB (None where /proc has no such line).
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

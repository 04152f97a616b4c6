//! What a node reports: the JSON report written at the end of a run and the
//! records it is made of (rounds, epochs, membership, checkpoints, admission).

use crate::config::P2pConfig;
use crate::exec::{self};
use p2pml_proto::wire::RunSpec;
use serde::Serialize;
use std::collections::BTreeMap;

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


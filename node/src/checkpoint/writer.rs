//! The checkpoint writer thread: a round never waits for the disk.

use crate::checkpoint::{CheckpointMeta, Checkpoints, MemberRecord};
use crate::report::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Writes checkpoints on a thread of its own, one at a time: a round never waits
/// for the disk; when the previous write is still going, this one is skipped.
pub(crate) struct CheckpointWriter {
    tx: Option<std::sync::mpsc::SyncSender<(CheckpointMeta, Arc<Vec<u8>>)>>,
    stats: Arc<Mutex<CheckpointStats>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CheckpointWriter {
    pub(crate) fn start(ckpt: Arc<Checkpoints>, stall: Option<(u64, u64)>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(CheckpointMeta, Arc<Vec<u8>>)>(0);
        let stats = Arc::new(Mutex::new(CheckpointStats::default()));
        let st = stats.clone();
        let thread = std::thread::spawn(move || {
            let mut total = 0.0;
            while let Ok((meta, state)) = rx.recv() {
                let hold = stall.filter(|(r, _)| *r == meta.round).map(|(_, ms)| Duration::from_millis(ms));
                let r = ckpt.write(&meta, &state, hold);
                let mut s = st.lock().expect("stats lock");
                match r {
                    Ok(w) => {
                        let secs = w.encode_secs + w.write_secs;
                        s.written += 1;
                        total += secs;
                        s.write_secs_mean = total / s.written as f64;
                        s.write_secs_max = s.write_secs_max.max(secs);
                        s.last_round = Some(meta.round);
                        s.last_bytes = w.bytes;
                        s.disk_bytes = ckpt.disk_bytes();
                        crate::metrics::stage("checkpoint", secs);
                        tracing::debug!("checkpoint round {} written: {} bytes in {:.3} s", meta.round, w.bytes, secs);
                    }
                    Err(e) => {
                        s.failed += 1;
                        tracing::warn!("checkpoint of round {} failed: {e}", meta.round);
                    }
                }
            }
        });
        CheckpointWriter { tx: Some(tx), stats, thread: Some(thread) }
    }

    pub(crate) fn submit(&self, meta: CheckpointMeta, state: Arc<Vec<u8>>) {
        if let Some(tx) = &self.tx {
            if let Err(std::sync::mpsc::TrySendError::Full(_)) = tx.try_send((meta, state)) {
                self.stats.lock().expect("stats lock").skipped_busy += 1;
            }
        }
    }

    /// Waits for the write in progress; the stats, with the restore's.
    pub(crate) fn finish(mut self, restore: CheckpointStats) -> CheckpointStats {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let s = self.stats.lock().expect("stats lock").clone();
        CheckpointStats { restored_round: restore.restored_round, restore_secs: restore.restore_secs, restore_skipped: restore.restore_skipped, ..s }
    }
}


impl CheckpointMeta {
    /// The metadata of a checkpoint after `round`: the membership as `rs`
    /// holds it, with each member's last known addresses (`addrs`). The time
    /// it is written at is the writer's to stamp (`written_unix_ms` is 0).
    pub(crate) fn of(
        run_id: &str,
        round: u64,
        epoch: u64,
        rs: &crate::round::RoundState<libp2p::PeerId>,
        addrs: impl Fn(&libp2p::PeerId) -> Vec<String>,
    ) -> CheckpointMeta {
        CheckpointMeta {
            run_id: run_id.to_string(),
            round,
            epoch,
            incarnation: rs.incarnation(),
            written_unix_ms: 0,
            members: rs
                .members()
                .iter()
                .map(|(p, m)| MemberRecord { peer: p.to_bytes(), incarnation: m.incarnation, alive: m.alive, addrs: addrs(p) })
                .collect(),
        }
    }
}

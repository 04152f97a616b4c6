//! Checkpoints: a sled index in the node's state directory, the records beside it.
//!
//! One sled tree per run (`run/<run id>`), one key per checkpoint (the round,
//! big-endian, so that the newest sorts last), whose value is the length and
//! BLAKE3 hash of the record. The record itself is a file,
//! `checkpoints/<run id>/<round>.ckpt`: written to a temporary name, synced,
//! renamed and its directory synced, and only then entered in the index (one
//! insert and a flush). A node killed mid-write finds the new checkpoint
//! complete and indexed, or not indexed at all (a stray file is removed at the
//! next open). Every record also carries a BLAKE3 checksum of its contents,
//! checked on load: a record damaged on disk is reported and the one before it
//! is used. The last `keep` checkpoints are kept, files and index entries.
//!
//! Why not the records in sled itself: sled 0.34 keeps large values as blob
//! files that it does not delete when the value is removed or replaced (sled
//! issue 786), so a checkpoint every round filled the disk (2.9 GB per node in a
//! 200-round `cnn` run). The files are deleted with their index entries.
//!
//! Record: `PCK1`, BLAKE3 of the rest (32 bytes), the CBOR metadata's length
//! (u32 LE), the metadata, then the state blob of [`p2pml_proto::encode_state`]
//! (parameters, optimizer state, round, epoch, lr schedule and early-stopping
//! state, the epoch's schedule). The RNG state is a function of the run seed,
//! the round and the peer id (shuffles, dropout masks and stochastic rounding
//! are all seeded that way), so the round restores it.
//!
//! The same database keeps the node's incarnation: every start takes the next
//! one, so that a restarted node overrides its own death in the membership.

use p2pml_proto::{StateError, StateHeader};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

const MAGIC: &[u8; 4] = b"PCK1";
const INCARNATION_KEY: &[u8] = b"incarnation";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot open the checkpoint store {path}: {msg}; is another p2pml-node using this --state-dir?")]
    Open { path: PathBuf, msg: String },
    #[error("checkpoint store: {0}")]
    Store(#[from] sled::Error),
    #[error("checkpoint file {path}: {err}")]
    File { path: PathBuf, err: std::io::Error },
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |err| CheckpointError::File { path: path.to_path_buf(), err }
}

/// A membership entry as the checkpointing node saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    pub incarnation: u64,
    pub alive: bool,
    /// The addresses the peer last announced: a restarted node dials them, so
    /// it finds the swarm again even if its bootstrap peer is gone.
    #[serde(default)]
    pub addrs: Vec<String>,
}

/// What a checkpoint says besides the state blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub run_id: String,
    pub round: u64,
    pub epoch: u64,
    pub incarnation: u64,
    pub written_unix_ms: u64,
    /// The membership at the checkpoint.
    pub members: Vec<MemberRecord>,
}

/// A checkpoint that loaded and verified.
#[derive(Debug)]
pub struct Restored {
    pub meta: CheckpointMeta,
    pub header: StateHeader,
    pub params: Vec<f32>,
    pub opt: Vec<Vec<f32>>,
    /// The state blob itself (served to peers that state-sync from us).
    pub state: Vec<u8>,
    /// Newer checkpoints that failed verification: (round, why).
    pub skipped: Vec<(u64, String)>,
    pub load_secs: f64,
}

/// Time and size of one write.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct WriteStats {
    pub bytes: u64,
    /// Encoding and checksum.
    pub encode_secs: f64,
    /// Insert, flush to disk and pruning of old checkpoints.
    pub write_secs: f64,
}

pub struct Checkpoints {
    db: sled::Db,
    tree: sled::Tree,
    /// Where the records are.
    dir: PathBuf,
    keep: usize,
}

/// Index value: the record's length and BLAKE3 hash.
fn index_value(record: &[u8]) -> Vec<u8> {
    let mut v = (record.len() as u64).to_be_bytes().to_vec();
    v.extend_from_slice(blake3::hash(record).as_bytes());
    v
}

/// Encodes a checkpoint record.
pub fn encode_record(meta: &CheckpointMeta, state: &[u8]) -> Vec<u8> {
    let m = p2pml_proto::wire::encode(meta);
    // One buffer, one copy of the state; the checksum is filled in last.
    let mut out = Vec::with_capacity(40 + m.len() + state.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0u8; 32]);
    out.extend_from_slice(&(m.len() as u32).to_le_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(state);
    let sum = blake3::hash(&out[36..]);
    out[4..36].copy_from_slice(sum.as_bytes());
    out
}

/// Verifies and decodes a record of a model with `numel` parameters.
pub fn decode_record(bytes: &[u8], numel: u64) -> Result<Restored, String> {
    if bytes.len() < 40 || &bytes[..4] != MAGIC {
        return Err("not a checkpoint record (bad magic or too short)".into());
    }
    let rest = &bytes[36..];
    if blake3::hash(rest).as_bytes() != &bytes[4..36] {
        return Err("checksum mismatch (the record is damaged)".into());
    }
    let mlen = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let m = rest.get(4..4 + mlen).ok_or("metadata truncated")?;
    let meta: CheckpointMeta = p2pml_proto::wire::decode(m, 1 << 20).map_err(|e| format!("metadata: {e}"))?;
    let state = &rest[4 + mlen..];
    let (header, params, opt) = p2pml_proto::decode_state(state, numel).map_err(|e: StateError| format!("state: {e}"))?;
    if header.round != meta.round {
        return Err(format!("metadata says round {}, state says {}", meta.round, header.round));
    }
    Ok(Restored { meta, header, params, opt, state: state.to_vec(), skipped: Vec::new(), load_secs: 0.0 })
}

impl Checkpoints {
    /// Opens (or creates) the store in `dir` for run `run_id`, keeping `keep` checkpoints.
    pub fn open(dir: &Path, run_id: &str, keep: usize) -> Result<Self, CheckpointError> {
        let path = dir.join("checkpoints.sled");
        let db = sled::Config::new()
            .path(&path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| CheckpointError::Open { path: path.clone(), msg: e.to_string() })?;
        let tree = db.open_tree(format!("run/{run_id}"))?;
        // Run ids are hex digests; anything else cannot name a directory.
        let safe: String = run_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        let files = dir.join("checkpoints").join(safe);
        std::fs::create_dir_all(&files).map_err(file_err(&files))?;
        let c = Checkpoints { db, tree, dir: files, keep: keep.max(1) };
        c.remove_strays()?;
        Ok(c)
    }

    fn path(&self, round: u64) -> PathBuf {
        self.dir.join(format!("{round:020}.ckpt"))
    }

    /// Removes files the index does not name: a write cut short before it was
    /// indexed, or a prune cut short after the index entry went.
    fn remove_strays(&self) -> Result<(), CheckpointError> {
        let indexed: std::collections::HashSet<PathBuf> = self.rounds()?.into_iter().map(|r| self.path(r)).collect();
        for entry in std::fs::read_dir(&self.dir).map_err(file_err(&self.dir))? {
            let path = entry.map_err(file_err(&self.dir))?.path();
            if !indexed.contains(&path) {
                tracing::info!("removing {} (a checkpoint write or prune that did not finish)", path.display());
                std::fs::remove_file(&path).map_err(file_err(&path))?;
            }
        }
        Ok(())
    }

    /// Writes `bytes` to `path` durably and atomically (temporary file, sync,
    /// rename, directory sync).
    fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(file_err(&tmp))?;
        f.write_all(bytes).map_err(file_err(&tmp))?;
        f.sync_all().map_err(file_err(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(file_err(path))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(file_err(&self.dir))?;
        Ok(())
    }

    /// Takes this start's incarnation: one more than the last start's (1 at first).
    pub fn next_incarnation(&self) -> Result<u64, CheckpointError> {
        let next = self.stored_incarnation()? + 1;
        self.store_incarnation(next)?;
        Ok(next)
    }

    fn stored_incarnation(&self) -> Result<u64, CheckpointError> {
        Ok(self.db.get(INCARNATION_KEY)?.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)).unwrap_or(0))
    }

    fn store_incarnation(&self, incarnation: u64) -> Result<(), CheckpointError> {
        self.db.insert(INCARNATION_KEY, &incarnation.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Records that this start now runs at `incarnation` (a refuted rumour raised
    /// it), so that the next start takes a higher one.
    pub fn note_incarnation(&self, incarnation: u64) -> Result<(), CheckpointError> {
        if incarnation > self.stored_incarnation()? {
            self.store_incarnation(incarnation)?;
        }
        Ok(())
    }

    /// Writes a checkpoint durably, then drops all but the newest `keep`.
    pub fn write(&self, meta: &CheckpointMeta, state: &[u8], stall_before_flush: Option<std::time::Duration>) -> Result<WriteStats, CheckpointError> {
        let t0 = Instant::now();
        let record = encode_record(meta, state);
        let encode_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let path = self.path(meta.round);
        self.write_file(&path, &record)?;
        if let Some(d) = stall_before_flush {
            // Fault injection (--fault-checkpoint-stall): a window in which the
            // write is in progress, for the crash test to kill the node in.
            println!("checkpoint writing round {}", meta.round);
            std::thread::sleep(d);
        }
        self.tree.insert(meta.round.to_be_bytes(), index_value(&record))?;
        self.tree.flush()?;
        let rounds = self.rounds()?;
        if rounds.len() > self.keep {
            let old = &rounds[..rounds.len() - self.keep];
            for r in old {
                self.tree.remove(r.to_be_bytes())?;
            }
            self.tree.flush()?;
            for r in old {
                let p = self.path(*r);
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!("cannot remove the old checkpoint {}: {e}", p.display());
                }
            }
        }
        Ok(WriteStats { bytes: record.len() as u64, encode_secs, write_secs: t1.elapsed().as_secs_f64() })
    }

    /// Rounds with a checkpoint, oldest first.
    pub fn rounds(&self) -> Result<Vec<u64>, CheckpointError> {
        let mut out = Vec::new();
        for k in self.tree.iter().keys() {
            let k = k?;
            if let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) {
                out.push(u64::from_be_bytes(b));
            }
        }
        Ok(out)
    }

    /// The newest checkpoint that verifies; damaged newer ones are listed in `skipped`.
    pub fn latest(&self, numel: u64) -> Result<Option<Restored>, CheckpointError> {
        let t0 = Instant::now();
        let mut skipped = Vec::new();
        for kv in self.tree.iter().rev() {
            let (k, _) = kv?;
            let round = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes).unwrap_or(u64::MAX);
            let path = self.path(round);
            let record = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    skipped.push((round, format!("cannot read {}: {e}", path.display())));
                    continue;
                }
            };
            match decode_record(&record, numel) {
                Ok(mut r) => {
                    r.skipped = skipped;
                    r.load_secs = t0.elapsed().as_secs_f64();
                    return Ok(Some(r));
                }
                Err(e) => skipped.push((round, e)),
            }
        }
        if !skipped.is_empty() {
            tracing::warn!("no checkpoint verifies: {skipped:?}");
        }
        Ok(None)
    }

    /// Test and benchmark access: the raw record of `round`.
    pub fn raw(&self, round: u64) -> Result<Option<Vec<u8>>, CheckpointError> {
        if self.tree.get(round.to_be_bytes())?.is_none() {
            return Ok(None);
        }
        let p = self.path(round);
        std::fs::read(&p).map(Some).map_err(file_err(&p))
    }

    /// Test access: overwrites the record of `round` on disk (to simulate damage).
    pub fn put_raw(&self, round: u64, bytes: &[u8]) -> Result<(), CheckpointError> {
        let p = self.path(round);
        std::fs::write(&p, bytes).map_err(file_err(&p))
    }

    /// Bytes the checkpoints take on disk: the records and sled's files.
    pub fn disk_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            match std::fs::metadata(p) {
                Ok(m) if m.is_dir() => std::fs::read_dir(p).map_or(0, |d| d.flatten().map(|e| walk(&e.path())).sum()),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        let sled_dir = self.dir.parent().and_then(Path::parent).map(|d| d.join("checkpoints.sled"));
        walk(&self.dir) + sled_dir.map_or(0, |d| walk(&d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(round: u64, x: f32) -> (CheckpointMeta, Vec<u8>) {
        let h = StateHeader {
            round,
            epoch: round / 10,
            lr: 0.01,
            opt_steps: round + 1,
            numel: 4,
            opt_vectors: 1,
            plateau: (f64::INFINITY, 0),
            stopping: (0.5, 1),
            epoch_start: 0,
            epoch_members: vec![serde_bytes::ByteBuf::from(vec![7u8; 3])],
            active: vec![],
            next_members: vec![],
        };
        let meta = CheckpointMeta {
            run_id: "r".into(),
            round,
            epoch: h.epoch,
            incarnation: 1,
            written_unix_ms: 0,
            members: vec![MemberRecord { peer: vec![7u8; 3], incarnation: 1, alive: true, addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()] }],
        };
        (meta, p2pml_proto::encode_state(&h, &[x; 4], &[vec![x / 2.0; 4]]))
    }

    #[test]
    fn writes_keep_the_newest_and_load_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(dir.path(), "r", 3).unwrap();
        assert!(c.latest(4).unwrap().is_none());
        for r in 0..6 {
            let (m, s) = state(r, r as f32);
            let w = c.write(&m, &s, None).unwrap();
            assert!(w.bytes > s.len() as u64);
        }
        assert_eq!(c.rounds().unwrap(), vec![3, 4, 5]);
        // Only the kept records stay on disk.
        let files = std::fs::read_dir(dir.path().join("checkpoints/r")).unwrap().count();
        assert_eq!(files, 3);
        let l = c.latest(4).unwrap().unwrap();
        assert_eq!((l.meta.round, l.header.round, l.params.clone(), l.opt.clone()), (5, 5, vec![5.0; 4], vec![vec![2.5; 4]]));
        assert!(l.skipped.is_empty());
        drop(c);
        // Reopened (a restart): the same.
        let c = Checkpoints::open(dir.path(), "r", 3).unwrap();
        assert_eq!(c.latest(4).unwrap().unwrap().meta.round, 5);
        // Another run's tree is separate.
        assert!(Checkpoints::open(dir.path(), "other", 3).is_err(), "sled allows one opener");
        drop(c);
        // A write cut short before it was indexed leaves a stray file: removed at open.
        std::fs::write(dir.path().join("checkpoints/r/00000000000000000006.ckpt"), b"partial").unwrap();
        std::fs::write(dir.path().join("checkpoints/r/00000000000000000007.tmp"), b"partial").unwrap();
        let c = Checkpoints::open(dir.path(), "r", 3).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("checkpoints/r")).unwrap().count(), 3);
        assert_eq!(c.latest(4).unwrap().unwrap().meta.round, 5);
    }

    #[test]
    fn disk_use_stays_bounded_over_many_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(dir.path(), "r", 3).unwrap();
        let big = |r: u64| {
            let (m, _) = state(r, 0.0);
            let h = p2pml_proto::decode_state(&state(r, 0.0).1, 4).unwrap().0;
            let h = StateHeader { numel: 250_000, ..h };
            (m, p2pml_proto::encode_state(&h, &vec![r as f32; 250_000], &[vec![0.5; 250_000]]))
        };
        for r in 0..10 {
            let (m, s) = big(r);
            c.write(&m, &s, None).unwrap();
        }
        let after_10 = c.disk_bytes();
        for r in 10..60 {
            let (m, s) = big(r);
            c.write(&m, &s, None).unwrap();
        }
        let after_60 = c.disk_bytes();
        // Three 2 MB records and sled's small index: no growth with the count.
        assert!(after_60 < 8 << 20, "{after_60} bytes on disk after 60 checkpoints");
        assert!(after_60 <= after_10 + (1 << 20), "grew from {after_10} to {after_60} bytes");
    }

    #[test]
    fn a_damaged_or_partial_latest_checkpoint_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(dir.path(), "r", 5).unwrap();
        for r in 0..4 {
            let (m, s) = state(r, r as f32);
            c.write(&m, &s, None).unwrap();
        }
        let good = c.raw(3).unwrap().unwrap();
        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 3] ^= 0x40;
        c.put_raw(3, &flipped).unwrap();
        c.put_raw(2, &good[..good.len() / 2]).unwrap();
        let l = c.latest(4).unwrap().unwrap();
        assert_eq!(l.meta.round, 1);
        assert_eq!(l.skipped.len(), 2);
        assert!(l.skipped[0].1.contains("checksum"), "{:?}", l.skipped);
        // A record of another model size does not load either.
        assert!(decode_record(&good, 5).unwrap_err().contains("parameters"));
        assert!(decode_record(b"PCK1", 4).is_err());
    }

    #[test]
    fn each_start_takes_a_higher_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        for want in 1..=3 {
            let c = Checkpoints::open(dir.path(), "r", 2).unwrap();
            assert_eq!(c.next_incarnation().unwrap(), want);
        }
        // A refutation raised this start to 7: the next start is 8.
        let c = Checkpoints::open(dir.path(), "r", 2).unwrap();
        assert_eq!(c.next_incarnation().unwrap(), 4);
        c.note_incarnation(7).unwrap();
        c.note_incarnation(5).unwrap();
        drop(c);
        assert_eq!(Checkpoints::open(dir.path(), "r", 2).unwrap().next_incarnation().unwrap(), 8);
    }
}

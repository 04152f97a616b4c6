//! Checkpoints: record files in the node's state directory, a sled index beside them.
//!
//! The record of round R of run X is the file `checkpoints/<X>/<R>.ckpt`:
//! written to a temporary name (`*.tmp`), synced, renamed and its directory
//! synced ([`crate::fsutil::write_atomic`]; a failed write removes its temporary
//! file), and only then entered in the index: one sled tree per run
//! (`run/<run id>`), one key per checkpoint (the round, big-endian, so that the
//! newest sorts last), whose value is the length and BLAKE3 hash of the record.
//!
//! **The record files that verify are the truth; the index is derived from
//! them.** At every open the run's directory is read: `*.tmp` files (writes cut
//! short) are removed, every `*.ckpt` is verified (magic, checksum, metadata),
//! and the index is reconciled with the verified set: entries naming records
//! that are missing or do not verify are dropped, verified records it lacks are
//! added (one WARN line says so when the index was missing or wrong). Nothing
//! that verifies is deleted at open; a record that does not verify is kept on
//! disk (for inspection) but never used. A sled index that cannot be opened
//! because it is damaged is moved aside (`checkpoints.sled.corrupt-<unix>`) and
//! rebuilt; one that is locked is another process's (the only case that asks
//! whether another node uses the --state-dir). A node killed mid-write finds
//! the new record complete (and indexes it) or only its temporary file. A
//! record damaged on disk later is reported by [`Checkpoints::latest`] and the
//! one before it is used. The last `keep` checkpoints are kept, files and index
//! entries.
//!
//! Why not the records in sled itself: sled 0.34 keeps large values as blob
//! files that it does not delete when the value is removed or replaced (sled
//! issue 786), so a checkpoint every round filled the disk (2.9 GB per node in a
//! 200-round `cnn` run). The files are deleted with their index entries.
//!
//! Record: `PCK1`, BLAKE3 of the rest (32 bytes), the CBOR metadata's length
//! (u32 LE), the metadata (the [`CheckpointMeta`] fields plus the run's
//! [`RunSpec`]), then the state blob of [`p2pml_proto::encode_state`]
//! (parameters, optimizer state, round, epoch, lr schedule and early-stopping
//! state, the epoch's schedule). The RNG state is a function of the run seed,
//! the round and the peer id (shuffles, dropout masks and stochastic rounding
//! are all seeded that way), so the round restores it.
//!
//! The node's incarnation: every start takes one more than the highest seen,
//! so that a restarted node overrides its own death in the membership. It is
//! kept in the index, in the file `incarnation` (written atomically) and in
//! every record, so losing any one of them does not lower it.
//!
//! Another run's checkpoints ([`Checkpoints::open_for`]): the run id is a hash
//! of the [`RunSpec`], so a restart with other flags is another run. When this
//! run has no checkpoint but the state directory holds another run's, the
//! stored specs are compared: if the only difference is a raised `epochs` cap
//! the newest record is taken over (re-labelled with this run's id and spec;
//! the state blob does not depend on the cap, which only decides when the
//! training loop stops), otherwise the start is refused with one line naming
//! the differing fields and `--fresh`, which moves every earlier checkpoint
//! into `old-<unix>/` (never deleting them).

mod writer;
pub(crate) use writer::CheckpointWriter;
use p2pml_proto::wire::RunSpec;
use p2pml_proto::{StateError, StateHeader};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const MAGIC: &[u8; 4] = b"PCK1";
const INCARNATION_KEY: &[u8] = b"incarnation";
const INCARNATION_FILE: &str = "incarnation";
const INDEX_DIR: &str = "checkpoints.sled";
const RECORDS_DIR: &str = "checkpoints";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot open the checkpoint store {path}: {msg}")]
    Open { path: PathBuf, msg: String },
    #[error("checkpoint store: {0}")]
    Store(#[from] sled::Error),
    #[error("checkpoint file {path}: {err}")]
    File { path: PathBuf, err: std::io::Error },
    /// The state directory holds another run's checkpoints (the line says what differs).
    #[error("{0}")]
    OtherRun(String),
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

/// The metadata as stored: [`CheckpointMeta`]'s fields and the run's spec
/// (absent in records of older versions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RecordMeta {
    run_id: String,
    round: u64,
    epoch: u64,
    incarnation: u64,
    written_unix_ms: u64,
    members: Vec<MemberRecord>,
    #[serde(default)]
    spec: Option<RunSpec>,
}

impl RecordMeta {
    fn new(m: &CheckpointMeta, spec: Option<&RunSpec>) -> Self {
        RecordMeta {
            run_id: m.run_id.clone(),
            round: m.round,
            epoch: m.epoch,
            incarnation: m.incarnation,
            written_unix_ms: m.written_unix_ms,
            members: m.members.clone(),
            spec: spec.cloned(),
        }
    }

    fn meta(&self) -> CheckpointMeta {
        CheckpointMeta {
            run_id: self.run_id.clone(),
            round: self.round,
            epoch: self.epoch,
            incarnation: self.incarnation,
            written_unix_ms: self.written_unix_ms,
            members: self.members.clone(),
        }
    }
}

/// A checkpoint that loaded and verified.
#[derive(Debug)]
pub struct Restored {
    pub meta: CheckpointMeta,
    /// The spec of the run that wrote it (None: written by an older version).
    pub spec: Option<RunSpec>,
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
    /// The node's state directory.
    state_dir: PathBuf,
    keep: usize,
    /// Stored in every record (None: the test and benchmark opener).
    spec: Option<RunSpec>,
    /// The highest incarnation found in the record files: the counter never
    /// goes below it, even when the index and the incarnation file are lost.
    seen_incarnation: u64,
}

/// Index value: the record's length and BLAKE3 hash.
fn index_value(record: &[u8]) -> Vec<u8> {
    let mut v = (record.len() as u64).to_be_bytes().to_vec();
    v.extend_from_slice(blake3::hash(record).as_bytes());
    v
}

/// Encodes a checkpoint record (without a run spec).
pub fn encode_record(meta: &CheckpointMeta, state: &[u8]) -> Vec<u8> {
    encode_stored(&RecordMeta::new(meta, None), state)
}

fn encode_stored(meta: &RecordMeta, state: &[u8]) -> Vec<u8> {
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

/// Checks a record's magic and checksum and decodes its metadata; returns it
/// and where the state blob starts.
fn verify_record(bytes: &[u8]) -> Result<(RecordMeta, usize), String> {
    if bytes.len() < 40 || &bytes[..4] != MAGIC {
        return Err("not a checkpoint record (bad magic or too short)".into());
    }
    let rest = &bytes[36..];
    if blake3::hash(rest).as_bytes() != &bytes[4..36] {
        return Err("checksum mismatch (the record is damaged)".into());
    }
    let mlen = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let m = rest.get(4..4 + mlen).ok_or("metadata truncated")?;
    let meta: RecordMeta = p2pml_proto::wire::decode(m, 1 << 20).map_err(|e| format!("metadata: {e}"))?;
    Ok((meta, 36 + 4 + mlen))
}

/// Verifies and decodes a record of a model with `numel` parameters.
pub fn decode_record(bytes: &[u8], numel: u64) -> Result<Restored, String> {
    let (meta, at) = verify_record(bytes)?;
    let state = &bytes[at..];
    let (header, params, opt) = p2pml_proto::decode_state(state, numel).map_err(|e: StateError| format!("state: {e}"))?;
    if header.round != meta.round {
        return Err(format!("metadata says round {}, state says {}", meta.round, header.round));
    }
    Ok(Restored { meta: meta.meta(), spec: meta.spec, header, params, opt, state: state.to_vec(), skipped: Vec::new(), load_secs: 0.0 })
}

/// A run id as a directory name (run ids are hex digests).
fn safe_name(run_id: &str) -> String {
    run_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `base-<unix>`, or `base-<unix>-N` when that exists.
fn fresh_name(dir: &Path, base: &str) -> PathBuf {
    let t = unix_secs();
    let mut p = dir.join(format!("{base}-{t}"));
    let mut n = 1;
    while p.exists() {
        p = dir.join(format!("{base}-{t}-{n}"));
        n += 1;
    }
    p
}

/// The round a record file is named for (`<round, 20 digits>.ckpt`).
fn record_round(path: &Path) -> Option<u64> {
    if path.extension()? != "ckpt" {
        return None;
    }
    path.file_stem()?.to_str()?.parse().ok()
}

/// A verified record found on disk.
struct Found {
    meta: RecordMeta,
    index: Vec<u8>,
}

/// What the records of one run's directory say.
#[derive(Default)]
struct Scan {
    verified: BTreeMap<u64, Found>,
    /// (file, why) of `*.ckpt` files that do not verify.
    damaged: Vec<(PathBuf, String)>,
}

fn read_verified(path: &Path, round: u64) -> Result<(RecordMeta, Vec<u8>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let (meta, _) = verify_record(&bytes)?;
    if meta.round != round {
        return Err(format!("its metadata says round {}", meta.round));
    }
    Ok((meta, bytes))
}

/// Reads and verifies every record in `dir`; removes `*.tmp` files (writes that
/// did not finish) when `clean`.
fn scan_records(dir: &Path, clean: bool) -> Result<Scan, CheckpointError> {
    let mut scan = Scan::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(file_err(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(file_err(dir))?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            if clean {
                tracing::info!("removing {} (a checkpoint write that did not finish)", path.display());
                std::fs::remove_file(&path).map_err(file_err(&path))?;
            }
            continue;
        }
        let Some(round) = record_round(&path) else { continue };
        match read_verified(&path, round) {
            Ok((meta, bytes)) => {
                scan.verified.insert(round, Found { meta, index: index_value(&bytes) });
            }
            Err(why) => scan.damaged.push((path, why)),
        }
    }
    Ok(scan)
}

/// The newest record of another run's directory that verifies, with its bytes.
fn newest_verified(dir: &Path) -> Option<(RecordMeta, Vec<u8>)> {
    let mut rounds: Vec<(u64, PathBuf)> =
        std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).filter_map(|p| record_round(&p).map(|r| (r, p))).collect();
    rounds.sort();
    rounds.into_iter().rev().find_map(|(r, p)| read_verified(&p, r).ok())
}

fn open_sled(path: &Path) -> Result<sled::Db, sled::Error> {
    let cfg = sled::Config::new().path(path).mode(sled::Mode::HighThroughput);
    // sled may panic on some damaged files rather than return an error.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cfg.open()))
        .unwrap_or_else(|p| Err(sled::Error::ReportableBug(format!("sled panicked reading it: {}", panic_text(&*p)))))
}

/// Whether sled refused because another process holds the index's lock.
fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock"))
}

/// Whether sled refused because the index's files are damaged.
fn is_damaged(e: &sled::Error) -> bool {
    match e {
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) | sled::Error::Unsupported(_) => true,
        sled::Error::Io(io) => matches!(io.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData),
        sled::Error::CollectionNotFound(_) => false,
    }
}

/// Opens the sled index in `state_dir`. A locked one is another process's: the
/// error says so. A damaged one is moved aside and a new one created (`true`:
/// the caller rebuilds it from the records, and need not warn again).
fn open_index(state_dir: &Path) -> Result<(sled::Db, bool), CheckpointError> {
    let path = state_dir.join(INDEX_DIR);
    let describe = |e: &sled::Error| {
        if is_locked(e) {
            format!("{e}; is another p2pml-node using this --state-dir?")
        } else {
            e.to_string()
        }
    };
    // A store of this process that was just dropped may hold its lock for a few
    // more milliseconds (sled's flusher thread); another process's holds it on.
    let mut first = open_sled(&path);
    for _ in 0..20 {
        match &first {
            Err(e) if is_locked(e) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                first = open_sled(&path);
            }
            _ => break,
        }
    }
    match first {
        Ok(db) => Ok((db, false)),
        Err(e) if is_damaged(&e) => {
            set_aside_index(state_dir, &e)?;
            let db = open_sled(&path).map_err(|e| CheckpointError::Open { path: path.clone(), msg: describe(&e) })?;
            Ok((db, true))
        }
        Err(e) => Err(CheckpointError::Open { msg: describe(&e), path }),
    }
}

/// Moves a damaged index aside (`checkpoints.sled.corrupt-<unix>`), saying why.
fn set_aside_index(state_dir: &Path, why: &dyn std::fmt::Display) -> Result<(), CheckpointError> {
    let path = state_dir.join(INDEX_DIR);
    let aside = fresh_name(state_dir, &format!("{INDEX_DIR}.corrupt"));
    std::fs::rename(&path, &aside).map_err(file_err(&path))?;
    tracing::warn!(
        "the checkpoint index {} is damaged ({why}): moved it to {} and rebuilding it from the record files that verify",
        path.display(),
        aside.display()
    );
    Ok(())
}

/// The incarnation the index holds (0 when it holds none or cannot be read:
/// the incarnation file and the records stand in).
fn index_incarnation(db: &sled::Db) -> u64 {
    db.get(INCARNATION_KEY).ok().flatten().and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)).unwrap_or(0)
}

/// Opens the run's tree and reads it through: an index that opens but whose
/// contents are damaged fails here rather than later.
fn usable_tree(db: &sled::Db, run_id: &str) -> Result<sled::Tree, sled::Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let t = db.open_tree(format!("run/{run_id}"))?;
        for kv in t.iter() {
            kv?;
        }
        db.get(INCARNATION_KEY)?;
        Ok(t)
    }))
    .unwrap_or_else(|p| Err(sled::Error::ReportableBug(format!("sled panicked reading it: {}", panic_text(&*p)))))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

fn read_incarnation_file(state_dir: &Path) -> u64 {
    std::fs::read_to_string(state_dir.join(INCARNATION_FILE)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

impl Checkpoints {
    /// Opens (or creates) the store in `dir` for run `run_id`, keeping `keep`
    /// checkpoints; records carry no spec and other runs' checkpoints are not
    /// looked at (tests and benchmarks; nodes use [`Checkpoints::open_for`]).
    pub fn open(dir: &Path, run_id: &str, keep: usize) -> Result<Self, CheckpointError> {
        Self::open_inner(dir, run_id, None, keep, false)
    }

    /// Opens the store of the node's run: `spec` is stored in every record;
    /// another run's checkpoints are continued (a raised epoch cap) or refused
    /// (anything else) unless `p2p.fresh` moves them aside. With checkpoints off
    /// (`--checkpoint-every 0`) only the incarnation counter is used.
    pub fn open_for(p2p: &crate::config::P2pConfig, spec: &RunSpec) -> Result<Self, CheckpointError> {
        let spec_if_used = (p2p.checkpoint_every > 0).then_some(spec);
        Self::open_inner(&p2p.state_dir, &spec.run_id(), spec_if_used, p2p.checkpoint_keep, p2p.fresh)
    }

    fn open_inner(state_dir: &Path, run_id: &str, spec: Option<&RunSpec>, keep: usize, fresh: bool) -> Result<Self, CheckpointError> {
        std::fs::create_dir_all(state_dir).map_err(file_err(state_dir))?;
        let (mut db, mut replaced) = open_index(state_dir)?;
        let records = state_dir.join(RECORDS_DIR);
        let files = records.join(safe_name(run_id));
        std::fs::create_dir_all(&files).map_err(file_err(&files))?;
        let mut scan = scan_records(&files, true)?;
        // Other runs' newest verified records: their incarnations, and their specs.
        let mut others: Vec<(String, RecordMeta, Vec<u8>)> = Vec::new();
        for e in std::fs::read_dir(&records).map_err(file_err(&records))?.flatten() {
            let p = e.path();
            if p == files || !p.is_dir() {
                continue;
            }
            if let Some((m, b)) = newest_verified(&p) {
                others.push((e.file_name().to_string_lossy().into_owned(), m, b));
            }
        }
        let seen_incarnation = scan
            .verified
            .values()
            .map(|f| f.meta.incarnation)
            .chain(others.iter().map(|o| o.1.incarnation))
            .max()
            .unwrap_or(0);

        if fresh && (!scan.verified.is_empty() || !scan.damaged.is_empty() || !others.is_empty()) {
            // Keep the incarnation counter, which lives in the index too.
            let stored = index_incarnation(&db);
            let inc = stored.max(read_incarnation_file(state_dir)).max(seen_incarnation);
            let f = state_dir.join(INCARNATION_FILE);
            crate::fsutil::write_atomic(&f, format!("{inc}\n").as_bytes()).map_err(file_err(&f))?;
            drop(db);
            let old = fresh_name(state_dir, "old");
            std::fs::create_dir_all(&old).map_err(file_err(&old))?;
            for name in [RECORDS_DIR, INDEX_DIR] {
                let from = state_dir.join(name);
                if from.exists() {
                    std::fs::rename(&from, old.join(name)).map_err(file_err(&from))?;
                }
            }
            tracing::info!("--fresh: moved the earlier checkpoints to {}; starting afresh", old.display());
            (db, _) = open_index(state_dir)?;
            replaced = true;
            std::fs::create_dir_all(&files).map_err(file_err(&files))?;
            scan = Scan::default();
            others.clear();
        }

        let tree = match usable_tree(&db, run_id) {
            Ok(t) => t,
            Err(e) => {
                // Opened, but its contents are damaged: set aside like one that does not open.
                drop(db);
                set_aside_index(state_dir, &e)?;
                (db, _) = open_index(state_dir)?;
                replaced = true;
                db.open_tree(format!("run/{run_id}"))?
            }
        };
        let c = Checkpoints { db, tree, dir: files, state_dir: state_dir.to_path_buf(), keep: keep.max(1), spec: spec.cloned(), seen_incarnation };
        c.reconcile(&scan, replaced)?;
        if let Some(ours) = spec {
            if scan.verified.is_empty() {
                c.continue_or_refuse(ours, others)?;
            }
        }
        Ok(c)
    }

    fn path(&self, round: u64) -> PathBuf {
        self.dir.join(format!("{round:020}.ckpt"))
    }

    /// Makes the index name exactly the verified records.
    fn reconcile(&self, scan: &Scan, index_replaced: bool) -> Result<(), CheckpointError> {
        let mut indexed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut unreadable = None;
        for kv in self.tree.iter() {
            match kv {
                Ok((k, v)) => {
                    if let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) {
                        indexed.insert(u64::from_be_bytes(b), v.to_vec());
                    }
                }
                Err(e) => {
                    unreadable = Some(e);
                    break;
                }
            }
        }
        if unreadable.is_some() {
            self.tree.clear()?;
            indexed.clear();
        }
        let dropped: Vec<u64> = indexed.keys().filter(|r| !scan.verified.contains_key(r)).copied().collect();
        let added: Vec<u64> = scan.verified.iter().filter(|(r, f)| indexed.get(r) != Some(&f.index)).map(|(r, _)| *r).collect();
        for r in &dropped {
            self.tree.remove(r.to_be_bytes())?;
        }
        for r in &added {
            self.tree.insert(r.to_be_bytes(), scan.verified[r].index.clone())?;
        }
        if !dropped.is_empty() || !added.is_empty() {
            self.tree.flush()?;
        }
        let index = self.state_dir.join(INDEX_DIR);
        let kept: Vec<u64> = scan.verified.keys().copied().collect();
        if let Some(e) = unreadable {
            tracing::warn!("the checkpoint index {} is unreadable ({e}): rebuilt it from the record files that verify (rounds {kept:?})", index.display());
        } else if index_replaced {
            // open_index said so already.
        } else if indexed.is_empty() && !added.is_empty() {
            tracing::warn!("the checkpoint index {} is missing, or names no checkpoint (deleted or damaged): rebuilt it from the record files that verify (rounds {kept:?})", index.display());
        } else if !dropped.is_empty() || added.iter().any(|r| indexed.keys().next_back().is_some_and(|last| r <= last)) {
            tracing::warn!(
                "the checkpoint index {} disagreed with the record files: rebuilt it from those that verify (rounds {kept:?}; dropped {dropped:?}, whose records are missing or damaged)",
                index.display()
            );
        } else if !added.is_empty() {
            tracing::info!("indexed the checkpoint of round(s) {added:?}: its record was complete, its index entry not yet written when the node stopped");
        }
        if !scan.damaged.is_empty() {
            let list: Vec<String> = scan.damaged.iter().map(|(p, why)| format!("{} ({why})", p.display())).collect();
            tracing::warn!("checkpoint records that do not verify are kept on disk but not used: {}", list.join(", "));
        }
        Ok(())
    }

    /// This run has no checkpoint: takes over another run's newest record when
    /// the only difference is a raised epoch cap, refuses when anything else differs.
    fn continue_or_refuse(&self, ours: &RunSpec, others: Vec<(String, RecordMeta, Vec<u8>)>) -> Result<(), CheckpointError> {
        let Some((other_id, meta, bytes)) = others.into_iter().max_by_key(|o| (o.1.written_unix_ms, o.1.round)) else { return Ok(()) };
        let dir = self.state_dir.display();
        let fresh = format!(
            "pass --fresh to move them aside (into {dir}/old-<unix time>/, nothing is deleted) and start afresh, or use another --state-dir"
        );
        let Some(theirs) = meta.spec.clone() else {
            return Err(CheckpointError::OtherRun(format!(
                "--state-dir {dir} holds checkpoints of another run ({other_id}, round {}) written by an older p2pml-node, whose configuration is unknown: {fresh}",
                meta.round
            )));
        };
        let only_epochs_raised = RunSpec { epochs: theirs.epochs, ..ours.clone() } == theirs && ours.epochs > theirs.epochs;
        if !only_epochs_raised {
            let diffs = ours.differences(&theirs);
            return Err(CheckpointError::OtherRun(format!(
                "--state-dir {dir} holds checkpoints of another run ({other_id}, round {}) with a different configuration: {} (ours vs the checkpoint's); {fresh}",
                meta.round,
                if diffs.is_empty() { "encoding only".to_string() } else { diffs.join(", ") }
            )));
        }
        // Sound: the state blob holds nothing that depends on the epoch cap (the
        // training loop reads the cap from the configuration to decide when to
        // stop); the record is re-labelled with this run's id and spec.
        let (_, at) = verify_record(&bytes).map_err(|why| CheckpointError::OtherRun(format!("checkpoint of run {other_id}: {why}")))?;
        let stored = RecordMeta { run_id: ours.run_id(), spec: Some(ours.clone()), ..meta.clone() };
        let record = encode_stored(&stored, &bytes[at..]);
        self.write_file(&self.path(meta.round), &record)?;
        self.tree.insert(meta.round.to_be_bytes(), index_value(&record))?;
        self.tree.flush()?;
        tracing::info!(
            "continuing run {other_id}'s checkpoint round {} with epochs {} → {} (as run {}; run {other_id}'s checkpoints stay in {})",
            meta.round,
            theirs.epochs,
            ours.epochs,
            ours.run_id(),
            self.dir.parent().map_or_else(String::new, |p| p.join(&other_id).display().to_string())
        );
        Ok(())
    }

    /// Writes `bytes` to `path` durably and atomically; a failed write leaves no temporary file.
    fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
        crate::fsutil::write_atomic(path, bytes).map_err(file_err(path))
    }

    /// Takes this start's incarnation: one more than the highest seen (1 at first).
    pub fn next_incarnation(&self) -> Result<u64, CheckpointError> {
        let next = self.stored_incarnation()? + 1;
        self.store_incarnation(next)?;
        Ok(next)
    }

    fn stored_incarnation(&self) -> Result<u64, CheckpointError> {
        let in_index = index_incarnation(&self.db);
        Ok(in_index.max(read_incarnation_file(&self.state_dir)).max(self.seen_incarnation))
    }

    fn store_incarnation(&self, incarnation: u64) -> Result<(), CheckpointError> {
        let f = self.state_dir.join(INCARNATION_FILE);
        crate::fsutil::write_atomic(&f, format!("{incarnation}\n").as_bytes()).map_err(file_err(&f))?;
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
        let record = encode_stored(&RecordMeta::new(meta, self.spec.as_ref()), state);
        let encode_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let path = self.path(meta.round);
        self.write_file(&path, &record)?;
        if let Some(d) = stall_before_flush {
            // Fault injection (--fault-checkpoint-stall): a window in which the
            // write is in progress, for the crash test to kill the node in.
            println!("{}", p2pml_proto::line::Line::CheckpointWriting { round: meta.round });
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
        walk(&self.dir) + walk(&self.state_dir.join(INDEX_DIR))
    }
}

#[cfg(test)]
mod tests;

//! Checkpoint tests: write, verify, damaged records, rotation, incarnations.

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
        withheld: vec![],
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
    let e = Checkpoints::open(dir.path(), "other", 3).err().expect("sled allows one opener").to_string();
    assert!(e.contains("is another p2pml-node using this --state-dir?"), "{e}");
    drop(c);
    // A write cut short leaves its temporary file: removed at open. A record
    // that does not verify is kept on disk, but neither indexed nor used.
    std::fs::write(dir.path().join("checkpoints/r/00000000000000000006.ckpt"), b"partial").unwrap();
    std::fs::write(dir.path().join("checkpoints/r/00000000000000000007.tmp"), b"partial").unwrap();
    let c = Checkpoints::open(dir.path(), "r", 3).unwrap();
    assert_eq!(std::fs::read_dir(dir.path().join("checkpoints/r")).unwrap().count(), 4);
    assert!(!dir.path().join("checkpoints/r/00000000000000000007.tmp").exists());
    assert_eq!(c.rounds().unwrap(), vec![3, 4, 5]);
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

/// Fills a fresh store: three starts (incarnation 3), rounds 0..10 kept 3.
fn filled(dir: &Path) -> u64 {
    let mut inc = 0;
    for _ in 0..3 {
        inc = Checkpoints::open(dir, "r", 3).unwrap().next_incarnation().unwrap();
    }
    let c = Checkpoints::open(dir, "r", 3).unwrap();
    for r in 0..10 {
        let (mut m, s) = state(r, r as f32);
        m.incarnation = inc;
        c.write(&m, &s, None).unwrap();
    }
    inc
}

fn record_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir.join("checkpoints/r")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// After `damage`, the store restores round 9, indexes exactly the kept
/// records, deletes none of them and takes a higher incarnation.
fn recovers_from(damage: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let inc = filled(dir.path());
    let before = record_files(dir.path());
    assert_eq!(before.len(), 3);
    damage(dir.path());
    let c = Checkpoints::open(dir.path(), "r", 3).unwrap();
    let l = c.latest(4).unwrap().expect("a checkpoint restores");
    assert_eq!((l.meta.round, l.meta.incarnation, l.params.clone()), (9, inc, vec![9.0; 4]));
    assert_eq!(c.rounds().unwrap(), vec![7, 8, 9], "the index names the records that verify, no others");
    assert_eq!(record_files(dir.path()), before, "no verified record was deleted");
    let next = c.next_incarnation().unwrap();
    assert!(next > inc, "incarnation {next} after {inc}");
    drop(c);
    // And the rebuilt index is good for the next start too.
    let c = Checkpoints::open(dir.path(), "r", 3).unwrap();
    assert_eq!(c.latest(4).unwrap().unwrap().meta.round, 9);
    assert!(c.next_incarnation().unwrap() > next);
}

#[test]
fn a_deleted_index_is_rebuilt_from_the_records_with_the_incarnation() {
    recovers_from(|d| std::fs::remove_dir_all(d.join("checkpoints.sled")).unwrap());
    // The incarnation file lost too: the records carry it.
    recovers_from(|d| {
        std::fs::remove_dir_all(d.join("checkpoints.sled")).unwrap();
        std::fs::remove_file(d.join("incarnation")).unwrap();
    });
}

#[test]
fn a_truncated_index_is_rebuilt_from_the_records_with_the_incarnation() {
    for keep in [0u64, 1, 7, 100, 512, 4096, 20_000] {
        recovers_from(|d| {
            let db = d.join("checkpoints.sled/db");
            let len = std::fs::metadata(&db).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(keep.min(len)).unwrap();
        });
    }
}

#[test]
fn a_bit_flipped_index_is_rebuilt_from_the_records_with_the_incarnation() {
    for frac in [0.05, 0.2, 0.4, 0.6, 0.8, 0.95] {
        recovers_from(|d| {
            let db = d.join("checkpoints.sled/db");
            let mut b = std::fs::read(&db).unwrap();
            let n = b.len();
            let at = ((n as f64) * frac) as usize;
            for x in &mut b[at..(at + 16).min(n)] {
                *x ^= 0x5a;
            }
            std::fs::write(&db, &b).unwrap();
        });
    }
    // The index of an earlier time (what sled recovers from a damaged log):
    // it names records pruned long ago and an older incarnation.
    let dir = tempfile::tempdir().unwrap();
    let old = tempfile::tempdir().unwrap();
    {
        let c = Checkpoints::open(dir.path(), "r", 3).unwrap();
        c.next_incarnation().unwrap();
        for r in 0..3 {
            c.write(&state(r, r as f32).0, &state(r, r as f32).1, None).unwrap();
        }
    }
    copy_dir(&dir.path().join("checkpoints.sled"), &old.path().join("i"));
    recovers_from(|d| {
        std::fs::remove_dir_all(d.join("checkpoints.sled")).unwrap();
        std::fs::remove_file(d.join("incarnation")).unwrap();
        copy_dir(&old.path().join("i"), &d.join("checkpoints.sled"));
    });
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_damaged_sled_config_is_moved_aside_and_the_index_rebuilt() {
    recovers_from(|d| std::fs::write(d.join("checkpoints.sled/conf"), b"garbage, not sled's").unwrap());
}

#[test]
fn an_index_that_cannot_be_opened_says_why_and_asks_about_another_node_only_when_locked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("checkpoints.sled"), b"a file where the index goes").unwrap();
    let e = Checkpoints::open(dir.path(), "r", 3).err().expect("cannot open").to_string();
    assert!(e.contains("cannot open the checkpoint store") && !e.contains("another p2pml-node"), "{e}");
}

#[test]
fn a_failed_write_removes_its_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let c = Checkpoints::open(dir.path(), "r", 3).unwrap();
    // A directory where round 5's record must go: the rename fails.
    let blocker = dir.path().join("checkpoints/r/00000000000000000005.ckpt");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("x"), b"x").unwrap();
    let (m, s) = state(5, 1.0);
    assert!(c.write(&m, &s, None).is_err());
    let left: Vec<String> = record_files(dir.path()).into_iter().filter(|n| n.ends_with(".tmp")).collect();
    assert!(left.is_empty(), "left {left:?}");
}

fn spec_with(epochs: u64, lr: f64) -> RunSpec {
    let t = crate::config::TrainConfig::default();
    let p = crate::config::P2pConfig::default();
    let mut s = crate::config::run_spec(&t, &p);
    s.epochs = epochs;
    s.lr = lr;
    s
}

fn open_spec(dir: &Path, spec: &RunSpec, fresh: bool) -> Result<Checkpoints, CheckpointError> {
    Checkpoints::open_inner(dir, &spec.run_id(), Some(spec), 3, fresh)
}

#[test]
fn another_runs_checkpoints_are_continued_with_a_raised_epoch_cap_refused_otherwise_and_moved_aside_by_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let a = spec_with(1, 0.01);
    let inc = {
        let c = open_spec(dir.path(), &a, false).unwrap();
        let inc = c.next_incarnation().unwrap();
        for r in 0..4 {
            let (mut m, s) = state(r, r as f32);
            m.incarnation = inc;
            c.write(&m, &s, None).unwrap();
        }
        assert_eq!(c.latest(4).unwrap().unwrap().spec.as_ref(), Some(&a), "records carry the spec");
        inc
    };
    let a_dir = dir.path().join("checkpoints").join(a.run_id());
    let a_files = std::fs::read_dir(&a_dir).unwrap().count();

    // Another lr: refused, naming the field (ours vs the checkpoint's) and --fresh.
    let e = open_spec(dir.path(), &spec_with(1, 0.5), false).err().expect("refused").to_string();
    assert!(e.contains("lr: 0.5 vs 0.01") && e.contains("--fresh") && !e.contains("epochs"), "{e}");
    // Fewer epochs: refused too.
    let e = open_spec(dir.path(), &spec_with(0, 0.01), false).err().expect("refused").to_string();
    assert!(e.contains("epochs: 0 vs 1"), "{e}");

    // A raised epoch cap: continues from round 3, as the new run.
    let b = spec_with(2, 0.01);
    let c = open_spec(dir.path(), &b, false).unwrap();
    let l = c.latest(4).unwrap().unwrap();
    assert_eq!((l.meta.round, l.params.clone(), l.meta.run_id.clone(), l.spec.clone()), (3, vec![3.0; 4], b.run_id(), Some(b.clone())));
    assert!(c.next_incarnation().unwrap() > inc);
    drop(c);
    assert_eq!(std::fs::read_dir(&a_dir).unwrap().count(), a_files, "the earlier run's checkpoints stay");

    // --fresh: everything moved aside, nothing deleted; the incarnation goes on.
    let lr = spec_with(1, 0.5);
    let c = open_spec(dir.path(), &lr, true).unwrap();
    assert!(c.latest(4).unwrap().is_none());
    assert!(c.next_incarnation().unwrap() > inc + 1);
    let old: Vec<PathBuf> =
        std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("old-")).collect();
    assert_eq!(old.len(), 1, "{old:?}");
    assert_eq!(std::fs::read_dir(old[0].join("checkpoints").join(a.run_id())).unwrap().count(), a_files);
    assert!(old[0].join("checkpoints").join(b.run_id()).join("00000000000000000003.ckpt").exists());
}

//! No lost state, end to end: a single-peer P2P run of the real `p2pml-node`,
//! restarted next to its checkpoints after the sled index was deleted,
//! truncated or bit-flipped (it resumes from the newest record, with a higher
//! incarnation, deleting no record); restarted with another configuration (a
//! raised epoch cap continues, anything else is refused in one line naming the
//! fields, `--fresh` moves the old checkpoints aside); and unwritable output
//! paths, which fail at start within seconds.

use p2pml_tests::{bin, small_run};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    secs: f64,
}

/// Runs a one-peer node on `state` (`--epochs epochs`, `extra`) to its end, at most `limit`.
fn node(state: &Path, epochs: u32, extra: &[&str], limit: Duration) -> Run {
    let mut args = small_run(600, 100, 100, epochs, &["--peers", "1", "--min-peers", "1", "--identity-seed", "11"]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let t0 = Instant::now();
    let mut child = Command::new(bin("p2pml-node"))
        .args(&args)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--metrics-addr", "none", "--state-dir", state.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node ran longer than {limit:?}; stderr: {}", err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run { ok: status.success(), stdout: out.join().unwrap(), stderr: err.join().unwrap(), secs: t0.elapsed().as_secs_f64() }
}

/// The record files of every run in `state`, sorted.
fn records(state: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for run in std::fs::read_dir(state.join("checkpoints")).unwrap().flatten() {
        for f in std::fs::read_dir(run.path()).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "ckpt") {
                v.push(f.path());
            }
        }
    }
    v.sort();
    v
}

fn newest_round(state: &Path) -> u64 {
    let last = records(state).into_iter().filter_map(|p| p.file_stem()?.to_str()?.parse::<u64>().ok()).max();
    last.expect("the run wrote checkpoints")
}

fn incarnation(state: &Path) -> u64 {
    let r: Value = serde_json::from_slice(&std::fs::read(state.join("report.json")).unwrap()).unwrap();
    r["incarnation"].as_u64().unwrap()
}

fn resumed_from(run: &Run, round: u64) {
    assert!(run.ok, "the restart failed: {}", run.stderr);
    assert!(run.stdout.lines().any(|l| l.starts_with(&format!("restored checkpoint round {round} "))), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.lines().any(|l| l.starts_with(&format!("ready round {} ", round + 1))), "{}", run.stdout);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn a_deleted_truncated_or_flipped_index_loses_no_checkpoint_and_no_incarnation() {
    let _one = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let limit = Duration::from_secs(300);
    let first = node(&state, 1, &[], limit);
    assert!(first.ok, "{}", first.stderr);
    let round = newest_round(&state);
    let files = records(&state);
    let mut inc = incarnation(&state);
    assert_eq!(inc, 1);
    let db = state.join("checkpoints.sled/db");
    let damages: [(&str, Box<dyn Fn()>); 3] = [
        ("deleted", Box::new(|| std::fs::remove_dir_all(state.join("checkpoints.sled")).unwrap())),
        (
            "truncated",
            Box::new(|| {
                let len = std::fs::metadata(&db).unwrap().len();
                std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(len / 3).unwrap();
            }),
        ),
        (
            "bit-flipped",
            Box::new(|| {
                let mut b = std::fs::read(&db).unwrap();
                let n = b.len();
                for i in (n / 4..n).step_by(97) {
                    b[i] ^= 0x24;
                }
                std::fs::write(&db, b).unwrap();
            }),
        ),
    ];
    for (what, damage) in damages {
        damage();
        let again = node(&state, 1, &[], limit);
        resumed_from(&again, round);
        if what != "bit-flipped" {
            assert!(again.stderr.contains("checkpoint index"), "index {what}: no word of it: {}", again.stderr);
        }
        assert_eq!(records(&state), files, "index {what}: every verified record is still there");
        let next = incarnation(&state);
        assert!(next > inc, "index {what}: incarnation {next} after {inc}");
        inc = next;
    }
}

#[test]
fn a_changed_configuration_continues_a_raised_epoch_cap_refuses_anything_else_and_fresh_moves_aside() {
    let _one = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let limit = Duration::from_secs(300);
    let first = node(&state, 1, &[], limit);
    assert!(first.ok, "{}", first.stderr);
    let round = newest_round(&state);

    // One more epoch: continues from the finished run's last checkpoint.
    let more = node(&state, 2, &[], limit);
    resumed_from(&more, round);
    assert!(more.stderr.contains(&format!("checkpoint round {round} with epochs 1 → 2")), "{}", more.stderr);
    assert!(more.stdout.lines().any(|l| l.starts_with("epoch 2 test_acc")), "it trained the second epoch: {}", more.stdout);

    // Another lr: refused at start, in one line naming the field and --fresh.
    let before = records(&state);
    let lr = node(&state, 2, &["--lr", "0.5"], Duration::from_secs(60));
    assert!(!lr.ok);
    let errors: Vec<&str> = lr.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{}", lr.stderr);
    assert!(errors[0].contains("lr: 0.5 vs 0.01") && errors[0].contains("--fresh"), "{}", errors[0]);
    assert!(!lr.stdout.contains("ready round"), "{}", lr.stdout);
    assert_eq!(records(&state), before, "nothing touched");

    // --fresh: starts at round 0; the earlier checkpoints are moved, not deleted.
    let fresh = node(&state, 1, &["--lr", "0.5", "--fresh"], limit);
    assert!(fresh.ok, "{}", fresh.stderr);
    assert!(fresh.stdout.lines().any(|l| l.starts_with("ready round 0 ")), "{}", fresh.stdout);
    let old: Vec<PathBuf> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("old-"))
        .collect();
    assert_eq!(old.len(), 1, "{old:?}");
    let names = |v: &[PathBuf], base: &Path| -> Vec<PathBuf> { v.iter().map(|p| p.strip_prefix(base).unwrap().to_path_buf()).collect() };
    assert_eq!(names(&records(&old[0]), &old[0]), names(&before, &state), "every earlier record is in {}", old[0].display());
    assert!(incarnation(&state) >= 3, "the incarnation went on");
}

#[test]
fn unwritable_output_paths_fail_at_start_within_seconds_in_one_line() {
    let _one = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let report = file.join("report.json");
    let state = dir.path().join("state");
    for (flag, run) in [
        ("--report", node(&state, 1, &["--report", report.to_str().unwrap()], Duration::from_secs(60))),
        ("--state-dir", node(&file.join("state"), 1, &[], Duration::from_secs(60))),
    ] {
        assert!(!run.ok, "{flag}: {}", run.stdout);
        assert!(run.secs < 20.0, "{flag}: failed only after {:.1} s", run.secs);
        let errors: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{}", run.stderr);
        assert!(errors[0].starts_with(&format!("error: {flag} ")), "{}", errors[0]);
        assert!(!run.stderr.contains("panicked") && !run.stdout.contains("ready round"), "{}", run.stderr);
    }
}

//! Fault tolerance end to end: peers killed with SIGKILL and revived, a node
//! killed while it writes a checkpoint, over real processes on loopback.

use p2pml_tests::{bin, small_run, testnet};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn a_killed_peer_is_detected_revived_from_its_checkpoint_and_in_step_within_seconds() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let args = small_run(6000, 1000, 400, 2, &[]);
    let clean_dir = tempfile::tempdir().unwrap();
    let (ok, clean) = testnet(clean_dir.path(), 4, &[], &args);
    assert!(ok, "{}", clean["problems"]);
    let dir = tempfile::tempdir().unwrap();
    let (ok, r) = testnet(dir.path(), 4, &["--kill", "3@r5", "--revive", "3@r10"], &args);
    assert!(ok, "{}", r["problems"]);
    assert_eq!(r["all_final_digests_equal"], true);
    assert_eq!(r["rounds_with_equal_digests"], r["common_rounds"]);
    let faults = r["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 2, "{faults:?}");
    let (kill, revive) = (&faults[0], &faults[1]);
    assert_eq!(kill["kind"], "kill");
    let detect = kill["detection_last_s"].as_f64().expect("every survivor declared the peer dead");
    assert!(detect <= 2.0 + 0.5, "detection took {detect} s (timeout 2 s)");

    // The survivors never waited longer than the failure timeout plus one round.
    let peers = r["peer_reports"].as_array().unwrap();
    for p in peers.iter().filter(|p| p["index"] != 3) {
        let log = p["rounds_log"].as_array().unwrap();
        let durations: Vec<f64> = log.windows(2).map(|w| w[1]["finished_at"].as_f64().unwrap() - w[0]["finished_at"].as_f64().unwrap()).collect();
        let round_s = median(durations);
        let worst = log.iter().map(|x| x["stages"]["barrier_wait"].as_f64().unwrap()).fold(0.0, f64::max);
        assert!(worst <= 2.0 + round_s, "peer {} waited {worst:.2} s at a barrier (round {round_s:.2} s)", p["index"]);
    }

    // The revived peer restored its checkpoint, synced, and was in step within 5 s of its restart.
    let n3: Value = serde_json::from_slice(&std::fs::read(dir.path().join("nodes/n3/report.json")).unwrap()).unwrap();
    assert_eq!(n3["incarnation"], 2);
    let restored = n3["checkpoints"]["restored_round"].as_u64().expect("it resumed from a checkpoint");
    assert!((3..=6).contains(&restored), "restored round {restored}");
    let matched = revive["digest_match_s"].as_f64().expect("its digest matched");
    assert!(matched <= 5.0, "digest matched {matched:.2} s after the restart");
    assert!(revive["rejoin_s"].as_f64().unwrap() <= matched);
    // It followed until the epoch ended, then trained again.
    let log = n3["rounds_log"].as_array().unwrap();
    assert_eq!(log.last().unwrap()["contributors"], 4, "it trains in the next epoch");
    assert!(n3["gradient_bytes_sent"].as_u64().unwrap() > 0);

    // Accuracy within 1 pp of the fault-free run at the same round.
    let acc = |v: &Value| v["peer_reports"][0]["final_test_accuracy"].as_f64().unwrap();
    assert_eq!(clean["peer_reports"][0]["rounds"], r["peer_reports"][0]["rounds"], "the same rounds");
    let (a, b) = (acc(&clean), acc(&r));
    assert!((a - b).abs() <= 0.01, "fault-free {a:.4} vs with the fault {b:.4}");
}

/// Starts a single-peer run; returns the child and a channel of its stdout lines.
fn start(state: &std::path::Path, extra: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut args = small_run(1500, 300, 100, 1, &["--peers", "1", "--identity-seed", "5"]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(bin("p2pml-node"))
        .args(&args)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--state-dir", state.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Lines until `pred` matches one (bounded).
fn until(rx: &mpsc::Receiver<String>, limit: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = pred(&l);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(e) => panic!("no matching line within {limit:?} ({e}); saw {seen:?}"),
        }
    }
}

fn digest_of_round(lines: &[String], round: u64) -> Option<String> {
    let prefix = format!("round {round} ");
    lines.iter().find(|l| l.starts_with(&prefix)).and_then(|l| l.split(" digest ").nth(1)).map(|d| d.trim().to_string())
}

#[test]
fn sigkill_during_a_checkpoint_write_restores_the_last_complete_one_and_ends_as_if_never_killed() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // The reference: the same run, never killed.
    let ref_dir = tempfile::tempdir().unwrap();
    let (mut c, rx) = start(ref_dir.path(), &[]);
    let lines = until(&rx, Duration::from_secs(300), |l| l.starts_with("done "));
    assert!(c.wait().unwrap().success());
    let final_ref = lines.last().unwrap().split(" digest ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();

    // Killed while round 8's checkpoint is being written.
    let dir = tempfile::tempdir().unwrap();
    let (mut c, rx) = start(dir.path(), &["--fault-checkpoint-stall", "8:20000"]);
    let first = until(&rx, Duration::from_secs(300), |l| l == "checkpoint writing round 8");
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();

    let (mut c, rx) = start(dir.path(), &[]);
    let second = until(&rx, Duration::from_secs(300), |l| l.starts_with("done "));
    assert!(c.wait().unwrap().success());
    let restored = second.iter().find(|l| l.starts_with("restored checkpoint")).expect("a checkpoint was restored");
    let round: u64 = restored.split_whitespace().nth(3).unwrap().parse().unwrap();
    // Round 8's write had not been flushed; the newest complete checkpoint is 7
    // (or 8, had sled's background flush made it durable before the kill).
    assert!(round == 7 || round == 8, "{restored}");
    let digest = restored.split(" digest ").nth(1).unwrap().split_whitespace().next().unwrap();
    assert_eq!(Some(digest.to_string()), digest_of_round(&first, round), "the restored parameters are round {round}'s");
    assert!(second.iter().any(|l| l.starts_with(&format!("ready round {} ", round + 1))), "{second:?}");
    let final_resumed = second.last().unwrap().split(" digest ").nth(1).unwrap().split_whitespace().next().unwrap();
    assert_eq!(final_resumed, final_ref, "resuming from the checkpoint ends bit-identical to the run never killed");

    let report: Value = serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["checkpoints"]["restored_round"], round);
    assert_eq!(report["incarnation"], 2);
}

#[test]
fn the_minority_side_of_a_partition_waits_then_catches_up_and_everyone_ends_equal() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let args = small_run(6000, 500, 400, 2, &[]);
    let (_, r) = testnet(dir.path(), 4, &["--partition", "0,1,2|3@r5+8"], &args);
    // Around the heal, a round may disagree until the digest check re-syncs the
    // odd one out; anything else is a failure, and the end must agree.
    let problems: Vec<&str> = r["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(problems.iter().all(|p| p.starts_with("digests differ in ")), "{problems:?}");
    assert_eq!(r["all_final_digests_equal"], true);
    let peers = r["peer_reports"].as_array().unwrap();
    // The majority (3 of 4, the default quorum) trained on; peer 3 did not train alone.
    let log3 = peers[3]["rounds_log"].as_array().unwrap();
    assert!(log3.iter().all(|x| x["contributors"].as_u64().unwrap() != 1), "the minority never trained alone");
    let n3: Value = serde_json::from_slice(&std::fs::read(dir.path().join("nodes/n3/report.json")).unwrap()).unwrap();
    assert!(n3["catch_ups"].as_u64().unwrap() >= 1, "it caught up by state sync");
    let log0 = peers[0]["rounds_log"].as_array().unwrap();
    assert!(log0.iter().any(|x| x["contributors"] == 3), "the majority went on without it");
    assert_eq!(r["faults"][0]["kind"], "partition");
}

#[test]
#[ignore = "known defect, open: a swarm revived at once can still split into parts that train apart (issue 16's closing note); run with --ignored"]
fn a_whole_swarm_killed_at_once_resumes_from_its_checkpoints() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let args = small_run(4000, 500, 400, 2, &[]);
    let schedule = ["--kill", "0@r5", "--kill", "1@r5", "--kill", "2@r5", "--revive", "0@12", "--revive", "1@12.5", "--revive", "2@13"];
    let (ok, r) = testnet(dir.path(), 3, &schedule, &args);
    assert!(ok, "{}", r["problems"]);
    assert_eq!(r["all_final_digests_equal"], true);
    for i in 0..3 {
        let out = std::fs::read_to_string(dir.path().join(format!("nodes/n{i}/stdout.log"))).unwrap();
        let lines: Vec<String> = out.lines().map(String::from).collect();
        let restored = lines.iter().find(|l| l.starts_with("restored checkpoint")).expect("resumed from a checkpoint");
        let round: u64 = restored.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert!((3..=6).contains(&round), "{restored}");
        // Rounds done in both lives hold the same parameters: the replay is exact.
        let at = lines.iter().position(|l| l.starts_with("restored")).unwrap();
        let (before, after) = lines.split_at(at);
        for r in round + 1..round + 4 {
            if let (Some(a), Some(b)) = (digest_of_round(before, r), digest_of_round(after, r)) {
                assert_eq!(a, b, "peer {i} round {r}");
            }
        }
        let resumed = lines.iter().filter(|l| l.starts_with("ready round ")).nth(1).expect("ready twice");
        assert!(resumed.starts_with(&format!("ready round {} ", round + 1)), "{resumed}");
    }
}

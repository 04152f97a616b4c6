//! End-to-end: real `p2pml-node` processes on loopback, started by `testnet`.

use p2pml_tests::{bin, fashion_mnist, small_run, testnet, wait_for};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The multi-process tests share two cores: one at a time, so that no heartbeat
/// starves past the failure timeout.
static HEAVY: Mutex<()> = Mutex::new(());

#[test]
fn four_peers_hold_identical_parameters_every_round_and_learn() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (ok, r) = testnet(dir.path(), 4, &[], &small_run(6000, 1000, 400, 3, &["--seed", "3", "--failure-timeout-ms", "5000"]));
    assert!(ok, "testnet reported problems: {}", r["problems"]);
    let peers = r["peer_reports"].as_array().unwrap();
    assert_eq!(peers.len(), 4);
    // Every round, every peer: the same parameters, bit for bit.
    let common = r["common_rounds"].as_u64().unwrap();
    assert!(common >= 60, "{common} rounds");
    assert_eq!(r["rounds_with_equal_digests"].as_u64().unwrap(), common);
    for p in peers {
        let log = p["rounds_log"].as_array().unwrap();
        assert_eq!(log.len() as u64, common);
        assert!(log.iter().all(|x| x["contributors"] == 4));
        assert!(p["gradient_bytes_sent"].as_u64().unwrap() > 0);
        assert!(p["bytes_received"].as_u64().unwrap() > p["gradient_bytes_sent"].as_u64().unwrap());
        for stage in ["compute", "encode", "send", "barrier_wait", "decode", "update"] {
            assert!(p["mean_stage_seconds"][stage].is_number(), "{stage}");
        }
    }
    // Accuracy rises epoch over epoch.
    let acc: Vec<f64> = r["accuracy_by_epoch"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(acc.len(), 3);
    assert!(acc[2] > acc[0] && acc[2] > 0.6, "accuracy by epoch {acc:?}");
}

#[test]
fn asynchronous_mode_completes_and_learns() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let args = small_run(3000, 500, 300, 2, &["--sync", "async", "--max-staleness", "2"]);
    let (ok, r) = testnet(dir.path(), 3, &[], &args);
    assert!(ok, "testnet reported problems: {}", r["problems"]);
    assert_eq!(r["sync"], "async");
    let peers = r["peer_reports"].as_array().unwrap();
    assert_eq!(peers.len(), 3, "{}", r["problems"]);
    for p in peers {
        assert_eq!(p["exit_code"], 0);
        assert!(p["final_test_accuracy"].as_f64().unwrap() > 0.4, "{}", p["final_test_accuracy"]);
    }
}

#[test]
fn a_node_with_a_different_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = fashion_mnist();
    let common = [
        "--data-dir", data.to_str().unwrap(), "--limit-train", "1000", "--limit-test", "100", "--val-size", "100",
        "--peers", "2", "--device", "cpu", "--threads", "1", "--listen", "/ip4/127.0.0.1/tcp/0",
    ];
    let mut first = Command::new(bin("p2pml-node"))
        .args(common)
        .arg("--state-dir")
        .arg(dir.path().join("a"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let mut addr = None;
    wait_for("the first node's address", Duration::from_secs(60), || {
        if let Some(Ok(l)) = lines.next() {
            addr = l.strip_prefix("listening ").map(str::to_string);
        }
        addr.is_some()
    });
    let o = Command::new(bin("p2pml-node"))
        .args(common)
        .args(["--lr", "0.5", "--bootstrap", addr.as_deref().unwrap()])
        .arg("--state-dir")
        .arg(dir.path().join("b"))
        .output()
        .unwrap();
    // The run's founder ignores the stranger and keeps running.
    let still_running = first.try_wait().unwrap().is_none();
    let _ = first.kill();
    let _ = first.wait();
    assert!(still_running, "the founder must not exit because a stranger was refused");
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    let last = e.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: peer ") && last.contains("refused") && last.contains("lr: 0.01 vs 0.5"), "{e}");
}

#[test]
fn a_bad_bootstrap_address_is_one_clear_line() {
    let o = Command::new(bin("p2pml-node"))
        .args(["--bootstrap", "/ip4/127.0.0.1/tcp/9", "--data-dir", fashion_mnist().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("must end in /p2p/<peer id>"), "{e}");
    assert!(!e.contains("panicked"));
}

#[test]
fn a_diverged_peer_resyncs_from_the_majority() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (_, r) = testnet(dir.path(), 3, &["--peer-args", "1=--fault-perturb-round 3"], &small_run(2000, 300, 200, 1, &[]));
    // Peer 1 corrupted its parameters after round 3; it notices that the majority
    // disagrees, fetches a majority peer's state, and is in step again.
    assert_eq!(r["all_final_digests_equal"], true, "{}", r["problems"]);
    let common = r["common_rounds"].as_u64().unwrap();
    // Round 3 differs, and the rounds until the majority's digests reach peer 1
    // (gossiped on heartbeats): a few at most.
    let differing = common - r["rounds_with_equal_digests"].as_u64().unwrap();
    assert!((1..=3).contains(&differing), "{differing} rounds differ");
    let peers = r["peer_reports"].as_array().unwrap();
    let syncs: Vec<u64> = peers.iter().map(|p| std::fs::read(dir.path().join("nodes").join(format!("n{}", p["index"])).join("report.json")))
        .map(|b| serde_json::from_slice::<Value>(&b.unwrap()).unwrap()["state_syncs"].as_u64().unwrap())
        .collect();
    assert_eq!(syncs, vec![0, 1, 0]);
}

#[test]
fn a_late_peer_joins_by_state_sync_and_trains_from_the_next_epoch() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let args = small_run(4000, 500, 400, 3, &["--min-peers", "3", "--start-grace-ms", "0", "--failure-timeout-ms", "5000"]);
    let (ok, r) = testnet(dir.path(), 4, &["--start-delay", "3=6"], &args);
    assert!(ok, "{}", r["problems"]);
    assert_eq!(r["all_final_digests_equal"], true);
    assert_eq!(r["rounds_with_equal_digests"], r["common_rounds"]);
    let late: Value = serde_json::from_slice(&std::fs::read(dir.path().join("nodes/n3/report.json")).unwrap()).unwrap();
    // One sync joins the run; on a loaded machine the joiner may fall two rounds
    // behind while it loads that state and catch up once more (a second sync).
    let (syncs, catch_ups) = (late["state_syncs"].as_u64().unwrap(), late["catch_ups"].as_u64().unwrap());
    assert!(syncs >= 1 && syncs <= 1 + catch_ups.max(1), "the late peer synced {syncs} times ({catch_ups} catch-ups)");
    let log = late["rounds_log"].as_array().unwrap();
    let first = log.first().unwrap()["round"].as_u64().unwrap();
    assert!(first > 0, "it joined a run in progress");
    // It followed (contributors 3) and then trained (contributors 4).
    assert_eq!(log.first().unwrap()["contributors"], 3);
    assert_eq!(log.last().unwrap()["contributors"], 4);
    let founders: Value = serde_json::from_slice(&std::fs::read(dir.path().join("nodes/n0/report.json")).unwrap()).unwrap();
    let acc = founders["final_test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.6, "{acc}");
}

#[test]
fn qsgd_exchange_saves_bytes_and_keeps_peers_identical() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let args = small_run(3000, 500, 300, 2, &["--compression", "qsgd:bits=4,bucket=512"]);
    let (ok, r) = testnet(dir.path(), 3, &[], &args);
    assert!(ok, "testnet reported problems: {}", r["problems"]);
    assert_eq!(r["rounds_with_equal_digests"], r["common_rounds"]);
    for p in r["peer_reports"].as_array().unwrap() {
        let rounds = p["rounds"].as_u64().unwrap();
        let plain = rounds * 1_199_882 * 4;
        let sent = p["gradient_bytes_sent"].as_u64().unwrap();
        assert!(sent * 7 <= plain, "QSGD 4-bit must send at most 1/7 of f32: {sent} vs {plain}");
        assert!(p["final_test_accuracy"].as_f64().unwrap() > 0.5);
    }
}

#[test]
fn invalid_messages_are_dropped_their_sender_scored_down_and_the_run_goes_on() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // A rogue node joins the swarm and publishes, every heartbeat: bytes that are
    // not CBOR, CBOR of the wrong type, a gradient of the wrong length, a round
    // far ahead, another run's message.
    let (ok, r) = testnet(dir.path(), 3, &["--rogues", "1"], &small_run(2000, 300, 200, 1, &[]));
    assert!(ok, "testnet reported problems: {}", r["problems"]);
    assert_eq!(r["rounds_with_equal_digests"], r["common_rounds"]);
    let rogue = &r["rogues"][0];
    let rogue_id = rogue["peer_id"].as_str().unwrap();
    assert!(!rogue_id.is_empty(), "the rogue wrote its report: {rogue}");
    assert!(rogue["garbage_sent"].as_u64().unwrap() >= 5, "the rogue published garbage: {rogue}");
    let peer_ids: Vec<&str> = r["peer_reports"].as_array().unwrap().iter().map(|p| p["peer_id"].as_str().unwrap()).collect();
    let mut scored_down = 0;
    for p in r["peer_reports"].as_array().unwrap() {
        let log = p["rounds_log"].as_array().unwrap();
        assert!(!log.is_empty());
        assert!(log.iter().all(|x| x["contributors"] == 3), "the rogue never became a member or replaced a gradient");
        let scores = p["peer_scores"].as_object().unwrap();
        // Honest peers never lose score with each other.
        for (id, s) in scores {
            if peer_ids.contains(&id.as_str()) {
                assert!(s["min"].as_f64().unwrap() >= 0.0, "peer {} scored honest peer {id} down: {s}", p["index"]);
            }
        }
        if let Some(s) = scores.get(rogue_id) {
            assert!(p["invalid_messages"].as_u64().unwrap() > 0, "peer {} saw the garbage", p["index"]);
            assert!(s["min"].as_f64().unwrap() < 0.0, "peer {} lowered the rogue's score: {s}", p["index"]);
            scored_down += 1;
        }
    }
    assert!(scored_down >= 1, "some peer was connected to the rogue and scored it down: {rogue}");
}

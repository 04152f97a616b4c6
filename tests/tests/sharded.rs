//! The sharded exchange end to end (`--exchange sharded`): real `p2pml-node`
//! processes on loopback, started by `testnet`.

use p2pml_tests::{small_run, testnet};
use serde_json::Value;

/// The multi-process tests share two cores: one at a time.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sharded(train: u32, epochs: u32) -> Vec<String> {
    small_run(train, 500, 300, epochs, &["--exchange", "sharded", "--compression", "qsgd:bits=4,bucket=512", "--seed", "3"])
}

fn received(r: &Value) -> Vec<u64> {
    r["peer_reports"].as_array().unwrap().iter().map(|p| p["bytes_received"].as_u64().unwrap()).collect()
}

#[test]
fn four_sharded_peers_hold_identical_parameters_every_round_learn_and_receive_less_than_all_to_all() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (ok, r) = testnet(dir.path(), 4, &[], &sharded(4000, 2));
    assert!(ok, "testnet reported problems: {}", r["problems"]);
    let common = r["common_rounds"].as_u64().unwrap();
    assert!(common >= 28, "{common} rounds");
    assert_eq!(r["rounds_with_equal_digests"].as_u64().unwrap(), common, "equal digests every round");
    assert_eq!(r["all_final_digests_equal"], true);
    for p in r["peer_reports"].as_array().unwrap() {
        let log = p["rounds_log"].as_array().unwrap();
        assert!(log.iter().all(|x| x["contributors"] == 4), "every shard aggregates all four");
    }
    let acc: Vec<f64> = r["accuracy_by_epoch"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(acc[1] > acc[0] && acc[1] > 0.6, "accuracy by epoch {acc:?}");

    // The same run all-to-all: each peer receives every other's whole
    // gradient; sharded, three shards' contributions and three aggregates.
    let dir2 = tempfile::tempdir().unwrap();
    let mut args = sharded(4000, 2);
    let i = args.iter().position(|a| a == "sharded").unwrap();
    args[i] = "all-to-all".into();
    let (ok, a) = testnet(dir2.path(), 4, &[], &args);
    assert!(ok, "{}", a["problems"]);
    let (s, t) = (received(&r), received(&a));
    for (x, y) in s.iter().zip(&t) {
        assert!((*x as f64) < 0.7 * *y as f64, "sharded receives {s:?}, all-to-all {t:?}");
    }
    let a_acc = a["accuracy_by_epoch"][1].as_f64().unwrap();
    assert!((acc[1] - a_acc).abs() <= 0.03, "sharded {} vs all-to-all {a_acc}", acc[1]);
}

#[test]
fn a_shard_owner_killed_mid_run_is_replaced_and_the_survivors_end_with_equal_digests() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut args = sharded(4000, 2);
    args.extend(["--failure-timeout-ms", "2000"].map(String::from));
    // Peer 3 owns a shard of every round (the owners rotate over the members).
    let (ok, r) = testnet(dir.path(), 4, &["--kill", "3@r5"], &args);
    assert!(ok, "testnet reported problems: {}", r["problems"]);
    let peers: Vec<&Value> = r["peer_reports"].as_array().unwrap().iter().filter(|p| p["index"] != 3).collect();
    assert_eq!(peers.len(), 3);
    let digests: Vec<&Value> = peers.iter().map(|p| &p["final_digest"]).collect();
    assert!(digests.iter().all(|d| *d == digests[0] && !d.is_null()), "survivors' final digests {digests:?}");
    let rounds = peers[0]["rounds"].as_u64().unwrap();
    assert!(rounds >= 28, "the run completed: {rounds} rounds");
    for p in &peers {
        assert_eq!(p["exit_code"], 0);
        let log = p["rounds_log"].as_array().unwrap();
        assert_eq!(log.last().unwrap()["contributors"], 3, "after the kill, the three survivors");
        assert!(log.iter().any(|x| x["contributors"] == 4), "before it, four");
    }
    assert_eq!(r["rounds_with_equal_digests"], r["common_rounds"]);
    assert!(peers[0]["final_test_accuracy"].as_f64().unwrap() > 0.6);
}

//! Who counts: an outsider that heartbeats without an accepted Hello never
//! becomes a member, and a member that stays alive but withholds its gradient
//! is cut off by the straggler deadline and demoted. Real `p2pml-node`
//! processes on loopback, through `testnet`.

use p2pml_tests::{small_run, testnet};
use serde_json::Value;
use std::sync::Mutex;

static HEAVY: Mutex<()> = Mutex::new(());

fn peer_ids(report: &Value) -> Vec<String> {
    report["peer_reports"].as_array().unwrap().iter().map(|p| p["peer_id"].as_str().unwrap().to_string()).collect()
}

fn node_report(out: &std::path::Path, i: usize) -> Value {
    serde_json::from_slice(&std::fs::read(out.join(format!("nodes/n{i}/report.json"))).unwrap()).unwrap()
}

/// The longest barrier wait of any round of the honest peers `honest`, in seconds.
fn max_barrier_wait(report: &Value, honest: &[usize]) -> f64 {
    honest
        .iter()
        .flat_map(|i| report["peer_reports"][*i]["rounds_log"].as_array().unwrap().iter())
        .map(|r| r["stages"]["barrier_wait"].as_f64().unwrap())
        .fold(0.0, f64::max)
}

#[test]
fn a_peer_that_heartbeats_without_a_hello_never_becomes_a_member() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tn");
    let args = small_run(2400, 300, 300, 2, &["--min-peers", "2"]);
    let (ok, r) = testnet(&out, 3, &["--rogues", "1", "--rogue-heartbeat"], &args);
    let rogue = r["rogues"][0]["peer_id"].as_str().expect("the rogue's id").to_string();
    let ids = peer_ids(&r);
    assert!(!ids.contains(&rogue));

    // It was seen (its heartbeats reached the peers), and it was named.
    let named: Vec<&str> = r["unadmitted_peers"].as_array().expect("unadmitted_peers").iter().map(|u| u["peer"].as_str().unwrap()).collect();
    assert_eq!(named, vec![rogue.as_str()], "{}", r["unadmitted_peers"]);
    assert!(!ok && !r["ok"].as_bool().unwrap(), "a run with an outsider is not silently ok: {}", r["problems"]);
    assert!(r["problems"].to_string().contains(&rogue), "{}", r["problems"]);

    for i in 0..3 {
        let n = node_report(&out, i);
        // Never a member: no membership event of any kind names it.
        let log = n["membership_log"].as_array().unwrap();
        assert!(log.iter().all(|e| e["peer"].as_str() != Some(rogue.as_str())), "peer {i} counted the outsider: {log:?}");
        let heard = n["unadmitted"].as_array().unwrap().iter().find(|u| u["peer"].as_str() == Some(rogue.as_str()));
        assert!(heard.is_some_and(|u| u["heartbeats"].as_u64().unwrap() > 0), "peer {i} saw no heartbeat of it: {}", n["unadmitted"]);
        // Every round of every epoch trained on the three honest shards and never waited for it.
        let rounds = n["rounds_log"].as_array().unwrap();
        assert!(!rounds.is_empty());
        assert!(rounds.iter().all(|x| x["contributors"].as_u64() == Some(3)), "peer {i}: a round without 3 contributors");
        assert!(n["deadline_rounds"].as_array().unwrap().is_empty(), "peer {i} waited on somebody: {}", n["deadline_rounds"]);
    }
    // The round times do not change: no barrier waits as long as the straggler
    // deadline's floor (3 s), let alone as long as the outsider stays connected.
    let wait = max_barrier_wait(&r, &[0, 1, 2]);
    assert!(wait < 3.0, "a barrier waited {wait:.2} s");
    assert!(r["all_final_digests_equal"].as_bool().unwrap());
}

#[test]
fn a_member_that_withholds_its_gradient_is_cut_off_by_the_deadline_and_demoted() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tn");
    // Default deadline settings: floor 3 s, 4 x the median round, 3 misses demote.
    let args = small_run(3000, 300, 300, 2, &["--min-peers", "3"]);
    let (ok, r) = testnet(&out, 4, &["--byzantine", "3:withhold"], &args);
    let ids = peer_ids(&r);
    let withholder = &ids[3];

    // Demoted by every honest peer after three deadline closures, and named in the report.
    let demoted: Vec<&str> = r["withholding_demotions"].as_array().expect("withholding_demotions").iter().map(|d| d["peer"].as_str().unwrap()).collect();
    assert_eq!(demoted, vec![withholder.as_str()], "{}", r["withholding_demotions"]);
    assert!(!ok && r["problems"].to_string().contains(withholder.as_str()), "{}", r["problems"]);
    let closed = r["deadline_rounds"].as_array().expect("deadline_rounds");
    assert!(closed.len() >= 3, "the report counts the deadline closures: {closed:?}");
    for i in 0..3 {
        let n = node_report(&out, i);
        let d = n["withholding_demotions"].as_array().unwrap();
        assert_eq!(d.len(), 1, "peer {i}: {d:?}");
        assert_eq!(d[0]["peer"].as_str(), Some(withholder.as_str()));
        // Three deadline closures in a row in the first epoch, then no more: the
        // withholder is out for the rest of it and not named for the next.
        assert_eq!(n["deadline_rounds"].as_array().unwrap().len(), 3, "peer {i}: {}", n["deadline_rounds"]);
        let rounds = n["rounds_log"].as_array().unwrap();
        let epoch2: Vec<&Value> = rounds.iter().filter(|x| x["epoch"].as_u64() == Some(1)).collect();
        assert!(!epoch2.is_empty() && epoch2.iter().all(|x| x["contributors"].as_u64() == Some(3)), "peer {i}: epoch 2 re-cut into 3 shards");
        println!("peer {i}: state syncs {} digest mismatches {}", n["state_syncs"], n["digest_mismatches"]);
    }
    // No round waits much longer than the deadline (3 s floor here), and the
    // honest peers end bit-identical.
    let wait = max_barrier_wait(&r, &[0, 1, 2]);
    assert!(wait < 6.0, "a barrier waited {wait:.2} s");
    let digests: Vec<&str> = (0..3).map(|i| r["peer_reports"][i]["final_digest"].as_str().unwrap()).collect();
    assert!(digests.iter().all(|d| *d == digests[0] && !d.is_empty()), "{digests:?}");
    assert_eq!(r["peer_reports"][0]["epochs"].as_u64(), Some(2));
}

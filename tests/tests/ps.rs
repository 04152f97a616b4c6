//! The parameter-server baseline end to end: a server and workers as real
//! processes on loopback, the server killed with SIGKILL and revived.

use p2pml_tests::{small_run, testnet};
use serde_json::Value;

fn node_report(dir: &std::path::Path, node: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("nodes").join(node).join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_killed_server_stalls_the_workers_and_the_run_resumes_from_its_checkpoint() {
    // Every worker in both runs (a slow start or a starved heartbeat on a loaded
    // machine must not change who trains, or the digests could not be compared).
    let args = small_run(6000, 1000, 400, 2, &["--batches-per-round", "2", "--min-peers", "4", "--failure-timeout-ms", "10000"]);
    let clean_dir = tempfile::tempdir().unwrap();
    let (ok, clean) = testnet(clean_dir.path(), 4, &["--role", "ps"], &args);
    assert!(ok, "{}", clean["problems"]);
    let rounds = node_report(clean_dir.path(), "ps")["rounds"].as_u64().unwrap();
    assert!(rounds >= 10, "a run of {rounds} rounds is too short for this test");

    // The server dies at round 4 and stays down for 10 s.
    let dir = tempfile::tempdir().unwrap();
    let (ok, r) = testnet(dir.path(), 4, &["--role", "ps", "--kill", "ps@r4", "--revive", "ps@+10"], &args);
    assert!(ok, "{}", r["problems"]);
    let faults = r["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 2, "{faults:?}");
    let (kill, revive) = (&faults[0], &faults[1]);
    // Every worker noticed, and nobody made progress while the server was down.
    let first = kill["detection_s"].as_f64().expect("the workers saw the server go");
    let last = kill["detection_last_s"].as_f64().unwrap();
    assert!(first <= 2.0 && last <= 2.5, "detection took {first} s (first worker), {last} s (last)");
    let stall = kill["stalled_s"].as_f64().expect("a stall was measured");
    assert!(stall >= 9.0, "the run stalled only {stall:.1} s with the server down 10 s");
    for i in 0..4 {
        let w = node_report(dir.path(), &format!("n{i}"));
        assert_eq!(w["role"], "worker");
        let waited = w["server_unreachable_seconds"].as_f64().unwrap();
        assert!(waited >= 5.0, "worker {i} retried the server for only {waited:.1} s");
    }
    // The server came back from its checkpoint and the run went on in step.
    let ps = node_report(dir.path(), "ps");
    assert_eq!(ps["incarnation"], 2);
    let restored = ps["checkpoints"]["restored_round"].as_u64().expect("it resumed from a checkpoint");
    // Round 4 or so; older if checkpoint writes were skipped while busy (the
    // digests below show the resume was right either way).
    assert!(restored <= 6, "restored round {restored}");
    assert!(revive["in_step_s"].as_f64().expect("it finished a round again") <= 20.0);

    // The same workers, seeds and order: the run ends exactly where the fault-free one did.
    assert_eq!(ps["rounds"].as_u64().unwrap(), rounds);
    assert_eq!(ps["final_digest"], node_report(clean_dir.path(), "ps")["final_digest"]);
    let acc = |v: &Value| v["accuracy_by_epoch"].as_array().unwrap().last().unwrap().as_f64().unwrap();
    let (a, b) = (acc(&clean), acc(&r));
    assert!((a - b).abs() <= 0.01, "fault-free {a:.4} vs with the server killed {b:.4}");
    assert!(a > 0.5, "the run learnt little: {a:.4}");
}

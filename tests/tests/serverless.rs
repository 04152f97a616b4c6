//! End-to-end: peers that offload their gradients to the function tier — the
//! real Lambda Invoke and Runtime protocols (aws-sdk-lambda → `lambda-grad host`
//! → `lambda-grad` processes) and the real S3 protocol (aws-sdk-s3 → the local
//! S3 server), all started by `testnet`.

use p2pml_tests::{small_run, testnet};
use serde_json::Value;

fn accuracy(r: &Value) -> f64 {
    r["accuracy_by_epoch"].as_array().and_then(|a| a.last()).and_then(Value::as_f64).expect("an accuracy")
}

#[test]
fn lambda_executor_reaches_the_local_accuracy_and_reports_the_tier() {
    let dir = tempfile::tempdir().unwrap();
    let common = ["--seed", "5", "--batches-per-round", "2", "--failure-timeout-ms", "10000"];
    // One torch thread per node, as in the functions: the same kernels, the same bits.
    let (ok, local) = testnet(&dir.path().join("local"), 4, &["--threads-per-node", "1"], &small_run(3000, 500, 200, 1, &common));
    assert!(ok, "local run: {}", local["problems"]);
    let mut args = common.to_vec();
    args.extend(["--executor", "lambda", "--batches-per-invocation", "1"]);
    let (ok, lambda) = testnet(&dir.path().join("lambda"), 4, &["--threads-per-node", "1"], &small_run(3000, 500, 200, 1, &args));
    assert!(ok, "lambda run: {}", lambda["problems"]);
    assert_eq!(lambda["rounds_with_equal_digests"], lambda["common_rounds"]);
    let (a, b) = (accuracy(&local), accuracy(&lambda));
    assert!((a - b).abs() <= 0.005, "local {a} vs lambda {b}");
    // Testnet peer ids are reproducible and every task is seeded by (round, peer,
    // task) wherever it runs: the function tier computes the very same run.
    let digests = |r: &Value| -> Vec<String> {
        r["peer_reports"][0]["rounds_log"].as_array().unwrap().iter().map(|x| x["digest"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(digests(&local), digests(&lambda), "local and lambda runs hold the same parameters every round");

    let t = &lambda["function_tier"];
    let rounds = lambda["peer_reports"][0]["rounds"].as_u64().unwrap();
    // 700 samples per peer: 11 batches, so 5 rounds of two grad tasks and a
    // reduce, and a last round of one task, for each of the 4 peers.
    assert_eq!(rounds, 6);
    assert_eq!(t["invocations"].as_u64().unwrap(), 4 * (3 * 5 + 1), "{t}");
    assert!(t["cold_starts"].as_u64().unwrap() >= 1, "{t}");
    assert_eq!(t["fallbacks"], 0, "{t}");
    // One upload per digest: the same parameters are put once, by one peer.
    assert_eq!(t["params_uploads"].as_u64().unwrap(), rounds, "{t}");
    assert_eq!(t["tasks_ok"].as_u64().unwrap(), t["tasks_planned"].as_u64().unwrap(), "{t}");
    // What no task needs any more is gone: the last two rounds' parameters stay.
    assert!(t["store_at_end"]["objects"].as_u64().unwrap() <= 2, "{t}");
    assert!(t["host"]["invocations"].as_u64().unwrap() >= t["invocations"].as_u64().unwrap(), "{t}");
    for p in lambda["peer_reports"].as_array().unwrap() {
        let f = &p["function_tier"];
        assert_eq!(f["reduces"].as_u64().unwrap(), rounds - 1, "{f}");
        assert!(f["params_cache_hits"].as_u64().unwrap() > 0, "warm functions reuse the parameters: {f}");
    }
    let costs = lambda["cost_table"].as_array().unwrap();
    assert_eq!(costs.len(), 4);
    for c in costs {
        assert_eq!(c["executor"], "lambda");
        assert!(c["gb_seconds"].as_f64().unwrap() > 0.0 && c["total_usd"].as_f64().unwrap() > 0.0, "{c}");
        assert!(c["paper_formula_usd"].as_f64().unwrap() > 0.0, "{c}");
    }
    for c in local["cost_table"].as_array().unwrap() {
        assert_eq!(c["executor"], "local");
        assert_eq!(c["requests"], 0);
    }
}

#[test]
fn failing_tasks_are_retried_then_computed_locally_and_the_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    // Round 1: task 0 panics on every attempt; round 2: it outlives the host's
    // 1 s timeout on every attempt. One retry each, then the peer computes it.
    let args = [
        "--executor", "lambda", "--fault-task", "panic@1", "--fault-task", "sleep:4000@2", "--task-retries", "1",
        "--task-timeout-ms", "3000", "--failure-timeout-ms", "20000",
    ];
    let (ok, r) = testnet(dir.path(), 2, &["--fn-timeout-s", "1"], &small_run(1200, 300, 100, 1, &args));
    assert!(ok, "run: {}", r["problems"]);
    assert_eq!(r["rounds_with_equal_digests"], r["common_rounds"]);
    let t = &r["function_tier"];
    assert!(t["retries"].as_u64().unwrap() >= 4, "each peer retried both failing tasks: {t}");
    assert!(t["fallbacks"].as_u64().unwrap() >= 4, "and then computed them locally: {t}");
    assert!(t["timeouts"].as_u64().unwrap() >= 4, "{t}");
    assert!(t["host"]["timeouts"].as_u64().unwrap() >= 4, "{t}");
    // Each failing task ended once, computed locally, by its cause; its retries
    // found their inputs (deletion waits for the round to end).
    assert_eq!(t["tasks_local"]["not_found"], Value::Null, "{t}");
    let local: u64 = t["tasks_local"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(local, t["fallbacks"].as_u64().unwrap(), "{t}");
    assert_eq!(t["tasks_ok"].as_u64().unwrap() + t["tasks_ok_after_retry"].as_u64().unwrap() + local, t["tasks_planned"].as_u64().unwrap(), "{t}");
    for p in r["peer_reports"].as_array().unwrap() {
        assert!(p["rounds"].as_u64().unwrap() >= 4);
    }
}

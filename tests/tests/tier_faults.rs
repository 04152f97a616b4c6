//! The function tier as a production client, through the real protocols
//! (aws-sdk-s3 → the S3 server, aws-sdk-lambda → `lambda-grad host` →
//! `lambda-grad`): a store that goes down and loses its objects mid-epoch, a
//! function host wired to the wrong store, start-up checks, accounting and
//! clean-up.

use p2pml_tests::{bin, small_run, start_s3, testnet};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn digests(r: &Value) -> Vec<String> {
    r["peer_reports"][0]["rounds_log"].as_array().unwrap().iter().map(|x| x["digest"].as_str().unwrap().to_string()).collect()
}

/// Every planned task ended once: in the tier (first try or after retries) or
/// locally by cause; per peer and summed.
fn assert_counts_add_up(r: &Value) {
    for p in r["peer_reports"].as_array().unwrap() {
        let f = &p["function_tier"];
        let n = |k: &str| f[k].as_u64().unwrap();
        let local: u64 = f["tasks_local"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
        assert!(n("tasks_planned") > 0, "{f}");
        assert_eq!(n("tasks_ok") + n("tasks_ok_after_retry") + local, n("tasks_planned"), "{f}");
        assert_eq!(local, n("fallbacks"), "{f}");
    }
    let t = &r["function_tier"];
    let n = |k: &str| t[k].as_u64().unwrap();
    assert_eq!(n("tasks_ok") + n("tasks_ok_after_retry") + n("fallbacks"), n("tasks_planned"), "{t}");
}

/// A 2-peer testnet run of `train` samples with `node_args`: it succeeds, the
/// peers agree every round, and the task counts add up.
fn tier_run(out: &Path, testnet_args: &[&str], train: u32, node_args: &[&str]) -> Value {
    let mut t = vec!["--threads-per-node", "1"];
    t.extend(testnet_args);
    let (ok, r) = testnet(out, 2, &t, &small_run(train, 300, 100, 1, node_args));
    assert!(ok, "run: {}", r["problems"]);
    assert_eq!(r["rounds_with_equal_digests"], r["common_rounds"]);
    assert_counts_add_up(&r);
    r
}

/// The objects left in the run's bucket (the local store keeps them as files).
fn bucket_listing(out: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, keys: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, keys);
            } else if !e.file_name().to_string_lossy().starts_with('.') {
                keys.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut keys = Vec::new();
    let bucket = out.join("s3").join("p2pml");
    walk(&bucket, &bucket, &mut keys);
    keys.sort();
    keys
}

#[test]
fn a_store_that_loses_its_objects_mid_epoch_is_refilled_and_the_run_stays_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let common = ["--seed", "3", "--failure-timeout-ms", "20000"];
    let run = |name: &str, testnet_args: &[&str], extra: &[&str]| {
        let mut args = common.to_vec();
        args.extend(extra);
        testnet(&dir.path().join(name), 2, testnet_args, &small_run(2400, 300, 100, 1, &args))
    };
    let (ok, local) = run("local", &["--threads-per-node", "1"], &[]);
    assert!(ok, "local run: {}", local["problems"]);
    // At round 4 the store stops for 2 s and comes back empty. The breaker is
    // kept shut so that every task meets the loss.
    let (ok, r) = run(
        "lambda",
        &["--threads-per-node", "1", "--store-outage", "r4+2"],
        &["--executor", "lambda", "--breaker-failures", "1000"],
    );
    assert!(ok, "lambda run: {}", r["problems"]);
    assert_eq!(digests(&local), digests(&r), "the same parameters every round as --executor local");
    assert_eq!(r["rounds_with_equal_digests"], r["common_rounds"]);
    assert_counts_add_up(&r);
    let t = &r["function_tier"];
    assert!(t["reuploads"].as_u64().unwrap() > 0, "the lost objects were put back: {t}");
    assert!(t["tasks_ok_after_retry"].as_u64().unwrap() > 0, "{t}");
    for p in r["peer_reports"].as_array().unwrap() {
        let f = &p["function_tier"];
        assert!(f["not_found_tasks"].as_u64().unwrap() > 0, "{f}");
        assert!(f["not_found_max_invocations"].as_u64().unwrap() <= 2, "a NotFound is tried once more, never blindly: {f}");
        // Tasks of the rounds after the outage ran in the tier again.
        let log = p["rounds_log"].as_array().unwrap();
        assert!(log.len() > 8, "{}", log.len());
    }
    // The bucket keeps only what the last rounds could still need.
    let left = bucket_listing(&dir.path().join("lambda"));
    assert!(left.len() <= 2 && left.iter().all(|k| k.contains("/params/")), "{left:?}");
    assert_eq!(t["store_at_end"]["objects"].as_u64().unwrap(), left.len() as u64);
}

#[test]
fn functions_wired_to_another_store_open_the_breaker_and_the_run_finishes_locally() {
    let dir = tempfile::tempdir().unwrap();
    let k = 3;
    let args = [
        "--seed", "3", "--executor", "lambda", "--breaker-failures", "3", "--breaker-backoff-ms", "2000",
        "--failure-timeout-ms", "20000",
    ];
    let r = tier_run(dir.path(), &["--fn-separate-store"], 2400, &args);
    for p in r["peer_reports"].as_array().unwrap() {
        let f = &p["function_tier"];
        let n = |k: &str| f[k].as_u64().unwrap();
        assert_eq!(n("tasks_ok") + n("tasks_ok_after_retry"), 0, "no function can read the inputs: {f}");
        assert!(n("breaker_opens") >= 1, "{f}");
        assert!(f["tasks_local"]["breaker_open"].as_u64().unwrap() > 0, "{f}");
        // Failed tasks before the breaker opened: at most K, then one per probe;
        // each invoked at most twice (the parameters put back once, in vain).
        let failed_in_tier = f["tasks_local"]["not_found"].as_u64().unwrap_or(0);
        assert!(failed_in_tier <= k + n("breaker_probes"), "{f}");
        assert!(n("not_found_max_invocations") <= 2, "{f}");
        assert!(n("invocations") <= 2 * failed_in_tier, "{f}");
    }
}

/// What a node printed and how it ended, killed after `limit`.
struct Ended {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
}

fn run_node(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Ended {
    let start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("p2pml-node"))
        .args(["--state-dir", dir.path().join("state").to_str().unwrap(), "--device", "cpu"])
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .env_remove("P2PML_S3_ENDPOINT")
        .env_remove("P2PML_S3_BUCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .expect("spawn p2pml-node");
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break child.wait().unwrap().code();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ended { code, stderr: std::fs::read_to_string(dir.path().join("stderr")).unwrap(), elapsed: start.elapsed() }
}

#[test]
fn wrong_bucket_closed_lambda_port_and_schemeless_endpoints_fail_at_start_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = start_s3(&dir.path().join("s3"), "p2pml", "start-test", "start-test-secret");
    let env = [("AWS_ACCESS_KEY_ID", "start-test"), ("AWS_SECRET_ACCESS_KEY", "start-test-secret"), ("AWS_REGION", "us-east-1")];
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--executor", "lambda", "--s3-endpoint", &s3.endpoint, "--s3-bucket", "p2pml-typo", "--lambda-endpoint", &closed],
            vec!["p2pml-typo", "does not exist", "--s3-bucket", "--s3-create-bucket"],
        ),
        (
            vec!["--executor", "lambda", "--s3-endpoint", &s3.endpoint, "--lambda-endpoint", &closed],
            vec!["unreachable", "--lambda-endpoint", closed.as_str()],
        ),
        (vec!["--executor", "lambda", "--s3-endpoint", "127.0.0.1:9000"], vec!["--s3-endpoint 127.0.0.1:9000", "http://HOST:PORT"]),
        (vec!["--executor", "lambda", "--lambda-endpoint", "localhost:9001"], vec!["--lambda-endpoint localhost:9001", "http://HOST:PORT"]),
    ];
    for (args, needles) in cases {
        let e = run_node(&args, &env, Duration::from_secs(30));
        assert_ne!(e.code, Some(0), "{args:?}: {}", e.stderr);
        assert!(e.elapsed < Duration::from_secs(20), "{args:?} took {:?}", e.elapsed);
        let lines: Vec<&str> = e.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got: {}", e.stderr);
        for n in needles {
            assert!(lines[0].contains(n), "{args:?}: {n:?} missing in: {}", lines[0]);
        }
        assert!(!e.stderr.contains("panicked") && !e.stderr.contains("DispatchFailure"), "{}", e.stderr);
    }
}

#[test]
fn a_backup_races_loser_is_billed_and_deletion_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    // Task 0 of round 3 takes 6 s more on every attempt: past the backup
    // deadline (3x the median warm task, at least 2 s), so a backup starts and
    // the first attempt wins while the backup still runs, reading the round's inputs.
    let args = ["--seed", "3", "--executor", "lambda", "--fault-task", "sleep:6000@3", "--failure-timeout-ms", "30000"];
    let r = tier_run(dir.path(), &[], 1800, &args);
    for p in r["peer_reports"].as_array().unwrap() {
        let f = &p["function_tier"];
        let n = |k: &str| f[k].as_u64().unwrap();
        assert!(n("backups") >= 1, "{f}");
        assert_eq!(n("not_found_tasks"), 0, "the backup and the later rounds found their inputs: {f}");
        assert_eq!(n("tasks_ok") + n("tasks_ok_after_retry"), n("tasks_planned"), "{f}");
        // Every invocation is counted, the race's loser included.
        assert_eq!(n("invocations"), n("tasks_planned") + n("reduces") + n("backups"), "{f}");
    }
    let left = bucket_listing(dir.path());
    assert!(left.len() <= 2 && left.iter().all(|k| k.contains("/params/")), "{left:?}");
}

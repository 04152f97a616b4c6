//! The executor's unit tests (the function tier end to end is in tests/).

use super::*;
use std::collections::HashSet;

#[test]
fn rounds_are_cut_into_tasks_with_distinct_stable_seeds() {
    let t = plan_round(5, 2, 7, 3, b"peer");
    assert_eq!(t.iter().map(|t| t.batches.clone()).collect::<Vec<_>>(), vec![0..2, 2..4, 4..5]);
    assert_eq!(t, plan_round(5, 2, 7, 3, b"peer"), "the same seeds every time");
    let seeds: HashSet<u64> = t.iter().map(|t| t.dropout_seed).collect();
    assert_eq!(seeds.len(), 3);
    assert!(t.iter().all(|t| (t.dropout_seed as i64) >= 0));
    assert_ne!(plan_round(5, 2, 7, 3, b"other")[0].dropout_seed, t[0].dropout_seed);
    assert_ne!(plan_round(5, 2, 7, 4, b"peer")[0].dropout_seed, t[0].dropout_seed);
    assert_eq!(plan_round(1, 4, 7, 3, b"peer").len(), 1);
}

#[test]
fn fault_flags_parse_and_bad_ones_say_what_is_expected() {
    assert_eq!(parse_fault("panic@3"), Ok((3, Fault::Panic)));
    assert_eq!(parse_fault("sleep:1500@2"), Ok((2, Fault::SleepMs(1500))));
    assert!(parse_fault("explode@1").unwrap_err().contains("expected panic@ROUND"));
    assert!(parse_executor("gpu").unwrap_err().contains("expected local or lambda"));
}

#[test]
fn cost_bills_gb_seconds_and_requests_and_follows_the_paper_formula() {
    let mut cfg = ExecConfig { executor: ExecutorKind::Lambda, ..Default::default() };
    cfg.pricing.memory_mb = 1024;
    let stats = ExecStats { invocations: 10, billed_ms: 2000, ..Default::default() };
    let c = cost(&cfg, &stats, 100.0, 4);
    assert!((c.gb_seconds - 2.0).abs() < 1e-12);
    let lambda = 2.0 * cfg.pricing.gb_second + 10.0 * cfg.pricing.per_request;
    assert!((c.lambda_usd - lambda).abs() < 1e-15);
    assert!((c.instance_usd - 100.0 * cfg.pricing.offload_instance_per_s).abs() < 1e-15);
    let paper = (cfg.pricing.gb_second * 4.0 + cfg.pricing.offload_instance_per_s) * 100.0;
    assert!((c.paper_formula_usd - paper).abs() < 1e-12);
    let local = cost(&ExecConfig::default(), &ExecStats::default(), 100.0, 4);
    assert_eq!(local.requests, 0);
    assert!((local.total_usd - 100.0 * cfg.pricing.local_instance_per_s).abs() < 1e-15);
}

#[test]
fn the_breaker_opens_after_k_failures_probes_and_closes_or_backs_off() {
    let t0 = Instant::now();
    let s = |n: u64| t0 + Duration::from_secs(n);
    let mut b = Breaker::new(3, Duration::from_secs(10), Duration::from_secs(25));
    assert_eq!(b.admit(t0), Admit::All);
    assert_eq!(b.record(t0, false, "timeout"), None);
    assert_eq!(b.record(t0, true, ""), None, "a success resets the count");
    assert_eq!(b.record(t0, false, "timeout"), None);
    assert_eq!(b.record(t0, false, "timeout"), None);
    let line = b.record(t0, false, "not_found").expect("opens on the third failure in a row");
    assert!(line.contains("3 tasks failed in a row (last: not_found)") && line.contains("10 s"), "{line}");
    assert_eq!(b.admit(s(9)), Admit::Nothing);
    assert_eq!(b.admit(s(10)), Admit::Probe);
    let line = b.record(s(10), false, "timeout").expect("a failed probe re-opens");
    assert!(line.contains("probe task failed") && line.contains("20 s"), "{line}");
    assert_eq!(b.admit(s(29)), Admit::Nothing);
    assert_eq!(b.admit(s(30)), Admit::Probe);
    assert!(b.record(s(30), false, "timeout").unwrap().contains("25 s"), "capped");
    assert_eq!(b.admit(s(55)), Admit::Probe);
    assert!(b.record(s(55), true, "").unwrap().contains("offloading again"));
    assert_eq!(b.admit(s(55)), Admit::All);
    assert_eq!((b.opens, b.probes), (3, 3));
    // Closed again, the back-off starts over; unreachable opens at once.
    assert!(b.trip(s(60), "unreachable").unwrap().contains("10 s"));
    assert_eq!(b.trip(s(61), "unreachable"), None, "already open");
    assert_eq!(b.admit(s(65)), Admit::Nothing);
}

#[test]
fn missing_keys_are_read_from_not_found_messages_of_this_bucket_only() {
    let m = "cannot read batch: object s3://p2pml/run1/data/peer/e0/b3 not found";
    assert_eq!(missing_key(m, "p2pml").as_deref(), Some("run1/data/peer/e0/b3"));
    assert_eq!(missing_key(m, "other"), None);
    assert_eq!(missing_key("cannot read batch: gone", "p2pml"), None);
    assert_eq!(missing_key("object s3://p2pml/ not found", "p2pml"), None);
}

#[test]
fn exactly_one_member_uploads_each_digest_and_all_agree() {
    let members = ["a", "b", "c", "d"];
    let mut by = std::collections::HashMap::new();
    for d in 0..64 {
        let digest = format!("{d:064x}");
        let ups: Vec<&str> = members.iter().copied().filter(|m| params_uploader(&digest, members, m)).collect();
        assert_eq!(ups.len(), 1, "{digest}: {ups:?}");
        *by.entry(ups[0]).or_insert(0) += 1;
    }
    assert_eq!(by.len(), 4, "the work is spread: {by:?}");
    assert!(params_uploader("x", [], "a"), "no members known: upload");
}

#[test]
fn bad_endpoints_and_buckets_name_the_flag() {
    let mut c = ExecConfig::default();
    c.store.endpoint = Some("127.0.0.1:9000".into());
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("--s3-endpoint 127.0.0.1:9000") && e.contains("http://HOST:PORT"), "{e}");
    let mut c = ExecConfig { lambda_endpoint: Some("localhost:9001".into()), ..Default::default() };
    assert!(c.validate().unwrap_err().to_string().contains("--lambda-endpoint localhost:9001"));
    c.lambda_endpoint = None;
    c.store.bucket = "My_Bucket".into();
    assert_eq!(c.validate().unwrap_err(), ExecConfigError::Bucket("My_Bucket".into()));
    c.store.bucket = "ok-bucket".into();
    c.task_timeout_ms = 99;
    assert_eq!(c.validate().unwrap_err().to_string(), "--task-timeout-ms must be at least 100");
}

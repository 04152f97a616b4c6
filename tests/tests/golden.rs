//! Golden digests: fixed-seed runs whose every round's parameters digest is
//! recorded in `tests/golden/digests.json`. A refactoring that "changes no
//! behaviour" must keep them bit for bit: a 4-peer run, a parameter-server run,
//! a run with a peer killed and revived (at rounds, not at times), and an
//! asynchronous run (staleness 0: with a larger bound, which stale gradient
//! arrives first is a matter of timing, by design).
//!
//! `P2PML_GOLDEN_RECORD=1 cargo test --release -p p2pml-tests --test golden`
//! records them again (only when a change of behaviour is intended: say so in
//! the commit).

use p2pml_tests::{root, small_run, testnet};
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn cases() -> Vec<(&'static str, Vec<&'static str>, Vec<String>)> {
    let common = ["--seed", "11", "--failure-timeout-ms", "2000"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { common.iter().copied().chain(extra.iter().copied()).collect() };
    vec![
        ("p2p", vec![], small_run(1600, 200, 100, 2, &with(&[]))),
        ("ps", vec!["--role", "ps"], small_run(1600, 200, 100, 2, &with(&[]))),
        ("kill_revive", vec!["--kill", "3@r4", "--revive", "3@r8"], small_run(3000, 200, 100, 3, &with(&[]))),
        ("async", vec![], small_run(1600, 200, 100, 2, &with(&["--sync", "async", "--max-staleness", "0"]))),
    ]
}

/// Per node (by index, the server as "ps"): the final digest; for node 0 also
/// every round's digest.
fn digests(dir: &std::path::Path) -> Value {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir.join("nodes")).expect("nodes/") {
        let entry = entry.expect("a node directory");
        let name = entry.file_name().to_string_lossy().to_string();
        let Ok(bytes) = std::fs::read(entry.path().join("report.json")) else { continue };
        let r: Value = serde_json::from_slice(&bytes).expect("a node report");
        let mut v = json!({ "final": r["final_digest"] });
        if name == "n0" {
            let rounds: Vec<Value> = r["rounds_log"].as_array().expect("rounds_log").iter().map(|x| x["digest"].clone()).collect();
            v["rounds"] = Value::Array(rounds);
        }
        out.insert(name, v);
    }
    serde_json::to_value(out).expect("json")
}

#[test]
fn fixed_seed_runs_keep_their_golden_digests() {
    let path = root().join("tests/golden/digests.json");
    let record = std::env::var_os("P2PML_GOLDEN_RECORD").is_some();
    let golden: Value = if record { json!({}) } else { serde_json::from_slice(&std::fs::read(&path).expect("tests/golden/digests.json")).expect("golden json") };
    let mut now = serde_json::Map::new();
    for (name, tn, args) in cases() {
        let dir = tempfile::tempdir().unwrap();
        let mut tn_args = vec!["--threads-per-node", "1"];
        tn_args.extend(tn);
        let (ok, r) = testnet(dir.path(), 4, &tn_args, &args);
        assert!(ok, "{name}: {}", r["problems"]);
        let d = digests(dir.path());
        if !record {
            assert_eq!(d, golden[name], "{name}: the digests differ from tests/golden/digests.json");
        }
        now.insert(name.to_string(), d);
    }
    if record {
        std::fs::write(&path, serde_json::to_string_pretty(&Value::Object(now)).unwrap() + "\n").expect("write the golden digests");
    }
}

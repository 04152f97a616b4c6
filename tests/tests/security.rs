//! End-to-end security: a private swarm refuses peers without its key, and
//! forged or mangled gossip is refused before it reaches aggregation. Real
//! `p2pml-node` processes on loopback.

use p2pml_tests::{bin, small_run, testnet, wait_for};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

static HEAVY: Mutex<()> = Mutex::new(());

fn swarm_key(path: &Path) {
    let o = Command::new(bin("p2pml-node")).args(["swarm-key", "--out"]).arg(path).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Starts a node (stderr to `<dir>/<name>.stderr`) and returns it with the first
/// address it prints.
fn start(dir: &Path, name: &str, args: &[String]) -> (Child, String) {
    let err = std::fs::File::create(dir.join(format!("{name}.stderr"))).unwrap();
    let mut child = Command::new(bin("p2pml-node")).args(args).stdout(Stdio::piped()).stderr(err).spawn().unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads stdout to the end, so that the node never blocks on a full pipe.
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if let Some(a) = l.strip_prefix("listening ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("node {name} printed no address in 60 s: {}", stderr_of(dir, name))
    });
    (child, addr)
}

fn stderr_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.stderr"))).unwrap_or_default()
}

/// Waits (bounded) for `child` to exit.
fn exit_code(child: &mut Child, name: &str, limit: Duration) -> Option<i32> {
    let mut status = None;
    wait_for(&format!("node {name} to exit"), limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap().code()
}

fn node_args(dir: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let mut v = small_run(1000, 200, 100, 1, &["--peers", "2", "--min-peers", "2", "--threads", "1", "--start-grace-ms", "120000"]);
    v.extend(["--listen", "/ip4/127.0.0.1/tcp/0", "--state-dir"].map(String::from));
    v.push(dir.join(name).to_str().unwrap().into());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn report(dir: &Path, name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(name).join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_private_swarm_refuses_peers_without_its_key() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (key, other) = (dir.path().join("swarm.key"), dir.path().join("other.key"));
    swarm_key(&key);
    swarm_key(&other);
    let key_s = key.to_str().unwrap();
    let (mut a, addr) = start(dir.path(), "a", &node_args(dir.path(), "a", &["--swarm-key", key_s]));

    // Two intruders: one with no key, one with another swarm's key.
    let other_s = other.to_str().unwrap();
    let mut intruder_ids = Vec::new();
    let mut intruders = Vec::new();
    for (i, extra) in [vec!["--bootstrap", &addr], vec!["--swarm-key", other_s, "--bootstrap", &addr]].iter().enumerate() {
        let name = format!("intruder{i}");
        let (child, their_addr) = start(dir.path(), &name, &node_args(dir.path(), &name, extra));
        intruder_ids.push(their_addr.rsplit('/').next().unwrap().to_string());
        intruders.push((name, child));
    }
    for (name, mut child) in intruders {
        let code = exit_code(&mut child, &name, Duration::from_secs(120));
        let err = stderr_of(dir.path(), &name);
        assert_eq!(code, Some(1), "an intruder must fail: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: cannot reach any bootstrap peer") && last.contains("--swarm-key"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(a.try_wait().unwrap().is_none(), "the node outlives the intruders");

    // A peer with the key joins, and the two train together.
    let (mut b, _) = start(dir.path(), "b", &node_args(dir.path(), "b", &["--swarm-key", key_s, "--bootstrap", &addr]));
    for (name, child) in [("a", &mut a), ("b", &mut b)] {
        let code = exit_code(child, name, Duration::from_secs(300));
        assert_eq!(code, Some(0), "node {name} failed: {}", stderr_of(dir.path(), name));
    }
    let (ra, rb) = (report(dir.path(), "a"), report(dir.path(), "b"));
    assert!(ra["rounds"].as_u64().unwrap() > 0);
    assert_eq!(ra["final_digest"], rb["final_digest"]);
    assert!(ra["rounds_log"].as_array().unwrap().iter().all(|r| r["contributors"] == 2));
    // The intruders never got as far as gossip with the run's node.
    for id in &intruder_ids {
        assert!(ra["peer_scores"].get(id).is_none(), "intruder {id} reached gossipsub: {}", ra["peer_scores"]);
    }
}

#[test]
fn a_bad_swarm_key_file_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key\n").unwrap();
    let o = Command::new(bin("p2pml-node"))
        .args(node_args(dir.path(), "n", &["--swarm-key", bad.to_str().unwrap()]))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("is not a swarm key") && last.contains("p2pml-node swarm-key --out"), "{err}");
    // swarm-key never overwrites a key by accident.
    let key = dir.path().join("k");
    swarm_key(&key);
    let before = std::fs::read(&key).unwrap();
    let o = Command::new(bin("p2pml-node")).args(["swarm-key", "--out"]).arg(&key).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pass --force"));
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn forged_and_mangled_gossip_is_refused_and_never_aggregated() {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // A rogue that forges: every message it publishes is unsigned and claims to
    // come from peer 0, among them a well-formed announcement of peer 0's next
    // gradient; the rest are mangled (not CBOR, wrong type, truncated, wrong
    // length, far ahead, another run's).
    let (ok, r) = testnet(dir.path(), 3, &["--rogues", "1", "--rogue-forge"], &small_run(2000, 300, 200, 1, &[]));
    assert!(ok, "testnet reported problems: {}", r["problems"]);
    assert_eq!(r["rounds_with_equal_digests"], r["common_rounds"]);
    let rogue = &r["rogues"][0];
    let rogue_id = rogue["peer_id"].as_str().unwrap();
    assert!(rogue["garbage_sent"].as_u64().unwrap() >= 5, "the rogue published: {rogue}");
    let mut scored_down = 0;
    for p in r["peer_reports"].as_array().unwrap() {
        let log = p["rounds_log"].as_array().unwrap();
        assert!(!log.is_empty());
        // Had the forged announcement been taken for peer 0's, that round would
        // have lost peer 0's real gradient (or the peers' digests would differ).
        assert!(log.iter().all(|x| x["contributors"] == 3), "peer {}: a forged message reached aggregation", p["index"]);
        if let Some(s) = p["peer_scores"].get(rogue_id) {
            assert!(s["min"].as_f64().unwrap() < 0.0, "peer {} lowered the forger's score: {s}", p["index"]);
            scored_down += 1;
        }
    }
    assert!(scored_down >= 1, "some peer was connected to the forger and scored it down: {rogue}");
}

//! Bad input to `p2pml-node`, as a user types it: each case must fail at once
//! with one clear line on stderr (`error: ...`), a non-zero exit and no panic.
//! Plus the listen port that is already taken, and a bootstrap address by host
//! name (`/dns4/localhost/...`).

use p2pml_tests::{bin, fashion_mnist};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests that start nodes share two cores: one at a time.
static NODES: Mutex<()> = Mutex::new(());

/// What a finished (or killed) process left.
struct Outcome {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
    timed_out: bool,
}

/// Runs `p2pml-node args` in `cwd`, killing it after `limit`.
fn run_node(cwd: &Path, args: &[String], limit: Duration) -> Outcome {
    let start = Instant::now();
    let mut child = Command::new(bin("p2pml-node"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn p2pml-node");
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut timed_out = false;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap().code();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    Outcome { code, stderr: reader.join().unwrap(), elapsed, timed_out }
}

/// A line of the tracing log (`2025-01-02T03:04:05.678Z  WARN target: ...`),
/// with or without colours.
fn is_log_line(line: &str) -> bool {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequence: ESC [ ... letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let b = plain.as_bytes();
    b.len() > 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[10] == b'T'
        && [" TRACE ", " DEBUG ", " INFO ", " WARN ", " ERROR "].iter().any(|l| plain.contains(l))
}

/// The one error line of `o`, after checking the rules every case follows.
fn one_error_line<'a>(what: &str, o: &'a Outcome, limit_s: u64) -> &'a str {
    assert!(!o.timed_out, "{what}: still running after {limit_s} s; stderr:\n{}", o.stderr);
    assert!(matches!(o.code, Some(c) if c != 0), "{what}: exit {:?}, expected a failure; stderr:\n{}", o.code, o.stderr);
    assert!(!o.stderr.contains("panicked"), "{what}: panicked:\n{}", o.stderr);
    let other: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty() && !is_log_line(l)).collect();
    assert_eq!(other.len(), 1, "{what}: expected exactly one line that is not a log line, got:\n{}", o.stderr);
    assert!(other[0].starts_with("error: "), "{what}: the line should start with `error: `: {}", other[0]);
    other[0]
}

/// A tiny IDX data set whose training labels include `bad_label` at index 3.
fn write_idx(dir: &Path, bad_label: Option<u8>) {
    for (prefix, n) in [("train", 40usize), ("t10k", 10)] {
        let images = vec![7u8; n * 784];
        let mut labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        if let (Some(l), "train") = (bad_label, prefix) {
            labels[3] = l;
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), p2pml_lambda_grad::data::encode_idx(&[n, 28, 28], &images)).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), p2pml_lambda_grad::data::encode_idx(&[n], &labels)).unwrap();
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A free TCP port on loopback (free when this returns).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn bad_input_gives_one_clear_line_quickly() {
    let _one = NODES.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let fm = fashion_mnist();
    let fm = fm.to_str().unwrap();
    let good = tmp.path().join("good");
    std::fs::create_dir(&good).unwrap();
    write_idx(&good, None);
    let bad_labels = tmp.path().join("bad-labels");
    std::fs::create_dir(&bad_labels).unwrap();
    write_idx(&bad_labels, Some(10));
    let empty_key = tmp.path().join("empty-key");
    std::fs::create_dir(&empty_key).unwrap();
    std::fs::write(empty_key.join("peer.key"), b"").unwrap();
    let junk_key = tmp.path().join("junk-key");
    std::fs::create_dir(&junk_key).unwrap();
    std::fs::write(junk_key.join("peer.key"), b"not a key at all\n").unwrap();
    let key_dir = tmp.path().join("key-dir");
    std::fs::create_dir(&key_dir).unwrap();
    let id = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

    // (what, arguments, words the error line must hold)
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        ("threads far too many", strings(&["--threads", "100000"]), vec!["--threads 100000", "cores"]),
        ("threads too many", strings(&["--threads", "1000"]), vec!["--threads 1000"]),
        ("momentum nan", strings(&["--momentum", "nan"]), vec!["--momentum", "NaN"]),
        ("momentum negative", strings(&["--momentum=-5"]), vec!["--momentum", "-5"]),
        ("momentum one", strings(&["--momentum", "1"]), vec!["--momentum", "[0, 1)"]),
        ("weight decay inf", strings(&["--weight-decay", "inf"]), vec!["--weight-decay", "inf"]),
        ("weight decay negative", strings(&["--weight-decay=-0.1"]), vec!["--weight-decay"]),
        ("lr nan", strings(&["--lr", "nan"]), vec!["--lr"]),
        ("lr zero", strings(&["--lr", "0"]), vec!["--lr"]),
        ("lr not a number", strings(&["--lr", "fast"]), vec!["--lr"]),
        ("price nan", strings(&["--price-gb-second", "nan"]), vec!["--price-gb-second"]),
        ("unknown model", strings(&["--model", "lenet"]), vec!["lenet", "resnet18"]),
        ("compression garbage", strings(&["--compression", "zip:9"]), vec!["--compression"]),
        ("exchange unknown", strings(&["--exchange", "ring"]), vec!["--exchange", "all-to-all or sharded"]),
        ("sharded krum", strings(&["--exchange", "sharded", "--aggregation", "krum:1"]), vec!["--exchange sharded", "krum", "all-to-all"]),
        ("sharded async", strings(&["--exchange", "sharded", "--sync", "async"]), vec!["--exchange sharded", "--sync sync"]),
        ("bootstrap not a multiaddr", strings(&["--bootstrap", "10.0.0.1:4001"]), vec!["--bootstrap", "not a multiaddr"]),
        ("bootstrap without peer id", strings(&["--bootstrap", "/ip4/127.0.0.1/tcp/9"]), vec!["must end in /p2p/<peer id>"]),
        ("bootstrap over udp", vec!["--bootstrap".into(), format!("/ip4/127.0.0.1/udp/9/quic-v1/p2p/{id}")], vec!["TCP"]),
        ("bootstrap port 0", vec!["--bootstrap".into(), format!("/ip4/127.0.0.1/tcp/0/p2p/{id}")], vec!["port 0"]),
        ("listen by host name", strings(&["--listen", "/dns4/localhost/tcp/0"]), vec!["--listen", "/ip4/ADDR/tcp/PORT"]),
        ("listen not a multiaddr", strings(&["--listen", "0.0.0.0:4001"]), vec!["--listen", "not a multiaddr"]),
        (
            "missing data dir",
            vec!["--data-dir".into(), tmp.path().join("nowhere").to_str().unwrap().into()],
            vec!["not found", "nowhere"],
        ),
        (
            "label out of range",
            vec!["--data-dir".into(), bad_labels.to_str().unwrap().into(), "--val-size".into(), "5".into()],
            vec!["train-labels-idx1-ubyte", "label 10 at index 3"],
        ),
        (
            "listen on an address that is not ours",
            vec!["--data-dir".into(), good.to_str().unwrap().into(), "--val-size".into(), "5".into(), "--listen".into(), "/ip4/192.0.2.1/tcp/0".into()],
            vec!["192.0.2.1", "not an address of this machine"],
        ),
        (
            "empty peer key",
            vec!["--data-dir".into(), good.to_str().unwrap().into(), "--val-size".into(), "5".into(), "--state-dir".into(), empty_key.to_str().unwrap().into()],
            vec!["peer.key", "is empty", "delete it"],
        ),
        (
            "corrupt peer key",
            vec!["--data-dir".into(), good.to_str().unwrap().into(), "--val-size".into(), "5".into(), "--state-dir".into(), junk_key.to_str().unwrap().into()],
            vec!["peer.key", "corrupt", "delete it"],
        ),
        (
            "swarm key into a directory",
            vec!["swarm-key".into(), "--out".into(), key_dir.to_str().unwrap().into()],
            vec!["is a directory"],
        ),
        (
            "swarm key into a directory, forced",
            vec!["swarm-key".into(), "--out".into(), key_dir.to_str().unwrap().into(), "--force".into()],
            vec!["is a directory"],
        ),
        ("unknown flag", strings(&["--no-such-flag"]), vec!["--no-such-flag"]),
        ("standalone bad momentum", strings(&["train", "--momentum", "nan"]), vec!["--momentum"]),
    ];
    const LIMIT_S: u64 = 20;
    let mut failures = Vec::new();
    for (what, args, words) in &cases {
        let cwd = tmp.path().join(format!("cwd-{}", what.replace(' ', "-")));
        std::fs::create_dir_all(&cwd).unwrap();
        let mut full = args.clone();
        // Fail on the flag under test, not on something this machine lacks.
        let is_node = !matches!(full.first().map(String::as_str), Some("swarm-key" | "train"));
        if is_node {
            if !full.iter().any(|a| a == "--data-dir") {
                full.extend(["--data-dir".into(), fm.into(), "--limit-train".into(), "600".into(), "--limit-test".into(), "100".into(), "--val-size".into(), "100".into()]);
            }
            full.extend(["--device", "cpu", "--metrics-addr", "none", "--peers", "2"].map(String::from));
            if !full.iter().any(|a| a == "--listen") {
                full.extend(["--listen", "/ip4/127.0.0.1/tcp/0"].map(String::from));
            }
        }
        let o = run_node(&cwd, &full, Duration::from_secs(LIMIT_S));
        let result = std::panic::catch_unwind(|| {
            let line = one_error_line(what, &o, LIMIT_S).to_string();
            for w in words {
                assert!(line.contains(w), "{what}: the line should mention {w:?}: {line}");
            }
            assert!(o.elapsed < Duration::from_secs(LIMIT_S), "{what}: took {:?}", o.elapsed);
            line
        });
        match result {
            Ok(line) => eprintln!("ok   {what} ({:.1} s): {line}", o.elapsed.as_secs_f64()),
            Err(e) => {
                let msg = e.downcast_ref::<String>().cloned().unwrap_or_else(|| "?".into());
                eprintln!("FAIL {what}: {msg}");
                failures.push(what.to_string());
            }
        }
    }
    assert!(failures.is_empty(), "failed cases: {failures:?}");
}

/// Starts a node that prints its `listening` lines; returns it and its first address.
fn start_listener(state: &Path, listen: &str, extra: &[String]) -> (Child, String, mpsc::Receiver<String>) {
    let mut child = Command::new(bin("p2pml-node"))
        .args(["--listen", listen, "--state-dir", state.to_str().unwrap(), "--metrics-addr", "none"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let addr = loop {
        let left = Duration::from_secs(60).saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) => {
                if let Some(a) = l.strip_prefix("listening ") {
                    break a.to_string();
                }
            }
            Err(_) => {
                let _ = child.kill();
                let mut e = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut e);
                panic!("no `listening` line within 60 s; stderr:\n{e}");
            }
        }
    };
    (child, addr, rx)
}

fn tiny_run() -> Vec<String> {
    let fm = fashion_mnist();
    strings(&[
        "--data-dir", fm.to_str().unwrap(), "--limit-train", "600", "--limit-test", "100", "--val-size", "100",
        "--epochs", "1", "--peers", "2", "--device", "cpu", "--threads", "1",
    ])
}

#[test]
fn a_listen_port_in_use_fails_at_start() {
    let _one = NODES.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let (mut first, addr, _lines) = start_listener(&tmp.path().join("a"), &listen, &tiny_run());
    assert!(addr.starts_with(&format!("{listen}/p2p/")), "{addr}");
    let mut args = strings(&["--listen", &listen, "--state-dir", tmp.path().join("b").to_str().unwrap(), "--metrics-addr", "none"]);
    args.extend(tiny_run());
    let o = run_node(tmp.path(), &args, Duration::from_secs(30));
    let first_alive = first.try_wait().unwrap().is_none();
    let _ = first.kill();
    let _ = first.wait();
    let line = one_error_line("second node on a busy port", &o, 30);
    assert!(line.contains(&format!("port {port} is already in use")), "{line}");
    assert!(first_alive, "the first node must keep running");
    // Every interface (0.0.0.0) on a port that one interface already holds: refused too.
    let (mut first, _, _lines) = start_listener(&tmp.path().join("c"), &listen, &tiny_run());
    let mut args = strings(&["--listen", &format!("/ip4/0.0.0.0/tcp/{port}"), "--state-dir", tmp.path().join("d").to_str().unwrap()]);
    args.extend(["--metrics-addr".into(), "none".into()]);
    args.extend(tiny_run());
    let o = run_node(tmp.path(), &args, Duration::from_secs(30));
    let _ = first.kill();
    let _ = first.wait();
    let line = one_error_line("wildcard on a busy port", &o, 30);
    assert!(line.contains("already in use"), "{line}");
}

#[test]
fn a_bootstrap_address_by_host_name_works() {
    let _one = NODES.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    // A private swarm: the pre-shared key wraps connections to resolved addresses too.
    let key = tmp.path().join("swarm.key");
    let o = Command::new(bin("p2pml-node")).args(["swarm-key", "--out", key.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut run = tiny_run();
    run.extend(["--swarm-key".into(), key.to_str().unwrap().into()]);
    let (mut first, addr, _lines) = start_listener(&tmp.path().join("a"), "/ip4/127.0.0.1/tcp/0", &run);
    // /ip4/127.0.0.1/tcp/PORT/p2p/ID -> /dns4/localhost/tcp/PORT/p2p/ID
    let by_name = addr.replacen("/ip4/127.0.0.1/", "/dns4/localhost/", 1);
    assert_ne!(by_name, addr);
    let mut args = strings(&["--listen", "/ip4/127.0.0.1/tcp/0", "--state-dir", tmp.path().join("b").to_str().unwrap(), "--metrics-addr", "none"]);
    args.extend(["--bootstrap".into(), by_name.clone()]);
    args.extend(run);
    let o = run_node(tmp.path(), &args, Duration::from_secs(240));
    // The founder finishes the same run.
    let start = Instant::now();
    let first_code = loop {
        if let Some(s) = first.try_wait().unwrap() {
            break s.code();
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = first.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!o.timed_out, "the node bootstrapping from {by_name} did not finish; stderr:\n{}", o.stderr);
    assert_eq!(o.code, Some(0), "the node bootstrapping from {by_name} failed; stderr:\n{}", o.stderr);
    assert!(!o.stderr.contains("not supported"), "{}", o.stderr);
    assert_eq!(first_code, Some(0), "the founder did not finish the run");
}

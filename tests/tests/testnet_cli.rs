//! testnet's command line from the outside: bad input gives one clear line and a
//! non-zero exit within seconds, never a panic, and touches no file; an earlier
//! run's output is never deleted unasked; a node that fails ends the run within
//! seconds, quoting its error; a signal stops the run in order and the report
//! says it was interrupted.

use p2pml_tests::{bin, small_run, wait_for};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A testnet process whose output goes to files; killed if the test fails.
struct Testnet {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

impl Testnet {
    fn start(args: &[String], logs: &Path) -> Testnet {
        std::fs::create_dir_all(logs).unwrap();
        let (stdout, stderr) = (logs.join("testnet.stdout"), logs.join("testnet.stderr"));
        let child = Command::new(bin("testnet"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start testnet");
        Testnet { child: Some(child), stdout, stderr, started: Instant::now() }
    }

    /// Waits (at most `limit`) for the exit: (exit code, stdout, stderr, seconds).
    fn finish(mut self, limit: Duration) -> (Option<i32>, String, String, Duration) {
        let mut status = None;
        let child = self.child.as_mut().unwrap();
        wait_for("testnet to exit", limit, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        self.child = None;
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        (status.unwrap().code(), read(&self.stdout), read(&self.stderr), self.started.elapsed())
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = Command::new("kill").args(["-s", sig, &pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill -s {sig} {pid}");
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The lines of stderr that are testnet's own (not a tracing line of a library).
fn own_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !(l.contains(" WARN ") || l.contains(" INFO ") || l.contains(" DEBUG ") || l.contains(" TRACE ")))
        .collect()
}

#[test]
fn bad_input_gives_one_clear_line_fast_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // (testnet arguments after `run --peers 2 --out DIR`, what the line must name)
    let run_cases: &[(&[&str], &str)] = &[
        (&["--kill", "9@r5"], "--kill 9@r5"),
        (&["--kill", "1@inf"], "--kill 1@inf"),
        (&["--kill", "1@1e30"], "--kill 1@1e30"),
        (&["--revive", "1@+nan"], "--revive 1@+nan"),
        (&["--timeout", "18446744073709551615"], "--timeout"),
        (&["--timeout", "0"], "--timeout"),
        (&["--start-delay", "1=inf"], "--start-delay 1=inf"),
        (&["--start-delay", "1=1e30"], "--start-delay 1=1e30"),
        (&["--start-delay", "1=-2"], "--start-delay 1=-2"),
        (&["--start-delay", "0=5"], "--start-delay 0=5"),
        (&["--start-delay", "1"], "--start-delay 1"),
        (&["--prometheus-linger", "inf"], "--prometheus-linger"),
        (&["--prometheus-linger", "NaN"], "--prometheus-linger"),
        (&["--partition", "0|1@r2+nan"], "--partition 0|1@r2+nan"),
        (&["--partition", "0|1@r2+-5"], "--partition 0|1@r2+-5"),
        (&["--partition", "0|1@r2+0"], "--partition 0|1@r2+0"),
        (&["--partition", "0|1@inf+5"], "--partition 0|1@inf+5"),
        (&["--random-kills", "2", "--interval", "0"], "--interval"),
        (&["--random-kills", "2", "--interval", "inf"], "--interval"),
        (&["--random-kills", "2", "--down=-1"], "--down"),
        (&["--fn-timeout-s", "nan"], "--fn-timeout-s"),
        (&["--byzantine", "1:bogus"], "--byzantine 1:bogus"),
        (&["--byzantine", "5:withhold"], "--byzantine 5:withhold"),
        (&["--byzantine", "1:withhold", "--byzantine", "1:nan"], "--byzantine 1:nan"),
        (&["--peer-args", "5=--lr 0"], "--peer-args 5=--lr 0"),
        (&["--peer-args", "nonsense"], "--peer-args nonsense"),
        (&["--rogue-heartbeat"], "--rogue-heartbeat"),
        (&["--rogues", "1", "--rogue-heartbeat", "--rogue-forge"], "--rogue-heartbeat"),
        (&["--threads-per-node", "0"], "--threads-per-node"),
        (&["--role", "ps", "--rogues", "1"], "--rogues"),
        (&["--store-outage", "r3+4"], "--store-outage"),
        (&["--fn-separate-store"], "--executor lambda"),
    ];
    let mut cases: Vec<(Vec<String>, String, PathBuf)> = Vec::new();
    for (k, (extra, names)) in run_cases.iter().enumerate() {
        let out = dir.path().join(format!("run{k}"));
        let mut args = strings(&["run", "--peers", "2", "--out", out.to_str().unwrap()]);
        args.extend(strings(extra));
        cases.push((args, names.to_string(), out));
    }
    for (k, (extra, names)) in [
        (&["--target-accuracy", "2"][..], "--target-accuracy"),
        (&["--prometheus-linger", "inf"][..], "--prometheus-linger"),
        (&["--partition", "ps|0@r2+nan", "--kill", "ps@r1"][..], "--partition"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("cmp{k}"));
        let mut args = strings(&["compare", "--peers", "2", "--out", out.to_str().unwrap()]);
        args.extend(strings(extra));
        cases.push((args, names.to_string(), out));
    }
    // Node arguments after `--` do not change the verdict.
    for (args, _, _) in &mut cases {
        args.extend(strings(&["--", "--epochs", "1"]));
    }
    let mut failures = Vec::new();
    for (k, (args, names, out)) in cases.iter().enumerate() {
        let t = Testnet::start(args, &dir.path().join(format!("logs{k}")));
        let (code, _, stderr, took) = t.finish(Duration::from_secs(30));
        let lines = own_lines(&stderr);
        let ok = code.is_some_and(|c| c != 0 && c != 101)
            && !stderr.contains("panicked")
            && lines.len() == 1
            && lines[0].starts_with("error: ")
            && lines[0].contains(names.as_str())
            && took < Duration::from_secs(10)
            // Validated before anything touches the disk.
            && !out.exists();
        if !ok {
            failures.push(format!("testnet {}: exit {code:?} in {took:?}, out created {}, stderr:\n{stderr}", args.join(" "), out.exists()));
        }
    }
    assert!(failures.is_empty(), "{} of {} bad inputs misbehaved:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn an_earlier_run_is_never_deleted_unasked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let keep = out.join("nodes").join("n0").join("somefile");
    std::fs::create_dir_all(keep.parent().unwrap()).unwrap();
    std::fs::write(&keep, b"an earlier run's state").unwrap();
    let o = out.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        // A bad flag, with or without --force: nothing is touched.
        (&["run", "--peers", "2", "--out", o, "--kill", "9@r5"], "--kill 9@r5"),
        (&["run", "--peers", "2", "--out", o, "--force", "--kill", "9@r5"], "--kill 9@r5"),
        // Good flags, a non-empty --out and no --force: refused, with the way out.
        (&["run", "--peers", "2", "--out", o, "--", "--epochs", "1"], "--force"),
    ];
    for (k, (args, names)) in cases.iter().enumerate() {
        let t = Testnet::start(&strings(args), &dir.path().join(format!("logs{k}")));
        let (code, _, stderr, took) = t.finish(Duration::from_secs(30));
        let lines = own_lines(&stderr);
        assert!(code.is_some_and(|c| c != 0 && c != 101), "{args:?}: exit {code:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(lines.len(), 1, "{args:?}: one line, got: {stderr}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains(names), "{args:?}: {stderr}");
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
        assert_eq!(std::fs::read(&keep).unwrap(), b"an earlier run's state", "{args:?} touched the earlier run");
    }
    // --out that is a file: one line.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let t = Testnet::start(&strings(&["run", "--out", file.to_str().unwrap(), "--", "--epochs", "1"]), &dir.path().join("logs-file"));
    let (code, _, stderr, _) = t.finish(Duration::from_secs(30));
    assert!(code.is_some_and(|c| c != 0 && c != 101) && own_lines(&stderr).len() == 1, "{code:?}: {stderr}");
    assert!(stderr.starts_with("error: --out "), "{stderr}");
}

#[test]
fn the_first_node_failing_is_reported_with_its_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = strings(&["run", "--peers", "2", "--out", out.to_str().unwrap(), "--timeout", "300"]);
    args.extend(strings(&["--peer-args", "0=--no-such-flag", "--"]));
    args.extend(small_run(600, 100, 100, 1, &[]));
    let (code, _, stderr, took) = Testnet::start(&args, dir.path()).finish(Duration::from_secs(60));
    assert!(code.is_some_and(|c| c != 0 && c != 101), "exit {code:?}: {stderr}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let last = own_lines(&stderr).last().copied().unwrap_or_default().to_string();
    assert!(last.starts_with("error: peer 0 exited before it listened"), "{stderr}");
    assert!(last.contains("error: unexpected argument '--no-such-flag'"), "clap's error line, not its last line: {stderr}");
}

#[test]
fn a_peer_that_fails_at_start_stops_the_run_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // An earlier run's leftovers: --force replaces them.
    let stale = out.join("nodes").join("n0").join("stale");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"old").unwrap();
    let mut args = strings(&["run", "--peers", "2", "--force", "--out", out.to_str().unwrap(), "--timeout", "300"]);
    args.extend(strings(&["--peer-args", "1=--lr 0", "--"]));
    args.extend(small_run(600, 100, 100, 1, &[]));
    let (code, stdout, stderr, took) = Testnet::start(&args, dir.path()).finish(Duration::from_secs(150));
    assert!(!stale.exists(), "--force clears the earlier run");
    assert!(code.is_some_and(|c| c != 0 && c != 101), "exit {code:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Peer 0 starts (loads its data) first; the rest is seconds, not --timeout.
    assert!(took < Duration::from_secs(120), "took {took:?}: {stderr}");
    assert!(!stderr.contains("--timeout"), "{stderr}");
    let line = stderr.lines().find(|l| l.contains("peer 1 exited early")).unwrap_or_else(|| panic!("no early-exit line: {stderr}"));
    assert!(line.contains("error: --lr must be"), "the node's error line is quoted: {line}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json")).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["interrupted"], false);
    let problems: Vec<&str> = report["problems"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(problems[0].contains("peer 1 exited early") && problems[0].contains("--lr"), "{problems:?}");
    assert!(!problems.iter().any(|p| p.contains("digests") || p.contains("wrote no report")), "{problems:?}");
    assert!(stdout.contains("problem: peer 1 exited early"), "{stdout}");
}

/// Processes whose command line names `needle` (the nodes of a run name its --out).
fn processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && cmd.contains("p2pml-node") {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
fn sigint_stops_the_nodes_and_reports_an_interrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = strings(&["run", "--peers", "2", "--out", out.to_str().unwrap(), "--timeout", "600", "--"]);
    // Long enough that it is still training when the signal comes.
    args.extend(small_run(600, 100, 100, 200, &[]));
    let t = Testnet::start(&args, dir.path());
    let log = out.join("nodes").join("n1").join("stdout.log");
    wait_for("peer 1 to finish a round", Duration::from_secs(120), || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.lines().any(|l| l.starts_with("round ")))
    });
    t.signal("INT");
    let (code, stdout, stderr, _) = t.finish(Duration::from_secs(60));
    assert_eq!(code, Some(130), "exit 130 as for SIGINT: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("testnet: interrupted"), "{stderr}");
    for misleading in ["--timeout", "DIFFER", "wrote no report"] {
        assert!(!stderr.contains(misleading) && !stdout.contains(misleading), "{misleading}: {stderr}\n{stdout}");
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json")).unwrap();
    assert_eq!(report["interrupted"], true);
    assert_eq!(report["ok"], false);
    assert_eq!(report["problems"][0], "interrupted by signal", "{}", report["problems"]);
    assert!(stdout.contains("problem: interrupted by signal"), "{stdout}");
    // No node outlives it.
    let left = processes_naming(out.to_str().unwrap());
    assert!(left.is_empty(), "nodes left running: {left:?}");
}

/// A stand-in for p2pml-node (`--node-bin`): it records its arguments, says it
/// listens, writes the report its identity seed names, and exits 0. testnet's
/// side of a run (flags passed, report merged, summary, exit code) without training.
const FAKE_NODE: &str = r#"#!/bin/sh
state=; report=; seed=; rogue=
for a in "$@"; do
  case "$prev" in --state-dir) state=$a;; --report) report=$a;; --identity-seed) seed=$a;; esac
  case "$a" in --fault-heartbeat-only|--fault-garbage) rogue=yes;; esac
  prev=$a
done
mkdir -p "$state"
printf '%s\n' "$@" > "$state/args"
echo "peer fake$seed"
echo "listening /ip4/127.0.0.1/tcp/9/p2p/fake$seed"
if [ -n "$rogue" ]; then
  echo '{"role":"rogue","peer_id":"fake'$seed'"}' > "$report"
  exit 0
fi
case "$seed" in
  0) extra='"deadline_rounds":[4,2],"withholding_demotions":[{"peer":"fake1","round":3,"epoch":1}],"unadmitted":[{"peer":"fake2","heartbeats":5}]';;
  *) extra='"deadline_rounds":[2]';;
esac
echo '{"role":"peer","peer_id":"fake'$seed'","final_digest":"d","rounds":5,"epochs":1,"spec":{"sync":"Sync"},"rounds_log":[{"round":0,"digest":"a"}],'"$extra"'}' > "$report"
echo "round 0 digest a"
exit 0
"#;

#[test]
fn heartbeat_rogues_withholders_and_deadline_rounds_reach_the_report() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake-node");
    std::fs::write(&fake, FAKE_NODE).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.path().join("out");
    let args = strings(&[
        "run",
        "--peers",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--timeout",
        "60",
        "--node-bin",
        fake.to_str().unwrap(),
        "--rogues",
        "1",
        "--rogue-heartbeat",
        "--byzantine",
        "1:withhold",
        "--",
        "--epochs",
        "1",
    ]);
    let (code, stdout, stderr, took) = Testnet::start(&args, dir.path()).finish(Duration::from_secs(60));
    assert!(took < Duration::from_secs(30), "took {took:?}: {stderr}");
    // Withholding and unadmitted peers are problems: exit 3.
    assert_eq!(code, Some(3), "{stderr}\n{stdout}");
    let node_args = |i: usize| std::fs::read_to_string(out.join("nodes").join(format!("n{i}")).join("args")).unwrap();
    let rogue = node_args(2);
    assert!(rogue.lines().any(|l| l == "--fault-heartbeat-only") && !rogue.contains("--fault-garbage"), "{rogue}");
    assert!(node_args(1).contains("--byzantine\nwithhold\n"), "{}", node_args(1));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(r["deadline_rounds"], serde_json::json!([2, 4]));
    assert_eq!(r["withholding_demotions"][0]["peer"], "fake1");
    assert_eq!(r["withholding_demotions"][0]["index"], 1);
    assert_eq!(r["unadmitted_peers"][0]["peer"], "fake2");
    assert_eq!(r["unadmitted_peers"][0]["index"], 2);
    assert_eq!(r["unadmitted_peers"][0]["heartbeats"], 5);
    assert_eq!(r["rogues"][0]["kind"], "heartbeat");
    assert_eq!(r["rogues"][0]["garbage_sent"], 0);
    let problems = r["problems"].to_string();
    assert!(problems.contains("peer 1 (fake1) was demoted for withholding"), "{problems}");
    assert!(problems.contains("rogue 2 (fake2) sent heartbeats but was never admitted"), "{problems}");
    assert!(!problems.contains("deadline"), "deadline closures alone are a warning: {problems}");
    for line in [
        "warning: 2 round(s) closed on the straggler deadline without every member: 2, 4",
        "demoted for withholding: peer 1 (fake1)",
        "heartbeats without admission: rogue 2 (fake2) (5 heartbeats)",
        "rogue 2 sent heartbeats without a Hello",
    ] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
}

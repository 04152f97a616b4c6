//! The lines a node prints on stdout for the tools that drive it (testnet, the
//! tests, a user's scripts): one typed [`Line`] with `Display` (what the node
//! prints) and `FromStr` (what a reader parses), so both sides share one
//! definition. Everything else a node says goes to stderr through `tracing`.
//!
//! The formats are a public interface: change one only with its readers.

use std::fmt;
use std::str::FromStr;

/// A membership change as a node printed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    Joined,
    Rejoined,
    Died,
    /// Somebody declared this node dead; it answered with a higher incarnation.
    Refuted,
    /// Demoted for missing rounds in a row while alive.
    Withholding,
}

impl MemberEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberEvent::Joined => "joined",
            MemberEvent::Rejoined => "rejoined",
            MemberEvent::Died => "died",
            MemberEvent::Refuted => "refuted",
            MemberEvent::Withholding => "withholding",
        }
    }
}

impl FromStr for MemberEvent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "joined" => MemberEvent::Joined,
            "rejoined" => MemberEvent::Rejoined,
            "died" => MemberEvent::Died,
            "refuted" => MemberEvent::Refuted,
            "withholding" => MemberEvent::Withholding,
            other => return Err(format!("unknown membership event {other:?}")),
        })
    }
}

/// One stdout line of a node. Epochs are printed 1-based, rounds 0-based.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    /// `listening ADDR` (the address ends in /p2p/ID).
    Listening { addr: String },
    /// `peer ID run RUN role ROLE`
    Peer { id: String, run: String, role: String },
    /// `metrics listening on URL`
    Metrics { url: String },
    /// `member EVENT PEER incarnation N`
    Member { event: MemberEvent, peer: String, incarnation: u64 },
    /// `deadline round R missing A,B`: a round closed on the straggler deadline.
    Deadline { round: u64, missing: Vec<String> },
    /// `ready round R epoch E incarnation N`: the node holds the run's state.
    Ready { round: u64, epoch: u64, incarnation: u64 },
    /// `restored checkpoint round R epoch E digest D in S s`
    Restored { round: u64, epoch: u64, digest: String, secs: f64 },
    /// `checkpoint writing round R` (only while a write is held for a test).
    CheckpointWriting { round: u64 },
    /// `round R epoch E contributors C samples S loss L lr LR barrier_ms B digest D`
    Round { round: u64, epoch: u64, contributors: usize, samples: u64, loss: f64, lr: f64, barrier_ms: f64, digest: String },
    /// `computed round R epoch E samples S loss L`: a worker pushed its gradient.
    Computed { round: u64, epoch: u64, samples: u64, loss: f64 },
    /// `epoch E test_acc A% test_loss L` (A in percent).
    Epoch { epoch: u64, test_acc_pct: f64, test_loss: f64 },
    /// `done rounds N test_acc A% digest D report PATH`
    Done { rounds: u64, test_acc_pct: f64, digest: String, report: String },
    /// `done rogue garbage_sent N report PATH`
    DoneRogue { garbage_sent: u64, report: String },
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::Listening { addr } => write!(f, "listening {addr}"),
            Line::Peer { id, run, role } => write!(f, "peer {id} run {run} role {role}"),
            Line::Metrics { url } => write!(f, "metrics listening on {url}"),
            Line::Member { event, peer, incarnation } => write!(f, "member {} {peer} incarnation {incarnation}", event.as_str()),
            Line::Deadline { round, missing } => write!(f, "deadline round {round} missing {}", missing.join(",")),
            Line::Ready { round, epoch, incarnation } => write!(f, "ready round {round} epoch {epoch} incarnation {incarnation}"),
            Line::Restored { round, epoch, digest, secs } => write!(f, "restored checkpoint round {round} epoch {epoch} digest {digest} in {secs:.3} s"),
            Line::CheckpointWriting { round } => write!(f, "checkpoint writing round {round}"),
            Line::Round { round, epoch, contributors, samples, loss, lr, barrier_ms, digest } => write!(
                f,
                "round {round} epoch {epoch} contributors {contributors} samples {samples} loss {loss:.4} lr {lr} barrier_ms {barrier_ms:.0} digest {digest}"
            ),
            Line::Computed { round, epoch, samples, loss } => write!(f, "computed round {round} epoch {epoch} samples {samples} loss {loss:.4}"),
            Line::Epoch { epoch, test_acc_pct, test_loss } => write!(f, "epoch {epoch} test_acc {test_acc_pct:.2}% test_loss {test_loss:.4}"),
            Line::Done { rounds, test_acc_pct, digest, report } => {
                write!(f, "done rounds {rounds} test_acc {test_acc_pct:.2}% digest {digest} report {report}")
            }
            Line::DoneRogue { garbage_sent, report } => write!(f, "done rogue garbage_sent {garbage_sent} report {report}"),
        }
    }
}

/// Reads a line's words in order: keywords that must be there and the values between them.
struct Words<'a> {
    rest: &'a str,
}

impl<'a> Words<'a> {
    fn word(&mut self) -> Result<&'a str, String> {
        let s = self.rest.trim_start();
        if s.is_empty() {
            return Err("the line ends early".into());
        }
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        self.rest = &s[end..];
        Ok(&s[..end])
    }
    fn key(&mut self, k: &str) -> Result<(), String> {
        match self.word()? {
            w if w == k => Ok(()),
            w => Err(format!("expected {k:?}, found {w:?}")),
        }
    }
    fn value<T: FromStr>(&mut self, k: &str) -> Result<T, String> {
        self.key(k)?;
        let w = self.word()?;
        w.parse().map_err(|_| format!("{k}: {w:?} is not a valid value"))
    }
    fn string(&mut self, k: &str) -> Result<String, String> {
        self.value::<String>(k)
    }
    fn percent(&mut self, k: &str) -> Result<f64, String> {
        self.key(k)?;
        let w = self.word()?;
        w.strip_suffix('%').and_then(|v| v.parse().ok()).ok_or_else(|| format!("{k}: {w:?} is not a percentage"))
    }
    /// The rest of the line (a path may hold spaces).
    fn tail(&mut self, k: &str) -> Result<String, String> {
        self.key(k)?;
        let s = self.rest.trim_start();
        self.rest = "";
        if s.is_empty() {
            return Err(format!("{k}: missing"));
        }
        Ok(s.to_string())
    }
    fn end(&self) -> Result<(), String> {
        match self.rest.trim() {
            "" => Ok(()),
            more => Err(format!("unexpected {more:?} at the end")),
        }
    }
}

impl FromStr for Line {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut w = Words { rest: s };
        let line = match w.word()? {
            "listening" => Line::Listening { addr: w.word()?.to_string() },
            "peer" => {
                let id = w.word()?.to_string();
                Line::Peer { id, run: w.string("run")?, role: w.string("role")? }
            }
            "metrics" => {
                w.key("listening")?;
                Line::Metrics { url: w.string("on")? }
            }
            "member" => {
                let event = w.word()?.parse()?;
                let peer = w.word()?.to_string();
                Line::Member { event, peer, incarnation: w.value("incarnation")? }
            }
            "deadline" => {
                let round = w.value("round")?;
                let missing: String = w.string("missing")?;
                Line::Deadline { round, missing: missing.split(',').filter(|p| !p.is_empty()).map(String::from).collect() }
            }
            "ready" => Line::Ready { round: w.value("round")?, epoch: w.value("epoch")?, incarnation: w.value("incarnation")? },
            "restored" => {
                w.key("checkpoint")?;
                let (round, epoch, digest) = (w.value("round")?, w.value("epoch")?, w.string("digest")?);
                let secs = w.value("in")?;
                w.key("s")?;
                Line::Restored { round, epoch, digest, secs }
            }
            "checkpoint" => {
                w.key("writing")?;
                Line::CheckpointWriting { round: w.value("round")? }
            }
            "round" => {
                let round = w.word()?.parse().map_err(|_| "round: not a number".to_string())?;
                Line::Round {
                    round,
                    epoch: w.value("epoch")?,
                    contributors: w.value("contributors")?,
                    samples: w.value("samples")?,
                    loss: w.value("loss")?,
                    lr: w.value("lr")?,
                    barrier_ms: w.value("barrier_ms")?,
                    digest: w.string("digest")?,
                }
            }
            "computed" => Line::Computed { round: w.value("round")?, epoch: w.value("epoch")?, samples: w.value("samples")?, loss: w.value("loss")? },
            "epoch" => {
                let epoch = w.word()?.parse().map_err(|_| "epoch: not a number".to_string())?;
                Line::Epoch { epoch, test_acc_pct: w.percent("test_acc")?, test_loss: w.value("test_loss")? }
            }
            "done" => {
                if w.rest.trim_start().starts_with("rogue") {
                    w.key("rogue")?;
                    Line::DoneRogue { garbage_sent: w.value("garbage_sent")?, report: w.tail("report")? }
                } else {
                    Line::Done { rounds: w.value("rounds")?, test_acc_pct: w.percent("test_acc")?, digest: w.string("digest")?, report: w.tail("report")? }
                }
            }
            other => return Err(format!("not a node line: {other:?}")),
        };
        w.end()?;
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_reads_back_as_printed() {
        let lines = [
            "listening /ip4/127.0.0.1/tcp/4001/p2p/12D3KooWabc",
            "peer 12D3KooWabc run 0123456789abcdef role peer",
            "metrics listening on http://127.0.0.1:9100/metrics",
            "member died 12D3KooWxyz incarnation 2",
            "member withholding 12D3KooWxyz incarnation 1",
            "deadline round 7 missing 12D3KooWa,12D3KooWb",
            "ready round 12 epoch 2 incarnation 3",
            "restored checkpoint round 5 epoch 1 digest 0011223344556677 in 0.012 s",
            "checkpoint writing round 9",
            "round 3 epoch 1 contributors 4 samples 256 loss 2.1034 lr 0.01 barrier_ms 12 digest 4e3dd5c8a475f638",
            "computed round 3 epoch 1 samples 64 loss 2.3000",
            "epoch 2 test_acc 81.25% test_loss 0.5123",
            "done rounds 24 test_acc 81.25% digest eb5ecd139cfe91b9 report /tmp/a b/report.json",
            "done rogue garbage_sent 12 report out/n4/report.json",
        ];
        for s in lines {
            let l: Line = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(l.to_string(), s);
        }
        assert_eq!(
            "deadline round 7 missing a,b".parse::<Line>().unwrap(),
            Line::Deadline { round: 7, missing: vec!["a".into(), "b".into()] }
        );
    }

    #[test]
    fn other_lines_are_refused_with_a_reason() {
        for (s, why) in [
            ("", "ends early"),
            ("hello world", "not a node line"),
            ("round x epoch 1", "not a number"),
            ("ready round 1 epoch 1", "ends early"),
            ("ready round 1 epoch 1 incarnation 2 extra", "at the end"),
            ("epoch 1 test_acc 80 test_loss 1", "percentage"),
            ("member ate p incarnation 1", "unknown membership event"),
        ] {
            let e = s.parse::<Line>().unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }
}

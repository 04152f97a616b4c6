//! The fault schedule (`--kill`, `--revive`, `--random-kills`, `--partition`)
//! and the measured effect of each event.
//!
//! A time is seconds after every peer has started (`12`, `12.5s`) or the
//! moment the furthest peer reaches a round (`r5`). Kills are SIGKILL; a
//! revived peer restarts with the same state directory (key, checkpoints) and
//! bootstraps from a live peer. A partition makes each side refuse the other's
//! connections (libp2p block lists driven over the nodes' stdin; this machine's
//! kernel has no netem, and the block list works without privileges).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// When an event fires.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) enum At {
    Secs(f64),
    Round(u64),
    /// Seconds after the node's last kill fired (`+10`: down for ten seconds).
    AfterKill(f64),
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Secs(s) => write!(f, "{s}s"),
            At::Round(r) => write!(f, "r{r}"),
            At::AfterKill(s) => write!(f, "+{s}s"),
        }
    }
}

fn parse_at(s: &str) -> Result<At, String> {
    let s = s.trim();
    if let Some(r) = s.strip_prefix('r') {
        return r.parse().map(At::Round).map_err(|_| format!("'{s}' is not a round (r5)"));
    }
    let (after_kill, rest) = match s.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let num = rest.strip_suffix('s').unwrap_or(rest);
    if num.parse::<f64>().is_err() {
        return Err(format!("'{s}' is neither seconds (12.5), a round (r5) nor seconds after the kill (+10)"));
    }
    let secs = crate::units::parse_secs("the time", rest, crate::units::Zero::Allowed)?;
    Ok(if after_kill { At::AfterKill(secs) } else { At::Secs(secs) })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Action {
    Kill { peer: usize },
    Revive { peer: usize },
    Partition { sides: Vec<Vec<usize>>, secs: f64 },
    Heal,
    /// The object store stops and loses its objects; it serves again, empty, after `secs`.
    StoreOutage { secs: f64 },
    StoreBack,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Scheduled {
    pub(crate) at: At,
    pub(crate) action: Action,
}

/// The nodes a schedule can name: peers (or workers) 0..peers, and in
/// parameter-server mode the server as `ps` (index `peers`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Nodes {
    pub(crate) peers: usize,
    pub(crate) server: bool,
}

impl Nodes {
    pub(crate) fn count(self) -> usize {
        self.peers + usize::from(self.server)
    }
}

fn peer(s: &str, nodes: Nodes, flag: &str) -> Result<usize, String> {
    let peers = nodes.peers;
    if s.trim() == "ps" {
        return if nodes.server { Ok(peers) } else { Err(format!("{flag}: 'ps' names the parameter server: only with --role ps")) };
    }
    let i: usize = s.trim().parse().map_err(|_| format!("{flag}: '{s}' is not a peer index (or ps)"))?;
    if i >= peers {
        return Err(format!("{flag}: peer {i} does not exist (--peers {peers})"));
    }
    Ok(i)
}

/// `PEER@T`
pub(crate) fn parse_peer_at(s: &str, peers: Nodes, flag: &str) -> Result<(usize, At), String> {
    let (p, t) = s.split_once('@').ok_or_else(|| format!("{flag} {s}: expected PEER@T, e.g. 2@12.5 or 2@r5"))?;
    Ok((peer(p, peers, &format!("{flag} {s}"))?, parse_at(t).map_err(|e| format!("{flag} {s}: {e}"))?))
}

/// `A,B|C,D@T+DUR`
pub(crate) fn parse_partition(s: &str, peers: Nodes) -> Result<Vec<Scheduled>, String> {
    let flag = "--partition";
    let (sides, when) = s.split_once('@').ok_or_else(|| format!("{flag} {s}: expected A,B|C,D@T+SECONDS"))?;
    let (t, dur) = when.split_once('+').ok_or_else(|| format!("{flag} {s}: expected A,B|C,D@T+SECONDS"))?;
    let at = parse_at(t).map_err(|e| format!("{flag} {s}: {e}"))?;
    // A partition heals: its duration is more than 0 seconds and finite.
    let secs = crate::units::parse_secs(&format!("{flag} {s}: the duration"), dur, crate::units::Zero::Refused)?;
    let sides: Vec<Vec<usize>> = sides
        .split('|')
        .map(|side| side.split(',').map(|p| peer(p, peers, &format!("{flag} {s}"))).collect::<Result<Vec<_>, _>>())
        .collect::<Result<_, _>>()?;
    if sides.len() < 2 || sides.iter().any(Vec::is_empty) {
        return Err(format!("{flag} {s}: needs two or more non-empty sides"));
    }
    let mut seen = std::collections::HashSet::new();
    if !sides.iter().flatten().all(|p| seen.insert(*p)) {
        return Err(format!("{flag} {s}: a peer is on two sides"));
    }
    Ok(vec![Scheduled { at, action: Action::Partition { sides, secs } }])
}

/// `T+SECONDS` of `--store-outage`.
pub(crate) fn parse_store_outage(s: &str) -> Result<Scheduled, String> {
    let flag = "--store-outage";
    let (t, dur) = s.split_once('+').ok_or_else(|| format!("{flag} {s}: expected T+SECONDS, e.g. r3+4 or 20+5"))?;
    let at = parse_at(t).map_err(|e| format!("{flag} {s}: {e}"))?;
    if matches!(at, At::AfterKill(_)) {
        return Err(format!("{flag} {s}: T is seconds (20) or a round (r3)"));
    }
    let secs = crate::units::parse_secs(&format!("{flag} {s}: the duration"), dur, crate::units::Zero::Refused)?;
    Ok(Scheduled { at, action: Action::StoreOutage { secs } })
}

/// `--random-kills N --interval S --down D`: N kills, one every S seconds from S
/// on, each of a node that is up (seeded; in parameter-server mode the server is
/// one of the `peers` nodes, as likely to be hit as any worker), revived D seconds later.
pub(crate) fn random_kills(n: usize, interval: f64, down: f64, peers: usize, seed: u64) -> Vec<Scheduled> {
    let mut rng = p2pml_proto::Rng::new(seed);
    let mut out = Vec::new();
    let mut down_until = vec![0f64; peers];
    for k in 0..n {
        let t = interval * (k + 1) as f64;
        let up: Vec<usize> = (0..peers).filter(|p| down_until[*p] <= t).collect();
        if up.len() <= 1 {
            continue;
        }
        let p = up[rng.below(up.len() as u64) as usize];
        down_until[p] = t + down + 1e-9;
        out.push(Scheduled { at: At::Secs(t), action: Action::Kill { peer: p } });
        out.push(Scheduled { at: At::Secs(t + down), action: Action::Revive { peer: p } });
    }
    out
}

/// What happened, as testnet saw it (seconds since the peers started).
#[derive(Clone, Debug)]
pub(crate) enum Obs {
    /// Node `i` finished round `round` with this digest prefix.
    Round { t: f64, node: usize, round: u64, digest: String },
    /// Node `i` saw `peer` (an id) die.
    Died { t: f64, node: usize, peer: String },
    /// Node `i` holds the run's state (started, resumed or synced).
    Ready { t: f64, node: usize },
    /// Worker `i` (parameter-server mode) pushed its gradient for a round.
    Computed { t: f64, node: usize },
}

/// One fault event and its effect.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct EventReport {
    pub(crate) at_s: f64,
    pub(crate) spec: String,
    #[serde(flatten)]
    pub(crate) action: Action,
    /// Kill: seconds until the first and the last other live peer declared it dead.
    pub(crate) detection_s: Option<f64>,
    pub(crate) detection_last_s: Option<f64>,
    /// Kill: the longest gap between two rounds of a surviving peer after the
    /// event (until the next one), less the run's median round time, in seconds
    /// and in rounds. Partition: the same for the largest side while it lasts.
    pub(crate) stalled_s: Option<f64>,
    pub(crate) rounds_stalled: Option<u64>,
    /// Revive: seconds from the restart until it held the run's state, and until
    /// it finished a round with the same digest as the other peers.
    pub(crate) rejoin_s: Option<f64>,
    pub(crate) digest_match_s: Option<f64>,
    /// Revive: seconds from the restart until the node did its part again: a
    /// P2P peer's digest matched, a worker pushed a gradient, the server
    /// finished a round.
    pub(crate) in_step_s: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The effect of each event. `fired` is (seconds, spec, action); `ids` the peer
/// id of each node; `server` the parameter server's index in PS mode.
pub(crate) fn effects(fired: &[(f64, String, Action)], obs: &[Obs], ids: &[String], server: Option<usize>) -> Vec<EventReport> {
    // Round finish times per node, and the digest of each round by node.
    let mut finishes: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut digests: BTreeMap<u64, Vec<(usize, String, f64)>> = BTreeMap::new();
    for o in obs {
        if let Obs::Round { t, node, round, digest } = o {
            finishes.entry(*node).or_default().push(*t);
            digests.entry(*round).or_default().push((*node, digest.clone(), *t));
        }
    }
    let gaps: Vec<f64> = finishes.values().flat_map(|ts| ts.windows(2).map(|w| w[1] - w[0])).collect();
    let round_s = median(gaps);
    let mut out = Vec::new();
    for (i, (t, spec, action)) in fired.iter().enumerate() {
        let next_t = fired.get(i + 1).map_or(f64::INFINITY, |e| e.0);
        let mut e = EventReport {
            at_s: *t,
            spec: spec.clone(),
            action: action.clone(),
            detection_s: None,
            detection_last_s: None,
            stalled_s: None,
            rounds_stalled: None,
            rejoin_s: None,
            digest_match_s: None,
            in_step_s: None,
        };
        let stall = |skip: &[usize], until: f64| -> Option<f64> {
            let mut worst: Option<f64> = None;
            for (node, ts) in &finishes {
                if skip.contains(node) {
                    continue;
                }
                let mut prev = ts.iter().rev().find(|x| **x <= *t).copied().unwrap_or(*t);
                for x in ts.iter().filter(|x| **x > *t && **x <= until) {
                    let gap = x - prev;
                    worst = Some(worst.map_or(gap, |w: f64| w.max(gap)));
                    prev = *x;
                }
            }
            worst.map(|w| (w - round_s).max(0.0))
        };
        match action {
            Action::Kill { peer } => {
                let id = ids.get(*peer).cloned().unwrap_or_default();
                // Deaths seen before the peer is revived (a later one is another life's).
                let back = fired[i + 1..]
                    .iter()
                    .find(|(_, _, a)| *a == Action::Revive { peer: *peer })
                    .map_or(f64::INFINITY, |e| e.0);
                let seen: Vec<f64> = obs
                    .iter()
                    .filter_map(|o| match o {
                        Obs::Died { t: d, node, peer: p } if *p == id && *node != *peer && *d >= *t && *d < back => Some(*d - *t),
                        _ => None,
                    })
                    .collect();
                e.detection_s = seen.iter().copied().reduce(f64::min);
                e.detection_last_s = seen.iter().copied().reduce(f64::max);
                e.stalled_s = if server == Some(*peer) {
                    // Only the server finishes rounds: its gap across its own death
                    // (until it is back and has finished one) is everyone's stall.
                    let until = finishes.get(peer).and_then(|ts| ts.iter().find(|x| **x >= back)).copied().unwrap_or(t + 300.0);
                    stall(&[], until)
                } else {
                    stall(&[*peer], next_t.min(t + 60.0))
                };
            }
            Action::Partition { sides, secs } => {
                // The largest side holds the quorum and should train on: its stall.
                let largest = sides.iter().max_by_key(|s| s.len()).cloned().unwrap_or_default();
                let others: Vec<usize> = finishes.keys().copied().filter(|n| !largest.contains(n)).collect();
                e.stalled_s = stall(&others, t + secs);
            }
            Action::Revive { peer } => {
                e.rejoin_s = obs.iter().find_map(|o| match o {
                    Obs::Ready { t: r, node } if *node == *peer && *r >= *t => Some(r - t),
                    _ => None,
                });
                e.digest_match_s = digests.iter().find_map(|(_, ds)| {
                    let (_, mine, at) = ds.iter().find(|(n, _, at)| *n == *peer && *at >= *t)?;
                    let others: Vec<&String> = ds.iter().filter(|(n, _, _)| *n != *peer).map(|(_, d, _)| d).collect();
                    (!others.is_empty() && others.iter().all(|d| *d == mine)).then_some(at - t)
                });
                e.in_step_s = match server {
                    None => e.digest_match_s,
                    // The server: until it finished a round past the last one before its
                    // death (rounds it replayed from its checkpoint are no progress).
                    Some(s) if s == *peer => {
                        let before = digests.iter().filter(|(_, ds)| ds.iter().any(|(n, _, at)| *n == *peer && *at <= *t)).map(|(r, _)| *r).max();
                        digests
                            .iter()
                            .filter(|(r, _)| before.is_none_or(|b| **r > b))
                            .find_map(|(_, ds)| ds.iter().find(|(n, _, at)| *n == *peer && *at >= *t).map(|(_, _, at)| at - t))
                    }
                    Some(_) => obs.iter().find_map(|o| match o {
                        Obs::Computed { t: c, node } if *node == *peer && *c >= *t => Some(c - t),
                        _ => None,
                    }),
                };
            }
            Action::Heal | Action::StoreOutage { .. } | Action::StoreBack => {}
        }
        if let (Some(s), true) = (e.stalled_s, round_s > 0.0) {
            e.rounds_stalled = Some((s / round_s).round() as u64);
        }
        out.push(e);
    }
    out
}

/// Takes the events that are due out of `schedule`, in schedule order: at a
/// time (`now` seconds after the start), once the furthest peer has passed a
/// round, or (a revival) some seconds after that peer's last kill
/// (`killed_at(peer)`, seconds after the start, if it was killed).
pub(crate) fn due(schedule: &mut Vec<(Scheduled, String)>, now: f64, furthest: u64, killed_at: impl Fn(usize) -> Option<f64>) -> Vec<(Scheduled, String)> {
    let mut due = Vec::new();
    schedule.retain(|(ev, spec)| {
        let is_due = match ev.at {
            At::Secs(t) => now >= t,
            At::Round(r) => furthest > r,
            At::AfterKill(d) => match &ev.action {
                Action::Revive { peer } => killed_at(*peer).is_some_and(|k| now >= k + d),
                _ => false,
            },
        };
        if is_due {
            due.push((ev.clone(), spec.clone()));
        }
        !is_due
    });
    due
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_fire_at_their_time_round_or_delay_after_the_kill_in_schedule_order() {
        let ev = |at: At, action: Action| (Scheduled { at, action }, format!("{at}"));
        let mut schedule = vec![
            ev(At::Round(5), Action::Kill { peer: 1 }),
            ev(At::AfterKill(10.0), Action::Revive { peer: 1 }),
            ev(At::Secs(3.0), Action::Heal),
            ev(At::AfterKill(1.0), Action::Kill { peer: 2 }),
        ];
        let never = |_: usize| None;
        assert!(due(&mut schedule, 2.9, 5, never).is_empty(), "round 5 fires once a peer passed it");
        let d = due(&mut schedule, 3.0, 6, never);
        assert_eq!(d.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(), ["r5", "3s"]);
        assert_eq!(schedule.len(), 2, "the rest stay");
        assert!(due(&mut schedule, 100.0, 9, never).is_empty(), "a revival waits for its kill");
        assert!(due(&mut schedule, 14.9, 9, |p| (p == 1).then_some(5.0)).is_empty());
        let d = due(&mut schedule, 15.0, 9, |p| (p == 1).then_some(5.0));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0.action, Action::Revive { peer: 1 });
        assert!(due(&mut schedule, 1e9, 1000, |_| Some(0.0)).is_empty(), "only a revival waits on a kill");
    }

    const N4: Nodes = Nodes { peers: 4, server: false };

    #[test]
    fn ps_names_the_server_only_in_ps_mode() {
        let ps = Nodes { peers: 4, server: true };
        assert_eq!(parse_peer_at("ps@r3", ps, "--kill").unwrap(), (4, At::Round(3)));
        assert!(parse_peer_at("ps@r3", N4, "--kill").unwrap_err().contains("--role ps"));
        assert_eq!(ps.count(), 5);
    }

    #[test]
    fn schedules_parse_and_bad_ones_say_why() {
        assert_eq!(parse_peer_at("2@12.5", N4, "--kill").unwrap(), (2, At::Secs(12.5)));
        assert_eq!(parse_peer_at("3@r5", N4, "--kill").unwrap(), (3, At::Round(5)));
        assert_eq!(parse_peer_at("3@+10", N4, "--revive").unwrap(), (3, At::AfterKill(10.0)));
        assert!(parse_peer_at("4@1", N4, "--kill").unwrap_err().contains("does not exist"));
        assert!(parse_peer_at("1", N4, "--kill").unwrap_err().contains("PEER@T"));
        assert!(parse_peer_at("1@x", N4, "--kill").unwrap_err().contains("neither"));
        let p = parse_partition("0,1|2,3@r4+30", N4).unwrap();
        assert_eq!(p[0].action, Action::Partition { sides: vec![vec![0, 1], vec![2, 3]], secs: 30.0 });
        assert!(parse_partition("0,1|1,2@3+4", N4).unwrap_err().contains("two sides"));
        assert!(parse_partition("0,1@3+4", N4).unwrap_err().contains("two or more"));
        for bad in ["0|1@r2+nan", "0|1@r2+-5", "0|1@r2+inf", "0|1@r2+0", "0|1@r2+1e30", "0|1@inf+5", "0|1@-1+5"] {
            let e = parse_partition(bad, N4).unwrap_err();
            assert!(e.starts_with(&format!("--partition {bad}: ")), "{e}");
        }
        for bad in ["1@inf", "1@nan", "1@1e30", "1@+inf", "1@-3"] {
            assert!(parse_peer_at(bad, N4, "--kill").is_err(), "{bad}");
        }
    }

    #[test]
    fn random_kills_are_seeded_and_never_kill_a_peer_that_is_down() {
        let a = random_kills(10, 5.0, 2.5, 8, 7);
        assert_eq!(a, random_kills(10, 5.0, 2.5, 8, 7));
        assert_eq!(a.len(), 20);
        assert_ne!(a, random_kills(10, 5.0, 2.5, 8, 8));
        let mut down = [false; 8];
        let mut ev: Vec<(f64, &Action)> = a.iter().map(|s| (if let At::Secs(t) = s.at { t } else { 0.0 }, &s.action)).collect();
        ev.sort_by(|x, y| x.0.total_cmp(&y.0).then((matches!(x.1, Action::Kill { .. })).cmp(&matches!(y.1, Action::Kill { .. }))));
        for (_, act) in ev {
            match act {
                Action::Kill { peer } => assert!(!std::mem::replace(&mut down[*peer], true)),
                Action::Revive { peer } => assert!(std::mem::replace(&mut down[*peer], false)),
                _ => unreachable!(),
            }
        }
    }

    #[test]
    fn effects_measure_detection_stall_and_rejoin() {
        let ids = vec!["a".to_string(), "b".into(), "c".into()];
        let mut obs = Vec::new();
        for r in 0..20u64 {
            let t = r as f64 * 0.5 + if r >= 10 { 2.0 } else { 0.0 };
            for n in 0..2 {
                obs.push(Obs::Round { t, node: n, round: r, digest: format!("d{r}") });
            }
        }
        obs.push(Obs::Died { t: 4.8, node: 0, peer: "c".into() });
        obs.push(Obs::Died { t: 5.1, node: 1, peer: "c".into() });
        obs.push(Obs::Ready { t: 9.0, node: 2 });
        obs.push(Obs::Round { t: 9.5, node: 2, round: 15, digest: "d15".into() });
        let fired = vec![(4.6, "kill 2@4.6".into(), Action::Kill { peer: 2 }), (8.0, "revive 2@8".into(), Action::Revive { peer: 2 })];
        let e = effects(&fired, &obs, &ids, None);
        assert!((e[0].detection_s.unwrap() - 0.2).abs() < 1e-9);
        assert!((e[0].detection_last_s.unwrap() - 0.5).abs() < 1e-9);
        assert!((e[0].stalled_s.unwrap() - 2.0).abs() < 1e-9, "{:?}", e[0]);
        assert_eq!(e[0].rounds_stalled, Some(4));
        assert!((e[1].rejoin_s.unwrap() - 1.0).abs() < 1e-9);
        assert!((e[1].digest_match_s.unwrap() - 1.5).abs() < 1e-9);
    }
}

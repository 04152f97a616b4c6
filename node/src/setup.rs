//! What every role sets up the same way: the network, the printed addresses,
//! the metrics endpoint and testnet's control stdin.

use crate::config::P2pConfig;
use crate::net::{self, Client, Event, InboundRequest};
use anyhow::{anyhow, bail, Context};
use libp2p::{Multiaddr, PeerId};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What every role sets up the same way: the network (private if --swarm-key),
/// the printed addresses, metrics and the control stdin.
pub(crate) struct Net {
    pub(crate) client: Client,
    pub(crate) events: mpsc::Receiver<Event>,
    pub(crate) requests: mpsc::Receiver<InboundRequest>,
    pub(crate) me: PeerId,
}

pub(crate) async fn start_net(p2p: &P2pConfig, run_id: &str) -> anyhow::Result<Net> {
    let mut listen = Vec::new();
    for a in &p2p.listen {
        listen.push(a.parse::<Multiaddr>().map_err(|e| anyhow!("--listen {a} is not a multiaddr ({e}); for example /ip4/0.0.0.0/tcp/4001"))?);
    }
    std::fs::create_dir_all(&p2p.state_dir).with_context(|| format!("cannot create --state-dir {}", p2p.state_dir.display()))?;
    let key = match p2p.identity_seed {
        Some(seed) => net::key_from_seed(seed),
        None => net::load_or_create_key(&p2p.state_dir.join("peer.key"))?,
    };
    let psk = p2p.swarm_key.as_deref().map(net::load_swarm_key).transpose()?;
    let forge_as = match (p2p.forge, p2p.bootstrap.first()) {
        (true, Some(b)) => match b.parse::<Multiaddr>().ok().and_then(|a| a.iter().last().map(|p| p.acquire())) {
            Some(libp2p::multiaddr::Protocol::P2p(p)) => Some(p),
            _ => bail!("--fault-forge: --bootstrap {b} must end in /p2p/<peer id>"),
        },
        _ => None,
    };
    if psk.is_some() {
        tracing::info!("private swarm: only peers with the same --swarm-key can connect");
    }
    let (client, events, requests, event_loop) = net::new(key, &listen, &net::NetOptions { psk, forge_as })?;
    tokio::spawn(event_loop.run());
    if p2p.control_stdin {
        tokio::spawn(control_stdin(client.clone()));
    }
    let me = client.peer_id;
    let started = Instant::now();
    let addrs = loop {
        let a = client.listen_addrs().await?;
        let concrete: Vec<_> = a.into_iter().filter(|a| !a.to_string().contains("/tcp/0")).collect();
        if !concrete.is_empty() || started.elapsed() > Duration::from_secs(5) {
            break concrete;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for a in &addrs {
        println!("listening {a}/p2p/{me}");
    }
    println!("peer {me} run {run_id} role {}", p2p.role.as_str());
    crate::metrics::start_metrics(p2p, p2p.role.as_str(), &me, &client).await?;
    Ok(Net { client, events, requests, me })
}

/// testnet's control commands on stdin: `block <peer id> ...` refuses those
/// peers (a partition), `unblock` lifts every block.
pub(crate) async fn control_stdin(client: Client) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("block") => {
                let peers: Vec<PeerId> = w.filter_map(|p| p.parse().ok()).collect();
                tracing::warn!("control: blocking {} peers", peers.len());
                let _ = client.block(peers).await;
            }
            Some("unblock") => {
                tracing::warn!("control: unblocking every peer");
                let _ = client.unblock_all().await;
            }
            Some(other) => tracing::warn!("control: unknown command {other}"),
            None => {}
        }
    }
}


//! The checks of a P2P configuration that clap's types cannot make, each
//! refusal a typed error whose line names the flag, and the addresses parsed once.

use super::{Aggregation, P2pConfig, Role};

/// Checks an address this node dials (--bootstrap, --ps): a host (`/ip4`,
/// `/ip6`, or a name: `/dns`, `/dns4`, `/dns6`), `/tcp/PORT`, `/p2p/<peer id>`;
/// the transports this node speaks, so that anything else fails now, not after
/// the bootstrap timeout.
pub(super) fn check_dial_addr(flag: &'static str, a: &str) -> Result<(libp2p::PeerId, libp2p::Multiaddr), DialAddrError> {
    use libp2p::multiaddr::Protocol;
    let (flag, addr) = (flag, a.to_string());
    let parsed: libp2p::Multiaddr =
        a.parse().map_err(|e: libp2p::multiaddr::Error| DialAddrError::NotMultiaddr { flag, addr: addr.clone(), reason: e.to_string() })?;
    let parts: Vec<Protocol> = parsed.iter().collect();
    let host_ok = matches!(
        parts.first(),
        Some(Protocol::Ip4(_) | Protocol::Ip6(_) | Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_))
    );
    let port = match parts.get(1) {
        Some(Protocol::Tcp(p)) => Some(*p),
        _ => None,
    };
    if !host_ok || port.is_none() {
        return Err(DialAddrError::NotTcp { flag, addr });
    }
    if port == Some(0) {
        return Err(DialAddrError::PortZero { flag, addr });
    }
    match &parts[2..] {
        [Protocol::P2p(peer)] => Ok((*peer, parsed.clone())),
        [] => Err(DialAddrError::NoPeerId { flag, addr }),
        _ => Err(DialAddrError::Trailing { flag, addr }),
    }
}

const DIAL_EXAMPLE: &str = "for example /ip4/10.0.0.1/tcp/4001/p2p/12D3Koo... or /dns4/host.example/tcp/4001/p2p/12D3Koo...";

/// What is wrong with an address this node dials (`flag` names the setting).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DialAddrError {
    #[error("{flag} {addr} is not a multiaddr ({reason}); {DIAL_EXAMPLE}")]
    NotMultiaddr { flag: &'static str, addr: String, reason: String },
    #[error("{flag} {addr}: this node speaks TCP only: /ip4, /ip6, /dns, /dns4 or /dns6, then /tcp/PORT; {DIAL_EXAMPLE}")]
    NotTcp { flag: &'static str, addr: String },
    #[error("{flag} {addr}: port 0 cannot be dialed; give the port the peer prints at start (`listening ...`)")]
    PortZero { flag: &'static str, addr: String },
    #[error("{flag} {addr} must end in /p2p/<peer id> (the id the peer prints at start)")]
    NoPeerId { flag: &'static str, addr: String },
    #[error("{flag} {addr}: after /tcp/PORT only /p2p/<peer id> may follow; {DIAL_EXAMPLE}")]
    Trailing { flag: &'static str, addr: String },
}

/// What `P2pConfig::validate` refuses: each is one line naming the setting.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum P2pConfigError {
    #[error("--listen {addr} is not a multiaddr ({reason}); for example /ip4/0.0.0.0/tcp/4001")]
    ListenNotMultiaddr { addr: String, reason: String },
    #[error("--listen {0}: give /ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT (an IP address of this machine, no host name); for example /ip4/0.0.0.0/tcp/4001")]
    ListenShape(String),
    #[error(transparent)]
    Dial(#[from] DialAddrError),
    #[error("--peers must be at least 1")]
    Peers,
    #[error("--min-peers must be between 1 and --peers ({0})")]
    MinPeers(usize),
    #[error("--role worker needs --ps <multiaddr of the parameter server, ending in /p2p/<peer id>>")]
    WorkerNeedsPs,
    #[error("--ps is for --role worker only")]
    PsNotForRole,
    /// A count that must be at least 1 (the flag).
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("--straggler-factor must be a number between 1 and 1000, got {0}")]
    StragglerFactor(f64),
    #[error("--straggler-floor-ms ({floor}) must be at least 1 and at most --straggler-cap-ms ({cap}), which is at most 3600000")]
    StragglerBounds { floor: u64, cap: u64 },
    #[error("--fault-heartbeat-only and --fault-garbage are two different rogues; pick one")]
    TwoRogues,
    #[error(transparent)]
    Exec(#[from] crate::exec::ExecConfigError),
    #[error("{flag} must be a finite number >= 0 (USD), got {value}")]
    Price { flag: &'static str, value: f64 },
    #[error("the backup-invocation factor must be a finite number >= 1, got {0}")]
    BackupAfter(f64),
    #[error("the learning-rate decay factor must be in (0, 1), got {0}")]
    LrFactor(f64),
    #[error("the minimum learning rate must be a finite number >= 0, got {0}")]
    MinLr(f64),
    #[error("--aggregation krum:{f} needs --peers of at least {need} (2F+3); lower F or use median or trimmed-mean")]
    KrumPeers { f: usize, need: usize },
    #[error("--exchange sharded aggregates each shard on its own and krum needs whole gradients: use --aggregation mean, median or trimmed-mean:BETA, or --exchange all-to-all")]
    ShardedKrum,
    #[error("--exchange sharded is synchronous: use --sync sync, or --exchange all-to-all")]
    ShardedAsync,
    #[error("--fault-forge needs --fault-garbage")]
    ForgeNeedsGarbage,
    #[error("--fault-forge needs --bootstrap (it claims to be that peer)")]
    ForgeNeedsBootstrap,
    #[error("--failure-timeout-ms must be at least {0} (two heartbeats)")]
    FailureTimeout(u64),
}

/// The addresses of a checked configuration, parsed once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Addresses {
    pub listen: Vec<libp2p::Multiaddr>,
    /// --bootstrap: each peer with the address to dial it at.
    pub bootstrap: Vec<(libp2p::PeerId, libp2p::Multiaddr)>,
    /// --ps (workers): the server and its address.
    pub ps: Option<(libp2p::PeerId, libp2p::Multiaddr)>,
}

impl P2pConfig {
    /// Checks what clap's types cannot, and returns the parsed addresses.
    pub fn validate(&self) -> Result<Addresses, P2pConfigError> {
        let mut out = Addresses::default();
        for a in &self.listen {
            let addr: libp2p::Multiaddr = a
                .parse()
                .map_err(|e: libp2p::multiaddr::Error| P2pConfigError::ListenNotMultiaddr { addr: a.clone(), reason: e.to_string() })?;
            let mut it = addr.iter();
            let ok = matches!(it.next(), Some(libp2p::multiaddr::Protocol::Ip4(_) | libp2p::multiaddr::Protocol::Ip6(_)))
                && matches!(it.next(), Some(libp2p::multiaddr::Protocol::Tcp(_)))
                && it.next().is_none();
            if !ok {
                return Err(P2pConfigError::ListenShape(a.clone()));
            }
            out.listen.push(addr);
        }
        for a in &self.bootstrap {
            out.bootstrap.push(check_dial_addr("--bootstrap", a)?);
        }
        if let Some(a) = &self.ps {
            out.ps = Some(check_dial_addr("--ps", a)?);
        }
        if self.peers == 0 {
            return Err(P2pConfigError::Peers);
        }
        if self.min_peers == 0 || self.min_peers > self.peers {
            return Err(P2pConfigError::MinPeers(self.peers));
        }
        match (self.role, &self.ps) {
            (Role::Worker, None) => return Err(P2pConfigError::WorkerNeedsPs),
            (Role::P2p | Role::Ps, Some(_)) => return Err(P2pConfigError::PsNotForRole),
            _ => {}
        }
        if self.checkpoint_keep == 0 {
            return Err(P2pConfigError::Zero("--checkpoint-keep"));
        }
        if self.batches_per_round == 0 {
            return Err(P2pConfigError::Zero("--batches-per-round"));
        }
        let st = &self.straggler;
        if !(st.factor.is_finite() && st.factor >= 1.0 && st.factor <= 1000.0) {
            return Err(P2pConfigError::StragglerFactor(st.factor));
        }
        if st.floor_ms == 0 || st.floor_ms > st.cap_ms || st.cap_ms > 3_600_000 {
            return Err(P2pConfigError::StragglerBounds { floor: st.floor_ms, cap: st.cap_ms });
        }
        if st.demote_after == 0 {
            return Err(P2pConfigError::Zero("--straggler-demote-after"));
        }
        if self.faults.heartbeat_only && self.faults.garbage {
            return Err(P2pConfigError::TwoRogues);
        }
        self.exec.validate()?;
        let pr = &self.exec.pricing;
        for (flag, v) in [
            ("--price-gb-second", pr.gb_second),
            ("--price-request", pr.per_request),
            ("--price-offload-instance-s", pr.offload_instance_per_s),
            ("--price-local-instance-s", pr.local_instance_per_s),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(P2pConfigError::Price { flag, value: v });
            }
        }
        if !(self.exec.backup_after >= 1.0 && self.exec.backup_after.is_finite()) {
            return Err(P2pConfigError::BackupAfter(self.exec.backup_after));
        }
        if !(self.lr_factor > 0.0 && self.lr_factor < 1.0) {
            return Err(P2pConfigError::LrFactor(self.lr_factor));
        }
        if !(self.min_lr >= 0.0 && self.min_lr.is_finite()) {
            return Err(P2pConfigError::MinLr(self.min_lr));
        }
        if self.exchange == p2pml_proto::Exchange::Sharded {
            if matches!(self.aggregation, Aggregation::Krum { .. }) {
                return Err(P2pConfigError::ShardedKrum);
            }
            if self.sync != p2pml_proto::wire::SyncMode::Sync {
                return Err(P2pConfigError::ShardedAsync);
            }
        }
        if let Aggregation::Krum { f } = self.aggregation {
            if self.peers < 2 * f + 3 {
                return Err(P2pConfigError::KrumPeers { f, need: 2 * f + 3 });
            }
        }
        if self.faults.forge && !self.faults.garbage {
            return Err(P2pConfigError::ForgeNeedsGarbage);
        }
        if self.faults.forge && self.bootstrap.is_empty() {
            return Err(P2pConfigError::ForgeNeedsBootstrap);
        }
        if self.failure_timeout_ms < 2 * self.heartbeat_ms {
            return Err(P2pConfigError::FailureTimeout(2 * self.heartbeat_ms));
        }
        Ok(out)
    }
}

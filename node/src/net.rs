//! The network: one task owns the libp2p `Swarm`; the rest of the node talks to it
//! through a cloneable [`Client`] (commands with oneshot replies) and receives
//! typed [`Event`]s. Inbound requests go to a separate channel so that a responder
//! can serve chunks while the training loop is busy.
//!
//! Stack: TCP (+ a pnet pre-shared key for a private swarm) + noise + yamux;
//! connection limits; identify, Kademlia (peer discovery from one bootstrap
//! address), gossipsub (strict signing, application validation before forwarding,
//! content-addressed ids, peer scoring), ping, request-response with CBOR and size caps.

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport as _};
use libp2p::core::upgrade;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{connection_limits, identify, identity, kad, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use p2pml_proto::wire::{self, Request, Response};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const PROTOCOL_VERSION: &str = "/p2pml/1.0.0";
/// Established connections this node accepts in all, and per peer (two: a
/// simultaneous dial from both sides); more are refused.
const MAX_CONNECTIONS: u32 = 256;
const MAX_CONNECTIONS_PER_PEER: u32 = 2;
/// Inbound connections still in their handshake.
const MAX_PENDING_INCOMING: u32 = 64;

/// How the network is built beyond the key and listen addresses.
#[derive(Clone, Default)]
pub struct NetOptions {
    /// A private swarm: only peers with this pre-shared key can connect.
    pub psk: Option<PreSharedKey>,
    /// Fault injection (--fault-forge): publish gossip unsigned, claiming this author.
    pub forge_as: Option<PeerId>,
    /// The node's event and request queues (0: the defaults, 4096 and 1024).
    pub queue: usize,
    /// An emulated uplink every connection's sends go through (--link).
    pub link: Option<std::sync::Arc<crate::link::Link>>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot listen on {addr}: {msg}")]
    Listen { addr: Multiaddr, msg: String },
    #[error("network setup failed: {0}")]
    Setup(String),
    #[error("the network task has stopped")]
    Stopped,
    #[error("request to {peer} failed: {msg}")]
    Request { peer: PeerId, msg: String },
    #[error("publish failed: {0}")]
    Publish(String),
}

/// Bytes and messages moved, by kind (payload bytes as the application sees them).
#[derive(Debug, Default)]
pub struct Traffic {
    pub gossip_bytes_sent: AtomicU64,
    pub gossip_bytes_received: AtomicU64,
    pub gossip_messages_sent: AtomicU64,
    pub gossip_messages_received: AtomicU64,
    pub rr_bytes_sent: AtomicU64,
    pub rr_bytes_received: AtomicU64,
    pub rr_messages_sent: AtomicU64,
    pub rr_messages_received: AtomicU64,
    pub invalid_messages: AtomicU64,
    /// Gossip messages and requests the node's queue had no room for: dropped
    /// (gossip unforwarded, requests unanswered; both are recovered by retries).
    pub events_dropped: AtomicU64,
}

impl Traffic {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    /// Peers this node refuses (testnet's partitions): their connections are closed and refused.
    blocked: libp2p::allow_block_list::Behaviour<libp2p::allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    ping: ping::Behaviour,
    rr: request_response::cbor::Behaviour<Request, Response>,
}

/// Something the network saw that the node should know.
#[derive(Debug)]
pub enum Event {
    /// A gossip message awaiting validation: answer with [`Client::validate`].
    Gossip { id: MessageId, propagated_by: PeerId, author: PeerId, data: Vec<u8> },
    Connected(PeerId),
    Disconnected(PeerId),
    /// A dial failed (the peer, where known, and why).
    DialFailed { peer: Option<PeerId>, error: String },
}

/// An inbound request; answer with [`Client::respond`].
#[derive(Debug)]
pub struct InboundRequest {
    pub peer: PeerId,
    pub request: Request,
    pub channel: ResponseChannel<Response>,
}

enum Command {
    Publish { topic: String, data: Vec<u8>, reply: oneshot::Sender<Result<(), NetError>> },
    Subscribe { topic: String },
    Unsubscribe { topic: String },
    Validate { id: MessageId, from: PeerId, verdict: MessageAcceptance },
    Request { peer: PeerId, request: Request, reply: oneshot::Sender<Result<Response, NetError>> },
    Respond { channel: ResponseChannel<Response>, response: Response },
    Dial { peer: Option<PeerId>, addr: Multiaddr },
    Disconnect { peer: PeerId },
    Block { peers: Vec<PeerId> },
    UnblockAll,
    ListenAddrs { reply: oneshot::Sender<Vec<Multiaddr>> },
    PeerScores { reply: oneshot::Sender<Vec<(PeerId, f64)>> },
}

/// A handle on the network task.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    pub peer_id: PeerId,
    pub traffic: Arc<Traffic>,
}

impl Client {
    async fn send(&self, c: Command) -> Result<(), NetError> {
        self.tx.send(c).await.map_err(|_| NetError::Stopped)
    }
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Publish { topic: topic.into(), data, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }
    pub async fn subscribe(&self, topic: &str) -> Result<(), NetError> {
        self.send(Command::Subscribe { topic: topic.into() }).await
    }
    pub async fn unsubscribe(&self, topic: &str) -> Result<(), NetError> {
        self.send(Command::Unsubscribe { topic: topic.into() }).await
    }
    /// Reports the validation verdict of a gossip message: only accepted messages
    /// are forwarded; rejected ones lower the sender's score.
    pub async fn validate(&self, id: MessageId, from: PeerId, accept: bool) -> Result<(), NetError> {
        let verdict = if accept { MessageAcceptance::Accept } else { MessageAcceptance::Reject };
        self.send(Command::Validate { id, from, verdict }).await
    }
    /// Drops a gossip message without forwarding it and without blaming its sender.
    pub async fn ignore(&self, id: MessageId, from: PeerId) -> Result<(), NetError> {
        self.send(Command::Validate { id, from, verdict: MessageAcceptance::Ignore }).await
    }
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<Response, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request { peer, request, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }
    pub async fn respond(&self, channel: ResponseChannel<Response>, response: Response) -> Result<(), NetError> {
        self.send(Command::Respond { channel, response }).await
    }
    pub async fn dial(&self, peer: Option<PeerId>, addr: Multiaddr) -> Result<(), NetError> {
        self.send(Command::Dial { peer, addr }).await
    }
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetError> {
        self.send(Command::Disconnect { peer }).await
    }
    /// Refuses these peers: open connections close, new ones are denied.
    pub async fn block(&self, peers: Vec<PeerId>) -> Result<(), NetError> {
        self.send(Command::Block { peers }).await
    }
    /// Lifts every block.
    pub async fn unblock_all(&self) -> Result<(), NetError> {
        self.send(Command::UnblockAll).await
    }
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ListenAddrs { reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }
    /// Gossipsub's score of every connected peer (invalid messages lower it).
    pub async fn peer_scores(&self) -> Result<Vec<(PeerId, f64)>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::PeerScores { reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }
}

/// Peer scoring: an invalid message (one the application rejects, or one that
/// fails gossipsub's own checks) costs its forwarder `-10 × n²` for `n` recent
/// invalid deliveries (forgiven by 10 % a second), so a single bad message puts
/// the peer at the gossip threshold and three graylist it: its RPCs are then
/// ignored. Honest peers earn a little for first deliveries and time in the mesh.
/// Mesh-delivery quotas stay off: a quiet epoch topic is no sign of misbehaviour.
fn score_params() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let mut params = gossipsub::PeerScoreParams::default();
    // Testnets run many peers on one address on purpose.
    params.ip_colocation_factor_whitelist.insert(std::net::IpAddr::from([127, 0, 0, 1]));
    params.ip_colocation_factor_whitelist.insert(std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
    (params, gossipsub::PeerScoreThresholds::default())
}

fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.5,
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.9,
        ..Default::default()
    }
}

/// The task that owns the swarm.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    requests: mpsc::Sender<InboundRequest>,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Response, NetError>>>,
    traffic: Arc<Traffic>,
    blocked: std::collections::HashSet<PeerId>,
    /// Peers refused for a foreign identify protocol version (said once each).
    refused_version: std::collections::HashSet<PeerId>,
    /// Connection events the node's queue had no room for yet: kept, in order,
    /// and handed over first (the loop never awaits the node).
    backlog: std::collections::VecDeque<Event>,
}

/// Peers remembered as refused for their protocol version before the set starts over.
const MAX_REFUSED_REMEMBERED: usize = 4096;

/// Bytes on the wire, roughly: the payload plus a small envelope.
fn response_len(r: &Response) -> usize {
    match r {
        Response::Chunk { data, .. } | Response::State { data, .. } | Response::Params { data, .. } => data.len() + 32,
        _ => 64,
    }
}

fn request_len(r: &Request) -> usize {
    match r {
        Request::PsPush(a) => a.inline.as_ref().map_or(0, |b| b.len()) + 160,
        _ => 64,
    }
}

/// The DNS resolver of `/dns`, `/dns4` and `/dns6` addresses: the system's
/// configuration (`/etc/resolv.conf`, `/etc/hosts`). Without one (a bare
/// container), names resolve from `/etc/hosts` only (`localhost` always does).
fn dns_over<T>(inner: impl Fn() -> T) -> libp2p::dns::tokio::Transport<T> {
    match libp2p::dns::tokio::Transport::system(inner()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("no usable DNS configuration ({e}): host names in addresses resolve from /etc/hosts only");
            libp2p::dns::tokio::Transport::custom(
                inner(),
                libp2p::dns::ResolverConfig::from_name_servers(Vec::new()),
                libp2p::dns::ResolverOpts::default(),
            )
        }
    }
}

/// TCP (host names resolved by DNS), the private swarm's pre-shared key if any,
/// noise, yamux.
fn transport(
    key: &identity::Keypair,
    psk: Option<PreSharedKey>,
    link: Option<std::sync::Arc<crate::link::Link>>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = dns_over(|| tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)));
    let noise = noise::Config::new(key)?;
    // One chain for both kinds of swarm: the socket is either wrapped by the
    // pre-shared key's handshake or passed through.
    // An emulated link (--link) shapes the raw socket: everything above it,
    // handshakes included, pays its bandwidth and delay.
    let socket = tcp.and_then(move |socket, _| async move {
        let socket = match link {
            Some(l) => futures::future::Either::Left(l.shape(socket)),
            None => futures::future::Either::Right(socket),
        };
        match psk {
            Some(psk) => PnetConfig::new(psk).handshake(socket).await.map(futures::future::Either::Left),
            None => Ok(futures::future::Either::Right(socket)),
        }
    });
    Ok(socket
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(Duration::from_secs(20))
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// Every message of an error and its sources, once each ("a: b: c"): libp2p's
/// wrappers often say nothing themselves (a `TransportError::Other` displays as
/// an empty string) and keep the reason in their source.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let msg = e.to_string();
        let msg = msg.trim();
        if !msg.is_empty() && !out.contains(msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(msg);
        }
        next = e.source();
    }
    if out.is_empty() {
        out.push_str("unknown error");
    }
    out
}

/// The socket address of a `/ip4|ip6/ADDR/tcp/PORT` listen address.
fn tcp_socket_addr(addr: &Multiaddr) -> Option<std::net::SocketAddr> {
    use libp2p::multiaddr::Protocol;
    let mut it = addr.iter();
    let ip: std::net::IpAddr = match it.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let Protocol::Tcp(port) = it.next()? else { return None };
    it.next().is_none().then_some(std::net::SocketAddr::new(ip, port))
}

/// What went wrong binding `sa`, in words a user can act on.
fn bind_reason(sa: &std::net::SocketAddr, e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::AddrInUse => format!(
            "port {} is already in use (another p2pml-node or program listens there); choose another --listen port, or /tcp/0 for any free one",
            sa.port()
        ),
        ErrorKind::AddrNotAvailable => format!(
            "{e}: {} is not an address of this machine; use 0.0.0.0 (every interface) or one of its own addresses",
            sa.ip()
        ),
        ErrorKind::PermissionDenied if sa.port() < 1024 => {
            format!("{e}: ports below 1024 need privileges; use a port of 1024 or more")
        }
        _ => e.to_string(),
    }
}

/// Refuses a listen address whose port is taken, before libp2p listens on it.
///
/// libp2p-tcp sets `SO_REUSEPORT` on every listening socket (so that dials can
/// leave from the listen port), and Linux lets a second socket with that
/// option, of the same user, bind the same port: two nodes would then share one
/// port and the kernel would split incoming connections between them. So the
/// port is first bound by a plain socket (`SO_REUSEADDR`, as libp2p, so that
/// connections in TIME_WAIT of an earlier run do not count; no `SO_REUSEPORT`):
/// that bind fails if anything listens there (and says why an address is not
/// usable, which libp2p's listen error does not). The probe is closed at once.
fn check_listen_addr(addr: &Multiaddr) -> Result<(), NetError> {
    let listen_err = |msg: String| NetError::Listen { addr: addr.clone(), msg };
    let Some(sa) = tcp_socket_addr(addr) else {
        return Err(listen_err(
            "--listen takes /ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT (an IP address of this machine, no host name, no /p2p)".into(),
        ));
    };
    // Port 0 too: the kernel picks a free port, but the address must be ours.
    let probe = || -> std::io::Result<()> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(sa), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        if sa.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind(&sa.into())
    };
    probe().map_err(|e| listen_err(bind_reason(&sa, &e)))
}

/// Why `listen_on` failed: the OS error where there is one.
fn listen_reason(addr: &Multiaddr, e: &libp2p::TransportError<std::io::Error>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(_) => {
            "--listen takes /ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT".into()
        }
        libp2p::TransportError::Other(io) => {
            // The transport's own error is boxed inside; find the OS error.
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(io);
            while let Some(s) = src {
                if let Some(os) = s.downcast_ref::<std::io::Error>() {
                    if os.raw_os_error().is_some() {
                        return match tcp_socket_addr(addr) {
                            Some(sa) => bind_reason(&sa, os),
                            None => os.to_string(),
                        };
                    }
                }
                src = s.source();
            }
            error_chain(io)
        }
    }
}

/// Builds the swarm, listens on `listen` and returns the client, the event
/// streams and the loop to spawn.
pub fn new(
    key: identity::Keypair,
    listen: &[Multiaddr],
    opts: &NetOptions,
) -> Result<(Client, mpsc::Receiver<Event>, mpsc::Receiver<InboundRequest>, EventLoop), NetError> {
    let peer_id = key.public().to_peer_id();
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let psk = opts.psk;
    let link = opts.link.clone();
    let forge_as = opts.forge_as;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| transport(key, psk, link))
        .map_err(|e| setup(&e))?
        .with_behaviour(|key| {
            // A forger publishes unsigned; only it runs in permissive mode.
            let (authenticity, validation) = match forge_as {
                Some(victim) => (gossipsub::MessageAuthenticity::Author(victim), gossipsub::ValidationMode::Permissive),
                None => (gossipsub::MessageAuthenticity::Signed(key.clone()), gossipsub::ValidationMode::Strict),
            };
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(250))
                .validation_mode(validation)
                .validate_messages()
                .max_transmit_size(wire::MAX_GOSSIP_BYTES + 4096)
                .message_id_fn(|m: &gossipsub::Message| {
                    // Content-addressed: author, sequence number and payload.
                    let mut h = blake3::Hasher::new();
                    if let Some(s) = &m.source {
                        h.update(&s.to_bytes());
                    }
                    h.update(&m.sequence_number.unwrap_or(0).to_le_bytes());
                    h.update(&m.data);
                    MessageId::from(h.finalize().as_bytes()[..20].to_vec())
                })
                .build()
                .map_err(|e| e.to_string())?;
            let mut gossipsub = gossipsub::Behaviour::new(authenticity, gossip_config)?;
            let (params, thresholds) = score_params();
            gossipsub.with_peer_score(params, thresholds)?;
            let mut kad_cfg = kad::Config::new(StreamProtocol::new("/p2pml/kad/1.0.0"));
            kad_cfg.set_query_timeout(Duration::from_secs(30));
            let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg);
            kad.set_mode(Some(kad::Mode::Server));
            let codec = request_response::cbor::codec::Codec::<Request, Response>::default()
                .set_request_size_maximum(wire::MAX_REQUEST_BYTES)
                .set_response_size_maximum(wire::MAX_RESPONSE_BYTES);
            let rr = request_response::Behaviour::with_codec(
                codec,
                [(StreamProtocol::new("/p2pml/rr/1.0.0"), ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(30))
                    .with_max_concurrent_streams(256),
            );
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established(Some(MAX_CONNECTIONS))
                .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                blocked: Default::default(),
                identify: identify::Behaviour::new(identify::Config::new(PROTOCOL_VERSION.into(), key.public())),
                kad,
                gossipsub,
                ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
                rr,
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    // Every address is checked before any is listened on, so that a busy port
    // fails the start and leaves nothing half open.
    for addr in listen {
        check_listen_addr(addr)?;
    }
    for addr in listen {
        swarm.listen_on(addr.clone()).map_err(|e| NetError::Listen { addr: addr.clone(), msg: listen_reason(addr, &e) })?;
    }
    let (tx, commands) = mpsc::channel(1024);
    let (events_tx, events) = mpsc::channel(if opts.queue > 0 { opts.queue } else { 4096 });
    let (requests_tx, requests) = mpsc::channel(if opts.queue > 0 { opts.queue } else { 1024 });
    let traffic = Arc::new(Traffic::default());
    let client = Client { tx, peer_id, traffic: traffic.clone() };
    let el = EventLoop { swarm, commands, events: events_tx, requests: requests_tx, pending: HashMap::new(), traffic, blocked: Default::default(), refused_version: Default::default(), backlog: Default::default() };
    Ok((client, events, requests, el))
}

impl EventLoop {
    /// Runs until every client is dropped.
    /// The swarm's task. It never awaits the node: a full queue to the node
    /// sheds gossip and requests (counted and logged; the node recovers them by
    /// request-response and retries) and keeps connection events in order for
    /// later, so that the node awaiting a reply from this loop cannot deadlock it.
    pub async fn run(mut self) {
        let mut flush = tokio::time::interval(std::time::Duration::from_millis(20));
        loop {
            self.flush_backlog();
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                _ = flush.tick(), if !self.backlog.is_empty() => {}
                cmd = self.commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => return,
                },
            }
        }
    }

    fn on_command(&mut self, c: Command) {
        let b = self.swarm.behaviour_mut();
        match c {
            Command::Publish { topic, data, reply } => {
                let len = data.len();
                let r = b.gossipsub.publish(IdentTopic::new(topic), data);
                let r = match r {
                    Ok(_) => {
                        Traffic::add(&self.traffic.gossip_bytes_sent, len);
                        Traffic::add(&self.traffic.gossip_messages_sent, 1);
                        Ok(())
                    }
                    // Alone for now (peers not yet in the mesh): nothing to deliver to.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => Ok(()),
                    Err(gossipsub::PublishError::Duplicate) => Ok(()),
                    Err(e) => Err(NetError::Publish(e.to_string())),
                };
                let _ = reply.send(r);
            }
            Command::Subscribe { topic } => {
                let t = IdentTopic::new(topic.clone());
                if let Err(e) = b.gossipsub.set_topic_params(t.clone(), topic_score_params()) {
                    tracing::warn!("score parameters for {topic}: {e}");
                }
                if let Err(e) = b.gossipsub.subscribe(&t) {
                    tracing::warn!("subscribe {topic}: {e}");
                }
            }
            Command::Unsubscribe { topic } => {
                b.gossipsub.unsubscribe(&IdentTopic::new(topic));
            }
            Command::Validate { id, from, verdict } => {
                if matches!(verdict, MessageAcceptance::Reject) {
                    Traffic::add(&self.traffic.invalid_messages, 1);
                }
                b.gossipsub.report_message_validation_result(&id, &from, verdict);
            }
            Command::Request { peer, request, reply } => {
                Traffic::add(&self.traffic.rr_bytes_sent, request_len(&request));
                Traffic::add(&self.traffic.rr_messages_sent, 1);
                let id = b.rr.send_request(&peer, request);
                self.pending.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                Traffic::add(&self.traffic.rr_bytes_sent, response_len(&response));
                Traffic::add(&self.traffic.rr_messages_sent, 1);
                let _ = b.rr.send_response(channel, response);
            }
            Command::Dial { peer, addr } => {
                if let Some(p) = peer {
                    b.kad.add_address(&p, addr.clone());
                    if self.swarm.is_connected(&p) {
                        return;
                    }
                }
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!("dial {addr}: {e}");
                }
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Block { peers } => {
                for p in peers {
                    self.blocked.insert(p);
                    self.swarm.behaviour_mut().blocked.block_peer(p);
                }
            }
            Command::UnblockAll => {
                for p in self.blocked.drain() {
                    self.swarm.behaviour_mut().blocked.unblock_peer(p);
                }
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::PeerScores { reply } => {
                let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                let g = &self.swarm.behaviour().gossipsub;
                let _ = reply.send(peers.into_iter().filter_map(|p| g.peer_score(&p).map(|s| (p, s))).collect());
            }
        }
    }

    /// Hands the kept connection events over, as far as the queue has room.
    fn flush_backlog(&mut self) {
        while let Some(ev) = self.backlog.pop_front() {
            match self.events.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.backlog.push_front(ev);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    return;
                }
            }
        }
    }

    /// A connection event: after those kept, never dropped.
    fn control_event(&mut self, ev: Event) {
        self.backlog.push_back(ev);
        self.flush_backlog();
    }

    /// Counts and (now and then) logs what the node's full queue made us drop.
    fn dropped(&self, what: &str) {
        let n = self.traffic.events_dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n.is_multiple_of(100) {
            tracing::warn!("the node is behind: its event queue is full; dropped a {what} ({n} so far)");
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                Traffic::add(&self.traffic.gossip_bytes_received, message.data.len());
                Traffic::add(&self.traffic.gossip_messages_received, 1);
                let Some(author) = message.source else {
                    // Strict mode never delivers unsigned messages; refuse defensively.
                    self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        MessageAcceptance::Reject,
                    );
                    return;
                };
                // Connection events first: a gossip message never overtakes them.
                if !self.backlog.is_empty() {
                    self.flush_backlog();
                }
                let ev = Event::Gossip { id: message_id.clone(), propagated_by: propagation_source, author, data: message.data };
                let full = !self.backlog.is_empty() || self.events.try_send(ev).is_err();
                if full {
                    // Not forwarded, and not held against its sender.
                    self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        MessageAcceptance::Ignore,
                    );
                    self.dropped("gossip message");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                if info.protocol_version != PROTOCOL_VERSION {
                    // Once per peer: it may well reconnect again and again.
                    if self.refused_version.len() >= MAX_REFUSED_REMEMBERED {
                        self.refused_version.clear();
                    }
                    if self.refused_version.insert(peer_id) {
                        tracing::warn!(
                            "refusing peer {peer_id}: its identify protocol version is {:?} (agent {:?}), this node speaks {PROTOCOL_VERSION:?}; disconnecting (run the same p2pml version on every peer)",
                            info.protocol_version,
                            info.agent_version
                        );
                    }
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                for a in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                }
            }
            // Discovery: connect to every peer Kademlia finds (small swarms are
            // fully meshed; gossipsub prunes its mesh to its own degree).
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }))
                if !self.swarm.is_connected(&peer) =>
            {
                let _ = self.swarm.dial(peer);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(request_response::Event::Message { peer, message, .. })) => {
                match message {
                    request_response::Message::Request { request, channel, .. } => {
                        Traffic::add(&self.traffic.rr_bytes_received, request_len(&request));
                        Traffic::add(&self.traffic.rr_messages_received, 1);
                        // A request dropped unanswered fails at its sender, which retries.
                        if let Err(mpsc::error::TrySendError::Full(_)) = self.requests.try_send(InboundRequest { peer, request, channel }) {
                            self.dropped("request");
                        }
                    }
                    request_response::Message::Response { request_id, response } => {
                        Traffic::add(&self.traffic.rr_bytes_received, response_len(&response));
                        Traffic::add(&self.traffic.rr_messages_received, 1);
                        if let Some(tx) = self.pending.remove(&request_id) {
                            let _ = tx.send(Ok(response));
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            })) => {
                if let Some(tx) = self.pending.remove(&request_id) {
                    let _ = tx.send(Err(NetError::Request { peer, msg: error.to_string() }));
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, num_established, endpoint, .. } => {
                if endpoint.is_dialer() {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, endpoint.get_remote_address().clone());
                }
                if num_established.get() == 1 {
                    self.control_event(Event::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                self.control_event(Event::Disconnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                self.control_event(Event::DialFailed { peer: peer_id, error: error.to_string() });
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::debug!("listening on {address}");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!("listener: {}", error_chain(&error));
            }
            SwarmEvent::ListenerClosed { addresses, reason: Err(error), .. } => {
                let addrs: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
                tracing::error!("stopped listening on {}: {}", addrs.join(", "), error_chain(&error));
            }
            _ => {}
        }
    }
}

/// A key derived from `seed`: the same peer id every time, for reproducible
/// testnets (shards, dropout masks and aggregation order follow the ids).
/// Anyone can derive it: never for real machines.
pub fn key_from_seed(seed: u64) -> identity::Keypair {
    let mut h = blake3::Hasher::new();
    h.update(b"p2pml identity seed");
    h.update(&seed.to_le_bytes());
    let mut bytes: [u8; 32] = *h.finalize().as_bytes();
    identity::Keypair::ed25519_from_bytes(&mut bytes).expect("any 32 bytes are an ed25519 secret key")
}

mod keys;
pub use keys::{generate_swarm_key, load_or_create_key, load_swarm_key, KeyError};

#[cfg(test)]
mod tests;

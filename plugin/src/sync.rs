//! The node's link to the central key service: `join` once, then one
//! long-lived sync stream, reconnecting with backoff for as long as it
//! takes.
//!
//! The service may have several URLs (replicas), and a URL's host may
//! resolve to several addresses: each address is a server of its own
//! ([`Dial`]), tried in the order given. A failed session moves on to the
//! next server at once; only a whole pass that failed waits ([`Failover`]).
//!
//! Nothing here is on the KMS path: Status, Encrypt and Decrypt read the
//! published snapshot and never wait on the network. A received state is
//! applied on a blocking thread ([`Node::apply_cluster_state`]: durable
//! first, then published), and only then acknowledged by a report.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgekms_core::delivery::DeliveryKey;
use edgekms_core::rotation::cluster::Report;
use edgekms_daemon::pki::{self, PrivateKey};
use edgekms_daemon::tls;
use edgekms_proto::fleet::fleet_client::FleetClient;
use edgekms_proto::fleet::{
    ClusterState, JoinRequest, JoinResponse, KeyRef, NodeReport, ReturnedKey,
};
use rand::Rng;
use tokio_stream::wrappers::ReceiverStream;

use crate::cache::{FleetKeys, FleetRecord};
use crate::config::Config;
use crate::error::NodeError;
use crate::metrics;
use crate::node::{sealer_from_config, Node};

/// How often a connected node reports even when nothing changed, so the
/// service sees it alive.
const REPORT_EVERY: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("the central key service refused: {0}")]
    Refused(String),
    /// `join` found no server that answered: why, server by server.
    #[error("no central key service answered: {0}")]
    Unreachable(String),
    #[error("sync stream broke: {0}")]
    Stream(String),
    #[error("cannot apply the central state: {0}")]
    Apply(#[from] NodeError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("{0}")]
    Config(String),
}

impl SyncError {
    /// A short fixed word for the sync-errors metric.
    fn kind(&self) -> &'static str {
        match self {
            SyncError::Tls(_) | SyncError::Unreachable(_) => "connect",
            SyncError::Refused(_) => "refused",
            SyncError::Stream(_) => "stream",
            SyncError::Apply(_) => "apply",
            SyncError::Pki(_) | SyncError::Config(_) => "config",
        }
    }
}

fn status_error(s: tonic::Status) -> SyncError {
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            SyncError::Refused(s.message().to_owned())
        }
        _ => SyncError::Stream(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// The first wait after a broken session.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// A session that lasted longer held: its end is a fresh failure, not more
/// of the same outage.
const HELD: Duration = Duration::from_secs(30);

/// The reconnect policy: `(wait now, next backoff)` after a session that
/// lasted `lasted`. Doubling up to `max`; a session that held for 30 s
/// or more starts again from the first wait (it was a fresh failure, not
/// the same outage).
fn backoff_step(backoff: Duration, lasted: Duration, max: Duration) -> (Duration, Duration) {
    let backoff = if lasted > HELD {
        FIRST_BACKOFF
    } else {
        backoff
    };
    (backoff.min(max), (backoff * 2).min(max))
}

/// One server to try: a URL of the service (an index into the client's
/// targets) and one address its host resolved to, or why it did not
/// resolve (tried like the others, it fails at once).
#[derive(Debug, Clone)]
struct Dial {
    target: usize,
    addr: Result<SocketAddr, tls::TlsError>,
}

/// The servers in the order to try them: the URLs as given, each expanded
/// to its addresses in the resolver's order; a URL that did not resolve
/// stays, once, so that a pass still counts it.
fn plan_of(resolved: Vec<Result<Vec<SocketAddr>, tls::TlsError>>) -> Vec<Dial> {
    let mut plan = Vec::new();
    for (target, addrs) in resolved.into_iter().enumerate() {
        match addrs {
            Ok(addrs) => plan.extend(addrs.into_iter().map(|addr| Dial {
                target,
                addr: Ok(addr),
            })),
            Err(e) => plan.push(Dial {
                target,
                addr: Err(e),
            }),
        }
    }
    plan
}

/// How logs name the server of `dial`: its URL, and the address when the
/// host is a name.
fn describe(targets: &[tls::Target], dial: &Dial) -> String {
    match targets.get(dial.target) {
        Some(t) => t.describe(dial.addr.as_ref().ok().copied()),
        None => format!("server #{}", dial.target),
    }
}

/// Resolves every target now ([`plan_of`]).
async fn plan(targets: &[tls::Target]) -> Vec<Dial> {
    let mut resolved = Vec::with_capacity(targets.len());
    for t in targets {
        resolved.push(t.resolve().await);
    }
    plan_of(resolved)
}

/// Which server of the plan the next session goes to, and how long to wait
/// before it. A session that ends moves on to the next server at once; the
/// client waits ([`backoff_step`]) only once a whole pass, as many ends in
/// a row as there are servers, failed. A session that held starts a new
/// pass: its own end is the pass's first failure. With one server, every
/// end waits, exactly as [`backoff_step`] alone.
#[derive(Debug)]
struct Failover {
    next: usize,
    /// Sessions ended in the current pass.
    failed: usize,
    /// The longest of them (whether the pass began with one that held).
    longest: Duration,
    backoff: Duration,
    max: Duration,
}

impl Failover {
    fn new(max: Duration) -> Self {
        Self {
            next: 0,
            failed: 0,
            longest: Duration::ZERO,
            backoff: FIRST_BACKOFF,
            max,
        }
    }

    /// The position of the server to try now in a plan of `servers`.
    fn current(&self, servers: usize) -> usize {
        self.next % servers.max(1)
    }

    /// Whether the next try is the first of the plan: the time to resolve
    /// the names again (addresses change).
    fn at_start(&self) -> bool {
        self.next == 0
    }

    /// The session with the current server ended after `lasted`, in a plan
    /// of `servers`: moves to the next server, and returns how long to wait
    /// before trying it.
    fn ended(&mut self, lasted: Duration, servers: usize) -> Duration {
        let servers = servers.max(1);
        if lasted > HELD {
            self.failed = 0;
            self.longest = Duration::ZERO;
        }
        self.failed += 1;
        self.longest = self.longest.max(lasted);
        self.next = (self.current(servers) + 1) % servers;
        if self.failed < servers {
            return Duration::ZERO;
        }
        let (wait, next) = backoff_step(self.backoff, self.longest, self.max);
        self.backoff = next;
        self.failed = 0;
        self.longest = Duration::ZERO;
        wait
    }
}

/// Whether a `Join` answer is the service's decision, the same from every
/// replica (they share one store): final, not tried on another server. The
/// token is one-time, so anything else (unreachable, overloaded, failing
/// inside) may be tried on the next.
fn join_answer_is_final(code: tonic::Code) -> bool {
    use tonic::Code;
    match code {
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition => true,
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss => false,
    }
}

/// The keys a heartbeat asks this node to return, wrapped to the service
/// (none when it asks for none, or names no key to wrap them to).
fn answer_wanted(node: &Node, heartbeat: &ClusterState) -> Vec<ReturnedKey> {
    if heartbeat.wanted.is_empty() {
        return Vec::new();
    }
    if heartbeat.service_delivery_key.is_empty() {
        tracing::warn!(
            wanted = heartbeat.wanted.len(),
            "the central service asks for keys but sends no delivery key to wrap them to"
        );
        return Vec::new();
    }
    node.return_wanted(&heartbeat.wanted, &heartbeat.service_delivery_key)
}

/// Whether to answer a heartbeat's `wanted` now, the last answer in this
/// session having been to `last` (what was asked, and when). A reconciling
/// service repeats its ask in every heartbeat: a new ask is answered at
/// once, the same one again only after [`REPORT_EVERY`] (in case the
/// service could not keep what it got), so neither the wrapping nor the
/// warnings about versions not returned repeat every second.
fn answer_due(last: Option<&(Vec<KeyRef>, Instant)>, wanted: &[KeyRef], now: Instant) -> bool {
    match last {
        _ if wanted.is_empty() => false,
        Some((asked, at)) if asked.as_slice() == wanted => {
            now.saturating_duration_since(*at) >= REPORT_EVERY
        }
        _ => true,
    }
}

/// A joined node's sync client.
pub struct SyncClient {
    node: Arc<Node>,
    /// The service's URLs, in the order given at `join`.
    servers: Vec<tls::Target>,
    tls: Arc<rustls::ClientConfig>,
    delivery: Arc<DeliveryKey>,
    backoff_max: Duration,
}

impl SyncClient {
    /// The client for a joined node; `None` for a standalone one.
    /// `servers`, when not empty, replaces the URLs given to `join`.
    pub fn for_node(
        node: Arc<Node>,
        backoff_max: Duration,
        servers: &[String],
    ) -> Result<Option<Self>, SyncError> {
        let Some(record) = node.cache().fleet().map_err(NodeError::from)? else {
            return Ok(None);
        };
        let nsk = node.sealing_key()?;
        let keys = node.cache().fleet_keys(&nsk).map_err(NodeError::from)?;
        let bad = |what: &str| SyncError::Config(format!("join record: {what} is not hex"));
        let ca = hex::decode(&record.ca_der).map_err(|_| bad("CA"))?;
        let cert = hex::decode(&record.cert_der).map_err(|_| bad("certificate"))?;
        let tls_key = PrivateKey::from_der(keys.tls_key.to_vec());
        let tls = tls::client_config(tls::Trust::Ca(&ca), Some((&cert, &tls_key)))?;
        let delivery = DeliveryKey::from_bytes(&keys.delivery_key)
            .map_err(|e| SyncError::Config(e.to_string()))?;
        let servers = if servers.is_empty() {
            record
                .servers()
                .map(tls::Target::parse)
                .collect::<Result<Vec<_>, _>>()?
        } else {
            servers
                .iter()
                .map(|s| tls::Target::parse(s))
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Some(Self {
            node,
            servers,
            tls,
            delivery: Arc::new(delivery),
            backoff_max,
        }))
    }

    /// Syncs forever, server after server ([`Failover`]): waits with
    /// exponential backoff (with jitter, up to `backoff_max`) only once
    /// every server failed; never gives up.
    pub async fn run(self) {
        let mut failover = Failover::new(self.backoff_max);
        let mut servers = Vec::new();
        loop {
            if servers.is_empty() || failover.at_start() {
                servers = plan(&self.servers).await;
            }
            let Some(dial) = servers.get(failover.current(servers.len())) else {
                // No URL at all: a join record cannot be written so.
                tracing::error!(
                    "the join record names no central key service; serving cached keys"
                );
                return;
            };
            let server = describe(&self.servers, dial);
            let started = Instant::now();
            let err = match self.session(dial, false).await {
                Ok(()) => SyncError::Stream("the service closed the stream".into()),
                Err(e) => e,
            };
            metrics::record_sync_error(err.kind());
            match &err {
                SyncError::Refused(_) => {
                    tracing::error!(%server, error = %err, "the central key service refuses this node; serving cached keys")
                }
                _ => {
                    tracing::warn!(%server, error = %err, "sync with the central key service interrupted; serving cached keys")
                }
            }
            let wait = failover.ended(started.elapsed(), servers.len());
            if !wait.is_zero() {
                let jitter = rand::thread_rng().gen_range(0.8..1.2);
                tokio::time::sleep(wait.mul_f64(jitter).min(self.backoff_max)).await;
            }
        }
    }

    /// After `join`: syncs until the node holds a primary, first with the
    /// server `from` of `servers` (the one that answered the join), then
    /// with the others in turn; the last error when none gave the keys.
    async fn first_sync(&self, servers: &[Dial], from: usize) -> Result<(), SyncError> {
        let mut last = SyncError::Config("the join record names no central key service".into());
        for k in 0..servers.len() {
            let Some(dial) = servers.get((from + k) % servers.len()) else {
                break;
            };
            match self.session(dial, true).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(server = %describe(&self.servers, dial), error = %e, "first sync failed; trying the next server");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// One stream with the server of `dial`. With `until_primary`, returns
    /// once the node holds a primary KEK and reported it (the end of
    /// `join`).
    async fn session(&self, dial: &Dial, until_primary: bool) -> Result<(), SyncError> {
        let target = self
            .servers
            .get(dial.target)
            .ok_or_else(|| SyncError::Config("no such server".into()))?;
        let addr = dial.addr.clone()?;
        let channel = tls::connect_addr(target, addr, self.tls.clone()).await?;
        let mut client = FleetClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let send = |tx: &tokio::sync::mpsc::Sender<NodeReport>, r: NodeReport| {
            let tx = tx.clone();
            async move {
                tx.send(r)
                    .await
                    .map_err(|_| SyncError::Stream("report channel closed".into()))
            }
        };
        send(&tx, self.node.wire_report(&self.node.holding(), Vec::new())).await?;
        let mut inbound = client
            .sync(ReceiverStream::new(rx))
            .await
            .map_err(status_error)?
            .into_inner();
        metrics::record_sync_contact();
        tracing::info!(server = %describe(&self.servers, dial), "connected to the central key service");
        let mut tick = tokio::time::interval(REPORT_EVERY);
        tick.tick().await;
        let mut answered: Option<(Vec<KeyRef>, Instant)> = None;
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Some(state) = msg.map_err(status_error)? else {
                        return Err(SyncError::Stream("the service ended the stream".into()));
                    };
                    metrics::record_sync_contact();
                    self.node.note_central_reconciling(state.reconciling);
                    // A heartbeat changes nothing here; a reconciling
                    // service also asks in it for the keys it lacks.
                    if state.heartbeat {
                        let now = Instant::now();
                        if answer_due(answered.as_ref(), &state.wanted, now) {
                            let returned = answer_wanted(&self.node, &state);
                            answered = Some((state.wanted, now));
                            if !returned.is_empty() {
                                send(&tx, self.node.wire_report(&self.node.holding(), returned)).await?;
                            }
                        }
                        continue;
                    }
                    let node = self.node.clone();
                    let delivery = self.delivery.clone();
                    let holding = tokio::task::spawn_blocking(move || {
                        node.apply_cluster_state(&state, &delivery)
                    })
                    .await
                    .map_err(|e| SyncError::Stream(format!("apply task failed: {e}")))??;
                    edgekms_daemon::failpoint::hit("plugin-before-ack");
                    let has_primary = holding.primary != 0;
                    send(&tx, self.node.wire_report(&holding, Vec::new())).await?;
                    if until_primary && has_primary {
                        // Let the report reach the service before closing.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    send(&tx, self.node.wire_report(&self.node.holding(), Vec::new())).await?;
                }
                // A new census or a switch of the apiserver's key_id: the
                // service's retire rule wants it now, not at the next tick.
                _ = self.node.report_wanted() => {
                    send(&tx, self.node.wire_report(&self.node.holding(), Vec::new())).await?;
                }
            }
        }
    }
}

/// The plugin's sync task: nothing for a standalone node; for a joined one,
/// waits until its keys are unsealed (after a PCR failure, until
/// `kmsctl local reseal`), then syncs forever.
pub async fn run(node: Arc<Node>, backoff_max: Duration, servers: Vec<String>) {
    let mut warned = false;
    loop {
        match SyncClient::for_node(node.clone(), backoff_max, &servers) {
            Ok(Some(client)) => return client.run().await,
            Ok(None) => {
                tracing::info!("standalone: not joined to a central key service");
                return;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "not syncing with the central key service until the node's keys are unsealed");
                    warned = true;
                }
                tokio::time::sleep(backoff_max).await;
            }
        }
    }
}

/// What `edgekms-plugin join` reports.
#[derive(Debug)]
pub struct Joined {
    pub cluster: String,
    pub node: String,
    /// The URL (and address) of the server that enrolled the node.
    pub server: String,
    pub holding: Report,
    /// The first sync failed after enrolment (the plugin retries when
    /// started).
    pub first_sync: Result<(), SyncError>,
}

/// Sends `request` to each server of `servers` in turn until one answers;
/// the answer's position and the answer. A refusal is final
/// ([`join_answer_is_final`]); when no server answered, the error names
/// each one's failure.
async fn enrol(
    targets: &[tls::Target],
    servers: &[Dial],
    cfg: Arc<rustls::ClientConfig>,
    request: &JoinRequest,
) -> Result<(usize, JoinResponse), SyncError> {
    let mut failures = Vec::new();
    for (at, dial) in servers.iter().enumerate() {
        let Some(target) = targets.get(dial.target) else {
            continue;
        };
        let answer = async {
            let addr = dial.addr.clone()?;
            let channel = tls::connect_addr(target, addr, cfg.clone()).await?;
            FleetClient::new(channel)
                .join(request.clone())
                .await
                .map_err(|s| {
                    if join_answer_is_final(s.code()) {
                        SyncError::Refused(s.message().to_owned())
                    } else {
                        SyncError::Stream(format!(
                            "{} {:?}: {}",
                            target.url(),
                            s.code(),
                            s.message()
                        ))
                    }
                })
        }
        .await;
        match answer {
            Ok(resp) => return Ok((at, resp.into_inner())),
            Err(e @ SyncError::Refused(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(server = %describe(targets, dial), error = %e, "join: no answer; trying the next server");
                failures.push(e.to_string());
            }
        }
    }
    Err(SyncError::Unreachable(failures.join("; ")))
}

/// `edgekms-plugin join`: enrols this node with a one-time token, trusting
/// the service only through the CA pin, then syncs until it holds its
/// cluster's keys. `servers` are the service's URLs, tried in this order
/// now and kept, in this order, for the sync.
pub async fn join(
    cfg: &Config,
    servers: &[String],
    token: &str,
    ca_hash: &str,
) -> Result<Joined, SyncError> {
    let pin = pki::parse_pin(ca_hash)?;
    // Every URL checked before anything is made or kept.
    let targets = servers
        .iter()
        .map(|url| tls::Target::parse(url))
        .collect::<Result<Vec<_>, _>>()?;
    let Some((first, more)) = servers.split_first() else {
        return Err(SyncError::Config(
            "--server is required: https://HOST:PORT of the central key service".into(),
        ));
    };
    let node = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            let sealer = sealer_from_config(&cfg)?;
            Node::open_for_join(&cfg, sealer)
        })
        .await
        .map_err(|e| SyncError::Config(format!("opening the data dir failed: {e}")))??
    };
    let node = Arc::new(node);
    let (tls_key, csr) = pki::node_key_and_csr()?;
    let delivery = DeliveryKey::generate();
    let request = JoinRequest {
        token: token.trim().to_owned(),
        cluster: node.cluster().to_owned(),
        node: node.name().to_owned(),
        csr_der: csr.into(),
        delivery_public_key: delivery.public_key().into(),
    };
    let servers = plan(&targets).await;
    let pinned = tls::client_config(tls::Trust::Pin(pin), None)?;
    let (at, resp) = enrol(&targets, &servers, pinned, &request).await?;
    let nsk = node.sealing_key()?;
    node.cache()
        .put_fleet(
            &nsk,
            &FleetRecord {
                server: first.clone(),
                more_servers: more.to_vec(),
                node: node.name().to_owned(),
                ca_der: hex::encode(&resp.ca_der),
                cert_der: hex::encode(&resp.certificate_der),
            },
            &FleetKeys {
                tls_key: zeroize::Zeroizing::new(tls_key.der().to_vec()),
                delivery_key: delivery.to_bytes(),
            },
        )
        .map_err(NodeError::from)?;
    let server = servers
        .get(at)
        .map_or_else(|| first.clone(), |dial| describe(&targets, dial));
    let first_sync = match SyncClient::for_node(node.clone(), Duration::from_secs(1), &[])? {
        Some(client) => {
            match tokio::time::timeout(Duration::from_secs(60), client.first_sync(&servers, at))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(SyncError::Stream("no keys within 60 s".into())),
            }
        }
        None => Err(SyncError::Config("join record missing after join".into())),
    };
    Ok(Joined {
        cluster: node.cluster().to_owned(),
        node: node.name().to_owned(),
        server,
        holding: node.holding(),
        first_sync,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn reconnects_back_off_to_the_maximum_and_reset_after_a_long_session() {
        let max = Duration::from_secs(30);
        let short = Duration::from_secs(1);
        let mut backoff = FIRST_BACKOFF;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let (wait, next) = backoff_step(backoff, short, max);
            waits.push(wait.as_millis());
            backoff = next;
        }
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        let (wait, next) = backoff_step(backoff, Duration::from_secs(31), max);
        assert_eq!((wait, next), (FIRST_BACKOFF, FIRST_BACKOFF * 2));
    }

    /// The waits of `ends` sessions in a row, each lasting `lasted`, with
    /// `servers` servers; and the server each was with.
    fn run_of(f: &mut Failover, servers: usize, ends: &[Duration]) -> Vec<(usize, u128)> {
        ends.iter()
            .map(|lasted| {
                let at = f.current(servers);
                (at, f.ended(*lasted, servers).as_millis())
            })
            .collect()
    }

    #[test]
    fn a_failed_server_gives_way_to_the_next_at_once_and_a_failed_pass_backs_off() {
        let max = Duration::from_secs(30);
        let short = Duration::from_secs(1);
        let mut f = Failover::new(max);
        assert!(f.at_start());
        // Three servers: two moves without waiting, then the pass's wait;
        // the next pass starts again from the first, waiting twice as long.
        assert_eq!(
            run_of(&mut f, 3, &[short; 6]),
            [(0, 0), (1, 0), (2, 500), (0, 0), (1, 0), (2, 1000)]
        );
        assert!(f.at_start());
        // A session that held on server 1 breaks: on to 2 at once; the pass
        // it began fails on 2 and 0, and waits the first wait again.
        assert_eq!(run_of(&mut f, 3, &[short]), [(0, 0)]);
        assert_eq!(
            run_of(&mut f, 3, &[Duration::from_secs(600), short, short]),
            [(1, 0), (2, 0), (0, 500)]
        );
        // Failures before a session that held do not count with those
        // after it.
        assert_eq!(
            run_of(&mut f, 3, &[short, Duration::from_secs(600), short, short]),
            [(1, 0), (2, 0), (0, 0), (1, 500)]
        );
        assert_eq!(run_of(&mut f, 3, &[short; 3]), [(2, 0), (0, 0), (1, 1000)]);
    }

    #[test]
    fn one_server_backs_off_after_every_session_as_before() {
        let max = Duration::from_secs(30);
        let short = Duration::from_secs(1);
        let mut f = Failover::new(max);
        let mut backoff = FIRST_BACKOFF;
        for lasted in [short, short, short, Duration::from_secs(31), short, short] {
            let (wait, next) = backoff_step(backoff, lasted, max);
            backoff = next;
            assert_eq!(f.current(1), 0);
            assert_eq!(f.ended(lasted, 1), wait);
        }
        let waits: Vec<u128> = (0..8).map(|_| f.ended(short, 1).as_millis()).collect();
        assert_eq!(
            waits,
            [4000, 8000, 16000, 30000, 30000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn a_plan_that_shrinks_between_passes_stays_in_bounds() {
        let short = Duration::from_secs(1);
        let mut f = Failover::new(Duration::from_secs(30));
        assert_eq!(run_of(&mut f, 4, &[short; 3]), [(0, 0), (1, 0), (2, 0)]);
        // The names resolved to fewer addresses: position 3 is no more.
        assert_eq!(f.current(2), 1);
        assert_eq!(run_of(&mut f, 2, &[short; 2]), [(1, 500), (0, 0)]);
        assert_eq!(f.ended(short, 0), Duration::from_millis(1000));
    }

    #[test]
    fn the_plan_keeps_the_url_order_each_address_and_a_url_that_did_not_resolve() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let unresolved = tls::TlsError::Connect {
            url: "https://gone:1".into(),
            detail: "cannot resolve gone".into(),
        };
        let plan = plan_of(vec![
            Ok(vec![a("10.0.0.2:8443"), a("10.0.0.1:8443")]),
            Err(unresolved),
            Ok(vec![a("[::1]:9")]),
        ]);
        let got: Vec<(usize, Option<SocketAddr>)> = plan
            .iter()
            .map(|d| (d.target, d.addr.as_ref().ok().copied()))
            .collect();
        assert_eq!(
            got,
            [
                (0, Some(a("10.0.0.2:8443"))),
                (0, Some(a("10.0.0.1:8443"))),
                (1, None),
                (2, Some(a("[::1]:9"))),
            ]
        );
    }

    #[test]
    fn only_a_decision_of_the_service_ends_a_join() {
        use tonic::Code;
        for code in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
        ] {
            assert!(join_answer_is_final(code), "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::Unknown,
            Code::ResourceExhausted,
        ] {
            assert!(!join_answer_is_final(code), "{code:?}");
        }
    }

    #[test]
    fn a_refusal_is_told_apart_from_a_broken_stream() {
        for code in [tonic::Code::PermissionDenied, tonic::Code::Unauthenticated] {
            let e = status_error(tonic::Status::new(code, "revoked"));
            assert_eq!(e.kind(), "refused", "{code:?}");
        }
        let e = status_error(tonic::Status::unavailable("down"));
        assert_eq!(e.kind(), "stream");
        assert!(e.to_string().contains("down"));
    }

    #[test]
    fn a_new_ask_is_answered_at_once_the_same_one_again_only_after_a_while() {
        let now = Instant::now();
        let ask = |v: u32| KeyRef {
            version: v,
            key_id: format!("c/v{v}/aa"),
        };
        assert!(!answer_due(None, &[], now));
        assert!(answer_due(None, &[ask(2)], now));
        let last = (vec![ask(2)], now);
        assert!(!answer_due(
            Some(&last),
            &[ask(2)],
            now + Duration::from_secs(1)
        ));
        assert!(answer_due(Some(&last), &[ask(2), ask(3)], now));
        assert!(answer_due(Some(&last), &[ask(2)], now + REPORT_EVERY));
        assert!(!answer_due(Some(&last), &[], now + REPORT_EVERY));
    }
}

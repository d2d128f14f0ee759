//! The node's link to the central key service: `join` once, then one
//! long-lived sync stream, reconnecting with backoff for as long as it
//! takes.
//!
//! Nothing here is on the KMS path: Status, Encrypt and Decrypt read the
//! published snapshot and never wait on the network. A received state is
//! applied on a blocking thread ([`Node::apply_cluster_state`]: durable
//! first, then published), and only then acknowledged by a report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgekms_core::delivery::DeliveryKey;
use edgekms_core::rotation::cluster::Report;
use edgekms_daemon::pki::{self, PrivateKey};
use edgekms_daemon::tls;
use edgekms_proto::fleet::fleet_client::FleetClient;
use edgekms_proto::fleet::{ClusterState, JoinRequest, KeyRef, NodeReport, ReturnedKey};
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
            SyncError::Tls(_) => "connect",
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

/// The reconnect policy: `(wait now, next backoff)` after a session that
/// lasted `lasted`. Doubling up to `max`; a session that held for 30 s
/// or more starts again from the first wait (it was a fresh failure, not
/// the same outage).
fn backoff_step(backoff: Duration, lasted: Duration, max: Duration) -> (Duration, Duration) {
    let backoff = if lasted > Duration::from_secs(30) {
        FIRST_BACKOFF
    } else {
        backoff
    };
    (backoff.min(max), (backoff * 2).min(max))
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
    server: String,
    tls: Arc<rustls::ClientConfig>,
    delivery: Arc<DeliveryKey>,
    backoff_max: Duration,
}

impl SyncClient {
    /// The client for a joined node; `None` for a standalone one.
    pub fn for_node(node: Arc<Node>, backoff_max: Duration) -> Result<Option<Self>, SyncError> {
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
        Ok(Some(Self {
            node,
            server: record.server,
            tls,
            delivery: Arc::new(delivery),
            backoff_max,
        }))
    }

    /// Syncs forever: reconnects with exponential backoff (with jitter, up
    /// to `backoff_max`), never giving up.
    pub async fn run(self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let err = match self.session(false).await {
                Ok(()) => SyncError::Stream("the service closed the stream".into()),
                Err(e) => e,
            };
            metrics::record_sync_error(err.kind());
            match &err {
                SyncError::Refused(_) => {
                    tracing::error!(error = %err, "the central key service refuses this node; serving cached keys")
                }
                _ => {
                    tracing::warn!(error = %err, "sync with the central key service interrupted; serving cached keys")
                }
            }
            let (wait, next) = backoff_step(backoff, started.elapsed(), self.backoff_max);
            let jitter = rand::thread_rng().gen_range(0.8..1.2);
            tokio::time::sleep(wait.mul_f64(jitter).min(self.backoff_max)).await;
            backoff = next;
        }
    }

    /// One stream. With `until_primary`, returns once the node holds a
    /// primary KEK and reported it (the end of `join`).
    async fn session(&self, until_primary: bool) -> Result<(), SyncError> {
        let channel = tls::connect(&self.server, self.tls.clone()).await?;
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
        tracing::info!(server = %self.server, "connected to the central key service");
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
pub async fn run(node: Arc<Node>, backoff_max: Duration) {
    let mut warned = false;
    loop {
        match SyncClient::for_node(node.clone(), backoff_max) {
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
    pub holding: Report,
    /// The first sync failed after enrolment (the plugin retries when
    /// started).
    pub first_sync: Result<(), SyncError>,
}

/// `edgekms-plugin join`: enrols this node with a one-time token, trusting
/// the service only through the CA pin, then syncs until it holds its
/// cluster's keys.
pub async fn join(
    cfg: &Config,
    server: &str,
    token: &str,
    ca_hash: &str,
) -> Result<Joined, SyncError> {
    let pin = pki::parse_pin(ca_hash)?;
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
    let channel = tls::connect(server, tls::client_config(tls::Trust::Pin(pin), None)?).await?;
    let resp = FleetClient::new(channel)
        .join(JoinRequest {
            token: token.trim().to_owned(),
            cluster: node.cluster().to_owned(),
            node: node.name().to_owned(),
            csr_der: csr.into(),
            delivery_public_key: delivery.public_key().into(),
        })
        .await
        .map_err(|s| SyncError::Refused(s.message().to_owned()))?
        .into_inner();
    let nsk = node.sealing_key()?;
    node.cache()
        .put_fleet(
            &nsk,
            &FleetRecord {
                server: server.to_owned(),
                more_servers: Vec::new(),
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
    let first_sync = match SyncClient::for_node(node.clone(), Duration::from_secs(1))? {
        Some(client) => {
            match tokio::time::timeout(Duration::from_secs(60), client.session(true)).await {
                Ok(result) => result,
                Err(_) => Err(SyncError::Stream("no keys within 60 s".into())),
            }
        }
        None => Err(SyncError::Config("join record missing after join".into())),
    };
    Ok(Joined {
        cluster: node.cluster().to_owned(),
        node: node.name().to_owned(),
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

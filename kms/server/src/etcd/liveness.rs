//! What a serving replica keeps up in etcd besides the state: its lease,
//! its heartbeat (`alive/<name>`), the election of the one replica that
//! runs the once-only jobs (`leader`), and the readiness probe.
//!
//! One lease per session (TTL [`LEASE_TTL`]) carries both the heartbeat
//! and, when held, the leadership: a replica that dies or loses etcd stops
//! renewing it, so both keys vanish when it expires and another replica
//! takes the lead within the TTL (plus one [`TICK`]). A replica that cannot
//! renew its lease stops acting as leader at once, before the lease
//! expires, so two replicas never both believe they lead for longer than
//! a tick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

use super::replicas::Alive;
use super::{retrying, EtcdStore};

pub const LEASE_TTL: i64 = 10;
const TICK: Duration = Duration::from_secs(2);
/// How long the readiness probe's linearizable read may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether this replica runs the once-only jobs now.
#[derive(Clone, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    /// Always the leader (the embedded store has one writer).
    pub fn sole() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn set(&self, on: bool) {
        let was = self.0.swap(on, Ordering::SeqCst);
        if was != on {
            if on {
                tracing::info!("elected: this replica runs automatic rotation, audit retention and scheduled destruction");
            } else {
                tracing::warn!("no longer the leader: another replica runs the once-only jobs");
            }
        }
    }
}

struct Keys {
    alive: Vec<u8>,
    leader: Vec<u8>,
    probe: Vec<u8>,
}

impl EtcdStore {
    /// Starts the heartbeat, the election and the readiness probe of
    /// replica `name` serving on `address`.
    pub fn start_liveness(&self, name: &str, address: String) -> Leadership {
        let leadership = Leadership::default();
        let keys = Arc::new(Keys {
            alive: self.key(&format!("alive/{name}")),
            leader: self.key("leader"),
            probe: self.key("meta/format"),
        });
        let (client, lead, n) = (self.client(), leadership.clone(), name.to_owned());
        let k = keys.clone();
        let mut removed = self.removed();
        self.spawn(async move {
            loop {
                if *removed.borrow_and_update() {
                    lead.set(false);
                    return;
                }
                if let Err(e) = session(&client, &k, &n, &address, &lead).await {
                    lead.set(false);
                    tracing::warn!(error = %e, "etcd lease lost; renewing");
                }
                tokio::time::sleep(TICK).await;
            }
        });
        let (client, health) = (self.client(), self.health_cell());
        self.spawn(async move {
            loop {
                let outcome = probe(&client, &keys.probe).await;
                *health.lock().unwrap_or_else(|e| e.into_inner()) = outcome;
                tokio::time::sleep(TICK).await;
            }
        });
        leadership
    }
}

/// A linearizable read: answered only by a member in contact with a
/// quorum.
async fn probe(client: &Client, key: &[u8]) -> Result<(), String> {
    let kv = client.kv_client();
    let read = retrying(true, || {
        let mut kv = kv.clone();
        async move { kv.get(key.to_vec(), None).await }
    });
    match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("etcd: no quorum or unreachable ({e})")),
        Err(_) => Err(format!(
            "etcd: no quorum or unreachable (no answer to a read within {} s)",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// The etcd member a client's requests reach, by name (or id in hex).
async fn member(client: &Client) -> String {
    let mut m = client.maintenance_client();
    let Ok(Ok(status)) = tokio::time::timeout(PROBE_TIMEOUT, m.status()).await else {
        return String::new();
    };
    let id = status.header().map_or(0, |h| h.member_id());
    let mut c = client.cluster_client();
    if let Ok(Ok(list)) = tokio::time::timeout(PROBE_TIMEOUT, c.member_list()).await {
        if let Some(m) = list.members().iter().find(|m| m.id() == id) {
            if !m.name().is_empty() {
                return m.name().to_owned();
            }
        }
    }
    format!("{id:x}")
}

async fn session(
    client: &Client,
    keys: &Keys,
    name: &str,
    address: &str,
    lead: &Leadership,
) -> Result<(), etcd_client::Error> {
    let mut leases = client.lease_client();
    let lease = retrying(true, || {
        let mut leases = leases.clone();
        async move { leases.grant(LEASE_TTL, None).await }
    })
    .await?
    .id();
    let (mut keeper, mut renewals) = leases.keep_alive(lease).await?;
    let mut kv = client.kv_client();
    let result = async {
        let mut member_name = member(client).await;
        let mut ticks = 0u32;
        loop {
            keeper.keep_alive().await?;
            match tokio::time::timeout(TICK * 2, renewals.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                Ok(Err(e)) => return Err(e),
                _ => {
                    return Err(etcd_client::Error::LeaseKeepAliveError(
                        "the lease was not renewed".into(),
                    ))
                }
            }
            ticks += 1;
            if ticks.is_multiple_of(5) {
                member_name = member(client).await;
            }
            let alive = Alive {
                heartbeat_unix: edgekms_daemon::config::now_unix(),
                address: address.to_owned(),
                etcd_member: member_name.clone(),
            };
            let json = serde_json::to_vec(&alive).unwrap_or_default();
            retrying(true, || {
                let (mut kv, json) = (kv.clone(), json.clone());
                async move {
                    kv.put(
                        keys.alive.clone(),
                        json,
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await
                }
            })
            .await?;
            // Leader if the key is ours (under this lease), or free and
            // now taken.
            let current = kv.get(keys.leader.clone(), None).await?;
            let ours = current.kvs().first().map(|k| k.lease() == lease);
            let leading = match ours {
                Some(ours) => ours,
                None => {
                    let txn = Txn::new()
                        .when(vec![Compare::create_revision(
                            keys.leader.clone(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then(vec![TxnOp::put(
                            keys.leader.clone(),
                            name.as_bytes().to_vec(),
                            Some(PutOptions::new().with_lease(lease)),
                        )]);
                    retrying(false, || {
                        let (mut kv, txn) = (kv.clone(), txn.clone());
                        async move { kv.txn(txn).await }
                    })
                    .await?
                    .succeeded()
                }
            };
            lead.set(leading);
            tokio::time::sleep(TICK).await;
        }
    }
    .await;
    lead.set(false);
    // Best effort: hand over at once rather than after the TTL.
    let _ = tokio::time::timeout(Duration::from_secs(1), leases.revoke(lease)).await;
    result
}

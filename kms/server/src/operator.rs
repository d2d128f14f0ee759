//! What operators do: enrol and revoke nodes, rotate, promote, retire,
//! back up, and follow a rotation to its end. Each operation is audited
//! once, with its outcome ([`crate::audit::AuditLog::outcome`]); the
//! rotation policy (when `--force` promotes, when `--wait` is done) is
//! decided here, not by the CLI.

use std::time::Duration;

use edgekms_core::keyid;
use edgekms_core::rotation::cluster::{Cluster, Event, Progress, Retirement, TokenRecord};
use edgekms_core::rotation::retire;
use edgekms_core::VersionState;
use edgekms_daemon::config::now_unix;
use edgekms_hsm::Key256;
use edgekms_proto::fleet as pb;
use rand::Rng;

use crate::audit::AuditRecord;
use crate::backup::{self, Summary};
use crate::error::ServerError;
use crate::state_store::Op;
use crate::Central;

/// What an accepted [`Central::add_node`] returns.
#[derive(Debug)]
pub struct Invitation {
    pub token: String,
    pub expires_unix: u64,
    pub ca_hash: String,
    pub cluster_created: bool,
}

/// What [`Central::retire`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    /// Destroyed already (never with a grace period).
    pub destroyed: bool,
    /// Nodes that still hold it.
    pub waiting_for: Vec<String>,
    /// When it is destroyed; disabled until then.
    pub destroy_after_unix: u64,
}

/// What [`Central::rotate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub version: u32,
    pub key_id: String,
    /// False: a rotation was already pending, and this is it.
    pub created: bool,
    /// Promoted at once (a cluster without active nodes).
    pub promoted: bool,
}

/// How long a forced promotion waits for connected nodes that have not
/// acked yet: they ack within moments, unless something is wrong.
pub const FORCE_GRACE: Duration = Duration::from_secs(10);
/// How often a watched rotation is looked at besides every change of its
/// cluster (node progress is absorbed without waking anyone).
const WATCH_TICK: Duration = Duration::from_millis(250);

/// A join token id: 128 random bits, hex. Never one in use: a collision
/// (astronomically unlikely, but then an invitation would silently replace
/// another node's) draws again, and gives up after a few draws.
fn fresh_token_id(
    in_use: impl Fn(&str) -> bool,
    mut draw: impl FnMut() -> String,
) -> Result<String, ServerError> {
    for _ in 0..8 {
        let id = draw();
        if !in_use(&id) {
            return Ok(id);
        }
    }
    Err(ServerError::InvalidArgument(
        "cannot draw an unused join token id; try again".into(),
    ))
}

fn random_token_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn random_string(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

impl Central {
    /// Refuses (and audits, without the names) a call naming a cluster or
    /// node that is not a valid name: nothing else sees such a name.
    pub(crate) fn check_names(
        &self,
        event: &str,
        actor: &str,
        names: &[&str],
    ) -> Result<(), ServerError> {
        for name in names {
            if let Err(e) = keyid::validate_name(name) {
                self.audit
                    .record(AuditRecord::new(event, actor).result(&e.to_string()));
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// `kmsctl node add`: creates the cluster if needed (version 1
    /// primary), issues a join token.
    pub fn add_node(
        &self,
        actor: &str,
        cluster: &str,
        node: &str,
        ttl: Duration,
    ) -> Result<Invitation, ServerError> {
        keyid::validate_name(cluster)?;
        keyid::validate_name(node)?;
        let now = now_unix();
        let expires_unix = now.checked_add(ttl.as_secs()).ok_or_else(|| {
            ServerError::InvalidArgument(format!(
                "token lifetime of {} s is too long",
                ttl.as_secs()
            ))
        })?;
        let secret = random_string(16);
        let id = fresh_token_id(|id| self.commit.token(id).is_some(), random_token_id)?;
        let token = TokenRecord {
            id: id.clone(),
            secret_sha256: edgekms_core::rotation::cluster::token_hash(&secret),
            expires_unix,
            used: false,
        };
        let mut created = false;
        let result = self.commit.create_or_mutate(
            cluster,
            |ops| {
                created = true;
                let key = Key256::generate();
                let key_id = keyid::derive(cluster, 1, &key);
                ops.push(Op::PutKek {
                    cluster: cluster.to_owned(),
                    version: 1,
                    key_id: key_id.clone(),
                    key,
                });
                Cluster::new(cluster, key_id, now)
            },
            |c, _| {
                c.invite(node, token.clone())?;
                Ok(((), Vec::new()))
            },
        );
        let rec = AuditRecord::new("enrol-invite", actor)
            .cluster(cluster)
            .node(node);
        if let Err(e) = result {
            self.audit.record(rec.result(&e.to_string()));
            return Err(e);
        }
        if created {
            self.audit.record(
                AuditRecord::new("rotation", actor)
                    .cluster(cluster)
                    .version(1)
                    .detail("cluster created; version 1 is primary"),
            );
        }
        self.audit
            .record(rec.detail(format!("join token {id} expires at {expires_unix}")));
        Ok(Invitation {
            token: format!("{id}.{secret}"),
            expires_unix,
            ca_hash: self.ca_hash.clone(),
            cluster_created: created,
        })
    }

    /// `kmsctl node remove`.
    pub fn remove_node(&self, actor: &str, cluster: &str, node: &str) -> Result<(), ServerError> {
        self.check_names("revocation", actor, &[cluster, node])?;
        let result = self.mutate(cluster, |c, _| Ok(((), c.revoke(node, now_unix())?)));
        let rec = AuditRecord::new("revocation", actor)
            .cluster(cluster)
            .node(node);
        self.audit.outcome(rec, &result, |rec, _| rec);
        result.map(|_| ())
    }

    /// `kmsctl rotate`: a new pending version, or the one already pending.
    pub fn rotate(&self, actor: &str, cluster: &str) -> Result<Rotation, ServerError> {
        self.check_names("rotation", actor, &[cluster])?;
        let result = self.mutate(cluster, |c, ops| {
            let key = Key256::generate();
            let upcoming = c.upcoming_version();
            let key_id = keyid::derive(c.name(), upcoming, &key);
            let (version, created, events) = c.rotate(key_id.clone(), now_unix())?;
            if created {
                ops.push(Op::PutKek {
                    cluster: c.name().to_owned(),
                    version,
                    key_id,
                    key,
                });
            }
            edgekms_daemon::failpoint::hit("server-rotate-before-commit");
            let meta = c.versions().get(&version);
            let rotation = Rotation {
                version,
                key_id: meta.map(|m| m.key_id.clone()).unwrap_or_default(),
                created,
                promoted: meta.is_some_and(|m| m.state == VersionState::Primary),
            };
            Ok((rotation, events))
        });
        let rec = AuditRecord::new("rotation", actor).cluster(cluster);
        self.audit.outcome(rec, &result, |rec, (r, _)| {
            rec.version(r.version).detail(if r.created {
                "new pending version"
            } else {
                "a rotation was already pending"
            })
        });
        result.map(|(r, _)| r)
    }

    /// `kmsctl rotate --force`: promotes now; returns the nodes left out.
    pub fn force_promote(
        &self,
        actor: &str,
        cluster: &str,
        version: u32,
    ) -> Result<Vec<String>, ServerError> {
        self.check_names("promotion", actor, &[cluster])?;
        let result = self.mutate(cluster, |c, _| {
            Ok(((), c.force_promote(version, now_unix())?))
        });
        // A success is audited as the protocol's own promotion event.
        if let Err(e) = &result {
            self.audit.record(
                AuditRecord::new("promotion", actor)
                    .cluster(cluster)
                    .version(version)
                    .result(&e.to_string()),
            );
        }
        let (_, events) = result?;
        Ok(events
            .into_iter()
            .find_map(|e| match e {
                Event::Promoted { without, .. } => Some(without),
                _ => None,
            })
            .unwrap_or_default())
    }

    /// `kmsctl reconcile CLUSTER --without NODES`: ends a reconciliation
    /// without the nodes that hold it up, named exactly.
    pub fn end_reconcile(
        &self,
        actor: &str,
        cluster: &str,
        without: &[String],
    ) -> Result<(), ServerError> {
        self.check_names("end-reconcile", actor, &[cluster])?;
        let result = self.mutate(cluster, |c, _| {
            Ok(((), c.end_reconcile(without, now_unix())?))
        });
        let rec = AuditRecord::new("end-reconcile", actor)
            .cluster(cluster)
            .detail(format!("without {}", without.join(", ")));
        self.audit.outcome(rec, &result, |rec, _| rec);
        result.map(|_| ())
    }

    /// `kmsctl retire`: disables `version` for `grace_secs` (0: 7 days),
    /// after which it is destroyed; refused unless a census shows it
    /// unused or `skip_census` (audited as such).
    pub fn retire(
        &self,
        actor: &str,
        cluster: &str,
        version: u32,
        grace_secs: u64,
        skip_census: bool,
    ) -> Result<Retired, ServerError> {
        self.check_names("retirement", actor, &[cluster])?;
        let rec = AuditRecord::new("retirement", actor)
            .cluster(cluster)
            .version(version);
        let grace = match retire::grace(grace_secs, self.min_grace_secs) {
            Ok(g) => g,
            Err(e) => {
                let err: Result<(), ServerError> = Err(ServerError::InvalidArgument(e.to_string()));
                self.audit.outcome(rec, &err, |rec, _| rec);
                return Err(ServerError::InvalidArgument(e.to_string()));
            }
        };
        let how = Retirement {
            grace_secs: grace,
            skip_census,
        };
        let result = self.mutate(cluster, |c, _| {
            let (events, destroy_after) = c.retire(version, now_unix(), how)?;
            Ok(((c.holders(version), destroy_after), events))
        });
        let rec = if skip_census {
            rec.detail(format!(
                "CENSUS SKIPPED (--skip-census): no census showed the version unused; grace {grace} s"
            ))
        } else {
            rec.detail(format!("grace {grace} s"))
        };
        self.audit.outcome(rec, &result, |rec, _| rec);
        let ((waiting_for, destroy_after_unix), events) = result?;
        Ok(Retired {
            destroyed: events.contains(&Event::Destroyed { version }),
            waiting_for,
            destroy_after_unix,
        })
    }

    /// `kmsctl restore-version`: a disabled version back to decrypt-only.
    pub fn restore_version(
        &self,
        actor: &str,
        cluster: &str,
        version: u32,
    ) -> Result<(), ServerError> {
        self.check_names("restore-version", actor, &[cluster])?;
        let result = self.mutate(cluster, |c, _| {
            let events = c.restore_version(version, now_unix())?;
            Ok(((), events))
        });
        let rec = AuditRecord::new("restore-version", actor)
            .cluster(cluster)
            .version(version);
        self.audit.outcome(rec, &result, |rec, _| rec);
        result.map(|_| ())
    }

    /// Ends the grace period of every disabled version due at `now`: nodes
    /// are told to destroy them. Run on a timer.
    pub fn destroy_due(&self) {
        self.destroy_due_at(now_unix())
    }

    pub(crate) fn destroy_due_at(&self, now: u64) {
        let due: Vec<String> = self.commit.read_all(|all| {
            all.filter(|c| c.next_destruction().is_some_and(|t| t <= now))
                .map(|c| c.name().to_owned())
                .collect()
        });
        for cluster in due {
            let result = self.mutate(&cluster, |c, _| Ok(((), c.advance(now))));
            if let Err(e) = result {
                tracing::warn!(cluster, error = %e, "ending a grace period failed; retrying");
            }
        }
    }

    /// Starts the rotations automatic rotation calls for.
    pub fn auto_rotate_due(&self) {
        let now = now_unix();
        let due: Vec<String> = self.commit.read_all(|all| {
            // A reconciling cluster is not rotated: its nodes may hold
            // versions it does not know yet.
            all.filter(|c| c.pending().is_none() && c.reconciling().is_none())
                .filter(|c| {
                    let Some(interval) = self.auto_rotate.interval(c.name()) else {
                        return false;
                    };
                    c.primary()
                        .is_some_and(|(_, m)| m.changed_unix + interval.as_secs() <= now)
                })
                .map(|c| c.name().to_owned())
                .collect()
        });
        for cluster in due {
            if let Err(e) = self.rotate("auto-rotate", &cluster) {
                tracing::warn!(%cluster, error = %e, "automatic rotation failed");
            }
        }
    }

    /// `kmsctl backup`: the whole state, one consistent cut of it,
    /// encrypted under `key`; audited as event `backup`.
    pub fn backup(
        &self,
        actor: &str,
        key: &Key256,
        with_audit: bool,
    ) -> Result<(Vec<u8>, Summary), ServerError> {
        let result = self
            .store()
            .snapshot(self.commit.root(), with_audit)
            .map_err(ServerError::from)
            .map(|snapshot| backup::make(&snapshot, key, now_unix()));
        self.audit.outcome(
            AuditRecord::new("backup", actor),
            &result,
            |rec, (blob, s)| {
                rec.detail(format!(
                    "{} clusters, {} key versions, {} audit records, {} bytes",
                    s.clusters,
                    s.key_versions,
                    s.audit_records,
                    blob.len()
                ))
            },
        );
        result
    }

    /// Follows the rotation of `cluster` to `version` (`kmsctl rotate
    /// --force` / `--wait`), handing each change of progress to `send`
    /// until the watch is complete or `send` says stop. With `force`, the
    /// version is promoted once no connected node lacks it, or after
    /// [`FORCE_GRACE`]; with `wait`, the watch ends once the version is
    /// settled. Neither: one message.
    pub async fn watch_rotation<F>(
        &self,
        actor: &str,
        req: &pb::WatchRotationRequest,
        mut send: impl FnMut(pb::RotationProgress) -> F,
    ) -> Result<(), ServerError>
    where
        F: std::future::Future<Output = bool>,
    {
        keyid::validate_name(&req.cluster)?;
        let (cluster, version) = (req.cluster.as_str(), req.version);
        let mut changes = self.subscribe(cluster);
        let grace_ends = tokio::time::Instant::now() + FORCE_GRACE;
        let mut stale: Vec<String> = Vec::new();
        let mut forced = !req.force;
        let mut last: Option<pb::RotationProgress> = None;
        loop {
            let progress = self
                .commit
                .read(cluster, |c| c.progress(version, &stale))??;
            if !forced && matches!(progress, Progress::Gone(_)) {
                // Nothing to promote: the progress below says what it is.
                forced = true;
            }
            if !forced {
                let pending = matches!(progress, Progress::Pending { .. });
                let ready = !pending
                    || tokio::time::Instant::now() >= grace_ends
                    || self.commit.read(cluster, |c| {
                        c.only_unreachable_lack(version, |node| self.streams.is_open(cluster, node))
                    })?;
                if ready {
                    if pending {
                        stale = self.force_promote(actor, cluster, version)?;
                    }
                    forced = true;
                    let state = self.version_state(cluster, version)?;
                    let done = !req.wait;
                    let msg = pb::RotationProgress {
                        phase: "promoted".into(),
                        version,
                        stale_nodes: stale.clone(),
                        state,
                        done,
                        ..Default::default()
                    };
                    if !send(msg).await || done {
                        return Ok(());
                    }
                    continue;
                }
            }
            let state = self.version_state(cluster, version)?;
            let msg = crate::views::progress_message(version, &progress, &stale, state);
            let done = msg.done || (!req.wait && forced);
            let msg = pb::RotationProgress { done, ..msg };
            if last.as_ref() != Some(&msg) {
                if !send(msg.clone()).await || done {
                    return Ok(());
                }
                last = Some(msg);
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(WATCH_TICK) => {}
            }
        }
    }

    fn version_state(&self, cluster: &str, version: u32) -> Result<String, ServerError> {
        self.commit.read(cluster, |c| {
            c.versions()
                .get(&version)
                .map(|m| m.state.as_str().to_owned())
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Watches a rotation to its end; the messages sent.
    async fn watch(
        core: &Central,
        version: u32,
        force: bool,
        wait: bool,
    ) -> Vec<pb::RotationProgress> {
        let req = pb::WatchRotationRequest {
            cluster: "edge-1".into(),
            version,
            force,
            wait,
        };
        let sent = std::sync::Mutex::new(Vec::new());
        core.watch_rotation("test", &req, |msg| {
            sent.lock().unwrap().push(msg);
            async { true }
        })
        .await
        .unwrap();
        sent.into_inner().unwrap()
    }

    #[tokio::test]
    async fn the_service_says_when_a_rotation_is_done_or_gone() {
        let tmp = tempfile::tempdir().unwrap();
        // edge-1: v1 retired, v2 decrypt-only, v3 primary; no node joined.
        let core = crate::backup::tests::server(tmp.path());
        let settled = watch(&core, 3, false, true).await;
        assert_eq!(settled.len(), 1);
        assert_eq!(
            (settled[0].phase.as_str(), settled[0].done),
            ("settled", true)
        );
        // Forcing a version that is primary already promotes nothing.
        let forced = watch(&core, 3, true, false).await;
        assert_eq!(forced.len(), 1);
        assert_eq!(forced[0].phase, "promoted");
        assert!(forced[0].stale_nodes.is_empty());
        // A superseded version is gone, forced or not; never promoted.
        for force in [false, true] {
            let gone = watch(&core, 2, force, true).await;
            assert_eq!(gone.len(), 1, "{gone:?}");
            assert_eq!(
                (gone[0].phase.as_str(), gone[0].state.as_str()),
                ("gone", "decrypt-only")
            );
            assert!(gone[0].done);
        }
        let state = core.status("edge-1").unwrap().clusters[0].primary;
        assert_eq!(state, 3);
    }

    #[test]
    fn token_ids_are_128_bit_and_never_reuse_one_in_use() {
        let id = random_token_id();
        assert_eq!(id.len(), 32);
        assert!(hex::decode(&id).is_ok());
        assert_ne!(id, random_token_id());
        let in_use = |id: &str| id == "taken";
        // A collision draws again.
        let mut draws = vec!["fresh", "taken"];
        let got = fresh_token_id(in_use, || draws.pop().unwrap().to_owned()).unwrap();
        assert_eq!(got, "fresh");
        // Only collisions: refused.
        assert!(fresh_token_id(in_use, || "taken".to_owned()).is_err());
    }
}

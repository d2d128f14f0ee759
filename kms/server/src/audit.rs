//! The central service's audit record: one per enrolment, revocation,
//! delivery, ack, rotation, promotion, retirement, destruction and refused
//! connection. Written as a log line on target `audit` (ship it apart with
//! the log filter) and kept in the state store for `kmsctl audit`. It names
//! who, what, which version and the result; never key material.
//!
//! Every text field is bounded ([`MAX_FIELD`]) when set, since several come
//! from callers. Refusals of unauthenticated peers and failed joins go
//! through [`Refusals`]: the first of a kind per peer address is kept at
//! once, the rest are counted and kept as one record per minute, so that a
//! flood costs a bounded number of records and log lines.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgekms_daemon::config::now_unix;
use edgekms_proto::fleet as pb;
use serde::{Deserialize, Serialize};

use edgekms_core::rotation::cluster::Event;

use crate::error::ServerError;
use crate::state_store::StateStore;

/// Longest text field of a record, in characters (then `...`).
pub const MAX_FIELD: usize = 512;

fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_FIELD) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub time_ms: u64,
    pub event: String,
    pub actor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u32,
    pub result: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// How many events this record stands for, when more than one (an
    /// aggregated refusal); absent otherwise.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub count: u64,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl AuditRecord {
    /// A successful `event` by `actor`; refine with the builders.
    pub fn new(event: &str, actor: &str) -> Self {
        Self {
            time_ms: now_ms(),
            event: bounded(event),
            actor: bounded(actor),
            cluster: String::new(),
            node: String::new(),
            version: 0,
            result: "ok".into(),
            detail: String::new(),
            count: 0,
        }
    }

    pub fn cluster(mut self, cluster: &str) -> Self {
        self.cluster = bounded(cluster);
        self
    }

    pub fn node(mut self, node: &str) -> Self {
        self.node = bounded(node);
        self
    }

    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// A failure: `result` is the reason.
    pub fn result(mut self, result: &str) -> Self {
        self.result = bounded(result);
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = bounded(&detail.into());
        self
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The log line.
    pub fn emit(&self) {
        tracing::info!(
            target: "audit",
            event = %self.event,
            actor = %self.actor,
            cluster = %self.cluster,
            node = %self.node,
            version = self.version,
            result = %self.result,
            detail = %self.detail,
            count = self.count,
        );
    }
}

/// How many distinct (peer, kind) keys one window tracks; refusals beyond
/// that are counted under one "other peers" key per kind.
pub const MAX_REFUSAL_KEYS: usize = 256;

/// What a refusal is counted under: the peer's address (IPv6 by /64, as
/// one host usually owns a /64), what was refused and why, both from fixed
/// sets so that no caller can mint keys beyond the cap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RefusalKey {
    /// None: the "other peers" bucket.
    peer: Option<IpAddr>,
    what: &'static str,
    class: &'static str,
}

struct Tally {
    /// Events since the first one, which was kept at once.
    more: u64,
    /// The first event's record: its result and actor head the summary.
    first: AuditRecord,
}

/// The peer address a refusal is counted under.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Refusals of the current window (a minute), bounded in keys.
#[derive(Default)]
pub struct Refusals {
    window: Mutex<HashMap<RefusalKey, Tally>>,
}

impl Refusals {
    /// Counts one refusal. Returns the record to keep now when it is the
    /// first of its key in this window; `None` when it was only counted.
    pub fn note(
        &self,
        peer: Option<IpAddr>,
        what: &'static str,
        class: &'static str,
        rec: impl FnOnce() -> AuditRecord,
    ) -> Option<AuditRecord> {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = RefusalKey {
            peer: peer.map(peer_key),
            what,
            class,
        };
        if !window.contains_key(&key) && window.len() >= MAX_REFUSAL_KEYS {
            key.peer = None;
        }
        match window.get_mut(&key) {
            Some(tally) => {
                tally.more += 1;
                None
            }
            None => {
                let mut first = rec();
                if key.peer.is_none() {
                    first.actor = format!("other peers (over {MAX_REFUSAL_KEYS} addresses)");
                }
                window.insert(
                    key,
                    Tally {
                        more: 0,
                        first: first.clone(),
                    },
                );
                Some(first)
            }
        }
    }

    /// Ends the window: one summary record per key that saw more than its
    /// first event, with the count.
    pub fn drain(&self) -> Vec<AuditRecord> {
        let window = std::mem::take(&mut *self.window.lock().unwrap_or_else(|e| e.into_inner()));
        window
            .into_values()
            .filter(|t| t.more > 0)
            .map(|t| {
                let mut rec = AuditRecord::new(&t.first.event, &t.first.actor)
                    .result(&t.first.result)
                    .detail(match t.first.detail.as_str() {
                        "" => format!(
                            "{} more like this since the first at unix ms {}",
                            t.more, t.first.time_ms
                        ),
                        d => format!(
                            "{} more like this ({d}) since the first at unix ms {}",
                            t.more, t.first.time_ms
                        ),
                    });
                rec.count = t.more;
                rec
            })
            .collect()
    }

    /// Keys held now (for tests and metrics).
    pub fn keys(&self) -> usize {
        self.window.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// How long and how many audit records are kept (`--audit-retention`,
/// `--audit-max-records`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_records: u64,
}

/// A year: an audit trail for key custody is usually asked for that long.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// About 300 MB of store at the usual record size of a few hundred bytes.
pub const DEFAULT_AUDIT_MAX_RECORDS: u64 = 1_000_000;

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: DEFAULT_AUDIT_RETENTION,
            max_records: DEFAULT_AUDIT_MAX_RECORDS,
        }
    }
}

/// The time of a stored audit record, read from its head: records are
/// written with `time_ms` first, so retention and `--since` need not parse
/// whole records; anything else is parsed in full.
pub fn audit_time_ms(raw: &[u8]) -> Option<u64> {
    const HEAD: &[u8] = b"{\"time_ms\":";
    if let Some(rest) = raw.strip_prefix(HEAD) {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 {
            return std::str::from_utf8(&rest[..digits]).ok()?.parse().ok();
        }
    }
    #[derive(serde::Deserialize)]
    struct Time {
        time_ms: u64,
    }
    serde_json::from_slice::<Time>(raw).ok().map(|t| t.time_ms)
}

/// The records of what the rotation protocol did in one change.
pub fn protocol_events(cluster: &str, events: &[Event]) -> Vec<AuditRecord> {
    events
        .iter()
        .map(|event| match event {
            Event::Acked { node, version } => AuditRecord::new("ack", "node")
                .cluster(cluster)
                .node(node)
                .version(*version),
            Event::Dropped { node, version } => AuditRecord::new("drop-ack", "node")
                .cluster(cluster)
                .node(node)
                .version(*version),
            Event::Promoted { version, without } => {
                let rec = AuditRecord::new("promotion", "server")
                    .cluster(cluster)
                    .version(*version);
                if without.is_empty() {
                    rec
                } else {
                    rec.detail(format!("forced without {}", without.join(", ")))
                }
            }
            Event::Destroyed { version } => AuditRecord::new("destroy", "server")
                .cluster(cluster)
                .version(*version)
                .detail("every node dropped it; central copy destroyed"),
            Event::Disabled {
                version,
                destroy_after_unix,
                census_skipped,
            } => AuditRecord::new("disable", "server")
                .cluster(cluster)
                .version(*version)
                .detail(format!(
                    "Decrypt under it refused; destroyed at {}{}",
                    edgekms_core::utc::format(*destroy_after_unix),
                    if *census_skipped {
                        " (census skipped)"
                    } else {
                        ""
                    }
                )),
            Event::Restored { version } => AuditRecord::new("restore-version", "server")
                .cluster(cluster)
                .version(*version)
                .detail("decrypt-only again"),
            Event::GraceOver { version } => AuditRecord::new("grace-over", "server")
                .cluster(cluster)
                .version(*version)
                .detail("grace period over: nodes destroy it, then the central copy goes"),
            Event::Census { node, taken_unix } => AuditRecord::new("census", "node")
                .cluster(cluster)
                .node(node)
                .detail(format!("a census taken at {}", edgekms_core::utc::format(*taken_unix))),
            Event::ReconcileStarted { reason } => AuditRecord::new("reconciling", "server")
                .cluster(cluster)
                .detail(reason.clone()),
            Event::Clash {
                node,
                version,
                service_key_id,
                node_key_id,
            } => AuditRecord::new("clash", "node")
                .cluster(cluster)
                .node(node)
                .version(*version)
                .result("refused")
                .detail(format!(
                    "the node holds {node_key_id}, the service knows {}",
                    if service_key_id.is_empty() {
                        "no key for it (its nodes disagree, or the number is beyond any it could have made)"
                    } else {
                        service_key_id
                    }
                )),
            Event::Healed { node, version } => AuditRecord::new("heal", "node")
                .cluster(cluster)
                .node(node)
                .version(*version)
                .detail("a version the service lacked, returned by the node and checked against its key_id"),
            Event::LearnedDestroyed { node, version } => AuditRecord::new("learned-destroyed", "node")
                .cluster(cluster)
                .node(node)
                .version(*version)
                .detail("the node destroyed it: retired here too"),
            Event::Reconciled { primary, without } => {
                let rec = AuditRecord::new("reconciled", "server")
                    .cluster(cluster)
                    .version(*primary);
                if without.is_empty() {
                    rec.detail("every node reported")
                } else {
                    rec.detail(format!("ended by the operator without {}", without.join(", ")))
                }
            }
        })
        .collect()
}

/// The audit log: every record is written here, once, and kept in the
/// [`StateStore`] for `kmsctl audit`.
pub struct AuditLog {
    store: Arc<dyn StateStore>,
    refusals: Refusals,
}

impl AuditLog {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self {
            store,
            refusals: Refusals::default(),
        }
    }

    /// Writes one audit line (log target `audit`) and keeps it.
    pub fn record(&self, rec: AuditRecord) {
        rec.emit();
        if let Err(e) = self.store.append_audit(&rec.to_json()) {
            tracing::error!(error = %e, "cannot store an audit record");
        }
    }

    /// Records the outcome of an operation: `rec` as `on_ok` completes it,
    /// or with the error as its result.
    pub fn outcome<T>(
        &self,
        rec: AuditRecord,
        result: &Result<T, ServerError>,
        on_ok: impl FnOnce(AuditRecord, &T) -> AuditRecord,
    ) {
        match result {
            Ok(out) => self.record(on_ok(rec, out)),
            Err(e) => self.record(rec.result(&e.to_string())),
        }
    }

    /// A refusal of an unauthenticated or failed caller, counted per peer
    /// address and kind ([`Refusals`]): kept at once when it is the first
    /// of its kind this minute, else only counted.
    pub fn refused(
        &self,
        peer: Option<SocketAddr>,
        what: &'static str,
        class: &'static str,
        rec: impl FnOnce() -> AuditRecord,
    ) {
        if let Some(rec) = self.refusals.note(peer.map(|p| p.ip()), what, class, rec) {
            self.record(rec);
        }
    }

    /// Ends the refusal window: one record per kind and peer with the
    /// count of what was only counted. Called every minute and at shutdown.
    pub fn flush_refusals(&self) {
        for rec in self.refusals.drain() {
            self.record(rec);
        }
    }

    /// Peer keys counted in this refusal window.
    pub fn refusal_keys(&self) -> usize {
        self.refusals.keys()
    }

    /// Applies audit retention: deletes the oldest records beyond
    /// `max_records` and those older than `max_age`. Returns how many
    /// sequence numbers were deleted.
    pub fn apply_retention(&self, retention: Retention) -> Result<u64, ServerError> {
        let Some((first, last)) = self.store.audit_bounds()? else {
            return Ok(0);
        };
        // Sequence numbers are dense (gaps only where a write failed), so
        // keeping those above `last - max` keeps at most `max` records.
        let mut below = last
            .saturating_sub(retention.max_records)
            .saturating_add(1)
            .max(first);
        let cutoff_ms =
            (now_unix().saturating_sub(retention.max_age.as_secs())).saturating_mul(1000);
        // Records are appended in time order: the first one young enough
        // ends the scan.
        self.store
            .audit_scan(below, &mut |seq, raw| match audit_time_ms(raw) {
                Some(t) if t < cutoff_ms => {
                    below = seq + 1;
                    true
                }
                _ => false,
            })?;
        if below <= first {
            return Ok(0);
        }
        self.store.delete_audit_below(below)?;
        let deleted = below - first;
        tracing::info!(
            deleted,
            kept_from = below,
            "audit retention: deleted the oldest records"
        );
        Ok(deleted)
    }

    /// `kmsctl audit`: records at or after `since_unix`, after sequence
    /// number `after_seq`, the newest `limit` of them (0: all), oldest
    /// first, handed to `send` in pages of bounded size until it says
    /// stop. Blocking (RocksDB reads): run it on a blocking thread.
    pub fn stream_audit(
        &self,
        since_unix: u64,
        limit: u64,
        after_seq: u64,
        mut send: impl FnMut(Vec<pb::AuditRecord>) -> bool,
    ) -> Result<(), ServerError> {
        const PAGE_RECORDS: usize = 2000;
        const PAGE_BYTES: usize = 1 << 20;
        let since_ms = since_unix.saturating_mul(1000);
        let young = |raw: &[u8]| since_ms == 0 || audit_time_ms(raw).is_some_and(|t| t >= since_ms);
        let mut start = after_seq.saturating_add(1);
        if limit > 0 {
            // Walk back from the newest to where the `limit` newest begin.
            let (floor, mut counted) = (start, 0);
            self.store.audit_scan_back(u64::MAX, &mut |seq, raw| {
                if seq < floor || !young(raw) {
                    return false;
                }
                counted += 1;
                start = seq;
                counted < limit
            })?;
            if counted == 0 {
                return Ok(());
            }
        }
        let mut page = Vec::new();
        let mut bytes = 0;
        let mut sent = 0u64;
        let mut open = true;
        self.store.audit_scan(start, &mut |seq, raw| {
            if !young(raw) {
                return true;
            }
            let json = String::from_utf8_lossy(raw).into_owned();
            bytes += json.len();
            page.push(pb::AuditRecord {
                time_unix_ms: audit_time_ms(raw).unwrap_or(0),
                json,
                seq,
            });
            sent += 1;
            if page.len() >= PAGE_RECORDS || bytes >= PAGE_BYTES {
                bytes = 0;
                open = send(std::mem::take(&mut page));
            }
            open && (limit == 0 || sent < limit)
        })?;
        if open && !page.is_empty() {
            send(page);
        }
        Ok(())
    }

    /// Audit records at or after `since_unix`.
    pub fn audit_since(&self, since_unix: u64) -> Result<Vec<AuditRecord>, ServerError> {
        let mut out = Vec::new();
        self.store.audit_scan(0, &mut |_, raw| {
            if let Ok(rec) = serde_json::from_slice::<AuditRecord>(raw) {
                if rec.time_ms / 1000 >= since_unix {
                    out.push(rec);
                }
            }
            true
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused(peer: &str) -> AuditRecord {
        AuditRecord::new("refused", &format!("peer {peer}"))
            .result("TLS handshake failed")
            .detail("connection")
    }

    #[test]
    fn refusals_keep_the_first_and_count_the_rest() {
        let r = Refusals::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(r
            .note(Some(a), "connection", "tls", || refused("a"))
            .is_some());
        for _ in 0..999 {
            assert!(r
                .note(Some(a), "connection", "tls", || refused("a"))
                .is_none());
        }
        // Another kind from the same peer is a key of its own.
        assert!(r
            .note(Some(a), "join", "BadToken", || refused("a"))
            .is_some());
        let out = r.drain();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].count, 999);
        assert!(out[0].detail.starts_with("999 more"), "{}", out[0].detail);
        assert_eq!(r.keys(), 0);
        // A new window keeps the first again.
        assert!(r
            .note(Some(a), "connection", "tls", || refused("a"))
            .is_some());
    }

    #[test]
    fn keys_are_capped_and_ipv6_counts_by_64() {
        let r = Refusals::default();
        let mut kept = 0;
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if r.note(Some(ip), "connection", "tls", || refused("x"))
                .is_some()
            {
                kept += 1;
            }
        }
        assert_eq!(kept, MAX_REFUSAL_KEYS + 1);
        assert_eq!(r.keys(), MAX_REFUSAL_KEYS + 1);
        let out = r.drain();
        let other = out
            .iter()
            .find(|o| o.actor.starts_with("other peers"))
            .unwrap();
        assert_eq!(other.count, 10_000 - MAX_REFUSAL_KEYS as u64 - 1);
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        assert_eq!(peer_key(v6a), peer_key(v6b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(peer_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn fields_are_bounded() {
        let rec = AuditRecord::new("refused", &"a".repeat(1 << 20)).result(&"é".repeat(1 << 20));
        assert!(rec.to_json().len() < 4 * MAX_FIELD + 200);
    }

    #[test]
    fn json_round_trip_omits_empty_fields() {
        let rec = AuditRecord::new("rotation", "operator admin")
            .cluster("a")
            .version(2);
        let json = String::from_utf8(rec.to_json()).unwrap();
        assert!(!json.contains("\"node\""));
        assert!(json.contains("\"result\":\"ok\""));
        let back: AuditRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
    }
}

#[cfg(test)]
mod proptests;

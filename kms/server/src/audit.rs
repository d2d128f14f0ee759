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
use std::net::IpAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

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

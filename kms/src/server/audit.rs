//! The central service's audit record: one per enrolment, revocation,
//! delivery, ack, rotation, promotion, retirement, destruction and refused
//! connection. Written as a log line on target `audit` (ship it apart with
//! the log filter) and kept in the state store for `kmsctl audit`. It names
//! who, what, which version and the result; never key material.

use serde::{Deserialize, Serialize};

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
}

fn is_zero(v: &u32) -> bool {
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
            event: event.to_owned(),
            actor: actor.to_owned(),
            cluster: String::new(),
            node: String::new(),
            version: 0,
            result: "ok".into(),
            detail: String::new(),
        }
    }

    pub fn cluster(mut self, cluster: &str) -> Self {
        self.cluster = cluster.to_owned();
        self
    }

    pub fn node(mut self, node: &str) -> Self {
        self.node = node.to_owned();
        self
    }

    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// A failure: `result` is the reason.
    pub fn result(mut self, result: &str) -> Self {
        self.result = result.to_owned();
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
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
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! A storage census: for every object kube-apiserver stored, which KMS v2
//! key_id it is under (or that it is not encrypted, or under another
//! provider), counted per resource, at one etcd revision. Part of "retiring
//! a key can never destroy data still under it": a key_id with objects
//! under it must not be retired.
//!
//! This crate owns: reading the store ([`take`]), classifying a value from
//! its bytes ([`value`]), naming a key's resource ([`resource`]),
//! kube-apiserver's EncryptionConfiguration ([`Spec::from_encryption_config`])
//! and the tally ([`Census`]). It knows no other edgekms crate and holds no
//! key: it reads ciphertext headers only, never decrypts.
//!
//! # The requests it makes
//!
//! Only `etcdserverpb.KV/Range` (our own copy of its messages in
//! `proto/etcd/kv.proto`, field numbers identical to etcd's: etcd-client's
//! build needs a system protoc, this workspace compiles with protox), over a
//! connection we make (TCP, rustls with ring, or a unix socket), and only
//! in the subset that kine (K3s's SQLite store) and MicroK8s's k8s-dqlite
//! (a kine fork) serve, so the same census runs on etcd, kine and dqlite:
//!
//! 1. `Range{key: PREFIX, range_end: PREFIX+1 (the prefix's last byte
//!    incremented), limit: page_size}` (revision 0: the newest);
//! 2. then, while the answer says `more`, `Range{key: LAST_KEY + "\0",
//!    range_end: PREFIX+1, limit: page_size, revision: R}` where R is the
//!    header revision of the first answer: every page reads the same
//!    snapshot, so objects written during the census do not move counts.
//!
//! Never set: `sort_order`, `sort_target`, `serializable`, `keys_only`,
//! `count_only`, `min/max_mod_revision`, `min/max_create_revision` (kine
//! answers an error to `keys_only`, `serializable`, a sort target other than
//! the key and any min/max revision, and ignores `sort_order`). kine derives
//! its prefix from `range_end` and appends a `/` when it lacks one, and
//! trims trailing `\0` from `key` then lists names strictly after it: so the
//! prefix must end with `/` (checked) and `LAST_KEY + "\0"` means "after
//! LAST_KEY" to etcd and kine alike. At most one page is held at a time;
//! a page whose answer is larger than the client accepts (64 MiB) is asked
//! again with half the limit. Each value is classified in time linear in
//! its length (values over 16 MiB are not parsed).
//!
//! A revision compacted while the census runs (etcd's `--auto-compaction`,
//! kine's compaction of revisions older than 5 minutes and 1000 revisions)
//! fails the census with [`CensusError::Compacted`]: run it again.

pub mod config;
mod conn;
mod error;
pub mod resource;
pub mod value;
mod wire;

/// The etcd KV.Range subset (proto/etcd/kv.proto), byte-compatible with
/// etcd's etcdserverpb and mvccpb.
#[allow(clippy::all, missing_docs)]
pub mod etcdpb {
    tonic::include_proto!("etcdserverpb");
}

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use conn::{parse as parse_endpoint, socket_path, Address};
pub use error::CensusError;
pub use value::{classify, Class};

/// Where the store is: kube-apiserver's `--etcd-servers`, `--etcd-cafile`,
/// `--etcd-certfile`, `--etcd-keyfile`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTarget {
    /// `https://HOST:PORT`, `http://HOST:PORT` or `unix://PATH`; tried in
    /// order, the first that answers is read.
    pub endpoints: Vec<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What to count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The KMS v2 provider's name in the EncryptionConfiguration.
    pub provider: String,
    /// kube-apiserver's `--etcd-prefix` plus `/` (must end with `/`).
    pub prefix: String,
    /// Resources that should be under the provider (EncryptionConfiguration
    /// names, wildcards included): identity objects are counted only for
    /// these; `None` counts them all.
    pub resources: Option<BTreeSet<String>>,
    /// Objects per Range request.
    pub page_size: u32,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            provider: "edgekms".into(),
            prefix: "/registry/".into(),
            resources: None,
            page_size: 500,
        }
    }
}

impl Spec {
    /// The spec for kube-apiserver's EncryptionConfiguration `yaml` (YAML or
    /// JSON): the KMS v2 provider (`provider`, or the only one it names) and
    /// the resources of every rule that lists that provider.
    pub fn from_encryption_config(yaml: &str, provider: Option<&str>) -> Result<Spec, CensusError> {
        let (provider, resources) = config::parse(yaml, provider)?;
        Ok(Spec {
            provider,
            resources: Some(resources),
            ..Spec::default()
        })
    }

    /// Whether identity objects of `resource` are counted.
    pub fn wants_identity(&self, resource: &str) -> bool {
        match &self.resources {
            None => true,
            Some(set) => set.iter().any(|p| resource::covered(p, resource)),
        }
    }

    fn check(&self) -> Result<(), CensusError> {
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(CensusError::Spec(format!(
                "the prefix {:?} must start and end with / (kube-apiserver's --etcd-prefix, default /registry, plus /)",
                self.prefix
            )));
        }
        if self.page_size == 0 {
            return Err(CensusError::Spec("the page size must be at least 1".into()));
        }
        if self.provider.is_empty() || self.provider.contains(':') {
            return Err(CensusError::Spec(format!(
                "{:?} is not a KMS provider name",
                self.provider
            )));
        }
        Ok(())
    }
}

/// What storage holds, at one revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Census {
    /// When the census started (Unix seconds).
    pub taken_unix: u64,
    /// The etcd revision every page was read at.
    pub revision: i64,
    pub provider: String,
    pub prefix: String,
    /// Keys read under the prefix.
    pub scanned: u64,
    /// key_id → resource → objects under it.
    pub under: BTreeMap<String, BTreeMap<String, u64>>,
    /// resource → objects stored unencrypted (only resources the spec
    /// wants encrypted, when it names them).
    pub identity: BTreeMap<String, u64>,
    /// Another provider (`kms:v2:NAME`, `aescbc:v1:KEY`, ..., `unrecognised`)
    /// → resource → objects.
    pub other: BTreeMap<String, BTreeMap<String, u64>>,
    /// resource → objects with our provider's prefix whose EncryptedObject
    /// does not parse or has no key_id.
    pub unreadable: BTreeMap<String, u64>,
}

impl Census {
    /// An empty census of `spec`.
    pub fn new(spec: &Spec, taken_unix: u64) -> Census {
        Census {
            taken_unix,
            provider: spec.provider.clone(),
            prefix: spec.prefix.clone(),
            ..Census::default()
        }
    }

    /// Objects under `key_id`, every resource.
    pub fn objects_under(&self, key_id: &str) -> u64 {
        self.under.get(key_id).map_or(0, |r| r.values().sum())
    }

    /// `(resource, objects)` under `key_id`, by resource name.
    pub fn resources_under(&self, key_id: &str) -> Vec<(String, u64)> {
        self.under
            .get(key_id)
            .map(|r| r.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// Counts one stored key and value.
    pub fn add(&mut self, spec: &Spec, key: &[u8], value: &[u8]) {
        self.scanned += 1;
        let resource = resource::of_key(key, &spec.prefix).unwrap_or_else(|| "-".into());
        match classify(value, &spec.provider) {
            Class::Under(id) => {
                *self
                    .under
                    .entry(id)
                    .or_default()
                    .entry(resource)
                    .or_default() += 1
            }
            Class::Unreadable => *self.unreadable.entry(resource).or_default() += 1,
            Class::Identity => {
                if spec.wants_identity(&resource) {
                    *self.identity.entry(resource).or_default() += 1;
                }
            }
            Class::Other(label) => {
                *self
                    .other
                    .entry(label)
                    .or_default()
                    .entry(resource)
                    .or_default() += 1
            }
        }
    }
}

/// Time limits of [`take_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connecting (TCP or unix, TLS, HTTP/2) to one endpoint.
    pub connect: Duration,
    /// One Range request.
    pub request: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(60),
        }
    }
}

/// Takes a census with the default [`Limits`].
pub async fn take(target: &EtcdTarget, spec: &Spec) -> Result<Census, CensusError> {
    take_with(target, spec, &Limits::default()).await
}

/// Largest Range answer accepted (a page of 500 values near etcd's 1.5 MiB
/// limit would not fit; such a page is asked again with half the limit).
const MAX_ANSWER: usize = 64 << 20;

/// Takes a census: connects to the first endpoint that answers, then reads
/// the prefix page by page at one revision (see the crate docs).
pub async fn take_with(
    target: &EtcdTarget,
    spec: &Spec,
    limits: &Limits,
) -> Result<Census, CensusError> {
    take_observed(target, spec, limits, &mut |_| {}).await
}

/// [`take_with`], calling `on_page` with the census so far after each page
/// (for progress, and for tests that write between pages).
pub async fn take_observed(
    target: &EtcdTarget,
    spec: &Spec,
    limits: &Limits,
    on_page: &mut (dyn FnMut(&Census) + Send),
) -> Result<Census, CensusError> {
    spec.check()?;
    if target.endpoints.is_empty() {
        return Err(CensusError::NoEndpoint);
    }
    let addresses = target
        .endpoints
        .iter()
        .map(|e| conn::parse(e).map(|a| (e.as_str(), a)))
        .collect::<Result<Vec<_>, _>>()?;
    let needs_tls = addresses
        .iter()
        .any(|(_, a)| matches!(a, Address::Tcp { tls: true, .. }));
    let tls = if needs_tls {
        Some(conn::tls_config(target)?)
    } else {
        None
    };
    let mut last = None;
    for (endpoint, address) in &addresses {
        let channel = match conn::connect(endpoint, address, tls.clone(), limits.connect).await {
            Ok(c) => c,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let is_tls = matches!(address, Address::Tcp { tls: true, .. });
        return read(
            endpoint,
            channel,
            spec,
            limits,
            is_tls,
            target.cert.is_some(),
            on_page,
        )
        .await;
    }
    Err(last.unwrap_or(CensusError::NoEndpoint))
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

async fn read(
    endpoint: &str,
    channel: tonic::transport::Channel,
    spec: &Spec,
    limits: &Limits,
    tls: bool,
    client_cert: bool,
    on_page: &mut (dyn FnMut(&Census) + Send),
) -> Result<Census, CensusError> {
    let mut kv = etcdpb::kv_client::KvClient::new(channel).max_decoding_message_size(MAX_ANSWER);
    let taken_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut census = Census::new(spec, taken_unix);
    let end = prefix_end(spec.prefix.as_bytes());
    let mut start = spec.prefix.as_bytes().to_vec();
    let mut revision = 0i64;
    let mut limit = i64::from(spec.page_size);
    loop {
        // The only request the census makes (see the crate docs).
        let request = etcdpb::RangeRequest {
            key: start.clone().into(),
            range_end: end.clone().into(),
            limit,
            revision,
            ..Default::default()
        };
        let answer = match tokio::time::timeout(limits.request, kv.range(request)).await {
            Err(_) => {
                return Err(CensusError::Timeout {
                    endpoint: endpoint.to_string(),
                    what: "a range request",
                    after: limits.request,
                })
            }
            Ok(Ok(answer)) => answer.into_inner(),
            Ok(Err(s)) if s.code() == tonic::Code::ResourceExhausted && limit > 1 => {
                limit /= 2;
                continue;
            }
            Ok(Err(s)) => {
                return Err(error::classify_status(
                    endpoint,
                    &s,
                    tls,
                    client_cert,
                    revision,
                ))
            }
        };
        if revision == 0 {
            revision = answer.header.as_ref().map_or(0, |h| h.revision);
            if revision <= 0 {
                return Err(CensusError::NotEtcd {
                    endpoint: endpoint.to_string(),
                    detail: "its range answer has no revision".into(),
                });
            }
            census.revision = revision;
        }
        let Some(last) = answer.kvs.last().map(|kv| kv.key.to_vec()) else {
            break;
        };
        for item in &answer.kvs {
            census.add(spec, &item.key, &item.value);
        }
        on_page(&census);
        if !answer.more {
            break;
        }
        let mut next = last;
        next.push(0);
        if next <= start {
            // A server that does not move forward: stop rather than loop.
            return Err(CensusError::NotEtcd {
                endpoint: endpoint.to_string(),
                detail: "its range answers do not move past the last key".into(),
            });
        }
        start = next;
        limit = i64::from(spec.page_size);
    }
    Ok(census)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(provider: &str, key_id: &str) -> Vec<u8> {
        use prost::Message;
        let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
        v.extend(
            value::EncryptedObject {
                key_id: key_id.into(),
                encrypted_data: vec![1],
                encrypted_dek_source: vec![2],
                ..Default::default()
            }
            .encode_to_vec(),
        );
        v
    }

    #[test]
    fn tally() {
        let spec = Spec {
            resources: Some(["secrets".to_string(), "*.apps".to_string()].into()),
            ..Spec::default()
        };
        let mut c = Census::new(&spec, 7);
        c.add(&spec, b"/registry/secrets/a/1", &enc("edgekms", "k1"));
        c.add(&spec, b"/registry/secrets/a/2", &enc("edgekms", "k1"));
        c.add(&spec, b"/registry/configmaps/a/1", &enc("edgekms", "k1"));
        c.add(&spec, b"/registry/secrets/a/3", &enc("edgekms", "k2"));
        c.add(&spec, b"/registry/secrets/a/4", &enc("vault", "k1"));
        c.add(&spec, b"/registry/secrets/a/5", b"k8s\x00plain");
        c.add(&spec, b"/registry/deployments/a/5", b"k8s\x00plain");
        c.add(&spec, b"/registry/pods/a/5", b"k8s\x00plain");
        c.add(
            &spec,
            b"/registry/secrets/a/6",
            b"k8s:enc:kms:v2:edgekms:junk",
        );
        c.add(
            &spec,
            b"/registry/secrets/a/7",
            b"k8s:enc:aescbc:v1:key1:xx",
        );
        assert_eq!(c.scanned, 10);
        assert_eq!(c.objects_under("k1"), 3);
        assert_eq!(c.objects_under("k2"), 1);
        assert_eq!(c.objects_under("nope"), 0);
        assert_eq!(
            c.resources_under("k1"),
            [("configmaps".to_string(), 1), ("secrets".to_string(), 2)]
        );
        assert_eq!(c.identity.len(), 2, "{:?}", c.identity); // pods not wanted
        assert_eq!(c.other["kms:v2:vault"]["secrets"], 1);
        assert_eq!(c.other["aescbc:v1:key1"]["secrets"], 1);
        assert_eq!(c.unreadable["secrets"], 1);
        assert_eq!(c.taken_unix, 7);
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/registry/"), b"/registry0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\x00");
    }

    #[test]
    fn spec_checks() {
        assert!(Spec::default().check().is_ok());
        for bad in [
            Spec {
                prefix: "/registry".into(),
                ..Spec::default()
            },
            Spec {
                prefix: "registry/".into(),
                ..Spec::default()
            },
            Spec {
                page_size: 0,
                ..Spec::default()
            },
            Spec {
                provider: "a:b".into(),
                ..Spec::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}

//! An etcd v3 endpoint that serves only what kine (K3s's SQLite store, and
//! MicroK8s's k8s-dqlite, a kine fork) serves to a range reader, on a unix
//! socket as K3s's kine listens: `etcdserverpb.KV/Range` and nothing else
//! (any other method: UNIMPLEMENTED), with kine's semantics
//! (k3s-io/kine pkg/server/kv.go, limited.go, list.go and the SQL of
//! pkg/drivers/generic):
//!
//! - refused with kine's message (gRPC UNKNOWN, a plain Go error):
//!   `keys_only`, `serializable`, a sort target other than the key,
//!   `min_mod_revision`, `max_mod_revision`, `min_create_revision`,
//!   `max_create_revision`; `sort_order` is ignored (always by key);
//! - an empty `range_end` is a get of one key;
//! - otherwise a list: the prefix is `range_end` with its last byte
//!   decremented, plus `/` when it does not end with one; the start is
//!   `key` with trailing `\0` trimmed, and names strictly after it are
//!   listed (`mkv.name > ?`); at `revision` (0: the newest), each name's
//!   last write at or before it, deletions left out; `limit + 1` rows are
//!   read to decide `more`, and `count` is then the number of names after
//!   the start.
//!
//! Data goes in in-process ([`Kine::put`], [`Kine::delete`]): the census
//! only reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_server::{Kv, KvServer};
use pb::{KeyValue, RangeRequest, RangeResponse, ResponseHeader};

/// One write: its revision, and the value (`None`: a deletion).
type Write = (i64, Option<Vec<u8>>);

#[derive(Default)]
struct Store {
    revision: i64,
    /// name → its writes, oldest first.
    history: BTreeMap<Vec<u8>, Vec<Write>>,
}

impl Store {
    fn at(&self, name: &[u8], revision: i64) -> Option<KeyValue> {
        let writes = self.history.get(name)?;
        let (rev, value) = writes.iter().rev().find(|(r, _)| *r <= revision)?;
        let value = value.as_ref()?;
        Some(KeyValue {
            key: name.to_vec(),
            create_revision: *rev,
            mod_revision: *rev,
            version: 0,
            value: value.clone(),
            lease: 0,
        })
    }
}

/// The kine-subset server on a unix socket; stops when dropped.
pub struct Kine {
    pub socket: PathBuf,
    store: Arc<Mutex<Store>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Kine {
    /// Serves on `socket` (in an existing directory), from the current
    /// tokio runtime.
    pub fn start(socket: &Path) -> Kine {
        let store = Arc::new(Mutex::new(Store::default()));
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = KvServer::new(KineKv {
            store: store.clone(),
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Kine {
            socket: socket.to_path_buf(),
            store,
            stop: Some(stop),
        }
    }

    /// `unix://SOCKET`, as kube-apiserver's `--etcd-servers` names it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Writes one key (one revision); returns the revision.
    pub fn put(&self, key: &[u8], value: &[u8]) -> i64 {
        let mut s = self.store.lock().unwrap();
        s.revision += 1;
        let rev = s.revision;
        s.history
            .entry(key.to_vec())
            .or_default()
            .push((rev, Some(value.to_vec())));
        rev
    }

    /// Deletes one key (one revision).
    pub fn delete(&self, key: &[u8]) -> i64 {
        let mut s = self.store.lock().unwrap();
        s.revision += 1;
        let rev = s.revision;
        s.history.entry(key.to_vec()).or_default().push((rev, None));
        rev
    }

    pub fn revision(&self) -> i64 {
        self.store.lock().unwrap().revision
    }
}

impl Drop for Kine {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct KineKv {
    store: Arc<Mutex<Store>>,
}

fn unsupported(field: &str) -> Status {
    // A plain Go error from a gRPC handler: code UNKNOWN.
    Status::unknown(format!("{field} is unsupported"))
}

#[tonic::async_trait]
impl Kv for KineKv {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let r = request.into_inner();
        if r.keys_only {
            return Err(unsupported("keysOnly"));
        }
        if r.max_create_revision != 0 {
            return Err(unsupported("maxCreateRevision"));
        }
        if r.sort_target != 0 {
            return Err(unsupported("not key sortTarget"));
        }
        if r.serializable {
            return Err(unsupported("serializable"));
        }
        if r.min_mod_revision != 0 {
            return Err(unsupported("minModRevision"));
        }
        if r.min_create_revision != 0 {
            return Err(unsupported("minCreateRevision"));
        }
        if r.max_mod_revision != 0 {
            return Err(unsupported("maxModRevision"));
        }
        let s = self.store.lock().unwrap();
        let current = s.revision;
        if r.revision > current {
            return Err(Status::unknown(
                "etcdserver: mvcc: required revision is a future revision",
            ));
        }
        let revision = if r.revision == 0 { current } else { r.revision };
        let header = Some(ResponseHeader {
            revision: current,
            ..Default::default()
        });
        if r.range_end.is_empty() {
            let kvs: Vec<_> = s.at(&r.key, revision).into_iter().collect();
            return Ok(Response::new(RangeResponse {
                header,
                count: kvs.len() as i64,
                kvs,
                more: false,
            }));
        }
        let mut prefix = r.range_end.clone();
        if let Some(last) = prefix.last_mut() {
            *last = last.wrapping_sub(1);
        }
        if !prefix.ends_with(b"/") {
            prefix.push(b'/');
        }
        let mut start = r.key.clone();
        while start.last() == Some(&0) {
            start.pop();
        }
        let after = s
            .history
            .range(start.clone()..)
            .map(|(name, _)| name)
            .filter(|name| **name > start && name.starts_with(&prefix))
            .filter_map(|name| s.at(name, revision));
        let mut kvs: Vec<KeyValue> = if r.limit > 0 {
            after.take(r.limit as usize + 1).collect()
        } else {
            after.collect()
        };
        let mut more = false;
        let mut count = kvs.len() as i64;
        if r.limit > 0 && count > r.limit {
            more = true;
            kvs.truncate(r.limit as usize);
            count = s
                .history
                .range(start.clone()..)
                .filter(|(name, _)| **name > start && name.starts_with(&prefix))
                .filter(|(name, _)| s.at(name, revision).is_some())
                .count() as i64;
        }
        Ok(Response::new(RangeResponse {
            header,
            kvs,
            more,
            count,
        }))
    }
}

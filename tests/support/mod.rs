//! Shared helpers for the end-to-end tests, one file per concern:
//!
//! - [`plugin`]: a real `edgekms-plugin` on temporary sockets, and `kmsctl`;
//! - [`kms`]: typed KMS v2 and admin calls to it;
//! - [`http`]: its metrics and health endpoint, and Prometheus samples;
//! - [`files`]: file modes, copies and searches in data dirs;
//! - [`fleet`]: a real `edgekms-server`, and plugins that join it;
//! - [`replicas`]: the service replicated on a three-member etcd;
//! - [`faults`], [`abuse`], [`conn`]: what the fault and abuse tests do;
//! - [`k8s`]: a Kubernetes client for the real-apiserver tests;
//! - [`kine`]: an etcd v3 endpoint serving only what kine serves (K3s's
//!   SQLite store), on a unix socket, for the storage census.
//!
//! What no edgekms crate is needed for (swtpm, child processes, free
//! ports, polling, /proc figures) lives in `edgekms-testkit`, re-exported
//! here so that test call sites stay short; the unix-socket channel is
//! `edgekms_proto::uds`, as kmsctl uses it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod abuse;
pub mod conn;
pub mod faults;
pub mod files;
pub mod fleet;
pub mod http;
pub mod k8s;
pub mod kine;
pub mod kms;
pub mod plugin;
pub mod replicas;

pub use edgekms_testkit::net::free_port;
pub use edgekms_testkit::poll::poll_until;
pub use edgekms_testkit::process::{signal, target_bin as bin, without_terminal};
pub use edgekms_testkit::procfs::tcp_listen_ports;
pub use edgekms_testkit::swtpm::{self, available as swtpm_available, Swtpm};
pub use files::{copy_dir, files_containing, mode};
pub use http::{http_get, sample};
pub use kms::{decrypt, encrypt, key_id, Admin, Kms};
pub use plugin::{kmsctl, kmsctl_json, Plugin};

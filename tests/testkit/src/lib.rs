//! Test helpers shared by every edgekms crate's tests and benches. Depends
//! on no edgekms crate, so any of them can use it as a dev-dependency.
//!
//! - [`etcd`]: a real etcd (plain or TLS with client certificates) on free
//!   loopback ports, and whether the etcd tests may skip;
//! - [`etcd_cluster`]: a real etcd cluster of several members whose members
//!   a test kills, stops and starts again, and which one leads;
//! - [`net`]: free loopback ports, never handed out twice in one process;
//! - [`process`]: a daemon child process for a test (log file, signals,
//!   waits with a deadline, killed on drop), and where the built binaries are;
//! - [`procfs`]: what a process holds and has used (memory, CPU, descriptors,
//!   listening ports), from /proc;
//! - [`swtpm`]: a real software TPM on free loopback ports, and whether the
//!   swtpm tests may skip;
//! - [`apiserver`]: a real kube-apiserver (the testbin's) over an etcd of
//!   its own, a kubeconfig for it, and whether its tests may skip;
//! - [`files`]: a directory tree's contents, to compare before and after;
//! - [`poll`]: waiting for a condition with a deadline and a log to show;
//! - [`skip`]: whether a test needing an outside program may run;
//! - [`proptest_policy`]: the case count of every property test.
//!
//! The KMS v2 and admin clients over a unix socket are edgekms-proto's
//! (`edgekms_proto::uds`), which this crate may not know: tests/support
//! and the benches build on it.
//!
//! Helpers fail loudly (they panic with what went wrong): they serve tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod apiserver;
pub mod etcd;
pub mod etcd_cluster;
pub mod files;
pub mod net;
pub mod poll;
pub mod process;
pub mod procfs;
pub mod proptest_policy;
pub mod skip;
pub mod swtpm;

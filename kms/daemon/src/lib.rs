//! What both edgekms daemons (the node plugin and the central service) and
//! `kmsctl` share, and nothing about keys or clusters:
//!
//! - [`pki`]: the service CA, certificates, the identities they name.
//! - [`tls`]: mutual TLS 1.3 configs, the CA pin, the accept loop.
//! - [`conn`]: the connection table (caps, fair share, timeouts).
//! - [`ops`]: the `/metrics`, `/healthz` and `/readyz` HTTP endpoint.
//! - [`durable`]: data-dir checks, the creation marker, strict RocksDB
//!   options and redundant record files.
//! - [`config`]: flags-over-TOML loading, log format, the clock.
//! - [`cli`]: start-up (logging, fd limit) and shutdown signals.
//! - [`logfmt`]: escaped, bounded log fields and caller-facing messages.
//! - [`duration`]: `30d`-style durations.
//! - [`failpoint`]: crash points for the crash-safety tests.

pub mod cli;
pub mod config;
pub mod conn;
pub mod durable;
pub mod duration;
pub mod failpoint;
pub mod logfmt;
pub mod ops;
pub mod pki;
pub mod tls;

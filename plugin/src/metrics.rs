//! Every Prometheus metric the plugin exports, defined in this one place
//! (the operator guide documents these names), and the text rendering that
//! `/metrics` serves.
//!
//! Metrics live in one process-wide [`Metrics`] registry; the rest of the
//! plugin records through the free functions here. Nothing recorded here
//! may carry key material, plaintext or request uids.

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use edgekms_core::rotation::node::ConvergeError;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use tonic::Code;

/// KMS request latency buckets (seconds): AES-GCM under a cached key takes
/// microseconds, so most buckets are below a millisecond.
const KMS_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.1, 1.0,
];

/// Sealer latency buckets (seconds): the soft sealer takes microseconds, a
/// TPM seal or unseal tens of milliseconds, a busy TPM seconds.
const SEALER_BUCKETS: &[f64] = &[
    0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const LAST_CONTACT: &str = "edgekms_sync_last_contact_seconds";

/// The KMS v2 methods, as the `method` label spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsMethod {
    Status,
    Encrypt,
    Decrypt,
}

impl KmsMethod {
    pub const ALL: [KmsMethod; 3] = [KmsMethod::Status, KmsMethod::Encrypt, KmsMethod::Decrypt];

    pub fn as_str(self) -> &'static str {
        match self {
            KmsMethod::Status => "Status",
            KmsMethod::Encrypt => "Encrypt",
            KmsMethod::Decrypt => "Decrypt",
        }
    }
}

/// Sealer operations, as the `op` label spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealerOp {
    Seal,
    Unseal,
}

impl SealerOp {
    pub fn as_str(self) -> &'static str {
        match self {
            SealerOp::Seal => "seal",
            SealerOp::Unseal => "unseal",
        }
    }
}

/// Why the node refused a state the central service sent, as the
/// `reason` label spells it: a fixed few, so the operator can alert on
/// each (a key_id clash or a rollback means a restored service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// A version named under another key_id than this node's.
    KeyIdClash,
    /// A version this node destroyed, sent again to hold.
    Destroyed,
    /// An older primary, or none.
    Rollback,
    Other,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 4] = [
        RefusalReason::KeyIdClash,
        RefusalReason::Destroyed,
        RefusalReason::Rollback,
        RefusalReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::KeyIdClash => "key-id-clash",
            RefusalReason::Destroyed => "destroyed",
            RefusalReason::Rollback => "rollback",
            RefusalReason::Other => "other",
        }
    }

    /// Every refusal by name (no `_` arm), so a new one is classified on
    /// purpose.
    pub fn of(e: &ConvergeError) -> Self {
        match e {
            ConvergeError::KeyIdMismatch { .. } | ConvergeError::RetireKeyIdMismatch { .. } => {
                RefusalReason::KeyIdClash
            }
            ConvergeError::Destroyed { .. } => RefusalReason::Destroyed,
            ConvergeError::Rollback { .. } | ConvergeError::PrimaryDropped { .. } => {
                RefusalReason::Rollback
            }
            ConvergeError::NotANodeState { .. }
            | ConvergeError::MissingKey { .. }
            | ConvergeError::Duplicate { .. }
            | ConvergeError::Delivery { .. }
            | ConvergeError::Keyring(_) => RefusalReason::Other,
        }
    }
}

pub use edgekms_daemon::ops::grpc_code_name as code_name;

/// The plugin's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    kms_requests: IntCounterVec,
    kms_duration: HistogramVec,
    ready: IntGauge,
    primary_version: IntGauge,
    cached_versions: IntGauge,
    sealer_duration: HistogramVec,
    sync_last_contact: prometheus::Gauge,
    sync_errors: IntCounterVec,
    refused_states: IntCounterVec,
    central_reconciling: IntGauge,
    store_repairs: IntCounterVec,
    disabled_reads: IntCounterVec,
    last_contact: Mutex<Option<Instant>>,
    /// The code="OK" series of each method (in [`KmsMethod::ALL`] order),
    /// resolved once: the hot path then skips the label lookup.
    kms_ok: [(IntCounter, Histogram); 3],
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Result<Self, prometheus::Error> {
        let kms_requests = IntCounterVec::new(
            Opts::new(
                "edgekms_kms_requests_total",
                "KMS v2 calls answered, by method and gRPC result code.",
            ),
            &["method", "code"],
        )?;
        let kms_duration = HistogramVec::new(
            HistogramOpts::new(
                "edgekms_kms_request_duration_seconds",
                "Time the plugin spent answering a KMS v2 call (transport excluded), by method and gRPC result code.",
            )
            .buckets(KMS_BUCKETS.to_vec()),
            &["method", "code"],
        )?;
        let ready = IntGauge::new(
            "edgekms_ready",
            "1 when key material is unsealed and the self-test passes (KMS Status healthz \"ok\", /readyz 200), else 0.",
        )?;
        let primary_version = IntGauge::new(
            "edgekms_primary_key_version",
            "Version of the primary KEK that Encrypt uses; 0 when there is none.",
        )?;
        let cached_versions = IntGauge::new(
            "edgekms_cached_key_versions",
            "KEK versions whose key material is loaded from the local cache.",
        )?;
        let sealer_duration = HistogramVec::new(
            HistogramOpts::new(
                "edgekms_tpm_operation_duration_seconds",
                "Time of each seal or unseal of the node sealing key, by sealer backend (tpm or soft).",
            )
            .buckets(SEALER_BUCKETS.to_vec()),
            &["op", "backend"],
        )?;
        let sync_last_contact = prometheus::Gauge::new(
            LAST_CONTACT,
            "Seconds since the last successful contact with the central key service; absent until the first one.",
        )?;
        let sync_errors = IntCounterVec::new(
            Opts::new(
                "edgekms_sync_errors_total",
                "Failed exchanges with the central key service, by kind.",
            ),
            &["kind"],
        )?;
        let refused_states = IntCounterVec::new(
            Opts::new(
                "edgekms_sync_refused_states_total",
                "States from the central key service this node refused (and kept its keys), by reason: key-id-clash, destroyed, rollback or other.",
            ),
            &["reason"],
        )?;
        let central_reconciling = IntGauge::new(
            "edgekms_sync_central_reconciling",
            "1 while the central key service says it is reconciling this cluster (restored from a backup): it changes nothing meanwhile, and this node keeps serving its own keys.",
        )?;
        let store_repairs = IntCounterVec::new(
            Opts::new(
                "edgekms_store_repairs_total",
                "Key cache records repaired at start from their redundant copy (or a copy rewritten from the cache), by record kind; record=\"rocksdb\" counts caches rebuilt from the copies.",
            ),
            &["record"],
        )?;
        let disabled_reads = IntCounterVec::new(
            Opts::new(
                "edgekms_decrypt_disabled_total",
                "Decrypt calls refused because the version they name is disabled (retired, in its grace period): data still under a version about to be destroyed. By version.",
            ),
            &["version"],
        )?;
        let registry = Registry::new();
        registry.register(Box::new(kms_requests.clone()))?;
        registry.register(Box::new(kms_duration.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(primary_version.clone()))?;
        registry.register(Box::new(cached_versions.clone()))?;
        registry.register(Box::new(sealer_duration.clone()))?;
        registry.register(Box::new(sync_last_contact.clone()))?;
        registry.register(Box::new(sync_errors.clone()))?;
        registry.register(Box::new(refused_states.clone()))?;
        registry.register(Box::new(central_reconciling.clone()))?;
        registry.register(Box::new(store_repairs.clone()))?;
        registry.register(Box::new(disabled_reads.clone()))?;
        // Every reason shows as 0 from the start, so increase() sees the
        // first refusal.
        for reason in RefusalReason::ALL {
            refused_states.with_label_values(&[reason.as_str()]);
        }
        // Successful calls show as 0 from the start, so rates exist at once.
        let kms_ok = KmsMethod::ALL.map(|method| {
            let labels = [method.as_str(), code_name(Code::Ok)];
            (
                kms_requests.with_label_values(&labels),
                kms_duration.with_label_values(&labels),
            )
        });
        Ok(Self {
            kms_ok,
            registry,
            kms_requests,
            kms_duration,
            ready,
            primary_version,
            cached_versions,
            sealer_duration,
            sync_last_contact,
            sync_errors,
            refused_states,
            central_reconciling,
            store_repairs,
            disabled_reads,
            last_contact: Mutex::new(None),
        })
    }

    pub fn observe_kms(&self, method: KmsMethod, code: Code, elapsed: Duration) {
        if code == Code::Ok {
            let (count, duration) = &self.kms_ok[method as usize];
            count.inc();
            duration.observe(elapsed.as_secs_f64());
            return;
        }
        let labels = [method.as_str(), code_name(code)];
        self.kms_requests.with_label_values(&labels).inc();
        self.kms_duration
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_sealer(&self, op: SealerOp, backend: &str, elapsed: Duration) {
        self.sealer_duration
            .with_label_values(&[op.as_str(), backend])
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_keys(&self, primary_version: u32, cached_versions: usize) {
        self.primary_version.set(i64::from(primary_version));
        self.cached_versions
            .set(i64::try_from(cached_versions).unwrap_or(i64::MAX));
    }

    pub fn record_sync_contact(&self) {
        *self.last_contact.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    pub fn record_sync_error(&self, kind: &'static str) {
        self.sync_errors.with_label_values(&[kind]).inc();
    }

    pub fn record_store_repair(&self, record: &'static str) {
        self.store_repairs.with_label_values(&[record]).inc();
    }

    pub fn record_refused_state(&self, reason: RefusalReason) {
        self.refused_states
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    pub fn set_central_reconciling(&self, reconciling: bool) {
        self.central_reconciling.set(i64::from(reconciling));
    }

    pub fn record_disabled_read(&self, version: u32) {
        self.disabled_reads
            .with_label_values(&[&version.to_string()])
            .inc();
    }

    /// The text exposition, with the values computed at scrape time
    /// (`ready`, seconds since the last contact) filled in first.
    pub fn render(&self, ready: bool) -> String {
        self.ready.set(i64::from(ready));
        let last_contact = *self.last_contact.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = last_contact {
            self.sync_last_contact.set(at.elapsed().as_secs_f64());
        }
        let mut families = self.registry.gather();
        if last_contact.is_none() {
            families.retain(|f| f.name() != LAST_CONTACT);
        }
        let mut out = Vec::new();
        match TextEncoder::new().encode(&families, &mut out) {
            Ok(()) => String::from_utf8(out).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot render metrics");
                String::new()
            }
        }
    }
}

/// The process-wide metrics. Registration of fixed names into a fresh
/// registry cannot fail; should it ever, the plugin serves without metrics
/// rather than not at all.
static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| match Metrics::new() {
    Ok(m) => Some(m),
    Err(e) => {
        tracing::error!(error = %e, "cannot register metrics; /metrics will be empty");
        None
    }
});

fn global() -> Option<&'static Metrics> {
    METRICS.as_ref()
}

/// Counts one KMS call and its latency.
pub fn observe_kms(method: KmsMethod, code: Code, elapsed: Duration) {
    if let Some(m) = global() {
        m.observe_kms(method, code, elapsed);
    }
}

/// Records one seal or unseal of the node sealing key by `backend`.
pub fn observe_sealer(op: SealerOp, backend: &str, elapsed: Duration) {
    if let Some(m) = global() {
        m.observe_sealer(op, backend, elapsed);
    }
}

/// Sets the key gauges from a newly published keyring.
pub fn set_keys(primary_version: u32, cached_versions: usize) {
    if let Some(m) = global() {
        m.set_keys(primary_version, cached_versions);
    }
}

/// Call after every successful exchange with the central key service:
/// `edgekms_sync_last_contact_seconds` counts from here at each scrape.
pub fn record_sync_contact() {
    if let Some(m) = global() {
        m.record_sync_contact();
    }
}

/// Call once per failed exchange with the central key service. `kind` is a
/// short fixed word for the label (e.g. "connect", "tls", "rejected",
/// "decode"), never an error message: each distinct value is a new series.
pub fn record_sync_error(kind: &'static str) {
    if let Some(m) = global() {
        m.record_sync_error(kind);
    }
}

/// Call once per state from the central service that the node refused.
pub fn record_refused_state(reason: RefusalReason) {
    if let Some(m) = global() {
        m.record_refused_state(reason);
    }
}

/// Call once per Decrypt refused because its version is disabled.
pub fn record_disabled_read(version: u32) {
    if let Some(m) = global() {
        m.record_disabled_read(version);
    }
}

/// Call with what the central service last said of itself.
pub fn set_central_reconciling(reconciling: bool) {
    if let Some(m) = global() {
        m.set_central_reconciling(reconciling);
    }
}

/// Call once per record repaired at start; `record` is a record kind
/// (`nsk`, `kek`, ...) or `rocksdb`, never a full record name.
pub fn record_store_repair(record: &'static str) {
    if let Some(m) = global() {
        m.record_store_repair(record);
    }
}

/// The `/metrics` body; `ready` is what `/readyz` answers right now.
pub fn render(ready: bool) -> String {
    global().map(|m| m.render(ready)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The value of the sample line that starts with `series ` in `text`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn last_contact_is_absent_until_the_first_contact_then_counts_seconds() {
        let m = Metrics::new().unwrap();
        let text = m.render(true);
        assert!(!text.contains(LAST_CONTACT), "{text}");
        m.record_sync_contact();
        std::thread::sleep(Duration::from_millis(20));
        let text = m.render(true);
        let secs = value(&text, LAST_CONTACT).unwrap();
        assert!((0.02..5.0).contains(&secs), "{secs}");
        assert!(text.contains(&format!("# TYPE {LAST_CONTACT} gauge")));
        m.record_sync_contact();
        let again = value(&m.render(true), LAST_CONTACT).unwrap();
        assert!(again < secs, "{again} after a new contact, was {secs}");
    }

    #[test]
    fn sync_errors_count_per_kind() {
        let m = Metrics::new().unwrap();
        assert!(!m.render(true).contains("edgekms_sync_errors_total"));
        m.record_sync_error("connect");
        m.record_sync_error("connect");
        m.record_sync_error("rejected");
        let text = m.render(true);
        assert_eq!(
            value(&text, "edgekms_sync_errors_total{kind=\"connect\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "edgekms_sync_errors_total{kind=\"rejected\"}"),
            Some(1.0)
        );
    }

    #[test]
    fn the_global_functions_record_into_the_rendered_text() {
        // Other tests in this binary may record too: compare before/after.
        let count = |t: &str| value(t, "edgekms_sync_errors_total{kind=\"unit-test\"}");
        let before = count(&render(true)).unwrap_or(0.0);
        record_sync_error("unit-test");
        record_sync_contact();
        let text = render(false);
        assert_eq!(count(&text), Some(before + 1.0));
        assert!(value(&text, LAST_CONTACT).is_some());
        assert_eq!(value(&text, "edgekms_ready"), Some(0.0));
    }

    #[test]
    fn kms_calls_count_by_method_and_code_with_sub_millisecond_buckets() {
        let m = Metrics::new().unwrap();
        let text = m.render(true);
        for method in ["Status", "Encrypt", "Decrypt"] {
            let ok = format!("edgekms_kms_requests_total{{code=\"OK\",method=\"{method}\"}}");
            assert_eq!(value(&text, &ok), Some(0.0), "{text}");
        }
        m.observe_kms(KmsMethod::Decrypt, Code::Ok, Duration::from_micros(7));
        m.observe_kms(
            KmsMethod::Decrypt,
            Code::InvalidArgument,
            Duration::from_micros(3),
        );
        let text = m.render(true);
        assert_eq!(
            value(
                &text,
                "edgekms_kms_requests_total{code=\"InvalidArgument\",method=\"Decrypt\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "edgekms_kms_request_duration_seconds_bucket{code=\"OK\",method=\"Decrypt\",le=\"0.00001\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "edgekms_kms_request_duration_seconds_bucket{code=\"OK\",method=\"Decrypt\",le=\"0.000005\"}"
            ),
            Some(0.0)
        );
        assert_eq!(value(&text, "edgekms_ready"), Some(1.0));
    }

    #[test]
    fn key_gauges_and_sealer_latency() {
        let m = Metrics::new().unwrap();
        m.set_keys(3, 2);
        m.observe_sealer(SealerOp::Unseal, "tpm", Duration::from_millis(12));
        let text = m.render(false);
        assert_eq!(value(&text, "edgekms_primary_key_version"), Some(3.0));
        assert_eq!(value(&text, "edgekms_cached_key_versions"), Some(2.0));
        assert_eq!(value(&text, "edgekms_ready"), Some(0.0));
        assert_eq!(
            value(
                &text,
                "edgekms_tpm_operation_duration_seconds_count{backend=\"tpm\",op=\"unseal\"}"
            ),
            Some(1.0)
        );
    }

    #[test]
    fn refusals_count_by_reason_from_zero_and_reconciling_is_a_gauge() {
        let m = Metrics::new().unwrap();
        let text = m.render(true);
        for reason in ["key-id-clash", "destroyed", "rollback", "other"] {
            let series = format!("edgekms_sync_refused_states_total{{reason=\"{reason}\"}}");
            assert_eq!(value(&text, &series), Some(0.0), "{text}");
        }
        assert_eq!(value(&text, "edgekms_sync_central_reconciling"), Some(0.0));
        let clash = ConvergeError::RetireKeyIdMismatch {
            version: 1,
            sent: "c/v1/aa".into(),
            held: "c/v1/bb".into(),
        };
        m.record_refused_state(RefusalReason::of(&clash));
        m.record_refused_state(RefusalReason::of(&ConvergeError::MissingKey { version: 2 }));
        m.set_central_reconciling(true);
        let text = m.render(true);
        assert_eq!(
            value(
                &text,
                "edgekms_sync_refused_states_total{reason=\"key-id-clash\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "edgekms_sync_refused_states_total{reason=\"other\"}"),
            Some(1.0)
        );
        assert_eq!(value(&text, "edgekms_sync_central_reconciling"), Some(1.0));
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let (version, sent, held) = (1, "c/v1/aa".to_owned(), "c/v1/bb".to_owned());
        let cases = [
            (
                ConvergeError::KeyIdMismatch {
                    version,
                    sent: sent.clone(),
                    held: held.clone(),
                },
                "key-id-clash",
            ),
            (
                ConvergeError::Destroyed {
                    version,
                    sent: sent.clone(),
                    held: held.clone(),
                },
                "destroyed",
            ),
            (
                ConvergeError::Rollback {
                    from: 2,
                    from_key_id: held.clone(),
                    to: 1,
                    to_key_id: sent.clone(),
                },
                "rollback",
            ),
            (
                ConvergeError::PrimaryDropped {
                    version: 2,
                    key_id: held,
                },
                "rollback",
            ),
            (ConvergeError::Duplicate { version }, "other"),
        ];
        for (err, reason) in cases {
            assert_eq!(RefusalReason::of(&err).as_str(), reason, "{err}");
        }
    }

    #[test]
    fn every_code_has_its_grpc_name() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::NotFound), "NotFound");
        assert_eq!(code_name(Code::Cancelled), "Canceled");
    }
}

//! `cargo bench -p edgekms-census --bench census [-- N ...]`: the storage
//! census against a real etcd (Debian's, plain http on loopback).
//!
//! For each size (default 2,000 and 20,000 objects; ~1 KiB KMS v2 values
//! in kube-apiserver's exact format, spread over 4 key_ids and 3
//! resources), loads the objects, then takes the census in pages of 500 and
//! prints objects/s and this process's peak memory growth during the
//! census (VmHWM after it minus VmRSS before it, the peak reset just before
//! with `/proc/self/clear_refs` = 5), for the first census of the store and
//! for a second one (timed), and the process's VmHWM. The census holds one page at a
//! time, so the growth must not follow the object count.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use edgekms_census::value::EncryptedObject;
use edgekms_census::{EtcdTarget, Spec};
use edgekms_testkit::etcd::Etcd;
use prost::Message;

fn value(key_id: &str) -> Vec<u8> {
    let object = EncryptedObject {
        encrypted_data: vec![0x5a; 900],
        key_id: key_id.into(),
        encrypted_dek_source: vec![3; 60],
        annotations: Default::default(),
        encrypted_dek_source_type: 1,
    };
    let mut v = b"k8s:enc:kms:v2:edgekms:".to_vec();
    v.extend(object.encode_to_vec());
    v
}

fn kib(field: &str) -> u64 {
    edgekms_testkit::procfs::status_kib(std::process::id(), field).unwrap()
}

fn main() {
    edgekms_testkit::etcd::require();
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![2_000, 20_000]
    } else {
        sizes
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resources = ["secrets", "configmaps", "example.com/widgets"];
    println!(
        "{:>8}  {:>10}  {:>10}  {:>12}  {:>16}  {:>16}  {:>12}",
        "objects",
        "seconds",
        "objects/s",
        "value bytes",
        "growth (first)",
        "growth (again)",
        "VmHWM"
    );
    for n in sizes {
        let etcd = Etcd::start(false);
        // Loaded a thousand at a time: the loader's memory stays small.
        for start in (0..n).step_by(1_000) {
            let items: Vec<(Vec<u8>, Vec<u8>)> = (start..(start + 1_000).min(n))
                .map(|i| {
                    let key = format!("/registry/{}/ns{}/obj{i:06}", resources[i % 3], i % 10);
                    (key.into_bytes(), value(&format!("kid-{}", i % 4)))
                })
                .collect();
            etcd.put_all(&items);
        }
        let target = EtcdTarget {
            endpoints: vec![etcd.endpoint.clone()],
            ..EtcdTarget::default()
        };
        let spec = Spec::default();
        // The first census, its peak measured cold; then the timed one.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let cold_rss = kib("VmRSS");
        runtime
            .block_on(edgekms_census::take(&target, &spec))
            .unwrap();
        let cold = kib("VmHWM").saturating_sub(cold_rss);
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let rss = kib("VmRSS");
        let t = Instant::now();
        let census = runtime
            .block_on(edgekms_census::take(&target, &spec))
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let hwm = kib("VmHWM");
        assert_eq!(census.scanned, n as u64);
        assert_eq!(census.objects_under("kid-0"), n.div_ceil(4) as u64);
        println!(
            "{:>8}  {:>10.3}  {:>10.0}  {:>12}  {:>12} KiB  {:>12} KiB  {:>8} KiB",
            n,
            secs,
            n as f64 / secs,
            value("kid-0").len(),
            cold,
            hwm.saturating_sub(rss),
            hwm
        );
    }
}

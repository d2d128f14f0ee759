//! `edgekms-server restore`: a new data dir from a backup ([`crate::backup`]
//! opens and checks the file), under a new root key sealed on this host.
//! Everything is checked before anything is created; the data dir counts
//! as initialized only once its last record lands.

use std::path::Path;

use edgekms_core::sealedfile::FileError;
use edgekms_hsm::{Key256, Sealer};

use crate::audit::AuditRecord;
use crate::backup::{BackupError, Dump, Summary};
use crate::init;
use crate::rocks::{self, Probe};
use crate::state_store::{Batch, Op, StateStore};
use edgekms_daemon::pki::{self, Ca};
use edgekms_daemon::tls;

/// Refuses a data dir that is initialized or holds anything. Creates
/// nothing.
pub fn check_target(data_dir: &Path) -> Result<(), BackupError> {
    match rocks::probe(data_dir)? {
        Probe::Empty => Ok(()),
        Probe::Initialized(_) => Err(BackupError::Initialized(data_dir.to_owned())),
        Probe::Partial(_) => Err(BackupError::Partial(data_dir.to_owned())),
    }
}

/// What [`restore`] made.
#[derive(Debug)]
pub struct Restored {
    pub summary: Summary,
    pub ca_hash: String,
    /// The server certificate's names when it was issued anew (`--san`);
    /// `None`: the backed-up server certificate is kept.
    pub reissued: Option<Vec<String>>,
}

/// Writes `dump` into the new `data_dir` under a new root key sealed by
/// `sealer`, then opens the result as the server would, to check it.
///
/// With `names`, the server certificate is issued anew by the same CA for
/// these names (a new host name); otherwise the backed-up one is kept.
///
/// Version numbers continue from each cluster's restored `next_version`.
/// The old server may have minted versions after this backup was taken;
/// the restored one mints the same numbers again, with new keys, and so
/// with other key_ids (a key_id hashes its key, see `keyid.rs`): one
/// key_id never stands for two keys (DESIGN §4), even when an old KEK
/// comes back from a backup.
pub fn restore(
    dump: &Dump,
    data_dir: &Path,
    sealer: &dyn Sealer,
    names: Option<&[String]>,
) -> Result<Restored, BackupError> {
    check_target(data_dir)?;
    init::private_dir(data_dir)?;
    let ca = Ca::load(&dump.ca_cert, &dump.ca_key)?;
    let reissued = match names {
        Some(names) => Some(ca.issue_server(names)?),
        None => None,
    };
    let (server_cert, server_key) = match &reissued {
        Some(issued) => (&issued.cert_der, &issued.key),
        None => (&dump.server_cert, &dump.server_key),
    };
    tls::server_config(&dump.ca_cert, server_cert, server_key).map_err(|e| {
        BackupError::File(FileError::Corrupt(format!(
            "the server certificate or key: {e}"
        )))
    })?;

    let root = Key256::generate();
    let sealed = sealer.seal(&root)?;
    // The marker and the copies too: a restored dir is a normal one.
    let store = rocks::Store::create(data_dir)?;
    let summary = dump.summary();
    let mut seq = 0;
    for rec in &dump.audit {
        seq += 1;
        store.put_audit(seq, rec)?;
    }
    let note = AuditRecord::new("restore", "edgekms-server restore").detail(format!(
        "from a backup made at {} (unix): {} clusters, {} key versions; new root key sealed by {}",
        dump.created_unix,
        summary.clusters,
        summary.key_versions,
        sealer.name()
    ));
    store.put_audit(seq + 1, &note.to_json())?;
    let mut batch = Batch::default();
    for c in &dump.clusters {
        batch.ops.push(Op::PutCluster(c.clone()));
    }
    for k in &dump.keks {
        batch.ops.push(Op::PutKek {
            cluster: k.cluster.clone(),
            version: k.version,
            key_id: k.key_id.clone(),
            key: Key256::from_bytes(k.key.expose()),
        });
    }
    store.apply(&root, batch)?;
    init::write_file(
        &data_dir.join("ca.pem"),
        pki::cert_pem(&dump.ca_cert).as_bytes(),
        0o644,
    )?;
    // Last: until this lands, the data dir counts as not initialized.
    store.put_init(
        &sealed,
        &root,
        &dump.ca_cert,
        &dump.ca_key,
        server_cert,
        server_key,
    )?;
    drop(store);

    // Open it as `edgekms-server` will: unseal, load, unwrap every KEK.
    let central = init::open(data_dir, sealer)?;
    let loaded = central.store().clusters()?;
    let unreadable = |what: String| {
        BackupError::File(FileError::Corrupt(format!(
            "the restored {} does not read back ({what}); remove it and restore again",
            data_dir.display()
        )))
    };
    if loaded.len() != dump.clusters.len() {
        return Err(unreadable(format!(
            "{} clusters written, {} read",
            dump.clusters.len(),
            loaded.len()
        )));
    }
    for k in &dump.keks {
        let back = central
            .store()
            .kek(central.commit.root(), &k.cluster, k.version, &k.key_id)?;
        if back.as_ref() != Some(&k.key) {
            return Err(unreadable(format!("KEK {} v{}", k.cluster, k.version)));
        }
    }
    Ok(Restored {
        summary,
        ca_hash: ca.pin()?,
        reissued: names.map(<[String]>::to_vec),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::backup::open;
    use crate::backup::tests::{make, server, soft};

    #[test]
    fn round_trip_keeps_records_keys_and_ca_under_a_new_root_key() {
        let tmp = tempfile::tempdir().unwrap();
        let core = server(&tmp.path().join("old"));
        let key = Key256::generate();
        let (blob, summary) = make(&core, &key, true);
        assert_eq!(summary.clusters, 2);
        // edge-1 v2, v3 and edge-2 v1: the retired edge-1 v1 has no copy.
        assert_eq!(summary.key_versions, 3);
        assert!(summary.audit_records > 0);
        assert_eq!(&blob[..5], b"EKBK\x01");

        let dump = open(&blob, &key).unwrap();
        assert_eq!(dump.summary(), summary);
        let new_dir = tmp.path().join("new");
        let sealer = soft(&new_dir);
        let restored = restore(&dump, &new_dir, &sealer, None).unwrap();
        assert_eq!(restored.summary, summary);

        let back = init::open(&new_dir, &sealer).unwrap();
        assert!(back.commit.root() != core.commit.root(), "a new root key");
        assert_eq!(
            back.status("").unwrap().clusters,
            core.status("").unwrap().clusters
        );
        assert_eq!(
            back.tls_identity().unwrap().0,
            core.tls_identity().unwrap().0
        );
        for (cluster, version) in [("edge-1", 2), ("edge-1", 3), ("edge-2", 1)] {
            let s = core.status(cluster).unwrap();
            let key_id = &s.clusters[0]
                .versions
                .iter()
                .find(|v| v.version == version)
                .unwrap()
                .key_id;
            let old = core
                .store()
                .kek(core.commit.root(), cluster, version, key_id)
                .unwrap()
                .unwrap();
            let new = back
                .store()
                .kek(back.commit.root(), cluster, version, key_id)
                .unwrap()
                .unwrap();
            assert!(old == new, "{cluster} v{version}");
        }
        assert!(matches!(
            back.store().kek(back.commit.root(), "edge-1", 1, ""),
            Ok(None)
        ));
        let events: Vec<String> = back
            .audit_log()
            .audit_since(0)
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .collect();
        assert_eq!(events.last().map(String::as_str), Some("restore"));
        assert!(events.contains(&"retirement".to_owned()));
        assert_eq!(
            std::fs::read(new_dir.join("ca.pem")).unwrap(),
            std::fs::read(tmp.path().join("old/ca.pem")).unwrap()
        );

        // The restored server mints v4 next, never reusing v2 or v3.
        let r = back.rotate("op", "edge-1").unwrap();
        assert_eq!((r.version, r.created), (4, true));
        assert!(r.key_id.starts_with("edge-1/v4/"));

        // A second restore into the now initialized dir is refused.
        drop(back);
        let err = restore(&dump, &new_dir, &sealer, None).unwrap_err();
        assert!(matches!(err, BackupError::Initialized(_)), "{err}");
    }

    #[test]
    fn restore_refuses_a_dir_with_state() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("old");
        let key = Key256::generate();
        let (blob, _) = make(&server(&old), &key, false);
        let dump = open(&blob, &key).unwrap();
        let err = restore(&dump, &old, &soft(&old), None).unwrap_err();
        assert!(matches!(err, BackupError::Initialized(_)), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        // A partial state (an interrupted restore) is refused too.
        let partial = tmp.path().join("partial");
        std::fs::create_dir_all(&partial).unwrap();
        rocks::Store::create(&partial)
            .unwrap()
            .put_audit(1, b"{}")
            .unwrap();
        let err = restore(&dump, &partial, &soft(&partial), None).unwrap_err();
        assert!(matches!(err, BackupError::Partial(_)), "{err}");
        // Nothing was written to either.
        assert!(!partial.join("ca.pem").exists());
    }
}

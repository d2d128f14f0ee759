//! Property tests for the backup file codec: [`open`] (any file handed to
//! `edgekms-server restore`) and [`parse`] (the dump inside, reached only
//! after authentication, tested directly so that its own bounds are
//! exercised). Arbitrary bytes return an error, never a panic; every valid
//! dump round-trips through the file format; every flipped bit of a real
//! backup is refused with the error its place calls for (magic:
//! not a backup, format: format, key check: wrong key, length: truncated
//! or corrupt, body: corrupt), every truncation is "truncated" and every
//! extension "corrupt" (the whole file is authenticated).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;
use edgekms_core::rotation::cluster::proptests::cluster_with;
use edgekms_core::rotation::cluster::VersionMeta;
use edgekms_core::VersionState;
use edgekms_testkit::proptest_policy::config;

/// One CA for the suite: Ca::load must accept the dump's CA.
fn ca() -> &'static pki::Issued {
    static CA: OnceLock<pki::Issued> = OnceLock::new();
    CA.get_or_init(|| pki::new_ca().unwrap())
}

/// The dump, laid out as the module documentation says.
fn encode(d: &Dump) -> Vec<u8> {
    let mut w = Writer(Zeroizing::new(Vec::new()));
    w.u64(d.created_unix);
    w.bytes(&d.ca_cert);
    w.bytes(d.ca_key.der());
    w.bytes(&d.server_cert);
    w.bytes(d.server_key.der());
    w.u32(count(d.clusters.len()));
    for c in &d.clusters {
        w.bytes(&serde_json::to_vec(c).unwrap());
    }
    w.u32(count(d.keks.len()));
    for k in &d.keks {
        w.bytes(k.cluster.as_bytes());
        w.u32(k.version);
        w.bytes(k.key_id.as_bytes());
        w.0.extend_from_slice(k.key.expose());
    }
    w.u32(count(d.audit.len()));
    for a in &d.audit {
        w.bytes(a);
    }
    w.0.to_vec()
}

/// A backup file around `plain`, as [`make`] frames it.
fn file(plain: &[u8], key: &Key256) -> Vec<u8> {
    edgekms_core::sealedfile::seal(key, MAGIC, plain)
}

type Flat = (
    u64,
    Vec<u8>,
    Vec<u8>,
    Vec<u8>,
    Vec<u8>,
    Vec<Cluster>,
    Vec<(String, u32, String, [u8; 32])>,
    Vec<Vec<u8>>,
);

fn flat(d: &Dump) -> Flat {
    (
        d.created_unix,
        d.ca_cert.clone(),
        d.ca_key.der().to_vec(),
        d.server_cert.clone(),
        d.server_key.der().to_vec(),
        d.clusters.clone(),
        d.keks
            .iter()
            .map(|k| {
                (
                    k.cluster.clone(),
                    k.version,
                    k.key_id.clone(),
                    *k.key.expose(),
                )
            })
            .collect(),
        d.audit.clone(),
    )
}

use edgekms_core::rotation::cluster::proptests::version_state as state;

/// A dump `parse` must accept: unique valid cluster names, each version's
/// key_id derived from its key, a KEK for every version nodes hold (and
/// for some retiring ones), the suite's CA.
fn dump() -> impl Strategy<Value = Dump> {
    let one = (
        cluster_with(Just(BTreeMap::new()).boxed()),
        proptest::collection::btree_map(
            1u32..1000,
            (state(), any::<[u8; 32]>(), any::<u64>(), any::<bool>()),
            0..4,
        ),
    );
    (
        any::<u64>(),
        proptest::collection::vec(one, 0..4),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4),
    )
        .prop_map(|(created_unix, clusters, server_cert, server_key, audit)| {
            let mut out = Vec::new();
            let mut keks = Vec::new();
            for (mut c, versions) in clusters {
                if out.iter().any(|o: &Cluster| o.name() == c.name()) {
                    continue;
                }
                for (v, (state, key, created, keep)) in versions {
                    let key = Key256::from_bytes(&key);
                    let key_id = keyid::derive(c.name(), v, &key);
                    let meta = VersionMeta::new(state, key_id.clone(), created);
                    c.versions_mut().insert(v, meta);
                    if state.held_by_nodes() || (state == VersionState::Retiring && keep) {
                        keks.push(Kek {
                            cluster: c.name().to_owned(),
                            version: v,
                            key_id,
                            key,
                        });
                    }
                }
                out.push(c);
            }
            Dump {
                created_unix,
                ca_cert: ca().cert_der.clone(),
                ca_key: PrivateKey::from_der(ca().key.der().to_vec()),
                server_cert,
                server_key: PrivateKey::from_der(server_key),
                clusters: out,
                keks,
                audit,
            }
        })
}

/// A real backup from a real server (two clusters, a rotation, audit),
/// and its key.
fn real() -> &'static (Vec<u8>, [u8; 32]) {
    static REAL: OnceLock<(Vec<u8>, [u8; 32])> = OnceLock::new();
    REAL.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let sealer =
            edgekms_hsm::soft::SoftSealer::open_or_create(&tmp.path().join("soft.key")).unwrap();
        crate::init::init(tmp.path(), &sealer, &["localhost".to_owned()]).unwrap();
        let core = crate::init::open(tmp.path(), &sealer).unwrap();
        let day = std::time::Duration::from_secs(86_400);
        core.add_node("op", "edge-1", "cp-1", day).unwrap();
        core.add_node("op", "edge-2", "cp-1", day).unwrap();
        core.rotate("op", "edge-1").unwrap();
        let key = [0x5a; 32];
        let (blob, _) = core
            .backup("test", &Key256::from_bytes(&key), true)
            .unwrap();
        (blob, key)
    })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_files_are_refused(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(|t| [&MAGIC[..], &[FORMAT][..], &t[..]].concat()),
        ],
    ) {
        prop_assert!(open(&raw, &Key256::from_bytes(&[1; 32])).is_err());
    }

    /// A header right for the key and length, garbage behind it.
    #[test]
    fn garbage_behind_a_good_header_is_corrupt(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let key = Key256::from_bytes(&[2; 32]);
        let mut raw = MAGIC.to_vec();
        raw.push(FORMAT);
        raw.extend_from_slice(&edgekms_core::sealedfile::key_check(&key));
        raw.extend_from_slice(&(body.len() as u64).to_be_bytes());
        raw.extend_from_slice(&body);
        prop_assert!(matches!(open(&raw, &key), Err(BackupError::File(FileError::Corrupt(_)))));
    }

    /// The dump parser on its own: arbitrary plaintexts, counts and
    /// lengths included, are refused without a panic.
    #[test]
    fn arbitrary_dumps_never_panic(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..400),
            // Plausible small lengths and counts, so parsing goes deep.
            proptest::collection::vec(prop_oneof![Just(0u8), Just(1), Just(2), any::<u8>()], 0..400),
        ],
    ) {
        let _ = parse(&raw);
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn valid_dumps_round_trip(d in dump()) {
        let key = Key256::from_bytes(&[3; 32]);
        let plain = encode(&d);
        prop_assert_eq!(flat(&parse(&plain).unwrap()), flat(&d));
        prop_assert_eq!(flat(&open(&file(&plain, &key), &key).unwrap()), flat(&d));
    }

    /// The dump is authenticated by the file, so this only shows the
    /// parser's own bounds: a changed byte of a valid dump is refused or
    /// gives a dump (a changed time, certificate or audit byte is still a
    /// dump), never a panic; every truncation is refused.
    #[test]
    fn damaged_dumps_never_panic(
        d in dump(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let plain = encode(&d);
        let mut bad = plain.clone();
        bad[at.index(plain.len())] = byte;
        let _ = parse(&bad);
        prop_assert!(parse(&plain[..cut.index(plain.len())]).is_err());
    }

    #[test]
    fn every_flip_of_a_real_backup_is_refused_by_place(
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..4),
    ) {
        let (blob, key) = real();
        let key = Key256::from_bytes(key);
        let i = at.index(blob.len());
        let mut bad = blob.clone();
        bad[i] ^= 1 << bit;
        let err = open(&bad, &key).unwrap_err();
        let expected = match i {
            0..=3 => matches!(err, BackupError::NotABackup),
            4 => matches!(err, BackupError::File(FileError::Format(_))),
            5..=12 => matches!(err, BackupError::File(FileError::WrongKey)),
            13..=20 => matches!(err, BackupError::File(FileError::Truncated(_)) | BackupError::File(FileError::Corrupt(_))),
            _ => matches!(err, BackupError::File(FileError::Corrupt(_))),
        };
        prop_assert!(expected, "byte {i}: {err}");
        let err = open(&blob[..cut.index(blob.len())], &key).unwrap_err();
        prop_assert!(matches!(err, BackupError::File(FileError::Truncated(_))), "{err}");
        let mut longer = blob.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(matches!(open(&longer, &key), Err(BackupError::File(FileError::Corrupt(_)))));
    }

    /// Backup key files: any text is a key or refused, never a panic.
    #[test]
    fn arbitrary_key_text_never_panics(text in prop_oneof!["\\PC{0,80}", "[0-9a-fA-F \\n]{60,70}"]) {
        if let Some(k) = Key256::from_hex(&text) {
            prop_assert_eq!(hex::encode(k.expose()), text.trim().to_ascii_lowercase());
        }
    }
}

#[test]
fn the_real_backup_opens() {
    let (blob, key) = real();
    assert!(open(blob, &Key256::from_bytes(key)).is_ok());
}

//! Property tests for the certificate parsers the central service and the
//! nodes run on bytes from the network or from files: the node's CSR
//! (sent in an unauthenticated Join), a peer certificate's identity, the
//! CA pin, `--ca-hash`, PEM files and the stored CA key. Arbitrary input
//! returns an error or a value, never a panic; identities, pins and PEM
//! round-trip; a signed CSR yields the token's identity whatever it says.

use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;
use edgekms_testkit::proptest_policy::{config, name};

/// One CA and one node CSR for the suite: key generation is not under test.
fn fixture() -> &'static (Ca, Vec<u8>, Vec<u8>) {
    static FIXTURE: OnceLock<(Ca, Vec<u8>, Vec<u8>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let issued = new_ca().unwrap();
        let ca = Ca::load(&issued.cert_der, &issued.key).unwrap();
        let (_, csr) = node_key_and_csr().unwrap();
        let node_cert = ca.sign_node_csr(&csr, "edge-1", "n1").unwrap();
        (ca, csr, node_cert)
    })
}

fn damaged(good: &[u8]) -> impl Strategy<Value = Vec<u8>> {
    let good = good.to_vec();
    (
        any::<prop::sample::Index>(),
        any::<u8>(),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(move |(at, byte, cut, truncate)| {
            let mut bad = good.clone();
            if truncate {
                bad.truncate(cut.index(good.len()));
            } else {
                bad[at.index(good.len())] = byte;
            }
            bad
        })
}

fn der() -> impl Strategy<Value = Vec<u8>> {
    let (_, csr, cert) = fixture();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        damaged(csr),
        damaged(cert),
        damaged(&fixture().0.cert_der),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// What a Join sends as its CSR: only its public key is used, and only
    /// the token's identity is written.
    #[test]
    fn arbitrary_csrs_never_panic(raw in der(), cluster in name(), node in name()) {
        let (ca, _, _) = fixture();
        if let Ok(cert) = ca.sign_node_csr(&raw, &cluster, &node) {
            prop_assert_eq!(identity_of(&cert), Some(Identity::Node { cluster, node }));
        }
    }

    #[test]
    fn arbitrary_certificates_never_panic(raw in der()) {
        let _ = identity_of(&raw);
        if let Ok(pin) = spki_pin(&raw) {
            prop_assert_eq!(parse_pin(&pin).unwrap(), pin);
        }
        let _ = fingerprint(&raw);
    }

    /// The stored CA key and certificate, as `init::open` and a restore
    /// load them.
    #[test]
    fn arbitrary_ca_material_never_panics(cert in der(), key in proptest::collection::vec(any::<u8>(), 0..200)) {
        let key = PrivateKey::from_der(key);
        let _ = Ca::load(&cert, &key);
        let _ = key.pem();
    }

    #[test]
    fn identities_round_trip(cluster in name(), node in name(), op in "\\PC{0,30}") {
        let id = Identity::Node { cluster, node };
        prop_assert_eq!(Identity::parse_uri(&id.uri()), Some(id));
        let id = Identity::Operator { name: op };
        prop_assert_eq!(Identity::parse_uri(&id.uri()), Some(id));
    }

    #[test]
    fn arbitrary_uris_and_pins_never_panic(text in prop_oneof![
        "\\PC{0,80}",
        "urn:edgekms:(node|operator):\\PC{0,30}",
        "(sha256|SHA256|md5):[0-9a-fA-F]{60,68}",
    ]) {
        let _ = Identity::parse_uri(&text);
        if let Ok(pin) = parse_pin(&text) {
            prop_assert_eq!(pin, text.to_ascii_lowercase());
        }
    }

    #[test]
    fn pem_round_trips_and_arbitrary_text_never_panics(
        der in proptest::collection::vec(any::<u8>(), 0..300),
        text in prop_oneof![
            "\\PC{0,200}",
            "-----BEGIN CERTIFICATE-----[A-Za-z0-9+/= \\n]{0,100}(-----END CERTIFICATE-----)?\\PC{0,10}",
        ],
    ) {
        prop_assert_eq!(pem_decode("CERTIFICATE", &cert_pem(&der)), Some(der));
        let _ = pem_decode("CERTIFICATE", &text);
    }
}

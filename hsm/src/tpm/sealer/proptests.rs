//! Property tests for what [`TpmSealer::unseal`] parses before it talks to
//! the TPM: the marshalled TPMT_PUBLIC and TPM2B_PRIVATE bodies taken from
//! the blob (tss-esapi's unmarshalling, over libtss2-mu). Arbitrary bytes
//! must give an error or a value, never a panic, and a public area that
//! decodes must marshal back to a value that decodes the same. Also the
//! TCTI string parser.

use proptest::prelude::*;

use super::*;
use crate::proptests::config;

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_public_and_private_areas_never_panic(
        public in proptest::collection::vec(any::<u8>(), 0..400),
        private in proptest::collection::vec(any::<u8>(), 0..1200),
    ) {
        if let Ok(p) = Public::unmarshall(&public) {
            let again = p.marshall().unwrap();
            prop_assert_eq!(Public::unmarshall(&again).unwrap(), p);
        }
        let _ = Private::try_from(private);
    }

    /// A real sealed-object template with damage: the decoder is reached
    /// past the type and algorithm fields, where the unions are.
    #[test]
    fn damaged_sealed_object_public_areas_never_panic(
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        for template in [
            sealed_object_template(None),
            primary_template(true),
            primary_template(false),
        ] {
            let good = template.unwrap().marshall().unwrap();
            let mut bad = good.clone();
            bad[at.index(good.len())] = byte;
            let _ = Public::unmarshall(&bad);
            let _ = Public::unmarshall(&good[..cut.index(good.len())]);
        }
    }
}

proptest! {
    // tss-esapi's TCTI parser is slow in debug builds (~10 ms a call).
    #![proptest_config(config(64))]

    /// `--tpm-tcti`: any text is a TCTI or a configuration error.
    #[test]
    fn arbitrary_tcti_text_never_panics(
        text in "((device|swtpm|mssim|tabrmd|libtpms):)?\\PC{0,40}",
    ) {
        if let Err(e) = parse_tcti(&text) {
            prop_assert!(matches!(e, SealError::Config(_)), "{e:?}");
        }
    }
}

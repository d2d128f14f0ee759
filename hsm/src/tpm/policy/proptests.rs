//! Property tests for [`PcrPolicy::parse`] (the `--tpm-pcrs` value and the
//! config file's `tpm_pcrs`): any text returns a policy or a
//! [`SealError::Config`], never a panic; every policy's display form parses
//! back to it, whatever the case and spacing.

use proptest::prelude::*;

use super::*;
use crate::proptests::config;

fn policy() -> impl Strategy<Value = PcrPolicy> {
    (
        prop_oneof![
            Just(PcrBank::Sha1),
            Just(PcrBank::Sha256),
            Just(PcrBank::Sha384)
        ],
        proptest::sample::subsequence((0..=MAX_PCR).collect::<Vec<u8>>(), 1..=24),
    )
        .prop_map(|(bank, pcrs)| PcrPolicy::new(bank, pcrs).unwrap())
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,64}") {
        if let Err(e) = PcrPolicy::parse(&text) {
            prop_assert!(matches!(e, SealError::Config(_)), "{e:?}");
        }
    }

    /// Text shaped like a policy, so the number and duplicate paths run.
    #[test]
    fn policy_shaped_text_never_panics(text in "(sha1|SHA256|sha384|md5|)[ :]{0,2}[0-9, +-]{0,30}") {
        if let Ok(p) = PcrPolicy::parse(&text) {
            prop_assert_eq!(PcrPolicy::parse(&p.to_string()).unwrap(), p);
        }
    }

    #[test]
    fn display_round_trips(p in policy(), upper in any::<bool>(), pad in " {0,2}") {
        let shown = p.to_string();
        prop_assert_eq!(PcrPolicy::parse(&shown).unwrap(), p.clone());
        let mut typed = shown.replace(',', &format!("{pad},{pad}"));
        if upper {
            typed = typed.to_uppercase();
        }
        prop_assert_eq!(PcrPolicy::parse(&format!("{pad}{typed}{pad}")).unwrap(), p);
    }
}

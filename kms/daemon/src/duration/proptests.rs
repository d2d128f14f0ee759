//! Property tests for [`parse`] (flags and config values such as
//! `--auto-rotate-every`, `heartbeat`, `--ttl`): any text returns a
//! duration or an error, never a panic (overflow included); [`format`]'s
//! output parses back to the same duration.

use proptest::prelude::*;

use super::*;
use edgekms_testkit::proptest_policy::config;

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,30}") {
        let _ = parse(&text);
    }

    /// Number-and-unit shaped text, overflowing numbers included: the
    /// result is the exact product, or an error when it does not fit.
    #[test]
    fn numbers_and_units(n in any::<u64>(), digits in "[0-9]{0,25}", unit in "[smhdx]?", pad in " {0,2}") {
        let mult = match unit.as_str() {
            "s" => Some(1u64),
            "m" => Some(60),
            "h" => Some(3600),
            "d" => Some(86_400),
            _ => None,
        };
        let expected = mult.and_then(|m| n.checked_mul(m)).map(Duration::from_secs);
        prop_assert_eq!(parse(&format!("{pad}{n}{unit}{pad}")).ok(), expected);
        let _ = parse(&format!("{digits}{unit}"));
    }

    #[test]
    fn format_round_trips(secs in prop_oneof![any::<u64>(), 0u64..10_000_000]) {
        let d = Duration::from_secs(secs);
        prop_assert_eq!(parse(&format(d)).unwrap(), d);
    }
}

//! The case-count policy of every edgekms property test (one `proptests`
//! child module beside each parser of untrusted bytes).
//!
//! Each property runs [`config`]`(n)` cases: a count small enough for CI,
//! raised for a soak with `PROPTEST_CASES=100000 cargo test --workspace
//! proptests` (`bash .ci/soak-proptests`).

use proptest::prelude::*;

/// `default` cases per property, or `PROPTEST_CASES` when set (a soak).
pub fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Any cluster (or node) name edgekms accepts (a DNS label).
pub fn name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
}

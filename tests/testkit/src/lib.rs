//! Test helpers shared by every edgekms crate's tests and benches. Depends
//! on no edgekms crate, so any of them can use it as a dev-dependency.

pub mod proptest_policy;

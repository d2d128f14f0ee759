//! This crate's property tests use the workspace's case-count policy.

pub(crate) use edgekms_testkit::proptest_policy::{config, name};

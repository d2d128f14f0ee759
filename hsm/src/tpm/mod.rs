//! TPM 2.0 sealing backend (tss-esapi 7.7).
//!
//! This module owns everything that talks to a TPM: the configuration
//! ([`TpmConfig`], [`PcrPolicy`]), the [`TpmSealer`], the on-disk format of
//! a TPM-sealed key (see `blob.rs`) and the translation of TSS errors into
//! [`crate::SealError`] (see `errors.rs`).
//!
//! How a key is sealed:
//!
//! * Each seal, unseal or info call opens its own TPM connection and closes
//!   it before returning, flushing every transient object it made. A TPM
//!   without a resource manager (swtpm, `/dev/tpm0`) serves one client and
//!   holds three objects; holding it would lock out tpm2-tools and tests.
//! * The parent is an ECC NIST P-256 storage key in the Owner hierarchy,
//!   re-created from a fixed template each time (the template of
//!   `tpm2_createprimary -C o -G ecc`, plus noDA) and never persisted: the
//!   owner seed makes it the same key every time, on this TPM only. Owner
//!   auth, when configured, authorises that step. A blob sealed before noDA
//!   names the parent of the old template by its fingerprint; that one is
//!   re-created to open it, until `kmsctl local reseal` moves the key.
//! * noDA, on the parent and on the sealed object: their auth is empty (or
//!   unused, under a PCR policy), so dictionary-attack protection guards
//!   nothing, and would only let any local user who fails a few
//!   authorizations of their own object lock the KMS out of its key.
//! * The key is a sealed data object (KeyedHash) under that parent. Without
//!   a PCR policy anyone who can reach the TPM with its owner auth can
//!   unseal (userWithAuth, empty auth): the protection is that the blob is
//!   useless off this TPM. With a PCR policy the object's authPolicy is a
//!   PolicyPCR digest over the chosen PCRs as they were when sealed, and
//!   only a policy session that matched those values can unseal.
//! * The key crosses the bus only inside sessions salted with the storage
//!   key (ECDH), with parameter encryption, so a bus sniffer sees no key.
//!   The storage key's fingerprint is recorded in the blob and checked
//!   before use, so an interposer cannot substitute its own salt key.

mod blob;
mod errors;
mod policy;
mod sealer;

use std::fmt;

use zeroize::Zeroizing;

pub use policy::{PcrBank, PcrPolicy};
pub use sealer::TpmSealer;

pub use crate::config::DEFAULT_TCTI;

/// How to reach the TPM and what to bind the key to.
#[derive(Clone)]
pub struct TpmConfig {
    /// A tss-esapi TCTI string: `device:/dev/tpmrm0` (the default),
    /// `swtpm:host=127.0.0.1,port=2321`, `tabrmd:` ...
    pub tcti: String,
    /// PCRs the key is bound to; `None` binds it to the TPM only.
    pub pcrs: Option<PcrPolicy>,
    /// Owner hierarchy authorization, when the owner set one.
    pub owner_auth: Option<Zeroizing<String>>,
}

impl Default for TpmConfig {
    fn default() -> Self {
        Self {
            tcti: DEFAULT_TCTI.to_owned(),
            pcrs: None,
            owner_auth: None,
        }
    }
}

impl fmt::Debug for TpmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmConfig")
            .field("tcti", &self.tcti)
            .field("pcrs", &self.pcrs.as_ref().map(ToString::to_string))
            .field(
                "owner_auth",
                &self.owner_auth.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_owner_auth() {
        let cfg = TpmConfig {
            owner_auth: Some(Zeroizing::new("hunter2".into())),
            pcrs: Some(PcrPolicy::parse("sha256:7").unwrap()),
            ..TpmConfig::default()
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[redacted]") && shown.contains("sha256:7"));
        assert!(shown.contains(DEFAULT_TCTI));
    }
}

//! PCR policies: the `sha256:0,2,7` configuration syntax, and the PolicyPCR
//! digest computed in software.
//!
//! Pure code (no TPM): the digest computed here becomes the sealed object's
//! `authPolicy`, and the TPM recomputes the same value from its live PCRs in
//! a policy session at unseal time (TPM 2.0 Part 3, TPM2_PolicyPCR).

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::SealError;

/// The PCR banks a policy may name. The policy digest itself is always
/// SHA-256 (the sealed object's name algorithm); the bank only says which
/// PCR values feed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PcrBank {
    Sha1,
    Sha256,
    Sha384,
}

impl PcrBank {
    /// Name as written in a policy (`sha256`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
        }
    }

    /// Size of one PCR value in this bank.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha384 => 48,
        }
    }

    /// TPM_ALG_ID, as marshalled in TPMS_PCR_SELECTION and in our blob.
    pub(crate) fn alg_id(self) -> u16 {
        match self {
            Self::Sha1 => 0x0004,
            Self::Sha256 => 0x000B,
            Self::Sha384 => 0x000C,
        }
    }

    pub(crate) fn from_alg_id(id: u16) -> Option<Self> {
        [Self::Sha1, Self::Sha256, Self::Sha384]
            .into_iter()
            .find(|b| b.alg_id() == id)
    }
}

/// Highest PCR index a policy may select (PC client TPMs have 24 PCRs).
pub(crate) const MAX_PCR: u8 = 23;

/// Which PCRs the node sealing key is bound to, e.g. `sha256:0,2,7`.
///
/// `pcrs` is sorted and free of duplicates (the TPM reads a selection as a
/// bitmap, so order carries no meaning; keeping one canonical order makes
/// the policy digest and [`fmt::Display`] deterministic).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PcrPolicy {
    pub bank: PcrBank,
    pub pcrs: Vec<u8>,
}

impl PcrPolicy {
    /// Parses `<bank>:<pcr>[,<pcr>...]` with bank `sha1`, `sha256` or
    /// `sha384` and PCRs 0 to 23, e.g. `sha256:7` or `sha256:0,2,7`.
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let bad = |why: String| {
            SealError::Config(format!(
                "PCR policy {text:?}: {why} (expected <bank>:<pcr>[,<pcr>...], e.g. sha256:0,2,7)"
            ))
        };
        let (bank, list) = text
            .trim()
            .split_once(':')
            .ok_or_else(|| bad("no ':' between bank and PCR list".into()))?;
        let bank = match bank.trim().to_ascii_lowercase().as_str() {
            "sha1" => PcrBank::Sha1,
            "sha256" => PcrBank::Sha256,
            "sha384" => PcrBank::Sha384,
            other => {
                return Err(bad(format!(
                    "unknown bank {other:?} (sha1, sha256, sha384)"
                )))
            }
        };
        let mut pcrs = Vec::new();
        for item in list.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(bad("empty PCR number".into()));
            }
            let pcr: u8 =
                item.parse().ok().filter(|p| *p <= MAX_PCR).ok_or_else(|| {
                    bad(format!("{item:?} is not a PCR number from 0 to {MAX_PCR}"))
                })?;
            if pcrs.contains(&pcr) {
                return Err(bad(format!("PCR {pcr} is listed twice")));
            }
            pcrs.push(pcr);
        }
        pcrs.sort_unstable();
        Self::new(bank, pcrs).map_err(|e| bad(e.to_owned()))
    }

    /// Builds a policy from parts, with the same checks as [`Self::parse`].
    pub(crate) fn new(bank: PcrBank, mut pcrs: Vec<u8>) -> Result<Self, &'static str> {
        pcrs.sort_unstable();
        if pcrs.is_empty() {
            return Err("no PCR selected");
        }
        if pcrs.iter().any(|p| *p > MAX_PCR) {
            return Err("PCR number above 23");
        }
        if pcrs.windows(2).any(|w| w[0] == w[1]) {
            return Err("a PCR is listed twice");
        }
        Ok(Self { bank, pcrs })
    }

    /// The 3-byte PCR bitmap of a TPMS_PCR_SELECTION (PCR n is bit n % 8 of
    /// byte n / 8).
    pub(crate) fn bitmap(&self) -> [u8; 3] {
        let mut map = [0u8; 3];
        for &pcr in &self.pcrs {
            map[usize::from(pcr / 8)] |= 1 << (pcr % 8);
        }
        map
    }

    /// The policy digest of a session that ran only
    /// `TPM2_PolicyPCR(pcrDigest, pcrs)` over `values` (one per PCR of
    /// `self.pcrs`, in the same order):
    ///
    /// ```text
    /// pcrDigest    = SHA-256(value_1 || ... || value_n)
    /// policyDigest = SHA-256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || pcrDigest)
    /// ```
    pub(crate) fn policy_digest(&self, values: &[Vec<u8>]) -> [u8; 32] {
        const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;
        let mut policy = Sha256::new();
        policy.update([0u8; 32]);
        policy.update(TPM_CC_POLICY_PCR.to_be_bytes());
        // TPML_PCR_SELECTION with one TPMS_PCR_SELECTION: count, hash,
        // sizeofSelect, pcrSelect.
        policy.update(1u32.to_be_bytes());
        policy.update(self.bank.alg_id().to_be_bytes());
        policy.update([3u8]);
        policy.update(self.bitmap());
        policy.update(pcr_digest(values));
        policy.finalize().into()
    }
}

/// The `pcrDigest` argument of TPM2_PolicyPCR: SHA-256 over the PCR values
/// in selection order.
pub(crate) fn pcr_digest(values: &[Vec<u8>]) -> [u8; 32] {
    let mut digest = Sha256::new();
    for value in values {
        digest.update(value);
    }
    digest.finalize().into()
}

impl fmt::Display for PcrPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.bank.name())?;
        for (i, pcr) in self.pcrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{pcr}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for PcrPolicy {
    type Err = SealError;

    fn from_str(s: &str) -> Result<Self, SealError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match PcrPolicy::parse(text) {
            Err(SealError::Config(msg)) => msg,
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    #[test]
    fn parses_and_displays_canonically() {
        let p = PcrPolicy::parse("sha256:0,2,7").unwrap();
        assert_eq!(p.bank, PcrBank::Sha256);
        assert_eq!(p.pcrs, vec![0, 2, 7]);
        assert_eq!(p.to_string(), "sha256:0,2,7");

        let p = PcrPolicy::parse(" SHA1 : 23 , 7,0 ").unwrap();
        assert_eq!((p.bank, p.pcrs.clone()), (PcrBank::Sha1, vec![0, 7, 23]));
        assert_eq!(p.to_string(), "sha1:0,7,23");

        assert_eq!(
            "sha384:16".parse::<PcrPolicy>().unwrap().to_string(),
            "sha384:16"
        );
        for text in ["sha256:7", "sha1:0,1,2,3,4,5,6,7,8,9,10", "sha384:0,23"] {
            assert_eq!(PcrPolicy::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn rejects_bad_input_with_clear_messages() {
        assert!(err("").contains("no ':'"));
        assert!(err("sha256").contains("no ':'"));
        assert!(err("md5:7").contains("unknown bank \"md5\""));
        assert!(err("sha512:7").contains("unknown bank"));
        assert!(err("sha256:").contains("empty PCR number"));
        assert!(err("sha256:7,").contains("empty PCR number"));
        assert!(err("sha256:24").contains("\"24\" is not a PCR number from 0 to 23"));
        assert!(err("sha256:-1").contains("not a PCR number"));
        assert!(err("sha256:seven").contains("\"seven\""));
        assert!(err("sha256:300").contains("not a PCR number"));
        assert!(err("sha256:7,7").contains("PCR 7 is listed twice"));
        // Every message names the input and shows the expected form.
        let msg = err("sha256:x");
        assert!(msg.contains("sha256:x") && msg.contains("e.g. sha256:0,2,7"));
    }

    /// Known answers from `tpm2_createpolicy --policy-pcr -l <selection>`
    /// (tpm2-tools 5 against swtpm, whose PCRs start at zero).
    #[test]
    fn policy_digest_matches_tpm2_tools() {
        let p = PcrPolicy::parse("sha256:0,7").unwrap();
        assert_eq!(
            hex::encode(p.policy_digest(&[vec![0; 32], vec![0; 32]])),
            "02e3642b3e29eeccfffd8031c00a6f0a0febe5ceea2f6ef6b0322fe81598cf31"
        );
        let p = PcrPolicy::parse("sha1:7").unwrap();
        assert_eq!(
            hex::encode(p.policy_digest(&[vec![0; 20]])),
            "84278b60d0547dc27ec6667e7afeece0711c09b5ced09a30a65b389d3afda1ef"
        );
    }

    #[test]
    fn bitmap_and_alg_ids() {
        let p = PcrPolicy::parse("sha256:0,7,8,23").unwrap();
        assert_eq!(p.bitmap(), [0x81, 0x01, 0x80]);
        for bank in [PcrBank::Sha1, PcrBank::Sha256, PcrBank::Sha384] {
            assert_eq!(PcrBank::from_alg_id(bank.alg_id()), Some(bank));
        }
        assert_eq!(PcrBank::from_alg_id(0x0010), None);
    }
}

#[cfg(test)]
mod proptests;

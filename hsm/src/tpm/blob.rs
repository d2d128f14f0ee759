//! The bytes of a TPM-sealed key (`SealedBlob.bytes` for backend `tpm`).
//!
//! Version 1, all integers big-endian, nothing may follow the last field:
//!
//! ```text
//! magic        4 bytes   "EKTP"
//! version      1 byte    1
//! primary      32 bytes  SHA-256 of the storage primary's TPMT_PUBLIC (the
//!                        digest in its TPM Name): identifies the TPM (its
//!                        owner seed) that can load the sealed object
//! pcr_bank     2 bytes   TPM_ALG_ID of the PCR bank (0x0004 sha1, 0x000B
//!                        sha256, 0x000C sha384), or 0x0010 (TPM_ALG_NULL)
//!                        when the key is not bound to PCRs
//! pcr_count    1 byte    0 with TPM_ALG_NULL, else 1 to 24
//! pcr_count x  1 byte    PCR index, strictly increasing, at most 23
//!              n bytes   its value when sealed (n = digest size of the bank)
//! public       2+n bytes TPM2B_PUBLIC of the sealed object
//! private      2+n bytes TPM2B_PRIVATE of the sealed object
//! ```
//!
//! `public` and `private` are byte for byte what `tpm2_create -u/-r` write,
//! so an operator can inspect or load them with tpm2-tools. The PCR values
//! are not secret (anyone on the node can read PCRs); they let a failed
//! unseal name the PCR that changed. They are not trusted either: the
//! policy digest recomputed from them must equal the sealed object's
//! `authPolicy`, which the TPM authenticates when it loads the object.
//!
//! Decoding is pure and total: any truncated, oversized or garbled input
//! yields [`SealError::CorruptBlob`], never a panic.

use super::policy::{PcrBank, PcrPolicy, MAX_PCR};
use crate::SealError;

const MAGIC: &[u8; 4] = b"EKTP";
const VERSION: u8 = 1;
const ALG_NULL: u16 = 0x0010;

/// PCR selection and values recorded when the key was sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PcrRecord {
    pub policy: PcrPolicy,
    /// One value per PCR of `policy.pcrs`, in the same order.
    pub values: Vec<Vec<u8>>,
}

/// A decoded version-1 TPM blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TpmBlob {
    pub primary: [u8; 32],
    pub pcrs: Option<PcrRecord>,
    /// Marshalled TPMT_PUBLIC (the body of the TPM2B_PUBLIC).
    pub public: Vec<u8>,
    /// The body of the TPM2B_PRIVATE.
    pub private: Vec<u8>,
}

fn corrupt(detail: impl Into<String>) -> SealError {
    SealError::CorruptBlob {
        detail: detail.into(),
    }
}

impl TpmBlob {
    pub fn encode(&self) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.primary);
        match &self.pcrs {
            None => {
                out.extend_from_slice(&ALG_NULL.to_be_bytes());
                out.push(0);
            }
            Some(rec) => {
                let bank = rec.policy.bank;
                let consistent = rec.values.len() == rec.policy.pcrs.len()
                    && rec.values.iter().all(|v| v.len() == bank.digest_len());
                if !consistent {
                    return Err(SealError::Tpm {
                        op: "encode sealed blob",
                        detail: "PCR values do not match the PCR selection".into(),
                    });
                }
                out.extend_from_slice(&bank.alg_id().to_be_bytes());
                // At most 24 PCRs (checked by PcrPolicy), so this fits.
                out.push(rec.policy.pcrs.len() as u8);
                for (pcr, value) in rec.policy.pcrs.iter().zip(&rec.values) {
                    out.push(*pcr);
                    out.extend_from_slice(value);
                }
            }
        }
        for (what, part) in [("public", &self.public), ("private", &self.private)] {
            let len = u16::try_from(part.len()).map_err(|_| SealError::Tpm {
                op: "encode sealed blob",
                detail: format!("{what} area of {} bytes is too large", part.len()),
            })?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, SealError> {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return Err(corrupt("not a TPM sealed key (bad magic)"));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(corrupt(format!(
                "unknown TPM blob version {version} (this build reads version {VERSION})"
            )));
        }
        let mut primary = [0u8; 32];
        primary.copy_from_slice(r.take(32)?);

        let alg = r.u16()?;
        let count = r.u8()?;
        let pcrs = if alg == ALG_NULL {
            if count != 0 {
                return Err(corrupt("PCR values recorded without a PCR bank"));
            }
            None
        } else {
            let bank = PcrBank::from_alg_id(alg)
                .ok_or_else(|| corrupt(format!("unknown PCR bank algorithm {alg:#06x}")))?;
            let mut pcrs = Vec::with_capacity(usize::from(count));
            let mut values = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let pcr = r.u8()?;
                if pcr > MAX_PCR || pcrs.last().is_some_and(|last| *last >= pcr) {
                    return Err(corrupt("bad PCR selection"));
                }
                pcrs.push(pcr);
                values.push(r.take(bank.digest_len())?.to_vec());
            }
            let policy = PcrPolicy::new(bank, pcrs).map_err(corrupt)?;
            Some(PcrRecord { policy, values })
        };

        let public = r.sized()?.to_vec();
        let private = r.sized()?.to_vec();
        if public.is_empty() || private.is_empty() {
            return Err(corrupt("empty public or private area"));
        }
        if !r.0.is_empty() {
            return Err(corrupt(format!("{} unexpected trailing bytes", r.0.len())));
        }
        Ok(Self {
            primary,
            pcrs,
            public,
            private,
        })
    }
}

/// A cursor that fails instead of reading past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SealError> {
        if self.0.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, SealError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, SealError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A TPM2B: u16 size, then that many bytes.
    fn sized(&mut self) -> Result<&'a [u8], SealError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pcrs: Option<PcrRecord>) -> TpmBlob {
        TpmBlob {
            primary: [0xA5; 32],
            pcrs,
            public: vec![0x00, 0x08, 0x00, 0x0B, 1, 2, 3],
            private: (0..90u8).collect(),
        }
    }

    fn record() -> PcrRecord {
        PcrRecord {
            policy: PcrPolicy::parse("sha256:0,7").unwrap(),
            values: vec![vec![0u8; 32], vec![7u8; 32]],
        }
    }

    fn is_corrupt(bytes: &[u8]) -> bool {
        matches!(TpmBlob::decode(bytes), Err(SealError::CorruptBlob { .. }))
    }

    #[test]
    fn round_trips_with_and_without_pcrs() {
        for blob in [sample(None), sample(Some(record()))] {
            let bytes = blob.encode().unwrap();
            assert_eq!(TpmBlob::decode(&bytes).unwrap(), blob);
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let bytes = sample(Some(record())).encode().unwrap();
        assert_eq!(&bytes[..5], b"EKTP\x01");
        assert_eq!(&bytes[5..37], &[0xA5; 32]);
        assert_eq!(&bytes[37..40], &[0x00, 0x0B, 2]);
        assert_eq!(bytes[40], 0);
        assert_eq!(bytes[73], 7);
        assert_eq!(&bytes[106..108], &[0, 7]);
        let plain = sample(None).encode().unwrap();
        assert_eq!(&plain[37..40], &[0x00, 0x10, 0]);
        assert_eq!(plain.len(), 40 + 2 + 7 + 2 + 90);
    }

    #[test]
    fn every_truncation_is_corrupt() {
        for blob in [sample(None), sample(Some(record()))] {
            let bytes = blob.encode().unwrap();
            for n in 0..bytes.len() {
                assert!(is_corrupt(&bytes[..n]), "prefix {n}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(is_corrupt(&longer));
        }
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random inputs, plus every single-byte flip of
        // a valid blob: decoding must return, whatever it returns.
        let mut x: u32 = 0x1234_5678;
        for len in 0..600 {
            let garbage: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = TpmBlob::decode(&garbage);
            let mut framed = b"EKTP\x01".to_vec();
            framed.extend_from_slice(&garbage);
            let _ = TpmBlob::decode(&framed);
        }
        let bytes = sample(Some(record())).encode().unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                let _ = TpmBlob::decode(&bad);
            }
        }
    }

    #[test]
    fn specific_damage_is_named() {
        let bytes = sample(Some(record())).encode().unwrap();
        let detail = |b: &[u8]| match TpmBlob::decode(b) {
            Err(SealError::CorruptBlob { detail }) => detail,
            other => panic!("{other:?}"),
        };
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(detail(&bad).contains("bad magic"));
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert!(detail(&bad).contains("version 9"));
        let mut bad = bytes.clone();
        bad[38] = 0x99; // bank
        assert!(detail(&bad).contains("unknown PCR bank"));
        let mut bad = bytes.clone();
        bad[73] = 0; // second PCR index equal to the first
        assert!(detail(&bad).contains("bad PCR selection"));
        let mut bad = bytes.clone();
        bad[40] = 24;
        assert!(detail(&bad).contains("bad PCR selection"));
        let mut bad = sample(None).encode().unwrap();
        bad[39] = 1; // a count with TPM_ALG_NULL
        assert!(detail(&bad).contains("without a PCR bank"));
    }

    #[test]
    fn inconsistent_record_is_not_encoded() {
        let mut rec = record();
        rec.values.pop();
        assert!(sample(Some(rec)).encode().is_err());
        let mut rec = record();
        rec.values[0].push(0);
        assert!(sample(Some(rec)).encode().is_err());
    }
}

#[cfg(test)]
mod proptests;

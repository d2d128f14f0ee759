//! Turns tss-esapi errors into [`SealError`] variants an operator can act on.
//!
//! tss-esapi 7.7 decodes response codes without looking at the layer byte
//! (so an ESAPI or TCTI error can masquerade as a TPM code), hence the
//! explicit layer check before interpreting anything as a TPM response.

use tss_esapi::constants::{Tss2ResponseCode, Tss2ResponseCodeKind as K};
use tss_esapi::Error;

use crate::SealError;

/// What the failing call was doing; some codes mean different things
/// depending on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Connecting to the TPM (TCTI load and initialisation).
    Open,
    /// Re-creating the storage primary (authorised by the owner hierarchy).
    CreatePrimary,
    ReadPcrs,
    StartSession,
    Create,
    /// Loading the sealed object from the blob.
    Load,
    /// TPM2_PolicyPCR with the digest of the recorded PCR values.
    PolicyPcr,
    Unseal,
    Capability,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::CreatePrimary => "create storage primary",
            Op::ReadPcrs => "read PCRs",
            Op::StartSession => "start session",
            Op::Create => "create sealed object",
            Op::Load => "load sealed object",
            Op::PolicyPcr => "PolicyPCR",
            Op::Unseal => "unseal",
            Op::Capability => "get capability",
        }
    }
}

const LAYER_TPM: u32 = 0;
const LAYER_TCTI: u32 = 10;
/// Resource-manager layer for TPM codes relayed by tpm2-abrmd.
const LAYER_RESMGR_TPM: u32 = 12;

/// The raw TSS2_RC carried by an error, if any.
fn raw_rc(err: &Error) -> Option<u32> {
    match err {
        Error::Tss2Error(Tss2ResponseCode::FormatZero(rc)) => Some(rc.0),
        Error::Tss2Error(Tss2ResponseCode::FormatOne(rc)) => Some(rc.0),
        Error::Tss2Error(Tss2ResponseCode::Success) | Error::WrapperError(_) => None,
    }
}

/// Words for an error raised by the TSS software stack itself (tss-esapi
/// has none: it reads these as TPM codes and says "not recognized").
fn tss_detail(layer: u32, base: u32) -> String {
    let layer = match layer {
        6 => "FAPI",
        7 => "ESAPI",
        8 => "SAPI",
        9 => "marshalling",
        LAYER_TCTI => "TCTI",
        11 => "resource manager",
        _ => "TSS",
    };
    let what = match base {
        1 => "general failure",
        2 => "not implemented",
        5 => "bad reference",
        6 => "insufficient buffer",
        8 => "no connection",
        9 => "try again",
        10 => "input/output error (device or simulator unreachable)",
        11 => "bad value",
        12 => "not permitted",
        16 => "bad size",
        17 => "malformed response",
        21 => "not supported",
        23 => "out of memory",
        27 => "response authorization failed",
        _ => "error",
    };
    format!("{layer}: {what}")
}

/// Maps one failed call to a [`SealError`]. `tcti` names the device in
/// [`SealError::NoDevice`].
pub(crate) fn map_tss_error(op: Op, tcti: &str, err: Error) -> SealError {
    let rc = raw_rc(&err);
    let layer = rc.map(|rc| (rc >> 16) & 0xFF);
    let detail = match (rc, layer) {
        (Some(rc), Some(LAYER_TPM | LAYER_RESMGR_TPM)) => format!("{err} (TSS2_RC {rc:#x})"),
        (Some(rc), Some(layer)) => format!("{} (TSS2_RC {rc:#x})", tss_detail(layer, rc & 0xFFFF)),
        (None, _) | (_, None) => err.to_string(),
    };
    if op == Op::Open || layer == Some(LAYER_TCTI) {
        return SealError::NoDevice {
            tcti: tcti.to_owned(),
            detail,
        };
    }
    // Only a TPM response code (directly or relayed by a resource manager)
    // says anything about the TPM's state.
    let tpm_rc = match (rc, layer) {
        (Some(rc), Some(LAYER_TPM | LAYER_RESMGR_TPM)) => rc & 0xFFFF,
        _ => {
            return SealError::Tpm {
                op: op.name(),
                detail,
            }
        }
    };
    // Format-one codes (bit 7) say which handle, session or parameter is at
    // fault; bit 6 set means a parameter.
    let bad_parameter = tpm_rc & 0xC0 == 0xC0;
    match Tss2ResponseCode::from(tpm_rc).kind() {
        Some(K::Lockout) => SealError::Lockout { detail },
        Some(K::AuthFail | K::BadAuth) => SealError::AuthFailed {
            detail: format!("{}: {detail}", op.name()),
        },
        Some(K::PolicyFail | K::Pcr | K::PcrChanged) => SealError::PolicyCheckFailed {
            reason: format!("the TPM refused the PCR policy: {detail}"),
        },
        // PolicyPCR answers TPM_RC_VALUE when the PCRs no longer hash to the
        // digest we passed: a PCR changed between our check and the command.
        Some(K::Value) if op == Op::PolicyPcr => SealError::PolicyCheckFailed {
            reason: format!("PCR values changed during unseal: {detail}"),
        },
        // Load's parameters are the blob's public and private areas: the TPM
        // found them altered (integrity) or malformed.
        Some(K::Integrity | K::Sensitive | K::Binding | K::Size | K::Insufficient)
            if op == Op::Load =>
        {
            SealError::CorruptBlob { detail }
        }
        _ if op == Op::Load && bad_parameter => SealError::CorruptBlob { detail },
        _ => SealError::Tpm {
            op: op.name(),
            detail,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tss_esapi::WrapperErrorKind;

    fn map(op: Op, rc: u32) -> SealError {
        map_tss_error(op, "device:/dev/tpmrm0", Error::Tss2Error(rc.into()))
    }

    #[test]
    fn tpm_codes_map_to_specific_variants() {
        // TPM_RC_LOCKOUT (warning 0x921).
        assert!(matches!(map(Op::Unseal, 0x921), SealError::Lockout { .. }));
        assert!(matches!(
            map(Op::CreatePrimary, 0x921),
            SealError::Lockout { .. }
        ));
        // TPM_RC_AUTH_FAIL and TPM_RC_BAD_AUTH on session 1.
        assert!(matches!(
            map(Op::CreatePrimary, 0x98E),
            SealError::AuthFailed { .. }
        ));
        assert!(matches!(
            map(Op::CreatePrimary, 0x9A2),
            SealError::AuthFailed { .. }
        ));
        // TPM_RC_POLICY_FAIL on session 1, TPM_RC_PCR_CHANGED.
        assert!(matches!(
            map(Op::Unseal, 0x99D),
            SealError::PolicyCheckFailed { .. }
        ));
        assert!(matches!(
            map(Op::Unseal, 0x128),
            SealError::PolicyCheckFailed { .. }
        ));
        // TPM_RC_VALUE on parameter 1: a PCR mismatch for PolicyPCR only.
        assert!(matches!(
            map(Op::PolicyPcr, 0x1C4),
            SealError::PolicyCheckFailed { .. }
        ));
        assert!(matches!(
            map(Op::Create, 0x1C4),
            SealError::Tpm {
                op: "create sealed object",
                ..
            }
        ));
        // TPM_RC_INTEGRITY on parameter 1, TPM_RC_SIZE on parameter 2,
        // TPM_RC_ATTRIBUTES on parameter 2: all from the blob when loading.
        assert!(matches!(
            map(Op::Load, 0x1DF),
            SealError::CorruptBlob { .. }
        ));
        assert!(matches!(
            map(Op::Load, 0x2D5),
            SealError::CorruptBlob { .. }
        ));
        assert!(matches!(
            map(Op::Load, 0x2C2),
            SealError::CorruptBlob { .. }
        ));
        // TPM_RC_HANDLE on handle 1 is about the parent, not the blob.
        assert!(matches!(map(Op::Load, 0x18B), SealError::Tpm { .. }));
        // TPM_RC_INTEGRITY outside load is just a TPM failure.
        assert!(matches!(map(Op::Unseal, 0x1DF), SealError::Tpm { .. }));
        // Relayed by tpm2-abrmd (resource-manager TPM layer).
        assert!(matches!(
            map(Op::Unseal, 0x000C_0921),
            SealError::Lockout { .. }
        ));
    }

    #[test]
    fn tss_layers_are_not_read_as_tpm_codes() {
        // TSS2_TCTI_RC_IO_ERROR: the device went away.
        match map(Op::Unseal, 0x000A_000A) {
            SealError::NoDevice { tcti, detail } => {
                assert_eq!(tcti, "device:/dev/tpmrm0");
                assert!(detail.contains("0xa000a"), "{detail}");
                assert!(detail.starts_with("TCTI: input/output error"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // An ESAPI-layer code whose low bits equal TPM_RC_LOCKOUT is not a
        // lockout.
        assert!(matches!(
            map(Op::Unseal, 0x0007_0921),
            SealError::Tpm { .. }
        ));
        // Anything while opening is "no device".
        assert!(matches!(
            map(Op::Open, 0x0007_000B),
            SealError::NoDevice { .. }
        ));
        assert!(matches!(
            map_tss_error(
                Op::Open,
                "x",
                Error::WrapperError(WrapperErrorKind::InvalidParam)
            ),
            SealError::NoDevice { .. }
        ));
        assert!(matches!(
            map_tss_error(
                Op::Create,
                "x",
                Error::WrapperError(WrapperErrorKind::WrongParamSize)
            ),
            SealError::Tpm {
                op: "create sealed object",
                ..
            }
        ));
    }

    #[test]
    fn details_carry_the_code() {
        let SealError::Tpm { detail, .. } = map(Op::Create, 0x101) else {
            panic!("expected Tpm");
        };
        assert!(detail.contains("0x101"), "{detail}");
    }
}

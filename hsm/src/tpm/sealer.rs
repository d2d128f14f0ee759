//! [`TpmSealer`]: seals the node sealing key to this machine's TPM.
//!
//! Every operation is one short-lived TPM connection:
//! open, re-create the storage primary, do the work, flush, close.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::{PropertyTag, SessionType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, Digest, EccPoint, KeyedHashScheme, PcrSelectSize, PcrSelectionList,
    PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyedHashParameters, SensitiveData, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, WrapperErrorKind};
use zeroize::Zeroizing;

use super::blob::{PcrRecord, TpmBlob};
use super::errors::{map_tss_error, Op};
use super::policy::{pcr_digest, PcrBank, PcrPolicy};
use super::TpmConfig;
use crate::{check_backend, Key256, SealError, SealedBlob, Sealer, SealerInfo};

/// The TPM sealer: see the module documentation of [`crate::tpm`].
pub struct TpmSealer {
    tcti: String,
    tcti_conf: TctiNameConf,
    pcrs: Option<PcrPolicy>,
    owner_auth: Option<Zeroizing<String>>,
    /// One TPM connection at a time from this process: `/dev/tpm0` refuses
    /// a second open and swtpm queues it, so concurrent calls would only
    /// fail or wait anyway.
    lock: Mutex<()>,
    /// The storage primary the last seal or unseal used, for `describe`.
    last_primary: Mutex<Option<PrimaryTemplate>>,
}

/// Which template the storage primary is made from. Its fingerprint (in
/// every blob) depends on the template, so a blob names the one it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrimaryTemplate {
    /// Since noDA: the template of `tpm2_createprimary -C o -G ecc -a
    /// fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt`.
    /// Used for every new seal.
    NoDa,
    /// Before noDA (blobs sealed by edgekms up to 5971f57): the template of
    /// `tpm2_createprimary -C o -G ecc`. Re-created only to open such a
    /// blob, until `kmsctl local reseal` moves it to the new one.
    Legacy,
}

impl PrimaryTemplate {
    fn no_da(self) -> bool {
        self == PrimaryTemplate::NoDa
    }
}

impl fmt::Debug for TpmSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmSealer")
            .field("tcti", &self.tcti)
            .field("pcrs", &self.pcrs.as_ref().map(ToString::to_string))
            .field(
                "owner_auth",
                &self.owner_auth.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// The storage primary re-created for one operation.
struct Primary {
    handle: KeyHandle,
    template: PrimaryTemplate,
    /// SHA-256 of its TPMT_PUBLIC: the same on every call on this TPM (same
    /// owner seed, same template), different on any other.
    fingerprint: [u8; 32],
}

impl TpmSealer {
    /// Checks the configuration and that the TPM answers, then lets go of
    /// it. A missing or unreachable TPM is [`SealError::NoDevice`] here,
    /// at start-up, rather than at the first unseal.
    pub fn new(cfg: TpmConfig) -> Result<Self, SealError> {
        let tcti_conf = parse_tcti(&cfg.tcti)?;
        if let Some(auth) = &cfg.owner_auth {
            Auth::try_from(auth.as_bytes()).map_err(|_| {
                SealError::Config(format!(
                    "the TPM owner auth is {} bytes; a TPM accepts at most {}",
                    auth.len(),
                    Auth::MAX_SIZE
                ))
            })?;
        }
        let sealer = Self {
            tcti: cfg.tcti,
            tcti_conf,
            pcrs: cfg.pcrs,
            owner_auth: cfg.owner_auth,
            lock: Mutex::new(()),
            last_primary: Mutex::new(None),
        };
        {
            let _one_at_a_time = sealer.lock.lock().unwrap_or_else(PoisonError::into_inner);
            let mut ctx = sealer.open()?;
            let manufacturer = ctx
                .get_tpm_property(PropertyTag::Manufacturer)
                .map_err(sealer.err(Op::Capability))?;
            tracing::info!(
                tcti = %sealer.tcti,
                manufacturer = %manufacturer.map(ascii_id).unwrap_or_default(),
                pcr_policy = %sealer.policy_name(),
                "TPM reachable"
            );
        }
        Ok(sealer)
    }

    fn policy_name(&self) -> String {
        self.pcrs
            .as_ref()
            .map_or_else(|| "none".to_owned(), ToString::to_string)
    }

    fn open(&self) -> Result<Context, SealError> {
        Context::new(self.tcti_conf.clone()).map_err(|e| map_tss_error(Op::Open, &self.tcti, e))
    }

    /// Error mapper for one operation.
    fn err(&self, op: Op) -> impl Fn(tss_esapi::Error) -> SealError + '_ {
        move |e| map_tss_error(op, &self.tcti, e)
    }

    /// Runs `work` with a fresh connection and storage primary, then flushes
    /// the primary and closes the connection whatever `work` returned.
    ///
    /// `wanted` is the fingerprint a blob was sealed under (`None` to
    /// seal): when the noDA primary is not it, the primary of the older
    /// template is made instead, and used if it matches. `work` gets the
    /// noDA primary when neither does (and reports the foreign blob).
    fn with_primary<T>(
        &self,
        wanted: Option<&[u8; 32]>,
        work: impl FnOnce(&mut Context, &Primary) -> Result<T, SealError>,
    ) -> Result<T, SealError> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ctx = self.open()?;
        if let Some(auth) = &self.owner_auth {
            let auth = Auth::try_from(auth.as_bytes()).map_err(self.err(Op::CreatePrimary))?;
            ctx.tr_set_auth(ObjectHandle::Owner, auth)
                .map_err(self.err(Op::CreatePrimary))?;
        }
        let mut primary = self.create_primary(&mut ctx, PrimaryTemplate::NoDa)?;
        if wanted.is_some_and(|w| *w != primary.fingerprint) {
            // Both primaries are loaded for a moment: two of the three
            // objects a TPM without a resource manager holds.
            let legacy = self.create_primary(&mut ctx, PrimaryTemplate::Legacy);
            match legacy {
                Ok(legacy) if wanted == Some(&legacy.fingerprint) => {
                    flush(&mut ctx, primary.handle.into());
                    primary = legacy;
                }
                Ok(legacy) => flush(&mut ctx, legacy.handle.into()),
                Err(e) => {
                    flush(&mut ctx, primary.handle.into());
                    return Err(e);
                }
            }
        }
        let result = work(&mut ctx, &primary);
        if result.is_ok() {
            *self
                .last_primary
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(primary.template);
        }
        flush(&mut ctx, primary.handle.into());
        result
        // `ctx` drops here: ESAPI flushes anything still registered and the
        // connection closes.
    }

    fn create_primary(
        &self,
        ctx: &mut Context,
        template: PrimaryTemplate,
    ) -> Result<Primary, SealError> {
        // An HMAC session keyed with the owner auth: the auth itself never
        // crosses the bus.
        let created = ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(
                    Hierarchy::Owner,
                    primary_template(template.no_da())?,
                    None,
                    None,
                    None,
                    None,
                )
            })
            .map_err(self.err(Op::CreatePrimary))?;
        match created.out_public.marshall() {
            Ok(public) => Ok(Primary {
                handle: created.key_handle,
                template,
                fingerprint: Sha256::digest(public).into(),
            }),
            Err(e) => {
                flush(ctx, created.key_handle.into());
                Err(self.err(Op::CreatePrimary)(e))
            }
        }
    }

    fn seal_under(
        &self,
        ctx: &mut Context,
        primary: &Primary,
        key: &Key256,
    ) -> Result<TpmBlob, SealError> {
        let pcrs = match &self.pcrs {
            None => None,
            Some(policy) => Some(PcrRecord {
                policy: policy.clone(),
                values: read_pcrs(ctx, policy, &self.tcti)?,
            }),
        };
        let template = sealed_object_template(pcrs.as_ref()).map_err(self.err(Op::Create))?;
        let data =
            SensitiveData::try_from(key.expose().as_slice()).map_err(self.err(Op::Create))?;
        // `decrypt`: the key travels to the TPM encrypted.
        let session = salted_session(
            ctx,
            primary.handle,
            SessionType::Hmac,
            SessionAttributesBuilder::new().with_decrypt(true),
        )
        .map_err(self.err(Op::StartSession))?;
        let created = ctx.execute_with_session(Some(session), |ctx| {
            ctx.create(primary.handle, template, None, Some(data), None, None)
        });
        flush(ctx, SessionHandle::from(session).into());
        let created = created.map_err(self.err(Op::Create))?;
        Ok(TpmBlob {
            primary: primary.fingerprint,
            pcrs,
            public: created
                .out_public
                .marshall()
                .map_err(self.err(Op::Create))?,
            private: created.out_private.value().to_vec(),
        })
    }

    fn unseal_under(
        &self,
        ctx: &mut Context,
        primary: &Primary,
        blob: &TpmBlob,
        public: Public,
        private: Private,
    ) -> Result<Key256, SealError> {
        if primary.fingerprint != blob.primary {
            return Err(SealError::ForeignBlob {
                detail: format!(
                    "it was sealed under storage key {}, this TPM's is {} (or this TPM was cleared since)",
                    short_hex(&blob.primary),
                    short_hex(&primary.fingerprint)
                ),
            });
        }
        let object = ctx
            .execute_with_nullauth_session(|ctx| ctx.load(primary.handle, private, public))
            .map_err(self.err(Op::Load))?;
        let result = self.unseal_object(ctx, primary, object, blob);
        flush(ctx, object.into());
        result
    }

    fn unseal_object(
        &self,
        ctx: &mut Context,
        primary: &Primary,
        object: KeyHandle,
        blob: &TpmBlob,
    ) -> Result<Key256, SealError> {
        // Compare first, so that the error names the PCRs that changed
        // rather than the TPM's bare "policy failed".
        if let Some(rec) = &blob.pcrs {
            let now = read_pcrs(ctx, &rec.policy, &self.tcti)?;
            if let Some(reason) = describe_changes(rec, &now) {
                return Err(SealError::PolicyCheckFailed { reason });
            }
        }
        let kind = match blob.pcrs {
            Some(_) => SessionType::Policy,
            None => SessionType::Hmac,
        };
        // `encrypt`: the key travels back from the TPM encrypted.
        let session = salted_session(
            ctx,
            primary.handle,
            kind,
            SessionAttributesBuilder::new().with_encrypt(true),
        )
        .map_err(self.err(Op::StartSession))?;
        let result = self.unseal_in_session(ctx, session, object, blob);
        flush(ctx, SessionHandle::from(session).into());
        result
    }

    fn unseal_in_session(
        &self,
        ctx: &mut Context,
        session: AuthSession,
        object: KeyHandle,
        blob: &TpmBlob,
    ) -> Result<Key256, SealError> {
        if let Some(rec) = &blob.pcrs {
            let policy_session =
                PolicySession::try_from(session).map_err(self.err(Op::PolicyPcr))?;
            let digest = Digest::try_from(pcr_digest(&rec.values).to_vec())
                .map_err(self.err(Op::PolicyPcr))?;
            let selection =
                selection(&rec.policy, &rec.policy.pcrs).map_err(self.err(Op::PolicyPcr))?;
            ctx.execute_without_session(|ctx| ctx.policy_pcr(policy_session, digest, selection))
                .map_err(self.err(Op::PolicyPcr))?;
        }
        // SensitiveData zeroizes its buffer when dropped, after the copy.
        let data = ctx
            .execute_with_session(Some(session), |ctx| ctx.unseal(object.into()))
            .map_err(self.err(Op::Unseal))?;
        Key256::from_slice(data.value()).ok_or_else(|| SealError::CorruptBlob {
            detail: format!(
                "the sealed object holds {} bytes, not a 32-byte key",
                data.len()
            ),
        })
    }

    fn read_info(&self) -> Result<Vec<(&'static str, String)>, SealError> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ctx = self.open()?;
        let mut prop = |tag| {
            ctx.get_tpm_property(tag)
                .map_err(|e| map_tss_error(Op::Capability, &self.tcti, e))
        };
        let manufacturer = prop(PropertyTag::Manufacturer)?.map(ascii_id);
        let fw1 = prop(PropertyTag::FirmwareVersion1)?;
        let fw2 = prop(PropertyTag::FirmwareVersion2)?;
        let mut vendor = Vec::new();
        for tag in [
            PropertyTag::VendorString1,
            PropertyTag::VendorString2,
            PropertyTag::VendorString3,
            PropertyTag::VendorString4,
        ] {
            vendor.extend(prop(tag)?.unwrap_or(0).to_be_bytes());
        }
        let vendor = ascii(&vendor);

        let mut info = Vec::new();
        if let Some(m) = manufacturer {
            info.push(("manufacturer", m));
        }
        if !vendor.is_empty() {
            info.push(("vendor", vendor));
        }
        if let (Some(fw1), Some(fw2)) = (fw1, fw2) {
            // The usual rendering (e.g. Windows' tpm.msc): four 16-bit parts.
            info.push((
                "firmware_version",
                format!(
                    "{}.{}.{}.{}",
                    fw1 >> 16,
                    fw1 & 0xFFFF,
                    fw2 >> 16,
                    fw2 & 0xFFFF
                ),
            ));
        }
        Ok(info)
    }
}

impl Sealer for TpmSealer {
    fn name(&self) -> &'static str {
        "tpm"
    }

    fn is_hardware_backed(&self) -> bool {
        true
    }

    fn seal(&self, key: &Key256) -> Result<SealedBlob, SealError> {
        let blob = self.with_primary(None, |ctx, primary| self.seal_under(ctx, primary, key))?;
        Ok(SealedBlob {
            backend: self.name().to_owned(),
            bytes: blob.encode()?,
        })
    }

    fn unseal(&self, sealed: &SealedBlob) -> Result<Key256, SealError> {
        check_backend(self, sealed)?;
        // Everything that can be checked without the TPM is checked first.
        let blob = TpmBlob::decode(&sealed.bytes)?;
        let corrupt = |what: &str, e: tss_esapi::Error| SealError::CorruptBlob {
            detail: format!("{what}: {e}"),
        };
        let public = Public::unmarshall(&blob.public).map_err(|e| corrupt("public area", e))?;
        let private =
            Private::try_from(blob.private.clone()).map_err(|e| corrupt("private area", e))?;
        let expected_policy = blob
            .pcrs
            .as_ref()
            .map(|rec| rec.policy.policy_digest(&rec.values).to_vec())
            .unwrap_or_default();
        if public.auth_policy().value() != expected_policy.as_slice() {
            return Err(SealError::CorruptBlob {
                detail: "the recorded PCR values do not match the sealed object's policy".into(),
            });
        }
        let sealed_with = blob.pcrs.as_ref().map(|rec| &rec.policy);
        if sealed_with != self.pcrs.as_ref() {
            tracing::warn!(
                sealed_with = %sealed_with.map_or_else(|| "none".to_owned(), ToString::to_string),
                configured = %self.policy_name(),
                "the key is sealed with another PCR policy than the configured one (--tpm-pcrs); a node applies the configured one with `kmsctl local reseal`, the central service when it restores a `kmsctl backup` with it"
            );
        }
        if !public.object_attributes().no_da() {
            tracing::info!("the key was sealed before edgekms set noDA (dictionary-attack exemption) on it; on a node, `kmsctl local reseal` seals it again with noDA");
        }
        self.with_primary(Some(&blob.primary), |ctx, primary| {
            self.unseal_under(ctx, primary, &blob, public, private)
        })
    }

    fn describe_sealed(&self, sealed: &SealedBlob) -> SealerInfo {
        let mut info = SealerInfo::new();
        let public = TpmBlob::decode(&sealed.bytes)
            .ok()
            .and_then(|blob| Public::unmarshall(&blob.public).ok());
        if let Some(public) = public {
            let attrs = public.object_attributes();
            info.insert("sealed_object_noda".into(), yes_no(attrs.no_da()));
            info.insert(
                "sealed_object_attributes".into(),
                describe_attributes(attrs),
            );
        }
        let last = *self
            .last_primary
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(template) = last {
            info.insert("storage_key_noda".into(), yes_no(template.no_da()));
        }
        info
    }

    fn info(&self) -> SealerInfo {
        let mut info = SealerInfo::from([
            ("backend".to_owned(), "tpm".to_owned()),
            ("tcti".to_owned(), self.tcti.clone()),
            ("hardware_backed".to_owned(), "true".to_owned()),
            ("pcr_policy".to_owned(), self.policy_name()),
        ]);
        match self.read_info() {
            Ok(facts) => info.extend(facts.into_iter().map(|(k, v)| (k.to_owned(), v))),
            Err(e) => {
                info.insert("error".to_owned(), e.to_string());
            }
        }
        info
    }
}

/// Parses a TCTI string, refusing what tss-esapi 7.7 would silently
/// misread.
fn parse_tcti(tcti: &str) -> Result<TctiNameConf, SealError> {
    let conf = TctiNameConf::from_str(tcti).map_err(|_| {
        SealError::Config(format!(
            "TPM TCTI {tcti:?} is not valid: expected device:<path> (default {}), swtpm:host=<host>,port=<port>, mssim:host=<host>,port=<port> or tabrmd:<options>",
            super::DEFAULT_TCTI
        ))
    })?;
    // The swtpm and mssim parsers keep host= and port= and drop anything
    // else: `swtpm:path=/run/tpm.sock` would quietly mean localhost:2321.
    if let TctiNameConf::Swtpm(_) | TctiNameConf::Mssim(_) = conf {
        let options = tcti.split_once(':').map_or("", |(_, o)| o);
        if let Some(bad) = options
            .split(',')
            .filter(|o| !o.is_empty())
            .find(|o| !(o.starts_with("host=") || o.starts_with("port=")))
        {
            return Err(SealError::Config(format!(
                "TPM TCTI {tcti:?}: option {bad:?} is not supported (only host= and port=; for swtpm use --server type=tcp)"
            )));
        }
    }
    Ok(conf)
}

/// The storage primary: the template of `tpm2_createprimary -C o -G ecc`
/// (ECC NIST P-256, AES-128-CFB for children, restricted decryption),
/// with noDA when `no_da` (see [`PrimaryTemplate`]).
///
/// noDA: its auth is empty, so dictionary-attack protection guards nothing
/// and only lets any local user who can fail an authorization lock the KMS
/// out of its own key.
fn primary_template(no_da: bool) -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(no_da)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A sealed data object: the TPM stores the bytes and hands them back only
/// to Unseal, and only under this parent on this TPM (fixedTPM,
/// fixedParent). With a PCR record, only the matching policy authorises it.
/// noDA: its auth is empty (and with a PCR policy not used at all), so
/// dictionary-attack lockout protects nothing and would only let a local
/// user lock the KMS out.
fn sealed_object_template(pcrs: Option<&PcrRecord>) -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(pcrs.is_none())
        .with_no_da(true)
        .build()?;
    let builder = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default());
    match pcrs {
        None => builder.build(),
        Some(rec) => builder
            .with_auth_policy(Digest::try_from(
                rec.policy.policy_digest(&rec.values).to_vec(),
            )?)
            .build(),
    }
}

/// Starts a session salted with the storage primary (so its key is known
/// only to us and the TPM), with AES-128-CFB parameter encryption as set
/// in `attributes`.
fn salted_session(
    ctx: &mut Context,
    primary: KeyHandle,
    kind: SessionType,
    attributes: SessionAttributesBuilder,
) -> tss_esapi::Result<AuthSession> {
    let session = ctx
        .start_auth_session(
            Some(primary),
            None,
            None,
            kind,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )?
        .ok_or(tss_esapi::Error::WrapperError(
            WrapperErrorKind::WrongValueFromTpm,
        ))?;
    let (set, mask) = attributes.with_continue_session(true).build();
    ctx.tr_sess_set_attributes(session, set, mask)?;
    Ok(session)
}

/// Flushes a transient object or session. A failure is only logged: the
/// handle stays registered and ESAPI retries when the context drops.
fn flush(ctx: &mut Context, handle: ObjectHandle) {
    if let Err(e) = ctx.flush_context(handle) {
        tracing::warn!(error = %e, "could not flush a TPM transient object (retried when the connection closes)");
    }
}

fn hashing_algorithm(bank: PcrBank) -> HashingAlgorithm {
    match bank {
        PcrBank::Sha1 => HashingAlgorithm::Sha1,
        PcrBank::Sha256 => HashingAlgorithm::Sha256,
        PcrBank::Sha384 => HashingAlgorithm::Sha384,
    }
}

fn selection(policy: &PcrPolicy, pcrs: &[u8]) -> tss_esapi::Result<PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|pcr| PcrSlot::try_from(1u32 << pcr))
        .collect::<tss_esapi::Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_size_of_select(PcrSelectSize::ThreeOctets)
        .with_selection(hashing_algorithm(policy.bank), &slots)
        .build()
}

/// Reads the policy's PCRs, one value per PCR in `policy.pcrs` order. A
/// TPM returns at most eight values per read, and nothing for a bank it
/// does not have.
fn read_pcrs(ctx: &mut Context, policy: &PcrPolicy, tcti: &str) -> Result<Vec<Vec<u8>>, SealError> {
    let err = |e| map_tss_error(Op::ReadPcrs, tcti, e);
    let alg = hashing_algorithm(policy.bank);
    let mut values: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    loop {
        let missing: Vec<u8> = policy
            .pcrs
            .iter()
            .copied()
            .filter(|p| !values.contains_key(p))
            .collect();
        if missing.is_empty() {
            break;
        }
        let (_, read, digests) = ctx
            .pcr_read(selection(policy, &missing).map_err(err)?)
            .map_err(err)?;
        let got: Vec<u8> = read
            .get_selections()
            .iter()
            .filter(|s| s.hashing_algorithm() == alg)
            .flat_map(|s| s.selected())
            .map(|slot| u32::from(slot).trailing_zeros() as u8)
            .collect();
        if got.is_empty() || got.len() != digests.len() {
            return Err(SealError::Config(format!(
                "PCR policy {policy}: this TPM returned no {} value for PCRs {missing:?} (is the {} bank allocated? see `tpm2_pcrread`)",
                policy.bank.name(),
                policy.bank.name()
            )));
        }
        for (pcr, digest) in got.into_iter().zip(digests.value()) {
            if !missing.contains(&pcr) || digest.len() != policy.bank.digest_len() {
                return Err(SealError::Tpm {
                    op: Op::ReadPcrs.name(),
                    detail: format!("unexpected value for PCR {pcr}"),
                });
            }
            values.insert(pcr, digest.value().to_vec());
        }
    }
    Ok(policy
        .pcrs
        .iter()
        .filter_map(|p| values.remove(p))
        .collect())
}

/// `Some("PCR 7 changed ...")` naming every PCR whose value differs from
/// the record, or `None` when all match.
fn describe_changes(rec: &PcrRecord, now: &[Vec<u8>]) -> Option<String> {
    let changed: Vec<(u8, &Vec<u8>, &Vec<u8>)> = rec
        .policy
        .pcrs
        .iter()
        .zip(rec.values.iter().zip(now))
        .filter(|(_, (was, is))| was != is)
        .map(|(pcr, (was, is))| (*pcr, was, is))
        .collect();
    if changed.is_empty() {
        return None;
    }
    let list = changed
        .iter()
        .map(|(pcr, _, _)| pcr.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let values = changed
        .iter()
        .map(|(pcr, was, is)| format!("PCR {pcr} was {}, now {}", short_hex(was), short_hex(is)))
        .collect::<Vec<_>>()
        .join("; ");
    let noun = if changed.len() == 1 { "PCR" } else { "PCRs" };
    Some(format!(
        "{noun} {list} changed since the key was sealed ({} bank: {values})",
        rec.policy.bank.name()
    ))
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// The attributes of a sealed object, as tpm2-tools names them.
fn describe_attributes(a: tss_esapi::attributes::ObjectAttributes) -> String {
    [
        (a.fixed_tpm(), "fixedtpm"),
        (a.st_clear(), "stclear"),
        (a.fixed_parent(), "fixedparent"),
        (a.sensitive_data_origin(), "sensitivedataorigin"),
        (a.user_with_auth(), "userwithauth"),
        (a.admin_with_policy(), "adminwithpolicy"),
        (a.no_da(), "noda"),
        (a.encrypted_duplication(), "encryptedduplication"),
        (a.restricted(), "restricted"),
        (a.decrypt(), "decrypt"),
        (a.sign_encrypt(), "sign"),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| *name)
    .collect::<Vec<_>>()
    .join("|")
}

fn short_hex(bytes: &[u8]) -> String {
    let full = hex::encode(bytes);
    match full.get(..16) {
        Some(head) if full.len() > 16 => format!("{head}…"),
        _ => full,
    }
}

/// A TPM property holding four ASCII characters (the manufacturer ID).
fn ascii_id(value: u32) -> String {
    ascii(&value.to_be_bytes())
}

/// Text packed in TPM properties, NULs and padding dropped.
fn ascii(bytes: &[u8]) -> String {
    bytes
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .map(|b| char::from(*b))
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcti_strings_are_checked() {
        assert!(parse_tcti("device:/dev/tpmrm0").is_ok());
        assert!(parse_tcti("swtpm:host=127.0.0.1,port=2321").is_ok());
        assert!(parse_tcti("swtpm:").is_ok());
        for bad in ["", "nonsense", "tpm:/dev/tpm0", "swtpm:port=x"] {
            match parse_tcti(bad) {
                Err(SealError::Config(msg)) => assert!(msg.contains("is not valid"), "{msg}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        match parse_tcti("swtpm:path=/run/swtpm.sock") {
            Err(SealError::Config(msg)) => {
                assert!(msg.contains("\"path=/run/swtpm.sock\""), "{msg}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn changes_are_described_by_pcr() {
        let rec = PcrRecord {
            policy: PcrPolicy::parse("sha256:0,2,7").unwrap(),
            values: vec![vec![0; 32], vec![2; 32], vec![7; 32]],
        };
        assert_eq!(describe_changes(&rec, &rec.values), None);
        let mut now = rec.values.clone();
        now[2][0] = 1;
        let one = describe_changes(&rec, &now).unwrap();
        assert!(one.starts_with("PCR 7 changed since the key was sealed (sha256 bank: PCR 7 was 0707070707070707…, now 0107070707070707…)"), "{one}");
        now[0][5] = 1;
        let two = describe_changes(&rec, &now).unwrap();
        assert!(two.starts_with("PCRs 0, 7 changed"), "{two}");
    }

    #[test]
    fn ascii_ids() {
        assert_eq!(ascii_id(u32::from_be_bytes(*b"IBM ")), "IBM");
        assert_eq!(ascii_id(u32::from_be_bytes(*b"MSFT")), "MSFT");
        assert_eq!(ascii_id(u32::from_be_bytes([b'S', b'W', 0, 0])), "SW");
        assert_eq!(ascii(b"SW  TPM \0\0\0\0"), "SW  TPM");
    }
}

#[cfg(test)]
mod proptests;

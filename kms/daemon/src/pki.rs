//! The central service's certificates: its CA, the server certificate, and
//! node and operator client certificates, plus who a certificate names.
//!
//! Identity lives in one URI SAN: `urn:edgekms:node:<cluster>:<node>` or
//! `urn:edgekms:operator:<name>`. A node's CSR says nothing the server
//! trusts: the server writes the identity from the join token.
//!
//! The CA pin (`--ca-hash sha256:<hex>`) is SHA-256 over the CA's
//! SubjectPublicKeyInfo, as `kubeadm join --discovery-token-ca-cert-hash`.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate signing request is invalid: {0}")]
    BadCsr(rcgen::Error),
    #[error("certificate is not valid DER X.509")]
    BadCertificate,
    #[error("--ca-hash must look like sha256:<64 hex digits>, not {0:?}")]
    BadPin(String),
}

/// Who a client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Node { cluster: String, node: String },
    Operator { name: String },
}

impl Identity {
    fn uri(&self) -> String {
        match self {
            Identity::Node { cluster, node } => format!("urn:edgekms:node:{cluster}:{node}"),
            Identity::Operator { name } => format!("urn:edgekms:operator:{name}"),
        }
    }

    fn parse_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("urn:edgekms:")?;
        if let Some(rest) = rest.strip_prefix("node:") {
            let (cluster, node) = rest.split_once(':')?;
            return Some(Identity::Node {
                cluster: cluster.to_owned(),
                node: node.to_owned(),
            });
        }
        rest.strip_prefix("operator:")
            .map(|name| Identity::Operator {
                name: name.to_owned(),
            })
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Node { cluster, node } => write!(f, "node {cluster}/{node}"),
            Identity::Operator { name } => write!(f, "operator {name}"),
        }
    }
}

/// The identity a (chain-verified) peer certificate names, if any.
pub fn identity_of(cert_der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => Identity::parse_uri(uri),
        _ => None,
    })
}

/// `sha256:<hex>` over the certificate's SubjectPublicKeyInfo.
pub fn spki_pin(cert_der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|_| PkiError::BadCertificate)?;
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(cert.public_key().raw))
    ))
}

/// Checks the form of a `--ca-hash` value and returns it normalized.
pub fn parse_pin(pin: &str) -> Result<String, PkiError> {
    let hex_part = pin
        .strip_prefix("sha256:")
        .ok_or_else(|| PkiError::BadPin(pin.to_owned()))?;
    if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PkiError::BadPin(pin.to_owned()));
    }
    Ok(format!("sha256:{}", hex_part.to_ascii_lowercase()))
}

/// SHA-256 of a certificate's DER, to recognise the one certificate a node
/// was issued.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// A private key in PKCS#8 DER, zeroized on drop, redacted in Debug.
pub struct PrivateKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey([redacted])")
    }
}

impl PrivateKey {
    pub fn from_der(der: Vec<u8>) -> Self {
        Self(Zeroizing::new(der))
    }

    pub fn der(&self) -> &[u8] {
        &self.0
    }

    fn key_pair(&self) -> Result<KeyPair, PkiError> {
        Ok(KeyPair::try_from(self.der())?)
    }

    /// PEM, for the operator's key.pem.
    pub fn pem(&self) -> Result<Zeroizing<String>, PkiError> {
        Ok(Zeroizing::new(self.key_pair()?.serialize_pem()))
    }
}

/// A certificate and its key.
#[derive(Debug)]
pub struct Issued {
    pub cert_der: Vec<u8>,
    pub key: PrivateKey,
}

fn new_key() -> Result<(KeyPair, PrivateKey), PkiError> {
    let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let der = PrivateKey::from_der(kp.serialize_der());
    Ok((kp, der))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "edgekms central CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, 3650);
    params
}

/// A new self-signed CA (ten years).
pub fn new_ca() -> Result<Issued, PkiError> {
    let (kp, key) = new_key()?;
    let cert = ca_params().self_signed(&kp)?;
    Ok(Issued {
        cert_der: cert.der().to_vec(),
        key,
    })
}

/// The CA, able to sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_der: Vec<u8>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca([redacted])")
    }
}

impl Ca {
    pub fn load(cert_der: &[u8], key: &PrivateKey) -> Result<Self, PkiError> {
        let issuer = Issuer::from_ca_cert_der(&cert_der.to_vec().into(), key.key_pair()?)?;
        Ok(Self {
            issuer,
            cert_der: cert_der.to_vec(),
        })
    }

    pub fn pin(&self) -> Result<String, PkiError> {
        spki_pin(&self.cert_der)
    }

    fn leaf_params(cn: &str, days: i64) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, days);
        params
    }

    /// The server's TLS certificate for these DNS names and IP addresses.
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, PkiError> {
        let mut params = Self::leaf_params("edgekms-server", 3650);
        for name in names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into()?),
            });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (kp, key) = new_key()?;
        let cert = params.signed_by(&kp, &self.issuer)?;
        Ok(Issued {
            cert_der: cert.der().to_vec(),
            key,
        })
    }

    /// An operator's client certificate, key made here (at `init`).
    pub fn issue_operator(&self, name: &str) -> Result<Issued, PkiError> {
        let mut params = Self::leaf_params(&format!("edgekms operator {name}"), 825);
        params.subject_alt_names.push(SanType::URI(
            Identity::Operator {
                name: name.to_owned(),
            }
            .uri()
            .try_into()?,
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (kp, key) = new_key()?;
        let cert = params.signed_by(&kp, &self.issuer)?;
        Ok(Issued {
            cert_der: cert.der().to_vec(),
            key,
        })
    }

    /// Signs a node's CSR. Only the CSR's public key is used: the identity
    /// comes from the join token.
    pub fn sign_node_csr(
        &self,
        csr_der: &[u8],
        cluster: &str,
        node: &str,
    ) -> Result<Vec<u8>, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(PkiError::BadCsr)?;
        let mut params = Self::leaf_params(&format!("edgekms node {cluster}/{node}"), 3650);
        params.subject_alt_names.push(SanType::URI(
            Identity::Node {
                cluster: cluster.to_owned(),
                node: node.to_owned(),
            }
            .uri()
            .try_into()?,
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.der().to_vec())
    }
}

/// A node's TLS key and its certificate signing request.
pub fn node_key_and_csr() -> Result<(PrivateKey, Vec<u8>), PkiError> {
    let (kp, key) = new_key()?;
    let params = Ca::leaf_params("edgekms node", 1);
    let csr = params.serialize_request(&kp)?;
    Ok((key, csr.der().to_vec()))
}

/// PEM of a DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The first PEM block labelled `label`, as DER.
pub fn pem_decode(label: &str, text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let body: String = text[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificate_names_the_token_identity_not_the_csr() {
        let ca_issued = new_ca().unwrap();
        let ca = Ca::load(&ca_issued.cert_der, &ca_issued.key).unwrap();
        let (_key, csr) = node_key_and_csr().unwrap();
        let cert = ca.sign_node_csr(&csr, "a", "n1").unwrap();
        assert_eq!(
            identity_of(&cert),
            Some(Identity::Node {
                cluster: "a".into(),
                node: "n1".into()
            })
        );
        let op = ca.issue_operator("admin").unwrap();
        assert_eq!(
            identity_of(&op.cert_der),
            Some(Identity::Operator {
                name: "admin".into()
            })
        );
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        assert_eq!(identity_of(&server.cert_der), None);
        assert!(ca.sign_node_csr(b"garbage", "a", "n1").is_err());
    }

    #[test]
    fn pins() {
        let ca = new_ca().unwrap();
        let pin = spki_pin(&ca.cert_der).unwrap();
        assert_eq!(
            parse_pin(&pin.to_uppercase().replace("SHA256", "sha256")).unwrap(),
            pin
        );
        assert!(parse_pin("sha256:abc").is_err());
        assert!(parse_pin(&pin.replace("sha256:", "md5:")).is_err());
        assert_ne!(pin, spki_pin(&new_ca().unwrap().cert_der).unwrap());
    }

    #[test]
    fn pem_round_trip_and_redaction() {
        let ca = new_ca().unwrap();
        let pem = cert_pem(&ca.cert_der);
        assert_eq!(pem_decode("CERTIFICATE", &pem).unwrap(), ca.cert_der);
        assert!(format!("{:?}", ca.key).contains("redacted"));
        assert!(ca.key.pem().unwrap().contains("PRIVATE KEY"));
    }
}

#[cfg(test)]
mod proptests;

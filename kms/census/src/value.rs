//! What a stored value is under, from its bytes alone: the prefixes
//! kube-apiserver's encryption transformers write, and the KMS v2
//! `EncryptedObject` after ours. Pure; never panics on any bytes.
//!
//! kube-apiserver writes (k8s.io/apiserver/pkg/storage/value/encrypt):
//!
//! | prefix | provider |
//! | --- | --- |
//! | `k8s:enc:kms:v2:NAME:` then an `EncryptedObject` (protobuf) | KMS v2 |
//! | `k8s:enc:kms:v1:NAME:` | KMS v1 |
//! | `k8s:enc:aescbc:v1:KEY:`, `k8s:enc:aesgcm:v1:KEY:`, `k8s:enc:secretbox:v1:KEY:` | local keys |
//! | `k8s\x00` (protobuf) or `{` (JSON) | identity: not encrypted |

use prost::Message;

/// The prefix of every value an encryption transformer wrote.
const ENC: &[u8] = b"k8s:enc:";
/// A provider or key name is at most this long in a prefix we name; longer
/// (or no closing `:`) is counted as unrecognised.
const MAX_NAME: usize = 253;
/// kube-apiserver's KMS v2 limit on a key_id (validateKeyID: 1 KiB).
pub const MAX_KEY_ID: usize = 1024;
/// Values longer than this are not parsed (etcd's default request limit is
/// 1.5 MiB): an `EncryptedObject` this large is counted unreadable.
pub const MAX_VALUE: usize = 16 << 20;

/// KMS v2's `EncryptedObject` (k8s.io/kms/apis/v2 and apiserver's
/// envelope/kmsv2/v2 api.proto), field numbers identical.
#[derive(Clone, PartialEq, Message)]
pub struct EncryptedObject {
    #[prost(bytes = "vec", tag = "1")]
    pub encrypted_data: Vec<u8>,
    #[prost(string, tag = "2")]
    pub key_id: String,
    #[prost(bytes = "vec", tag = "3")]
    pub encrypted_dek_source: Vec<u8>,
    #[prost(map = "string, bytes", tag = "4")]
    pub annotations: std::collections::HashMap<String, Vec<u8>>,
    #[prost(int32, tag = "5")]
    pub encrypted_dek_source_type: i32,
}

/// What one stored value is under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// Our provider's prefix and an `EncryptedObject` naming this key_id.
    Under(String),
    /// Our provider's prefix, but no `EncryptedObject` with a key_id after it.
    Unreadable,
    /// Not encrypted: protobuf (`k8s\x00`) or JSON (`{`).
    Identity,
    /// Another provider or format: `kms:v2:NAME`, `kms:v1:NAME`,
    /// `aescbc:v1:KEY`, `aesgcm:v1:KEY`, `secretbox:v1:KEY`, or
    /// `unrecognised` (none of the formats above).
    Other(String),
}

/// The label of values that match no format kube-apiserver writes.
pub const UNRECOGNISED: &str = "unrecognised";

/// Classifies `value` for the KMS v2 provider named `provider`.
pub fn classify(value: &[u8], provider: &str) -> Class {
    if value.starts_with(b"k8s\x00") || value.first() == Some(&b'{') {
        return Class::Identity;
    }
    let Some(rest) = value.strip_prefix(ENC) else {
        return Class::Other(UNRECOGNISED.into());
    };
    let Some((kind, rest)) = field(rest) else {
        return Class::Other(UNRECOGNISED.into());
    };
    let Some((version, rest)) = field(rest) else {
        return Class::Other(UNRECOGNISED.into());
    };
    let known = matches!(
        (kind, version),
        ("kms", "v2") | ("kms", "v1") | ("aescbc", "v1") | ("aesgcm", "v1") | ("secretbox", "v1")
    );
    let Some((name, body)) = field(rest).filter(|_| known) else {
        return Class::Other(UNRECOGNISED.into());
    };
    if kind == "kms" && version == "v2" && name == provider {
        return match key_id(body) {
            Some(id) => Class::Under(id),
            None => Class::Unreadable,
        };
    }
    Class::Other(format!("{kind}:{version}:{name}"))
}

/// The key_id of an `EncryptedObject`, as kube-apiserver would accept it
/// (non-empty, at most [`MAX_KEY_ID`] bytes), or `None`.
pub fn key_id(body: &[u8]) -> Option<String> {
    if body.len() > MAX_VALUE {
        return None;
    }
    let object = EncryptedObject::decode(body).ok()?;
    (!object.key_id.is_empty() && object.key_id.len() <= MAX_KEY_ID).then_some(object.key_id)
}

/// The text before the next `:` (at most [`MAX_NAME`] bytes, non-empty,
/// UTF-8, no control characters), and what follows that `:`.
fn field(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let end = bytes.iter().take(MAX_NAME + 1).position(|&b| b == b':')?;
    let name = std::str::from_utf8(&bytes[..end]).ok()?;
    if name.is_empty() || name.chars().any(char::is_control) {
        return None;
    }
    Some((name, &bytes[end + 1..]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn kms_v2(provider: &str, key_id: &str) -> Vec<u8> {
        let object = EncryptedObject {
            encrypted_data: vec![1, 2, 3],
            key_id: key_id.into(),
            encrypted_dek_source: vec![4; 32],
            annotations: [("a.example.com".to_string(), b"x".to_vec())].into(),
            encrypted_dek_source_type: 1,
        };
        let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
        v.extend(object.encode_to_vec());
        v
    }

    #[test]
    fn ours_by_key_id() {
        assert_eq!(
            classify(&kms_v2("edgekms", "kid-1"), "edgekms"),
            Class::Under("kid-1".into())
        );
    }

    #[test]
    fn another_kms_v2_provider_is_other() {
        assert_eq!(
            classify(&kms_v2("vault", "kid-1"), "edgekms"),
            Class::Other("kms:v2:vault".into())
        );
        // A provider whose name starts with ours is not ours.
        assert_eq!(
            classify(&kms_v2("edgekms2", "kid-1"), "edgekms"),
            Class::Other("kms:v2:edgekms2".into())
        );
    }

    #[test]
    fn other_formats() {
        for (value, label) in [
            (&b"k8s:enc:aescbc:v1:key1:\x01\x02"[..], "aescbc:v1:key1"),
            (b"k8s:enc:aesgcm:v1:k:xyz", "aesgcm:v1:k"),
            (b"k8s:enc:secretbox:v1:s1:", "secretbox:v1:s1"),
            (b"k8s:enc:kms:v1:old:abc", "kms:v1:old"),
            (b"k8s:enc:rot13:v1:x:abc", UNRECOGNISED),
            (b"k8s:enc:kms:v2", UNRECOGNISED),
            (b"k8s:enc:kms:v2:", UNRECOGNISED),
            (b"k8s:enc:", UNRECOGNISED),
            (b"hello", UNRECOGNISED),
            (b"", UNRECOGNISED),
        ] {
            assert_eq!(
                classify(value, "edgekms"),
                Class::Other(label.into()),
                "{value:?}"
            );
        }
    }

    #[test]
    fn identity() {
        assert_eq!(classify(b"k8s\x00\x0a\x0fv1", "edgekms"), Class::Identity);
        assert_eq!(
            classify(b"{\"kind\":\"Secret\"}", "edgekms"),
            Class::Identity
        );
    }

    #[test]
    fn ours_but_unreadable() {
        for body in [
            &b""[..],
            b"\xff\xff\xff",
            b"\x12\x05ab",       // key_id's length runs past the end
            b"\x0a\x02ab",       // no key_id
            b"\x12\x02\xff\xfe", // key_id not UTF-8
        ] {
            let mut v = b"k8s:enc:kms:v2:edgekms:".to_vec();
            v.extend_from_slice(body);
            assert_eq!(classify(&v, "edgekms"), Class::Unreadable, "{body:?}");
        }
        let long = "k".repeat(MAX_KEY_ID + 1);
        assert_eq!(
            classify(&kms_v2("edgekms", &long), "edgekms"),
            Class::Unreadable
        );
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(edgekms_testkit::proptest_policy::config(512))]

            /// Any bytes at all, after any prefix: a class, never a panic.
            #[test]
            fn never_panics(prefix in prop::sample::select(vec![
                    "", "k8s:enc:", "k8s:enc:kms:v2:", "k8s:enc:kms:v2:edgekms:", "k8s:enc:aescbc:v1:", "k8s\x00",
                ]), tail in prop::collection::vec(any::<u8>(), 0..512)) {
                let mut v = prefix.as_bytes().to_vec();
                v.extend(tail);
                let _ = classify(&v, "edgekms");
            }

            /// Any well-formed EncryptedObject of ours is counted under its key_id.
            #[test]
            fn round_trip(key_id in "[ -~]{1,64}", data in prop::collection::vec(any::<u8>(), 0..256),
                          dek in prop::collection::vec(any::<u8>(), 0..64), ty in 0i32..3) {
                let object = EncryptedObject { encrypted_data: data, key_id: key_id.clone(),
                    encrypted_dek_source: dek, annotations: Default::default(), encrypted_dek_source_type: ty };
                let mut v = b"k8s:enc:kms:v2:edgekms:".to_vec();
                v.extend(object.encode_to_vec());
                prop_assert_eq!(classify(&v, "edgekms"), Class::Under(key_id));
            }

            /// A flipped or truncated EncryptedObject is a key_id or unreadable, never a panic.
            #[test]
            fn damaged(key_id in "[a-z0-9-]{1,32}", cut in 0usize..200, flip in 0usize..200, bit in 0u8..8) {
                let mut v = kms_v2("edgekms", &key_id);
                let at = 23 + flip % (v.len() - 23);
                v[at] ^= 1 << bit;
                v.truncate(23 + cut.min(v.len() - 23));
                match classify(&v, "edgekms") {
                    Class::Under(_) | Class::Unreadable => {}
                    other => prop_assert!(false, "{:?}", other),
                }
            }
        }
    }
}

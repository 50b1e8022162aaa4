//! Standard Webhooks signing: `v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`.
//! Pure: no Postgres in here.

use base64::{engine::general_purpose::STANDARD, Engine};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Secrets follow the Standard Webhooks form: base64 key bytes, optionally
/// prefixed `whsec_`. Returns the key bytes, or why the secret is unusable.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = STANDARD.decode(b64).map_err(|e| format!("secret is not base64: {e}"))?;
    if key.len() < 16 || key.len() > 64 {
        return Err(format!("secret decodes to {} bytes; use 16 to 64 random bytes", key.len()));
    }
    Ok(key)
}

/// The value of the `webhook-signature` header for every key, newest
/// first, space-separated (Standard Webhooks: a receiver accepts the
/// request if any signature matches a key it knows). None without keys.
pub fn sign_all<'k>(keys: impl IntoIterator<Item = &'k [u8]>, msg_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let signatures: Vec<String> = keys.into_iter().map(|key| sign(key, msg_id, timestamp, body)).collect();
    (!signatures.is_empty()).then(|| signatures.join(" "))
}

/// One `v1,` signature.
fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from the Standard Webhooks specification's reference tests.
    #[test]
    fn matches_standard_webhooks_reference() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn every_key_signs_newest_first() {
        let new = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let old = vec![7u8; 32];
        let (id, ts, body) = ("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        let both = sign_all([new.as_slice(), old.as_slice()], id, ts, body).unwrap();
        assert_eq!(both, format!("{} {}", sign(&new, id, ts, body), sign(&old, id, ts, body)));
        assert_eq!(sign_all([new.as_slice()], id, ts, body).unwrap(), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(sign_all([], id, ts, body), None);
    }

    #[test]
    fn secret_forms() {
        assert!(decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(decode_secret("whsec_not base64!").unwrap_err().contains("not base64"));
        assert!(decode_secret("whsec_c2hvcnQ=").unwrap_err().contains("5 bytes"));
        assert!(decode_secret("").is_err());
    }
}

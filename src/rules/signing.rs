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

/// The value of the `webhook-signature` header.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
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
    fn secret_forms() {
        assert!(decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(decode_secret("whsec_not base64!").unwrap_err().contains("not base64"));
        assert!(decode_secret("whsec_c2hvcnQ=").unwrap_err().contains("5 bytes"));
        assert!(decode_secret("").is_err());
    }
}

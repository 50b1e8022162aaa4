//! A Standard Webhooks verifier written from the specification, independent
//! of the extension's own signing code.

use base64::{engine::general_purpose::STANDARD, Engine};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Verifies `webhook-signature` (space-separated `v1,<b64>` entries) for the
/// secret `whsec_<b64>`. Also rejects timestamps more than 5 minutes off.
pub fn verify(secret: &str, msg_id: &str, timestamp: &str, body: &[u8], signature_header: &str) -> Result<(), String> {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|e| format!("bad secret: {e}"))?;
    let ts: i64 = timestamp.parse().map_err(|_| "bad timestamp".to_string())?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    if (now - ts).abs() > 300 {
        return Err(format!("timestamp {ts} too far from now {now}"));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    let ok = signature_header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|sig| sig == expected);
    if ok {
        Ok(())
    } else {
        Err(format!("no matching v1 signature in {signature_header:?}"))
    }
}

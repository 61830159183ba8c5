//! Webhook signatures as Azure OpenAI sends them: the Standard Webhooks scheme
//! (https://www.standardwebhooks.com), which the `openai` Python SDK's
//! `client.webhooks.verify_signature` / `unwrap` checks (`openai/resources/webhooks.py`):
//!
//! - signed content: `{webhook-id}.{webhook-timestamp}.{body}`, the body's exact bytes;
//! - HMAC-SHA256 keyed with the bytes base64-decoded from the secret after `whsec_`;
//! - header `webhook-signature`: space-separated `v1,<base64>` entries (several while the
//!   sender rotates keys); one matching entry is enough;
//! - `webhook-timestamp` within 5 minutes of now, either way (the SDK's default tolerance).
//!
//! Pure logic: no I/O, the caller gives the time. Written over the `hmac` crate rather than
//! the `standardwebhooks` crate: `hmac`, `sha2` and `base64` are already in the tree (azure_core
//! uses them), the check is a few lines, and it takes several secrets at once (rotation on
//! our side), which that crate's `Webhook` does not.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::SigningKey;

/// The most a timestamp may differ from now, in seconds (the SDK's `tolerance=300`).
pub const TOLERANCE_SECS: i64 = 300;

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// Why a delivery is refused. Each message names what is wrong and never echoes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "no signing secret is configured (AZURE_OPENAI_WEBHOOK_SECRET): nothing can be verified"
    )]
    NoSecret,
    #[error("the `{0}` header is missing")]
    MissingHeader(&'static str),
    #[error("the `webhook-timestamp` header is not a whole number of seconds")]
    BadTimestamp,
    #[error(
        "the timestamp is {0} s old, more than the {TOLERANCE_SECS} s allowed (stale or replayed)"
    )]
    TooOld(i64),
    #[error("the timestamp is {0} s in the future, more than the {TOLERANCE_SECS} s allowed")]
    TooNew(i64),
    #[error("no `v1,` signature of the {0} given matches the body with any configured secret")]
    NoMatch(usize),
}

/// The headers a delivery carries, as text (`None` when absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// Checks a delivery; `Ok` carries its `webhook-id`.
pub fn verify<'a>(
    keys: &[SigningKey],
    headers: Headers<'a>,
    body: &[u8],
    now: i64,
) -> Result<&'a str, Refusal> {
    if keys.is_empty() {
        return Err(Refusal::NoSecret);
    }
    let id = headers.id.ok_or(Refusal::MissingHeader(ID_HEADER))?;
    let timestamp = headers
        .timestamp
        .ok_or(Refusal::MissingHeader(TIMESTAMP_HEADER))?;
    let signature = headers
        .signature
        .ok_or(Refusal::MissingHeader(SIGNATURE_HEADER))?;
    let at: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| Refusal::BadTimestamp)?;
    if now - at > TOLERANCE_SECS {
        return Err(Refusal::TooOld(now - at));
    }
    if at - now > TOLERANCE_SECS {
        return Err(Refusal::TooNew(at - now));
    }
    let given: Vec<Vec<u8>> = signature
        .split_whitespace()
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .collect();
    for key in keys {
        let mac = mac(key.bytes(), id, timestamp, body);
        // `verify_slice` compares in constant time (the `subtle` crate), so the time taken
        // tells an attacker nothing about how much of a forged signature was right.
        if given
            .iter()
            .any(|sig| mac.clone().verify_slice(sig).is_ok())
        {
            return Ok(id);
        }
    }
    Err(Refusal::NoMatch(signature.split_whitespace().count()))
}

/// The `webhook-signature` value a sender puts on a delivery (`v1,<base64>`): for the
/// emulator, which sends events, and for tests.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let tag = mac(key, id, timestamp, body).finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

fn mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000;

    fn key(text: &str) -> SigningKey {
        SigningKey::parse(text).unwrap()
    }

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> Headers<'a> {
        Headers {
            id: Some(id),
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    /// The Standard Webhooks specification's own example (its README, "Verifying"): this
    /// secret, id, timestamp and body give exactly this signature.
    #[test]
    fn the_standard_webhooks_example_verifies() {
        let k = key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            sign(
                k.bytes(),
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                "1614265330",
                body
            ),
            sig
        );
        let got = verify(
            &[k],
            headers("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", sig),
            body,
            1_614_265_330,
        );
        assert_eq!(got, Ok("msg_p5jXN8AQM9LWM0D4loKWxJek"));
    }

    #[test]
    fn one_changed_byte_or_a_wrong_secret_is_refused() {
        let k = key("whsec_a2V5LW9uZQ==");
        let body = br#"{"type":"batch.completed","data":{"id":"batch_1"}}"#;
        let ts = NOW.to_string();
        let sig = sign(k.bytes(), "evt_1", &ts, body);
        assert!(
            verify(
                std::slice::from_ref(&k),
                headers("evt_1", &ts, &sig),
                body,
                NOW
            )
            .is_ok()
        );

        let forged = br#"{"type":"batch.completed","data":{"id":"batch_2"}}"#;
        assert_eq!(
            verify(
                std::slice::from_ref(&k),
                headers("evt_1", &ts, &sig),
                forged,
                NOW
            ),
            Err(Refusal::NoMatch(1))
        );
        // The id and the timestamp are signed too.
        assert!(
            verify(
                std::slice::from_ref(&k),
                headers("evt_2", &ts, &sig),
                body,
                NOW
            )
            .is_err()
        );
        let other = key("whsec_a2V5LXR3bw==");
        assert!(verify(&[other], headers("evt_1", &ts, &sig), body, NOW).is_err());
        // Re-serialised JSON (a space) is not the bytes that were signed.
        let spaced = br#"{"type": "batch.completed","data":{"id":"batch_1"}}"#;
        assert!(verify(&[k], headers("evt_1", &ts, &sig), spaced, NOW).is_err());
    }

    #[test]
    fn any_listed_signature_and_any_configured_secret_may_match() {
        let old = key("whsec_a2V5LW9uZQ==");
        let new = key("whsec_a2V5LXR3bw==");
        let body = b"{}";
        let ts = NOW.to_string();
        let sig = format!("v1,AAAA v2,xyz {}", sign(new.bytes(), "evt_1", &ts, body));
        assert_eq!(
            verify(&[old, new], headers("evt_1", &ts, &sig), body, NOW),
            Ok("evt_1")
        );
    }

    #[test]
    fn stale_or_future_timestamps_are_refused_even_when_signed() {
        let k = key("whsec_a2V5LW9uZQ==");
        let body = b"{}";
        for (at, want) in [
            (NOW - 301, Err(Refusal::TooOld(301))),
            (NOW + 301, Err(Refusal::TooNew(301))),
            (NOW - 300, Ok("evt_1")),
            (NOW + 300, Ok("evt_1")),
        ] {
            let ts = at.to_string();
            let sig = sign(k.bytes(), "evt_1", &ts, body);
            assert_eq!(
                verify(
                    std::slice::from_ref(&k),
                    headers("evt_1", &ts, &sig),
                    body,
                    NOW
                ),
                want
            );
        }
    }

    #[test]
    fn missing_headers_or_secret_are_named() {
        let k = key("whsec_a2V5LW9uZQ==");
        assert_eq!(
            verify(&[], headers("a", "1", "v1,x"), b"", NOW),
            Err(Refusal::NoSecret)
        );
        let mut h = headers("a", "1", "v1,x");
        h.signature = None;
        assert_eq!(
            verify(std::slice::from_ref(&k), h, b"", NOW),
            Err(Refusal::MissingHeader("webhook-signature"))
        );
        assert_eq!(
            verify(&[k], headers("a", "soon", "v1,x"), b"", NOW),
            Err(Refusal::BadTimestamp)
        );
    }
}

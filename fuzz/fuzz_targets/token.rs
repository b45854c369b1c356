//! Fuzzes token parsing and validation. Half the inputs are taken as a token as they are (the
//! parser and signature check); the other half are a header and claims that the target signs
//! with the gateway's secret, so the checks after the signature (`crit`, `exp`, `nbf`, `iss`,
//! `aud`, the `channels` grants, the personal channel) see arbitrary JSON. Whatever the input,
//! this must never panic.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

/// Channels asked for: public, personal, granted-looking, and one of Redis's own.
fn channels() -> Vec<String> {
    ["news:1", "user:42", "orders:7", "__keyevent@0__:set"]
        .map(String::from)
        .to_vec()
}

/// `header.claims.signature`, signed with the gateway's HS256 secret.
fn signed(header: &[u8], claims: &[u8]) -> Option<String> {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let key = EncodingKey::from_secret(ssehub::fuzzing::TOKEN_SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).ok()?;
    Some(format!("{message}.{signature}"))
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        // Header and claims are separated by 0xFF, a byte that is never valid UTF-8.
        let mut parts = rest.splitn(2, |b| *b == 0xFF);
        let header = parts.next().unwrap_or_default();
        let claims = parts.next().unwrap_or_default();
        match signed(header, claims) {
            Some(token) => token,
            None => return,
        }
    };
    let _ = ssehub::fuzzing::authorize_token(&token, &channels());
});

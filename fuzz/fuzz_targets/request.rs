//! Fuzzes what `GET /events` does with untrusted input before touching the hub: the query
//! string, `Last-Event-ID`, `Authorization` and `Cookie` headers. It must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Fields are separated by 0xFF, a byte that is never valid UTF-8.
    let mut fields = data.split(|b| *b == 0xFF);
    let query = fields.next().map(String::from_utf8_lossy);
    let mut headers = http::HeaderMap::new();
    for name in ["last-event-id", "authorization", "cookie"] {
        if let Some(value) = fields.next() {
            if let Ok(value) = http::HeaderValue::from_bytes(value) {
                headers.insert(name, value);
            }
        }
    }
    let _ = ssehub::fuzzing::inspect_request(query.as_deref(), &headers);
});

//! Fuzzes the listener's head parser: the first bytes of every plain-text connection decide
//! whether the fast path, hyper or an error answer serves it, and a fast-path request is then
//! routed. Whatever a client sends, this must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ssehub::fuzzing::classify_head(data);
});

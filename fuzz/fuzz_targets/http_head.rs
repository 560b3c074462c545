//! The HTTP request head parser and the plain-HTTP request follower on
//! arbitrary bytes: no panic, no byte claimed that was not given, nothing
//! rewritten, and the same verdict whatever pieces the bytes come in (see
//! `front::http::testing::check`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    snigress::front::http::testing::check(data);
});

//! The PROXY protocol header parser on arbitrary bytes: it must never
//! panic, never claim bytes it was not given, ask for more on every proper
//! prefix of a header, and keep its verdict as more bytes come (see
//! `arrive::proxy::testing::check`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    snigress::arrive::proxy::testing::check(data);
});

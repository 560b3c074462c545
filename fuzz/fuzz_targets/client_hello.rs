//! The ClientHello reader on arbitrary bytes, whole and in pieces: it must
//! end in a result, never panic, never ask for more than its cap, and say
//! the same whatever the pieces (see `front::tls::testing::check_reader`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    snigress::front::tls::testing::check_reader(data);
});

//! The config loader on arbitrary text: an error or a config, never a
//! panic, and an error that stays small (see `config::testing::check_parse`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        snigress::config::testing::check_parse(text);
    }
});

//! cargo-fuzz target `index_decode`: see checks.rs for what it checks.
#![no_main]

#[path = "checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::index_decode(data));

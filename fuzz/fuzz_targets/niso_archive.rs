//! cargo-fuzz target `niso_archive`: see checks.rs for what it checks.
#![no_main]

#[path = "checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::niso_archive(data);
});

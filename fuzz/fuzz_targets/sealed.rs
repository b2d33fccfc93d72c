//! Fuzzes the payload parsers of the checksummed formats: the first byte picks
//! the format, the rest is wrapped with a valid checksum (the other targets
//! mostly stop at the checksum, which a fuzzer cannot forge).
#![no_main]

use freezeframe_core::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let name = fuzzing::SEALABLE[pick as usize % fuzzing::SEALABLE.len()];
    if let (Some(bytes), Some(decode)) = (fuzzing::seal(name, payload), fuzzing::decoder(name)) {
        let _ = decode(&bytes);
    }
});

//! Fuzzes freezeframe-core's peer message decoder: any bytes give a value or a typed error.
#![no_main]

use freezeframe_core::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::peer_message(data);
});

//! Fuzzes the writer socket's line parser.
#![no_main]

use freezeframe_netproto::writer::parse_writer_line;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = parse_writer_line(line);
    }
});

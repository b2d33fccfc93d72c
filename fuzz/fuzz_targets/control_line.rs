//! Fuzzes the control socket: the bounded line reader, then the request decoder.
#![no_main]

use freezeframe_netproto::control::{ControlRequest, LineReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = LineReader::new(data);
        for _ in 0..64 {
            match r.next_line(4096).await {
                Ok(Some(line)) => {
                    let _ = serde_json::from_str::<ControlRequest>(&line);
                }
                Ok(None) | Err(_) => break,
            }
        }
    });
});

//! Fuzzes netproto frames: in memory (`FrameCodec::decode`) and from a byte
//! stream (`FramedRecv`, which must never allocate past the codec's max_len).
#![no_main]

use freezeframe_netproto::{FrameCodec, FramedRecv};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for codec in [FrameCodec::CONTROL, FrameCodec::DATA] {
        let _ = codec.decode(data);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut rx = FramedRecv::new(data, FrameCodec::CONTROL);
        for _ in 0..16 {
            match rx.recv_frame().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    });
});

//! Properties of netproto's decoders, checked by proptest with a bounded
//! number of cases (CI runs them; `fuzz/` runs the same calls under
//! libFuzzer): frames (in memory and from a byte stream), writer lines and
//! control lines. Arbitrary bytes give a value or a typed error, never a
//! panic, and no single allocation exceeds the receiver's declared limit
//! (frame `max_len`, `MAX_WRITER_LINE`, the `max` of a line read) plus a
//! small constant: lengths are checked before anything is allocated for them.
//!
//! The "one flipped byte" property does not apply here: these formats carry
//! no checksum of their own (QUIC's AEAD authenticates every byte of the
//! wire; the local sockets do not corrupt), so a flipped letter is simply
//! another message.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use freezeframe_netproto::control::{ControlRequest, LineReader};
use freezeframe_netproto::writer::{parse_writer_line, MAX_WRITER_LINE};
use freezeframe_netproto::{FrameCodec, FramedRecv};
use proptest::prelude::*;

/// Slack over a declared limit for the decoder's own bookkeeping.
const SLACK: usize = 64 << 10;

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only records sizes in a const-initialised
// thread-local Cell (which never allocates).
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(layout.size())));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(new_size)));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|c| c.set(0));
    f();
    LARGEST.with(|c| c.get())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Bytes that start like a frame (so the length check is reached) more often than chance.
fn frame_like() -> impl Strategy<Value = Vec<u8>> {
    (
        1u8..=3,
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..512),
        any::<bool>(),
    )
        .prop_map(|(kind, len, rest, plausible)| {
            let mut b = vec![b'F', b'Z', 1, kind];
            let len = if plausible { len % 600 } else { len };
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&rest);
            b
        })
}

#[test]
fn the_allocation_tracker_sees_a_large_allocation() {
    // Proof the bound below can fail: the tracker does see big allocations.
    let big = largest_allocation(|| {
        let v = vec![1u8; 8 << 20];
        std::hint::black_box(&v);
    });
    assert!(big >= 8 << 20, "{big}");
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn frames_in_memory_give_a_frame_or_a_typed_error(
        bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..1024), frame_like()]
    ) {
        for codec in [FrameCodec::CONTROL, FrameCodec::DATA] {
            let big = largest_allocation(|| { let _ = codec.decode(&bytes); });
            prop_assert!(big <= bytes.len() + SLACK, "decode allocated {big} for {} bytes", bytes.len());
        }
    }

    #[test]
    fn frames_from_a_stream_never_allocate_past_max_len(
        bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..1024), frame_like()]
    ) {
        let codec = FrameCodec::CONTROL;
        let limit = (1usize << 20) + SLACK;
        let big = largest_allocation(|| {
            block_on(async {
                let mut rx = FramedRecv::new(&bytes[..], codec);
                // Read until the stream ends or breaks; each result is a frame or a typed error.
                for _ in 0..8 {
                    match rx.recv_frame().await {
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => break,
                    }
                }
            })
        });
        prop_assert!(big <= limit, "recv allocated {big}");
    }

    #[test]
    fn writer_lines_give_a_request_or_a_typed_error(
        line in prop_oneof![
            ".{0,300}",
            "\\{\"op\":\"(register|veto|ready|thawed|frozen|bye)\"(,\"[a-z_]{1,10}\":(\"[a-z]{0,6}\"|[0-9]{1,25}|null|true))*\\}",
        ],
        pad in 0usize..(2 * MAX_WRITER_LINE),
        long in any::<bool>(),
    ) {
        let input = if long { format!("{line}{}", " ".repeat(pad)) } else { line };
        let big = largest_allocation(|| {
            if let Err(e) = parse_writer_line(&input) {
                assert!(!e.is_empty(), "empty error");
            }
        });
        prop_assert!(big <= input.len() + SLACK, "writer line parse allocated {big}");
    }

    #[test]
    fn control_lines_give_a_request_or_a_typed_error_and_respect_max(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        json in "\\{\"op\":\"(status|snapshot_create|snapshot_list|events)\"(,\"[a-z_]{1,10}\":([0-9]{1,25}|null|\"x\"))*\\}\n",
        max in 1usize..2048,
    ) {
        for input in [bytes.as_slice(), json.as_bytes()] {
            let big = largest_allocation(|| {
                block_on(async {
                    let mut r = LineReader::new(input);
                    for _ in 0..64 {
                        match r.next_line(max).await {
                            Ok(Some(line)) => {
                                assert!(line.len() <= max);
                                let _ = serde_json::from_str::<ControlRequest>(&line);
                            }
                            Ok(None) => break,
                            Err(e) => assert!(!e.to_string().is_empty()),
                        }
                    }
                })
            });
            prop_assert!(big <= max.max(input.len()) + SLACK, "line reader allocated {big}");
        }
    }
}

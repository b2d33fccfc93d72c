//! Properties every decoder of freezeframe-core holds, checked by proptest
//! with a bounded number of cases (CI runs them; `fuzz/` runs the same entry
//! points unbounded under libFuzzer):
//!
//! - arbitrary bytes give a value or a typed error, never a panic;
//! - arbitrary *payloads* sealed with a valid checksum (so the payload parser
//!   runs, not just the checksum) give a value or a typed error;
//! - no single allocation exceeds [`ALLOC_LIMIT`] for inputs of at most
//!   64 KiB: length fields are checked against the data before allocating;
//! - a valid encoding of a checksummed format with any one byte flipped
//!   decodes to exactly the original value or fails.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use freezeframe_core::fuzzing::{self, Decoder};
use proptest::prelude::*;

/// Largest single allocation a decoder may make for the inputs here.
const ALLOC_LIMIT: usize = 4 << 20;

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

/// Runs `f` and returns the largest single allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|c| c.set(0));
    f();
    LARGEST.with(|c| c.get())
}

fn all_decoders() -> Vec<(&'static str, Decoder)> {
    fuzzing::CHECKSUMMED
        .iter()
        .chain(fuzzing::UNCHECKSUMMED)
        .copied()
        .collect()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
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

#[test]
fn every_sample_decodes() {
    for (name, bytes) in fuzzing::samples() {
        let (_, decode) = fuzzing::CHECKSUMMED
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a decoder for each sample");
        decode(&bytes).unwrap_or_else(|e| panic!("sample {name} does not decode: {e}"));
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_give_a_value_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        for (name, decode) in all_decoders() {
            let mut out = None;
            let big = largest_allocation(|| out = Some(decode(&bytes)));
            prop_assert!(big <= ALLOC_LIMIT, "{name}: allocated {big} bytes for {} input bytes", bytes.len());
            if let Some(Err(e)) = out {
                prop_assert!(!e.to_string().is_empty(), "{name}: empty error");
            }
        }
    }

    #[test]
    fn a_sample_with_its_length_fields_and_tail_mangled_fails_typed_and_bounded(
        which in 0usize..8,
        at in 0usize..64,
        value in any::<u32>(),
        cut in 0usize..256,
    ) {
        let samples = fuzzing::samples();
        let (name, mut bytes) = samples[which % samples.len()].clone();
        let (_, decode) = *fuzzing::CHECKSUMMED.iter().find(|(n, _)| *n == name).expect("decoder");
        // Overwrite 4 bytes near the start (where length and count fields live) with any value.
        let at = at.min(bytes.len().saturating_sub(4));
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let keep = bytes.len().saturating_sub(cut);
        bytes.truncate(keep);
        let big = largest_allocation(|| { let _ = decode(&bytes); });
        prop_assert!(big <= ALLOC_LIMIT, "{name}: allocated {big} bytes");
    }

    #[test]
    fn sealed_arbitrary_payloads_reach_the_payload_parsers_and_fail_typed(
        payload in proptest::collection::vec(any::<u8>(), 0..4096),
        json_like in "\\{\"[a-z_]{1,12}\":[0-9]{1,20}(,\"[a-z_]{1,12}\":(\\[\\]|[0-9]{1,20}|\"[a-z]{0,8}\"))*\\}",
    ) {
        // The same checksum the real files carry, around payloads no writer made.
        for p in [payload.as_slice(), json_like.as_bytes()] {
            for name in fuzzing::SEALABLE {
                let bytes = fuzzing::seal(name, p).expect("sealable");
                let decode = fuzzing::decoder(name).expect("decoder");
                let big = largest_allocation(|| { let _ = decode(&bytes); });
                prop_assert!(big <= ALLOC_LIMIT, "{name}: allocated {big} bytes");
            }
        }
    }

    #[test]
    fn one_flipped_byte_gives_the_original_value_or_an_error(pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
        for (name, bytes) in fuzzing::samples() {
            let (_, decode) = *fuzzing::CHECKSUMMED.iter().find(|(n, _)| *n == name).expect("decoder");
            let original = decode(&bytes).expect("sample decodes");
            let mut flipped = bytes.clone();
            let i = pos.index(flipped.len());
            flipped[i] ^= mask;
            if let Ok(v) = decode(&flipped) {
                prop_assert_eq!(v, original, "{}: flip of byte {} by {:#04x} decoded to other data", name, i, mask);
            }
        }
    }
}

#[test]
fn every_single_byte_flip_of_every_sample_gives_the_original_value_or_an_error() {
    // Exhaustive over positions (one mask per position), beside the random masks above.
    for (name, bytes) in fuzzing::samples() {
        let (_, decode) = *fuzzing::CHECKSUMMED
            .iter()
            .find(|(n, _)| *n == name)
            .expect("decoder");
        let original = decode(&bytes).expect("sample decodes");
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 1 << (i % 8);
            if let Ok(v) = decode(&flipped) {
                assert_eq!(
                    v, original,
                    "{name}: flip of byte {i} decoded to other data"
                );
            }
        }
    }
}

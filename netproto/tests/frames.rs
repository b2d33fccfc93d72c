//! The frame format against hostile and broken byte streams: limits are
//! enforced before allocation, garbage is an error, nothing panics, and a
//! stream that is merely carrying the wrong message type stays usable.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use freezeframe_netproto::frame::{FrameCodec, FramedRecv, FramedSend, HEADER_LEN, MAGIC, VERSION};
use freezeframe_netproto::{Error, Frame};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

/// Records the largest single allocation made by this test binary, so a
/// test can prove that a frame's announced length was never allocated.
struct Tracking;

static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Freeze {
    snapshot: u64,
    initiator: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Thaw {
    thaw_id: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct BlockHeader {
    index: u64,
    hash: String,
}

fn header(kind: u8, len: u32) -> Vec<u8> {
    let mut h = vec![MAGIC[0], MAGIC[1], VERSION, kind];
    h.extend_from_slice(&len.to_be_bytes());
    h
}

#[tokio::test]
async fn messages_bytes_and_blocks_roundtrip_over_a_unix_socket() {
    let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
    let mut tx = FramedSend::new(a, FrameCodec::DATA);
    let mut rx = FramedRecv::new(b, FrameCodec::DATA);
    let block = vec![7u8; 64 * 1024];
    let writer = tokio::spawn(async move {
        tx.send(&Freeze {
            snapshot: 9,
            initiator: "n1".into(),
        })
        .await
        .expect("send json");
        tx.send_bytes(b"raw").await.expect("send bytes");
        tx.send_with_data(
            &BlockHeader {
                index: 3,
                hash: "abc".into(),
            },
            &vec![7u8; 64 * 1024],
        )
        .await
        .expect("send block");
        tx.finish().await.expect("finish");
    });
    let m: Freeze = rx.recv().await.expect("json frame");
    assert_eq!(
        m,
        Freeze {
            snapshot: 9,
            initiator: "n1".into()
        }
    );
    assert_eq!(rx.recv_bytes().await.expect("binary frame"), b"raw");
    let (h, data): (BlockHeader, Vec<u8>) = rx.recv_with_data().await.expect("json+binary frame");
    assert_eq!(
        h,
        BlockHeader {
            index: 3,
            hash: "abc".into()
        }
    );
    assert_eq!(data, block);
    assert!(rx.recv_opt::<Freeze>().await.expect("clean end").is_none());
    writer.await.expect("writer task");
}

#[tokio::test]
async fn a_header_announcing_a_huge_payload_is_refused_before_anything_is_allocated() {
    let (mut a, b) = tokio::io::duplex(1024);
    let mut rx = FramedRecv::new(b, FrameCodec::CONTROL);
    // 3 GiB announced; the payload never follows and the writer stays open,
    // so a receiver that waited for the payload would hang here.
    a.write_all(&header(1, 3 << 30))
        .await
        .expect("write header");
    let before = LARGEST_ALLOC.load(Ordering::Relaxed);
    let err = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv::<Freeze>())
        .await
        .expect("refused at once, without waiting for the payload")
        .expect_err("oversized frame must be refused");
    assert!(
        matches!(err, Error::FrameTooLarge { len, max, .. } if len == 3 << 30 && max == 1 << 20),
        "{err}"
    );
    assert!(err.is_protocol_violation());
    let largest = LARGEST_ALLOC.load(Ordering::Relaxed).max(before);
    assert!(
        largest < 64 << 20,
        "something allocated {largest} bytes for a refused frame"
    );
    // The stream is now out of sync; it says so instead of misreading.
    assert!(matches!(
        rx.recv::<Freeze>().await,
        Err(Error::StreamBroken { .. })
    ));
    drop(a);
}

#[tokio::test]
async fn a_sender_refuses_to_send_what_its_limit_forbids() {
    let (a, _b) = tokio::io::duplex(1024);
    let mut tx = FramedSend::new(a, FrameCodec::new(16));
    let err = tx.send_bytes(&[0u8; 17]).await.expect_err("17 > 16");
    assert!(
        matches!(
            err,
            Error::FrameTooLarge {
                len: 17,
                max: 16,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn garbage_bytes_are_an_error_not_a_panic() {
    let inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 3],
        {
            let mut v = header(1, 5);
            v[2] = VERSION + 1; // a future version
            v.extend_from_slice(b"{}{}{");
            v
        },
        {
            let mut v = header(9, 0); // unknown kind
            v.push(0);
            v
        },
        {
            let mut v = header(1, 10); // truncated payload
            v.extend_from_slice(b"{\"a\"");
            v
        },
        {
            let mut v = header(3, 6); // json+binary whose json length overruns
            v.extend_from_slice(&100u32.to_be_bytes());
            v.extend_from_slice(b"{}");
            v
        },
        {
            let mut v = header(3, 2); // json+binary too short for its json length
            v.extend_from_slice(b"{}");
            v
        },
        b"FZ".to_vec(), // a header cut short
    ];
    for input in inputs {
        let mut rx = FramedRecv::new(&input[..], FrameCodec::CONTROL);
        let got = rx.recv::<Freeze>().await;
        assert!(got.is_err(), "input {input:?} decoded to {got:?}");
        assert!(
            FrameCodec::CONTROL.decode(&input).is_err(),
            "in-memory decode of {input:?}"
        );
    }
}

#[tokio::test]
async fn seeded_random_bytes_never_panic_the_decoder() {
    // A small xorshift so the corpus is the same on every run.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let valid = FrameCodec::CONTROL
        .encode_json(&Freeze {
            snapshot: 1,
            initiator: "n1".into(),
        })
        .expect("encode");
    for round in 0..2000 {
        let mut bytes = if round % 2 == 0 {
            valid.clone()
        } else {
            vec![0u8; (next() % 64) as usize]
        };
        for _ in 0..(next() % 4 + 1) {
            if bytes.is_empty() {
                break;
            }
            let i = (next() as usize) % bytes.len();
            bytes[i] = next() as u8;
        }
        let _ = FrameCodec::CONTROL.decode(&bytes);
        let mut rx = FramedRecv::new(&bytes[..], FrameCodec::CONTROL);
        let _ = rx.recv::<Freeze>().await;
    }
}

#[tokio::test]
async fn a_message_of_the_wrong_type_is_an_error_but_the_stream_stays_in_sync() {
    let (a, b) = tokio::io::duplex(4096);
    let mut tx = FramedSend::new(a, FrameCodec::CONTROL);
    let mut rx = FramedRecv::new(b, FrameCodec::CONTROL);
    tx.send(&Thaw { thaw_id: 4 }).await.expect("send thaw");
    tx.send_bytes(b"data").await.expect("send bytes");
    tx.send(&Freeze {
        snapshot: 5,
        initiator: "n2".into(),
    })
    .await
    .expect("send freeze");
    let err = rx
        .recv::<Freeze>()
        .await
        .expect_err("a thaw is not a freeze");
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    let err = rx
        .recv::<Freeze>()
        .await
        .expect_err("binary where json expected");
    assert!(matches!(err, Error::UnexpectedKind { .. }), "{err}");
    assert!(!rx.is_broken());
    let m: Freeze = rx.recv().await.expect("next message still readable");
    assert_eq!(m.snapshot, 5);
}

#[test]
fn the_header_is_eight_bytes_magic_version_kind_length() {
    let frame = FrameCodec::CONTROL
        .encode_json(&Thaw { thaw_id: 1 })
        .expect("encode");
    let json = br#"{"thaw_id":1}"#;
    assert_eq!(HEADER_LEN, 8);
    assert_eq!(&frame[..8], &header(1, json.len() as u32)[..]);
    assert_eq!(&frame[8..], json);
    assert_eq!(
        FrameCodec::CONTROL.decode(&frame).expect("decode"),
        Frame::Json(json.to_vec())
    );
}

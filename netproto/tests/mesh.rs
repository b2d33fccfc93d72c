//! Nodes on real QUIC over 127.0.0.1: who gets in, what they can say, and
//! how fast a lost peer is noticed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freezeframe_netproto::frame::{FrameCodec, MAGIC, VERSION};
use freezeframe_netproto::{
    CaCertificate, ClusterCa, EndpointOptions, Error, MemberList, NodeIdentity, PeerEndpoint,
};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;

const LOOPBACK: &str = "127.0.0.1:0";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Msg {
    FreezeNotice { snapshot: u64 },
    Frozen { snapshot: u64, node: String },
}

/// A cluster CA and the identities it issued.
struct Cluster {
    ca: ClusterCa,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        Cluster {
            ca: ClusterCa::generate(name).expect("generate CA"),
        }
    }

    fn node(&self, name: &str) -> NodeIdentity {
        self.ca
            .issue_node(name, &["127.0.0.1".to_string()])
            .expect("issue node certificate")
    }

    fn ca_cert(&self) -> CaCertificate {
        self.ca.certificate().clone()
    }

    fn bind(&self, name: &str, members: &[&str]) -> PeerEndpoint {
        PeerEndpoint::bind(
            addr(LOOPBACK),
            &self.node(name),
            &self.ca.certificate().clone(),
            MemberList::new(members.iter().copied()),
        )
        .expect("bind endpoint")
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn local(ep: &PeerEndpoint) -> SocketAddr {
    ep.local_addr().expect("local addr")
}

/// Waits for the next refusal the endpoint reports.
async fn next_refusal(
    ep: &mut tokio::sync::broadcast::Receiver<freezeframe_netproto::Refusal>,
) -> freezeframe_netproto::Refusal {
    tokio::time::timeout(Duration::from_secs(5), ep.recv())
        .await
        .expect("a refusal within 5 s")
        .expect("refusal channel open")
}

#[tokio::test]
async fn two_nodes_of_one_ca_exchange_typed_messages_both_ways() {
    let c = Cluster::new("alpha");
    let n1 = c.bind("n1", &["n1", "n2"]);
    let n2 = c.bind("n2", &["n1", "n2"]);
    assert!(
        n1.dials("n2") && !n2.dials("n1"),
        "exactly one side of a pair dials"
    );

    let (dialed, accepted) = tokio::join!(n1.connect(local(&n2), "n2"), n2.accept());
    let to_n2 = dialed.expect("n1 connects to n2");
    let to_n1 = accepted.expect("n2 accepts n1");
    assert_eq!(to_n2.peer_name(), "n2");
    assert_eq!(
        to_n1.peer_name(),
        "n1",
        "the name comes from n1's verified certificate"
    );

    // n1 -> n2 on a stream n1 opens, answer on the same stream.
    let (mut send, mut recv) = to_n2.open_bi().await.expect("open stream");
    send.send(&Msg::FreezeNotice { snapshot: 7 })
        .await
        .expect("send notice");
    let (mut back, mut inbox) = to_n1.accept_bi().await.expect("accept stream");
    assert_eq!(
        inbox.recv::<Msg>().await.expect("notice"),
        Msg::FreezeNotice { snapshot: 7 }
    );
    back.send(&Msg::Frozen {
        snapshot: 7,
        node: "n2".into(),
    })
    .await
    .expect("send frozen");
    assert_eq!(
        recv.recv::<Msg>().await.expect("frozen"),
        Msg::Frozen {
            snapshot: 7,
            node: "n2".into()
        }
    );

    // n2 -> n1 on a stream n2 opens.
    let (mut send, _recv) = to_n1
        .open_bi()
        .await
        .expect("open stream from the acceptor");
    send.send(&Msg::FreezeNotice { snapshot: 8 })
        .await
        .expect("send");
    send.finish().await.expect("finish");
    let (_s, mut inbox) = to_n2
        .accept_bi()
        .await
        .expect("accept stream on the dialer");
    assert_eq!(
        inbox.recv::<Msg>().await.expect("notice"),
        Msg::FreezeNotice { snapshot: 8 }
    );
    assert!(inbox.recv_opt::<Msg>().await.expect("clean end").is_none());

    to_n2.close("test over");
    let lost = to_n1.closed().await;
    assert!(
        lost.to_string().contains("test over"),
        "the close reason reaches the peer: {lost}"
    );
}

#[tokio::test]
async fn a_node_from_another_ca_cannot_join() {
    let alpha = Cluster::new("alpha");
    let beta = Cluster::new("beta");
    let n2 = alpha.bind("n2", &["n1", "n2"]);
    let mut refusals = n2.refusals();
    // Same name as a real member, different CA.
    let intruder = beta.bind("n1", &["n1", "n2"]);

    let err = intruder
        .connect(local(&n2), "n2")
        .await
        .expect_err("an alpha node must not accept a beta node");
    assert!(matches!(err, Error::Handshake { .. }), "{err}");
    let r = next_refusal(&mut refusals).await;
    assert_eq!(r.addr, local(&intruder));
    assert!(
        r.reason.contains("alert") || r.reason.contains("certificate"),
        "{}",
        r.reason
    );

    // An intruder that trusts the real CA (its certificate is public) and so
    // accepts n2's certificate, but presents its own foreign one: n2 must
    // refuse it during the handshake and name what it presented.
    let foreign = beta.node("n1");
    let raw = raw_client(&alpha.ca_cert(), &foreign, freezeframe_netproto::ALPN);
    let connecting = raw.connect(local(&n2), "n2").expect("start handshake");
    let outcome = async {
        let conn = connecting.await?;
        // TLS 1.3: the client's side may complete before n2 checked its
        // certificate; the refusal then arrives as the close.
        Err::<(), _>(conn.closed().await)
    }
    .await;
    assert!(outcome.is_err());
    let r = next_refusal(&mut refusals).await;
    assert_eq!(r.presented_name.as_deref(), Some("n1"));
    assert!(
        r.reason.contains("UnknownIssuer"),
        "refusal says why: {}",
        r.reason
    );

    // n2 keeps serving real members.
    let n1 = alpha.bind("n1", &["n1", "n2"]);
    let (a, b) = tokio::join!(n1.connect(local(&n2), "n2"), n2.accept());
    a.expect("n1 still gets in");
    assert_eq!(b.expect("n2 still accepts").peer_name(), "n1");
}

/// A bare quinn client that trusts `ca` and presents `identity`, bypassing
/// the endpoint's own checks — what an attacker would write.
fn raw_client(ca: &CaCertificate, identity: &NodeIdentity, alpn: &[u8]) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![identity.cert_der().expect("cert")],
            identity.key_der().expect("key"),
        )
        .expect("client auth");
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).expect("quic config");
    let mut ep = quinn::Endpoint::client(addr(LOOPBACK)).expect("client endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

#[tokio::test]
async fn a_member_speaking_another_application_protocol_is_refused() {
    let c = Cluster::new("alpha");
    let n2 = c.bind("n2", &["n1", "n2"]);
    let mut refusals = n2.refusals();
    let raw = raw_client(&c.ca_cert(), &c.node("n1"), b"freezeframe/0");
    let outcome = async {
        Err::<(), _>(
            raw.connect(local(&n2), "n2")
                .expect("start")
                .await?
                .closed()
                .await,
        )
    }
    .await;
    assert!(outcome.is_err());
    let r = next_refusal(&mut refusals).await;
    assert!(
        r.reason.contains("protocol"),
        "the refusal says it is the ALPN: {}",
        r.reason
    );
    assert_eq!(
        r.presented_name, None,
        "refused at the ClientHello, before any certificate"
    );
}

#[tokio::test]
async fn a_node_of_the_right_ca_but_not_a_member_is_refused() {
    let c = Cluster::new("alpha");
    let n2 = c.bind("n2", &["n1", "n2"]);
    let mut refusals = n2.refusals();
    let n9 = c.bind("n9", &["n1", "n2", "n9"]);

    let err = n9
        .connect(local(&n2), "n2")
        .await
        .expect_err("n9 is not in n2's member list");
    assert!(
        err.to_string().contains("n9"),
        "the dialer learns why: {err}"
    );
    let r = next_refusal(&mut refusals).await;
    assert_eq!(r.presented_name.as_deref(), Some("n9"));
    assert!(r.reason.contains("not in the member list"), "{}", r.reason);

    // A dialer does not even try a name outside its own list...
    let n1 = c.bind("n1", &["n1", "n2"]);
    assert!(
        matches!(n1.connect(local(&n9), "n9").await, Err(Error::NotAMember { peer }) if peer == "n9")
    );
    // ...and refuses a member address answered by a different node.
    let err = n1
        .connect(local(&n9), "n2")
        .await
        .expect_err("n9 answering as n2");
    assert!(matches!(err, Error::Handshake { .. }), "{err}");

    // Admitting n9 later takes effect at once.
    n2.members().set(["n1", "n2", "n9"]);
    let (a, b) = tokio::join!(n9.connect(local(&n2), "n2"), n2.accept());
    a.expect("n9 admitted after the member list changed");
    assert_eq!(b.expect("accepted").peer_name(), "n9");
}

#[tokio::test]
async fn an_oversized_frame_is_refused_and_the_receiver_keeps_serving() {
    let c = Cluster::new("alpha");
    let n1 = c.bind("n1", &["n1", "n2", "n3"]);
    let n2 = c.bind("n2", &["n1", "n2", "n3"]);
    let (a, b) = tokio::join!(n1.connect(local(&n2), "n2"), n2.accept());
    let (to_n2, to_n1) = (a.expect("connect"), b.expect("accept"));

    // A header announcing 2 GiB, and no payload: a receiver that allocated or
    // waited for it would not answer in time.
    let (mut bad, _bad_recv) = to_n2.open_bi().await.expect("open");
    let mut hdr = vec![MAGIC[0], MAGIC[1], VERSION, 2];
    hdr.extend_from_slice(&(2u32 << 30).to_be_bytes());
    bad.get_mut().write_all(&hdr).await.expect("write header");
    let (_s, mut inbox) = to_n1.accept_bi().await.expect("accept");
    let err = tokio::time::timeout(Duration::from_secs(2), inbox.recv::<Msg>())
        .await
        .expect("refused without waiting for the payload")
        .expect_err("oversized");
    assert!(
        matches!(err, Error::FrameTooLarge { max, .. } if max == FrameCodec::CONTROL.max_len),
        "{err}"
    );
    assert!(
        err.to_string().contains("from node n1"),
        "the error names the peer: {err}"
    );
    inbox.stop();

    // Same connection, next stream: fine.
    let (mut good, _r) = to_n2.open_bi().await.expect("open");
    good.send(&Msg::FreezeNotice { snapshot: 1 })
        .await
        .expect("send");
    let (_s, mut inbox) = to_n1.accept_bi().await.expect("accept second stream");
    assert_eq!(
        inbox.recv::<Msg>().await.expect("served"),
        Msg::FreezeNotice { snapshot: 1 }
    );

    // A data stream may raise its limit; a 4 MiB block passes there.
    let (mut data, _r) = to_n2.open_bi().await.expect("open");
    data.set_codec(FrameCodec::DATA);
    let block = vec![1u8; 4 << 20];
    // Concurrently: 4 MiB is more than QUIC's stream window, the sender
    // waits for the receiver to read.
    let receive = async {
        let (_s, mut inbox) = to_n1.accept_bi().await.expect("accept data stream");
        inbox.set_codec(FrameCodec::DATA);
        inbox.recv_bytes().await.expect("4 MiB")
    };
    let (sent, received) = tokio::join!(data.send_bytes(&block), receive);
    sent.expect("send 4 MiB");
    assert_eq!(received, block);

    // Other connections are unaffected.
    let n3 = c.bind("n3", &["n1", "n2", "n3"]);
    let (a, b) = tokio::join!(n3.connect(local(&n2), "n2"), n2.accept());
    a.expect("n3 connects");
    assert_eq!(b.expect("n2 accepts").peer_name(), "n3");
}

#[tokio::test]
async fn garbage_on_a_stream_is_an_error_and_the_endpoint_keeps_accepting() {
    let c = Cluster::new("alpha");
    let n1 = c.bind("n1", &["n1", "n2", "n3"]);
    let n2 = c.bind("n2", &["n1", "n2", "n3"]);
    let (a, b) = tokio::join!(n1.connect(local(&n2), "n2"), n2.accept());
    let (to_n2, to_n1) = (a.expect("connect"), b.expect("accept"));

    let (mut bad, _r) = to_n2.open_bi().await.expect("open");
    bad.get_mut()
        .write_all(b"\x00\x01garbage that is not a frame")
        .await
        .expect("write");
    bad.finish().await.expect("finish");
    let (_s, mut inbox) = to_n1.accept_bi().await.expect("accept");
    let err = inbox.recv::<Msg>().await.expect_err("garbage");
    assert!(matches!(err, Error::MalformedFrame { .. }), "{err}");
    assert!(err.is_protocol_violation());

    // The daemon's policy may be to drop such a peer; the endpoint goes on.
    to_n1.close_protocol_violation("garbage frame");
    let lost = to_n2.closed().await;
    assert!(lost.to_string().contains("garbage frame"), "{lost}");

    let n3 = c.bind("n3", &["n1", "n2", "n3"]);
    let (a, b) = tokio::join!(n3.connect(local(&n2), "n2"), n2.accept());
    a.expect("n3 connects after n1 was dropped");
    assert_eq!(b.expect("still accepting").peer_name(), "n3");
}

/// A UDP relay between a dialer and a listener whose link can be cut: after
/// the cut every packet is dropped, as when a cable is pulled.
async fn cuttable_link(target: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let front = Arc::new(UdpSocket::bind(LOOPBACK).await.expect("front"));
    let back = Arc::new(UdpSocket::bind(LOOPBACK).await.expect("back"));
    let cut = Arc::new(AtomicBool::new(false));
    let cut_handle = cut.clone();
    let client: Arc<tokio::sync::Mutex<Option<SocketAddr>>> = Arc::default();
    let front_addr = front.local_addr().expect("front addr");
    {
        let (front, back, cut, client) = (front.clone(), back.clone(), cut.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().await = Some(from);
                if !cut.load(Ordering::Relaxed) {
                    let _ = back.send_to(&buf[..n], target).await;
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = back.recv_from(&mut buf).await {
            let to = *client.lock().await;
            if let (false, Some(to)) = (cut.load(Ordering::Relaxed), to) {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    (front_addr, cut_handle)
}

#[tokio::test]
async fn a_lost_peer_is_detected_on_both_sides_within_the_idle_timeout() {
    let c = Cluster::new("alpha");
    let opts = EndpointOptions::default();
    let n1 = c.bind("n1", &["n1", "n2"]);
    let n2 = c.bind("n2", &["n1", "n2"]);
    let (relay, cut) = cuttable_link(local(&n2)).await;
    let (a, b) = tokio::join!(n1.connect(relay, "n2"), n2.accept());
    let (to_n2, to_n1) = (a.expect("connect through the link"), b.expect("accept"));

    // Quiet for longer than the idle timeout: keep-alives hold it open.
    tokio::time::sleep(opts.idle_timeout + Duration::from_millis(500)).await;
    assert!(
        to_n2.close_reason().is_none() && to_n1.close_reason().is_none(),
        "keep-alive keeps an idle link up"
    );

    cut.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let limit = opts.idle_timeout + Duration::from_millis(1500);
    let (l1, l2) = tokio::join!(
        tokio::time::timeout(limit, to_n2.closed()),
        tokio::time::timeout(limit, to_n1.closed()),
    );
    let (l1, l2) = (
        l1.expect("n1 notices n2 is gone"),
        l2.expect("n2 notices n1 is gone"),
    );
    assert!(l1.to_string().contains("idle timeout"), "{l1}");
    assert!(
        matches!(l2, Error::ConnectionLost { ref peer, .. } if peer == "n1"),
        "{l2}"
    );
    assert!(start.elapsed() < limit);
}

#[test]
fn a_node_certificate_from_another_ca_is_refused_at_bind() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _g = rt.enter();
    let alpha = Cluster::new("alpha");
    let beta = Cluster::new("beta");
    let err = PeerEndpoint::bind(
        addr(LOOPBACK),
        &beta.node("n1"),
        &alpha.ca_cert(),
        MemberList::new(["n1"]),
    )
    .expect_err("misconfigured node must not start");
    assert!(
        matches!(err, Error::NotIssuedByCa { ref node, .. } if node == "n1"),
        "{err}"
    );
}

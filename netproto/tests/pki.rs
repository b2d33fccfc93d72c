//! The cluster CA on disk: what `cluster init` writes and every node loads.

use std::os::unix::fs::PermissionsExt;

use freezeframe_netproto::{CaCertificate, ClusterCa, Error, NodeIdentity};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn a_saved_ca_and_node_identity_load_back_and_keys_are_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    let ca = ClusterCa::generate("alpha").expect("generate");
    ca.save(&p("ca.pem"), &p("ca.key")).expect("save CA");
    assert_eq!(mode(&p("ca.key")), 0o600, "the CA key is private");
    assert_eq!(mode(&p("ca.pem")), 0o644);

    // A CA loaded from disk issues certificates that the saved one vouches for.
    let loaded = ClusterCa::load(&p("ca.pem"), &p("ca.key")).expect("load CA");
    assert_eq!(loaded.cluster_name(), "alpha");
    let n1 = loaded
        .issue_node("n1", &["127.0.0.1".into(), "n1.example.org".into()])
        .expect("issue");
    n1.save(&p("n1.pem"), &p("n1.key")).expect("save node");
    assert_eq!(mode(&p("n1.key")), 0o600, "a node key is private");

    let back = NodeIdentity::load(&p("n1.pem"), &p("n1.key")).expect("load node");
    assert_eq!(
        back.node_name, "n1",
        "the node name is read from the certificate"
    );
    let anchor = CaCertificate::load(&p("ca.pem")).expect("load CA certificate alone");
    assert_eq!(anchor.cluster_name(), "alpha");
    assert_eq!(anchor.der(), ca.certificate().der());
}

#[test]
fn saving_over_a_world_readable_key_makes_it_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("n1.key");
    std::fs::write(&key, "old").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let ca = ClusterCa::generate("alpha").expect("generate");
    ca.issue_node("n1", &[])
        .expect("issue")
        .save(&dir.path().join("n1.pem"), &key)
        .expect("save");
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn load_errors_name_the_file_at_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    let ca = ClusterCa::generate("alpha").expect("generate");
    ca.save(&p("ca.pem"), &p("ca.key")).expect("save");
    let n1 = ca.issue_node("n1", &[]).expect("issue");
    let n2 = ca.issue_node("n2", &[]).expect("issue");
    n1.save(&p("n1.pem"), &p("n1.key")).expect("save");
    n2.save(&p("n2.pem"), &p("n2.key")).expect("save");

    let err = ClusterCa::load(&p("missing.pem"), &p("ca.key")).expect_err("missing file");
    assert!(
        matches!(err, Error::File { .. }) && err.to_string().contains("missing.pem"),
        "{err}"
    );

    std::fs::write(p("junk.pem"), "not a certificate").expect("write");
    let err = CaCertificate::load(&p("junk.pem")).expect_err("junk");
    assert!(err.to_string().contains("junk.pem"), "{err}");

    let err = NodeIdentity::load(&p("n1.pem"), &p("n2.key")).expect_err("someone else's key");
    assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("n2.key") && err.to_string().contains("n1.pem"),
        "{err}"
    );

    let err =
        ClusterCa::load(&p("ca.pem"), &p("n1.key")).expect_err("a node key is not the CA key");
    assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");

    let err = CaCertificate::load(&p("n1.pem")).expect_err("a node certificate is not a CA");
    assert!(
        err.to_string().contains("n1.pem") && err.to_string().contains("not a CA"),
        "{err}"
    );
}

#[test]
fn node_names_must_be_usable_as_certificate_names() {
    let ca = ClusterCa::generate("alpha").expect("generate");
    for bad in ["", "10.0.0.1", "has space", "under/score"] {
        let err = ca.issue_node(bad, &[]).expect_err(bad);
        assert!(
            matches!(err, Error::InvalidNodeName { .. }),
            "{bad:?}: {err}"
        );
    }
    ca.issue_node("node-a.rack1", &[])
        .expect("dotted names are fine");
}

//! Real ClientHellos (tests/corpus/, see its README): each yields its SNI
//! whole, re-split into records at every boundary, fed a byte at a time, and
//! is replayed upstream byte for byte through both listener kinds.

mod common;

use std::path::PathBuf;

use common::*;
use snigress::front::tls::testing::refragment;
use snigress::front::tls::{Hello, HelloReader, Progress};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const NAME: &[u8] = b"capture.allowed.test";
const CAP: usize = 16 * 1024;
const CLIENTS: &[&str] = &["curl", "openssl-tls13", "openssl-tls12", "python", "go", "chromium", "rustls"];

fn fixture(client: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/corpus/{client}.bin"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn complete(bytes: &[u8]) -> Hello {
    match HelloReader::new(CAP).advance(bytes) {
        Ok(Progress::Complete(hello)) => hello,
        other => panic!("expected a complete hello, got {other:?}"),
    }
}

/// The handshake payload's length (the bytes after the record headers).
fn payload_len(records: &[u8]) -> usize {
    let (mut total, mut rest) = (0, records);
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        total += len;
        rest = &rest[5 + len..];
    }
    total
}

#[test]
fn every_client_hello_yields_its_name() {
    for client in CLIENTS {
        let bytes = fixture(client);
        let hello = complete(&bytes);
        assert_eq!(hello.server_name.as_deref(), Some(NAME), "{client}");
        assert_eq!(hello.len, bytes.len(), "{client}: the hello is all the capture holds");
    }
    // Chromium's hello carries GREASE, an ECH GREASE extension and a
    // post-quantum key share that takes it past one Ethernet frame.
    let chromium = fixture("chromium");
    assert!(chromium.len() > 1500, "{}", chromium.len());
    assert!(complete(&chromium).ech, "Chromium sends ECH GREASE");
}

#[test]
fn every_split_into_records_yields_the_name() {
    for client in CLIENTS {
        let bytes = fixture(client);
        let payload = payload_len(&bytes);
        // Two records, split at every possible offset of the handshake message.
        for first in 1..payload {
            let mut split = refragment(&bytes, first);
            // `refragment` cuts into equal pieces; keep only the first cut.
            let rest = refragment(&split[5 + first..], payload);
            split.truncate(5 + first);
            split.extend_from_slice(&rest);
            let hello = complete(&split);
            assert_eq!(hello.server_name.as_deref(), Some(NAME), "{client} split at {first}");
        }
        for size in [1, 2, 3, 7, 64, 255, 1000] {
            let hello = complete(&refragment(&bytes, size));
            assert_eq!(hello.server_name.as_deref(), Some(NAME), "{client} in records of {size}");
        }
    }
}

#[test]
fn every_read_boundary_needs_more_then_completes() {
    for client in CLIENTS {
        for layout in [fixture(client), refragment(&fixture(client), 100)] {
            let mut reader = HelloReader::new(CAP);
            for end in 0..layout.len() {
                assert_eq!(reader.advance(&layout[..end]), Ok(Progress::NeedMore), "{client} at {end}");
            }
            match reader.advance(&layout) {
                Ok(Progress::Complete(hello)) => assert_eq!(hello.server_name.as_deref(), Some(NAME), "{client}"),
                other => panic!("{client}: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_hello_is_replayed_byte_exact() {
    let mut h = Harness::start().await;
    for client in CLIENTS {
        for (listener, chunk) in
            [("passthrough-capture", 1), ("passthrough-capture", usize::MAX), ("mtls-capture", 100)]
        {
            let mut sent = fixture(client);
            sent.extend_from_slice(b"first application bytes");
            within(client, async {
                if listener.starts_with("mtls") {
                    let mut outer = h.outer(listener, SLEEP, &[]).await.expect("outer");
                    for piece in sent.chunks(chunk) {
                        outer.write_all(piece).await.expect("write");
                        outer.flush().await.expect("flush");
                    }
                    outer.shutdown().await.expect("close");
                    let _ = read_all(&mut outer).await;
                } else {
                    let mut tcp = TcpStream::connect(h.addr(listener)).await.expect("connect");
                    tcp.set_nodelay(true).expect("nodelay");
                    for piece in sent.chunks(chunk) {
                        tcp.write_all(piece).await.expect("write");
                    }
                    tcp.shutdown().await.expect("close");
                    let _ = read_all(&mut tcp).await;
                }
            })
            .await;
            assert!(h.capture.next().await == sent, "{client} through {listener} in writes of {chunk}");
            let r = h.record().await;
            assert_eq!((r.decision, r.sni.as_deref()), ("allowed", Some("capture.allowed.test")), "{client}");
        }
    }
}

/// Writes `tests/corpus/rustls.bin` (run with `--ignored` to refresh it).
#[test]
#[ignore]
fn write_rustls_fixture() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/rustls.bin");
    std::fs::write(path, client_hello("capture.allowed.test")).expect("write fixture");
}

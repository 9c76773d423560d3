//! The DNS forwarder example against a real name server (NSD) and a real
//! client (dig), both from Debian's packages (`.ci/run` installs them).

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use abyss::Server;
use abyss_examples::dns::{Forwarder, service};
use abyss_tests::{PATIENCE, client, recv_within};

/// NSD serving `example.test` on a free loopback port, stopped on drop.
struct Nsd {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Nsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A port free for both UDP and TCP on 127.0.0.1 (NSD binds both).
fn free_port() -> u16 {
    for _ in 0..50 {
        let udp = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

const ZONE: &str = "$ORIGIN example.test.
$TTL 300
@       IN SOA ns1 hostmaster 1 3600 600 86400 300
@       IN NS  ns1
ns1     IN A   127.0.0.1
host001 IN A   192.0.2.1
host002 IN A   192.0.2.2
";

fn start_nsd(dir: &Path) -> Nsd {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    std::fs::write(dir.join("example.test.zone"), ZONE).unwrap();
    let conf = format!(
        "server:\n  ip-address: 127.0.0.1@{port}\n  zonesdir: \"{d}\"\n  username: \"\"\n  chroot: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n  database: \"\"\n  verbosity: 0\nremote-control:\n  control-enable: no\nzone:\n  name: example.test\n  zonefile: example.test.zone\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nsd.conf"), conf).unwrap();
    let child = Command::new("nsd")
        .args(["-d", "-c"])
        .arg(dir.join("nsd.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nsd");
    Nsd {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        dir: dir.to_owned(),
    }
}

/// `dig` against `server` for `name`, answers only.
fn dig(server: SocketAddr, name: &str) -> String {
    let output = Command::new("dig")
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            name,
            "A",
            "+short",
            "+time=2",
            "+tries=1",
        ])
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Asks until the name server answers, for at most PATIENCE (it has no
/// readiness signal but answering).
fn wait_until_answering(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while dig(addr, "host001.example.test") != "192.0.2.1" {
        assert!(
            std::time::Instant::now() < deadline,
            "nsd never answered on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn skip() -> bool {
    if have("nsd") && have("dig") {
        return false;
    }
    eprintln!("skipped: nsd and dig are not installed (apt-get install nsd dnsutils)");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_through_the_forwarder_gets_the_record_nsd_serves() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("abyss-nsd-{}", std::process::id()));
    let nsd = start_nsd(&dir);
    let addr = nsd.addr;
    tokio::task::spawn_blocking(move || wait_until_answering(addr))
        .await
        .unwrap();

    let forwarder = Arc::new(Forwarder::new(nsd.addr, Duration::from_secs(2)));
    let handle = Server::bind("127.0.0.1:0".parse().unwrap())
        .listeners(1)
        .serve(service(forwarder))
        .await
        .unwrap();
    let server = handle.local_addr();
    let answers = tokio::task::spawn_blocking(move || {
        (
            dig(server, "host001.example.test"),
            dig(server, "host002.example.test"),
        )
    })
    .await
    .unwrap();
    assert_eq!(answers, ("192.0.2.1".to_owned(), "192.0.2.2".to_owned()));
    let stats = handle.stats();
    assert_eq!(stats.replied, 2);
    handle.shutdown().await;
}

#[tokio::test]
async fn a_malformed_query_gets_formerr_and_a_headless_one_nothing() {
    let forwarder = Arc::new(Forwarder::new(
        "127.0.0.1:9".parse().unwrap(),
        Duration::from_millis(100),
    ));
    let handle = Server::bind("127.0.0.1:0".parse().unwrap())
        .listeners(1)
        .serve(service(forwarder))
        .await
        .unwrap();
    let socket = client().await;
    // A header claiming one question, then garbage.
    let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xff; 7]);
    socket.send_to(&junk, handle.local_addr()).await.unwrap();
    let (reply, _) = recv_within(&socket, PATIENCE)
        .await
        .expect("a FORMERR reply");
    assert_eq!(&reply[..2], &[0xab, 0xcd], "same ID");
    assert_eq!(reply[2] & 0x80, 0x80, "a response");
    assert_eq!(reply[3] & 0x0f, 1, "RCODE FORMERR");
    // Five bytes: not even a header, nothing to answer.
    socket
        .send_to(&[1, 2, 3, 4, 5], handle.local_addr())
        .await
        .unwrap();
    assert!(
        recv_within(&socket, Duration::from_millis(200))
            .await
            .is_none()
    );
    let stats = abyss_tests::settled(&handle).await;
    assert_eq!((stats.received, stats.replied, stats.no_reply), (2, 1, 1));
    handle.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_gives_servfail() {
    // Bound, so no ICMP error comes back, but silent.
    let silent = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    let forwarder = Arc::new(Forwarder::new(
        silent.local_addr().unwrap(),
        Duration::from_millis(200),
    ));
    let handle = Server::bind("127.0.0.1:0".parse().unwrap())
        .listeners(1)
        .serve(service(forwarder))
        .await
        .unwrap();
    let socket = client().await;
    let query = query();
    socket.send_to(&query, handle.local_addr()).await.unwrap();
    let (reply, _) = recv_within(&socket, PATIENCE)
        .await
        .expect("a SERVFAIL reply");
    assert_eq!(&reply[..2], &[0x12, 0x34]);
    assert_eq!(reply[3] & 0x0f, 2, "RCODE SERVFAIL");
    // The question is echoed back.
    assert_eq!(&reply[12..], &query[12..]);
    handle.shutdown().await;
}

/// A query for host001.example.test A with ID 0x1234.
fn query() -> Vec<u8> {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    for label in ["host001", "example", "test"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    query
}

#[tokio::test]
async fn spoofed_and_mismatched_upstream_replies_are_ignored() {
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let spoofer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forwarder = Arc::new(Forwarder::new(
        upstream.local_addr().unwrap(),
        Duration::from_secs(5),
    ));
    let handle = Server::bind("127.0.0.1:0".parse().unwrap())
        .listeners(1)
        .serve(service(forwarder))
        .await
        .unwrap();
    let socket = client().await;
    socket.send_to(&query(), handle.local_addr()).await.unwrap();

    // The upstream sees the query with a new, random ID.
    let mut buf = [0u8; 512];
    let (len, forwarder_addr) = upstream.recv_from(&mut buf).await.unwrap();
    let forwarded = buf[..len].to_vec();
    let answer = |id: [u8; 2], rcode: u8| {
        let mut reply = forwarded.clone();
        reply[..2].copy_from_slice(&id);
        reply[2] |= 0x80;
        reply[3] = (reply[3] & 0xf0) | rcode;
        reply
    };
    let right_id = [forwarded[0], forwarded[1]];
    let wrong_id = [forwarded[0] ^ 0xff, forwarded[1]];
    // From the wrong address with the right ID, then from the right address
    // with the wrong ID: both NXDOMAIN, both must be ignored.
    spoofer
        .send_to(&answer(right_id, 3), forwarder_addr)
        .await
        .unwrap();
    upstream
        .send_to(&answer(wrong_id, 3), forwarder_addr)
        .await
        .unwrap();
    upstream
        .send_to(&answer(right_id, 0), forwarder_addr)
        .await
        .unwrap();

    let (reply, _) = recv_within(&socket, PATIENCE)
        .await
        .expect("the real answer");
    assert_eq!(&reply[..2], &[0x12, 0x34], "the client's own ID restored");
    assert_eq!(
        reply[3] & 0x0f,
        0,
        "NOERROR: the genuine reply, not a spoofed NXDOMAIN"
    );
    handle.shutdown().await;
}

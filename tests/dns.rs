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

/// A name server (NSD, or BIND's named) on a free loopback port, stopped
/// on drop.
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
    start_nsd_with(
        dir,
        std::net::Ipv4Addr::LOCALHOST,
        free_port(),
        &[("example.test", ZONE)],
    )
}

/// NSD on `ip`:`port` serving `zones` (name, zone file text).
fn start_nsd_with(dir: &Path, ip: std::net::Ipv4Addr, port: u16, zones: &[(&str, &str)]) -> Nsd {
    std::fs::create_dir_all(dir).unwrap();
    let mut conf = format!(
        "server:\n  ip-address: {ip}@{port}\n  zonesdir: \"{d}\"\n  username: \"\"\n  chroot: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  rrl-ratelimit: 0\n  zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n  database: \"\"\n  verbosity: 0\nremote-control:\n  control-enable: no\n",
        d = dir.display()
    );
    for (i, (name, text)) in zones.iter().enumerate() {
        let file = format!("zone{i}.zone");
        std::fs::write(dir.join(&file), text).unwrap();
        conf.push_str(&format!("zone:\n  name: \"{name}\"\n  zonefile: {file}\n"));
    }
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
        addr: SocketAddr::from((ip, port)),
        dir: dir.to_owned(),
    }
}

/// `dig` against `server` for `name`, answers only.
fn dig(server: SocketAddr, name: &str) -> String {
    dig_type(server, name, "A")
}

/// `dig` for `name` of type `kind`, answers only.
fn dig_type(server: SocketAddr, name: &str, kind: &str) -> String {
    let output = Command::new("dig")
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            name,
            kind,
            "+short",
            "+time=3",
            "+tries=1",
        ])
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Asks until the name server answers, for at most PATIENCE (it has no
/// readiness signal but answering).
fn wait_until_answering(addr: SocketAddr) {
    wait_for_soa(addr, "example.test");
}

/// Asks for the SOA of `zone` until `addr` answers it.
fn wait_for_soa(addr: SocketAddr, zone: &str) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while dig_type(addr, zone, "SOA").is_empty() {
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
    let handle = serve_forwarder(forwarder).await;
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
    let handle = serve_forwarder(forwarder).await;
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
    let handle = serve_forwarder(forwarder).await;
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
    let mut query = query_for("host001.example.test", 0);
    query[..2].copy_from_slice(&[0x12, 0x34]);
    query
}

/// The forwarder example's service for `forwarder`, on one listener.
async fn serve_forwarder(forwarder: impl Into<Arc<Forwarder>>) -> abyss::ServerHandle {
    Server::bind("127.0.0.1:0")
        .listeners(1)
        .serve(service(forwarder.into()))
        .await
        .unwrap()
}

#[tokio::test]
async fn spoofed_and_mismatched_upstream_replies_are_ignored() {
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let spoofer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forwarder = Arc::new(Forwarder::new(
        upstream.local_addr().unwrap(),
        Duration::from_secs(5),
    ));
    let handle = serve_forwarder(forwarder).await;
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

const ROOT_ZONE: &str = ". 300 IN SOA a.root. hostmaster.root. 1 3600 600 86400 300
. 300 IN NS a.root.
a.root. 300 IN A 127.0.0.10
test. 300 IN NS ns.test.
ns.test. 300 IN A 127.0.0.11
";

const TEST_ZONE: &str = "$ORIGIN test.
$TTL 300
@ IN SOA ns hostmaster 1 3600 600 86400 300
@ IN NS ns
ns IN A 127.0.0.11
example IN NS ns1.example
ns1.example IN A 127.0.0.12
; delegated without glue: its name server lives in example.test
noglue IN NS ns.example.test.
";

const EXAMPLE_ZONE: &str = "$ORIGIN example.test.
$TTL 300
@ IN SOA ns1 hostmaster 1 3600 600 86400 300
@ IN NS ns1
ns1 IN A 127.0.0.12
ns IN A 127.0.0.12
www IN A 192.0.2.80
alias IN CNAME www
";

const NOGLUE_ZONE: &str = "$ORIGIN noglue.test.
$TTL 300
@ IN SOA ns.example.test. hostmaster 1 3600 600 86400 300
@ IN NS ns.example.test.
host IN A 192.0.2.99
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resolver_walks_root_test_and_example_test_served_by_three_nsd() {
    use abyss_examples::dns::Resolver;
    if skip() {
        return;
    }
    // One port free on all three addresses.
    let port = (0..50)
        .map(|_| free_port())
        .find(|port| {
            ["127.0.0.10", "127.0.0.11", "127.0.0.12"].iter().all(|ip| {
                StdUdpSocket::bind((*ip, *port)).is_ok()
                    && std::net::TcpListener::bind((*ip, *port)).is_ok()
            })
        })
        .expect("a port free on 127.0.0.10-12");
    let base = std::env::temp_dir().join(format!("abyss-nsd-tree-{}", std::process::id()));
    let servers = [
        start_nsd_with(
            &base.join("root"),
            [127, 0, 0, 10].into(),
            port,
            &[(".", ROOT_ZONE)],
        ),
        start_nsd_with(
            &base.join("test"),
            [127, 0, 0, 11].into(),
            port,
            &[("test", TEST_ZONE)],
        ),
        start_nsd_with(
            &base.join("example"),
            [127, 0, 0, 12].into(),
            port,
            &[("example.test", EXAMPLE_ZONE), ("noglue.test", NOGLUE_ZONE)],
        ),
    ];
    let zones = [
        (servers[0].addr, "."),
        (servers[1].addr, "test"),
        (servers[2].addr, "noglue.test"),
    ];
    tokio::task::spawn_blocking(move || {
        for (addr, zone) in zones {
            wait_for_soa(addr, zone);
        }
    })
    .await
    .unwrap();

    let resolver = Arc::new(Resolver::new(
        vec!["127.0.0.10".parse().unwrap()],
        port,
        Duration::from_secs(2),
    ));
    let handle = Server::bind("127.0.0.1:0")
        .listeners(1)
        .serve(service(resolver))
        .await
        .unwrap();
    let server = handle.local_addr();
    let answers = tokio::task::spawn_blocking(move || {
        [
            dig(server, "www.example.test"),
            dig(server, "alias.example.test"),
            dig(server, "host.noglue.test"),
            dig_type(server, "nothere.example.test", "A"),
        ]
    })
    .await
    .unwrap();
    assert_eq!(answers[0], "192.0.2.80", "through root and test. with glue");
    assert_eq!(
        answers[1], "www.example.test.\n192.0.2.80",
        "through a CNAME"
    );
    assert_eq!(answers[2], "192.0.2.99", "a delegation without glue");
    assert_eq!(answers[3], "", "NXDOMAIN has no answer");
    handle.shutdown().await;
    drop(servers);
}

/// BIND 9's `named` serving `zone` as `example.test` on a free loopback
/// port, with `rate_limit` as its `rate-limit` clause; stopped on drop.
fn start_named(dir: &Path, zone: &str, rate_limit: &str) -> Nsd {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    std::fs::write(dir.join("example.test.zone"), zone).unwrap();
    let conf = format!(
        "options {{\n  directory \"{d}\";\n  listen-on port {port} {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n  pid-file \"{d}/named.pid\";\n  recursion no;\n  dnssec-validation no;\n  notify no;\n  rate-limit {{ {rate_limit} }};\n}};\nzone \"example.test\" {{ type primary; file \"{d}/example.test.zone\"; }};\n",
        d = dir.display()
    );
    std::fs::write(dir.join("named.conf"), conf).unwrap();
    let child = Command::new("named")
        .args(["-g", "-n", "1", "-c"])
        .arg(dir.join("named.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start named");
    Nsd {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        dir: dir.to_owned(),
    }
}

/// What came back for a stream of queries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Outcomes {
    answered: u32,
    truncated: u32,
    silent: u32,
}

/// Sends `count` queries for `host001.example.test` A from one socket,
/// `per_second` of them a second, and sorts what comes back by ID.
async fn query_stream(server: SocketAddr, count: u16, per_second: u32) -> Outcomes {
    let socket = client().await;
    let mut pace = tokio::time::interval(Duration::from_secs(1) / per_second);
    let mut seen = vec![None::<bool>; usize::from(count)];
    let mut buf = [0u8; 1500];
    let note = |reply: &[u8], seen: &mut Vec<Option<bool>>| {
        if reply.len() >= 12 && reply[2] & 0x80 != 0 {
            let id = usize::from(u16::from_be_bytes([reply[0], reply[1]]));
            if let Some(slot) = seen.get_mut(id) {
                *slot = Some(reply[2] & 0x02 != 0);
            }
        }
    };
    for id in 0..count {
        pace.tick().await;
        let mut query = id.to_be_bytes().to_vec();
        query.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        query.extend_from_slice(b"\x07host001\x07example\x04test\x00\x00\x01\x00\x01");
        socket.send_to(&query, server).await.unwrap();
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::ZERO, socket.recv_from(&mut buf)).await
        {
            note(&buf[..n], &mut seen);
        }
    }
    // Stragglers.
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await
    {
        note(&buf[..n], &mut seen);
    }
    let mut outcomes = Outcomes::default();
    for slot in seen {
        match slot {
            Some(false) => outcomes.answered += 1,
            Some(true) => outcomes.truncated += 1,
            None => outcomes.silent += 1,
        }
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_rate_limiting_answers_a_query_stream_as_bind_does() {
    if skip() || !have("named") {
        eprintln!("skipped: needs nsd, dig and named (apt-get install nsd dnsutils bind9)");
        return;
    }
    let base = std::env::temp_dir().join(format!("abyss-rrl-{}", std::process::id()));
    let nsd = start_nsd(&base.join("nsd"));
    let named = start_named(
        &base.join("named"),
        ZONE,
        "responses-per-second 5; window 15; slip 2;",
    );
    let (nsd_addr, named_addr) = (nsd.addr, named.addr);
    tokio::task::spawn_blocking(move || {
        wait_until_answering(nsd_addr);
        wait_until_answering(named_addr);
    })
    .await
    .unwrap();
    // Waiting spent some of named's allowance for the SOA: let a window
    // pass? Not needed: the stream asks for another name, another account.

    // The forwarder in front of NSD, with the same settings.
    let rrl = abyss::middleware::rrl::ResponseRateLimit::builder(
        abyss_examples::dns_rrl::DnsResponses::new(),
        5,
    )
    .window(Duration::from_secs(15))
    .slip(2)
    .build()
    .unwrap();
    let forwarder = Arc::new(Forwarder::new(nsd.addr, Duration::from_secs(2)));
    let handle = Server::bind("127.0.0.1:0")
        .serve(
            tower::ServiceBuilder::new()
                .layer(rrl.layer())
                .service(service(forwarder)),
        )
        .await
        .unwrap();

    // 300 identical queries at 100 a second, from one address.
    let bind = query_stream(named.addr, 300, 100).await;
    let abyss = query_stream(handle.local_addr(), 300, 100).await;
    println!(
        "reliability: RRL vs BIND | 300 queries for one name at 100/s from one address | responses-per-second 5, window 15, slip 2 | BIND 9: answered={} truncated={} silent={} | Abyss: answered={} truncated={} silent={}",
        bind.answered, bind.truncated, bind.silent, abyss.answered, abyss.truncated, abyss.silent
    );
    for (who, outcome) in [("BIND", bind), ("Abyss", abyss)] {
        let limited = outcome.truncated + outcome.silent;
        assert!(
            (1..=15).contains(&outcome.answered),
            "{who} answers about one second's worth: {outcome:?}"
        );
        assert!(
            outcome.truncated * 10 >= limited * 4 && outcome.truncated * 10 <= limited * 6,
            "{who} slips every second limited response: {outcome:?}"
        );
    }
    let stats = rrl.stats();
    assert_eq!(u64::from(abyss.answered), stats.sent);
    assert_eq!(u64::from(abyss.truncated), stats.slipped);
    assert_eq!(handle.stats().dropped.rate_limited, stats.dropped);
    handle.shutdown().await;
}

/// Answers every DNS query with one TXT record saying who asked: the peer
/// the server sees and the proxy it came through.
fn whoami_dns() -> impl tower::Service<
    abyss::Request,
    Response = Option<abyss::Bytes>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Option<abyss::Bytes>, std::convert::Infallible>>
             + Send,
> + Clone
+ Send
+ 'static {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::rdata::TXT;
    use hickory_proto::rr::{RData, Record};
    tower::service_fn(|request: abyss::Request| async move {
        let Ok(query) = Message::from_vec(request.payload()) else {
            return Ok(None);
        };
        let mut response = Message::new(
            query.metadata.id,
            MessageType::Response,
            query.metadata.op_code,
        );
        response.metadata.recursion_desired = query.metadata.recursion_desired;
        let said = format!(
            "peer={} proxy={}",
            request.peer(),
            request.proxy().map_or("none".to_owned(), |p| p.to_string())
        );
        for question in &query.queries {
            response.add_query(question.clone());
            response.add_answer(Record::from_rdata(
                question.name().clone(),
                0,
                RData::TXT(TXT::new(vec![said.clone()])),
            ));
        }
        Ok(response.to_vec().ok().map(abyss::Bytes::from))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_dnsdist_with_the_proxy_protocol_the_service_sees_the_client() {
    if !have("dnsdist") || !have("dig") {
        eprintln!("skipped: needs dnsdist and dig (apt-get install dnsdist dnsutils)");
        return;
    }
    use abyss::proxy_protocol::ProxyProtocolLayer;
    let backend = Server::bind("127.0.0.1:0")
        .serve(
            tower::ServiceBuilder::new()
                .layer(ProxyProtocolLayer::new().trust("127.0.0.1/32".parse().unwrap()))
                .service(whoami_dns()),
        )
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("abyss-dnsdist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    std::fs::write(
        dir.join("dnsdist.conf"),
        format!(
            "setLocal(\"127.0.0.1:{port}\")\naddACL(\"127.0.0.0/8\")\nnewServer({{address=\"{}\", useProxyProtocol=true}})\n",
            backend.local_addr()
        ),
    )
    .unwrap();
    let dnsdist = Nsd {
        child: Command::new("dnsdist")
            .args(["--supervised", "--disable-syslog", "-C"])
            .arg(dir.join("dnsdist.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsdist"),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        dir: dir.clone(),
    };
    // dig from another loopback address than dnsdist's own.
    let addr = dnsdist.addr;
    let said = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let output = Command::new("dig")
                .args([
                    "-b",
                    "127.0.0.9",
                    &format!("@{}", addr.ip()),
                    "-p",
                    &addr.port().to_string(),
                ])
                .args(["who.example", "TXT", "+short", "+time=1", "+tries=1"])
                .output()
                .expect("run dig");
            let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if said.contains("peer=") || std::time::Instant::now() > deadline {
                return said;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert!(
        said.contains("peer=127.0.0.9:"),
        "the service saw the client: {said}"
    );
    assert!(said.contains("proxy=127.0.0.1:"), "through dnsdist: {said}");
    let stats = backend.stats();
    assert_eq!(stats.dropped.denied, 0, "{stats:?}");
    drop(dnsdist);
    backend.shutdown().await;
}

#[tokio::test]
async fn a_proxy_header_from_an_untrusted_source_is_refused_and_plain_datagrams_pass() {
    use abyss::proxy_protocol::ProxyProtocolLayer;
    let handle = Server::bind("127.0.0.1:0")
        .serve(
            tower::ServiceBuilder::new()
                .layer(ProxyProtocolLayer::new().trust("192.0.2.0/24".parse().unwrap()))
                .service_fn(|request: abyss::Request| async move {
                    Ok::<_, std::convert::Infallible>(format!(
                        "{} {:?}",
                        request.peer(),
                        request.proxy()
                    ))
                }),
        )
        .await
        .unwrap();
    let socket = client().await;
    let me = socket.local_addr().unwrap();
    socket.send_to(b"plain", handle.local_addr()).await.unwrap();
    let (reply, _) = recv_within(&socket, PATIENCE).await.expect("a reply");
    assert_eq!(String::from_utf8(reply).unwrap(), format!("{me} None"));
    // A client passing for 198.51.100.7 is not a trusted proxy.
    let mut forged = b"\r\n\r\n\0\r\nQUIT\n\x21\x12\x00\x0c".to_vec();
    forged.extend_from_slice(&[198, 51, 100, 7, 127, 0, 0, 1, 0x9c, 0x40, 0, 53]);
    forged.extend_from_slice(b"hello");
    socket.send_to(&forged, handle.local_addr()).await.unwrap();
    let stats = abyss_tests::wait_for_stats(&handle, "the forged header refused", |s| {
        s.dropped.denied == 1
    })
    .await;
    assert_eq!(stats.replied, 1);
    handle.shutdown().await;
}

/// A query with ID 0xabcd for `name` (labels separated by dots), type A,
/// with `opcode`.
fn query_for(name: &str, opcode: u8) -> Vec<u8> {
    let mut query = vec![
        0xab,
        0xcd,
        opcode << 3 | 0x01,
        0x00,
        0x00,
        0x01,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    query
}

/// A forwarder in front of a fake upstream the test plays.
async fn forwarder_before_fake(timeout: Duration) -> (abyss::ServerHandle, tokio::net::UdpSocket) {
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let handle = serve_forwarder(Forwarder::new(upstream.local_addr().unwrap(), timeout)).await;
    (handle, upstream)
}

#[tokio::test]
async fn other_opcodes_get_notimp_at_once_and_responses_get_nothing() {
    let (handle, upstream) = forwarder_before_fake(Duration::from_secs(30)).await;
    let socket = client().await;
    // NOTIFY (opcode 4): answered NOTIMP at once, not relayed upstream.
    socket
        .send_to(&query_for("zone.example", 4), handle.local_addr())
        .await
        .unwrap();
    let (reply, _) = recv_within(&socket, PATIENCE).await.expect("NOTIMP");
    assert_eq!(&reply[..2], &[0xab, 0xcd]);
    assert_eq!((reply[2] >> 3) & 0x0f, 4, "same opcode");
    assert_eq!(reply[3] & 0x0f, 4, "NOTIMP");
    // A malformed *response* is not answered (no FORMERR to a response).
    let mut junk_response = vec![0xab, 0xcd, 0x80, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    junk_response.extend_from_slice(&[0xff; 5]);
    socket
        .send_to(&junk_response, handle.local_addr())
        .await
        .unwrap();
    let stats =
        abyss_tests::wait_for_stats(&handle, "the response handled", |s| s.no_reply == 1).await;
    assert_eq!(stats.replied, 1);
    let mut buf = [0u8; 512];
    let nothing =
        tokio::time::timeout(Duration::from_millis(100), upstream.recv_from(&mut buf)).await;
    assert!(nothing.is_err(), "nothing was relayed upstream");
    handle.shutdown().await;
}

#[tokio::test]
async fn the_question_goes_up_in_random_case_and_only_an_exact_echo_is_taken() {
    let (handle, upstream) = forwarder_before_fake(Duration::from_secs(5)).await;
    let socket = client().await;
    let name = "abcdefghij.klmnopqrst.example";
    socket
        .send_to(&query_for(name, 0), handle.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (len, forwarder_addr) = upstream.recv_from(&mut buf).await.unwrap();
    let forwarded = buf[..len].to_vec();
    let sent_name = &forwarded[12..len - 4];
    assert_ne!(
        sent_name,
        &query_for(name, 0)[12..len - 4],
        "27 letters all left lower case: 1 chance in 2^27"
    );
    let answer = |question: &[u8], rcode: u8| {
        let mut reply = forwarded.clone();
        reply[12..len - 4].copy_from_slice(question);
        reply[2] |= 0x80;
        reply[3] = (reply[3] & 0xf0) | rcode;
        reply
    };
    // The question lower-cased: a forger who does not know the case. Ignored.
    let lowered = sent_name.to_ascii_lowercase();
    upstream
        .send_to(&answer(&lowered, 3), forwarder_addr)
        .await
        .unwrap();
    upstream
        .send_to(&answer(sent_name, 0), forwarder_addr)
        .await
        .unwrap();
    let (reply, _) = recv_within(&socket, PATIENCE).await.expect("the answer");
    assert_eq!(
        reply[3] & 0x0f,
        0,
        "NOERROR: the exact echo, not the forgery"
    );
    assert_eq!(
        &reply[12..len - 4],
        &query_for(name, 0)[12..len - 4],
        "the client's own case"
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn an_error_answer_without_a_question_is_taken_by_its_id_at_once() {
    let (handle, upstream) = forwarder_before_fake(Duration::from_secs(30)).await;
    let socket = client().await;
    socket
        .send_to(&query_for("refused.example", 0), handle.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (_, forwarder_addr) = upstream.recv_from(&mut buf).await.unwrap();
    // REFUSED, header only, as some servers answer.
    let refused = [buf[0], buf[1], 0x81, 0x85, 0, 0, 0, 0, 0, 0, 0, 0];
    upstream.send_to(&refused, forwarder_addr).await.unwrap();
    let (reply, _) = recv_within(&socket, PATIENCE)
        .await
        .expect("REFUSED, not a 30 s wait");
    assert_eq!(&reply[..2], &[0xab, 0xcd]);
    assert_eq!(reply[3] & 0x0f, 5, "REFUSED");
    handle.shutdown().await;
}

#[tokio::test]
async fn a_silent_upstream_fails_over_to_the_next() {
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let answering = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forwarder = Arc::new(
        Forwarder::start(
            &[
                silent.local_addr().unwrap(),
                answering.local_addr().unwrap(),
            ],
            Duration::from_millis(200),
        )
        .unwrap(),
    );
    let handle = serve_forwarder(forwarder).await;
    let socket = client().await;
    socket
        .send_to(&query_for("failover.example", 0), handle.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (len, from) = answering.recv_from(&mut buf).await.unwrap();
    buf[2] |= 0x80;
    answering.send_to(&buf[..len], from).await.unwrap();
    let (reply, _) = recv_within(&socket, PATIENCE).await.expect("an answer");
    assert_eq!(reply[3] & 0x0f, 0, "from the second upstream");
    // An unusable upstream is refused at start.
    assert!(Forwarder::start(&["0.0.0.0:53".parse().unwrap()], Duration::from_secs(1)).is_err());
    handle.shutdown().await;
}

#[tokio::test]
async fn a_forger_who_knows_the_port_and_the_id_but_not_the_case_poisons_nothing() {
    // The upstream never answers; a forger answers in its name (from its
    // address, to the forwarder's port, with the query's ID: everything
    // a local user watching the sockets, or a 65 536-ID blast, could get
    // right), with the question in lower case.
    let (handle, upstream) = forwarder_before_fake(Duration::from_millis(200)).await;
    let socket = client().await;
    let mut poisoned = 0;
    for try_ in 0..20 {
        let name = format!("poison{try_:02}.abcdefghijklmnop.example");
        let query = query_for(&name, 0);
        socket.send_to(&query, handle.local_addr()).await.unwrap();
        let mut buf = [0u8; 512];
        let (len, forwarder_addr) = upstream.recv_from(&mut buf).await.unwrap();
        let mut forged = buf[..len].to_vec();
        forged[2] |= 0x80;
        forged[3] &= 0xf0; // NOERROR
        let end = len - 4;
        forged[12..end].make_ascii_lowercase();
        upstream.send_to(&forged, forwarder_addr).await.unwrap();
        let (reply, _) = recv_within(&socket, PATIENCE).await.expect("a reply");
        match reply[3] & 0x0f {
            2 => {} // SERVFAIL: the forgery was not taken
            _ => poisoned += 1,
        }
    }
    assert_eq!(poisoned, 0, "forged answers taken in 20 tries");
    handle.shutdown().await;
}

#[tokio::test]
async fn the_forwarded_edns_size_is_lowered_to_what_the_forwarder_reads() {
    // Never answered: a short timeout, so shutdown does not wait long.
    let (handle, upstream) = forwarder_before_fake(Duration::from_millis(300)).await;
    let socket = client().await;
    let sizes = [65_535u16, 1_232];
    for size in sizes {
        let mut query = query_for("edns.example", 0);
        query[11] = 1; // one additional record: OPT
        query.extend_from_slice(&[0, 0, 41]);
        query.extend_from_slice(&size.to_be_bytes());
        query.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        socket.send_to(&query, handle.local_addr()).await.unwrap();
        let mut buf = [0u8; 512];
        let (len, _) = upstream.recv_from(&mut buf).await.unwrap();
        let forwarded = u16::from_be_bytes([buf[len - 8], buf[len - 7]]);
        let expected = size.min(abyss_examples::dns::MAX_UPSTREAM_ANSWER);
        assert_eq!(forwarded, expected, "asked for {size}");
        assert_eq!(len, query.len());
    }
    handle.shutdown().await;
}

#[tokio::test]
async fn a_tcp_client_announcing_an_overlong_query_loses_its_connection_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forwarder = Arc::new(Forwarder::new(
        upstream.local_addr().unwrap(),
        Duration::from_secs(2),
    ));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    // Idle connections would be kept 30 s: the close must come sooner.
    tokio::spawn(abyss_examples::dns::serve_tcp(
        tcp,
        forwarder,
        Duration::from_secs(30),
    ));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let announced = u16::try_from(abyss_examples::dns::MAX_TCP_QUERY + 1).unwrap();
    stream.write_all(&announced.to_be_bytes()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .expect("closed at once, not after the idle time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blast_of_every_id_at_the_upstream_port_poisons_nothing_in_20_tries() {
    // The upstream stays silent while a forger, from its address and to
    // the port the query left from (visible to local users), sends the
    // answer with each of the 65 536 IDs, question in lower case. Then the
    // upstream answers for real (NXDOMAIN): the client must get that one.
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forwarder = Arc::new(Forwarder::new(
        upstream.local_addr().unwrap(),
        Duration::from_secs(20),
    ));
    let handle = serve_forwarder(forwarder.clone()).await;
    let socket = client().await;
    let unmatched = || forwarder.upstream_stats()[0].unmatched;
    let mut poisoned = 0;
    for try_ in 0..20 {
        let name = format!("blast{try_:02}.abcdefghijklmnop.example");
        socket
            .send_to(&query_for(&name, 0), handle.local_addr())
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let (len, forwarder_addr) = upstream.recv_from(&mut buf).await.unwrap();
        let sent = buf[..len].to_vec();
        let mut forged = sent.clone();
        forged[2] |= 0x80;
        forged[3] &= 0xf0; // NOERROR
        forged[12..len - 4].make_ascii_lowercase();
        let before = unmatched();
        for chunk in 0..64u32 {
            for id in chunk * 1024..(chunk + 1) * 1024 {
                forged[..2].copy_from_slice(&(id as u16).to_be_bytes());
                upstream.send_to(&forged, forwarder_addr).await.unwrap();
            }
            // Paced by the forwarder's reading, so the blast is matched
            // rather than dropped by a full socket buffer.
            let expected = before + u64::from(chunk + 1) * 1024;
            let deadline = tokio::time::Instant::now() + PATIENCE;
            while unmatched() < expected && tokio::time::Instant::now() < deadline {
                tokio::task::yield_now().await;
            }
        }
        let mut genuine = sent;
        genuine[2] |= 0x80;
        genuine[3] = (genuine[3] & 0xf0) | 3; // NXDOMAIN
        upstream.send_to(&genuine, forwarder_addr).await.unwrap();
        let (reply, _) = recv_within(&socket, PATIENCE).await.expect("a reply");
        if reply[3] & 0x0f != 3 {
            poisoned += 1;
        }
    }
    let stats = forwarder.upstream_stats()[0];
    assert_eq!(poisoned, 0, "forged answers taken in 20 tries");
    assert_eq!(stats.answered, 20, "{stats:?}");
    assert!(
        stats.unmatched >= 20 * 65_536 * 9 / 10,
        "the blasts were read and refused, not lost: {stats:?}"
    );
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_to_an_unvalidated_source_is_truncated_and_comes_whole_over_tcp() {
    if skip() {
        return;
    }
    let big = "x".repeat(200);
    let zone = format!("{ZONE}big IN TXT \"{big}\" \"{big}\" \"{big}\" \"{big}\"\n");
    let dir = std::env::temp_dir().join(format!("abyss-nsd-tc-{}", std::process::id()));
    let nsd = start_nsd_with(
        &dir,
        std::net::Ipv4Addr::LOCALHOST,
        free_port(),
        &[("example.test", &zone)],
    );
    let nsd_addr = nsd.addr;
    tokio::task::spawn_blocking(move || wait_until_answering(nsd_addr))
        .await
        .unwrap();
    let forwarder = Arc::new(Forwarder::start(&[nsd.addr], Duration::from_secs(2)).unwrap());
    let nobody: Arc<dyn abyss::middleware::Validate> = Arc::new(|_: SocketAddr| false);
    let handle = Server::bind("127.0.0.1:0")
        .serve(abyss_examples::dns::truncate_large(
            service(forwarder.clone()),
            3,
            nobody,
        ))
        .await
        .unwrap();
    let addr = handle.local_addr();
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(abyss_examples::dns::serve_tcp(
        tcp,
        forwarder,
        Duration::from_secs(5),
    ));
    let (udp_only, retried) = tokio::task::spawn_blocking(move || {
        let dig = |extra: &[&str]| {
            let output = Command::new("dig")
                .args([&format!("@{}", addr.ip()), "-p", &addr.port().to_string()])
                .args(["big.example.test", "TXT", "+time=3", "+tries=1"])
                .args(extra)
                .output()
                .expect("run dig");
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        (dig(&["+ignore"]), dig(&["+short"]))
    })
    .await
    .unwrap();
    assert!(udp_only.contains(" tc"), "TC set over UDP: {udp_only}");
    assert!(!udp_only.contains(&big), "no answer in the truncated reply");
    assert_eq!(
        retried.matches(&big).count(),
        4,
        "the whole answer over TCP: {retried}"
    );
    // A small answer is not truncated.
    let small = tokio::task::spawn_blocking(move || dig(addr, "host001.example.test"))
        .await
        .unwrap();
    assert_eq!(small, "192.0.2.1");
    handle.shutdown().await;
}

#[tokio::test]
async fn a_questionless_answer_with_records_or_nxdomain_is_not_taken_by_its_id() {
    let (handle, upstream) = forwarder_before_fake(Duration::from_millis(200)).await;
    let socket = client().await;
    socket
        .send_to(&query_for("victim.example", 0), handle.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (_, forwarder_addr) = upstream.recv_from(&mut buf).await.unwrap();
    // The right ID, no question, NXDOMAIN with an A record for 6.6.6.6.
    let mut forged = vec![buf[0], buf[1], 0x81, 0x83, 0, 0, 0, 1, 0, 0, 0, 0];
    forged.extend_from_slice(&[0x06, b'v', b'i', b'c', b't', b'i', b'm', 0, 0, 1, 0, 1]);
    forged.extend_from_slice(&[0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
    upstream.send_to(&forged, forwarder_addr).await.unwrap();
    let (reply, _) = recv_within(&socket, PATIENCE).await.expect("a reply");
    assert_eq!(reply[3] & 0x0f, 2, "SERVFAIL: the forgery was not taken");
    assert_eq!(&reply[6..8], &[0, 0], "no records relayed");
    handle.shutdown().await;
}

//! The server on a real path: it serves in one network namespace, its
//! clients send from another, and a veth pair with a real MTU joins them.
//! GSO replies of every size, a path that refuses a GSO run, replies to a
//! subnet broadcast, and handlers that send while a slow link keeps the
//! socket's send buffer full. Needs root and iproute2; each test skips
//! otherwise.

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use abyss::transport::UdpOptions;
use abyss::{Request, Server, Stats};
use abyss_tests::{Netns, PATIENCE, assert_accounted, recv_within, veth, wait_for_stats};
use bytes::Bytes;
use tokio::net::UdpSocket;
use tower::service_fn;

/// Receive and send buffers of the burst tests' sockets: a burst of
/// fragmented 8000-byte datagrams must fit whole.
const BIG_BUFFER: usize = 4 << 20;

/// Two namespaces joined by a veth pair on 10.231.`subnet`.0/24: the
/// server's end has .1, the client's .2.
struct Link {
    server: Netns,
    client: Netns,
    server_if: String,
    server_ip: Ipv4Addr,
    client_ip: Ipv4Addr,
}

impl Link {
    /// The two namespaces and their link with `mtu` on both ends, or `None`
    /// (said on stderr) where namespaces cannot be made.
    fn new(subnet: u8, mtu: u16) -> Option<Self> {
        let server = Netns::new(&format!("rn{subnet}s"))?;
        let client = Netns::new(&format!("rn{subnet}c"))?;
        let tag = std::process::id() % 100_000;
        let (server_if, client_if) = (format!("rn{subnet}s{tag}"), format!("rn{subnet}c{tag}"));
        veth(&server, &server_if, &client, &client_if);
        let server_ip = Ipv4Addr::new(10, 231, subnet, 1);
        let client_ip = Ipv4Addr::new(10, 231, subnet, 2);
        let mtu = mtu.to_string();
        for (netns, name, ip) in [
            (&server, &server_if, server_ip),
            (&client, &client_if, client_ip),
        ] {
            netns.run(&["ip", "link", "set", "dev", name, "mtu", &mtu]);
            let address = format!("{ip}/24");
            netns.run(&["ip", "addr", "add", &address, "brd", "+", "dev", name]);
        }
        Some(Self {
            server,
            client,
            server_if,
            server_ip,
            client_ip,
        })
    }

    /// The client namespace's IP and UDP counters that tell where datagrams
    /// it should have received were lost, for failure messages.
    fn client_losses(&self) -> String {
        snmp(
            &self.client,
            &[
                "Ip.ReasmFails",
                "Ip.ReasmTimeout",
                "Ip.InDiscards",
                "Udp.InDatagrams",
                "Udp.InErrors",
                "Udp.RcvbufErrors",
            ],
        )
    }

    /// Packets the server's end of the link has sent: a GSO transmit
    /// crosses a veth as one.
    fn server_tx_packets(&self) -> String {
        let path = format!("/sys/class/net/{}/statistics/tx_packets", self.server_if);
        self.server
            .command(&["cat", &path])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

/// The named counters (`Protocol.Name`) of `/proc/net/snmp` in `netns`, as
/// `name=value`.
fn snmp(netns: &Netns, names: &[&str]) -> String {
    let Ok(output) = netns.command(&["cat", "/proc/net/snmp"]).output() else {
        return "(no /proc/net/snmp)".to_owned();
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    // The file pairs a line of names with a line of values, per protocol.
    for pair in lines.chunks(2) {
        let [keys, values] = pair else { continue };
        let mut keys = keys.split_whitespace();
        let mut values = values.split_whitespace();
        let protocol = keys.next().unwrap_or_default().trim_end_matches(':');
        values.next();
        for (key, value) in keys.zip(values) {
            let name = format!("{protocol}.{key}");
            if names.contains(&name.as_str()) {
                found.push(format!("{name}={value}"));
            }
        }
    }
    found.join(" ")
}

/// A condition on a server's counters, checked inside its namespace.
type Until = Box<dyn Fn(&Stats) -> bool + Send>;

/// A server serving on a thread inside a namespace (so its sockets are
/// there), with a runtime of its own.
struct Remote {
    addr: SocketAddr,
    settle: Option<tokio::sync::oneshot::Sender<(&'static str, Until)>>,
    stats: mpsc::Receiver<Stats>,
    thread: Option<JoinHandle<()>>,
}

impl Remote {
    /// Serves `service` on `addr` in `netns`; returns once it is bound.
    fn start<S>(
        netns: &Netns,
        addr: SocketAddr,
        listeners: usize,
        options: UdpOptions,
        service: S,
    ) -> Self
    where
        S: tower::Service<Request, Response = Option<Bytes>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let (ready, started) = mpsc::channel();
        let (settle, settled) = tokio::sync::oneshot::channel::<(&'static str, Until)>();
        let (report, stats) = mpsc::channel();
        let thread = netns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the server");
            runtime.block_on(async move {
                let handle = Server::bind(addr)
                    .listeners(listeners)
                    .udp_options(options)
                    .serve(service)
                    .await
                    .expect("serve in the namespace");
                let _ = ready.send(handle.local_addr());
                if let Ok((what, until)) = settled.await {
                    let stats = wait_for_stats(&handle, what, until).await;
                    let _ = report.send(stats);
                }
                tokio::time::timeout(PATIENCE, handle.shutdown())
                    .await
                    .expect("the server shuts down within PATIENCE");
            });
        });
        let addr = match started.recv_timeout(PATIENCE) {
            Ok(addr) => addr,
            Err(error) => fail(thread, error, "the server did not start"),
        };
        Self {
            addr,
            settle: Some(settle),
            stats,
            thread: Some(thread),
        }
    }

    /// Waits (up to [`PATIENCE`]) until the server's counters satisfy
    /// `until`, returns that snapshot and shuts the server down.
    fn stats_when(
        mut self,
        what: &'static str,
        until: impl Fn(&Stats) -> bool + Send + 'static,
    ) -> Stats {
        let settle = self.settle.take().expect("asked once");
        let thread = self.thread.take().expect("asked once");
        let _ = settle.send((what, Box::new(until)));
        match self.stats.recv_timeout(PATIENCE + PATIENCE / 2) {
            Ok(stats) => {
                // Bounded: the thread only shuts the server down, within
                // PATIENCE, before it ends.
                if let Err(panic) = thread.join() {
                    std::panic::resume_unwind(panic);
                }
                stats
            }
            Err(error) => fail(thread, error, what),
        }
    }
}

/// Fails the test for a namespace thread that did not deliver: with its own
/// panic if it ended with one.
fn fail<T>(thread: JoinHandle<T>, error: mpsc::RecvTimeoutError, what: &str) -> ! {
    if error == mpsc::RecvTimeoutError::Disconnected {
        // It dropped its sender: it has ended or is ending.
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
    panic!("{what}: no answer from the namespace thread ({error})");
}

/// A future running on a thread inside a namespace.
struct Pending<T> {
    result: mpsc::Receiver<T>,
    thread: JoinHandle<()>,
}

impl<T: Send + 'static> Pending<T> {
    /// Runs the future `body` makes on a thread inside `netns`, on a
    /// runtime of its own.
    fn start<F, Fut>(netns: &Netns, body: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let (done, result) = mpsc::channel();
        let thread = netns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the client");
            let _ = done.send(runtime.block_on(body()));
        });
        Self { result, thread }
    }

    /// Its output, failing the test if it takes longer than `limit`.
    fn wait(self, limit: Duration, what: &str) -> T {
        match self.result.recv_timeout(limit) {
            Ok(output) => output,
            Err(error) => fail(self.thread, error, what),
        }
    }
}

/// A tokio socket on `addr` with [`BIG_BUFFER`] to receive and send.
fn big_socket(addr: SocketAddr) -> UdpSocket {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = std::net::UdpSocket::bind(addr).expect("bind a client socket");
    setsockopt(&socket, sockopt::RcvBuf, &BIG_BUFFER).expect("SO_RCVBUF");
    setsockopt(&socket, sockopt::SndBuf, &BIG_BUFFER).expect("SO_SNDBUF");
    socket.set_nonblocking(true).expect("non-blocking");
    UdpSocket::from_std(socket).expect("a tokio socket")
}

/// Datagram `index` of a burst of `size`-byte datagrams: its index, then
/// bytes that differ by size, index and position.
fn numbered(size: usize, index: usize) -> Vec<u8> {
    let mut payload: Vec<u8> = (0..size)
        .map(|k| (k * 7 + index * 31 + size) as u8)
        .collect();
    payload[..4].copy_from_slice(&(index as u32).to_be_bytes());
    payload
}

/// What came back of one burst.
#[derive(Debug)]
struct Burst {
    size: usize,
    sent: usize,
    /// Replies byte-identical to a datagram of the burst, one per datagram.
    identical: usize,
    /// Anything else that arrived meanwhile: a duplicate, different bytes,
    /// another source.
    wrong: usize,
}

/// One socket on `local` sends each burst (`count` numbered datagrams of
/// `size` bytes) to `server` as fast as it can, while a task reads the
/// replies; each burst waits (up to [`PATIENCE`]) for its replies before the
/// next is sent. Stops after a burst that did not come back whole.
async fn echo_bursts(
    local: Ipv4Addr,
    server: SocketAddr,
    bursts: Vec<(usize, usize)>,
) -> Vec<Burst> {
    let socket = Arc::new(big_socket(SocketAddr::from((local, 0))));
    let (forward, mut replies) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn({
        let socket = socket.clone();
        async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, from) = socket.recv_from(&mut buf).await.expect("recv_from");
                if forward.send((buf[..n].to_vec(), from)).is_err() {
                    break;
                }
            }
        }
    });
    // One exchange first, so that the bursts do not wait in the neighbour
    // queue while ARP resolves.
    socket.send_to(b"warm-up", server).await.expect("send_to");
    let warm_up = tokio::time::timeout(PATIENCE, replies.recv()).await;
    assert!(
        matches!(&warm_up, Ok(Some((reply, _))) if reply == b"warm-up"),
        "the warm-up exchange failed: {warm_up:?}"
    );

    let mut results = Vec::new();
    for (size, count) in bursts {
        let payloads: Vec<Vec<u8>> = (0..count).map(|i| numbered(size, i)).collect();
        for payload in &payloads {
            socket.send_to(payload, server).await.expect("send_to");
        }
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut seen = vec![false; count];
        let (mut identical, mut wrong) = (0, 0);
        while identical < count {
            let Ok(Some((reply, from))) = tokio::time::timeout_at(deadline, replies.recv()).await
            else {
                break;
            };
            let index = reply.get(..4).map_or(usize::MAX, |i| {
                u32::from_be_bytes(i.try_into().unwrap()) as usize
            });
            if from == server && index < count && !seen[index] && reply == payloads[index] {
                seen[index] = true;
                identical += 1;
            } else {
                wrong += 1;
            }
        }
        results.push(Burst {
            size,
            sent: count,
            identical,
            wrong,
        });
        if identical < count {
            break;
        }
    }
    reader.abort();
    results
}

/// Serves echo with one listener on `link`'s server end, sends `bursts`
/// from one client socket, and checks that every reply came back
/// byte-identical and that the server replied to everything it received,
/// with no send failing.
fn bursts_are_echoed_whole(link: &Link, bursts: Vec<(usize, usize)>) {
    let server = Remote::start(
        &link.server,
        SocketAddr::from((link.server_ip, 0)),
        1,
        UdpOptions::new().recv_buffer_size(BIG_BUFFER),
        abyss_tests::echo(),
    );
    let (addr, client_ip) = (server.addr, link.client_ip);
    let began = Instant::now();
    let results = Pending::start(&link.client, move || echo_bursts(client_ip, addr, bursts))
        .wait(PATIENCE * 6, "the client's bursts");
    let took = began.elapsed();
    // The warm-up datagram, then each burst the client sent.
    let sent = 1 + results.iter().map(|b| b.sent as u64).sum::<u64>();
    let stats = server.stats_when("every datagram sent taken or dropped", move |s| {
        s.in_flight == 0 && s.received + s.kernel_drops.unwrap_or(0) >= sent
    });
    let losses = link.client_losses();
    eprintln!(
        "bursts {results:?} in {took:?}; server {stats:?}, its link sent {} packets; client {losses}",
        link.server_tx_packets()
    );

    // Where a datagram was lost on the way, say where, before failing.
    let kernel_drops = stats.kernel_drops.unwrap_or(0);
    assert_eq!(
        stats.received + kernel_drops,
        sent,
        "every datagram sent is taken by the server or counted dropped by its kernel"
    );
    for burst in &results {
        assert_eq!(
            (burst.identical, burst.wrong),
            (burst.sent, 0),
            "{}-byte burst: {} of {} replies came back byte-identical, {} other datagrams \
             (server kernel drops {kernel_drops}; server {stats:?}; client {losses})",
            burst.size,
            burst.identical,
            burst.sent,
            burst.wrong,
        );
    }
    assert_eq!(kernel_drops, 0, "the server's kernel dropped requests");
    assert_eq!(stats.replied, stats.received, "{stats:?}");
    assert_eq!(stats.dropped.send_failed, 0, "{stats:?}");
    assert_eq!(stats.dropped.total(), 0, "{stats:?}");
    assert_accounted(&stats);
}

#[test]
fn gso_replies_of_every_size_reach_a_peer_across_an_mtu_1500_path() {
    let Some(link) = Link::new(1, 1500) else {
        return;
    };
    // 1472 is the largest datagram one 1500-byte packet carries (a GSO
    // segment at most that), 1473 the smallest that is fragmented.
    let bursts = vec![(1000, 32), (1472, 32), (1473, 32), (3000, 32), (8000, 16)];
    bursts_are_echoed_whole(&link, bursts);
}

#[test]
fn a_gso_run_the_path_refuses_is_sent_datagram_by_datagram() {
    let Some(link) = Link::new(2, 1280) else {
        return;
    };
    // 1400 bytes are more than one 1280-byte packet carries: the kernel
    // refuses a GSO run of them (EMSGSIZE) and fragments them sent alone.
    // 1000 bytes fit: runs of them go out whole again.
    bursts_are_echoed_whole(&link, vec![(1400, 32), (1000, 32)]);
}

#[test]
fn a_datagram_to_a_subnet_broadcast_address_is_answered_from_the_interfaces_address() {
    let Some(link) = Link::new(3, 1500) else {
        return;
    };
    let broadcast = Ipv4Addr::new(10, 231, 3, 255);
    let client_ip = link.client_ip;
    // The client's socket, with SO_BROADCAST; asks `count` numbered
    // questions of `to` one after the other, and returns each question,
    // its reply and the reply's source.
    let ask = move |to: SocketAddr, count: usize| {
        move || async move {
            let socket = UdpSocket::bind((client_ip, 0)).await.expect("bind");
            socket.set_broadcast(true).expect("SO_BROADCAST");
            let mut answers = Vec::new();
            for i in 0..count {
                let question = format!("broadcast question {i}").into_bytes();
                socket.send_to(&question, to).await.expect("send_to");
                let answer = recv_within(&socket, PATIENCE).await;
                answers.push((question, answer));
            }
            answers
        }
    };

    // One listener on the wildcard address.
    let locals = Arc::new(Mutex::new(Vec::new()));
    let service = {
        let locals = locals.clone();
        service_fn(move |request: Request| {
            locals.lock().unwrap().push(request.local());
            async move { Ok::<_, Infallible>(Some(request.into_payload())) }
        })
    };
    let port = 4789;
    let server = Remote::start(
        &link.server,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        1,
        UdpOptions::new(),
        service,
    );
    let answers = Pending::start(&link.client, ask(SocketAddr::from((broadcast, port)), 1))
        .wait(PATIENCE * 2, "the broadcast question");
    let stats = server.stats_when("the reply counted", |s| s.in_flight == 0 && s.received >= 1);
    eprintln!(
        "one listener: {answers:?}; the handler saw local addresses {:?}; {stats:?}",
        locals.lock().unwrap()
    );
    let (question, answer) = &answers[0];
    let (reply, from) = answer.as_ref().expect("a reply to the broadcast");
    assert_eq!(reply, question);
    assert_eq!(
        *from,
        SocketAddr::from((link.server_ip, port)),
        "the reply comes from the interface's own address"
    );
    assert_eq!((stats.received, stats.replied), (1, 1), "{stats:?}");
    assert_eq!(stats.dropped.total(), 0, "{stats:?}");

    // Two listeners: both sockets get a copy of each broadcast, and the
    // handler runs once per broadcast.
    let handled = Arc::new(AtomicUsize::new(0));
    let service = {
        let handled = handled.clone();
        service_fn(move |request: Request| {
            handled.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Infallible>(Some(request.into_payload())) }
        })
    };
    let port = 4790;
    let server = Remote::start(
        &link.server,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        2,
        UdpOptions::new(),
        service,
    );
    let answers = Pending::start(&link.client, ask(SocketAddr::from((broadcast, port)), 10))
        .wait(PATIENCE * 11, "the broadcast questions");
    let stats = server.stats_when("ten replies and ten skipped copies counted", |s| {
        s.in_flight == 0 && s.replied >= 10 && s.group_copies_skipped >= 10
    });
    eprintln!("two listeners: {stats:?}");
    for (question, answer) in &answers {
        let (reply, from) = answer.as_ref().unwrap_or_else(|| {
            panic!(
                "no reply to {:?}; {stats:?}",
                String::from_utf8_lossy(question)
            )
        });
        assert_eq!(
            reply,
            question,
            "the reply to {:?} (a duplicate of an earlier one?)",
            String::from_utf8_lossy(question)
        );
        assert_eq!(*from, SocketAddr::from((link.server_ip, port)));
    }
    assert_eq!(answers.len(), 10);
    assert_eq!(
        handled.load(Ordering::SeqCst),
        10,
        "handler runs; {stats:?}"
    );
    assert_eq!(stats.received, 10, "{stats:?}");
    assert_eq!(stats.replied, 10, "{stats:?}");
    assert_eq!(stats.group_copies_skipped, 10, "{stats:?}");
    assert_eq!(stats.dropped.total(), 0, "{stats:?}");
    assert_accounted(&stats);
}

/// What the handlers of the full-send-buffer test did.
#[derive(Debug, Default)]
struct Handlers {
    started: AtomicU64,
    finished: AtomicU64,
    /// Extra copies the kernel took, and ones that failed.
    extra_sent: AtomicU64,
    extra_failed: AtomicU64,
}

/// Client sockets of the full-send-buffer test.
const FLOOD_SOCKETS: usize = 8;
/// Datagrams each of them sends.
const FLOOD_DATAGRAMS: usize = 8;
/// Their size.
const FLOOD_SIZE: usize = 1000;

/// `FLOOD_SOCKETS` sockets on `local` each send `FLOOD_DATAGRAMS` datagrams
/// to `server`, then read what comes back until they have `expected`
/// datagrams together (128 until told), for at most [`PATIENCE`]. Returns,
/// per socket, how many times each of its datagrams came back (a datagram
/// that is not one of its own counts at index `FLOOD_DATAGRAMS`).
async fn flood(
    local: Ipv4Addr,
    server: SocketAddr,
    expected: tokio::sync::oneshot::Receiver<usize>,
) -> Vec<Vec<usize>> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (forward, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let mut sockets = Vec::new();
    for s in 0..FLOOD_SOCKETS {
        let socket = Arc::new(
            UdpSocket::bind((local, 0))
                .await
                .expect("bind a client socket"),
        );
        let forward = forward.clone();
        let reader = tokio::spawn({
            let socket = socket.clone();
            async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let (n, _) = socket.recv_from(&mut buf).await.expect("recv_from");
                    if forward.send((s, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        });
        sockets.push((socket, reader));
    }
    let datagram = |s: usize, i: usize| {
        let mut payload = numbered(FLOOD_SIZE, i);
        payload[4] = s as u8;
        payload
    };
    for (s, (socket, _)) in sockets.iter().enumerate() {
        for i in 0..FLOOD_DATAGRAMS {
            socket
                .send_to(&datagram(s, i), server)
                .await
                .expect("send_to");
        }
    }

    let mut counts = vec![vec![0usize; FLOOD_DATAGRAMS + 1]; FLOOD_SOCKETS];
    let mut total = 0;
    let mut expected = Some(expected);
    let mut target = 2 * FLOOD_SOCKETS * FLOOD_DATAGRAMS;
    while total < target {
        tokio::select! {
            arrival = arrivals.recv() => {
                let Some((s, payload)) = arrival else { break };
                let index = (0..FLOOD_DATAGRAMS)
                    .find(|&i| payload == datagram(s, i))
                    .unwrap_or(FLOOD_DATAGRAMS);
                counts[s][index] += 1;
                total += 1;
            }
            told = async { expected.as_mut().expect("not yet told").await }, if expected.is_some() => {
                expected = None;
                if let Ok(told) = told {
                    target = told;
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    for (_, reader) in sockets {
        reader.abort();
    }
    counts
}

#[test]
fn handlers_sending_while_the_send_buffer_is_full_all_finish() {
    if std::process::Command::new("tc").arg("-V").output().is_err() {
        eprintln!("skipped: tc is not installed (apt-get install iproute2)");
        return;
    }
    let Some(link) = Link::new(4, 1500) else {
        return;
    };
    // 1 Mbit/s out of the server: the 128 datagrams back take about a
    // second, so its socket's small send buffer stays full meanwhile.
    link.server.run(&[
        "tc",
        "qdisc",
        "add",
        "dev",
        &link.server_if,
        "root",
        "tbf",
        "rate",
        "1mbit",
        "burst",
        "4kb",
        "latency",
        "5s",
    ]);
    let handlers = Arc::new(Handlers::default());
    // Each handler sends an extra copy itself, then returns the payload as
    // its reply: handlers and the listener's flush wait for the same
    // socket to become writable.
    let service = {
        let handlers = handlers.clone();
        service_fn(move |request: Request| {
            let handlers = handlers.clone();
            async move {
                handlers.started.fetch_add(1, Ordering::SeqCst);
                let payload = request.payload().clone();
                match request.sender().send_to(request.peer(), &payload).await {
                    Ok(()) => handlers.extra_sent.fetch_add(1, Ordering::SeqCst),
                    Err(_) => handlers.extra_failed.fetch_add(1, Ordering::SeqCst),
                };
                handlers.finished.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Some(payload))
            }
        })
    };
    let server = Remote::start(
        &link.server,
        SocketAddr::from((link.server_ip, 0)),
        1,
        UdpOptions::new().send_buffer_size(4096),
        service,
    );
    let requests = (FLOOD_SOCKETS * FLOOD_DATAGRAMS) as u64;
    let (tell, told) = tokio::sync::oneshot::channel();
    let (addr, client_ip) = (server.addr, link.client_ip);
    let began = Instant::now();
    let clients = Pending::start(&link.client, move || flood(client_ip, addr, told));
    let stats = server.stats_when("every handler finished and every reply sent or failed", {
        let handlers = handlers.clone();
        move |s| {
            s.in_flight == 0
                && s.replied + s.dropped.send_failed == requests
                && handlers.finished.load(Ordering::SeqCst) == requests
        }
    });
    let settled_in = began.elapsed();
    let extra_sent = handlers.extra_sent.load(Ordering::SeqCst);
    let sent_back = stats.replied + extra_sent;
    let _ = tell.send(sent_back as usize);
    let counts = clients.wait(PATIENCE + PATIENCE / 2, "the clients");
    let took = began.elapsed();
    let received: usize = counts.iter().flatten().sum();
    eprintln!(
        "settled in {settled_in:?}, all received in {took:?}; handlers {handlers:?}; \
         server {stats:?}; clients got {received}: {counts:?}; client {}",
        link.client_losses()
    );

    assert_eq!(
        handlers.started.load(Ordering::SeqCst),
        requests,
        "{handlers:?}"
    );
    assert_eq!(
        handlers.finished.load(Ordering::SeqCst),
        requests,
        "no handler stuck: {handlers:?}"
    );
    assert_eq!(stats.received, requests, "{stats:?}");
    assert_eq!(
        stats.dropped.total(),
        stats.dropped.send_failed,
        "{stats:?}"
    );
    assert_accounted(&stats);
    let failed = stats.dropped.send_failed + handlers.extra_failed.load(Ordering::SeqCst);
    assert_eq!(
        received as u64,
        2 * requests - failed,
        "the clients get every datagram the server's kernel took \
         (replies {}, extra copies {extra_sent}, failed {failed})",
        stats.replied
    );
    for (s, per_datagram) in counts.iter().enumerate() {
        assert_eq!(
            per_datagram[FLOOD_DATAGRAMS], 0,
            "socket {s} got datagrams that are not its own"
        );
        if failed == 0 {
            assert!(
                per_datagram[..FLOOD_DATAGRAMS].iter().all(|&n| n == 2),
                "socket {s}: each datagram comes back twice: {per_datagram:?}"
            );
        }
    }
    // The link, not the server, set the pace: the send buffer was full.
    assert!(
        settled_in >= Duration::from_millis(500),
        "128 datagrams of 1000 bytes at 1 Mbit/s take about a second; took {settled_in:?}"
    );
}

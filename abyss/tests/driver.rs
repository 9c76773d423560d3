//! The listener driver on the in-memory network, with tokio's clock paused:
//! every step is deterministic and no test depends on wall-clock speed.

use std::convert::Infallible;
use std::future::poll_fn;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use abyss::middleware::{DropReason, Dropped};
use abyss::transport::{MemoryNetwork, MemoryTransport, RecvMeta, Transmit, Transport};
use abyss::{BoxError, Request, Server, ServerHandle, Stats};
use bytes::Bytes;
use tokio::sync::Semaphore;
use tower::{Service, service_fn};

const SERVER: &str = "10.0.0.1:53";

/// Lets every task run until all of them wait. With the clock paused, the
/// runtime advances time only once nothing else can make progress, so when
/// this returns the server has done all it can.
async fn run_until_idle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

async fn send(endpoint: &MemoryTransport, to: SocketAddr, payload: &[u8]) {
    let transmit = Transmit::new(to, payload);
    poll_fn(|cx| endpoint.poll_send(cx, std::slice::from_ref(&transmit)))
        .await
        .unwrap();
}

/// Every datagram waiting for `endpoint`, without blocking.
fn drain(endpoint: &MemoryTransport) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    let waker = futures_noop_waker();
    let mut cx = Context::from_waker(&waker);
    loop {
        let mut buf = [0u8; 2048];
        let mut meta = [RecvMeta::default()];
        match endpoint.poll_recv(&mut cx, &mut [IoSliceMut::new(&mut buf)], &mut meta) {
            Poll::Ready(Ok(1)) => out.push((meta[0].peer, buf[..meta[0].len].to_vec())),
            Poll::Ready(other) => panic!("unexpected receive result {other:?}"),
            Poll::Pending => return out,
        }
    }
}

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

fn accounted(stats: &Stats) -> bool {
    stats.received == stats.replied + stats.no_reply + stats.dropped.total() + stats.in_flight
}

/// A handler that waits for a permit from `gate` before echoing.
fn gated(
    gate: Arc<Semaphore>,
) -> impl Service<
    Request,
    Response = Bytes,
    Error = Infallible,
    Future = impl Future<Output = Result<Bytes, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |request: Request| {
        let gate = gate.clone();
        async move {
            gate.acquire().await.expect("gate").forget();
            Ok(request.into_payload())
        }
    })
}

async fn serve_on<S>(net: &MemoryNetwork, builder: abyss::Builder, service: S) -> ServerHandle
where
    S: Service<Request> + Clone + Send + 'static,
    S::Response: abyss::IntoReply + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    builder
        .bind(SERVER)
        .transport(net.clone())
        .serve(service)
        .await
        .unwrap()
}

/// An echo server with `builder`'s options on the transports `bind` opens.
async fn echo_on(bind: impl abyss::transport::Bind, builder: abyss::Builder) -> ServerHandle {
    builder
        .bind(SERVER)
        .transport(bind)
        .serve(service_fn(|r: Request| async move {
            Ok::<_, Infallible>(r.into_payload())
        }))
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_listener_at_its_in_flight_share_stops_reading_until_one_finishes() {
    let net = MemoryNetwork::new();
    let gate = Arc::new(Semaphore::new(0));
    let handle = serve_on(
        &net,
        Server::builder().listeners(1).max_in_flight(4),
        gated(gate.clone()),
    )
    .await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for i in 0..10u8 {
        send(&client, handle.local_addr(), &[i]).await;
    }
    run_until_idle().await;

    let stats = handle.stats();
    assert_eq!(
        stats.received, 4,
        "only max_in_flight datagrams are taken: {stats:?}"
    );
    assert_eq!(stats.in_flight, 4);
    assert_eq!(stats.reads_paused, 1);
    assert_eq!(
        stats.kernel_drops,
        Some(0),
        "the other six wait in the socket queue"
    );

    gate.add_permits(10);
    run_until_idle().await;
    let replies = drain(&client);
    assert_eq!(replies.len(), 10);
    let mut payloads: Vec<u8> = replies.iter().map(|(_, p)| p[0]).collect();
    payloads.sort_unstable();
    assert_eq!(payloads, (0..10).collect::<Vec<_>>());
    let stats = handle.stats();
    assert_eq!(
        (stats.received, stats.replied, stats.in_flight),
        (10, 10, 0)
    );
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_in_flight_limit_is_shared_out_across_listeners() {
    let net = MemoryNetwork::new();
    let gate = Arc::new(Semaphore::new(0));
    let handle = serve_on(
        &net,
        Server::builder().listeners(3).max_in_flight(7),
        gated(gate.clone()),
    )
    .await;
    // Many peers, so all three listeners get some.
    let mut clients = Vec::new();
    for i in 0..60u8 {
        let client = net.bind(format!("10.0.1.{i}:0").parse().unwrap()).unwrap();
        send(&client, handle.local_addr(), &[i]).await;
        clients.push(client);
    }
    run_until_idle().await;
    let stats = handle.stats();
    assert_eq!(
        stats.in_flight, 7,
        "3 + 2 + 2 across three listeners: {stats:?}"
    );
    gate.add_permits(60);
    run_until_idle().await;
    assert_eq!(handle.stats().replied, 60);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_reply_to_an_unanswerable_source_is_refused_and_counted() {
    let net = MemoryNetwork::new();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handle = serve_on(
        &net,
        Server::builder().listeners(1),
        service_fn({
            let seen = seen.clone();
            move |request: Request| {
                seen.lock().unwrap().push(request.peer());
                async move { Ok::<_, Infallible>(request.into_payload()) }
            }
        }),
    )
    .await;
    // A DHCP client has no address yet: it sends from 0.0.0.0:68.
    let dhcp_client = net.bind("0.0.0.0:68".parse().unwrap()).unwrap();
    let discover = Transmit::new(handle.local_addr(), b"discover")
        .with_src_ip(Some("0.0.0.0".parse().unwrap()));
    poll_fn(|cx| dhcp_client.poll_send(cx, std::slice::from_ref(&discover)))
        .await
        .unwrap();
    run_until_idle().await;

    assert_eq!(
        seen.lock().unwrap().as_slice(),
        ["0.0.0.0:68".parse().unwrap()],
        "the handler still sees it"
    );
    let stats = handle.stats();
    assert_eq!(
        (
            stats.received,
            stats.replied,
            stats.dropped.refused_destination
        ),
        (1, 0, 1)
    );
    assert!(accounted(&stats));
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn drops_decided_by_layers_are_counted_under_their_reason() {
    let net = MemoryNetwork::new();
    let service = service_fn(|request: Request| async move {
        let reason = match request.payload().as_ref() {
            b"big" => DropReason::TooLarge,
            b"fast" => DropReason::RateLimited,
            b"busy" => DropReason::Overloaded,
            b"banned" => DropReason::Denied,
            _ => return Ok(request.into_payload()),
        };
        Err::<Bytes, BoxError>(Dropped::new(reason).into())
    });
    // tower's own Timeout maps to timed_out.
    let slow_ones = tower::ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(service_fn(move |request: Request| async move {
            if request.payload().as_ref() == b"slow" {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            service.clone().call(request).await
        }));
    let handle = serve_on(&net, Server::builder().listeners(1), slow_ones).await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for payload in [&b"big"[..], b"fast", b"busy", b"banned", b"slow", b"fine"] {
        send(&client, handle.local_addr(), payload).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let stats = handle.stats();
    let d = stats.dropped;
    assert_eq!(
        (
            d.too_large,
            d.rate_limited,
            d.overloaded,
            d.denied,
            d.timed_out,
            d.handler_error
        ),
        (1, 1, 1, 1, 1, 0),
        "{stats:?}"
    );
    assert_eq!(stats.replied, 1);
    assert_eq!(
        drain(&client),
        vec![(handle.local_addr(), b"fine".to_vec())]
    );
    assert!(accounted(&stats));
    handle.shutdown().await;
}

/// A service whose `poll_ready` fails (or, with `panics`, panics) on its
/// first `failures` polls.
#[derive(Clone)]
struct FailsWhenPolled {
    failures: Arc<AtomicUsize>,
    panics: bool,
}

impl Service<Request> for FailsWhenPolled {
    type Response = Bytes;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Bytes, std::io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            if self.panics {
                panic!("poll_ready exploded");
            }
            return Poll::Ready(Err(std::io::Error::other("not ready, ever")));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        std::future::ready(Ok(request.into_payload()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_poll_ready_drops_the_datagram_and_the_listener_goes_on() {
    let net = MemoryNetwork::new();
    let service = FailsWhenPolled {
        failures: Arc::new(AtomicUsize::new(3)),
        panics: false,
    };
    let handle = serve_on(&net, Server::builder().listeners(1), service).await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for i in 0..5u8 {
        send(&client, handle.local_addr(), &[i]).await;
    }
    run_until_idle().await;
    let stats = handle.stats();
    assert_eq!(stats.received, 5);
    assert_eq!(stats.dropped.handler_error, 3);
    assert_eq!(stats.replied, 2);
    assert!(accounted(&stats));
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_exactly_the_timeout_before_aborting() {
    let net = MemoryNetwork::new();
    let gate = Arc::new(Semaphore::new(0));
    let handle = serve_on(
        &net,
        Server::builder()
            .listeners(1)
            .shutdown_timeout(Duration::from_secs(15)),
        gated(gate.clone()),
    )
    .await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for i in 0..3u8 {
        send(&client, handle.local_addr(), &[i]).await;
    }
    run_until_idle().await;

    let started = tokio::time::Instant::now();
    let shutdown = tokio::spawn({
        let handle = handle.clone();
        async move { handle.shutdown().await }
    });
    // One request finishes during the drain; the other two outlive it.
    run_until_idle().await;
    gate.add_permits(1);
    let report = shutdown.await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(15));
    assert_eq!((report.drained, report.aborted), (1, 2));
    let stats = handle.stats();
    assert_eq!(
        (stats.replied, stats.dropped.aborted, stats.in_flight),
        (1, 2, 0)
    );
    // Datagrams sent after shutdown are never read.
    send(&client, handle.local_addr(), b"late").await;
    run_until_idle().await;
    assert_eq!(handle.stats().received, 3);
}

#[tokio::test(start_paused = true)]
async fn counters_survive_suspend_and_resume() {
    let net = MemoryNetwork::new();
    let handle = serve_on(
        &net,
        Server::builder().listeners(2),
        service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) }),
    )
    .await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    send(&client, handle.local_addr(), b"one").await;
    run_until_idle().await;
    handle.suspend().await.unwrap();
    send(&client, handle.local_addr(), b"lost: nobody is bound").await;
    run_until_idle().await;
    assert_eq!(handle.resume().await.unwrap(), SERVER.parse().unwrap());
    send(&client, handle.local_addr(), b"two").await;
    run_until_idle().await;
    let stats = handle.stats();
    assert_eq!((stats.received, stats.replied), (2, 2));
    let replies: Vec<Vec<u8>> = drain(&client).into_iter().map(|(_, p)| p).collect();
    assert_eq!(replies, [b"one".to_vec(), b"two".to_vec()]);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_full_socket_queue_is_reported_as_kernel_drops() {
    let net = MemoryNetwork::new();
    net.set_queue_capacity(8);
    let gate = Arc::new(Semaphore::new(0));
    let handle = serve_on(
        &net,
        Server::builder().listeners(1).max_in_flight(2),
        gated(gate.clone()),
    )
    .await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for i in 0..30u8 {
        send(&client, handle.local_addr(), &[i]).await;
    }
    run_until_idle().await;
    gate.add_permits(30);
    run_until_idle().await;
    let stats = handle.stats();
    // Every datagram sent is either counted by the server or by the "kernel".
    assert_eq!(
        stats.received + stats.kernel_drops.unwrap(),
        30,
        "{stats:?}"
    );
    assert!(stats.kernel_drops.unwrap() > 0);
    assert_eq!(stats.replied, stats.received);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_service_that_is_not_ready_leaves_datagrams_in_the_socket_queue() {
    let net = MemoryNetwork::new();
    let gate = Arc::new(Semaphore::new(0));
    // One request at a time: poll_ready stays pending while it is handled.
    let service = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(gated(gate.clone()));
    let handle = serve_on(&net, Server::builder().listeners(1), service).await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for i in 0..100u8 {
        send(&client, handle.local_addr(), &[i]).await;
    }
    run_until_idle().await;
    let stats = handle.stats();
    // The one being handled, plus at most one receive batch (32) waiting for
    // poll_ready; the rest stays in the socket's queue.
    assert!(
        (1..=33).contains(&stats.received),
        "read past the backpressure: {stats:?}"
    );

    gate.add_permits(100);
    run_until_idle().await;
    assert_eq!(drain(&client).len(), 100);
    assert_eq!(handle.stats().replied, 100);
    handle.shutdown().await;
}

/// A memory transport whose receive fails on every third call (an ICMP
/// error, as a real socket reports it) and whose send fails for payloads
/// starting with `!` (a full send buffer).
#[derive(Debug)]
struct Faulty {
    inner: MemoryTransport,
    calls: AtomicUsize,
}

impl Transport for Faulty {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        if self.calls.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionRefused.into()));
        }
        // One datagram per call, so errors interleave with datagrams.
        self.inner.poll_recv(cx, &mut bufs[..1], &mut meta[..1])
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if transmits[0].contents.starts_with(b"!") {
            return Poll::Ready(Err(std::io::Error::from_raw_os_error(105))); // ENOBUFS
        }
        self.inner.poll_send(cx, &transmits[..1])
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[derive(Debug, Clone)]
struct FaultyNetwork(MemoryNetwork);

impl abyss::transport::Bind for FaultyNetwork {
    fn bind_group(
        &self,
        addr: SocketAddr,
        count: usize,
    ) -> std::io::Result<Vec<Arc<dyn Transport>>> {
        assert_eq!(count, 1, "this test serves with one listener");
        let inner = self.0.bind(addr)?;
        Ok(vec![Arc::new(Faulty {
            inner,
            calls: AtomicUsize::new(0),
        })])
    }
}

#[tokio::test(start_paused = true)]
async fn receive_and_send_errors_are_counted_and_the_listener_goes_on() {
    let net = MemoryNetwork::new();
    let handle = echo_on(FaultyNetwork(net.clone()), Server::builder().listeners(1)).await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for payload in [&b"a"[..], b"!b", b"c", b"!d", b"e", b"f"] {
        send(&client, handle.local_addr(), payload).await;
        run_until_idle().await;
    }
    let stats = handle.stats();
    assert_eq!(stats.received, 6);
    assert_eq!(stats.dropped.send_failed, 2);
    assert_eq!(stats.replied, 4);
    assert!(stats.receive_errors >= 2, "{stats:?}");
    assert!(accounted(&stats));
    let replies: Vec<Vec<u8>> = drain(&client).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        replies,
        [b"a".to_vec(), b"c".to_vec(), b"e".to_vec(), b"f".to_vec()]
    );
    handle.shutdown().await;
}

/// A memory transport that claims GSO but whose path refuses it (EIO), as a
/// device without checksum offload does.
#[derive(Debug)]
struct NoGsoPath(MemoryTransport);

impl Transport for NoGsoPath {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if transmits[0].segment_size.is_some() {
            return Poll::Ready(Err(std::io::Error::from_raw_os_error(5))); // EIO
        }
        // Only the transmits before the first GSO one go out in this call.
        let plain = transmits
            .iter()
            .take_while(|t| t.segment_size.is_none())
            .count();
        self.0.poll_send(cx, &transmits[..plain])
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_receive_batch(&self) -> usize {
        32
    }

    fn max_transmit_batch(&self) -> usize {
        32
    }

    fn max_transmit_segments(&self) -> usize {
        64
    }
}

#[derive(Debug, Clone)]
struct NoGsoNetwork(MemoryNetwork);

impl abyss::transport::Bind for NoGsoNetwork {
    fn bind_group(
        &self,
        addr: SocketAddr,
        _count: usize,
    ) -> std::io::Result<Vec<Arc<dyn Transport>>> {
        Ok(vec![Arc::new(NoGsoPath(self.0.bind(addr)?))])
    }
}

#[tokio::test(start_paused = true)]
async fn replies_fall_back_to_one_datagram_each_when_the_path_refuses_gso() {
    let net = MemoryNetwork::new();
    let handle = echo_on(NoGsoNetwork(net.clone()), Server::builder().listeners(1)).await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    // Five same-sized datagrams from one peer: a GSO run for the driver.
    for i in 0..5u8 {
        send(&client, handle.local_addr(), &[i; 8]).await;
    }
    run_until_idle().await;
    let replies: Vec<Vec<u8>> = drain(&client).into_iter().map(|(_, p)| p).collect();
    assert_eq!(replies, (0..5u8).map(|i| vec![i; 8]).collect::<Vec<_>>());
    let stats = handle.stats();
    assert_eq!((stats.replied, stats.dropped.send_failed), (5, 0));
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_poll_ready_drops_one_datagram_and_the_listener_goes_on() {
    let net = MemoryNetwork::new();
    let service = FailsWhenPolled {
        failures: Arc::new(AtomicUsize::new(1)),
        panics: true,
    };
    let handle = serve_on(&net, Server::builder().listeners(1), service).await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for i in 0..3u8 {
        send(&client, handle.local_addr(), &[i]).await;
    }
    run_until_idle().await;
    let stats = handle.stats();
    assert_eq!(
        (stats.received, stats.dropped.panicked, stats.replied),
        (3, 1, 2),
        "{stats:?}"
    );
    assert_eq!((handle.live_listeners(), stats.listener_restarts), (1, 0));
    assert!(accounted(&stats));
    handle.shutdown().await;
}

/// A future that answers after `delay` (or at once) and panics when
/// dropped.
struct ExplodesOnDrop {
    reply: Option<Bytes>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for ExplodesOnDrop {
    type Output = Result<Bytes, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(sleep) = self.sleep.as_mut() {
            std::task::ready!(sleep.as_mut().poll(cx));
        }
        Poll::Ready(Ok(self.reply.take().expect("polled after the end")))
    }
}

impl Drop for ExplodesOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("a destructor exploded");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn panics_in_the_destructors_of_service_futures_are_counted_and_the_listener_goes_on() {
    let net = MemoryNetwork::new();
    let service = service_fn(|request: Request| {
        let slow = request.payload().as_ref() == b"slow";
        ExplodesOnDrop {
            reply: Some(request.into_payload()),
            sleep: slow.then(|| Box::pin(tokio::time::sleep(Duration::from_secs(60)))),
        }
    });
    let handle = serve_on(
        &net,
        Server::builder()
            .listeners(1)
            .shutdown_timeout(Duration::from_secs(1)),
        service,
    )
    .await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    send(&client, handle.local_addr(), b"fast").await;
    send(&client, handle.local_addr(), b"slow").await;
    run_until_idle().await;
    let stats = handle.stats();
    assert_eq!(
        (stats.received, stats.dropped.panicked, stats.in_flight),
        (2, 1, 1),
        "{stats:?}"
    );
    // The slow one is dropped at the shutdown deadline: its destructor
    // panics too, and the report still comes back.
    let report = handle.shutdown().await;
    assert_eq!((report.drained, report.aborted), (0, 1));
    let stats = handle.stats();
    assert_eq!((stats.dropped.aborted, stats.listener_restarts), (1, 0));
    assert!(accounted(&stats));
}

/// Memory transports whose receive panics when it meets a datagram saying
/// `boom` (the first time only), or, `always`, on every call.
#[derive(Debug, Clone)]
struct PanickyNetwork {
    net: MemoryNetwork,
    armed: Arc<std::sync::atomic::AtomicBool>,
    always: bool,
}

#[derive(Debug)]
struct Panicky {
    inner: Arc<dyn Transport>,
    armed: Arc<std::sync::atomic::AtomicBool>,
    always: bool,
}

impl Transport for Panicky {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        assert!(!self.always, "the transport always explodes");
        let polled = self.inner.poll_recv(cx, &mut bufs[..1], &mut meta[..1]);
        if let Poll::Ready(Ok(1)) = polled
            && &bufs[0][..meta[0].len] == b"boom"
            && self.armed.swap(false, Ordering::SeqCst)
        {
            panic!("the transport exploded");
        }
        polled
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.poll_send(cx, transmits)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn kernel_drops(&self) -> Option<u64> {
        self.inner.kernel_drops()
    }

    fn stop_receiving(&self) -> std::io::Result<()> {
        self.inner.stop_receiving()
    }
}

impl PanickyNetwork {
    fn wrap(&self, inner: Arc<dyn Transport>) -> Arc<dyn Transport> {
        Arc::new(Panicky {
            inner,
            armed: self.armed.clone(),
            always: self.always,
        })
    }
}

impl abyss::transport::Bind for PanickyNetwork {
    fn bind_group(
        &self,
        addr: SocketAddr,
        count: usize,
    ) -> std::io::Result<Vec<Arc<dyn Transport>>> {
        let group = self.net.bind_group(addr, count)?;
        Ok(group.into_iter().map(|t| self.wrap(t)).collect())
    }

    fn join_group(&self, addr: SocketAddr) -> std::io::Result<Arc<dyn Transport>> {
        Ok(self.wrap(self.net.join_group(addr)?))
    }
}

#[tokio::test(start_paused = true)]
async fn a_listener_that_dies_is_replaced_and_what_it_held_is_counted() {
    let net = MemoryNetwork::new();
    let gate = Arc::new(Semaphore::new(0));
    let handle = Server::bind(SERVER)
        .listeners(1)
        .transport(PanickyNetwork {
            net: net.clone(),
            armed: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            always: false,
        })
        .serve(gated(gate.clone()))
        .await
        .unwrap();
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    // One request in flight, then a datagram that takes the listener down,
    // then one queued behind it.
    send(&client, handle.local_addr(), b"held").await;
    run_until_idle().await;
    send(&client, handle.local_addr(), b"boom").await;
    send(&client, handle.local_addr(), b"queued").await;
    // The replacement starts after a short delay (10 ms for a listener that
    // dies young), so that one that keeps dying cannot spin.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stats = handle.stats();
    assert_eq!(stats.listener_restarts, 1, "{stats:?}");
    assert_eq!(handle.live_listeners(), 1);
    assert_eq!(stats.dropped.aborted, 1, "the request in flight: {stats:?}");
    assert_eq!(stats.unread_at_close, 1, "the datagram queued: {stats:?}");
    assert!(accounted(&stats));

    // The replacement serves.
    gate.add_permits(10);
    send(&client, handle.local_addr(), b"after").await;
    run_until_idle().await;
    let replies: Vec<Vec<u8>> = drain(&client).into_iter().map(|(_, p)| p).collect();
    assert_eq!(replies, [b"after".to_vec()]);
    let report = handle.shutdown().await;
    assert_eq!(report.aborted, 0);
    assert_eq!(handle.live_listeners(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_listener_that_keeps_dying_is_replaced_with_growing_pauses() {
    let net = MemoryNetwork::new();
    let handle = echo_on(
        PanickyNetwork {
            net: net.clone(),
            armed: Arc::default(),
            always: true,
        },
        Server::builder().listeners(1),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // 10 ms, 20 ms, ... up to 5 s between deaths: about a dozen in 10 s.
    let restarts = handle.stats().listener_restarts;
    assert!((5..=20).contains(&restarts), "{restarts} restarts in 10 s");
    handle.shutdown().await;
    assert_eq!(handle.live_listeners(), 0);
}

/// A transport that answers receives with nonsense: `Ok(0)` forever, or
/// (`overflow`) once a count larger than the buffers and once a datagram
/// longer than its buffer, then the truth.
#[derive(Debug)]
struct Nonsense {
    inner: MemoryTransport,
    overflow: bool,
    calls: AtomicUsize,
}

impl Transport for Nonsense {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.overflow {
            // Enough to tell a busy loop from a paused one, then quiet, so
            // that a test of a spinning listener ends.
            if call > 10_000 {
                return Poll::Pending;
            }
            return Poll::Ready(Ok(0));
        }
        match call {
            0 => Poll::Ready(Ok(bufs.len() + 1)),
            1 => {
                meta[0] = RecvMeta::new("10.0.0.9:9".parse().unwrap(), bufs[0].len() + 1);
                Poll::Ready(Ok(1))
            }
            _ => self.inner.poll_recv(cx, bufs, meta),
        }
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.poll_send(cx, transmits)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_receive_batch(&self) -> usize {
        4
    }
}

#[derive(Debug, Clone)]
struct NonsenseNetwork {
    net: MemoryNetwork,
    overflow: bool,
    calls: Arc<std::sync::Mutex<Vec<Arc<Nonsense>>>>,
}

impl abyss::transport::Bind for NonsenseNetwork {
    fn bind_group(
        &self,
        addr: SocketAddr,
        _count: usize,
    ) -> std::io::Result<Vec<Arc<dyn Transport>>> {
        let transport = Arc::new(Nonsense {
            inner: self.net.bind(addr)?,
            overflow: self.overflow,
            calls: AtomicUsize::new(0),
        });
        self.calls.lock().unwrap().push(transport.clone());
        Ok(vec![transport])
    }
}

#[tokio::test(start_paused = true)]
async fn a_transport_that_receives_nothing_forever_is_polled_with_pauses_not_spun() {
    let net = NonsenseNetwork {
        net: MemoryNetwork::new(),
        overflow: false,
        calls: Arc::default(),
    };
    let handle = echo_on(net.clone(), Server::builder().listeners(1)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = net.calls.lock().unwrap()[0].calls.load(Ordering::SeqCst);
    // Backing off from 1 ms, doubling up to 1 s: about 20 calls in 10 s.
    assert!(calls < 100, "{calls} receive calls in 10 s");
    let stats = handle.stats();
    assert_eq!(stats.receive_errors as usize, calls, "{stats:?}");
    assert_eq!(stats.received, 0);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_transport_that_reports_more_than_its_buffers_hold_is_a_counted_error_not_a_panic() {
    let net = NonsenseNetwork {
        net: MemoryNetwork::new(),
        overflow: true,
        calls: Arc::default(),
    };
    let handle = echo_on(
        net.clone(),
        Server::builder().listeners(1).max_datagram_size(1500),
    )
    .await;
    let client = net.net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    send(&client, handle.local_addr(), b"real").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = handle.stats();
    assert_eq!(stats.receive_errors, 2, "{stats:?}");
    assert_eq!((stats.received, stats.replied), (1, 1), "{stats:?}");
    assert_eq!((handle.live_listeners(), stats.listener_restarts), (1, 0));
    assert_eq!(drain(&client).len(), 1);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_suspend_given_up_midway_still_closes_the_old_sockets_before_resume_opens_new_ones() {
    let net = MemoryNetwork::new();
    let gate = Arc::new(Semaphore::new(0));
    let handle = serve_on(
        &net,
        Server::builder()
            .listeners(2)
            .shutdown_timeout(Duration::from_secs(30)),
        gated(gate.clone()),
    )
    .await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    send(&client, handle.local_addr(), b"held").await;
    run_until_idle().await;
    // The caller stops waiting while a request is still draining.
    let given_up = tokio::time::timeout(Duration::from_secs(1), handle.suspend()).await;
    assert!(
        given_up.is_err(),
        "the drain outlives the caller's patience"
    );
    let resumed = tokio::spawn({
        let handle = handle.clone();
        async move { handle.resume().await }
    });
    run_until_idle().await;
    assert!(!resumed.is_finished(), "resume waits for the old sockets");
    gate.add_permits(10);
    assert_eq!(resumed.await.unwrap().unwrap(), SERVER.parse().unwrap());
    assert_eq!(handle.live_listeners(), 2, "only the new group serves");
    send(&client, handle.local_addr(), b"again").await;
    run_until_idle().await;
    let replies: Vec<Vec<u8>> = drain(&client).into_iter().map(|(_, p)| p).collect();
    assert_eq!(replies, [b"held".to_vec(), b"again".to_vec()]);
    handle.shutdown().await;
}

/// A memory transport with GSO whose path carries segments of at most 100
/// bytes: a longer GSO segment is refused with `EMSGSIZE`, as Linux does.
/// GSO transmits it takes are split into their datagrams and counted.
#[derive(Debug)]
struct ShortPath {
    inner: MemoryTransport,
    gso_sent: AtomicUsize,
}

impl Transport for ShortPath {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<std::io::Result<usize>> {
        for (i, transmit) in transmits.iter().enumerate() {
            match transmit.segment_size {
                Some(size) if size > 100 => {
                    return if i == 0 {
                        Poll::Ready(Err(std::io::Error::from_raw_os_error(90)))
                    } else {
                        Poll::Ready(Ok(i))
                    };
                }
                Some(size) => {
                    self.gso_sent.fetch_add(1, Ordering::SeqCst);
                    for segment in transmit.contents.chunks(size) {
                        let one = Transmit::new(transmit.destination, segment);
                        let _ = self.inner.poll_send(cx, std::slice::from_ref(&one));
                    }
                }
                None => {
                    let _ = self.inner.poll_send(cx, std::slice::from_ref(transmit));
                }
            }
        }
        Poll::Ready(Ok(transmits.len()))
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_receive_batch(&self) -> usize {
        32
    }

    fn max_transmit_batch(&self) -> usize {
        32
    }

    fn max_transmit_segments(&self) -> usize {
        64
    }
}

#[derive(Debug, Clone)]
struct ShortPathNetwork {
    net: MemoryNetwork,
    bound: Arc<std::sync::Mutex<Vec<Arc<ShortPath>>>>,
}

impl abyss::transport::Bind for ShortPathNetwork {
    fn bind_group(
        &self,
        addr: SocketAddr,
        _count: usize,
    ) -> std::io::Result<Vec<Arc<dyn Transport>>> {
        let transport = Arc::new(ShortPath {
            inner: self.net.bind(addr)?,
            gso_sent: AtomicUsize::new(0),
        });
        self.bound.lock().unwrap().push(transport.clone());
        Ok(vec![transport])
    }
}

#[tokio::test(start_paused = true)]
async fn a_gso_run_the_path_refuses_is_resent_datagram_by_datagram_and_gso_stays_on() {
    let net = ShortPathNetwork {
        net: MemoryNetwork::new(),
        bound: Arc::default(),
    };
    let handle = echo_on(net.clone(), Server::builder().listeners(1)).await;
    let client = net.net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for i in 0..5u8 {
        send(&client, handle.local_addr(), &[i; 200]).await;
    }
    run_until_idle().await;
    let replies: Vec<Vec<u8>> = drain(&client).into_iter().map(|(_, p)| p).collect();
    assert_eq!(replies, (0..5u8).map(|i| vec![i; 200]).collect::<Vec<_>>());
    for i in 0..5u8 {
        send(&client, handle.local_addr(), &[i; 50]).await;
    }
    run_until_idle().await;
    assert_eq!(drain(&client).len(), 5);
    let stats = handle.stats();
    assert_eq!(
        (stats.replied, stats.dropped.send_failed),
        (10, 0),
        "{stats:?}"
    );
    let gso_sent = net.bound.lock().unwrap()[0].gso_sent.load(Ordering::SeqCst);
    assert!(gso_sent > 0, "GSO is still used for runs the path takes");
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn handlers_spawned_on_the_workers_are_answered_counted_drained_and_aborted() {
    let net = MemoryNetwork::new();
    let gate = Arc::new(Semaphore::new(0));
    let service = service_fn({
        let gate = gate.clone();
        move |request: Request| {
            let gate = gate.clone();
            async move {
                match request.payload().as_ref() {
                    b"panic" => panic!("a spawned handler panicked"),
                    b"wait" => gate.acquire().await.expect("gate").forget(),
                    _ => {}
                }
                Ok::<_, Infallible>(request.into_payload())
            }
        }
    });
    let handle = serve_on(
        &net,
        Server::builder()
            .listeners(1)
            .dispatch(abyss::Dispatch::Spawn)
            .shutdown_timeout(Duration::from_secs(15)),
        service,
    )
    .await;
    let client = net.bind("10.0.0.2:0".parse().unwrap()).unwrap();
    for payload in [&b"now"[..], b"panic", b"wait", b"wait", b"wait"] {
        send(&client, handle.local_addr(), payload).await;
    }
    run_until_idle().await;
    let stats = handle.stats();
    assert_eq!(
        (stats.replied, stats.dropped.panicked, stats.in_flight),
        (1, 1, 3),
        "{stats:?}"
    );
    // One finishes during the drain; two outlive it.
    let shutdown = tokio::spawn({
        let handle = handle.clone();
        async move { handle.shutdown().await }
    });
    run_until_idle().await;
    gate.add_permits(1);
    let report = shutdown.await.unwrap();
    assert_eq!((report.drained, report.aborted), (1, 2));
    let stats = handle.stats();
    assert_eq!(
        (stats.replied, stats.dropped.aborted, stats.in_flight),
        (2, 2, 0),
        "{stats:?}"
    );
    assert!(accounted(&stats));
    let replies: Vec<Vec<u8>> = drain(&client).into_iter().map(|(_, p)| p).collect();
    assert_eq!(replies, [b"now".to_vec(), b"wait".to_vec()]);
}

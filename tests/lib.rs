//! Helpers shared by the end-to-end tests: clients on loopback, an echo
//! service, and bounded waits on a server's counters.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::time::Duration;

use abyss::{Request, ServerHandle, Stats};
use bytes::Bytes;
use tokio::net::UdpSocket;

/// How long any single wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A service that answers every datagram with its own payload.
pub fn echo() -> impl tower::Service<
    Request,
    Response = Option<Bytes>,
    Error = Infallible,
    Future = impl Future<Output = Result<Option<Bytes>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(|request: Request| async move { Ok(Some(request.into_payload())) })
}

/// An echo whose requests each wait for a permit from `gate` (and use it
/// up): the test decides when each may finish, or, giving none, keeps them
/// in flight.
pub fn gated(
    gate: std::sync::Arc<tokio::sync::Semaphore>,
) -> impl tower::Service<
    Request,
    Response = Bytes,
    Error = Infallible,
    Future = impl Future<Output = Result<Bytes, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |request: Request| {
        let gate = gate.clone();
        async move {
            gate.acquire().await.expect("the gate stays open").forget();
            Ok(request.into_payload())
        }
    })
}

/// A UDP socket on an ephemeral port of `ip`.
pub async fn client_on(ip: &str) -> UdpSocket {
    UdpSocket::bind((ip, 0))
        .await
        .unwrap_or_else(|e| panic!("bind a client on {ip}: {e}"))
}

/// A UDP socket on an ephemeral port of 127.0.0.1.
pub async fn client() -> UdpSocket {
    client_on("127.0.0.1").await
}

/// Receives one datagram, or `None` after `wait`.
pub async fn recv_within(socket: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            buf.truncate(n);
            Some((buf, from))
        }
        Ok(Err(e)) => panic!("recv_from failed: {e}"),
        Err(_) => None,
    }
}

/// Sends `payload` to `server` and returns the reply, failing the test if
/// none comes within [`PATIENCE`].
pub async fn ask(socket: &UdpSocket, server: SocketAddr, payload: &[u8]) -> Vec<u8> {
    socket.send_to(payload, server).await.expect("send_to");
    recv_within(socket, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no reply from {server} within {PATIENCE:?}"))
        .0
}

/// Waits until the server's counters satisfy `done`, checking every 2 ms for
/// at most [`PATIENCE`]; fails the test with `what` and the last snapshot.
pub async fn wait_for_stats(
    handle: &ServerHandle,
    what: &str,
    done: impl Fn(&Stats) -> bool,
) -> Stats {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let stats = handle.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last stats: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Checks that every received datagram is accounted for.
#[track_caller]
pub fn assert_accounted(stats: &Stats) {
    assert_eq!(
        stats.received,
        stats.replied + stats.no_reply + stats.dropped.total() + stats.in_flight,
        "received must equal replied + no_reply + dropped + in_flight: {stats:?}"
    );
}

/// The counters once nothing is in flight: a reply reaches its client
/// before the server has counted it, so tests wait for the count.
pub async fn settled(handle: &ServerHandle) -> Stats {
    wait_for_stats(handle, "nothing in flight", |s| s.in_flight == 0).await
}

/// A network namespace of the test's own (Linux, root only), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with its loopback up, or `None` (saying why on
    /// stderr) where that is not possible.
    pub fn new(tag: &str) -> Option<Self> {
        let name = format!("abyss-{tag}-{}", std::process::id());
        let created = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !created {
            eprintln!("skipped: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        let netns = Self { name };
        netns.run(&["ip", "link", "set", "lo", "up"]);
        Some(netns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace, failing the test if it fails.
    pub fn run(&self, args: &[&str]) {
        let status = self.command(args).status().expect("run ip netns exec");
        assert!(
            status.success(),
            "`{}` failed in {}",
            args.join(" "),
            self.name
        );
    }

    /// A command to run inside the namespace.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    /// Runs `body` on a new thread that has entered the namespace, so the
    /// sockets it opens live there.
    pub fn spawn<T: Send + 'static>(
        &self,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("enter the namespace");
            body()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects two namespaces with a veth pair (`left` in `a`, `right` in `b`),
/// both ends up.
pub fn veth(a: &Netns, left: &str, b: &Netns, right: &str) {
    let run = |args: &[&str]| {
        let status = std::process::Command::new("ip")
            .args(args)
            .status()
            .expect("run ip");
        assert!(status.success(), "`ip {}` failed", args.join(" "));
    };
    run(&[
        "link",
        "add",
        left,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        right,
        "netns",
        b.name(),
    ]);
    a.run(&["ip", "link", "set", left, "up"]);
    b.run(&["ip", "link", "set", right, "up"]);
}

/// A printing listener of the examples (DHCP, mDNS) serving from inside a
/// namespace; stopped gracefully when dropped.
#[derive(Debug)]
pub struct NetnsListener {
    /// The lines it printed.
    pub lines: std::sync::mpsc::Receiver<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Netns {
    /// Serves the examples' printing listener for `protocol` (lines made by
    /// `describe`) on `addr` with `options`, one listener, from a thread
    /// inside the namespace. Returns once it is bound.
    pub fn serve_printing(
        &self,
        addr: SocketAddr,
        options: abyss::UdpOptions,
        protocol: &'static str,
        describe: fn(SocketAddr, &[u8]) -> Option<String>,
    ) -> NetnsListener {
        let (lines, printed) = std::sync::mpsc::channel::<String>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel::<()>();
        let thread = self.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let sink = move |line: String| {
                    let _ = lines.send(line);
                };
                let handle = abyss::Server::bind(addr)
                    .listeners(1)
                    .udp_options(options)
                    .serve(abyss_examples::printing_service(protocol, describe, sink))
                    .await
                    .expect("serve in the namespace");
                ready.send(()).unwrap();
                let _ = stopped.await;
                handle.shutdown().await;
            });
        });
        is_ready
            .recv_timeout(PATIENCE)
            .expect("the listener started");
        NetnsListener {
            lines: printed,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for NetnsListener {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A global allocator that counts allocations and live bytes, for the
/// tests that bound them. It counts the whole process, so a binary using
/// it holds one test only, and installs it itself:
///
/// ```ignore
/// #[global_allocator]
/// static GLOBAL: abyss_tests::CountingAllocator = abyss_tests::CountingAllocator;
/// ```
#[derive(Debug)]
pub struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

impl CountingAllocator {
    /// Allocations (and reallocations) so far.
    pub fn allocations() -> u64 {
        ALLOCATIONS.load(Ordering::SeqCst)
    }

    /// Bytes allocated and not yet freed.
    pub fn live_bytes() -> isize {
        LIVE_BYTES.load(Ordering::SeqCst)
    }
}

// SAFETY: defers to the system allocator; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

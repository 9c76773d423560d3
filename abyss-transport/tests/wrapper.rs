//! Transports that wrap other transports keep what the wrapped one can do.

use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use abyss_transport::{RecvMeta, Transmit, Transport, UdpOptions, UdpTransport};

const PATIENCE: Duration = Duration::from_secs(10);

/// A transport with every capability a kernel socket may have, holding
/// queued datagrams in memory: batches of 8 in, 16 out, GRO of 4, GSO of
/// 64, 7 kernel drops.
#[derive(Debug)]
struct Capable {
    queued: Mutex<Vec<Vec<u8>>>,
    stopped: AtomicBool,
}

const PEER: &str = "192.0.2.1:5000";

impl Capable {
    fn with(datagrams: usize) -> Self {
        Self {
            queued: Mutex::new((0..datagrams).map(|i| vec![i as u8; 3]).collect()),
            stopped: AtomicBool::new(false),
        }
    }
}

impl Transport for Capable {
    fn poll_recv(
        &self,
        _cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut queued = self.queued.lock().unwrap();
        let n = bufs
            .len()
            .min(meta.len())
            .min(self.max_receive_batch())
            .min(queued.len());
        for (i, datagram) in queued.drain(..n).enumerate() {
            bufs[i][..datagram.len()].copy_from_slice(&datagram);
            meta[i] = RecvMeta::new(PEER.parse().unwrap(), datagram.len());
        }
        Poll::Ready(Ok(n))
    }

    fn poll_send(
        &self,
        _cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(transmits.len().min(self.max_transmit_batch())))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok("192.0.2.2:53".parse().unwrap())
    }

    fn max_receive_batch(&self) -> usize {
        8
    }

    fn max_transmit_batch(&self) -> usize {
        16
    }

    fn max_receive_segments(&self) -> usize {
        4
    }

    fn max_transmit_segments(&self) -> usize {
        64
    }

    fn kernel_drops(&self) -> Option<u64> {
        Some(7)
    }

    fn stop_receiving(&self) -> io::Result<()> {
        self.stopped.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// The wrapper from `Transport`'s docs: counts datagrams, implements the
/// three required methods and names its inner transport.
#[derive(Debug)]
struct Counting<T> {
    inner: T,
    received: AtomicU64,
}

impl<T> Counting<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            received: AtomicU64::new(0),
        }
    }
}

impl<T: Transport> Transport for Counting<T> {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &polled {
            self.received.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_send(cx, transmits)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn inner(&self) -> Option<&dyn Transport> {
        Some(&self.inner)
    }
}

/// A wrapper that does not name its inner transport.
#[derive(Debug)]
struct Opaque<T>(T);

impl<T: Transport> Transport for Opaque<T> {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_send(cx, transmits)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// Everything a caller sizes its work with, or counts by.
fn capabilities(transport: &dyn Transport) -> (usize, usize, usize, usize, Option<u64>) {
    (
        transport.max_receive_batch(),
        transport.max_transmit_batch(),
        transport.max_receive_segments(),
        transport.max_transmit_segments(),
        transport.kernel_drops(),
    )
}

const CAPABLE: (usize, usize, usize, usize, Option<u64>) = (8, 16, 4, 64, Some(7));

/// Receives once the way a server's listener does: as many buffers as the
/// transport says one call can fill.
fn receive_batch(transport: &dyn Transport) -> usize {
    let batch = transport.max_receive_batch();
    let mut storage = vec![[0u8; 16]; batch];
    let mut meta = vec![RecvMeta::default(); batch];
    let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match transport.poll_recv(&mut cx, &mut bufs, &mut meta) {
        Poll::Ready(Ok(n)) => n,
        other => panic!("the queue is not empty: {other:?}"),
    }
}

#[test]
fn a_wrapper_that_names_its_inner_transport_keeps_every_capability() {
    let wrapper = Counting::new(Capable::with(0));
    assert_eq!(capabilities(&wrapper), CAPABLE);
    wrapper.stop_receiving().unwrap();
    assert!(
        wrapper.inner.stopped.load(Ordering::Relaxed),
        "stop_receiving reached the wrapped transport"
    );
}

#[test]
fn a_wrapper_that_does_not_name_its_inner_transport_moves_one_datagram_at_a_time() {
    let opaque = Opaque(Capable::with(20));
    assert_eq!(capabilities(&opaque), (1, 1, 1, 1, None));
    assert_eq!(receive_batch(&opaque), 1);
    opaque.stop_receiving().unwrap();
    assert!(!opaque.0.stopped.load(Ordering::Relaxed));
}

#[test]
fn a_caller_receives_whole_batches_through_a_wrapper() {
    let wrapper = Counting::new(Capable::with(20));
    assert_eq!(receive_batch(&wrapper), 8);
    assert_eq!(receive_batch(&wrapper), 8);
    assert_eq!(receive_batch(&wrapper), 4);
    assert_eq!(wrapper.received.load(Ordering::Relaxed), 20);
}

#[test]
fn wrappers_of_wrappers_reach_the_innermost_transport() {
    let layered = Counting::new(Counting::new(Capable::with(9)));
    assert_eq!(capabilities(&layered), CAPABLE);
    assert_eq!(receive_batch(&layered), 8);
    layered.stop_receiving().unwrap();
    assert!(layered.inner.inner.stopped.load(Ordering::Relaxed));
}

#[test]
fn arcs_and_boxes_of_a_transport_forward_every_method() {
    let shared = Arc::new(Capable::with(10));
    let as_dyn: Arc<dyn Transport> = shared.clone();
    let boxed: Box<dyn Transport> = Box::new(Arc::clone(&as_dyn));
    for transport in [&shared as &dyn Transport, &as_dyn, &boxed] {
        assert_eq!(capabilities(transport), CAPABLE);
        assert_eq!(
            transport.local_addr().unwrap(),
            shared.local_addr().unwrap()
        );
    }
    assert_eq!(receive_batch(&boxed), 8);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let to = PEER.parse().unwrap();
    let transmits = vec![Transmit::new(to, b"x"); 20];
    assert!(matches!(
        boxed.poll_send(&mut cx, &transmits),
        Poll::Ready(Ok(16))
    ));
    boxed.stop_receiving().unwrap();
    assert!(shared.stopped.load(Ordering::Relaxed));
}

#[test]
fn a_wrapper_can_wrap_a_shared_transport() {
    let shared: Arc<dyn Transport> = Arc::new(Capable::with(3));
    let wrapper = Counting::new(shared);
    assert_eq!(capabilities(&wrapper), CAPABLE);
    assert_eq!(receive_batch(&wrapper), 3);
}

#[tokio::test]
async fn a_wrapped_udp_socket_keeps_the_sockets_batching_and_drop_counter() {
    let udp = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new()).unwrap();
    let expected = capabilities(&udp);
    let wrapper = Counting::new(udp);
    assert_eq!(capabilities(&wrapper), expected);
    if cfg!(target_os = "linux") {
        assert_eq!(expected.0, 32, "recvmmsg");
        assert!(expected.4.is_some(), "SO_MEMINFO");
    }

    // Datagrams still flow through it.
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = wrapper.local_addr().unwrap();
    for _ in 0..3 {
        client.send_to(b"ping", addr).await.unwrap();
    }
    let mut received = 0;
    while received < 3 {
        let batch = wrapper.max_receive_batch();
        let mut storage = vec![[0u8; 16]; batch];
        let mut meta = vec![RecvMeta::default(); batch];
        received += tokio::time::timeout(
            PATIENCE,
            poll_fn(|cx| {
                let mut bufs: Vec<IoSliceMut<'_>> =
                    storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                wrapper.poll_recv(cx, &mut bufs, &mut meta)
            }),
        )
        .await
        .expect("the datagrams within the patience")
        .unwrap();
    }
    assert_eq!(received, 3);
    assert_eq!(wrapper.received.load(Ordering::Relaxed), 3);
}

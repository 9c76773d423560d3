//! Measures the heap one live session holds, with a global allocator that
//! counts live bytes: sessions are the state an attacker can make a server
//! keep, so their size is bounded here.
//!
//! The whole process is counted, so this binary holds this one test only.

use std::future::poll_fn;
use std::net::{Ipv4Addr, SocketAddr};

use abyss::session::{Session, Sessions, Step};
use abyss::{Bytes, Request, SendHandle, Service};
use abyss_tests::CountingAllocator;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// A session as small as one gets: a counter.
struct Counter(u64);

impl Session for Counter {
    async fn handle(&mut self, _request: Request) -> Step {
        self.0 += 1;
        Step::keep().reply(self.0.to_string())
    }
}

fn datagram(peer: SocketAddr) -> Request {
    let local = "192.0.2.53:53".parse().unwrap();
    Request::new(
        peer,
        local,
        Bytes::from_static(b"hi"),
        SendHandle::detached(),
    )
}

#[test]
fn a_live_session_holds_little_memory() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const SESSIONS: u16 = 10_000;
    let per_session = runtime.block_on(async {
        let sessions = Sessions::builder(|_peer| Counter(0))
            .max_sessions(usize::from(SESSIONS) * 2)
            .max_sessions_per_source(usize::from(SESSIONS) * 2)
            .build()
            .unwrap();
        let mut service = sessions.service();
        // One session first, so that what is made once per table is not
        // counted per session.
        let first = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 1));
        poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
        service.call(datagram(first)).await.unwrap();
        let before = CountingAllocator::live_bytes();
        for port in 2..SESSIONS + 2 {
            let peer = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), port));
            poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
            let reply = service.call(datagram(peer)).await.unwrap();
            assert_eq!(reply.as_deref(), Some(&b"1"[..]));
        }
        let after = CountingAllocator::live_bytes();
        assert_eq!(sessions.stats().live, usize::from(SESSIONS) + 1);
        let per_session = (after - before) / SESSIONS as isize;
        sessions.shutdown().await;
        per_session
    });
    println!("{per_session} bytes per live session");
    assert!(
        per_session <= 2048,
        "a live session holds {per_session} bytes"
    );
}

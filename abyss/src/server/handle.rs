use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use super::Config;
use super::listener::{Control, Settings, close_after_failure};
use super::stats::{Counters, Stats};
use crate::Error;
use crate::middleware::targets::LISTENER;
use crate::transport::Transport;

pub(crate) type Spawn = Arc<
    dyn Fn(
            Arc<dyn Transport>,
            Arc<Control>,
            Arc<[Counters]>,
            Settings,
        ) -> io::Result<JoinHandle<DrainReport>>
        + Send
        + Sync,
>;

/// What a shutdown or suspend did with the requests in flight when it began.
///
/// Reports add up with `+=`, to total the servers of one process.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use abyss::{DrainReport, Request, Server, service_fn};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), abyss::Error> {
/// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
/// let dns = Server::bind("127.0.0.1:0").name("dns").serve(echo.clone()).await?;
/// let dhcp = Server::bind("127.0.0.1:0").name("dhcp").serve(echo).await?;
///
/// let mut total = DrainReport::default();
/// for handle in [&dns, &dhcp] {
///     total += handle.shutdown().await;
/// }
/// assert_eq!(total.aborted, 0, "every request finished in time");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Requests that finished (answered, or dropped with a counted reason)
    /// before the deadline.
    pub drained: u64,
    /// Requests still unfinished at the deadline, dropped and counted as
    /// [`Drops::aborted`](crate::Drops::aborted).
    pub aborted: u64,
}

impl std::ops::AddAssign for DrainReport {
    fn add_assign(&mut self, other: Self) {
        self.drained += other.drained;
        self.aborted += other.aborted;
    }
}

/// Controls a running server: its address, counters, state, graceful
/// shutdown, suspend and resume.
///
/// Cheap to clone; every clone controls the same server. Dropping the handles
/// does not stop the server.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use abyss::{Request, Server, service_fn};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
/// let handle = Server::bind("127.0.0.1:0").listeners(1).serve(echo).await?;
/// let port = handle.local_addr().port();
///
/// handle.suspend().await?; // the port is closed now
/// assert!(std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok());
///
/// let again = handle.resume().await?; // and open again, on the same port
/// assert_eq!(again.port(), port);
/// handle.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use = "the server runs until `shutdown`: keep the handle to stop it, or wait on `shutdown_on`"]
pub struct ServerHandle {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    spawn: Spawn,
    counters: Arc<[Counters]>,
    local: Mutex<SocketAddr>,
    /// Listener tasks alive now.
    live: Arc<AtomicUsize>,
    /// Listeners replaced after they ended by surprise.
    restarts: Arc<AtomicU64>,
    /// Where the server is in its life, for `state` and `stopped`.
    state: Arc<tokio::sync::watch::Sender<ServerState>>,
    lifecycle: tokio::sync::Mutex<Lifecycle>,
}

struct Lifecycle {
    phase: Phase,
    /// Listeners told to stop and not yet closed: a suspend or shutdown
    /// whose caller stopped waiting leaves them here, and whoever takes the
    /// lifecycle next waits for them before opening sockets again.
    stopping: Option<JoinHandle<DrainReport>>,
}

enum Phase {
    Running(Vec<Running>),
    Suspended,
    Stopped,
}

impl Phase {
    fn state(&self) -> ServerState {
        match self {
            Phase::Running(_) => ServerState::Serving,
            Phase::Suspended => ServerState::Suspended,
            Phase::Stopped => ServerState::Stopped,
        }
    }
}

impl Lifecycle {
    /// Starts stopping `listeners` in a task of its own, so that the caller
    /// may stop waiting without leaving them half-stopped; the server is
    /// `Draining` until they have closed, then `then`.
    fn begin_stop(
        &mut self,
        listeners: Vec<Running>,
        state: &Arc<tokio::sync::watch::Sender<ServerState>>,
        then: ServerState,
    ) {
        debug_assert!(self.stopping.is_none());
        // Every listener stops reading now, before anyone can see the
        // server as draining.
        for listener in &listeners {
            listener.control.drain();
        }
        state.send_replace(ServerState::Draining);
        let state = state.clone();
        self.stopping = Some(tokio::spawn(async move {
            let report = stop(listeners).await;
            state.send_replace(then);
            report
        }));
    }

    /// Waits until the listeners told to stop have closed. Cancel-safe: if
    /// the caller stops waiting, the next caller waits instead.
    async fn finish_stop(&mut self) -> DrainReport {
        let Some(task) = self.stopping.as_mut() else {
            return DrainReport::default();
        };
        let report = match task.await {
            Ok(report) => report,
            Err(error) => {
                tracing::error!(target: LISTENER, %error, "stopping the listeners failed");
                DrainReport::default()
            }
        };
        self.stopping = None;
        report
    }
}

struct Running {
    control: Arc<Control>,
    task: JoinHandle<DrainReport>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr())
            .field("listeners", &self.inner.config.listeners)
            .field("live_listeners", &self.live_listeners())
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    pub(crate) fn start(config: Config, spawn: Spawn) -> Result<Self, Error> {
        let counters = Counters::for_server(config.listeners, config.name.as_deref());
        let inner = Arc::new(Inner {
            local: Mutex::new(config.addr),
            config,
            spawn,
            counters,
            live: Arc::default(),
            restarts: Arc::default(),
            state: Arc::new(tokio::sync::watch::Sender::new(ServerState::Serving)),
            lifecycle: tokio::sync::Mutex::new(Lifecycle {
                phase: Phase::Stopped,
                stopping: None,
            }),
        });
        let running = inner.open(inner.config.addr)?;
        inner
            .lifecycle
            .try_lock()
            .expect("no one else has the handle yet")
            .phase = Phase::Running(running);
        Ok(Self { inner })
    }

    /// The address the server answers on (with port 0 configured, the port
    /// it was given). It changes only if a [`resume`](ServerHandle::resume)
    /// finds that port taken.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
    /// let addr = handle.local_addr();
    /// assert_ne!(addr.port(), 0, "the port the system picked");
    ///
    /// let reply = abyss::client::send_recv(addr, b"hi", Duration::from_secs(5)).await?;
    /// assert_eq!(reply, "hi");
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn local_addr(&self) -> SocketAddr {
        *self.inner.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rate limiter set with [`Builder::rate_limit`](crate::Builder::rate_limit)
    /// or [`Builder::rate_limiter`](crate::Builder::rate_limiter): change
    /// its quota while serving (the original's `update_config`) or read its
    /// counters. `None` when the server has no rate limit.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::middleware::RateQuota;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .rate_limit(RateQuota::per_second(100))
    ///     .serve(echo)
    ///     .await?;
    ///
    /// // Under attack: tighten the quota without a restart.
    /// let limiter = handle.rate_limiter().expect("a rate limit was set");
    /// limiter.set_quota(RateQuota::per_second(10))?;
    /// assert_eq!(limiter.quota().max(), 10);
    /// assert_eq!(limiter.stats().limited, 0);
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn rate_limiter(&self) -> Option<&crate::middleware::PeerRateLimiter> {
        self.inner.config.rate_limiter.as_ref()
    }

    /// How many listener tasks are running now: the configured number while
    /// serving (a listener that ends by surprise is replaced, see
    /// [`Stats::listener_restarts`]), 0 once suspended or shut down.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), abyss::Error> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").listeners(2).serve(echo).await?;
    /// assert_eq!(handle.live_listeners(), 2);
    /// handle.suspend().await?;
    /// assert_eq!(handle.live_listeners(), 0);
    /// handle.resume().await?;
    /// assert_eq!(handle.live_listeners(), 2);
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn live_listeners(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    /// A snapshot of the counters, summed over listeners.
    ///
    /// # Example
    ///
    /// What one request did, with [`Stats::since`]:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
    /// let before = handle.stats();
    ///
    /// abyss::client::send_recv(handle.local_addr(), b"ping", Duration::from_secs(5)).await?;
    /// handle.shutdown().await; // nothing in flight any more: the counts are final
    ///
    /// let delta = handle.stats().since(&before);
    /// assert_eq!((delta.received, delta.replied), (1, 1));
    /// assert_eq!((delta.bytes_received, delta.bytes_sent), (4, 4));
    /// # Ok(())
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for counters in self.inner.counters.iter() {
            counters.add_to(&mut stats);
        }
        stats.listener_restarts = self.inner.restarts.load(Ordering::Relaxed);
        stats
    }

    /// Stops the server gracefully: every listener stops reading at once,
    /// finishes what is in flight for up to the shutdown timeout, then drops
    /// what is left (counted as aborted) and closes its socket, counting
    /// what was still queued in it ([`Stats::unread_at_close`]).
    ///
    /// Hooks from [`Builder::on_shutdown`](crate::Builder::on_shutdown) run
    /// meanwhile, within the same timeout.
    ///
    /// Returns how many requests were drained and aborted. Calling it again
    /// returns an empty report; on a suspended server only the hooks run.
    ///
    /// Cancel-safe: if the returned future is dropped (under a timeout, say)
    /// the listeners still stop, drain and close, and the server is shut
    /// down; the shutdown hooks, which run in this future, are dropped with
    /// it.
    ///
    /// # Example
    ///
    /// A request being handled when the shutdown begins is finished, and
    /// answered, before the shutdown returns:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, ServerState, service_fn};
    /// use tokio::sync::{mpsc, oneshot};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Each call hands over what finishes it.
    /// let (calls, mut called) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    /// let held = service_fn(move |r: Request| {
    ///     let (release, released) = oneshot::channel();
    ///     let _ = calls.send(release);
    ///     async move {
    ///         let _ = released.await;
    ///         Ok::<_, Infallible>(r.into_payload())
    ///     }
    /// });
    /// let handle = Server::bind("127.0.0.1:0").serve(held).await?;
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    /// client.send(b"slow").await?;
    /// let release = called.recv().await.unwrap(); // it is being handled
    ///
    /// let shutdown = tokio::spawn({
    ///     let handle = handle.clone();
    ///     async move { handle.shutdown().await }
    /// });
    /// while handle.state() != ServerState::Draining {
    ///     tokio::task::yield_now().await; // until the shutdown has begun
    /// }
    /// release.send(()).unwrap();
    ///
    /// let report = shutdown.await?;
    /// assert_eq!(report.aborted, 0);
    /// assert_eq!(client.recv(Duration::from_secs(5)).await?, "slow");
    /// assert_eq!(handle.state(), ServerState::Stopped);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) -> DrainReport {
        let mut lifecycle = self.inner.lifecycle.lock().await;
        match std::mem::replace(&mut lifecycle.phase, Phase::Stopped) {
            Phase::Running(listeners) => {
                lifecycle.begin_stop(listeners, &self.inner.state, ServerState::Stopped);
            }
            Phase::Suspended if lifecycle.stopping.is_none() => {
                self.inner.state.send_replace(ServerState::Stopped);
            }
            // A suspend still draining: it ends in Stopped, not Suspended.
            Phase::Suspended => {
                let state = self.inner.state.clone();
                let draining = lifecycle.stopping.take().expect("a stop is pending");
                lifecycle.stopping = Some(tokio::spawn(async move {
                    let report = draining.await.unwrap_or_default();
                    state.send_replace(ServerState::Stopped);
                    report
                }));
            }
            Phase::Stopped => return lifecycle.finish_stop().await,
        }
        let config = &self.inner.config;
        let hooks = futures_util::future::join_all(config.shutdown_hooks.iter().map(|hook| hook()));
        let hooks = async {
            if tokio::time::timeout(config.shutdown_timeout, hooks)
                .await
                .is_err()
            {
                tracing::warn!(target: LISTENER, "shutdown hooks outlived the shutdown timeout");
            }
        };
        let (report, ()) = tokio::join!(lifecycle.finish_stop(), hooks);
        report
    }

    /// Hands this server's sockets to a successor process, then shuts down
    /// without losing a datagram: a restart or an upgrade with the port
    /// never unread.
    ///
    /// The sequence, on `stream` (a Unix stream connection to the
    /// successor):
    /// 1. this server sends its sockets (every listener's, `SCM_RIGHTS`:
    ///    the successor gets descriptors of the very same sockets);
    /// 2. the successor serves them
    ///    ([`BoundSockets::receive`](crate::transport::BoundSockets::receive),
    ///    [`Builder::bound_sockets`](crate::Builder::bound_sockets)) and
    ///    says so with [`successor_ready`]: from then both read the
    ///    sockets, each datagram going to one of them;
    /// 3. this server stops reading, leaving the sockets as they are,
    ///    finishes what it has in flight (up to the shutdown timeout), runs
    ///    its shutdown hooks, and returns its [`DrainReport`]. What is
    ///    queued in the sockets is the successor's to read.
    ///
    /// If the successor goes away before it says it is ready (or does not
    /// say so within the shutdown timeout, at least 10 s), this fails with
    /// [`Error::Handover`] and the server goes on serving. A successor that
    /// dies after it said so leaves the port with no reader: start the next
    /// one before that matters.
    ///
    /// # Example
    ///
    /// Two servers in one process, for the example: the second takes over
    /// the first's port.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::os::unix::net::UnixStream;
    /// use abyss::successor_ready;
    /// use abyss::transport::BoundSockets;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let old = Server::bind("127.0.0.1:0").serve(echo.clone()).await?;
    /// let addr = old.local_addr();
    ///
    /// let (ours, theirs) = UnixStream::pair()?;
    /// let handing = tokio::spawn({
    ///     let old = old.clone();
    ///     async move { old.hand_over(ours).await }
    /// });
    /// // The successor (another process, usually).
    /// let sockets = tokio::task::spawn_blocking(move || {
    ///     BoundSockets::receive(&theirs).map(|sockets| (sockets, theirs))
    /// })
    /// .await??;
    /// let (sockets, stream) = sockets;
    /// let new = Server::builder().bound_sockets(sockets).serve(echo).await?;
    /// successor_ready(&stream)?;
    ///
    /// let report = handing.await??;
    /// assert_eq!(report.aborted, 0);
    /// assert_eq!(new.local_addr(), addr);
    /// let reply = abyss::client::send_recv(addr, b"still here", std::time::Duration::from_secs(5)).await?;
    /// assert_eq!(reply, "still here");
    /// new.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(unix)]
    pub async fn hand_over(
        &self,
        stream: std::os::unix::net::UnixStream,
    ) -> Result<DrainReport, Error> {
        let handover = |source: io::Error| Error::Handover { source };
        {
            let lifecycle = self.inner.lifecycle.lock().await;
            let Phase::Running(listeners) = &lifecycle.phase else {
                return Err(Error::State {
                    state: self.state(),
                });
            };
            // Copies of the descriptors, so that what is sent does not
            // depend on the listeners meanwhile.
            let mut sockets = Vec::with_capacity(listeners.len());
            for listener in listeners {
                let socket = listener
                    .control
                    .transport()
                    .and_then(|transport| transport.socket().map(|fd| fd.try_clone_to_owned()))
                    .ok_or_else(|| {
                        handover(io::Error::other(
                            "a listener's transport has no socket to hand over",
                        ))
                    })?
                    .map_err(handover)?;
                sockets.push(socket);
            }
            let wait = self
                .inner
                .config
                .shutdown_timeout
                .max(std::time::Duration::from_secs(10));
            tokio::task::spawn_blocking(move || -> io::Result<()> {
                use std::io::Read;
                use std::os::fd::AsFd;
                let borrowed: Vec<_> = sockets.iter().map(AsFd::as_fd).collect();
                // Blocking here, with a read timeout, whatever the stream
                // was (one accepted by tokio is non-blocking).
                stream.set_nonblocking(false)?;
                crate::transport::BoundSockets::send(&stream, &borrowed)?;
                stream.set_read_timeout(Some(wait))?;
                let mut word = [0u8; 1];
                match (&stream).read(&mut word)? {
                    1 if word == READY => Ok(()),
                    _ => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the successor went away before it was serving",
                    )),
                }
            })
            .await
            .map_err(|join| handover(io::Error::other(join)))?
            .map_err(handover)?;
            // The successor reads the sockets: stop reading them, without
            // touching them. (The lifecycle is still locked: the same
            // listeners.)
            for listener in listeners {
                listener.control.hand_over();
            }
        }
        tracing::info!(target: LISTENER, local = %self.local_addr(), "sockets handed over");
        Ok(self.shutdown().await)
    }

    /// Closes the sockets: listeners stop reading, finish what is in flight
    /// (up to the shutdown timeout, aborting the rest), then close, so the
    /// port stops answering and another process can bind it. Counters are
    /// kept. Suspending a suspended server does nothing.
    ///
    /// Cancel-safe: if the returned future is dropped, the listeners still
    /// drain and close, and a later [`resume`](ServerHandle::resume) waits
    /// for them before it opens new sockets.
    ///
    /// Fails with [`Error::State`] once the server is shut down.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::{Error, Request, Server, ServerState, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), abyss::Error> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
    ///
    /// let report = handle.suspend().await?;
    /// assert_eq!(report.aborted, 0);
    /// assert_eq!(handle.state(), ServerState::Suspended);
    /// handle.suspend().await?; // already suspended: nothing to do
    ///
    /// handle.shutdown().await;
    /// let error = handle.suspend().await.unwrap_err();
    /// assert!(matches!(error, Error::State { state: ServerState::Stopped }));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn suspend(&self) -> Result<DrainReport, Error> {
        let mut lifecycle = self.inner.lifecycle.lock().await;
        match std::mem::replace(&mut lifecycle.phase, Phase::Suspended) {
            Phase::Running(listeners) => {
                lifecycle.begin_stop(listeners, &self.inner.state, ServerState::Suspended);
                Ok(lifecycle.finish_stop().await)
            }
            Phase::Suspended => Ok(lifecycle.finish_stop().await),
            Phase::Stopped => {
                lifecycle.phase = Phase::Stopped;
                Err(Error::State {
                    state: ServerState::Stopped,
                })
            }
        }
    }

    /// Opens the sockets again and resumes serving. A fixed port is bound
    /// again; with port 0 the port the server had is tried first, and if it
    /// was taken meanwhile a new one is picked. Returns the address now
    /// served on.
    ///
    /// Fails with [`Error::State`] unless the server is suspended, and with
    /// [`Error::Bind`] if a fixed port was taken meanwhile.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::{Error, Request, Server, ServerState, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
    ///
    /// handle.suspend().await?;
    /// let addr = handle.resume().await?;
    /// let reply = abyss::client::send_recv(addr, b"back", Duration::from_secs(5)).await?;
    /// assert_eq!(reply, "back");
    ///
    /// // Only a suspended server resumes.
    /// let error = handle.resume().await.unwrap_err();
    /// assert!(matches!(error, Error::State { state: ServerState::Serving }));
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn resume(&self) -> Result<SocketAddr, Error> {
        let mut lifecycle = self.inner.lifecycle.lock().await;
        if !matches!(lifecycle.phase, Phase::Suspended) {
            return Err(Error::State {
                state: lifecycle.phase.state(),
            });
        }
        // A suspend whose caller stopped waiting: its sockets close first.
        lifecycle.finish_stop().await;
        let configured = self.inner.config.addr;
        let running = if configured.port() == 0 {
            match self.inner.open(self.local_addr()) {
                Ok(running) => running,
                Err(error) if error.is_addr_in_use() => self.inner.open(configured)?,
                Err(error) => return Err(error),
            }
        } else {
            self.inner.open(configured)?
        };
        lifecycle.phase = Phase::Running(running);
        self.inner.state.send_replace(ServerState::Serving);
        Ok(self.local_addr())
    }

    /// Where the server is in its life now.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), abyss::Error> {
    /// use abyss::{Server, ServerState, service_fn};
    /// let echo = service_fn(|r: abyss::Request| async move { Ok::<_, std::convert::Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").listeners(1).serve(echo).await?;
    /// assert_eq!(handle.state(), ServerState::Serving);
    /// handle.suspend().await?;
    /// assert_eq!(handle.state(), ServerState::Suspended);
    /// handle.shutdown().await;
    /// assert_eq!(handle.state(), ServerState::Stopped);
    /// # Ok(()) }
    /// ```
    pub fn state(&self) -> ServerState {
        *self.inner.state.borrow()
    }

    /// Waits until the server is shut down, by whoever shuts it down, and
    /// its listeners have closed.
    ///
    /// # Example
    ///
    /// The main task waits while another one decides when to stop (an admin
    /// command, say):
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::{Request, Server, ServerState, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), abyss::Error> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
    ///
    /// let admin = handle.clone();
    /// tokio::spawn(async move { admin.shutdown().await });
    ///
    /// handle.stopped().await;
    /// assert_eq!(handle.state(), ServerState::Stopped);
    /// assert_eq!(handle.live_listeners(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stopped(&self) {
        let mut state = self.inner.state.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let _ = state.wait_for(|s| *s == ServerState::Stopped).await;
    }

    /// Serves until `signal` completes, then shuts down gracefully (see
    /// [`shutdown`](ServerHandle::shutdown)) and returns the report. Returns
    /// an empty report at once if the server is shut down meanwhile by
    /// other means.
    ///
    /// The usual signal is [`shutdown_signal`](crate::shutdown_signal)
    /// (Ctrl-C or SIGTERM); any future works, such as a channel's receiver
    /// or a timer.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use abyss::ServerState;
    /// let echo = abyss::service_fn(|r: abyss::Request| async move {
    ///     Ok::<_, std::convert::Infallible>(r.into_payload())
    /// });
    /// let handle = abyss::Server::bind("127.0.0.1:0").serve(echo).await?;
    ///
    /// // In a program: `handle.shutdown_on(abyss::shutdown_signal()).await`.
    /// let (stop, stop_asked) = tokio::sync::oneshot::channel::<()>();
    /// let serving = tokio::spawn({
    ///     let handle = handle.clone();
    ///     async move { handle.shutdown_on(async { let _ = stop_asked.await; }).await }
    /// });
    /// assert_eq!(handle.state(), ServerState::Serving);
    ///
    /// stop.send(()).unwrap();
    /// let report = serving.await?;
    /// assert_eq!(report.aborted, 0);
    /// assert_eq!(handle.state(), ServerState::Stopped);
    /// # Ok(()) }
    /// ```
    pub async fn shutdown_on(&self, signal: impl Future<Output = ()>) -> DrainReport {
        tokio::select! {
            () = signal => self.shutdown().await,
            () = self.stopped() => DrainReport::default(),
        }
    }
}

/// Where a server is in its life; see [`ServerHandle::state`].
///
/// # Example
///
/// A health check:
///
/// ```
/// use abyss::ServerState;
///
/// fn health(state: ServerState) -> &'static str {
///     match state {
///         ServerState::Serving => "ok",
///         ServerState::Draining | ServerState::Suspended => "unavailable",
///         _ => "down",
///     }
/// }
/// assert_eq!(health(ServerState::Serving), "ok");
/// assert_eq!(ServerState::Suspended.to_string(), "suspended");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServerState {
    /// Listeners are reading and answering.
    Serving,
    /// A shutdown or suspend has begun: listeners have stopped reading and
    /// finish what is in flight.
    Draining,
    /// The sockets are closed until [`ServerHandle::resume`].
    Suspended,
    /// Shut down for good.
    Stopped,
}

impl fmt::Display for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerState::Serving => "serving",
            ServerState::Draining => "draining",
            ServerState::Suspended => "suspended",
            ServerState::Stopped => "shut down",
        })
    }
}

impl Inner {
    /// Binds the listener group on `addr` and starts a supervised task per
    /// socket.
    fn open(self: &Arc<Self>, addr: SocketAddr) -> Result<Vec<Running>, Error> {
        let config = &self.config;
        let transports = config
            .bind
            .bind_group(addr, config.listeners)
            .map_err(|e| Error::bind(addr, e))?;
        let local = transports
            .first()
            .ok_or_else(|| Error::bind(addr, io::Error::other("the transport opened no socket")))?
            .local_addr()
            .map_err(|e| Error::bind(addr, e))?;
        let mut running = Vec::with_capacity(transports.len());
        let busy = Arc::new(super::listener::placement::Busy::new(config.listeners));
        for (index, transport) in transports.into_iter().enumerate().take(config.listeners) {
            let control = Arc::new(Control::default());
            control.set_transport(transport.clone());
            let settings = Settings {
                index,
                max_in_flight: config.share(index),
                max_datagram_size: config.max_datagram_size,
                dispatch: config.dispatch,
                shutdown_timeout: config.shutdown_timeout,
                live: self.live.clone(),
                busy: busy.clone(),
            };
            match (self.spawn)(
                transport.clone(),
                control.clone(),
                self.counters.clone(),
                settings.clone(),
            ) {
                Ok(task) => {
                    let supervised = supervise(
                        self.clone(),
                        local,
                        transport,
                        control.clone(),
                        settings,
                        task,
                    );
                    running.push(Running {
                        control,
                        task: tokio::spawn(supervised),
                    });
                }
                Err(error) => {
                    // Close what was started so the port is not half-open.
                    for r in &running {
                        r.control.drain();
                    }
                    return Err(Error::bind(addr, error));
                }
            }
        }
        *self.local.lock().unwrap_or_else(|e| e.into_inner()) = local;
        Ok(running)
    }
}

/// How long a supervisor waits before replacing a listener that died soon
/// after the last replacement: from `FIRST_RESTART_DELAY`, doubled at each
/// quick death, up to `MAX_RESTART_DELAY`. A listener that lived longer
/// than `MAX_RESTART_DELAY` is replaced at once.
const FIRST_RESTART_DELAY: std::time::Duration = std::time::Duration::from_millis(10);
const MAX_RESTART_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for a listener task; if it ends by surprise (a panic outside the
/// service, which the listener catches itself), counts what it left
/// unfinished as aborted and what was queued on its socket as unread, and
/// starts a replacement on a new socket in the same group, unless the
/// server is stopping. A listener that keeps dying is replaced with a
/// growing delay, so that it cannot spin.
async fn supervise(
    inner: Arc<Inner>,
    group: SocketAddr,
    mut transport: Arc<dyn Transport>,
    control: Arc<Control>,
    settings: Settings,
    mut task: JoinHandle<DrainReport>,
) -> DrainReport {
    let counters = &inner.counters[settings.index];
    let listener = settings.index;
    let mut started = tokio::time::Instant::now();
    let mut delay = std::time::Duration::ZERO;
    loop {
        let error = match task.await {
            Ok(report) => return report,
            Err(error) if error.is_cancelled() => return DrainReport::default(),
            Err(error) => error,
        };
        let aborted = counters.abort_unfinished();
        delay = if started.elapsed() > MAX_RESTART_DELAY {
            std::time::Duration::ZERO
        } else {
            (delay * 2).clamp(FIRST_RESTART_DELAY, MAX_RESTART_DELAY)
        };
        tracing::error!(target: LISTENER, listener, %error, aborted, restart_in = ?delay, "listener ended by surprise");
        // Its socket stays open meanwhile: what arrives waits there, and is
        // counted when it closes.
        tokio::time::sleep(delay).await;
        // Open the replacement before closing the old socket, so that the
        // port is never without a reader.
        let replacement = if control.is_draining() {
            None
        } else {
            match inner.config.bind.join_group(group) {
                Ok(fresh) => Some(fresh),
                Err(error) => {
                    tracing::error!(target: LISTENER, listener, %error, "cannot open a socket to replace the listener");
                    None
                }
            }
        };
        let unread = close_after_failure(&transport, counters, &settings);
        let Some(fresh) = replacement else {
            return DrainReport {
                drained: 0,
                aborted,
            };
        };
        transport = fresh;
        control.set_transport(transport.clone());
        match (inner.spawn)(
            transport.clone(),
            control.clone(),
            inner.counters.clone(),
            settings.clone(),
        ) {
            Ok(next) => {
                inner.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: LISTENER, listener, unread, "listener replaced");
                task = next;
                started = tokio::time::Instant::now();
            }
            Err(error) => {
                tracing::error!(target: LISTENER, listener, %error, "cannot start a listener to replace the one that ended");
                close_after_failure(&transport, counters, &settings);
                return DrainReport {
                    drained: 0,
                    aborted,
                };
            }
        }
    }
}

/// Tells every listener to drain, then waits for all of them.
async fn stop(listeners: Vec<Running>) -> DrainReport {
    for listener in &listeners {
        listener.control.drain();
    }
    let mut report = DrainReport::default();
    for listener in listeners {
        match listener.task.await {
            Ok(r) => report += r,
            Err(error) => {
                tracing::error!(target: LISTENER, %error, "listener task failed")
            }
        }
    }
    report
}

/// What a successor says, once it serves the sockets handed over.
#[cfg(unix)]
const READY: [u8; 1] = *b"R";

/// Tells the server handing its sockets over on `stream` that the
/// successor now serves them: the server then stops reading and shuts down
/// (see [`ServerHandle::hand_over`]).
///
/// # Example
///
/// See [`ServerHandle::hand_over`].
#[cfg(unix)]
pub fn successor_ready(stream: &std::os::unix::net::UnixStream) -> io::Result<()> {
    use std::io::Write;
    stream.set_nonblocking(false)?;
    (&*stream).write_all(&READY)
}

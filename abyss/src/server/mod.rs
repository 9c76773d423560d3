//! The server: builder, listener pool and handle.

mod handle;
mod listener;
pub(crate) mod metrics;
mod policy;
mod stats;

use std::fmt;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tower::timeout::TimeoutLayer;
use tower::{BoxError, Service, ServiceBuilder};

#[cfg(unix)]
pub use handle::successor_ready;
pub use handle::{DrainReport, ServerHandle, ServerState};
pub use stats::{Drops, Stats};

use crate::middleware::{
    ConcurrencyShedLayer, PeerRateLimiter, RateQuota, ReplyBudget, SizeLimitLayer, TraceLayer,
};
use crate::transport::{Bind, Transport, UdpOptions};
use crate::{Error, IntoReply, Request};

/// Requests in flight at most, across listeners, by default: enough to
/// ride out bursts with slow handlers, while bounding memory to about this
/// many payloads (the Elixir original's `num_connections` default too).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16_384;
/// How long shutdown and suspend let requests in flight finish, by default:
/// long enough for a slow handler, well within the stop timeout of service
/// managers (systemd waits 90 s).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// The receive buffer per datagram by default: the largest UDP payload, so
/// the kernel truncates nothing.
pub const DEFAULT_MAX_DATAGRAM_SIZE: usize = 65_535;
/// Payloads longer than this are dropped before the service by default:
/// above what common protocols send in one datagram (DNS with EDNS 4096,
/// DHCP, syslog, StatsD), below what a handler should have to parse from an
/// unknown peer.
///
/// # Example
///
/// With the default, an 8192-byte payload is served and an 8193-byte one
/// never reaches the service:
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use abyss::client::UdpClient;
/// use abyss::{DEFAULT_MAX_PACKET_SIZE, Request, Server, service_fn};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
/// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
/// let client = UdpClient::connect(handle.local_addr()).await?;
///
/// let reply = client.request(&[0; DEFAULT_MAX_PACKET_SIZE], Duration::from_secs(5)).await?;
/// assert_eq!(reply.len(), DEFAULT_MAX_PACKET_SIZE);
/// client.send(&[0; DEFAULT_MAX_PACKET_SIZE + 1]).await?;
///
/// while handle.stats().dropped.total() == 0 {
///     tokio::task::yield_now().await; // until the server has dropped it
/// }
/// assert_eq!(handle.stats().dropped.too_large, 1);
/// handle.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub const DEFAULT_MAX_PACKET_SIZE: usize = 8192;

/// A UDP server: configure it with [`Server::bind`] (or [`Server::builder`]),
/// then [`serve`](Builder::serve) a service.
///
/// [`Builder::build`] checks the configuration and gives a `Server`, which
/// serves with [`Server::serve`]; [`Builder::serve`] does both.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use abyss::{Bytes, Request, Server, service_fn};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let handle = Server::bind("127.0.0.1:0")
///     .listeners(2)
///     .serve(service_fn(|request: Request| async move {
///         Ok::<_, Infallible>(Some(request.into_payload()))
///     }))
///     .await?;
///
/// let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
/// client.send_to(b"hello", handle.local_addr()).await?;
/// let mut buf = [0u8; 64];
/// let (n, _) = client.recv_from(&mut buf).await?;
/// assert_eq!(&buf[..n], b"hello");
///
/// let report = handle.shutdown().await;
/// assert_eq!(report.aborted, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a server does nothing until `serve` is called"]
pub struct Server {
    config: Config,
}

impl Server {
    /// A builder with no address yet (give one with [`Builder::bind`]) and
    /// the defaults: one listener per available core, 16 384 requests in
    /// flight, a 15 s shutdown timeout, 65 535-byte receive buffers,
    /// payloads over 8192 bytes dropped, no rate limit, timeout,
    /// concurrency shedding or trace layer, UDP with [`UdpOptions::new`].
    ///
    /// # Example
    ///
    /// The address can come last, once the configuration that holds it is
    /// read:
    ///
    /// ```
    /// use abyss::Server;
    ///
    /// let builder = Server::builder().name("syslog").listeners(2);
    /// let port: u16 = "5514".parse().unwrap(); // from a configuration file, say
    /// let server = builder.bind(("127.0.0.1", port)).build()?;
    /// assert_eq!(server.addr().port(), 5514);
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// A builder serving on `addr`: anything [`ToSocketAddrs`] takes, as
    /// with [`std::net::UdpSocket::bind`] and tokio's (`"127.0.0.1:53"`,
    /// `("::1", 53)`, a [`SocketAddr`]). A name is resolved now and its
    /// first address used; one that does not resolve fails
    /// [`build`](Builder::build) with the field `bind`.
    ///
    /// ```
    /// let builder = abyss::Server::bind("127.0.0.1:5353");
    /// let error = abyss::Server::bind("not an address").build().unwrap_err();
    /// assert_eq!(error.field(), Some("bind"));
    /// ```
    pub fn bind(addr: impl ToSocketAddrs) -> Builder {
        Builder::new().bind(addr)
    }

    /// The address it will serve on, as [`Builder::bind`] resolved it. With
    /// port 0 the port is picked when it serves:
    /// [`ServerHandle::local_addr`] tells which.
    ///
    /// # Example
    ///
    /// ```
    /// let server = abyss::Server::bind(("::1", 5353)).build()?;
    /// assert_eq!(server.addr().to_string(), "[::1]:5353");
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.config.addr
    }

    /// Opens the sockets and starts serving `service` on the current tokio
    /// runtime; see [`Builder::serve`].
    ///
    /// # Example
    ///
    /// Check the configuration at startup, before anything else starts,
    /// and open the sockets later:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = Server::bind("127.0.0.1:0").listeners(1).build()?;
    /// // ... load data, connect to upstreams ...
    /// let pong = service_fn(|_: Request| async { Ok::<_, Infallible>("pong") });
    /// let handle = server.serve(pong).await?;
    ///
    /// let reply = abyss::client::send_recv(handle.local_addr(), b"ping", Duration::from_secs(5)).await?;
    /// assert_eq!(reply, "pong");
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn serve<S>(self, service: S) -> Result<ServerHandle, Error>
    where
        S: Service<Request> + Clone + Send + 'static,
        S::Response: IntoReply + Send + 'static,
        S::Error: Into<BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let config = self.config;
        let layered = config.trace
            || config.max_packet_size.is_some()
            || config.rate_limiter.is_some()
            || config.prefix_rate_limiter.is_some()
            || config.reply_budget.is_some()
            || config.concurrency_shed.is_some()
            || config.timeout.is_some();
        let spawn = if layered {
            // The options' layers, outermost first, exactly as a user would
            // stack them by hand.
            spawner(
                ServiceBuilder::new()
                    .option_layer(config.trace.then(TraceLayer::new))
                    .option_layer(config.max_packet_size.map(SizeLimitLayer::new))
                    .option_layer(config.rate_limiter.as_ref().map(PeerRateLimiter::layer))
                    .option_layer(
                        config
                            .prefix_rate_limiter
                            .as_ref()
                            .map(PeerRateLimiter::layer),
                    )
                    .option_layer(config.reply_budget.as_ref().map(ReplyBudget::layer))
                    .option_layer(config.concurrency_shed.map(ConcurrencyShedLayer::new))
                    .option_layer(config.timeout.map(TimeoutLayer::new))
                    // Every layer fails with BoxError: make the service's
                    // error one too, so that a layer that is off is the same
                    // type as one on.
                    .map_err(Into::<BoxError>::into)
                    .service(service),
            )
        } else {
            // No option layer: serve the service itself, without the
            // future of every optional layer wrapped around it.
            spawner(service)
        };
        ServerHandle::start(config, spawn)
    }
}

/// Where service futures run; see [`Builder::dispatch`].
///
/// # Example
///
/// A handler that computes before it answers, spawned so that a busy peer
/// does not hold its listener:
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use abyss::{Dispatch, Request, Server, service_fn};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let checksum = service_fn(|r: Request| async move {
///     // The work is inside the future: it runs on whichever worker is free.
///     let sum = r.payload().iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
///     Ok::<_, Infallible>(vec![sum])
/// });
/// let handle = Server::bind("127.0.0.1:0")
///     .dispatch(Dispatch::Spawn)
///     .serve(checksum)
///     .await?;
///
/// let reply = abyss::client::send_recv(handle.local_addr(), &[1, 2, 3], Duration::from_secs(5)).await?;
/// assert_eq!(reply, &[6][..]);
/// assert_eq!(Dispatch::default(), Dispatch::Auto);
/// handle.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dispatch {
    /// Chosen by each listener from how long handling takes: inline while
    /// it averages under a few microseconds per datagram, on the workers
    /// once it takes more than about ten; inline always on a runtime with
    /// one worker.
    #[default]
    Auto,
    /// On the listener's task, polled between its reads and sends: the
    /// cheapest for handlers that answer at once, but one listener (and so
    /// one core) per peer.
    Inline,
    /// Each datagram's service future spawned on the runtime, so that
    /// handlers run on every worker while the listener keeps reading and
    /// batching replies.
    Spawn,
}

/// Configures a server; see [`Server`].
///
/// Options are checked by [`build`](Builder::build) (and so by
/// [`serve`](Builder::serve)), which fails with [`Error::Config`] or
/// [`Error::Options`] naming the option. Each option's default is on its
/// method.
///
/// # Example
///
/// A DNS-sized server on every IPv4 interface, with the layers a public
/// service wants:
///
/// ```
/// use std::time::Duration;
/// use abyss::middleware::RateQuota;
/// use abyss::{Server, UdpOptions};
///
/// # fn main() -> Result<(), abyss::Error> {
/// let server = Server::bind("0.0.0.0:5353")
///     .name("dns")
///     .listeners(2)
///     .max_in_flight(4096)
///     .max_packet_size(4096)
///     .rate_limit(RateQuota::per_second(50).with_burst(100))
///     .timeout(Duration::from_secs(2))
///     .shutdown_timeout(Duration::from_secs(5))
///     .udp_options(UdpOptions::new().recv_buffer_size(4 << 20))
///     .build()?;
/// assert_eq!(server.addr().port(), 5353);
///
/// // Mistakes are named.
/// let error = Server::bind("0.0.0.0:5353").max_in_flight(0).build().unwrap_err();
/// assert_eq!(error.field(), Some("max_in_flight"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use = "a builder does nothing until `serve` is called"]
pub struct Builder {
    /// Where to serve, once given: resolved, or why it could not be.
    addr: Option<Result<SocketAddr, String>>,
    name: Option<String>,
    listeners: Option<usize>,
    max_in_flight: usize,
    shutdown_timeout: Duration,
    max_datagram_size: usize,
    dispatch: Dispatch,
    udp: UdpOptions,
    transport: Option<Arc<dyn Bind>>,
    layers: LayerOptions,
    shutdown_hooks: Vec<ShutdownHook>,
}

/// Something to run when a graceful shutdown begins.
pub(crate) type ShutdownHook =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The builder options that stack middleware in front of the service.
#[derive(Debug, Clone)]
struct LayerOptions {
    trace: bool,
    max_packet_size: Option<usize>,
    rate_limit: Option<RateLimitOption>,
    prefix_rate_limit: Option<RateLimitOption>,
    reply_budget: Option<ReplyBudget>,
    concurrency_shed: Option<usize>,
    timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
enum RateLimitOption {
    Quota(RateQuota),
    Limiter(PeerRateLimiter),
}

impl RateLimitOption {
    /// The limiter given, or one built from the quota (per network with
    /// `prefixes`, the IPv4 and IPv6 prefix lengths); an error names
    /// `field`.
    fn limiter(
        &self,
        field: &'static str,
        prefixes: Option<(u8, u8)>,
    ) -> Result<PeerRateLimiter, Error> {
        match self {
            RateLimitOption::Limiter(limiter) => Ok(limiter.clone()),
            RateLimitOption::Quota(quota) => {
                let builder = PeerRateLimiter::builder(*quota);
                match prefixes {
                    Some((v4, v6)) => builder.prefixes(v4, v6),
                    None => builder,
                }
                .build()
                .map_err(|e| Error::config(field, e.qualified_reason(field)))
            }
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .field("listeners", &self.listeners)
            .field("max_in_flight", &self.max_in_flight)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("max_datagram_size", &self.max_datagram_size)
            .field("dispatch", &self.dispatch)
            .field("udp", &self.udp)
            .field("transport", &self.transport)
            .field("layers", &self.layers)
            .field("shutdown_hooks", &self.shutdown_hooks.len())
            .finish()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// The defaults; see [`Server::builder`]. `Builder::default()` is the
    /// same.
    ///
    /// # Example
    ///
    /// Options set only when asked for:
    ///
    /// ```
    /// use abyss::Builder;
    ///
    /// let verbose = std::env::args().any(|arg| arg == "--verbose");
    /// let mut builder = Builder::new().bind("127.0.0.1:0");
    /// if verbose {
    ///     builder = builder.trace(true);
    /// }
    /// let server = builder.build()?;
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn new() -> Self {
        Self {
            addr: None,
            name: None,
            listeners: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            max_datagram_size: DEFAULT_MAX_DATAGRAM_SIZE,
            dispatch: Dispatch::Auto,
            udp: UdpOptions::new(),
            transport: None,
            layers: LayerOptions {
                trace: false,
                max_packet_size: Some(DEFAULT_MAX_PACKET_SIZE),
                rate_limit: None,
                prefix_rate_limit: None,
                reply_budget: None,
                concurrency_shed: None,
                timeout: None,
            },
            shutdown_hooks: Vec::new(),
        }
    }

    /// The address to serve on; see [`Server::bind`]. There is no default:
    /// a library should not expose a service on every interface unless
    /// asked to (`"0.0.0.0:53"`, `"[::]:53"`). Port 0 picks a free port,
    /// shared by every listener; [`ServerHandle::local_addr`] tells which.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::{Ipv4Addr, SocketAddr};
    /// use abyss::Builder;
    ///
    /// // A string, a (host, port) pair or a SocketAddr, as tokio takes them.
    /// let text = Builder::new().bind("127.0.0.1:5353").build()?;
    /// let pair = Builder::new().bind((Ipv4Addr::LOCALHOST, 5353)).build()?;
    /// let addr = Builder::new().bind(SocketAddr::from(([127, 0, 0, 1], 5353))).build()?;
    /// assert_eq!(text.addr(), pair.addr());
    /// assert_eq!(pair.addr(), addr.addr());
    ///
    /// // One that is not an address fails `build`, naming `bind`.
    /// let error = Builder::new().bind("127.0.0.1").build().unwrap_err();
    /// assert_eq!(error.field(), Some("bind"));
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn bind(mut self, addr: impl ToSocketAddrs) -> Self {
        self.addr = Some(match addr.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .ok_or_else(|| "the address resolved to nothing".to_owned()),
            Err(error) => Err(format!("not an address: {error}")),
        });
        self
    }

    /// A name for this server in logs and metrics (the `server` label), to
    /// tell several servers of one process apart. Default: the address it
    /// serves on.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::Server;
    ///
    /// // Two servers of one process, told apart in logs and metrics.
    /// let dns = Server::bind("127.0.0.1:0").name("dns").build()?;
    /// let dhcp = Server::bind("127.0.0.1:0").name("dhcp").build()?;
    /// assert!(format!("{dns:?}").contains(r#"name: Some("dns")"#));
    /// # drop(dhcp);
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Listener tasks, each with its own `SO_REUSEPORT` socket on the same
    /// port so the kernel spreads peers across them (the original's
    /// `num_listeners`/`num_acceptors`). Default: the available
    /// parallelism, or 1 when the UDP options ask for broadcast or join a
    /// multicast group.
    ///
    /// The system gives every socket on the port its own copy of a
    /// broadcast or multicast datagram; the first listener handles it and
    /// the others skip their copies (counted in
    /// [`Stats::group_copies_skipped`]), so each is handled once whatever
    /// the number of listeners.
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
    /// let handle = Server::bind("127.0.0.1:0").listeners(4).serve(echo).await?;
    /// assert_eq!(handle.live_listeners(), 4); // four sockets on one port
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn listeners(mut self, listeners: usize) -> Self {
        self.listeners = Some(listeners);
        self
    }

    /// Requests in flight at most, across all listeners (the original's
    /// `num_connections`; default 16 384). Each listener gets an equal share;
    /// a listener at its share stops reading until one finishes, so what
    /// arrives meanwhile waits in (or, once full, is dropped by) the kernel's
    /// socket buffer, counted in [`Stats::reads_paused`] and
    /// [`Stats::kernel_drops`]. Must be at least the number of listeners.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::Server;
    ///
    /// // At most 1024 payloads in memory: 256 per listener.
    /// let server = Server::bind("127.0.0.1:0").listeners(4).max_in_flight(1024).build()?;
    ///
    /// // Each listener needs a share of at least one.
    /// let error = Server::bind("127.0.0.1:0").listeners(4).max_in_flight(2).build().unwrap_err();
    /// assert_eq!(error.field(), Some("max_in_flight"));
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn max_in_flight(mut self, requests: usize) -> Self {
        self.max_in_flight = requests;
        self
    }

    /// How long [`ServerHandle::shutdown`] and [`ServerHandle::suspend`] wait
    /// for requests in flight before aborting them (default 15 s).
    ///
    /// # Example
    ///
    /// A request that never finishes holds a shutdown for the timeout, then
    /// is aborted:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (started, mut has_started) = tokio::sync::mpsc::unbounded_channel();
    /// let stuck = service_fn(move |_: Request| {
    ///     let _ = started.send(());
    ///     std::future::pending::<Result<(), Infallible>>()
    /// });
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .shutdown_timeout(Duration::from_millis(100))
    ///     .serve(stuck)
    ///     .await?;
    /// UdpClient::connect(handle.local_addr()).await?.send(b"hello").await?;
    /// has_started.recv().await;
    ///
    /// let report = handle.shutdown().await; // returns after 100 ms
    /// assert_eq!((report.drained, report.aborted), (0, 1));
    /// assert_eq!(handle.stats().dropped.aborted, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// The receive buffer per datagram, 1 to 65 535 bytes (default 65 535,
    /// the largest UDP payload). A longer datagram is cut short by the
    /// kernel: it is dropped and counted as [`Drops::truncated`], never
    /// handed to the service.
    ///
    /// This is the size the server can *read*; [`max_packet_size`](Builder::max_packet_size)
    /// is the size it is willing to *handle* (default 8192), a layer that
    /// drops longer payloads as [`Drops::too_large`]. Keep the default here
    /// unless memory is tight (each listener keeps up to 1 MiB of receive
    /// buffers): a datagram between the two limits is then counted as
    /// `too_large`, which says what to change, rather than `truncated`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .max_datagram_size(512) // memory is tight, and peers send little
    ///     .serve(echo)
    ///     .await?;
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    ///
    /// assert_eq!(client.request(&[0; 512], Duration::from_secs(5)).await?.len(), 512);
    /// client.send(&[0; 600]).await?; // cut short by the kernel
    ///
    /// while handle.stats().dropped.total() == 0 {
    ///     tokio::task::yield_now().await; // until the server has dropped it
    /// }
    /// assert_eq!(handle.stats().dropped.truncated, 1);
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_datagram_size(mut self, bytes: usize) -> Self {
        self.max_datagram_size = bytes;
        self
    }

    /// Where service futures run (default [`Dispatch::Auto`]).
    ///
    /// The kernel keeps each peer on one listener, and a listener is one
    /// task. Inline, a handler that computes for long serves a few peers on
    /// one core while the others idle (a service behind a load balancer or
    /// a NAT sees exactly this). Spawned, each datagram's future runs on
    /// whichever worker is free, and its reply comes back to the
    /// listener's batched send path; limits, backpressure, accounting,
    /// panics and draining are the same either way. `Auto` measures how
    /// long handling holds each listener and moves it when that pays.
    ///
    /// Only the future runs on a worker: `Service::call` itself runs on the
    /// listener, so put heavy work inside the future (`async move { .. }`).
    ///
    /// ```
    /// use abyss::{Dispatch, Server};
    /// let builder = Server::bind("127.0.0.1:0").dispatch(Dispatch::Spawn);
    /// ```
    pub fn dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = dispatch;
        self
    }

    /// UDP socket options (the original's `transport_options`), checked by
    /// [`build`](Builder::build).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::{Server, UdpOptions};
    ///
    /// // A larger receive queue, to ride out bursts.
    /// let server = Server::bind("127.0.0.1:0")
    ///     .udp_options(UdpOptions::new().recv_buffer_size(4 << 20))
    ///     .build()?;
    ///
    /// let error = Server::bind("127.0.0.1:0")
    ///     .udp_options(UdpOptions::new().recv_buffer_size(0))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(error.field(), Some("recv_buffer_size"));
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn udp_options(mut self, options: UdpOptions) -> Self {
        self.udp = options;
        self
    }

    /// Serves on a custom transport instead of UDP sockets; the UDP options
    /// are then ignored.
    ///
    /// # Example
    ///
    /// UDP sockets opened by a [`Bind`] of your own, which counts them (the
    /// transports are [`UdpOptions`]' own, so batching is kept):
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::net::SocketAddr;
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use abyss::transport::{Bind, Transport};
    /// use abyss::{Request, Server, UdpOptions, service_fn};
    ///
    /// #[derive(Debug, Default, Clone)]
    /// struct Counted {
    ///     udp: UdpOptions,
    ///     opened: Arc<AtomicUsize>,
    /// }
    ///
    /// impl Bind for Counted {
    ///     fn bind_group(&self, addr: SocketAddr, count: usize) -> std::io::Result<Vec<Arc<dyn Transport>>> {
    ///         self.opened.fetch_add(count, Ordering::Relaxed);
    ///         self.udp.bind_group(addr, count)
    ///     }
    /// }
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), abyss::Error> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let counted = Counted::default();
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .listeners(2)
    ///     .transport(counted.clone())
    ///     .serve(echo)
    ///     .await?;
    /// handle.suspend().await?;
    /// handle.resume().await?; // opens the group again
    /// assert_eq!(counted.opened.load(Ordering::Relaxed), 4);
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn transport(mut self, bind: impl Bind) -> Self {
        self.transport = Some(Arc::new(bind));
        self
    }

    /// Serves sockets bound elsewhere (see
    /// [`BoundSockets`](crate::transport::BoundSockets)): bound by a
    /// supervisor, by this process before it dropped its privileges, or by
    /// systemd. Sets the address to theirs and one listener per socket; a
    /// different [`listeners`](Builder::listeners) or
    /// [`bind`](Builder::bind) afterwards fails at start.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::transport::BoundSockets;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Bound while the process could, say as root on port 53.
    /// let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    /// let addr = socket.local_addr()?;
    ///
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::builder()
    ///     .bound_sockets(BoundSockets::new(vec![socket])?)
    ///     .serve(echo)
    ///     .await?;
    /// assert_eq!(handle.local_addr(), addr);
    /// let reply = abyss::client::send_recv(addr, b"hi", std::time::Duration::from_secs(5)).await?;
    /// assert_eq!(reply, "hi");
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn bound_sockets(mut self, sockets: crate::transport::BoundSockets) -> Self {
        self.addr = Some(Ok(sockets.local_addr()));
        self.listeners = Some(sockets.len());
        self.transport = Some(Arc::new(sockets));
        self
    }

    /// Drops datagrams longer than `bytes` before the service sees them
    /// (default 8192, see [`DEFAULT_MAX_PACKET_SIZE`]), counted as
    /// [`Drops::too_large`] and logged. Shortcut for
    /// [`SizeLimitLayer`](crate::middleware::SizeLimitLayer). See
    /// [`max_datagram_size`](Builder::max_datagram_size) for how the two
    /// differ.
    ///
    /// # Example
    ///
    /// Raised for a protocol whose datagrams are larger than the default:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").max_packet_size(16 * 1024).serve(echo).await?;
    ///
    /// let big = vec![0; 12_000]; // over the default 8192
    /// let reply = abyss::client::send_recv(handle.local_addr(), &big, Duration::from_secs(5)).await?;
    /// assert_eq!(reply.len(), 12_000);
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_packet_size(mut self, bytes: usize) -> Self {
        self.layers.max_packet_size = Some(bytes);
        self
    }

    /// Removes the default [`max_packet_size`](Builder::max_packet_size)
    /// limit, so that the service sees every datagram the receive buffer
    /// holds (see [`max_datagram_size`](Builder::max_datagram_size)). Use
    /// it when the service checks sizes itself, or a
    /// [`SizeLimitLayer`](crate::middleware::SizeLimitLayer) of its own
    /// does.
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
    /// let handle = Server::bind("127.0.0.1:0").without_packet_size_limit().serve(echo).await?;
    ///
    /// let huge = vec![0; 60_000];
    /// let reply = abyss::client::send_recv(handle.local_addr(), &huge, Duration::from_secs(5)).await?;
    /// assert_eq!(reply.len(), 60_000);
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn without_packet_size_limit(mut self) -> Self {
        self.layers.max_packet_size = None;
        self
    }

    /// Limits each peer to `quota` (the original's `rate_limit_enabled`,
    /// `rate_limit_max_packets`, `rate_limit_window_ms`); over it,
    /// datagrams are dropped and counted as [`Drops::rate_limited`]. Peers
    /// are keyed by IPv4 /32 and IPv6 /64, at most 65 536 tracked. Shortcut
    /// for a [`PeerRateLimiter`](crate::middleware::PeerRateLimiter)'s
    /// layer; [`ServerHandle::rate_limiter`] gives it back to change the
    /// quota while serving. Off by default.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::middleware::RateQuota;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .rate_limit(RateQuota::new(1, Duration::from_secs(60))) // one a minute per peer
    ///     .serve(echo)
    ///     .await?;
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    ///
    /// assert_eq!(client.request(b"first", Duration::from_secs(5)).await?, "first");
    /// client.send(b"second").await?; // over the quota
    ///
    /// while handle.stats().dropped.total() == 0 {
    ///     tokio::task::yield_now().await; // until the server has dropped it
    /// }
    /// assert_eq!(handle.stats().dropped.rate_limited, 1);
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn rate_limit(mut self, quota: RateQuota) -> Self {
        self.layers.rate_limit = Some(RateLimitOption::Quota(quota));
        self
    }

    /// Like [`rate_limit`](Builder::rate_limit), with a limiter you built
    /// (other prefixes or table size). The server shares it: what you do
    /// with your clone, the server's limiter does.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::middleware::{PeerRateLimiter, RateQuota};
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // One allowance per IPv4 /24 and IPv6 /56, for at most 1024 of them.
    /// let limiter = PeerRateLimiter::builder(RateQuota::per_second(100))
    ///     .prefixes(24, 56)
    ///     .max_tracked_peers(1024)
    ///     .build()?;
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .rate_limiter(limiter.clone())
    ///     .serve(echo)
    ///     .await?;
    ///
    /// limiter.set_quota(RateQuota::per_second(10))?;
    /// assert_eq!(handle.rate_limiter().unwrap().quota().max(), 10);
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn rate_limiter(mut self, limiter: PeerRateLimiter) -> Self {
        self.layers.rate_limit = Some(RateLimitOption::Limiter(limiter));
        self
    }

    /// Limits each network to `quota`, besides each peer: IPv4 /24 and
    /// IPv6 /56 (the prefixes DNS servers use for response rate limiting),
    /// at most 65 536 tracked. A flood spread over the addresses of one
    /// network is then capped as a whole; over it, datagrams are dropped
    /// and counted as [`Drops::rate_limited`]. For other prefixes, give
    /// [`rate_limiter`](Builder::rate_limiter)-style a limiter you built
    /// with [`PeerRateLimiterBuilder::prefixes`](crate::middleware::PeerRateLimiterBuilder::prefixes)
    /// to [`prefix_rate_limiter`](Builder::prefix_rate_limiter). Off by
    /// default.
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
    ///     .rate_limit(RateQuota::per_second(100)) // each peer
    ///     .prefix_rate_limit(RateQuota::per_second(1_000)) // each /24 or /56
    ///     .serve(echo)
    ///     .await?;
    /// # handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn prefix_rate_limit(mut self, quota: RateQuota) -> Self {
        self.layers.prefix_rate_limit = Some(RateLimitOption::Quota(quota));
        self
    }

    /// Like [`prefix_rate_limit`](Builder::prefix_rate_limit), with a
    /// limiter you built (keyed as you chose).
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::middleware::{PeerRateLimiter, RateQuota};
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Each IPv4 /16 and IPv6 /48.
    /// let networks = PeerRateLimiter::builder(RateQuota::per_second(5_000))
    ///     .prefixes(16, 48)
    ///     .build()?;
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .prefix_rate_limiter(networks)
    ///     .serve(echo)
    ///     .await?;
    /// # handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn prefix_rate_limiter(mut self, limiter: PeerRateLimiter) -> Self {
        self.layers.prefix_rate_limit = Some(RateLimitOption::Limiter(limiter));
        self
    }

    /// Caps the replies the whole server sends per second, and their
    /// bytes, whatever their sources (replies returned by the service;
    /// what a handler sends itself through a
    /// [`SendHandle`](crate::SendHandle) is its own to count): a flood
    /// spread over many (spoofed)
    /// sources, each under its own quota, is capped in total. Replies over
    /// it are not sent, counted as [`Drops::over_budget`]. Peers the
    /// budget's [`exempt`](crate::middleware::ReplyBudgetBuilder::exempt)
    /// hook vouches for are neither limited nor counted. Give the same
    /// budget to several servers to cap them together. Off by default.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::middleware::ReplyBudget;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let budget = ReplyBudget::builder()
    ///     .replies_per_second(10_000)
    ///     .bytes_per_second(5_000_000)
    ///     .exempt(|peer: std::net::SocketAddr| peer.ip().is_loopback())
    ///     .build()?;
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .reply_budget(budget.clone())
    ///     .serve(echo)
    ///     .await?;
    /// # handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn reply_budget(mut self, budget: ReplyBudget) -> Self {
        self.layers.reply_budget = Some(budget);
        self
    }

    /// Fails requests that take longer than `timeout` to handle: no reply,
    /// counted as [`Drops::timed_out`]. Shortcut for tower's
    /// [`TimeoutLayer`](tower::timeout::TimeoutLayer). Off by default: a
    /// timer per request costs time on every datagram, and most handlers
    /// answer at once.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::{Duration, Instant};
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let stuck = service_fn(|_: Request| std::future::pending::<Result<(), Infallible>>());
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .timeout(Duration::from_millis(50))
    ///     .serve(stuck)
    ///     .await?;
    /// let sent = Instant::now();
    /// UdpClient::connect(handle.local_addr()).await?.send(b"hello").await?;
    ///
    /// while handle.stats().dropped.timed_out == 0 {
    ///     tokio::task::yield_now().await;
    /// }
    /// assert!(sent.elapsed() >= Duration::from_millis(50));
    /// assert_eq!(handle.stats().in_flight, 0); // given up on: no reply
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.layers.timeout = Some(timeout);
        self
    }

    /// Drops (sheds) datagrams that arrive while `max` requests are being
    /// handled, counted as [`Drops::overloaded`]. Unlike
    /// [`max_in_flight`](Builder::max_in_flight), which stops reading and
    /// lets the kernel queue, this keeps reading and sheds at once; unlike
    /// tower's `ConcurrencyLimit`, it never waits. Shortcut for
    /// [`ConcurrencyShedLayer`](crate::middleware::ConcurrencyShedLayer).
    /// Off by default.
    ///
    /// # Example
    ///
    /// One request at a time; a second one that arrives meanwhile is shed:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
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
    /// let handle = Server::bind("127.0.0.1:0").concurrency_shed(1).serve(held).await?;
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    ///
    /// client.send(b"first").await?;
    /// let release = called.recv().await.unwrap(); // it is being handled
    /// client.send(b"second").await?;
    /// while handle.stats().dropped.total() == 0 {
    ///     tokio::task::yield_now().await; // until the server has dropped it
    /// }
    /// assert_eq!(handle.stats().dropped.overloaded, 1);
    ///
    /// release.send(()).unwrap();
    /// assert_eq!(client.recv(Duration::from_secs(5)).await?, "first");
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn concurrency_shed(mut self, max: usize) -> Self {
        self.layers.concurrency_shed = Some(max);
        self
    }

    /// Handles each datagram in a tracing span (`datagram`, with peer, local
    /// address and length) and logs replies with their latency and
    /// failures. Shortcut for
    /// [`TraceLayer::new`](crate::middleware::TraceLayer::new). Off by
    /// default. The spans and events go to the `tracing` subscriber the
    /// program installs.
    ///
    /// # Example
    ///
    /// ```
    /// // On when asked for, e.g. from the environment.
    /// let trace = std::env::var_os("TRACE_DATAGRAMS").is_some();
    /// let server = abyss::Server::bind("127.0.0.1:0").trace(trace).build()?;
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn trace(mut self, on: bool) -> Self {
        self.layers.trace = on;
        self
    }

    /// Runs `hook` when [`ServerHandle::shutdown`] begins, alongside the
    /// listeners' drain and within the same shutdown timeout. Use it to
    /// end state that lives beside the sockets, such as
    /// [`Sessions::shutdown`](crate::session::Sessions::shutdown). Hooks
    /// do not run on suspend.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), abyss::Error> {
    /// let flushed = Arc::new(AtomicBool::new(false));
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .on_shutdown({
    ///         let flushed = flushed.clone();
    ///         move || {
    ///             let flushed = flushed.clone();
    ///             async move { flushed.store(true, Ordering::SeqCst) } // flush a cache, say
    ///         }
    ///     })
    ///     .serve(echo)
    ///     .await?;
    ///
    /// handle.suspend().await?;
    /// assert!(!flushed.load(Ordering::SeqCst), "hooks do not run on suspend");
    /// handle.shutdown().await;
    /// assert!(flushed.load(Ordering::SeqCst));
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_shutdown<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.shutdown_hooks.push(Arc::new(move || Box::pin(hook())));
        self
    }

    /// Checks the configuration and gives the [`Server`] it describes,
    /// ready to [`serve`](Server::serve). Fails with [`Error::Config`] or
    /// [`Error::Options`] naming the option at fault.
    ///
    /// ```
    /// let server = abyss::Server::bind("127.0.0.1:0").listeners(2).build()?;
    /// assert_eq!(server.addr().ip().to_string(), "127.0.0.1");
    ///
    /// let error = abyss::Server::builder().build().unwrap_err();
    /// assert_eq!(error.field(), Some("bind"));
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn build(self) -> Result<Server, Error> {
        self.validate().map(|config| Server { config })
    }

    fn validate(&self) -> Result<Config, Error> {
        let addr = match &self.addr {
            None => {
                return Err(Error::config(
                    "bind",
                    "no address to serve on: give one, e.g. `bind(\"127.0.0.1:5353\")` (`0.0.0.0` or `[::]` for every interface)",
                ));
            }
            Some(Err(reason)) => return Err(Error::config("bind", reason.clone())),
            Some(Ok(addr)) => *addr,
        };
        let listeners = self.listeners.unwrap_or_else(|| {
            if self.transport.is_none() && self.udp.receives_group_traffic() {
                // Broadcast and multicast reach every socket: one suffices.
                1
            } else {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            }
        });
        if listeners == 0 {
            return Err(Error::config("listeners", "must be at least 1"));
        }
        if self.max_in_flight == 0 {
            return Err(Error::config("max_in_flight", "must be at least 1"));
        }
        if self.max_in_flight < listeners {
            return Err(Error::config(
                "max_in_flight",
                format!(
                    "{} is fewer than the {listeners} listeners; each listener needs at least one",
                    self.max_in_flight
                ),
            ));
        }
        if !(1..=65_535).contains(&self.max_datagram_size) {
            return Err(Error::config(
                "max_datagram_size",
                format!("{} is not between 1 and 65535", self.max_datagram_size),
            ));
        }
        let bind: Arc<dyn Bind> = match &self.transport {
            Some(bind) => bind.clone(),
            None => {
                self.udp.validate()?;
                Arc::new(self.udp.clone())
            }
        };
        if self.layers.max_packet_size == Some(0) {
            return Err(Error::config("max_packet_size", "must be at least 1"));
        }
        if self.layers.concurrency_shed == Some(0) {
            return Err(Error::config("concurrency_shed", "must be at least 1"));
        }
        if self.layers.timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::config("timeout", "must be longer than zero"));
        }
        let rate_limiter = self
            .layers
            .rate_limit
            .as_ref()
            .map(|option| option.limiter("rate_limit", None))
            .transpose()?;
        let prefix_rate_limiter = self
            .layers
            .prefix_rate_limit
            .as_ref()
            .map(|option| option.limiter("prefix_rate_limit", Some((24, 56))))
            .transpose()?;
        Ok(Config {
            addr,
            name: self.name.clone(),
            listeners,
            max_in_flight: self.max_in_flight,
            shutdown_timeout: self.shutdown_timeout,
            max_datagram_size: self.max_datagram_size,
            dispatch: self.dispatch,
            bind,
            rate_limiter,
            prefix_rate_limiter,
            reply_budget: self.layers.reply_budget.clone(),
            trace: self.layers.trace,
            max_packet_size: self.layers.max_packet_size,
            concurrency_shed: self.layers.concurrency_shed,
            timeout: self.layers.timeout,
            shutdown_hooks: self.shutdown_hooks.clone(),
        })
    }

    /// Checks the configuration, opens the sockets and starts serving
    /// `service` on the current tokio runtime.
    ///
    /// The service is cloned once per listener. Its response is anything
    /// that is [`IntoReply`] (canonically `Option<Bytes>`), sent back to the
    /// peer from the socket the request came in on; its error is logged,
    /// counted and the datagram dropped. Errors that are drop decisions of a
    /// layer ([`middleware::Dropped`](crate::middleware::Dropped), tower's
    /// `Elapsed` and `Overloaded`) are counted under their reason instead.
    ///
    /// The server runs until [`ServerHandle::shutdown`] (or
    /// [`ServerHandle::shutdown_on`]); dropping the handle does not stop it.
    ///
    /// # Example
    ///
    /// A service that fails on some requests: the peer gets no reply, and
    /// the server counts it and goes on.
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{BoxError, Bytes, Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let upper = service_fn(|r: Request| async move {
    ///     if !r.payload().is_ascii() {
    ///         return Err(BoxError::from("not ASCII"));
    ///     }
    ///     Ok(Some(Bytes::from(r.payload().to_ascii_uppercase())))
    /// });
    /// let handle = Server::bind("127.0.0.1:0").serve(upper).await?;
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    ///
    /// assert_eq!(client.request(b"hi", Duration::from_secs(5)).await?, "HI");
    /// client.send(&[0xff]).await?; // fails: no reply
    ///
    /// while handle.stats().dropped.total() == 0 {
    ///     tokio::task::yield_now().await; // until the server has dropped it
    /// }
    /// handle.shutdown().await; // nothing in flight any more: the counts are final
    /// let stats = handle.stats();
    /// assert_eq!((stats.replied, stats.dropped.handler_error), (1, 1));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn serve<S>(self, service: S) -> Result<ServerHandle, Error>
    where
        S: Service<Request> + Clone + Send + 'static,
        S::Response: IntoReply + Send + 'static,
        S::Error: Into<BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        self.build()?.serve(service).await
    }
}

/// Starts listeners that serve clones of `service`.
fn spawner<S>(service: S) -> handle::Spawn
where
    S: Service<Request> + Clone + Send + 'static,
    S::Response: IntoReply + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    // The Mutex makes the prototype shareable (Sync) without asking the
    // service to be; it is locked only to clone it when listeners start.
    let prototype = std::sync::Mutex::new(service);
    Arc::new(
        move |transport: Arc<dyn Transport>, control, counters, settings| {
            let service = prototype.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let listener =
                listener::Listener::new(transport, service, control, counters, settings)?;
            Ok(tokio::spawn(listener.run()))
        },
    )
}

/// A validated configuration.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) addr: SocketAddr,
    /// The name given with `Builder::name`, if any.
    pub(crate) name: Option<String>,
    pub(crate) listeners: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) max_datagram_size: usize,
    pub(crate) dispatch: Dispatch,
    pub(crate) bind: Arc<dyn Bind>,
    pub(crate) rate_limiter: Option<PeerRateLimiter>,
    prefix_rate_limiter: Option<PeerRateLimiter>,
    reply_budget: Option<ReplyBudget>,
    trace: bool,
    max_packet_size: Option<usize>,
    concurrency_shed: Option<usize>,
    timeout: Option<Duration>,
    pub(crate) shutdown_hooks: Vec<ShutdownHook>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .field("listeners", &self.listeners)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Listener `index`'s share of `max_in_flight`.
    pub(crate) fn share(&self, index: usize) -> usize {
        let base = self.max_in_flight / self.listeners;
        base + usize::from(index < self.max_in_flight % self.listeners)
    }
}

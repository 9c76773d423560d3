use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use super::Config;
use super::listener::{Control, Settings};
use super::stats::{Counters, Stats};
use crate::Error;
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

/// Controls a running server: its address, counters, graceful shutdown,
/// suspend and resume.
///
/// Cheap to clone; every clone controls the same server. Dropping the handles
/// does not stop the server.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use abyss::{Request, Server};
/// use tower::service_fn;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
/// let handle = Server::bind("127.0.0.1:0".parse()?).listeners(1).serve(echo).await?;
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
pub struct ServerHandle {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    spawn: Spawn,
    counters: Arc<[Counters]>,
    local: Mutex<SocketAddr>,
    lifecycle: tokio::sync::Mutex<Lifecycle>,
}

enum Lifecycle {
    Running(Vec<Running>),
    Suspended,
    Stopped,
}

impl Lifecycle {
    fn name(&self) -> &'static str {
        match self {
            Lifecycle::Running(_) => "running",
            Lifecycle::Suspended => "suspended",
            Lifecycle::Stopped => "shut down",
        }
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
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    pub(crate) fn start(config: Config, spawn: Spawn) -> Result<Self, Error> {
        let counters: Arc<[Counters]> =
            (0..config.listeners).map(|_| Counters::default()).collect();
        let inner = Inner {
            local: Mutex::new(config.addr),
            config,
            spawn,
            counters,
            lifecycle: tokio::sync::Mutex::new(Lifecycle::Stopped),
        };
        let running = inner.open(inner.config.addr)?;
        *inner
            .lifecycle
            .try_lock()
            .expect("no one else has the handle yet") = Lifecycle::Running(running);
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The address the server answers on (with port 0 configured, the port
    /// it was given).
    pub fn local_addr(&self) -> SocketAddr {
        *self.inner.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rate limiter set with [`Builder::rate_limit`](crate::Builder::rate_limit)
    /// or [`Builder::rate_limiter`](crate::Builder::rate_limiter): change
    /// its quota while serving (the original's `update_config`) or read its
    /// counters.
    pub fn rate_limiter(&self) -> Option<&crate::middleware::PeerRateLimiter> {
        self.inner.config.rate_limiter.as_ref()
    }

    /// A snapshot of the counters, summed over listeners.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for counters in self.inner.counters.iter() {
            counters.add_to(&mut stats);
        }
        stats
    }

    /// Stops the server gracefully: every listener stops reading at once,
    /// finishes what is in flight for up to the shutdown timeout, then drops
    /// what is left (counted as aborted) and closes its socket.
    ///
    /// Hooks from [`Builder::on_shutdown`](crate::Builder::on_shutdown) run
    /// meanwhile, within the same timeout.
    ///
    /// Returns how many requests were drained and aborted. Calling it again
    /// returns an empty report; on a suspended server only the hooks run.
    pub async fn shutdown(&self) -> DrainReport {
        let mut lifecycle = self.inner.lifecycle.lock().await;
        let previous = std::mem::replace(&mut *lifecycle, Lifecycle::Stopped);
        let listeners = match previous {
            Lifecycle::Running(listeners) => listeners,
            Lifecycle::Suspended => Vec::new(),
            Lifecycle::Stopped => return DrainReport::default(),
        };
        let config = &self.inner.config;
        let hooks = futures_util::future::join_all(config.shutdown_hooks.iter().map(|hook| hook()));
        let hooks = async {
            if tokio::time::timeout(config.shutdown_timeout, hooks)
                .await
                .is_err()
            {
                tracing::warn!(target: crate::middleware::targets::LISTENER, "shutdown hooks outlived the shutdown timeout");
            }
        };
        let (report, ()) = tokio::join!(stop(listeners), hooks);
        report
    }

    /// Closes the sockets: listeners stop reading, finish what is in flight
    /// (up to the shutdown timeout, aborting the rest), then close, so the
    /// port stops answering and another process can bind it. Counters are
    /// kept. Suspending a suspended server does nothing.
    pub async fn suspend(&self) -> Result<DrainReport, Error> {
        let mut lifecycle = self.inner.lifecycle.lock().await;
        match std::mem::replace(&mut *lifecycle, Lifecycle::Suspended) {
            Lifecycle::Running(listeners) => Ok(stop(listeners).await),
            Lifecycle::Suspended => Ok(DrainReport::default()),
            Lifecycle::Stopped => {
                *lifecycle = Lifecycle::Stopped;
                Err(Error::State { state: "shut down" })
            }
        }
    }

    /// Opens the sockets again and resumes serving. A fixed port is bound
    /// again; with port 0 the port the server had is tried first, and if it
    /// was taken meanwhile a new one is picked. Returns the address now
    /// served on.
    pub async fn resume(&self) -> Result<SocketAddr, Error> {
        let mut lifecycle = self.inner.lifecycle.lock().await;
        if !matches!(*lifecycle, Lifecycle::Suspended) {
            return Err(Error::State {
                state: lifecycle.name(),
            });
        }
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
        *lifecycle = Lifecycle::Running(running);
        Ok(self.local_addr())
    }
}

impl Inner {
    /// Binds the listener group on `addr` and starts a task per socket.
    fn open(&self, addr: SocketAddr) -> Result<Vec<Running>, Error> {
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
        for (index, transport) in transports.into_iter().enumerate().take(config.listeners) {
            let control = Arc::new(Control::default());
            let settings = Settings {
                index,
                max_in_flight: config.share(index),
                max_datagram_size: config.max_datagram_size,
                shutdown_timeout: config.shutdown_timeout,
            };
            match (self.spawn)(transport, control.clone(), self.counters.clone(), settings) {
                Ok(task) => running.push(Running { control, task }),
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
                tracing::error!(target: crate::middleware::targets::LISTENER, %error, "listener task failed")
            }
        }
    }
    report
}

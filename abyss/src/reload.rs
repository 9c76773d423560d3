//! Replacing a server's service while it serves: new configuration, new
//! handler, new layers, without closing a socket or losing a datagram.
//!
//! [`Reloadable::new`] wraps a service and gives a [`Reloader`]. Serve the
//! `Reloadable` (its clones, one per listener, share the reloader's
//! updates); [`Reloader::replace`] hands every clone a new service. Each
//! clone serves its next datagram with it (if the new service is not ready
//! at once, the one after): datagrams from then on go to the new service,
//! and those already in flight finish on the old one (their futures hold
//! what they need), counted as usual. A service is replaced whole, with
//! the layers it was built with; the options of the server's builder
//! (packet-size limit, rate limit, timeout...) stay as they were.
//!
//! # Example
//!
//! A greeting read from configuration, changed while serving:
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use abyss::reload::Reloadable;
//! use abyss::{Request, Server, service_fn};
//!
//! fn greeter(greeting: &'static str) -> impl abyss::Service<Request, Response = String, Error = Infallible, Future = impl Send> + Clone + Send {
//!     service_fn(move |_: Request| async move { Ok::<_, Infallible>(greeting.to_owned()) })
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (service, reloader) = Reloadable::new(greeter("hello"));
//! let handle = Server::bind("127.0.0.1:0").serve(service).await?;
//! let client = abyss::client::UdpClient::connect(handle.local_addr()).await?;
//! let wait = Duration::from_secs(5);
//! assert_eq!(client.request(b"?", wait).await?, "hello");
//!
//! reloader.replace(greeter("bonjour"));
//! assert_eq!(client.request(b"?", wait).await?, "bonjour");
//! assert_eq!(reloader.generation(), 1);
//! handle.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;
use tower::Service;

/// A service that can be replaced while it serves; see the [module
/// docs](self).
///
/// # Example
///
/// See the [module docs](self).
pub struct Reloadable<S> {
    current: S,
    /// A replacement taken in `call` that was not ready there: it takes
    /// over at the next `poll_ready`.
    next: Option<S>,
    updates: watch::Receiver<Option<S>>,
}

impl<S: Clone> Clone for Reloadable<S> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
            next: self.next.clone(),
            updates: self.updates.clone(),
        }
    }
}

impl<S> fmt::Debug for Reloadable<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloadable").finish_non_exhaustive()
    }
}

/// Replaces the service of every clone of a [`Reloadable`]; from
/// [`Reloadable::new`].
///
/// # Example
///
/// See the [module docs](self).
pub struct Reloader<S> {
    updates: watch::Sender<Option<S>>,
    replaced: AtomicU64,
}

impl<S> fmt::Debug for Reloader<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader")
            .field("generation", &self.generation())
            .finish()
    }
}

impl<S: Clone> Reloadable<S> {
    /// `service`, replaceable through the returned [`Reloader`].
    ///
    /// # Example
    ///
    /// See the [module docs](self).
    pub fn new(service: S) -> (Self, Reloader<S>) {
        let (updates, receiver) = watch::channel(None);
        (
            Self {
                current: service,
                next: None,
                updates: receiver,
            },
            Reloader {
                updates,
                replaced: AtomicU64::new(0),
            },
        )
    }
}

impl<S> Reloader<S> {
    /// Hands `service` to every clone of the [`Reloadable`]: each serves
    /// its next datagram with it. What the replaced service has in flight
    /// finishes as it would have.
    ///
    /// # Example
    ///
    /// See the [module docs](self).
    pub fn replace(&self, service: S) {
        self.updates.send_replace(Some(service));
        self.replaced.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times the service was replaced.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::reload::Reloadable;
    ///
    /// let (_service, reloader) = Reloadable::new(abyss::service_fn(|_: abyss::Request| async {
    ///     Ok::<_, std::convert::Infallible>(())
    /// }));
    /// assert_eq!(reloader.generation(), 0);
    /// ```
    pub fn generation(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }
}

impl<S, R> Service<R> for Reloadable<S>
where
    S: Service<R> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let Some(next) = self.next.take() {
            self.current = next;
        }
        if let Some(service) = self.take_update() {
            self.current = service;
        }
        self.current.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // A server readies its service before the datagram arrives: a
        // replacement that came meanwhile serves this datagram if it is
        // ready at once (most are), as tower asks, or takes over at the
        // next readiness check.
        if let Some(mut service) = self.take_update() {
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(Ok(())) = service.poll_ready(&mut cx) {
                self.current = service;
            } else {
                self.next = Some(service);
            }
        }
        self.current.call(request)
    }
}

impl<S: Clone> Reloadable<S> {
    /// The replacement sent since this clone last looked, if any.
    fn take_update(&mut self) -> Option<S> {
        if !self.updates.has_changed().unwrap_or(false) {
            return None;
        }
        self.updates.borrow_and_update().clone()
    }
}

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tower::{BoxError, Service};

use super::future::{Permit, ResponseFuture};

/// Drops requests while `max` are in flight; see the [module docs](super).
///
/// Generic over any request type. Clones share the counter.
///
/// # Example
///
/// ```
/// use abyss_middleware::concurrency::ConcurrencyShed;
/// use abyss_middleware::{DropReason, drop_reason};
/// use tower::{Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (release, released) = tokio::sync::oneshot::channel::<()>();
/// let released = std::sync::Mutex::new(Some(released));
/// // The first request waits for `release`; the others answer at once.
/// let inner = tower::service_fn(move |_: ()| {
///     let wait = released.lock().unwrap().take();
///     async move {
///         if let Some(wait) = wait {
///             let _ = wait.await;
///         }
///         Ok::<_, std::convert::Infallible>("done")
///     }
/// });
/// let mut service = ConcurrencyShed::new(inner, 1);
///
/// let first = service.ready().await.unwrap().call(());
/// assert_eq!(service.in_flight(), 1);
/// // The limit is reached: the second is shed at once, not queued.
/// let second = service.ready().await.unwrap().call(()).await;
/// assert_eq!(drop_reason(&*second.unwrap_err()), Some(DropReason::Overloaded));
///
/// release.send(()).unwrap();
/// assert_eq!(first.await.unwrap(), "done");
/// assert_eq!(service.in_flight(), 0);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ConcurrencyShed<S> {
    inner: S,
    max: usize,
    in_flight: Arc<AtomicUsize>,
}

impl<S> ConcurrencyShed<S> {
    /// Wraps `inner` with a limit of `max` requests in flight.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::concurrency::ConcurrencyShed;
    ///
    /// let service = ConcurrencyShed::new(
    ///     tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) }),
    ///     1024,
    /// );
    /// assert_eq!(service.in_flight(), 0);
    /// ```
    pub fn new(inner: S, max: usize) -> Self {
        Self {
            inner,
            max,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Requests in flight now, across clones.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::concurrency::ConcurrencyShed;
    /// use tower::{Service, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut service = ConcurrencyShed::new(
    ///     tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) }),
    ///     8,
    /// );
    /// let clone = service.clone();
    /// let pending = service.ready().await.unwrap().call(());
    /// assert_eq!(clone.in_flight(), 1, "clones share the count");
    /// pending.await.unwrap();
    /// assert_eq!(clone.in_flight(), 0);
    /// # }
    /// ```
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The wrapped service.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::concurrency::ConcurrencyShed;
    ///
    /// let service = ConcurrencyShed::new(String::from("inner"), 8);
    /// assert_eq!(service.get_ref(), "inner");
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::concurrency::ConcurrencyShed;
    ///
    /// let mut service = ConcurrencyShed::new(vec![1], 8);
    /// service.get_mut().push(2);
    /// assert_eq!(service.get_ref(), &[1, 2]);
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::concurrency::ConcurrencyShed;
    ///
    /// let service = ConcurrencyShed::new(String::from("inner"), 8);
    /// assert_eq!(service.into_inner(), "inner");
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R> Service<R> for ConcurrencyShed<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the inner service's; the limit is applied in `call`,
        // where a request over it is dropped instead of waiting.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let previous = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return ResponseFuture::overloaded();
        }
        let permit = Permit::new(self.in_flight.clone());
        ResponseFuture::admitted(self.inner.call(request), permit)
    }
}

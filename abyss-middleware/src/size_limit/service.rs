use std::task::{Context, Poll};

use tower::{BoxError, Service};

use crate::future::ResponseFuture;
use crate::targets::LISTENER;
use crate::{Datagram, DropReason};

/// Drops datagrams over a size limit; see the [module docs](super).
///
/// # Example
///
/// ```
/// use abyss_middleware::size_limit::SizeLimit;
/// use abyss_middleware::{DropReason, drop_reason};
/// use tower::{Service, ServiceExt};
/// # #[derive(Debug)] struct Req(usize);
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { self.0 }
/// # }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let inner = tower::service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>("handled") });
/// let mut service = SizeLimit::new(inner, 512);
///
/// let fits = service.ready().await.unwrap().call(Req(512)).await;
/// assert_eq!(fits.unwrap(), "handled");
/// let over = service.ready().await.unwrap().call(Req(513)).await;
/// assert_eq!(drop_reason(&*over.unwrap_err()), Some(DropReason::TooLarge));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SizeLimit<S> {
    inner: S,
    max_bytes: usize,
}

impl<S> SizeLimit<S> {
    /// Wraps `inner`, dropping payloads of more than `max_bytes`.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::size_limit::SizeLimit;
    ///
    /// let service = SizeLimit::new(
    ///     tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) }),
    ///     1232, // a DNS answer that avoids fragmentation
    /// );
    /// assert_eq!(service.max_bytes(), 1232);
    /// ```
    pub fn new(inner: S, max_bytes: usize) -> Self {
        Self { inner, max_bytes }
    }

    /// The limit in bytes.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::SizeLimitLayer;
    /// use tower::Layer;
    ///
    /// let service = SizeLimitLayer::new(512).layer(());
    /// assert_eq!(service.max_bytes(), 512);
    /// ```
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The wrapped service.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::size_limit::SizeLimit;
    ///
    /// let service = SizeLimit::new(String::from("inner"), 512);
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
    /// use abyss_middleware::size_limit::SizeLimit;
    ///
    /// let mut service = SizeLimit::new(vec![1], 512);
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
    /// use abyss_middleware::size_limit::SizeLimit;
    ///
    /// let service = SizeLimit::new(String::from("inner"), 512);
    /// assert_eq!(service.into_inner(), "inner");
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R> Service<R> for SizeLimit<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    R: Datagram,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let size = request.payload_len();
        if size > self.max_bytes {
            tracing::debug!(
                target: LISTENER,
                peer = %request.peer(),
                size,
                limit = self.max_bytes,
                "packet_too_large"
            );
            // The inner service's readiness is kept for the next request.
            return ResponseFuture::rejected(DropReason::TooLarge);
        }
        ResponseFuture::inner(self.inner.call(request))
    }
}

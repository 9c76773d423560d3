use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::BoxError;

use crate::DropReason;

pin_project! {
    /// The response future of a service that may refuse a request in
    /// `call` ([`SizeLimit`](crate::size_limit::SizeLimit),
    /// [`PeerRateLimit`](crate::rate_limit::PeerRateLimit),
    /// [`IpFilter`](crate::filter::IpFilter)): either the inner service's
    /// future, or an immediate error for a [`DropReason`]
    /// ([`DropReason::into_error`]). No allocation either way.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::size_limit::ResponseFuture;
    /// use abyss_middleware::{DropReason, SizeLimitLayer, drop_reason};
    /// use tower::{Layer, Service};
    /// # #[derive(Debug)] struct Req(usize);
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { self.0 }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// type Inner = std::future::Ready<Result<(), std::convert::Infallible>>;
    /// let mut service = SizeLimitLayer::new(4).layer(tower::service_fn(|_: Req| std::future::ready(Ok(()))));
    /// let refused: ResponseFuture<Inner> = service.call(Req(5));
    /// assert_eq!(drop_reason(&*refused.await.unwrap_err()), Some(DropReason::TooLarge));
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[derive(Debug)]
    #[project = KindProjection]
    enum Kind<F> {
        Inner {
            #[pin]
            future: F,
        },
        Rejected {
            reason: DropReason,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    pub(crate) fn rejected(reason: DropReason) -> Self {
        Self {
            kind: Kind::Rejected { reason },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProjection::Inner { future } => {
                Poll::Ready(ready!(future.poll(cx)).map_err(Into::into))
            }
            KindProjection::Rejected { reason } => Poll::Ready(Err(reason.into_error())),
        }
    }
}

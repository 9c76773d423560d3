use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::BoxError;

use crate::targets::LISTENER;
use crate::{DropReason, IntoReply};

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

/// What a reply must pass once the inner service has made it.
#[derive(Debug, Clone)]
pub(crate) enum ReplyRule {
    /// At most this many bytes (`None`: any size); the amplification guard.
    Limit(Option<usize>),
    /// Within the server's reply budget; the reply budget layer.
    Budget(crate::ReplyBudget),
}

impl ReplyRule {
    fn check(&self, peer: SocketAddr, size: usize) -> Result<(), DropReason> {
        match self {
            ReplyRule::Limit(Some(limit)) if size > *limit => Err(DropReason::Amplification),
            ReplyRule::Limit(_) => Ok(()),
            // No reply (or an empty one) spends nothing.
            ReplyRule::Budget(budget) if size > 0 && !budget.spend(peer, size) => {
                Err(DropReason::OverBudget)
            }
            ReplyRule::Budget(_) => Ok(()),
        }
    }
}

pin_project! {
    /// The response future of a layer that checks replies
    /// ([`AmplificationGuard`](crate::amplification::AmplificationGuard),
    /// [`ReplyBudgetService`](crate::budget::ReplyBudgetService)): the
    /// inner service's response, or the error of the [`DropReason`] the
    /// reply was refused for. No allocation either way.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::AmplificationGuardLayer;
    /// use abyss_middleware::amplification::ResponseFuture;
    /// use abyss_middleware::{DropReason, drop_reason};
    /// use tower::{Layer, Service};
    /// # #[derive(Debug)] struct Req;
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { 1 }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// type Inner = std::future::Ready<Result<Vec<u8>, std::convert::Infallible>>;
    /// let mut service = AmplificationGuardLayer::new(3)
    ///     .layer(tower::service_fn(|_: Req| std::future::ready(Ok(vec![0u8; 4]))));
    /// let future: ResponseFuture<Inner> = service.call(Req);
    /// let refused = future.await.unwrap_err();
    /// assert_eq!(drop_reason(&*refused), Some(DropReason::Amplification));
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct ReplyFuture<F> {
        #[pin]
        inner: F,
        rule: ReplyRule,
        peer: SocketAddr,
    }
}

impl<F> ReplyFuture<F> {
    pub(crate) fn new(inner: F, rule: ReplyRule, peer: SocketAddr) -> Self {
        Self { inner, rule, peer }
    }
}

impl<F, T, E> Future for ReplyFuture<F>
where
    F: Future<Output = Result<T, E>>,
    T: IntoReply,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx)).map_err(Into::into)?;
        let size = response.reply_len();
        Poll::Ready(match this.rule.check(*this.peer, size) {
            Ok(()) => Ok(response),
            Err(reason) => {
                tracing::debug!(target: LISTENER, peer = %this.peer, size, reason = reason.as_str(), "reply_refused");
                Err(reason.into_error())
            }
        })
    }
}

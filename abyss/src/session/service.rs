use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tower::Service;

use super::Session;
use super::registry::{Outcome, Registry};
use crate::middleware::DropReason;
use crate::{BoxError, Request};

/// Routes each datagram to its peer's session; from [`Sessions::service`](super::Sessions::service).
///
/// Always ready. Its future resolves when the session has handled the
/// datagram, to the session's reply.
///
/// # Example
///
/// ```
/// use abyss::session::{Session, SessionService, Sessions, Step};
/// use abyss::{Request, Server, ServiceBuilder};
///
/// struct Echo;
///
/// impl Session for Echo {
///     async fn handle(&mut self, request: Request) -> Step {
///         Step::keep().reply(request.into_payload())
///     }
/// }
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let sessions = Sessions::builder(|_peer| Echo).build()?;
/// let service: SessionService<Echo, std::net::SocketAddr> = sessions.service();
/// // A service like any other: layers go in front of it.
/// let stack = ServiceBuilder::new()
///     .layer(abyss::middleware::SizeLimitLayer::new(512))
///     .service(service);
/// let handle = Server::bind("127.0.0.1:0").serve(stack).await?;
/// let reply = abyss::client::send_recv(handle.local_addr(), b"ping", std::time::Duration::from_secs(5)).await?;
/// assert_eq!(reply, "ping");
/// handle.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct SessionService<S, K> {
    registry: Arc<Registry<S, K>>,
}

impl<S, K> SessionService<S, K> {
    pub(super) fn new(registry: Arc<Registry<S, K>>) -> Self {
        Self { registry }
    }
}

impl<S, K> Clone for SessionService<S, K> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
        }
    }
}

impl<S, K> fmt::Debug for SessionService<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionService").finish_non_exhaustive()
    }
}

impl<S: Session, K: Hash + Eq + Clone + Send + Sync + 'static> Service<Request>
    for SessionService<S, K>
{
    type Response = Option<Bytes>;
    type Error = BoxError;
    type Future = SessionFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let (sender, receiver) = oneshot::channel();
        match self.registry.dispatch(request, sender) {
            Ok(()) => SessionFuture {
                state: State::Waiting { receiver },
            },
            Err(reason) => SessionFuture {
                state: State::Dropped { reason },
            },
        }
    }
}

pin_project! {
    /// Response future of [`SessionService`]: the session's reply, or why
    /// the datagram was dropped. A panic in the session's handler is
    /// resumed here, so the server counts it as a panic.
    ///
    /// # Example
    ///
    /// ```
    /// use std::future::poll_fn;
    /// use abyss::session::{Session, SessionFuture, Sessions, Step};
    /// use abyss::{Bytes, Request, SendHandle, Service};
    ///
    /// struct Quiet;
    ///
    /// impl Session for Quiet {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         Step::keep() // no reply
    ///     }
    /// }
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), abyss::BoxError> {
    /// let sessions = Sessions::builder(|_peer| Quiet).build()?;
    /// let mut service = sessions.service();
    /// let request = Request::new(
    ///     "192.0.2.1:5000".parse().unwrap(),
    ///     "192.0.2.53:53".parse().unwrap(),
    ///     Bytes::from_static(b"hi"),
    ///     SendHandle::detached(),
    /// );
    /// poll_fn(|cx| service.poll_ready(cx)).await?;
    /// let future: SessionFuture = service.call(request);
    /// assert_eq!(future.await?, None);
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct SessionFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[derive(Debug)]
    #[project = StateProjection]
    enum State {
        Waiting {
            #[pin]
            receiver: oneshot::Receiver<Outcome>,
        },
        Dropped {
            reason: DropReason,
        },
    }
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reply(reply) => f
                .debug_tuple("Reply")
                .field(&reply.as_ref().map(Bytes::len))
                .finish(),
            Outcome::Failed(error) => f.debug_tuple("Failed").field(error).finish(),
            Outcome::Panicked(_) => f.write_str("Panicked"),
            Outcome::Dropped(reason) => f.debug_tuple("Dropped").field(reason).finish(),
        }
    }
}

impl Future for SessionFuture {
    type Output = Result<Option<Bytes>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProjection::Dropped { reason } => Poll::Ready(Err(reason.into_error())),
            StateProjection::Waiting { receiver } => match std::task::ready!(receiver.poll(cx)) {
                Ok(Outcome::Reply(reply)) => Poll::Ready(Ok(reply)),
                Ok(Outcome::Failed(error)) => Poll::Ready(Err(error)),
                Ok(Outcome::Panicked(panic)) => std::panic::resume_unwind(panic),
                Ok(Outcome::Dropped(reason)) => Poll::Ready(Err(reason.into_error())),
                Err(_) => Poll::Ready(Err("the session ended before handling the datagram".into())),
            },
        }
    }
}

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
                Err(_) => Poll::Ready(Err("the session ended before handling the datagram".into())),
            },
        }
    }
}

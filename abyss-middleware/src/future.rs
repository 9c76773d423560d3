use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::BoxError;

use crate::DropReason;

pin_project! {
    /// The response future of a layer that may refuse a request in `call`:
    /// either the inner service's future, or an immediate [`Dropped`] error.
    /// No allocation either way.
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

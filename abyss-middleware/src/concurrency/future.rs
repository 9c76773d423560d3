use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::BoxError;

use crate::DropReason;

/// A slot under the limit, given back when dropped.
#[derive(Debug)]
pub(super) struct Permit {
    in_flight: Arc<AtomicUsize>,
}

impl Permit {
    pub(super) fn new(in_flight: Arc<AtomicUsize>) -> Self {
        Self { in_flight }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project! {
    /// Response future of [`ConcurrencyShed`](super::ConcurrencyShed):
    /// holds the request's slot until it completes or is dropped.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::concurrency::ResponseFuture;
    /// use abyss_middleware::ConcurrencyShedLayer;
    /// use tower::{Layer, Service};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// type Inner = std::future::Ready<Result<&'static str, std::convert::Infallible>>;
    /// let mut service = ConcurrencyShedLayer::new(8).layer(tower::service_fn(|_: ()| std::future::ready(Ok("done"))));
    /// let future: ResponseFuture<Inner> = service.call(());
    /// assert_eq!(service.in_flight(), 1, "the future holds a slot");
    /// assert_eq!(future.await.unwrap(), "done");
    /// assert_eq!(service.in_flight(), 0);
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        future: Option<F>,
        permit: Option<Permit>,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn admitted(future: F, permit: Permit) -> Self {
        Self {
            future: Some(future),
            permit: Some(permit),
        }
    }

    pub(super) fn overloaded() -> Self {
        Self {
            future: None,
            permit: None,
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
        let this = self.project();
        let Some(future) = this.future.as_pin_mut() else {
            return Poll::Ready(Err(DropReason::Overloaded.into_error()));
        };
        let output = ready!(future.poll(cx));
        // Free the slot as soon as the response is ready.
        this.permit.take();
        Poll::Ready(output.map_err(Into::into))
    }
}

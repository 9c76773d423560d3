use std::time::Duration;

use bytes::Bytes;

use crate::{BoxError, IntoReply};

/// What a session does after a datagram (or an idle timeout): go on, close
/// or fail, with an optional reply.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use abyss::session::Step;
///
/// let _ = Step::keep();                                  // {:continue, state}
/// let _ = Step::keep_for(Duration::from_secs(5));         // {:continue, state, 5000}, once
/// let _ = Step::keep_with_idle_timeout(Duration::from_secs(300)); // from now on
/// let _ = Step::close().reply("bye");                     // {:close, state}
/// let _ = Step::error("bad request");                     // {:error, reason, state}
/// ```
#[derive(Debug)]
#[must_use = "a step does nothing unless returned to the session"]
pub struct Step {
    pub(super) reply: Option<Bytes>,
    pub(super) next: Next,
}

#[derive(Debug)]
pub(super) enum Next {
    Keep,
    KeepFor(Duration),
    KeepWithIdleTimeout(Duration),
    Close,
    Error(BoxError),
}

impl Step {
    fn with(next: Next) -> Self {
        Self { reply: None, next }
    }

    /// Stay open, with the current idle timeout.
    pub fn keep() -> Self {
        Self::with(Next::Keep)
    }

    /// Stay open, closing (through [`Session::on_idle`](super::Session::on_idle))
    /// if nothing arrives within `timeout`; later waits use the idle timeout
    /// again.
    pub fn keep_for(timeout: Duration) -> Self {
        Self::with(Next::KeepFor(timeout))
    }

    /// Stay open, and use `timeout` as this session's idle timeout from now
    /// on.
    pub fn keep_with_idle_timeout(timeout: Duration) -> Self {
        Self::with(Next::KeepWithIdleTimeout(timeout))
    }

    /// End the session after this step (calls
    /// [`Session::on_close`](super::Session::on_close)).
    pub fn close() -> Self {
        Self::with(Next::Close)
    }

    /// End the session with an error (calls
    /// [`Session::on_error`](super::Session::on_error)). The datagram being
    /// handled, if any, is counted by the server as a handler error; a reply
    /// set on this step is not sent.
    pub fn error(error: impl Into<BoxError>) -> Self {
        Self::with(Next::Error(error.into()))
    }

    /// Sends `payload` to the peer.
    pub fn reply(mut self, payload: impl IntoReply) -> Self {
        self.reply = payload.into_reply();
        self
    }
}

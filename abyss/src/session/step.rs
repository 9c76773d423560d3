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
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Step};
    /// use abyss::Request;
    ///
    /// struct Count(u64);
    ///
    /// impl Session for Count {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.0 += 1;
    ///         Step::keep() // no reply, the session goes on
    ///     }
    /// }
    /// ```
    pub fn keep() -> Self {
        Self::with(Next::Keep)
    }

    /// Stay open, closing (through [`Session::on_idle`](super::Session::on_idle))
    /// if nothing arrives within `timeout`; later waits use the idle timeout
    /// again.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss::session::{Session, Step};
    /// use abyss::Request;
    ///
    /// /// Waits 2 s for the second half of a two-part message, then 60 s as usual.
    /// struct Halves(Option<Vec<u8>>);
    ///
    /// impl Session for Halves {
    ///     async fn handle(&mut self, request: Request) -> Step {
    ///         match self.0.take() {
    ///             None => {
    ///                 self.0 = Some(request.payload().to_vec());
    ///                 Step::keep_for(Duration::from_secs(2))
    ///             }
    ///             Some(mut first) => {
    ///                 first.extend_from_slice(request.payload());
    ///                 Step::keep().reply(first)
    ///             }
    ///         }
    ///     }
    /// }
    /// ```
    pub fn keep_for(timeout: Duration) -> Self {
        Self::with(Next::KeepFor(timeout))
    }

    /// Stay open, and use `timeout` as this session's idle timeout from now
    /// on.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss::session::{Session, Step};
    /// use abyss::Request;
    ///
    /// /// A peer that logs in is kept for an hour of silence, others for the default.
    /// struct Login;
    ///
    /// impl Session for Login {
    ///     async fn handle(&mut self, request: Request) -> Step {
    ///         if request.payload().as_ref() == b"login" {
    ///             return Step::keep_with_idle_timeout(Duration::from_secs(3600)).reply("welcome");
    ///         }
    ///         Step::keep()
    ///     }
    /// }
    /// ```
    pub fn keep_with_idle_timeout(timeout: Duration) -> Self {
        Self::with(Next::KeepWithIdleTimeout(timeout))
    }

    /// End the session after this step (calls
    /// [`Session::on_close`](super::Session::on_close)).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Step};
    /// use abyss::Request;
    ///
    /// struct Once;
    ///
    /// impl Session for Once {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         Step::close().reply("one answer per session")
    ///     }
    /// }
    /// ```
    pub fn close() -> Self {
        Self::with(Next::Close)
    }

    /// End the session with an error (calls
    /// [`Session::on_error`](super::Session::on_error)). The datagram being
    /// handled, if any, is counted by the server as a handler error; a reply
    /// set on this step is not sent.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Step};
    /// use abyss::Request;
    ///
    /// struct Json;
    ///
    /// impl Session for Json {
    ///     async fn handle(&mut self, request: Request) -> Step {
    ///         match std::str::from_utf8(request.payload()) {
    ///             Ok(text) if text.starts_with('{') => Step::keep(),
    ///             Ok(_) => Step::error("not a JSON object"),
    ///             Err(error) => Step::error(error),
    ///         }
    ///     }
    /// }
    /// ```
    pub fn error(error: impl Into<BoxError>) -> Self {
        Self::with(Next::Error(error.into()))
    }

    /// Sends `payload` to the peer.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::Step;
    ///
    /// let _ = Step::keep().reply("text");
    /// let _ = Step::keep().reply(vec![1u8, 2, 3]);
    /// let _ = Step::close().reply(abyss::Bytes::from_static(b"bye"));
    /// let _ = Step::keep().reply(None::<String>); // no reply after all
    /// ```
    pub fn reply(mut self, payload: impl IntoReply) -> Self {
        self.reply = payload.into_reply();
        self
    }
}

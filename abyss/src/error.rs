use std::io;
use std::net::SocketAddr;

use crate::transport::OptionsError;

/// Why a server could not be built, started, suspended or resumed.
///
/// Invalid configuration is found by [`Builder::build`](crate::Builder::build)
/// before any socket is opened and names the option at fault
/// ([`Error::field`]); a socket that cannot be opened is a [`Error::Bind`].
///
/// # Example
///
/// ```
/// let error = abyss::Server::bind("127.0.0.1:0").listeners(0).build().unwrap_err();
/// assert_eq!(error.field(), Some("listeners"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A server option is invalid.
    #[error("invalid server option `{field}`: {reason}")]
    Config {
        /// The builder method that set it.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A transport (socket) option is invalid.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The sockets could not be opened on the address.
    #[error("cannot bind {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The call does not fit the server's state (resuming a server that is
    /// not suspended, suspending one that was shut down).
    #[error("the server is {state}")]
    State {
        /// The state the server is in.
        state: crate::ServerState,
    },
    /// The sockets could not be handed to a successor
    /// ([`ServerHandle::hand_over`](crate::ServerHandle::hand_over)); the
    /// server goes on serving.
    #[error("cannot hand the sockets over")]
    Handover {
        /// What went wrong: the stream, or the successor going away.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn bind(addr: SocketAddr, source: io::Error) -> Self {
        // A transport that validates its options late reports them as an
        // InvalidInput error wrapping OptionsError: keep it typed.
        if source.kind() == io::ErrorKind::InvalidInput
            && let Some(options) = source
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<OptionsError>())
        {
            return Error::Options(options.clone());
        }
        Error::Bind { addr, source }
    }

    /// The option at fault, for configuration errors: the name of the
    /// [`Builder`](crate::Builder) or [`UdpOptions`](crate::UdpOptions)
    /// method that set it.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::{Server, UdpOptions};
    ///
    /// let error = Server::bind("127.0.0.1:0").max_packet_size(0).build().unwrap_err();
    /// assert_eq!(error.field(), Some("max_packet_size"));
    ///
    /// let error = Server::bind("127.0.0.1:0")
    ///     .udp_options(UdpOptions::new().send_buffer_size(0))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(error.field(), Some("send_buffer_size"));
    /// ```
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Config { field, .. } => Some(field),
            Error::Options(options) => Some(options.field),
            _ => None,
        }
    }

    /// Whether the address was already in use: another socket holds the
    /// port (unless [`UdpOptions::share_port`](crate::UdpOptions::share_port)
    /// asks to share it).
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let other = std::net::UdpSocket::bind("127.0.0.1:0")?; // another program's
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let error = Server::bind(other.local_addr()?).serve(echo).await.unwrap_err();
    /// assert!(error.is_addr_in_use());
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_addr_in_use(&self) -> bool {
        matches!(self, Error::Bind { source, .. } if source.kind() == io::ErrorKind::AddrInUse)
    }
}

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::Transport;

/// Opens a group of transports that share one local address.
///
/// A server with N listeners asks for N transports; with UDP each is its own
/// `SO_REUSEPORT` socket so the kernel spreads peers across them. When `addr`
/// has port 0, the first transport picks a free port and the others join it,
/// so the whole group answers on one address.
///
/// The server calls `bind` again on resume after a suspend, so an
/// implementation must be able to open the same address more than once.
///
/// # Example
///
/// ```
/// use abyss_transport::{Bind, UdpOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let group = UdpOptions::new().bind_group("127.0.0.1:0".parse().unwrap(), 2)?;
/// assert_eq!(group.len(), 2);
/// assert_eq!(group[0].local_addr()?, group[1].local_addr()?);
/// # Ok(())
/// # }
/// ```
pub trait Bind: Send + Sync + fmt::Debug + 'static {
    /// Opens `count` transports on `addr`. All of them must report the same
    /// [`Transport::local_addr`].
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Bind, UdpOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// // Port 0: the first socket picks a free port, the other three join it.
    /// let group = UdpOptions::new().bind_group("127.0.0.1:0".parse().unwrap(), 4)?;
    /// let addr = group[0].local_addr()?;
    /// assert_ne!(addr.port(), 0);
    /// for transport in &group {
    ///     assert_eq!(transport.local_addr()?, addr);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    fn bind_group(&self, addr: SocketAddr, count: usize) -> io::Result<Vec<Arc<dyn Transport>>>;

    /// Opens one more transport in the group already bound on `addr` (whose
    /// port is known), to replace a member that failed. The default opens a
    /// group of one.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Bind, UdpOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let options = UdpOptions::new();
    /// let mut group = options.bind_group("127.0.0.1:0".parse().unwrap(), 2)?;
    /// let addr = group[0].local_addr()?;
    /// // One member failed: replace it with a fresh socket on the same port.
    /// group[1] = options.join_group(addr)?;
    /// assert_eq!(group[1].local_addr()?, addr);
    /// # Ok(())
    /// # }
    /// ```
    fn join_group(&self, addr: SocketAddr) -> io::Result<Arc<dyn Transport>> {
        self.bind_group(addr, 1)?
            .pop()
            .ok_or_else(|| io::Error::other("the transport opened no endpoint"))
    }
}

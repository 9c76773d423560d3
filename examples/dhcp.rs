//! DHCPv4 message descriptions for `examples/dump_dhcp.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;

use abyss::{Bytes, Request};
use dhcproto::v4::{DhcpOption, Message, OptionCode};
use dhcproto::{Decodable, Decoder};

/// One line describing a DHCPv4 message from `peer`: its type, the client's
/// hardware address, the transaction ID and the options it asks for.
/// `None` if it does not parse.
///
/// ```
/// use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
/// use dhcproto::{Encodable, Encoder};
///
/// let mut discover = Message::default();
/// discover.set_xid(0xabcd).set_chaddr(&[2, 0, 0, 0, 0, 1]);
/// discover.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
/// discover.opts_mut().insert(DhcpOption::ParameterRequestList(vec![OptionCode::SubnetMask, OptionCode::Router]));
/// let mut bytes = Vec::new();
/// discover.encode(&mut Encoder::new(&mut bytes)).unwrap();
///
/// let line = abyss_examples::dhcp::describe("0.0.0.0:68".parse().unwrap(), &bytes).unwrap();
/// assert_eq!(line, "dhcp Discover from 0.0.0.0:68 mac 02:00:00:00:00:01 xid 0x0000abcd requests [SubnetMask, Router]");
/// ```
pub fn describe(peer: SocketAddr, payload: &[u8]) -> Option<String> {
    // dhcproto 0.15 panics on some malformed options (found by this
    // project's fuzz test): treat a panic in decoding as malformed input.
    let message = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(payload)))
        .ok()?
        .ok()?;
    let kind = message
        .opts()
        .msg_type()
        .map_or_else(|| "(no type)".to_owned(), |t| format!("{t:?}"));
    // dhcproto's chaddr() slices by the header's hlen, which a malformed
    // message can set past the 16-byte field: check it first.
    let mac: Vec<String> = if usize::from(message.hlen()) <= 16 {
        message
            .chaddr()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    } else {
        vec![format!("(hlen {})", message.hlen())]
    };
    let requests = match message.opts().get(OptionCode::ParameterRequestList) {
        Some(DhcpOption::ParameterRequestList(codes)) => format!("{codes:?}"),
        _ => "[]".to_owned(),
    };
    Some(format!(
        "dhcp {kind} from {peer} mac {} xid {:#010x} requests {requests}",
        mac.join(":"),
        message.xid()
    ))
}

/// A service that hands each message's description (or a note that it is
/// malformed) to `sink` and never replies: a listener, not a DHCP server.
pub fn service(
    sink: impl Fn(String) + Clone + Send + Sync + 'static,
) -> impl tower::Service<
    Request,
    Response = Option<Bytes>,
    Error = Infallible,
    Future = std::future::Ready<Result<Option<Bytes>, Infallible>>,
> + Clone
+ Send
+ 'static {
    crate::printing_service("dhcp", describe, sink)
}

//! mDNS message descriptions for `examples/dump_mdns.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;

use abyss::{Bytes, Request};
use hickory_proto::op::{Message, MessageType};

/// One line describing an mDNS message from `peer`: queries with their
/// questions, responses with their answers. `None` if it does not parse.
///
/// ```
/// use hickory_proto::op::{Message, Query};
/// use hickory_proto::rr::{Name, RecordType};
///
/// let mut query = Message::query();
/// query.add_query(Query::query(Name::from_ascii("printer.local.").unwrap(), RecordType::A));
/// let line = abyss_examples::mdns::describe("192.0.2.9:5353".parse().unwrap(), &query.to_vec().unwrap()).unwrap();
/// assert_eq!(line, "mdns query from 192.0.2.9:5353: printer.local. A");
/// ```
pub fn describe(peer: SocketAddr, payload: &[u8]) -> Option<String> {
    let message = Message::from_vec(payload).ok()?;
    let kind = match message.metadata.message_type {
        MessageType::Query => "query",
        MessageType::Response => "response",
    };
    let mut parts: Vec<String> = message
        .queries
        .iter()
        .map(|q| format!("{} {}", q.name(), q.query_type()))
        .collect();
    parts.extend(
        message
            .answers
            .iter()
            .chain(&message.additionals)
            .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data)),
    );
    Some(format!("mdns {kind} from {peer}: {}", parts.join(", ")))
}

/// A service that hands each message's description (or a note that it is
/// malformed) to `sink` and never replies: a listener, not a responder.
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
    crate::printing_service("mdns", describe, sink)
}

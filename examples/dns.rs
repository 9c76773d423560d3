//! A DNS forwarder as a `tower::Service` for Abyss, used by
//! `examples/dns_forwarder.rs` and tested against a real name server.

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use abyss::{Bytes, Request};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use tokio::net::UdpSocket;

/// Forwards each query to one upstream server and relays its answer.
///
/// Each query leaves from a fresh socket (so the kernel picks a random
/// source port) with a random ID; only a reply from the upstream address,
/// with that ID and the same question, is accepted, anything else (a
/// spoofing attempt, a late reply) is ignored. If none comes within the
/// timeout the client gets SERVFAIL. A query that cannot be parsed gets
/// FORMERR when its 12-byte header is there to answer, and is dropped when
/// it is not; responses are never answered (no reflection loops).
#[derive(Debug)]
pub struct Forwarder {
    upstream: SocketAddr,
    timeout: Duration,
}

impl Forwarder {
    /// Forwards to `upstream`, waiting up to `timeout` for each answer.
    pub fn new(upstream: SocketAddr, timeout: Duration) -> Self {
        Self { upstream, timeout }
    }

    /// The reply to `query`, or `None` to send nothing.
    pub async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let mut message = match Message::from_vec(query) {
            Ok(message) => message,
            Err(error) => {
                tracing::debug!(%error, "malformed query");
                let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
                // Without a whole header there is nothing to answer.
                query.get(11)?;
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        let id = message.metadata.id;
        if message.metadata.message_type != MessageType::Query {
            return None;
        }
        if message.queries.len() != 1 {
            return refuse(&message, ResponseCode::FormErr);
        }
        let question = message.queries.clone();
        let upstream_id: u16 = rand::random();
        message.metadata.id = upstream_id;
        let forwarded = message.to_vec().ok()?;
        message.metadata.id = id;
        match self.ask_upstream(&forwarded, upstream_id, &question).await {
            Some(mut reply) => {
                reply.metadata.id = id;
                reply.to_vec().ok()
            }
            None => refuse(&message, ResponseCode::ServFail),
        }
    }

    async fn ask_upstream(
        &self,
        forwarded: &[u8],
        upstream_id: u16,
        question: &[hickory_proto::op::Query],
    ) -> Option<Message> {
        let local: SocketAddr = match self.upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).await.ok()?;
        socket.send_to(forwarded, self.upstream).await.ok()?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut buf = vec![0u8; 65_535];
        loop {
            let (len, from) =
                match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                    Ok(Ok(received)) => received,
                    Ok(Err(_)) => continue, // ICMP error: keep waiting until the deadline
                    Err(_) => {
                        tracing::debug!(upstream = %self.upstream, "upstream timed out");
                        return None;
                    }
                };
            if from != self.upstream {
                tracing::debug!(%from, "reply from an unexpected address ignored");
                continue;
            }
            match Message::from_vec(&buf[..len]) {
                Ok(reply) if reply.metadata.id == upstream_id && reply.queries == question => {
                    return Some(reply);
                }
                _ => tracing::debug!(%from, "reply with a wrong ID or question ignored"),
            }
        }
    }
}

/// An error response to `message` with its question.
fn refuse(message: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = Message::error_msg(message.metadata.id, message.metadata.op_code, code);
    reply.queries = message.queries.clone();
    reply.metadata.recursion_desired = message.metadata.recursion_desired;
    reply.to_vec().ok()
}

/// The forwarder as a service: request in, optional reply out.
pub fn service(
    forwarder: Arc<Forwarder>,
) -> impl tower::Service<
    Request,
    Response = Option<Bytes>,
    Error = Infallible,
    Future = impl Future<Output = Result<Option<Bytes>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |request: Request| {
        let forwarder = forwarder.clone();
        async move { Ok(forwarder.answer(request.payload()).await.map(Bytes::from)) }
    })
}

/// The first `nameserver` of a resolv.conf, on port 53.
///
/// ```
/// let conf = "# comment\nsearch example\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
/// assert_eq!(abyss_examples::dns::first_nameserver(conf), Some("192.0.2.53:53".parse().unwrap()));
/// ```
pub fn first_nameserver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == "nameserver")
            .then(|| words.next()?.parse::<std::net::IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

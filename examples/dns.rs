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

/// Something that answers a DNS query (or decides not to).
pub trait Answer: Send + Sync + 'static {
    /// The reply to `query`, or `None` to send nothing.
    fn answer(&self, query: &[u8]) -> impl Future<Output = Option<Vec<u8>>> + Send;
}

impl Answer for Forwarder {
    fn answer(&self, query: &[u8]) -> impl Future<Output = Option<Vec<u8>>> + Send {
        Forwarder::answer(self, query)
    }
}

impl Answer for Resolver {
    fn answer(&self, query: &[u8]) -> impl Future<Output = Option<Vec<u8>>> + Send {
        Resolver::answer(self, query)
    }
}

/// A forwarder or resolver as a service: request in, optional reply out.
pub fn service<A: Answer>(
    answerer: Arc<A>,
) -> impl tower::Service<
    Request,
    Response = Option<Bytes>,
    Error = Infallible,
    Future = impl Future<Output = Result<Option<Bytes>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |request: Request| {
        let answerer = answerer.clone();
        async move { Ok(answerer.answer(request.payload()).await.map(Bytes::from)) }
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

/// The root servers' IPv4 addresses (a.root-servers.net to m), used when no
/// root hints file is given.
pub const ROOT_SERVERS: [&str; 13] = [
    "198.41.0.4",
    "170.247.170.2",
    "192.33.4.12",
    "199.7.91.13",
    "192.203.230.10",
    "192.5.5.241",
    "192.112.36.4",
    "198.97.190.53",
    "192.36.148.17",
    "192.58.128.30",
    "193.0.14.129",
    "199.7.83.42",
    "202.12.27.33",
];

/// The IPv4 addresses of a root hints file (`named.root` format: `NAME TTL
/// A ADDRESS` lines; comments start with `;`).
///
/// ```
/// let hints = "; root\n.  3600000  NS  A.ROOT-SERVERS.NET.\nA.ROOT-SERVERS.NET. 3600000 A 198.41.0.4\n";
/// assert_eq!(abyss_examples::dns::parse_root_hints(hints), vec!["198.41.0.4".parse::<std::net::IpAddr>().unwrap()]);
/// ```
pub fn parse_root_hints(text: &str) -> Vec<std::net::IpAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(';').next()?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| w.eq_ignore_ascii_case("A"))?;
            words.get(at + 1)?.parse().ok()
        })
        .collect()
}

use hickory_proto::op::Query;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// What an iterative resolution ends with.
#[derive(Debug, Clone)]
struct Resolution {
    code: ResponseCode,
    answers: Vec<Record>,
}

/// An iterative (recursive-service) resolver: starts at the root servers,
/// follows referrals with and without glue, follows CNAME chains, and
/// caches answers for their TTL.
///
/// Glue is accepted only inside the zone being delegated (bailiwick), so a
/// server cannot plant addresses for names it is not authoritative for;
/// delegations without usable glue are resolved by looking up the name
/// servers' own addresses. Referral chains, CNAME chains and the nested
/// look-ups are bounded ([`MAX_REFERRALS`], [`MAX_DEPTH`]); past the bounds
/// the answer is SERVFAIL.
#[derive(Debug)]
pub struct Resolver {
    roots: Vec<IpAddr>,
    port: u16,
    timeout: Duration,
    cache: Mutex<HashMap<(Name, RecordType), (tokio::time::Instant, Resolution)>>,
}

/// Referrals followed for one name at most.
pub const MAX_REFERRALS: usize = 16;
/// Nested resolutions (CNAME targets, glueless name servers) at most.
pub const MAX_DEPTH: usize = 8;

impl Resolver {
    /// Resolves from `roots`, asking every server on `port` (53 on the
    /// internet) and waiting `timeout` for each.
    pub fn new(roots: Vec<IpAddr>, port: u16, timeout: Duration) -> Self {
        Self {
            roots,
            port,
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The reply to `query`, or `None` to send nothing.
    pub async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let message = match Message::from_vec(query) {
            Ok(message) => message,
            Err(_) => {
                let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
                query.get(11)?;
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        if message.metadata.message_type != MessageType::Query {
            return None;
        }
        let [question] = message.queries.as_slice() else {
            return refuse(&message, ResponseCode::FormErr);
        };
        let resolution = self
            .resolve(question.name().to_lowercase(), question.query_type(), 0)
            .await;
        let mut reply = Message::response(message.metadata.id, message.metadata.op_code);
        reply.metadata.recursion_desired = message.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.metadata.response_code = resolution.code;
        reply.queries = message.queries.clone();
        reply.answers = resolution.answers;
        reply.to_vec().ok()
    }

    fn cached(&self, name: &Name, kind: RecordType) -> Option<Resolution> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (expires, resolution) = cache.get(&(name.clone(), kind))?;
        (tokio::time::Instant::now() < *expires).then(|| resolution.clone())
    }

    fn remember(&self, name: Name, kind: RecordType, resolution: &Resolution) {
        let ttl = resolution.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
        if ttl == 0 || resolution.code != ResponseCode::NoError {
            return;
        }
        let expires = tokio::time::Instant::now() + Duration::from_secs(u64::from(ttl));
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert((name, kind), (expires, resolution.clone()));
    }

    /// Resolves `name`/`kind` iteratively from the roots.
    fn resolve(
        &self,
        name: Name,
        kind: RecordType,
        depth: usize,
    ) -> std::pin::Pin<Box<dyn Future<Output = Resolution> + Send + '_>> {
        Box::pin(async move {
            let servfail = Resolution {
                code: ResponseCode::ServFail,
                answers: Vec::new(),
            };
            if depth > MAX_DEPTH {
                tracing::debug!(%name, "resolution too deep");
                return servfail;
            }
            if let Some(hit) = self.cached(&name, kind) {
                return hit;
            }
            let mut servers = self.roots.clone();
            let mut zone = Name::root();
            for _ in 0..MAX_REFERRALS {
                let Some(reply) = self.ask_any(&servers, &name, kind).await else {
                    return servfail;
                };
                let code = reply.metadata.response_code;
                if code == ResponseCode::NXDomain {
                    return Resolution {
                        code,
                        answers: Vec::new(),
                    };
                }
                if code != ResponseCode::NoError {
                    return servfail;
                }
                let answers: Vec<Record> = reply
                    .answers
                    .iter()
                    .filter(|r| r.name == name)
                    .cloned()
                    .collect();
                if answers.iter().any(|r| r.record_type() == kind) || kind == RecordType::CNAME {
                    let resolution = Resolution { code, answers };
                    self.remember(name, kind, &resolution);
                    return resolution;
                }
                if let Some(RData::CNAME(target)) = answers
                    .iter()
                    .map(|r| &r.data)
                    .find(|d| matches!(d, RData::CNAME(_)))
                {
                    let mut rest = self.resolve(target.0.to_lowercase(), kind, depth + 1).await;
                    let mut chain = answers.clone();
                    chain.append(&mut rest.answers);
                    let resolution = Resolution {
                        code: rest.code,
                        answers: chain,
                    };
                    self.remember(name, kind, &resolution);
                    return resolution;
                }
                // A referral: name servers for a zone closer to the name.
                let referral: Vec<(Name, Name)> = reply
                    .authorities
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::NS(ns) => Some((r.name.to_lowercase(), ns.0.to_lowercase())),
                        _ => None,
                    })
                    .collect();
                let Some((child, _)) = referral.first().cloned() else {
                    // No answer and no referral: the name exists without
                    // data of this type.
                    return Resolution {
                        code,
                        answers: Vec::new(),
                    };
                };
                // Bailiwick: the new zone must lie under the one we asked
                // and above the name; anything else is a lame or hostile
                // referral.
                if !(zone.zone_of(&child) && child.zone_of(&name)) || child == zone {
                    tracing::debug!(%zone, %child, %name, "referral out of bailiwick");
                    return servfail;
                }
                let names: Vec<Name> = referral
                    .iter()
                    .filter(|(owner, _)| *owner == child)
                    .map(|(_, ns)| ns.clone())
                    .collect();
                // Glue only for name servers inside the delegated zone.
                let mut next: Vec<IpAddr> = reply
                    .additionals
                    .iter()
                    .filter(|r| child.zone_of(&r.name) && names.contains(&r.name.to_lowercase()))
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        _ => None,
                    })
                    .collect();
                if next.is_empty() {
                    // Glueless: look the name servers up from the root.
                    for ns in &names {
                        let found = self.resolve(ns.clone(), RecordType::A, depth + 1).await;
                        next.extend(found.answers.iter().filter_map(|r| match &r.data {
                            RData::A(a) => Some(IpAddr::V4(a.0)),
                            _ => None,
                        }));
                        if !next.is_empty() {
                            break;
                        }
                    }
                }
                if next.is_empty() {
                    return servfail;
                }
                servers = next;
                zone = child;
            }
            tracing::debug!(%name, "too many referrals");
            servfail
        })
    }

    /// Asks the servers in turn until one answers.
    async fn ask_any(&self, servers: &[IpAddr], name: &Name, kind: RecordType) -> Option<Message> {
        for server in servers {
            let mut query = Message::query();
            query.metadata.recursion_desired = false;
            query.add_query(Query::query(name.clone(), kind));
            let forwarder = Forwarder::new(SocketAddr::new(*server, self.port), self.timeout);
            let id = query.metadata.id;
            let bytes = query.to_vec().ok()?;
            if let Some(reply) = forwarder.ask_upstream(&bytes, id, &query.queries).await {
                return Some(reply);
            }
        }
        None
    }
}

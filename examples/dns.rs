//! A DNS forwarder as a `tower::Service` for Abyss, used by
//! `examples/dns_forwarder.rs` and tested against a real name server.

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use abyss::upstream::{Correlate, Upstream, UpstreamError, UpstreamStats};
use abyss::{Bytes, BytesMut, Request};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use tokio::net::UdpSocket;
use tower::ServiceExt;

/// Forwards each query to an upstream server and relays its answer, on
/// [`abyss::upstream::Upstream`].
///
/// Only the header and the question are read; the query goes upstream
/// with a random ID and the letters of its question in random case (DNS
/// 0x20), from a pool of sockets on random ports that are replaced after
/// 10 000 queries. An answer counts only if it comes from the upstream's
/// address, on the socket the query left from, with its ID and its
/// question exactly as sent (case included), or, for an error answer that
/// carries no question, its ID; anything else is ignored. The client gets
/// the answer with its own ID and question case. Several upstreams are
/// tried in order when one does not answer in time; if none does, the
/// client gets SERVFAIL.
///
/// Only standard queries are forwarded: another opcode (NOTIFY, UPDATE,
/// STATUS) gets NOTIMP at once. A query that cannot be parsed gets FORMERR
/// when its 12-byte header is there to answer, and nothing when it is not;
/// responses (QR set) are never answered, malformed or not.
#[derive(Debug)]
pub struct Forwarder {
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    /// The upstream clients, opened on first use (they need a runtime).
    upstreams: std::sync::OnceLock<Vec<Upstream<DnsIds>>>,
}

impl Forwarder {
    /// Forwards to `upstream`, waiting up to `timeout` for each answer.
    /// Its sockets are opened on first use: an unusable upstream shows as
    /// SERVFAIL then; [`Forwarder::start`] refuses one at once.
    pub fn new(upstream: SocketAddr, timeout: Duration) -> Self {
        Self {
            addrs: vec![upstream],
            timeout,
            upstreams: std::sync::OnceLock::new(),
        }
    }

    /// Forwards to `upstreams`, in order of preference, opening their
    /// sockets now (inside a tokio runtime). Fails for an empty list, or an
    /// upstream on port 0 or an unspecified address.
    pub fn start(upstreams: &[SocketAddr], timeout: Duration) -> Result<Self, UpstreamError> {
        if upstreams.is_empty() {
            return Err(UpstreamError::Send(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no upstream to forward to",
            )));
        }
        let clients = upstreams
            .iter()
            .map(|&addr| open_upstream(addr, timeout))
            .collect::<Result<Vec<_>, _>>()?;
        let forwarder = Self {
            addrs: upstreams.to_vec(),
            timeout,
            upstreams: std::sync::OnceLock::new(),
        };
        let _ = forwarder.upstreams.set(clients);
        Ok(forwarder)
    }

    /// The counters of each upstream client, in the order given (empty
    /// before first use for a forwarder made with [`Forwarder::new`]).
    pub fn upstream_stats(&self) -> Vec<UpstreamStats> {
        self.upstreams
            .get()
            .map(|clients| clients.iter().map(Upstream::stats).collect())
            .unwrap_or_default()
    }

    /// The reply to `query`, or `None` to send nothing. A relayed answer
    /// is the upstream's, rewritten in place: no copy, no allocation.
    pub async fn answer(&self, query: &[u8]) -> Option<Bytes> {
        let end = match screen(query) {
            Ok(end) => end,
            Err(reply) => return reply.map(Bytes::from),
        };
        let upstreams = self.upstreams.get_or_init(|| {
            self.addrs
                .iter()
                .filter_map(|&addr| match open_upstream(addr, self.timeout) {
                    Ok(client) => Some(client),
                    Err(error) => {
                        tracing::warn!(%addr, %error, "unusable upstream");
                        None
                    }
                })
                .collect()
        });
        for upstream in upstreams {
            // At its outstanding bound an upstream is busy: the next one
            // is asked, or the client gets SERVFAIL, rather than a queue.
            let Some(asked) = upstream.try_call(query) else {
                tracing::debug!("upstream busy");
                continue;
            };
            match asked.await {
                // An error answer without a question: the client gets
                // our own error reply with that code, not its bytes.
                Ok(answer) if answer.get(4..6) == Some(&[0, 0]) => {
                    return Some(error_reply(query, Some(end), answer[3] & 0x0f).into());
                }
                Ok(answer) => return Some(relay(query, end, answer)),
                Err(error) => tracing::debug!(%error, "upstream did not answer"),
            }
        }
        Some(error_reply(query, Some(end), 2).into()) // SERVFAIL
    }
}

impl Forwarder {
    /// The reply to `query` received over TCP (RFC 7766): forwarded over
    /// TCP to the upstreams in turn (a connection per query), so that a
    /// client told to retry over TCP (TC=1) gets its whole answer. TCP
    /// cannot be spoofed blind: the ID is kept and the case left alone.
    pub async fn answer_over_tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        let end = match screen(query) {
            Ok(end) => end,
            Err(reply) => return reply,
        };
        for &upstream in &self.addrs {
            match tokio::time::timeout(self.timeout, ask_over_tcp(upstream, query)).await {
                Ok(Ok(answer)) if answer.get(..2) == query.get(..2) => return Some(answer),
                Ok(Ok(_)) => tracing::debug!(%upstream, "TCP answer with another ID"),
                Ok(Err(error)) => tracing::debug!(%upstream, %error, "TCP upstream failed"),
                Err(_) => tracing::debug!(%upstream, "TCP upstream timed out"),
            }
        }
        Some(error_reply(query, Some(end), 2)) // SERVFAIL
    }
}

/// Where the question of a standard query ends, or what to answer instead
/// (`None`: nothing). Without a whole header there is nothing to answer;
/// a response is never answered (no reflection loops between servers);
/// other opcodes get NOTIMP, a malformed query FORMERR.
fn screen(query: &[u8]) -> Result<usize, Option<Vec<u8>>> {
    let header = query.get(..12).ok_or(None)?;
    if header[2] & 0x80 != 0 {
        return Err(None);
    }
    let question = question_end(query);
    if (header[2] >> 3) & 0x0f != 0 {
        return Err(Some(error_reply(query, question, 4))); // NOTIMP
    }
    question.ok_or_else(|| {
        tracing::debug!("malformed query");
        Some(error_reply(query, None, 1)) // FORMERR
    })
}

/// One query over a TCP connection of its own: two bytes of length, then
/// the message, each way.
async fn ask_over_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(query).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

/// Connections served over TCP at once, at most: beyond it, new ones wait
/// in the listen queue.
const MAX_TCP_CONNECTIONS: usize = 1024;

/// The longest query taken over TCP, in bytes: a standard query is far
/// shorter (only QUERY is forwarded), and a client announcing more loses
/// its connection, so 1 024 connections hold at most 4 MiB of queries.
pub const MAX_TCP_QUERY: usize = 4096;

/// Serves DNS over TCP on `listener` with `forwarder` (RFC 7766: several
/// length-prefixed queries per connection, answered in order). At most
/// 1 024 connections at once, each closed after `idle` without a query or
/// after a query longer than [`MAX_TCP_QUERY`].
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    forwarder: Arc<Forwarder>,
    idle: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(%error, "cannot accept a TCP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let forwarder = forwarder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // One buffer per connection, for its queries in turn.
            let mut query = Vec::new();
            loop {
                let mut len = [0u8; 2];
                match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
                let len = usize::from(u16::from_be_bytes(len));
                if len > MAX_TCP_QUERY {
                    tracing::debug!(%peer, len, "TCP query too long");
                    return;
                }
                query.resize(len, 0);
                if !matches!(
                    tokio::time::timeout(idle, stream.read_exact(&mut query)).await,
                    Ok(Ok(_))
                ) {
                    return;
                }
                let Some(answer) = forwarder.answer_over_tcp(&query).await else {
                    return;
                };
                let Ok(len) = u16::try_from(answer.len()) else {
                    return;
                };
                // A client that does not read loses its connection.
                let written = tokio::time::timeout(idle, async {
                    stream.write_all(&len.to_be_bytes()).await?;
                    stream.write_all(&answer).await
                })
                .await;
                if !matches!(written, Ok(Ok(()))) {
                    tracing::debug!(%peer, "TCP client went away");
                    return;
                }
            }
        });
    }
}

/// Truncates replies more than `factor` times their query for peers
/// `validated` does not vouch for: the DNS way to refuse amplification
/// without refusing the client, which retries over TCP (see
/// [`serve_tcp`]). The truncated reply is the header and question with
/// TC set.
pub fn truncate_large<S>(
    inner: S,
    factor: usize,
    validated: Arc<dyn abyss::middleware::Validate>,
) -> impl tower::Service<
    Request,
    Response = Option<Bytes>,
    Error = S::Error,
    Future = impl Future<Output = Result<Option<Bytes>, S::Error>> + Send,
> + Clone
+ Send
+ 'static
where
    S: tower::Service<Request, Response = Option<Bytes>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
{
    use abyss::middleware::rrl::Classify;
    tower::service_fn(move |request: Request| {
        let mut inner = inner.clone();
        let validated = validated.clone();
        async move {
            let (peer, asked) = (request.peer(), request.payload().len());
            let reply = inner.ready().await?.call(request).await?;
            Ok(reply.map(|reply| {
                if reply.len() > factor.saturating_mul(asked) && !validated.is_validated(peer) {
                    crate::dns_rrl::DnsResponses::new()
                        .slip(&reply)
                        .unwrap_or(reply)
                } else {
                    reply
                }
            }))
        }
    })
}

/// The largest answer the forwarder reads from an upstream over UDP, in
/// bytes: the EDNS size of each query it forwards is lowered to it, so no
/// upstream sends a longer answer (one the forwarder would have to drop).
pub const MAX_UPSTREAM_ANSWER: u16 = 4096;

/// Opens the client of one upstream.
fn open_upstream(addr: SocketAddr, timeout: Duration) -> Result<Upstream<DnsIds>, UpstreamError> {
    Upstream::builder(addr, DnsIds)
        .max_answer(MAX_UPSTREAM_ANSWER.into())
        .timeout(timeout)
        .rotate_after(10_000)
        .build()
}

/// Where the one question of a DNS message ends, if it has exactly one
/// well-formed question (no compression: a question needs none).
pub fn question_end(message: &[u8]) -> Option<usize> {
    question(message, |_| {}).map(|(end, _)| end)
}

/// The one question of a DNS message: where it ends, and its type; `visit`
/// sees each byte of the name's wire form, lower-cased. `None` unless the
/// message has exactly one well-formed question (no compression: a
/// question needs none).
pub fn question(message: &[u8], mut visit: impl FnMut(u8)) -> Option<(usize, u16)> {
    let header = message.get(..12)?;
    if u16::from_be_bytes([header[4], header[5]]) != 1 {
        return None;
    }
    let mut at = 12;
    loop {
        let len = usize::from(*message.get(at)?);
        if len & 0xc0 != 0 || at - 12 + len > 254 {
            return None;
        }
        visit(len as u8);
        let label = message.get(at + 1..at + 1 + len)?;
        label.iter().for_each(|b| visit(b.to_ascii_lowercase()));
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let qtype = u16::from_be_bytes([*message.get(at)?, *message.get(at + 1)?]);
    message.get(at + 3)?; // the class
    Some((at + 4, qtype))
}

/// An error response to `query`: its header (ID, opcode, RD) with QR set
/// and `rcode`, and its question if it has one that parses.
fn error_reply(query: &[u8], question: Option<usize>, rcode: u8) -> Vec<u8> {
    let end = question.unwrap_or(12);
    let mut reply = query[..end].to_vec();
    reply[2] = 0x80 | (query[2] & 0x79); // QR, opcode, RD; no AA or TC
    reply[3] = 0x80 | rcode; // RA
    reply[4..6].copy_from_slice(if question.is_some() { &[0, 1] } else { &[0, 0] });
    reply[6..12].fill(0);
    reply
}

/// The upstream's `answer` as the client's: its ID, and its question in
/// the client's letter case.
fn relay(query: &[u8], question_end: usize, mut reply: BytesMut) -> Bytes {
    reply[..2].copy_from_slice(&query[..2]);
    if question_end <= reply.len() && reply.get(4..6) == Some(&[0, 1]) {
        reply[12..question_end].copy_from_slice(&query[12..question_end]);
    }
    reply.freeze()
}

/// Lowers the UDP payload size of the query's OPT record (EDNS, RFC 6891)
/// to `max` when it is larger; anything malformed is left alone.
fn lower_edns_size(message: &mut [u8], max: u16) {
    let Some(fixed) = crate::dns_cookies::opt_record(message) else {
        return;
    };
    if let Some(class) = message.get_mut(fixed + 2..fixed + 4)
        && u16::from_be_bytes([class[0], class[1]]) > max
    {
        class.copy_from_slice(&max.to_be_bytes());
    }
}

/// DNS for [`Upstream`]: a random ID and a random letter case for the
/// question of each query; an answer must carry both.
#[derive(Debug, Clone, Copy, Default)]
pub struct DnsIds;

impl Correlate for DnsIds {
    type Key = u16;

    fn prepare(&self, query: &mut BytesMut) -> Option<u16> {
        let end = question_end(query)?;
        let id: u16 = rand::random();
        query[..2].copy_from_slice(&id.to_be_bytes());
        // 0x20: each letter of the name in a random case, 64 bits of
        // randomness at a time. Label lengths are never letters' bytes
        // here: they are at most 63, below 'A'.
        let mut bits: u64 = rand::random();
        let mut used = 0;
        for byte in &mut query[13..end - 4] {
            if byte.is_ascii_alphabetic() {
                if used == 64 {
                    bits = rand::random();
                    used = 0;
                }
                if bits & 1 == 1 {
                    *byte ^= 0x20;
                }
                bits >>= 1;
                used += 1;
            }
        }
        lower_edns_size(query, MAX_UPSTREAM_ANSWER);
        Some(id)
    }

    fn key(&self, answer: &[u8]) -> Option<u16> {
        let header = answer.get(..12)?;
        // Only responses.
        (header[2] & 0x80 != 0).then(|| u16::from_be_bytes([header[0], header[1]]))
    }

    fn accept(&self, query: &[u8], answer: &[u8]) -> bool {
        let Some(sent) = question_end(query) else {
            return false;
        };
        if answer.get(4..6) == Some(&[0, 1]) {
            // One question, exactly as sent: name case, type and class.
            return answer.get(12..sent) == Some(&query[12..sent]);
        }
        // An error without a question, and without records: FORMERR,
        // SERVFAIL, NOTIMP or REFUSED. (NXDOMAIN names a name: it must
        // echo the question.)
        answer.get(4..10) == Some(&[0, 0, 0, 0, 0, 0])
            && answer
                .get(3)
                .is_some_and(|b| matches!(b & 0x0f, 1 | 2 | 4 | 5))
    }
}

/// Sends `query` (whose ID is `id`) to `server` from a socket of its own
/// on a random port and waits up to `timeout` for the reply with that ID
/// and `question`, from that address; anything else is ignored. The
/// resolver asks each authoritative server this way.
async fn ask_server(
    server: SocketAddr,
    timeout: Duration,
    query: &[u8],
    id: u16,
    question: &[hickory_proto::op::Query],
) -> Option<Message> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.ok()?;
    socket.send_to(query, server).await.ok()?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, from) = match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            Ok(Ok(received)) => received,
            Ok(Err(_)) => continue, // ICMP error: keep waiting until the deadline
            Err(_) => {
                tracing::debug!(%server, "server timed out");
                return None;
            }
        };
        if from != server {
            tracing::debug!(%from, "reply from an unexpected address ignored");
            continue;
        }
        match Message::from_vec(&buf[..len]) {
            Ok(reply) if reply.metadata.id == id && reply.queries == question => {
                return Some(reply);
            }
            _ => tracing::debug!(%from, "reply with a wrong ID or question ignored"),
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
    fn answer(&self, query: &[u8]) -> impl Future<Output = Option<Bytes>> + Send;
}

impl Answer for Forwarder {
    fn answer(&self, query: &[u8]) -> impl Future<Output = Option<Bytes>> + Send {
        Forwarder::answer(self, query)
    }
}

impl Answer for Resolver {
    async fn answer(&self, query: &[u8]) -> Option<Bytes> {
        Resolver::answer(self, query).await.map(Bytes::from)
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
        async move { Ok(answerer.answer(request.payload()).await) }
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
            let id = query.metadata.id;
            let bytes = query.to_vec().ok()?;
            let server = SocketAddr::new(*server, self.port);
            if let Some(reply) = ask_server(server, self.timeout, &bytes, id, &query.queries).await
            {
                return Some(reply);
            }
        }
        None
    }
}

//! DNS cookies (RFC 7873) with the interoperable server cookie of RFC 9018:
//! a DNS server's way to learn which clients really own their address, and
//! so a validation source for Abyss's amplification guard and reply budget.
//!
//! A client sends a random 8-byte client cookie in the COOKIE option of its
//! query's OPT record. The server answers with that client cookie followed
//! by a 16-byte server cookie: a keyed hash (SipHash-2-4) of the client
//! cookie, a timestamp and the client's IP address. A client that sends the
//! server cookie back has received a reply at its address, so a spoofed
//! source cannot present one. [`ServerCookies::check`] tells which case a
//! query is, and records the clients whose server cookie verifies in
//! [`ValidatedPeers`], which implements [`Validate`].
//!
//! The amplification guard asks whether a peer is validated when a query
//! arrives, before the service has checked its cookie: the reply to the
//! first query that returns a good server cookie is still capped, the
//! replies to the following ones are not. A client that asked a small
//! question first (as resolvers do) never notices.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use abyss::middleware::{AmplificationGuardLayer, ReplyBudget};
//! use abyss_examples::dns::Forwarder;
//! use abyss_examples::dns_cookies::{self, ServerCookies};
//!
//! let cookies = Arc::new(ServerCookies::new(Duration::from_secs(24 * 3600)));
//! let forwarder = Arc::new(Forwarder::new("192.0.2.53:53".parse()?, Duration::from_secs(2)));
//! // Replies to clients that returned a good server cookie may be of any
//! // size and are not counted against the budget; everyone else's are
//! // capped at 3 times the query and share the budget.
//! let budget = ReplyBudget::builder()
//!     .replies_per_second(10_000)
//!     .exempt(cookies.validated())
//!     .build()?;
//! let service = abyss::ServiceBuilder::new()
//!     .layer(AmplificationGuardLayer::new(3).validated_by(cookies.validated()))
//!     .layer(budget.layer())
//!     .service(dns_cookies::service(forwarder, cookies));
//! # let _ = service;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use abyss::middleware::Validate;
use abyss::{Bytes, Request};
use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use siphasher::sip::SipHasher24;
use tokio::time::Instant;

use crate::dns::Answer;

/// How many clients [`ServerCookies::new`] remembers as validated at most.
pub const DEFAULT_MAX_VALIDATED_PEERS: usize = 65_536;

/// The EDNS option code of COOKIE (RFC 7873 section 4).
const COOKIE_CODE: u16 = 10;
/// The resource record type of OPT.
const OPT_TYPE: u16 = 41;
const CLIENT_COOKIE_LEN: usize = 8;
/// The server cookie of RFC 9018: version, reserved, timestamp, hash.
const SERVER_COOKIE_LEN: usize = 16;
/// The only server cookie version there is (RFC 9018 section 4).
const VERSION: u8 = 1;
/// A server cookie older than this is no longer accepted (RFC 9018
/// section 4.3).
const MAX_AGE_SECS: i64 = 3600;
/// A server cookie stamped further ahead than this is not accepted: the
/// clock skew RFC 9018 section 4.3 allows within an anycast set.
const MAX_AHEAD_SECS: i64 = 300;
/// The UDP payload size announced in an OPT record this module creates
/// (the DNS Flag Day 2020 value, which avoids IP fragmentation).
const UDP_PAYLOAD: u16 = 1232;
/// How many entries one insertion into [`ValidatedPeers`] gives a second
/// chance at most before it evicts one regardless.
const SECOND_CHANCES: usize = 4;
/// How many independently locked parts [`ValidatedPeers`] is split into.
const SHARDS: usize = 16;

/// What a query's COOKIE option says, from [`ServerCookies::check`].
///
/// # Example
///
/// ```
/// use abyss_examples::dns_cookies::CookieCheck;
///
/// let check = CookieCheck::ClientOnly { client: [7; 8] };
/// assert_eq!(check.client_cookie(), Some([7; 8]));
/// assert_eq!(CookieCheck::None.client_cookie(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CookieCheck {
    /// The query has no COOKIE option (or no OPT record).
    None,
    /// Only a client cookie: a first contact, or a client that lost its
    /// server cookie.
    ClientOnly {
        /// The client cookie, to echo in the reply.
        client: [u8; 8],
    },
    /// A server cookie this server made for this client and address, under
    /// the current or the previous secret, stamped within the last hour and
    /// at most five minutes ahead: the client owns its address.
    Valid {
        /// The client cookie, to echo in the reply.
        client: [u8; 8],
    },
    /// A server cookie this server did not make for this client and
    /// address, made under a retired secret, or stamped too long ago or
    /// too far ahead.
    Invalid {
        /// The client cookie, to echo in the reply.
        client: [u8; 8],
    },
    /// A COOKIE option whose length is neither 8 nor 16 to 40 bytes; RFC
    /// 7873 section 5.2.2 answers it with FORMERR.
    Malformed,
}

impl CookieCheck {
    /// The client cookie the query carried, if it carried a well-formed one.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_examples::dns_cookies::CookieCheck;
    ///
    /// assert_eq!(CookieCheck::Invalid { client: [1; 8] }.client_cookie(), Some([1; 8]));
    /// assert_eq!(CookieCheck::Malformed.client_cookie(), None);
    /// ```
    pub fn client_cookie(&self) -> Option<[u8; 8]> {
        match *self {
            Self::ClientOnly { client } | Self::Valid { client } | Self::Invalid { client } => {
                Some(client)
            }
            Self::None | Self::Malformed => None,
        }
    }
}

/// The current and previous server secrets.
struct Secrets {
    current: [u8; 16],
    /// The secret before the last rotation, accepted for one more period.
    previous: Option<[u8; 16]>,
    /// When `current` took over, on tokio's clock, aligned to the period.
    rotated_at: Instant,
}

impl Secrets {
    /// Rotates once for each whole period since the last rotation.
    fn rotate_if_due(&mut self, now: Instant, rotation: Duration) {
        let elapsed = now.saturating_duration_since(self.rotated_at);
        let periods = elapsed.as_nanos() / rotation.as_nanos().max(1);
        match periods {
            0 => return,
            1 => self.previous = Some(std::mem::replace(&mut self.current, rand::random())),
            _ => {
                self.current = rand::random();
                self.previous = None;
            }
        }
        // Keep the schedule: never past `now`, so never overflowing.
        let advance = u32::try_from(periods)
            .ok()
            .and_then(|periods| rotation.checked_mul(periods))
            .unwrap_or(elapsed);
        self.rotated_at += advance.min(elapsed);
    }

    /// Starts a new period now, whatever the schedule.
    fn rotate_now(&mut self, now: Instant) {
        self.previous = Some(std::mem::replace(&mut self.current, rand::random()));
        self.rotated_at = now;
    }
}

/// Makes and verifies RFC 9018 server cookies under a secret that changes
/// every `rotation`, and remembers the clients that returned a good one.
///
/// Each secret is 128 random bits. When one is replaced, cookies made with
/// it stay valid for one more period: a client whose cookie is refused gets
/// a fresh one with the refusal. Rotation follows tokio's clock (so paused
/// time in tests applies) and happens when cookies are made or checked; no
/// task runs in the background. A rotation of at least an hour (a day is
/// usual) lets cookies live the hour RFC 9018 gives them.
///
/// Cookies are bound to the client's IP address (an IPv4 address seen as
/// IPv4-mapped IPv6 counts as IPv4) and to a timestamp in Unix seconds that
/// the caller passes in ([`unix_time`] reads the system clock), so a check
/// can be replayed at a chosen time.
///
/// # Example
///
/// ```
/// use std::net::IpAddr;
/// use std::time::Duration;
/// use abyss_examples::dns_cookies::ServerCookies;
///
/// let cookies = ServerCookies::new(Duration::from_secs(24 * 3600));
/// let client: IpAddr = "192.0.2.7".parse().unwrap();
/// let server_cookie = cookies.make([1, 2, 3, 4, 5, 6, 7, 8], client, 1_700_000_000);
/// assert_eq!(server_cookie[0], 1, "version 1");
/// assert_eq!(&server_cookie[4..8], &1_700_000_000u32.to_be_bytes());
/// ```
pub struct ServerCookies {
    secrets: RwLock<Secrets>,
    rotation: Duration,
    validated: ValidatedPeers,
}

impl fmt::Debug for ServerCookies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secrets stay out of logs.
        f.debug_struct("ServerCookies")
            .field("rotation", &self.rotation)
            .field("validated", &self.validated)
            .finish_non_exhaustive()
    }
}

impl ServerCookies {
    /// Cookies under secrets replaced every `rotation` (at least a second),
    /// remembering up to [`DEFAULT_MAX_VALIDATED_PEERS`] validated clients.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ServerCookies;
    ///
    /// let cookies = ServerCookies::new(Duration::from_secs(24 * 3600));
    /// assert_eq!(cookies.rotation(), Duration::from_secs(24 * 3600));
    /// ```
    pub fn new(rotation: Duration) -> Self {
        Self::with_max_validated_peers(rotation, DEFAULT_MAX_VALIDATED_PEERS)
    }

    /// Like [`new`](Self::new), remembering up to `max_validated_peers`
    /// validated clients (at least one).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ServerCookies;
    ///
    /// let cookies = ServerCookies::with_max_validated_peers(Duration::from_secs(3600), 1024);
    /// assert!(cookies.validated().max_peers() <= 1024);
    /// ```
    pub fn with_max_validated_peers(rotation: Duration, max_validated_peers: usize) -> Self {
        let rotation = rotation.max(Duration::from_secs(1));
        Self {
            secrets: RwLock::new(Secrets {
                current: rand::random(),
                previous: None,
                rotated_at: Instant::now(),
            }),
            rotation,
            validated: ValidatedPeers::new(max_validated_peers, rotation),
        }
    }

    /// How often the secret is replaced.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ServerCookies;
    ///
    /// // Shorter periods are raised to a second.
    /// assert_eq!(ServerCookies::new(Duration::ZERO).rotation(), Duration::from_secs(1));
    /// ```
    pub fn rotation(&self) -> Duration {
        self.rotation
    }

    /// Replaces the secret now (cookies made with the old one stay valid
    /// for one more period) and restarts the period.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ServerCookies;
    ///
    /// let cookies = ServerCookies::new(Duration::from_secs(3600));
    /// let client = "192.0.2.7".parse().unwrap();
    /// let before = cookies.make([1; 8], client, 1_700_000_000);
    /// cookies.rotate();
    /// assert_ne!(cookies.make([1; 8], client, 1_700_000_000), before);
    /// ```
    pub fn rotate(&self) {
        let mut secrets = self.secrets.write().unwrap_or_else(PoisonError::into_inner);
        secrets.rotate_now(Instant::now());
    }

    /// The secrets to use now, after any rotation that is due.
    fn secrets(&self) -> ([u8; 16], Option<[u8; 16]>) {
        let now = Instant::now();
        {
            let secrets = self.secrets.read().unwrap_or_else(PoisonError::into_inner);
            if now.saturating_duration_since(secrets.rotated_at) < self.rotation {
                return (secrets.current, secrets.previous);
            }
        }
        let mut secrets = self.secrets.write().unwrap_or_else(PoisonError::into_inner);
        secrets.rotate_if_due(now, self.rotation);
        (secrets.current, secrets.previous)
    }

    /// A server cookie for `client_cookie` from `client`, stamped
    /// `now_unix_secs`, as RFC 9018 section 4 builds it: version 1, three
    /// reserved zero bytes, the timestamp, and SipHash-2-4 of the client
    /// cookie, those eight bytes and the client's address under the
    /// current secret.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ServerCookies;
    ///
    /// let cookies = ServerCookies::new(Duration::from_secs(3600));
    /// let cookie = cookies.make([9; 8], "2001:db8::1".parse().unwrap(), 1_700_000_000);
    /// assert_eq!(&cookie[..4], &[1, 0, 0, 0]);
    /// ```
    pub fn make(&self, client_cookie: [u8; 8], client: IpAddr, now_unix_secs: u32) -> [u8; 16] {
        let (current, _) = self.secrets();
        let mut cookie = [0u8; SERVER_COOKIE_LEN];
        cookie[0] = VERSION;
        cookie[4..8].copy_from_slice(&now_unix_secs.to_be_bytes());
        let hash = cookie_hash(&current, &client_cookie, &cookie[..8], client);
        cookie[8..].copy_from_slice(&hash);
        cookie
    }

    /// What the COOKIE option of `query` (a DNS message as received) says,
    /// for a query from `client` at `now_unix_secs`.
    ///
    /// Only the first COOKIE option of the first OPT record counts (RFC
    /// 7873 section 5.2). A message too short or too damaged to reach its
    /// OPT record has no cookie: [`CookieCheck::None`]. A
    /// [`Valid`](CookieCheck::Valid) cookie also records `client` in
    /// [`validated`](Self::validated). Any input is safe.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::{CookieCheck, ServerCookies};
    /// use hickory_proto::op::{Edns, Message, Query};
    /// use hickory_proto::rr::rdata::opt::EdnsOption;
    /// use hickory_proto::rr::{Name, RecordType};
    ///
    /// let cookies = ServerCookies::new(Duration::from_secs(3600));
    /// let client = "192.0.2.7".parse().unwrap();
    /// let now = 1_700_000_000;
    /// let server_cookie = cookies.make([1; 8], client, now);
    ///
    /// let mut query = Message::query();
    /// query.add_query(Query::query(Name::from_ascii("example.com.")?, RecordType::A));
    /// let mut edns = Edns::new();
    /// edns.options_mut().insert(EdnsOption::Unknown(10, [[1; 8].as_slice(), &server_cookie].concat()));
    /// query.set_edns(edns);
    /// let query = query.to_vec()?;
    ///
    /// assert_eq!(cookies.check(&query, client, now + 60), CookieCheck::Valid { client: [1; 8] });
    /// assert!(cookies.validated().contains(client));
    /// let elsewhere = "192.0.2.8".parse().unwrap();
    /// assert_eq!(cookies.check(&query, elsewhere, now + 60), CookieCheck::Invalid { client: [1; 8] });
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check(&self, query: &[u8], client: IpAddr, now_unix_secs: u32) -> CookieCheck {
        let option = match find_cookie_option(query) {
            CookieOption::Absent => return CookieCheck::None,
            CookieOption::Truncated => return CookieCheck::Malformed,
            CookieOption::Found(option) => option,
        };
        if option.len() != CLIENT_COOKIE_LEN && !(16..=40).contains(&option.len()) {
            return CookieCheck::Malformed;
        }
        let (client_part, server_part) = option.split_at(CLIENT_COOKIE_LEN);
        let Ok(client_cookie) = <[u8; 8]>::try_from(client_part) else {
            return CookieCheck::Malformed;
        };
        if server_part.is_empty() {
            return CookieCheck::ClientOnly {
                client: client_cookie,
            };
        }
        if self.verify(&client_cookie, server_part, client, now_unix_secs) {
            self.validated.insert(client);
            CookieCheck::Valid {
                client: client_cookie,
            }
        } else {
            CookieCheck::Invalid {
                client: client_cookie,
            }
        }
    }

    /// Whether `server_cookie` is one of ours for this client, still fresh.
    fn verify(
        &self,
        client_cookie: &[u8; 8],
        server_cookie: &[u8],
        client: IpAddr,
        now_unix_secs: u32,
    ) -> bool {
        let Ok(server_cookie) = <&[u8; SERVER_COOKIE_LEN]>::try_from(server_cookie) else {
            return false;
        };
        let (stamped, hash) = server_cookie.split_at(8);
        if stamped[0] != VERSION {
            return false;
        }
        let timestamp = u32::from_be_bytes([stamped[4], stamped[5], stamped[6], stamped[7]]);
        // Serial number arithmetic (RFC 1982), as RFC 9018 section 4.3 asks:
        // the timestamp wraps in 2106.
        let age = i64::from(now_unix_secs.wrapping_sub(timestamp) as i32);
        if !(-MAX_AHEAD_SECS..=MAX_AGE_SECS).contains(&age) {
            return false;
        }
        let (current, previous) = self.secrets();
        // The reserved bytes are hashed as received (RFC 9018 section 4.2).
        std::iter::once(current)
            .chain(previous)
            .any(|secret| same_bytes(&cookie_hash(&secret, client_cookie, stamped, client), hash))
    }

    /// Puts `client_cookie` and a fresh server cookie for `client` in the
    /// COOKIE option of `response`, replacing any COOKIE option there and
    /// adding an OPT record if it has none.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ServerCookies;
    /// use hickory_proto::op::{Message, OpCode};
    /// use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
    ///
    /// let cookies = ServerCookies::new(Duration::from_secs(3600));
    /// let mut response = Message::response(42, OpCode::Query);
    /// cookies.add_to_response(&mut response, [5; 8], "192.0.2.7".parse().unwrap(), 1_700_000_000);
    /// let edns = response.edns.as_ref().expect("an OPT record");
    /// let Some(EdnsOption::Unknown(10, data)) = edns.option(EdnsCode::Cookie) else { panic!() };
    /// assert_eq!(data.len(), 24);
    /// assert_eq!(&data[..8], &[5; 8]);
    /// ```
    pub fn add_to_response(
        &self,
        response: &mut Message,
        client_cookie: [u8; 8],
        client: IpAddr,
        now_unix_secs: u32,
    ) {
        let server_cookie = self.make(client_cookie, client, now_unix_secs);
        let edns = response.edns.get_or_insert_with(|| {
            let mut edns = Edns::new();
            edns.set_max_payload(UDP_PAYLOAD);
            edns
        });
        let options = edns.options_mut();
        options.remove(EdnsCode::Cookie);
        options.insert(EdnsOption::Unknown(
            COOKIE_CODE,
            [client_cookie.as_slice(), &server_cookie].concat(),
        ));
    }

    /// A handle on the clients that returned a good server cookie within
    /// the last [`rotation`](Self::rotation), for
    /// [`AmplificationGuardLayer::validated_by`](abyss::middleware::AmplificationGuardLayer::validated_by)
    /// and the reply budget's `exempt`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss::middleware::Validate;
    /// use abyss_examples::dns_cookies::ServerCookies;
    ///
    /// let cookies = ServerCookies::new(Duration::from_secs(3600));
    /// let validated = cookies.validated();
    /// assert!(!validated.is_validated("192.0.2.7:5300".parse().unwrap()));
    /// ```
    pub fn validated(&self) -> ValidatedPeers {
        self.validated.clone()
    }

    /// The reply to `query` from `client` at `now_unix_secs`, with cookies,
    /// `answerer` deciding the rest.
    ///
    /// - No COOKIE option: `answerer`'s reply, untouched.
    /// - A client cookie alone, or with a valid server cookie: `answerer`'s
    ///   reply to the query without its COOKIE option (the server cookie is
    ///   this server's, not an upstream's), with the client cookie and a
    ///   fresh server cookie added (RFC 7873 sections 5.2.3 and 5.2.5).
    /// - An invalid server cookie: BADCOOKIE (extended RCODE 23) with the
    ///   question and a fresh server cookie, so the client can retry
    ///   (section 5.2.3); `answerer` is not asked.
    /// - A malformed COOKIE option: FORMERR (section 5.2.2).
    ///
    /// Responses and datagrams shorter than a header go to `answerer` as
    /// they are: this never answers a response.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns::Answer;
    /// use abyss_examples::dns_cookies::ServerCookies;
    ///
    /// /// Answers every query with REFUSED.
    /// struct Refuse;
    /// impl Answer for Refuse {
    ///     async fn answer(&self, query: &[u8]) -> Option<abyss::Bytes> {
    ///         let query = hickory_proto::op::Message::from_vec(query).ok()?;
    ///         let code = hickory_proto::op::ResponseCode::Refused;
    ///         hickory_proto::op::Message::error_msg(query.metadata.id, query.metadata.op_code, code)
    ///             .to_vec()
    ///             .ok()
    ///             .map(Into::into)
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    /// let cookies = ServerCookies::new(Duration::from_secs(3600));
    /// let mut query = hickory_proto::op::Message::query();
    /// let mut edns = hickory_proto::op::Edns::new();
    /// edns.options_mut().insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(10, vec![3; 8]));
    /// query.set_edns(edns);
    /// let reply = cookies
    ///     .answer(&Refuse, &query.to_vec()?, "192.0.2.7".parse()?, 1_700_000_000)
    ///     .await
    ///     .expect("a reply");
    /// let reply = hickory_proto::op::Message::from_vec(&reply)?;
    /// let cookie = reply.edns.as_ref().and_then(|edns| edns.option(hickory_proto::rr::rdata::opt::EdnsCode::Cookie));
    /// assert!(cookie.is_some(), "the reply carries a server cookie");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn answer<A: Answer>(
        &self,
        answerer: &A,
        query: &[u8],
        client: IpAddr,
        now_unix_secs: u32,
    ) -> Option<Bytes> {
        let is_query = query.len() >= 12 && query[2] & 0x80 == 0;
        if !is_query {
            return answerer.answer(query).await;
        }
        match self.check(query, client, now_unix_secs) {
            CookieCheck::ClientOnly {
                client: client_cookie,
            }
            | CookieCheck::Valid {
                client: client_cookie,
            } => {
                let stripped = without_cookie(query);
                let reply = answerer
                    .answer(stripped.as_deref().unwrap_or(query))
                    .await?;
                Some(Bytes::from(self.with_cookie(
                    Vec::from(reply),
                    client_cookie,
                    client,
                    now_unix_secs,
                )))
            }
            CookieCheck::Invalid {
                client: client_cookie,
            } => {
                let Ok(message) = Message::from_vec(query) else {
                    return header_only_formerr(query).map(Bytes::from);
                };
                let mut reply = error_reply(&message, ResponseCode::BADCOOKIE);
                self.add_to_response(&mut reply, client_cookie, client, now_unix_secs);
                reply.to_vec().ok().map(Bytes::from)
            }
            CookieCheck::Malformed => match Message::from_vec(query) {
                Ok(message) => error_reply(&message, ResponseCode::FormErr)
                    .to_vec()
                    .ok()
                    .map(Bytes::from),
                Err(_) => header_only_formerr(query).map(Bytes::from),
            },
            CookieCheck::None => answerer.answer(query).await,
        }
    }

    /// `reply` with a fresh cookie, or as it is if it does not parse.
    fn with_cookie(
        &self,
        reply: Vec<u8>,
        client_cookie: [u8; 8],
        client: IpAddr,
        now_unix_secs: u32,
    ) -> Vec<u8> {
        let Ok(mut message) = Message::from_vec(&reply) else {
            return reply;
        };
        self.add_to_response(&mut message, client_cookie, client, now_unix_secs);
        message.to_vec().unwrap_or(reply)
    }
}

/// SipHash-2-4 of client cookie | version, reserved, timestamp | address.
fn cookie_hash(
    secret: &[u8; 16],
    client_cookie: &[u8; 8],
    stamped: &[u8],
    client: IpAddr,
) -> [u8; 8] {
    let mut input = [0u8; 8 + 8 + 16];
    input[..8].copy_from_slice(client_cookie);
    input[8..16].copy_from_slice(stamped);
    let len = match client.to_canonical() {
        IpAddr::V4(v4) => {
            input[16..20].copy_from_slice(&v4.octets());
            20
        }
        IpAddr::V6(v6) => {
            input[16..32].copy_from_slice(&v6.octets());
            32
        }
    };
    // SipHash's output is its 64-bit state in little-endian order.
    SipHasher24::new_with_key(secret)
        .hash(&input[..len])
        .to_le_bytes()
}

/// Compares in time independent of where the bytes differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a message's OPT record holds of COOKIE.
enum CookieOption<'a> {
    Absent,
    /// A COOKIE option running past the end of its OPT record.
    Truncated,
    Found(&'a [u8]),
}

/// The first COOKIE option of the first OPT record of `message`.
fn find_cookie_option(message: &[u8]) -> CookieOption<'_> {
    opt_record_data(message).map_or(CookieOption::Absent, find_in_options)
}

/// The data of the first OPT record in the additional section.
fn opt_record_data(message: &[u8]) -> Option<&[u8]> {
    let fixed = opt_record(message)?;
    let start = fixed.checked_add(10)?;
    let len = usize::from(read_u16(message, fixed.checked_add(8)?)?);
    message.get(start..start.checked_add(len)?)
}

/// Where the fixed part (type, class, TTL, data length) of a message's
/// OPT record (EDNS, RFC 6891) starts, if it has one: past the question,
/// answer and authority sections, the first additional record of type
/// OPT. Its class is the requester's UDP payload size.
pub(crate) fn opt_record(message: &[u8]) -> Option<usize> {
    let questions = read_u16(message, 4)?;
    let records = usize::from(read_u16(message, 6)?) + usize::from(read_u16(message, 8)?);
    let additionals = read_u16(message, 10)?;
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(message, at)?.checked_add(4)?; // type, class
    }
    for _ in 0..records {
        at = skip_record(message, at)?.1;
    }
    for _ in 0..additionals {
        let (record_type, next, _) = skip_record(message, at)?;
        if record_type == OPT_TYPE {
            return skip_name(message, at);
        }
        at = next;
    }
    None
}

/// The first COOKIE option in an OPT record's data.
fn find_in_options(mut options: &[u8]) -> CookieOption<'_> {
    while let (Some(code), Some(len)) = (read_u16(options, 0), read_u16(options, 2)) {
        let data = options.get(4..).unwrap_or_default();
        let Some(value) = data.get(..usize::from(len)) else {
            return if code == COOKIE_CODE {
                CookieOption::Truncated
            } else {
                CookieOption::Absent
            };
        };
        if code == COOKIE_CODE {
            return CookieOption::Found(value);
        }
        options = data.get(usize::from(len)..).unwrap_or_default();
    }
    CookieOption::Absent
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *bytes.get(at)?,
        *bytes.get(at.checked_add(1)?)?,
    ]))
}

/// Where the name starting at `at` ends (compression pointers are not
/// followed: the name's own bytes end at the first one).
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *message.get(at)?;
        match len & 0xc0 {
            0x00 if len == 0 => return at.checked_add(1),
            0x00 => at = at.checked_add(1 + usize::from(len))?,
            0xc0 => {
                message.get(at.checked_add(1)?)?;
                return at.checked_add(2);
            }
            _ => return None, // extended label types are not in use
        }
    }
}

/// The type of the resource record at `at`, where it ends, and its data.
fn skip_record(message: &[u8], at: usize) -> Option<(u16, usize, &[u8])> {
    let at = skip_name(message, at)?;
    let record_type = read_u16(message, at)?;
    let data_len = usize::from(read_u16(message, at.checked_add(8)?)?);
    let start = at.checked_add(10)?;
    let end = start.checked_add(data_len)?;
    Some((record_type, end, message.get(start..end)?))
}

/// `query` re-encoded without its COOKIE options, or `None` if it does not
/// parse.
fn without_cookie(query: &[u8]) -> Option<Vec<u8>> {
    let mut message = Message::from_vec(query).ok()?;
    message
        .edns
        .as_mut()?
        .options_mut()
        .remove(EdnsCode::Cookie);
    message.to_vec().ok()
}

/// An error response to `query` with its question.
fn error_reply(query: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.queries = query.queries.clone();
    reply
}

/// FORMERR for a query that does not parse, or nothing without a header.
fn header_only_formerr(query: &[u8]) -> Option<Vec<u8>> {
    let id = read_u16(query, 0)?;
    query.get(11)?;
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// The system clock in Unix seconds, modulo 2^32 as cookie timestamps are.
///
/// # Example
///
/// ```
/// let now = abyss_examples::dns_cookies::unix_time();
/// assert!(now > 1_700_000_000);
/// ```
pub fn unix_time() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as u32)
}

/// A DNS service with cookies: each query goes through
/// [`ServerCookies::answer`] with the peer's address and the system clock,
/// and `answerer` (a [`Forwarder`](crate::dns::Forwarder), a
/// [`Resolver`](crate::dns::Resolver), or any [`Answer`]) answers it.
///
/// # Example
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use abyss_examples::dns::Forwarder;
/// use abyss_examples::dns_cookies::{self, ServerCookies};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let cookies = Arc::new(ServerCookies::new(Duration::from_secs(24 * 3600)));
/// let forwarder = Arc::new(Forwarder::new("192.0.2.53:53".parse()?, Duration::from_secs(2)));
/// let handle = abyss::Server::bind("127.0.0.1:5353")
///     .serve(dns_cookies::service(forwarder, cookies))
///     .await?;
/// # let _ = handle;
/// # Ok(())
/// # }
/// ```
pub fn service<A: Answer>(
    answerer: Arc<A>,
    cookies: Arc<ServerCookies>,
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
        let cookies = cookies.clone();
        async move {
            let reply = cookies
                .answer(
                    &*answerer,
                    request.payload(),
                    request.peer().ip(),
                    unix_time(),
                )
                .await;
            Ok(reply)
        }
    })
}

/// The clients that proved they own their address recently: a bounded,
/// cheap-to-clone table shared by its clones, and a [`Validate`] for
/// Abyss's amplification guard and reply budget.
///
/// It holds at most [`max_peers`](Self::max_peers) addresses. When it is
/// full, an insertion evicts the address inserted longest ago, except that
/// an address refreshed or looked up since it was last passed over gets a
/// second chance (a CLOCK scheme), at most a few per insertion. An address
/// counts as validated for `lifetime` after its last insertion. The table
/// is split into independently locked shards; a look-up or an insertion
/// takes one lock for one hash look-up (plus, for an insertion into a full
/// shard, a few queue steps).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use abyss::middleware::Validate;
/// use abyss_examples::dns_cookies::ValidatedPeers;
///
/// let peers = ValidatedPeers::new(1000, Duration::from_secs(3600));
/// peers.insert("192.0.2.7".parse().unwrap());
/// assert!(peers.is_validated("192.0.2.7:5300".parse().unwrap()));
/// assert!(!peers.is_validated("192.0.2.8:5300".parse().unwrap()));
/// ```
#[derive(Clone)]
pub struct ValidatedPeers {
    table: Arc<PeerTable>,
}

struct PeerTable {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    hasher: RandomState,
    lifetime: Duration,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<IpAddr, Entry>,
    /// Every key of `entries` once, oldest first.
    order: VecDeque<IpAddr>,
}

struct Entry {
    validated_at: Instant,
    /// Used since the clock hand last passed: spared once.
    referenced: bool,
}

impl Shard {
    /// Makes room for one more entry.
    fn evict_one(&mut self, now: Instant, lifetime: Duration) {
        for chance in 0..=SECOND_CHANCES {
            let Some(ip) = self.order.pop_front() else {
                return;
            };
            let spare = chance < SECOND_CHANCES
                && self.entries.get_mut(&ip).is_some_and(|entry| {
                    let spare = entry.referenced
                        && now.saturating_duration_since(entry.validated_at) < lifetime;
                    entry.referenced = false;
                    spare
                });
            if spare {
                self.order.push_back(ip);
            } else {
                self.entries.remove(&ip);
                return;
            }
        }
    }
}

impl fmt::Debug for ValidatedPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidatedPeers")
            .field("len", &self.len())
            .field("max_peers", &self.max_peers())
            .field("lifetime", &self.table.lifetime)
            .finish()
    }
}

impl ValidatedPeers {
    /// An empty table of at most `max_peers` addresses (at least one), each
    /// validated for `lifetime` after its insertion.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ValidatedPeers;
    ///
    /// let peers = ValidatedPeers::new(65_536, Duration::from_secs(3600));
    /// assert!(peers.is_empty());
    /// assert_eq!(peers.max_peers(), 65_536);
    /// ```
    pub fn new(max_peers: usize, lifetime: Duration) -> Self {
        let max_peers = max_peers.max(1);
        let shard_count = SHARDS.min(max_peers);
        let shards = (0..shard_count)
            .map(|_| Mutex::new(Shard::default()))
            .collect();
        Self {
            table: Arc::new(PeerTable {
                shards,
                shard_capacity: max_peers / shard_count,
                hasher: RandomState::new(),
                lifetime,
            }),
        }
    }

    fn shard(&self, ip: &IpAddr) -> std::sync::MutexGuard<'_, Shard> {
        let table = &self.table;
        // Shards are at most 16, so the hash fits whatever the width.
        let index = (table.hasher.hash_one(ip) % table.shards.len() as u64) as usize;
        table.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `ip` proved it owns its address now.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ValidatedPeers;
    ///
    /// let peers = ValidatedPeers::new(16, Duration::from_secs(60));
    /// for last in 0..=255u8 {
    ///     peers.insert([192, 0, 2, last].into());
    /// }
    /// assert!(peers.len() <= 16);
    /// assert!(peers.contains([192, 0, 2, 255].into()));
    /// ```
    pub fn insert(&self, ip: IpAddr) {
        let ip = ip.to_canonical();
        let now = Instant::now();
        let lifetime = self.table.lifetime;
        let capacity = self.table.shard_capacity;
        let mut shard = self.shard(&ip);
        if let Some(entry) = shard.entries.get_mut(&ip) {
            entry.validated_at = now;
            entry.referenced = true;
            return;
        }
        while shard.entries.len() >= capacity && !shard.order.is_empty() {
            shard.evict_one(now, lifetime);
        }
        shard.entries.insert(
            ip,
            Entry {
                validated_at: now,
                referenced: false,
            },
        );
        shard.order.push_back(ip);
    }

    /// Whether `ip` was inserted within the lifetime and is still here.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ValidatedPeers;
    ///
    /// let peers = ValidatedPeers::new(16, Duration::from_secs(60));
    /// peers.insert("2001:db8::7".parse().unwrap());
    /// assert!(peers.contains("2001:db8::7".parse().unwrap()));
    /// assert!(!peers.contains("2001:db8::8".parse().unwrap()));
    /// ```
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let lifetime = self.table.lifetime;
        let mut shard = self.shard(&ip);
        shard.entries.get_mut(&ip).is_some_and(|entry| {
            entry.referenced = true;
            Instant::now().saturating_duration_since(entry.validated_at) < lifetime
        })
    }

    /// How many addresses the table holds (expired ones included, until
    /// they are evicted).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ValidatedPeers;
    ///
    /// let peers = ValidatedPeers::new(16, Duration::from_secs(60));
    /// peers.insert("192.0.2.1".parse().unwrap());
    /// peers.insert("192.0.2.1".parse().unwrap());
    /// assert_eq!(peers.len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.table
            .shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries
                    .len()
            })
            .sum()
    }

    /// Whether the table holds no address.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ValidatedPeers;
    ///
    /// assert!(ValidatedPeers::new(16, Duration::from_secs(60)).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most addresses the table holds: the `max_peers` it was made
    /// with, rounded down to a multiple of its shard count.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_examples::dns_cookies::ValidatedPeers;
    ///
    /// assert_eq!(ValidatedPeers::new(100, Duration::from_secs(60)).max_peers(), 96);
    /// assert_eq!(ValidatedPeers::new(3, Duration::from_secs(60)).max_peers(), 3);
    /// ```
    pub fn max_peers(&self) -> usize {
        self.table.shard_capacity * self.table.shards.len()
    }
}

impl Validate for ValidatedPeers {
    fn is_validated(&self, peer: SocketAddr) -> bool {
        self.contains(peer.ip())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};

    const NOW: u32 = 1_700_000_000;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn with_secrets(current: &str, previous: Option<&str>) -> ServerCookies {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let key = |text: &str| <[u8; 16]>::try_from(hex(text)).expect("16 bytes");
        {
            let mut secrets = cookies.secrets.write().unwrap();
            secrets.current = key(current);
            secrets.previous = previous.map(key);
        }
        cookies
    }

    /// A query for example.com with `option` as its COOKIE option's data.
    fn query_with_cookie(option: &[u8]) -> Vec<u8> {
        let mut query = Message::query();
        query.add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        let mut edns = Edns::new();
        edns.options_mut()
            .insert(EdnsOption::Unknown(COOKIE_CODE, option.to_vec()));
        query.set_edns(edns);
        query.to_vec().unwrap()
    }

    fn client_cookie(text: &str) -> [u8; 8] {
        <[u8; 8]>::try_from(hex(text)).unwrap()
    }

    #[test]
    fn server_cookies_match_the_rfc_9018_test_vectors() {
        let secret = "e5e973e5a6b2a43f48e7dc849e37bfcf";
        let cases = [
            (
                secret,
                "2464c4abcf10c957",
                "198.51.100.100",
                1_559_731_985,
                "010000005cf79f111f8130c3eee29480",
            ),
            (
                secret,
                "2464c4abcf10c957",
                "198.51.100.100",
                1_559_734_385,
                "010000005cf7a871d4a564a1442aca77",
            ),
            (
                secret,
                "fc93fc62807ddb86",
                "203.0.113.203",
                1_559_734_700,
                "010000005cf7a9acf73a7810aca2381e",
            ),
            (
                "445536bcd2513298075a5d379663c962",
                "22681ab97d52c298",
                "2001:db8:220:1:59de:d0f4:8769:82b8",
                1_559_741_961,
                "010000005cf7c609a6bb79d16625507a",
            ),
        ];
        for (secret, client, ip, now, want) in cases {
            let cookies = with_secrets(secret, None);
            let made = cookies.make(client_cookie(client), ip.parse().unwrap(), now);
            assert_eq!(made.to_vec(), hex(want), "{ip} at {now}");
        }
    }

    #[test]
    fn the_rfc_9018_cookies_clients_return_verify_reserved_bytes_included() {
        // A.3: the client returns a cookie whose reserved bytes are set. It
        // arrives 1h52m after it was stamped (0x5cf78f71): checked at that
        // time it is too old; a minute after it was stamped, it verifies.
        let cookies = with_secrets("e5e973e5a6b2a43f48e7dc849e37bfcf", None);
        let query = query_with_cookie(&hex("fc93fc62807ddb8601abcdef5cf78f71a314227b6679ebf5"));
        let ip = "203.0.113.203".parse().unwrap();
        assert!(matches!(
            cookies.check(&query, ip, 1_559_734_700),
            CookieCheck::Invalid { .. }
        ));
        assert_eq!(
            cookies.check(&query, ip, 0x5cf7_8f71 + 60),
            CookieCheck::Valid {
                client: client_cookie("fc93fc62807ddb86")
            }
        );
        // A.4: made under the old secret, checked after the rollover.
        let cookies = with_secrets(
            "445536bcd2513298075a5d379663c962",
            Some("dd3bdf9344b678b185a6f5cb60fca715"),
        );
        let query = query_with_cookie(&hex("22681ab97d52c298010000005cf7c57926556bd0934c72f8"));
        let ip = "2001:db8:220:1:59de:d0f4:8769:82b8".parse().unwrap();
        assert!(matches!(
            cookies.check(&query, ip, 1_559_741_961),
            CookieCheck::Valid { .. }
        ));
        let without_old = with_secrets("445536bcd2513298075a5d379663c962", None);
        assert!(matches!(
            without_old.check(&query, ip, 1_559_741_961),
            CookieCheck::Invalid { .. }
        ));
    }

    fn returned(cookies: &ServerCookies, ip: IpAddr, made_at: u32) -> Vec<u8> {
        let server = cookies.make([4; 8], ip, made_at);
        query_with_cookie(&[[4; 8].as_slice(), &server].concat())
    }

    #[test]
    fn a_cookie_validates_after_one_rotation_and_not_after_two() {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let query = returned(&cookies, ip, NOW);
        assert!(matches!(
            cookies.check(&query, ip, NOW),
            CookieCheck::Valid { .. }
        ));
        cookies.rotate();
        assert!(matches!(
            cookies.check(&query, ip, NOW),
            CookieCheck::Valid { .. }
        ));
        cookies.rotate();
        assert!(matches!(
            cookies.check(&query, ip, NOW),
            CookieCheck::Invalid { .. }
        ));
    }

    #[test]
    fn a_cookie_is_accepted_from_five_minutes_ahead_to_an_hour_old_only() {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let valid = |made_at: u32, now: u32| {
            matches!(
                cookies.check(&returned(&cookies, ip, made_at), ip, now),
                CookieCheck::Valid { .. }
            )
        };
        assert!(valid(NOW - 3600, NOW));
        assert!(!valid(NOW - 3601, NOW));
        assert!(valid(NOW + 300, NOW));
        assert!(!valid(NOW + 301, NOW));
        // Across the wrap of the 32-bit timestamp.
        assert!(valid(u32::MAX - 100, 1000));
        assert!(!valid(1000, u32::MAX - 100));
    }

    #[test]
    fn a_tampered_cookie_or_another_address_is_invalid() {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let server = cookies.make([4; 8], ip, NOW);
        for byte in 0..16 {
            let mut tampered = server;
            tampered[byte] ^= 0x01;
            let query = query_with_cookie(&[[4; 8].as_slice(), &tampered].concat());
            assert_eq!(
                cookies.check(&query, ip, NOW),
                CookieCheck::Invalid { client: [4; 8] },
                "byte {byte} flipped"
            );
        }
        let query = query_with_cookie(&[[5; 8].as_slice(), &server].concat());
        assert!(matches!(
            cookies.check(&query, ip, NOW),
            CookieCheck::Invalid { .. }
        ));
        let query = query_with_cookie(&[[4; 8].as_slice(), &server].concat());
        for other in ["192.0.2.2", "2001:db8::1"] {
            assert!(matches!(
                cookies.check(&query, other.parse().unwrap(), NOW),
                CookieCheck::Invalid { .. }
            ));
        }
        assert!(!cookies.validated().contains(ip));
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_ipv4_address() {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let query = returned(&cookies, "192.0.2.1".parse().unwrap(), NOW);
        let mapped = "::ffff:192.0.2.1".parse().unwrap();
        assert!(matches!(
            cookies.check(&query, mapped, NOW),
            CookieCheck::Valid { .. }
        ));
        assert!(cookies.validated().contains("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn cookie_option_lengths_sort_into_client_only_malformed_and_invalid() {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for len in 0..=48 {
            let check = cookies.check(&query_with_cookie(&vec![7; len]), ip, NOW);
            let want = match len {
                8 => CookieCheck::ClientOnly { client: [7; 8] },
                16..=40 => CookieCheck::Invalid { client: [7; 8] },
                _ => CookieCheck::Malformed,
            };
            assert_eq!(check, want, "an option of {len} bytes");
        }
    }

    #[test]
    fn a_query_without_opt_or_cookie_has_none_and_truncations_never_panic() {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut plain = Message::query();
        plain.add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            cookies.check(&plain.to_vec().unwrap(), ip, NOW),
            CookieCheck::None
        );
        plain.set_edns(Edns::new());
        assert_eq!(
            cookies.check(&plain.to_vec().unwrap(), ip, NOW),
            CookieCheck::None
        );
        let query = returned(&cookies, ip, NOW);
        for end in 0..query.len() {
            let check = cookies.check(&query[..end], ip, NOW);
            assert!(
                matches!(check, CookieCheck::None | CookieCheck::Malformed),
                "{end} bytes: {check:?}"
            );
        }
    }

    #[test]
    fn the_first_cookie_option_counts() {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut query = Message::query();
        let mut edns = Edns::new();
        edns.options_mut()
            .insert(EdnsOption::Unknown(12, vec![0; 3])); // PADDING first
        edns.options_mut()
            .insert(EdnsOption::Unknown(COOKIE_CODE, vec![1; 8]));
        edns.options_mut()
            .insert(EdnsOption::Unknown(COOKIE_CODE, vec![2; 3]));
        query.set_edns(edns);
        assert_eq!(
            cookies.check(&query.to_vec().unwrap(), ip, NOW),
            CookieCheck::ClientOnly { client: [1; 8] }
        );
    }

    #[test]
    fn add_to_response_replaces_an_existing_cookie() {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut response = Message::response(1, OpCode::Query);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        edns.options_mut()
            .insert(EdnsOption::Unknown(COOKIE_CODE, vec![9; 24]));
        response.set_edns(edns);
        cookies.add_to_response(&mut response, [3; 8], ip, NOW);
        let edns = response.edns.as_ref().unwrap();
        assert_eq!(edns.max_payload(), 4096, "the existing OPT record is kept");
        let all = edns.options().get_all(EdnsCode::Cookie);
        assert_eq!(all.len(), 1);
        let EdnsOption::Unknown(_, data) = all[0] else {
            panic!("COOKIE is an unknown option to hickory")
        };
        assert_eq!(&data[..8], &[3; 8]);
        assert_eq!(&data[8..], &cookies.make([3; 8], ip, NOW));
    }

    #[test]
    fn validated_peers_stay_within_their_bound_and_keep_recent_peers() {
        let peers = ValidatedPeers::new(64, Duration::from_secs(3600));
        let recent: IpAddr = "2001:db8::1".parse().unwrap();
        for n in 0..10_000u32 {
            peers.insert(IpAddr::from(n.to_be_bytes()));
            if n % 8 == 0 {
                peers.insert(recent);
            }
            assert!(peers.len() <= peers.max_peers());
        }
        assert!(peers.contains(recent));
        assert!(peers.contains(IpAddr::from(9_999u32.to_be_bytes())));
        assert!(!peers.contains(IpAddr::from(0u32.to_be_bytes())));
    }
}

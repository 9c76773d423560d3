//! DNS cookies (RFC 7873, RFC 9018) from `abyss_examples::dns_cookies`:
//! rotation on tokio's clock, arbitrary input, the bounded table of
//! validated peers, the amplification guard fed by it, and a real client
//! (BIND's dig) learning and returning a server cookie.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use abyss::Server;
use abyss::middleware::{AmplificationGuardLayer, Validate};
use abyss_examples::dns::Answer;
use abyss_examples::dns_cookies::{self, CookieCheck, ServerCookies, ValidatedPeers};
use abyss_tests::{ask, client, recv_within};
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use proptest::prelude::*;

const NOW: u32 = 1_700_000_000;
const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Answers A queries under `.test`: one address, or twenty for
/// `many.test` (a reply far larger than its query).
struct Addresses;

impl Answer for Addresses {
    async fn answer(&self, query: &[u8]) -> Option<abyss::Bytes> {
        let query = Message::from_vec(query).ok()?;
        if query.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.authoritative = true;
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.queries = query.queries.clone();
        reply.edns = query.edns.clone();
        let question = query.queries.first()?;
        let count = if question.name().to_ascii() == "many.test." {
            20
        } else {
            1
        };
        for n in 0..count {
            reply.answers.push(Record::from_rdata(
                question.name().clone(),
                300,
                RData::A(A::new(192, 0, 2, n + 1)),
            ));
        }
        reply.to_vec().ok().map(Into::into)
    }
}

/// A query for `name` A, with `cookie` as its COOKIE option's data (no
/// OPT record when `None`).
fn query(name: &str, cookie: Option<&[u8]>) -> Vec<u8> {
    let mut query = Message::query();
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    if let Some(cookie) = cookie {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        edns.options_mut()
            .insert(EdnsOption::Unknown(10, cookie.to_vec()));
        query.set_edns(edns);
    }
    query.to_vec().unwrap()
}

/// The COOKIE option's data in a reply.
fn reply_cookie(reply: &Message) -> Option<Vec<u8>> {
    match reply.edns.as_ref()?.option(EdnsCode::Cookie)? {
        EdnsOption::Unknown(_, data) => Some(data.clone()),
        _ => None,
    }
}

fn returned_cookie(cookies: &ServerCookies, client: IpAddr, made_at: u32) -> Vec<u8> {
    let server = cookies.make([4; 8], client, made_at);
    query(
        "example.test.",
        Some(&[[4; 8].as_slice(), &server].concat()),
    )
}

fn is_valid(check: CookieCheck) -> bool {
    matches!(check, CookieCheck::Valid { .. })
}

#[tokio::test(start_paused = true)]
async fn secrets_rotate_on_tokio_time_and_a_cookie_outlives_one_rotation_only() {
    let rotation = Duration::from_secs(600);
    let cookies = ServerCookies::new(rotation);
    let client: IpAddr = "192.0.2.1".parse().unwrap();
    let query = returned_cookie(&cookies, client, NOW);
    assert!(is_valid(cookies.check(&query, client, NOW)));

    tokio::time::advance(Duration::from_secs(599)).await;
    assert!(is_valid(cookies.check(&query, client, NOW + 599)));
    tokio::time::advance(Duration::from_secs(2)).await; // one rotation
    assert!(is_valid(cookies.check(&query, client, NOW + 601)));
    let after_one = returned_cookie(&cookies, client, NOW + 601);
    tokio::time::advance(Duration::from_secs(600)).await; // two rotations
    assert_eq!(
        cookies.check(&query, client, NOW + 1201),
        CookieCheck::Invalid { client: [4; 8] }
    );
    assert!(
        is_valid(cookies.check(&after_one, client, NOW + 1201)),
        "made under the secret current since the first rotation"
    );
}

#[tokio::test(start_paused = true)]
async fn a_long_quiet_spell_retires_both_secrets_at_once() {
    let cookies = ServerCookies::new(Duration::from_secs(600));
    let client: IpAddr = "192.0.2.1".parse().unwrap();
    let query = returned_cookie(&cookies, client, NOW);
    // Nothing is made or checked for three periods; the cookie's timestamp
    // is still within its hour.
    tokio::time::advance(Duration::from_secs(1800)).await;
    assert!(!is_valid(cookies.check(&query, client, NOW + 1800)));
}

#[tokio::test(start_paused = true)]
async fn a_peer_counts_as_validated_for_one_rotation_after_its_last_good_cookie() {
    let cookies = ServerCookies::new(Duration::from_secs(3600));
    let validated = cookies.validated();
    let peer: SocketAddr = "192.0.2.1:5300".parse().unwrap();
    let client_only = query("example.test.", Some(&[4; 8]));
    assert_eq!(
        cookies.check(&client_only, peer.ip(), NOW),
        CookieCheck::ClientOnly { client: [4; 8] }
    );
    assert!(
        !validated.is_validated(peer),
        "a client cookie proves nothing"
    );
    assert!(is_valid(cookies.check(
        &returned_cookie(&cookies, peer.ip(), NOW),
        peer.ip(),
        NOW
    )));
    assert!(validated.is_validated(peer));
    assert!(
        validated.is_validated("192.0.2.1:9999".parse().unwrap()),
        "any port of the address"
    );
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert!(validated.is_validated(peer));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!validated.is_validated(peer));
}

#[test]
fn validated_peers_never_hold_more_than_their_bound() {
    let peers = ValidatedPeers::new(
        dns_cookies::DEFAULT_MAX_VALIDATED_PEERS,
        Duration::from_secs(3600),
    );
    let recent: IpAddr = "2001:db8::1".parse().unwrap();
    for n in 0..200_000u32 {
        peers.insert(IpAddr::from(n.to_be_bytes()));
        if n % 1000 == 0 {
            peers.insert(recent);
            assert!(peers.len() <= peers.max_peers());
        }
    }
    assert_eq!(peers.max_peers(), 65_536);
    assert!(peers.len() <= peers.max_peers());
    assert!(peers.len() > peers.max_peers() / 2, "it is used, too");
    assert!(peers.contains(recent));
    assert!(peers.contains(IpAddr::from(199_999u32.to_be_bytes())));
}

#[test]
fn a_small_table_of_cookie_validated_peers_stays_small() {
    let cookies = ServerCookies::with_max_validated_peers(Duration::from_secs(3600), 10);
    let validated = cookies.validated();
    for n in 0..1000u32 {
        let client = IpAddr::from((0xc000_0200 + n).to_be_bytes());
        assert!(is_valid(cookies.check(
            &returned_cookie(&cookies, client, NOW),
            client,
            NOW
        )));
        assert!(validated.len() <= 10);
        assert!(validated.contains(client));
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let _ = cookies.check(&bytes, LOOPBACK, NOW);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _ = runtime.block_on(cookies.answer(&Addresses, &bytes, LOOPBACK, NOW));
    }

    #[test]
    fn damaged_queries_with_cookies_never_panic(
        cookie in proptest::collection::vec(any::<u8>(), 0..60),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let cookies = ServerCookies::new(Duration::from_secs(3600));
        let mut bytes = query("example.test.", Some(&cookie));
        for (at, value) in flips {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let check = cookies.check(&bytes, LOOPBACK, NOW);
        prop_assert!(!is_valid(check), "random bytes do not forge a cookie: {check:?}");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _ = runtime.block_on(cookies.answer(&Addresses, &bytes, LOOPBACK, NOW));
    }
}

#[tokio::test]
async fn replies_carry_a_fresh_cookie_and_a_bad_one_gets_badcookie() {
    let cookies = ServerCookies::new(Duration::from_secs(3600));
    let client: IpAddr = "192.0.2.1".parse().unwrap();

    let plain = cookies
        .answer(&Addresses, &query("example.test.", None), client, NOW)
        .await
        .unwrap();
    let plain = Message::from_vec(&plain).unwrap();
    assert_eq!(plain.metadata.response_code, ResponseCode::NoError);
    assert!(plain.edns.is_none(), "no cookie without a query cookie");

    let first = cookies
        .answer(
            &Addresses,
            &query("example.test.", Some(&[4; 8])),
            client,
            NOW,
        )
        .await
        .unwrap();
    let first = Message::from_vec(&first).unwrap();
    assert_eq!(first.answers.len(), 1);
    let cookie = reply_cookie(&first).expect("a cookie in the reply");
    assert_eq!(cookie.len(), 24);
    assert_eq!(&cookie[..8], &[4; 8]);
    assert!(!cookies.validated().contains(client));

    let second = cookies
        .answer(
            &Addresses,
            &query("example.test.", Some(&cookie)),
            client,
            NOW + 10,
        )
        .await
        .unwrap();
    let second = Message::from_vec(&second).unwrap();
    assert_eq!(second.metadata.response_code, ResponseCode::NoError);
    assert_eq!(second.answers.len(), 1);
    assert_eq!(
        reply_cookie(&second).unwrap()[8..16],
        [1, 0, 0, 0, 0x65, 0x53, 0xf1, 0x0a]
    );
    assert!(cookies.validated().contains(client));

    let mut tampered = cookie.clone();
    tampered[23] ^= 1;
    let refused = cookies
        .answer(
            &Addresses,
            &query("example.test.", Some(&tampered)),
            client,
            NOW + 10,
        )
        .await
        .unwrap();
    let refused = Message::from_vec(&refused).unwrap();
    assert_eq!(refused.metadata.response_code, ResponseCode::BADCOOKIE);
    assert!(refused.answers.is_empty());
    assert_eq!(refused.queries, first.queries, "the question is echoed");
    let fresh = reply_cookie(&refused).expect("a fresh cookie with BADCOOKIE");
    assert_eq!(&fresh[..8], &[4; 8]);
    assert!(is_valid(cookies.check(
        &query("example.test.", Some(&fresh)),
        client,
        NOW + 10
    )));

    let malformed = cookies
        .answer(
            &Addresses,
            &query("example.test.", Some(&[4; 12])),
            client,
            NOW,
        )
        .await
        .unwrap();
    let malformed = Message::from_vec(&malformed).unwrap();
    assert_eq!(malformed.metadata.response_code, ResponseCode::FormErr);
}

#[tokio::test]
async fn responses_are_never_answered_with_cookie_errors() {
    let cookies = ServerCookies::new(Duration::from_secs(3600));
    let mut response = Message::from_vec(&query("example.test.", Some(&[4; 30]))).unwrap();
    response.metadata.message_type = MessageType::Response;
    let reply = cookies
        .answer(&Addresses, &response.to_vec().unwrap(), LOOPBACK, NOW)
        .await;
    assert_eq!(reply, None);
}

#[tokio::test]
async fn the_amplification_guard_lets_large_replies_through_once_the_cookie_comes_back() {
    let cookies = Arc::new(ServerCookies::new(Duration::from_secs(3600)));
    let stack = abyss::ServiceBuilder::new()
        .layer(AmplificationGuardLayer::new(3).validated_by(cookies.validated()))
        .service(dns_cookies::service(Arc::new(Addresses), cookies.clone()));
    let handle = Server::bind("127.0.0.1:0")
        .listeners(1)
        .serve(stack)
        .await
        .unwrap();
    let server = handle.local_addr();
    let socket = client().await;

    // Twenty addresses are more than three times the query: not for an
    // address nobody has validated.
    let many = query("many.test.", Some(&[4; 8]));
    socket.send_to(&many, server).await.unwrap();
    assert_eq!(recv_within(&socket, Duration::from_millis(300)).await, None);

    // A small answer brings the server cookie; returned, it validates the
    // address (the guard decides before the service runs, so from the
    // following query on).
    let first =
        Message::from_vec(&ask(&socket, server, &query("one.test.", Some(&[4; 8]))).await).unwrap();
    let cookie = reply_cookie(&first).expect("a server cookie");
    ask(&socket, server, &query("one.test.", Some(&cookie))).await;
    let reply = ask(&socket, server, &query("many.test.", Some(&cookie))).await;
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.answers.len(), 20);
    assert!(cookies.validated().contains(LOOPBACK));
    assert_eq!(handle.stats().dropped.amplification, 1);
    handle.shutdown().await;
}

/// `dig` with `args` against `server`, its whole output.
fn dig(server: SocketAddr, args: &[&str]) -> String {
    let output = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=3", "+tries=1"])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The hex of dig's `; COOKIE: HEX (...)` line, and the rest of the line.
fn dig_cookie(output: &str) -> Option<(String, String)> {
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix("; COOKIE: "))?;
    let (hex, rest) = line.split_once(' ').unwrap_or((line, ""));
    Some((hex.to_owned(), rest.to_owned()))
}

fn have_dig() -> bool {
    Command::new("dig")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_learns_a_server_cookie_and_the_server_accepts_it_back() {
    if !have_dig() {
        eprintln!("skipped: dig is not installed (apt-get install dnsutils)");
        return;
    }
    let cookies = Arc::new(ServerCookies::new(Duration::from_secs(3600)));
    let handle = Server::bind("127.0.0.1:0")
        .listeners(1)
        .serve(dns_cookies::service(Arc::new(Addresses), cookies.clone()))
        .await
        .unwrap();
    let server = handle.local_addr();

    let first = tokio::task::spawn_blocking(move || dig(server, &["+cookie", "one.test", "A"]))
        .await
        .unwrap();
    let (cookie, verdict) = dig_cookie(&first).expect("dig prints the reply's cookie");
    assert_eq!(cookie.len(), 48, "client and server cookie: {first}");
    assert!(verdict.contains("good"), "{first}");
    assert!(first.contains("status: NOERROR"), "{first}");
    assert!(!cookies.validated().contains(LOOPBACK));

    let returned = format!("+cookie={cookie}");
    let second = tokio::task::spawn_blocking(move || dig(server, &[&returned, "one.test", "A"]))
        .await
        .unwrap();
    let (_, verdict) = dig_cookie(&second).expect("a cookie in the second reply");
    assert!(verdict.contains("good"), "{second}");
    assert!(second.contains("status: NOERROR"), "{second}");
    assert!(second.contains("192.0.2.1"), "{second}");
    assert!(
        cookies.validated().contains(LOOPBACK),
        "the server cookie verified"
    );

    // The same cookie with its hash changed is refused with a fresh one.
    let mut tampered = cookie.clone();
    let last = if tampered.ends_with('0') { "1" } else { "0" };
    tampered.replace_range(47.., last);
    let tampered = format!("+cookie={tampered}");
    let third = tokio::task::spawn_blocking(move || {
        dig(server, &[&tampered, "+nobadcookie", "one.test", "A"])
    })
    .await
    .unwrap();
    assert!(third.contains("status: BADCOOKIE"), "{third}");
    assert!(dig_cookie(&third).is_some(), "{third}");
    handle.shutdown().await;
}

//! The server's and the sessions' metrics, scraped from the Prometheus
//! exporter the examples install.
//!
//! The exporter is process-wide: the tests here share one (each with
//! servers of its own name), installed outside any test's runtime so that
//! it outlives them. The test of a recorder installed after `serve()` needs
//! a process where nothing was installed before: it runs its half in a
//! child process of its own.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use abyss::session::{Session, Sessions, Step};
use abyss::{Request, Server, ServerHandle};
use abyss_tests::{PATIENCE, ask, client, echo, settled};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Set in the child process that runs [`late_recorder_child`].
const LATE_CHILD: &str = "ABYSS_METRICS_LATE_CHILD";

/// The process's exporter, installed on first use. Installed from a
/// thread outside any runtime, so that its HTTP listener runs on a runtime
/// of its own rather than on the calling test's, which ends with the test.
fn exporter() -> SocketAddr {
    static EXPORTER: OnceLock<SocketAddr> = OnceLock::new();
    *EXPORTER.get_or_init(|| {
        std::thread::spawn(|| {
            let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = free.local_addr().unwrap();
            drop(free);
            abyss_examples::install_prometheus(addr).unwrap();
            addr
        })
        .join()
        .unwrap()
    })
}

/// One scrape, or the error that stopped it (the exporter's listener starts
/// in the background and may not be up yet).
async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(response.as_str(), |(_, body)| body);
    Ok(body.to_owned())
}

/// Scrapes until `done` holds of the text, for at most [`PATIENCE`]: the
/// counts reach the recorder from a task that publishes every second (and
/// the exporter's listener starts in the background), so there is nothing
/// to wait on but the scrape itself.
async fn scrape_until(what: &str, done: impl Fn(&str) -> bool) -> String {
    let addr = exporter();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let scraped = scrape(addr).await;
        if let Ok(text) = &scraped
            && done(text)
        {
            return text.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the scrape never showed {what}; last one: {scraped:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample of `name` whose labels are exactly `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let mut found: Vec<(&str, &str)> = rest
            .strip_suffix('}')?
            .split(',')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=')?;
                Some((key, value.trim_matches('"')))
            })
            .collect::<Option<_>>()?;
        let mut wanted = labels.to_vec();
        found.sort_unstable();
        wanted.sort_unstable();
        (found == wanted).then(|| value.parse().ok())?
    })
}

/// A sample a scrape should have.
struct Want {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    value: f64,
}

fn want(name: &'static str, labels: &[(&'static str, &str)], value: f64) -> Want {
    let labels = labels
        .iter()
        .map(|(key, value)| (*key, (*value).to_owned()))
        .collect();
    Want {
        name,
        labels,
        value,
    }
}

/// Whether the text has every sample of `wants`.
fn has_all(text: &str, wants: &[Want]) -> bool {
    wants.iter().all(|want| {
        let labels: Vec<(&str, &str)> = want
            .labels
            .iter()
            .map(|(key, value)| (*key, value.as_str()))
            .collect();
        sample(text, want.name, &labels) == Some(want.value)
    })
}

/// Three echoes of 10 bytes and one datagram over the 100-byte size limit;
/// returns once all four are counted and none is in flight.
async fn three_echoes_and_one_too_large(handle: &ServerHandle) {
    let socket = client().await;
    for i in 0..3u8 {
        assert_eq!(
            ask(&socket, handle.local_addr(), &[i; 10]).await,
            vec![i; 10]
        );
    }
    socket
        .send_to(&[0u8; 101], handle.local_addr())
        .await
        .unwrap();
    abyss_tests::wait_for_stats(handle, "the oversized one", |s| s.dropped.too_large == 1).await;
    let stats = settled(handle).await;
    assert_eq!((stats.received, stats.bytes_received), (4, 131));
}

/// The samples [`three_echoes_and_one_too_large`] leaves for `server`.
fn after_three_echoes(server: &str) -> Vec<Want> {
    let label = [("server", server)];
    let outcome = |o| [("server", server), ("outcome", o)];
    vec![
        want("abyss_datagrams_received_total", &label, 4.0),
        want("abyss_received_bytes_total", &label, 131.0),
        want("abyss_sent_bytes_total", &label, 30.0),
        want("abyss_datagrams_total", &outcome("replied"), 3.0),
        want("abyss_datagrams_total", &outcome("too_large"), 1.0),
        want("abyss_datagrams_total", &outcome("no_reply"), 0.0),
        want("abyss_in_flight", &label, 0.0),
        want("abyss_receive_errors_total", &label, 0.0),
        want("abyss_unread_at_close_total", &label, 0.0),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_gauge_and_histogram_are_scraped_from_prometheus() {
    exporter();
    let handle = Server::bind("127.0.0.1:0")
        .name("scraped")
        .listeners(1)
        .max_packet_size(100)
        .serve(echo())
        .await
        .unwrap();
    three_echoes_and_one_too_large(&handle).await;

    let expected = after_three_echoes("scraped");
    let text = scrape_until("the counts of `scraped`", |text| {
        has_all(text, &expected)
            && sample(
                text,
                "abyss_handling_seconds_count",
                &[("server", "scraped")],
            ) == Some(4.0)
    })
    .await;
    for help in [
        "# HELP abyss_datagrams_received_total ",
        "# HELP abyss_received_bytes_total ",
        "# HELP abyss_handling_seconds ",
        "# TYPE abyss_handling_seconds histogram",
    ] {
        assert!(text.contains(help), "no `{help}` in:\n{text}");
    }
    handle.shutdown().await;
}

/// Runs [`late_recorder_child`] alone in a new process, where no recorder
/// is installed until its server has served.
#[test]
fn a_recorder_installed_after_serve_still_gets_the_counters() {
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "late_recorder_child",
            "--exact",
            "--include-ignored",
            "--nocapture",
        ])
        .env(LATE_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output = match finished.recv_timeout(PATIENCE * 3) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("the child test did not finish within {:?}", PATIENCE * 3);
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the child test failed:\n{stdout}\n{stderr}"
    );
}

/// The half of [`a_recorder_installed_after_serve_still_gets_the_counters`]
/// that runs in a process of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a process of its own by a_recorder_installed_after_serve_still_gets_the_counters"]
async fn late_recorder_child() {
    if std::env::var_os(LATE_CHILD).is_none() {
        eprintln!(
            "nothing to do outside the child process of a_recorder_installed_after_serve_still_gets_the_counters"
        );
        return;
    }
    let handle = Server::bind("127.0.0.1:0")
        .name("late")
        .listeners(2)
        .max_packet_size(100)
        .serve(echo())
        .await
        .unwrap();
    three_echoes_and_one_too_large(&handle).await;

    // Only now is there a recorder.
    exporter();
    let expected = after_three_echoes("late");
    let text = scrape_until("the counts from before the recorder", |text| {
        has_all(text, &expected)
    })
    .await;
    assert!(
        text.contains("# HELP abyss_datagrams_received_total "),
        "no HELP text in:\n{text}"
    );

    // Handling times are samples, not counts: those from before the
    // recorder are gone, but the ones after its first round are kept.
    // Ask until one answer's handling time shows (within a round or so).
    let socket = client().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        assert_eq!(ask(&socket, handle.local_addr(), b"x").await, b"x");
        let text = scrape(exporter()).await.unwrap();
        let timed = sample(&text, "abyss_handling_seconds_count", &[("server", "late")]);
        if timed.is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no handling time recorded after the recorder came:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_in_one_process_are_told_apart_by_their_server_label() {
    exporter();
    let named = Server::bind("127.0.0.1:0")
        .name("alpha")
        .serve(echo())
        .await
        .unwrap();
    let unnamed = Server::bind("127.0.0.1:0").serve(echo()).await.unwrap();
    let socket = client().await;
    for _ in 0..2 {
        ask(&socket, named.local_addr(), b"to alpha").await;
    }
    ask(&socket, unnamed.local_addr(), b"to the other").await;
    settled(&named).await;
    settled(&unnamed).await;

    // The unnamed one is labelled with its address.
    let address = unnamed.local_addr().to_string();
    scrape_until("each server's own count", |text| {
        let received = |server| {
            sample(
                text,
                "abyss_datagrams_received_total",
                &[("server", server)],
            )
        };
        received("alpha") == Some(2.0) && received(&address) == Some(1.0)
    })
    .await;
    named.shutdown().await;
    unnamed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_again_under_its_name_counts_on_from_where_it_stopped() {
    exporter();
    let received = |text: &str| {
        sample(
            text,
            "abyss_datagrams_received_total",
            &[("server", "again")],
        )
    };
    let socket = client().await;
    let first = Server::bind("127.0.0.1:0")
        .name("again")
        .serve(echo())
        .await
        .unwrap();
    for _ in 0..3 {
        ask(&socket, first.local_addr(), b"one").await;
    }
    settled(&first).await;
    scrape_until("the first server's count", |text| {
        received(text) == Some(3.0)
    })
    .await;
    first.shutdown().await;
    drop(first);

    let second = Server::bind("127.0.0.1:0")
        .name("again")
        .serve(echo())
        .await
        .unwrap();
    ask(&socket, second.local_addr(), b"two").await;
    settled(&second).await;
    scrape_until("the count going on from 3", |text| {
        received(text) == Some(4.0)
    })
    .await;
    second.shutdown().await;
}

/// A session that answers each datagram with how many its peer sent.
struct Counting(u64);

impl Session for Counting {
    async fn handle(&mut self, _request: Request) -> Step {
        self.0 += 1;
        Step::keep().reply(self.0.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_counts_are_exported_under_the_sessions_label() {
    exporter();
    let sessions = Sessions::builder(|_peer| Counting(0))
        .name("peers")
        .build()
        .unwrap();
    let handle = Server::bind("127.0.0.1:0")
        .name("with sessions")
        .serve(sessions.service())
        .await
        .unwrap();
    for _ in 0..2 {
        let peer = client().await;
        assert_eq!(ask(&peer, handle.local_addr(), b"hi").await, b"1");
    }
    let peers = [("sessions", "peers")];
    scrape_until("two live sessions", |text| {
        sample(text, "abyss_sessions_live", &peers) == Some(2.0)
            && sample(text, "abyss_sessions_created_total", &peers) == Some(2.0)
    })
    .await;

    sessions.shutdown().await;
    assert_eq!(sessions.stats().shut_down, 2);
    scrape_until("two sessions ended by the shutdown", |text| {
        let ended = |reason| {
            sample(
                text,
                "abyss_sessions_ended_total",
                &[("sessions", "peers"), ("reason", reason)],
            )
        };
        sample(text, "abyss_sessions_live", &peers) == Some(0.0)
            && ended("shut_down") == Some(2.0)
            && ended("closed") == Some(0.0)
    })
    .await;
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_passes_promtool_check_metrics() {
    let promtool = std::process::Command::new("promtool")
        .arg("--version")
        .output();
    if promtool.is_err() {
        eprintln!(
            "SKIPPED the_scrape_passes_promtool_check_metrics: `promtool` is not installed (Debian package `prometheus`)"
        );
        return;
    }
    exporter();
    let sessions = Sessions::builder(|_peer| Counting(0))
        .name("linted")
        .build()
        .unwrap();
    let handle = Server::bind("127.0.0.1:0")
        .name("linted")
        .max_packet_size(100)
        .serve(sessions.service())
        .await
        .unwrap();
    let socket = client().await;
    assert_eq!(ask(&socket, handle.local_addr(), b"hi").await, b"1");
    socket
        .send_to(&[0u8; 101], handle.local_addr())
        .await
        .unwrap();
    abyss_tests::wait_for_stats(&handle, "the oversized one", |s| s.dropped.too_large == 1).await;
    let text = scrape_until("the server's and the sessions' series", |text| {
        sample(
            text,
            "abyss_datagrams_received_total",
            &[("server", "linted")],
        ) == Some(2.0)
            && sample(text, "abyss_sessions_live", &[("sessions", "linted")]) == Some(1.0)
    })
    .await;

    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = check.stdin.take().unwrap();
    let input = text.clone();
    let writer =
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, input.as_bytes()));
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::task::spawn_blocking(move || check.wait_with_output()),
    )
    .await
    .expect("promtool finishes")
    .unwrap()
    .unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool check metrics failed ({}):\n{}{}\nscrape:\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    sessions.shutdown().await;
    handle.shutdown().await;
}

//! The tracing events a server emits, under the original's telemetry names.

use std::sync::{Arc, Mutex};

use abyss::Server;
use abyss_tests::{ask, client, echo};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Records `(target, message)` of every event.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, String)>>>);

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        self.0
            .lock()
            .unwrap()
            .push((event.metadata().target().to_owned(), message.0));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_served_datagram_emits_listener_and_connection_events() {
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    // The runtime has one thread, so the listener's task reports here too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let handle = Server::bind("127.0.0.1:0")
        .listeners(1)
        .serve(echo())
        .await
        .unwrap();
    let socket = client().await;
    assert_eq!(
        ask(&socket, handle.local_addr(), b"traced").await,
        b"traced"
    );
    handle.shutdown().await;

    let events = recorder.0.lock().unwrap().clone();
    for (target, message) in [
        ("abyss::listener", "listener start"),
        ("abyss::listener", "listener ready"),
        ("abyss::listener", "listener receiving"),
        ("abyss::connection", "recv"),
        ("abyss::connection", "ready"),
        ("abyss::connection", "start"),
        ("abyss::connection", "send"),
        ("abyss::listener", "listener draining"),
        ("abyss::listener", "listener stop"),
    ] {
        assert!(
            events.iter().any(|(t, m)| t == target && m == message),
            "no `{message}` event under {target}; events: {events:?}"
        );
    }
    let position = |m: &str| events.iter().position(|(_, e)| e == m).unwrap();
    assert!(position("listener start") < position("recv"));
    assert!(position("recv") < position("send"));
    assert!(position("send") < position("listener stop"));
}

/// Records the `outcome` field of every `stop` event and counts `start`s.
#[derive(Clone, Default)]
struct Stops {
    starts: Arc<Mutex<usize>>,
    outcomes: Arc<Mutex<Vec<String>>>,
}

#[derive(Default)]
struct Fields {
    message: String,
    outcome: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "outcome" => self.outcome = format!("{value:?}"),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "outcome" {
            self.outcome = value.to_owned();
        } else {
            self.record_debug(field, &value);
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Stops {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != "abyss::connection" {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        match fields.message.as_str() {
            "start" => *self.starts.lock().unwrap() += 1,
            "stop" => self.outcomes.lock().unwrap().push(fields.outcome),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_datagram_whose_handling_starts_ends_with_exactly_one_stop() {
    let stops = Stops::default();
    let subscriber = tracing_subscriber::registry().with(stops.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let handle = Server::bind("127.0.0.1:0")
        .listeners(1)
        .max_packet_size(100)
        .serve(tower::service_fn(|request: abyss::Request| async move {
            match request.payload().as_ref() {
                b"none" => Ok(None),
                b"error" => Err(std::io::Error::other("refused")),
                b"panic" => panic!("handler panicked"),
                _ => Ok(Some(request.into_payload())),
            }
        }))
        .await
        .unwrap();
    let socket = client().await;
    let big = [0u8; 200];
    let payloads: [&[u8]; 6] = [b"reply", b"none", b"error", b"panic", &big, b"reply"];
    for payload in payloads {
        socket.send_to(payload, handle.local_addr()).await.unwrap();
    }
    abyss_tests::wait_for_stats(&handle, "six datagrams finished", |s| {
        s.received == 6 && s.in_flight == 0
    })
    .await;
    handle.shutdown().await;

    let mut outcomes = stops.outcomes.lock().unwrap().clone();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [
            "handler_error",
            "no_reply",
            "panicked",
            "replied",
            "replied",
            "too_large"
        ],
        "one stop per datagram, with its outcome"
    );
    assert_eq!(*stops.starts.lock().unwrap(), 6);
}

/// Records `(level, message)` of every event at INFO or above.
#[derive(Clone, Default)]
struct Visible(Arc<Mutex<Vec<(tracing::Level, String)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Visible {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level <= tracing::Level::INFO {
            let mut fields = Fields::default();
            event.record(&mut fields);
            self.0.lock().unwrap().push((level, fields.message));
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn drops_are_explained_at_the_default_level_once_per_reason_not_once_per_datagram() {
    let visible = Visible::default();
    let subscriber = tracing_subscriber::registry().with(visible.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let handle = Server::bind("127.0.0.1:0")
        .listeners(1)
        .serve(tower::service_fn(|request: abyss::Request| async move {
            match request.payload().as_ref() {
                b"error" => Err(std::io::Error::other("the database is down")),
                _ => Ok(Some(request.into_payload())),
            }
        }))
        .await
        .unwrap();
    let socket = client().await;
    let big = [0u8; 9000];
    for _ in 0..200 {
        socket.send_to(&big, handle.local_addr()).await.unwrap();
        socket.send_to(b"error", handle.local_addr()).await.unwrap();
    }
    abyss_tests::wait_for_stats(&handle, "every datagram finished", |s| {
        s.received + s.kernel_drops.unwrap_or(0) == 400 && s.in_flight == 0
    })
    .await;
    handle.shutdown().await;

    let lines = visible.0.lock().unwrap().clone();
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|(level, _)| *level == tracing::Level::WARN)
        .map(|(_, message)| message)
        .collect();
    assert!(
        warnings.iter().any(|m| m.contains("max_packet_size")),
        "an oversized datagram says what to change: {warnings:?}"
    );
    assert!(
        warnings.iter().any(|m| m.contains("the service failed")),
        "a handler error is visible: {warnings:?}"
    );
    assert!(
        warnings.len() <= 4,
        "400 drops, {} lines: {warnings:?}",
        warnings.len()
    );
}

/// Counts INFO events, and keeps the `forgotten` field of the summaries.
#[derive(Clone, Default)]
struct Infos {
    count: Arc<Mutex<usize>>,
    forgotten: Arc<Mutex<Vec<u64>>>,
}

struct Forgotten(Option<u64>);

impl Visit for Forgotten {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "forgotten" {
            self.0 = Some(value);
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Infos {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::INFO {
            return;
        }
        *self.count.lock().unwrap() += 1;
        let mut forgotten = Forgotten(None);
        event.record(&mut forgotten);
        if let Some(n) = forgotten.0 {
            self.forgotten.lock().unwrap().push(n);
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn quiet_peers_forgotten_by_the_thousand_make_one_info_line() {
    use abyss::session::Sessions;
    use abyss_examples::counting::{Counter, log_forgotten};
    use std::time::Duration;
    use tower::{Service, ServiceExt};

    let infos = Infos::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(infos.clone()));
    let sessions = Sessions::builder(|_peer| Counter::default())
        .idle_timeout(Duration::from_secs(60))
        .max_sessions_per_source(10_000)
        .build()
        .unwrap();
    let summary = tokio::spawn(log_forgotten(sessions.clone(), Duration::from_secs(10)));
    let mut service = sessions.service();
    for port in 1..=2_000u16 {
        let request = abyss::Request::new(
            std::net::SocketAddr::from(([192, 0, 2, 1], port)),
            "192.0.2.53:53".parse().unwrap(),
            bytes::Bytes::from_static(b"hi"),
            abyss::SendHandle::detached(),
        );
        service.ready().await.unwrap().call(request).await.unwrap();
    }
    // All idle out together, then two summary periods pass.
    tokio::time::sleep(Duration::from_secs(80)).await;
    assert_eq!(sessions.stats().timed_out, 2_000);
    summary.abort();
    assert_eq!(
        *infos.forgotten.lock().unwrap(),
        [2_000],
        "one summary line for all"
    );
    assert_eq!(*infos.count.lock().unwrap(), 1, "and no INFO line per peer");
}

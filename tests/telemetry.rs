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

    let handle = Server::bind("127.0.0.1:0".parse().unwrap())
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

//! The trace layer's span and hooks, seen by a recording subscriber.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use abyss_middleware::{Datagram, DropReason, Dropped, TraceLayer};
use tower::{BoxError, Service, ServiceExt};
use tracing::Span;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

struct Packet(&'static [u8]);

impl Datagram for Packet {
    fn peer(&self) -> SocketAddr {
        "192.0.2.7:5353".parse().unwrap()
    }
    fn local(&self) -> SocketAddr {
        "192.0.2.1:53".parse().unwrap()
    }
    fn payload_len(&self) -> usize {
        self.0.len()
    }
}

/// One recorded event: its span's name, its message, and its fields.
#[derive(Debug, Clone)]
struct Seen {
    span: Option<String>,
    message: String,
    fields: String,
}

#[derive(Clone, Default)]
struct Recorder {
    events: Arc<Mutex<Vec<Seen>>>,
    spans: Arc<Mutex<Vec<String>>>,
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest.push_str(&format!("{}={value:?} ", field.name()));
        }
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Recorder {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        self.spans.lock().unwrap().push(format!(
            "{} {}",
            attrs.metadata().name(),
            fields.rest.trim_end()
        ));
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.events.lock().unwrap().push(Seen {
            span: ctx.event_span(event).map(|s| s.name().to_owned()),
            message: fields.message,
            fields: fields.rest,
        });
    }
}

/// tracing caches per call site whether anyone listens; tests that swap
/// thread-local subscribers while another test emits from the same call
/// sites can see a stale answer, so these run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn serve(payload: &'static [u8]) -> Result<&'static str, BoxError> {
    tracing::info!("handling");
    match payload {
        b"drop" => Err(Dropped::new(DropReason::Denied).into()),
        b"fail" => Err("the handler broke".into()),
        _ => Ok("answer"),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn each_datagram_gets_a_span_with_peer_local_and_length_and_no_payload() {
    let _serial = SERIAL.lock().await;
    let recorder = Recorder::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(recorder.clone()));

    let mut service = tower::ServiceBuilder::new()
        .layer(TraceLayer::new())
        .service_fn(|packet: Packet| serve(packet.0));
    for payload in [&b"secret-question"[..], b"drop", b"fail"] {
        let _ = service.ready().await.unwrap().call(Packet(payload)).await;
    }

    let spans = recorder.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 3);
    assert_eq!(
        spans[0],
        "datagram peer=192.0.2.7:5353 local=192.0.2.1:53 len=15"
    );
    let events = recorder.events.lock().unwrap().clone();
    let messages: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| (e.message.as_str(), e.span.as_deref()))
        .collect();
    assert_eq!(
        messages,
        [
            ("handling", Some("datagram")),
            ("reply", Some("datagram")),
            ("handling", Some("datagram")),
            ("dropped", Some("datagram")),
            ("handling", Some("datagram")),
            ("failed", Some("datagram")),
        ],
        "the handler's own events are inside the span"
    );
    assert!(events[1].fields.contains("latency_us="), "{:?}", events[1]);
    assert!(
        events[3].fields.contains("reason=\"denied\""),
        "{:?}",
        events[3]
    );
    assert!(
        events[5].fields.contains("the handler broke"),
        "{:?}",
        events[5]
    );
    let everything = format!("{spans:?}{events:?}");
    assert!(!everything.contains("secret"), "payloads are never logged");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn hooks_can_be_closures() {
    let _serial = SERIAL.lock().await;
    let replies = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(0));
    let mut service = tower::ServiceBuilder::new()
        .layer(
            TraceLayer::new()
                .make_span_with(|_: &Packet| tracing::info_span!("custom"))
                .on_request(|packet: &Packet, _: &Span| assert!(packet.payload_len() > 0))
                .on_reply({
                    let replies = replies.clone();
                    move |response: &&'static str, latency: Duration, _: &Span| {
                        replies.lock().unwrap().push((*response, latency));
                    }
                })
                .on_failure({
                    let failures = failures.clone();
                    move |_: &BoxError, _: Duration, _: &Span| *failures.lock().unwrap() += 1
                }),
        )
        .service_fn(|packet: Packet| async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            serve(packet.0).await
        });
    service
        .ready()
        .await
        .unwrap()
        .call(Packet(b"q"))
        .await
        .unwrap();
    service
        .ready()
        .await
        .unwrap()
        .call(Packet(b"fail"))
        .await
        .unwrap_err();
    assert_eq!(
        replies.lock().unwrap().as_slice(),
        [("answer", Duration::from_millis(30))]
    );
    assert_eq!(*failures.lock().unwrap(), 1);
}

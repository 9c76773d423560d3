//! The server's metrics, scraped from the Prometheus exporter the examples
//! install. The exporter is process-wide, so this binary holds one test.

use std::time::Duration;

use abyss::Server;
use abyss_tests::{PATIENCE, ask, client, echo, settled};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scrape, or the error that stopped it (the exporter's listener starts
/// in the background and may not be up yet).
async fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_gauge_and_histogram_are_scraped_from_prometheus() {
    let exporter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = exporter.local_addr().unwrap();
    drop(exporter);
    abyss_examples::install_prometheus(metrics_addr).unwrap();

    let handle = Server::bind("127.0.0.1:0")
        .listeners(1)
        .max_packet_size(100)
        .serve(echo())
        .await
        .unwrap();
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
    let stats =
        abyss_tests::wait_for_stats(&handle, "the oversized one", |s| s.dropped.too_large == 1)
            .await;
    settled(&handle).await;
    assert_eq!(stats.received, 4);

    // The exporter's listener starts in the background: retry until it is up.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let text = loop {
        match scrape(metrics_addr).await {
            Ok(text) if text.contains("abyss_datagrams_received_total") => break text,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the exporter never served the metrics: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for line in [
        "abyss_datagrams_received_total 4",
        "abyss_datagrams_total{outcome=\"replied\"} 3",
        "abyss_datagrams_total{outcome=\"too_large\"} 1",
        "abyss_in_flight 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    assert!(
        text.contains("abyss_handling_seconds"),
        "no histogram in:\n{text}"
    );
    handle.shutdown().await;
}

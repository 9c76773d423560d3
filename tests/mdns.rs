//! The mDNS listener example against a real sender (dig to 224.0.0.251),
//! inside a network namespace whose loopback carries multicast.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc;

use abyss::Server;
use abyss::transport::{MulticastV4, UdpOptions};
use abyss_tests::{Netns, PATIENCE};

#[test]
fn a_query_sent_by_dig_to_the_mdns_group_is_printed() {
    let Some(netns) = Netns::new("mdns") else {
        return;
    };
    if std::process::Command::new("dig")
        .arg("-v")
        .output()
        .is_err()
    {
        eprintln!("skipped: dig is not installed (apt-get install dnsutils)");
        return;
    }
    netns.run(&["ip", "link", "set", "lo", "multicast", "on"]);
    netns.run(&["ip", "route", "add", "224.0.0.0/4", "dev", "lo"]);

    let (lines, printed) = mpsc::channel::<String>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, is_ready) = mpsc::channel::<()>();
    let listener = netns.spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let sink = move |line: String| {
                let _ = lines.send(line);
            };
            let handle = Server::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 5353)))
                .listeners(1)
                .udp_options(
                    UdpOptions::new()
                        .reuse_address(true)
                        .join_multicast_v4(MulticastV4::new(
                            Ipv4Addr::new(224, 0, 0, 251),
                            Ipv4Addr::LOCALHOST,
                        ))
                        .multicast_loop_v4(true),
                )
                .serve(abyss_examples::mdns::service(sink))
                .await
                .expect("serve mDNS in the namespace");
            ready.send(()).unwrap();
            let _ = stopped.await;
            handle.shutdown().await;
        });
    });
    is_ready
        .recv_timeout(PATIENCE)
        .expect("the listener started");

    // dig asks the group and waits for an answer no one gives; that is fine.
    let _ = netns
        .command(&[
            "dig",
            "@224.0.0.251",
            "-p",
            "5353",
            "printer.local",
            "A",
            "+time=1",
            "+tries=1",
        ])
        .output()
        .expect("run dig");
    let line = printed
        .recv_timeout(PATIENCE)
        .expect("a line for dig's query");
    assert!(line.starts_with("mdns query from "), "{line}");
    assert!(line.ends_with(": printer.local. A"), "{line}");
    stop.send(()).unwrap();
    listener.join().unwrap();
}

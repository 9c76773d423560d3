//! The mDNS listener example against a real sender (dig to 224.0.0.251),
//! inside a network namespace whose loopback carries multicast.

use std::net::{Ipv4Addr, SocketAddr};

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

    let listener = netns.serve_printing(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 5353)),
        UdpOptions::new()
            .reuse_address(true)
            .join_multicast_v4(MulticastV4::new(
                Ipv4Addr::new(224, 0, 0, 251),
                Ipv4Addr::LOCALHOST,
            ))
            .multicast_loop_v4(true),
        "mdns",
        abyss_examples::mdns::describe,
    );

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
    let line = listener
        .lines
        .recv_timeout(PATIENCE)
        .expect("a line for dig's query");
    assert!(line.starts_with("mdns query from "), "{line}");
    assert!(line.ends_with(": printer.local. A"), "{line}");
    drop(listener);
}

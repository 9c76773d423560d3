//! The DHCP listener example against a real client (busybox udhcpc) in a
//! second network namespace, joined to the listener's by a veth pair.

use std::net::{Ipv4Addr, SocketAddr};

use abyss::transport::UdpOptions;
use abyss_tests::{Netns, PATIENCE, veth};

#[test]
fn a_discover_from_udhcpc_is_printed_with_its_mac_and_requests() {
    if std::process::Command::new("busybox")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipped: busybox is not installed (apt-get install busybox)");
        return;
    }
    let (Some(server_ns), Some(client_ns)) = (Netns::new("dhcps"), Netns::new("dhcpc")) else {
        return;
    };
    let tag = std::process::id() % 100_000;
    let (server_if, client_if) = (format!("abs{tag}"), format!("abc{tag}"));
    veth(&server_ns, &server_if, &client_ns, &client_if);
    // The listener's side has an address (from TEST-NET-1); the client has none.
    server_ns.run(&["ip", "addr", "add", "192.0.2.1/24", "dev", &server_if]);
    client_ns.run(&[
        "ip",
        "link",
        "set",
        &client_if,
        "address",
        "02:ab:55:00:00:01",
    ]);

    let listener = server_ns.serve_printing(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67)),
        UdpOptions::new().broadcast(true).reuse_address(true),
        "dhcp",
        abyss_examples::dhcp::describe,
    );

    // One discover, no lease to wait for: udhcpc gives up after 1 s.
    let _ = client_ns
        .command(&[
            "busybox",
            "udhcpc",
            "-i",
            &client_if,
            "-n",
            "-q",
            "-t",
            "1",
            "-T",
            "1",
            "-s",
            "/bin/true",
        ])
        .output()
        .expect("run udhcpc");
    let line = listener
        .lines
        .recv_timeout(PATIENCE)
        .expect("a line for the discover");
    assert!(
        line.starts_with("dhcp Discover from 0.0.0.0:68 mac 02:ab:55:00:00:01 xid 0x"),
        "{line}"
    );
    assert!(
        line.contains("SubnetMask"),
        "udhcpc asks for the subnet mask: {line}"
    );
    drop(listener);
}

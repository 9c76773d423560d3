//! Which addresses a server answers, and from which address.

use std::net::{IpAddr, SocketAddr};

use crate::transport::{RecvMeta, is_unicast};

/// Whether a reply may be sent to `peer`: never to port 0, an unspecified,
/// broadcast or multicast address (a spoofed source there turns the server
/// into an amplifier).
pub(crate) fn answerable(peer: SocketAddr) -> bool {
    peer.port() != 0 && is_unicast(peer.ip())
}

/// The address a reply to the datagram described by `meta` is sent from:
/// the local address the transport reports (for a datagram sent to a
/// broadcast address, the receiving interface's own), else the destination,
/// if either names one host; else the system's choice.
pub(crate) fn reply_source(meta: &RecvMeta) -> Option<IpAddr> {
    meta.local_ip.or(meta.dst_ip).filter(|ip| is_unicast(*ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_refused_to_sources_that_cannot_be_answered() {
        let cases = [
            ("127.0.0.1:53", true),
            ("[::1]:53", true),
            ("127.0.0.1:0", false),
            ("0.0.0.0:68", false),
            ("255.255.255.255:68", false),
            ("224.0.0.251:5353", false),
            ("[::]:53", false),
            ("[ff02::fb]:5353", false),
            ("[::ffff:255.255.255.255]:53", false),
            ("[::ffff:192.0.2.1]:53", true),
        ];
        for (addr, expected) in cases {
            assert_eq!(answerable(addr.parse().unwrap()), expected, "{addr}");
        }
    }

    fn meta(dst: &str, local: Option<&str>) -> RecvMeta {
        let mut meta = RecvMeta::new("192.0.2.7:5000".parse().unwrap(), 4);
        meta.dst_ip = Some(dst.parse().unwrap());
        meta.local_ip = local.map(|l| l.parse().unwrap());
        meta
    }

    #[test]
    fn a_reply_to_a_broadcast_comes_from_the_interfaces_own_address() {
        let to_subnet_broadcast = meta("10.0.0.255", Some("10.0.0.1"));
        assert!(to_subnet_broadcast.is_group_addressed());
        assert_eq!(
            reply_source(&to_subnet_broadcast),
            Some("10.0.0.1".parse().unwrap())
        );
        let to_host = meta("10.0.0.1", Some("10.0.0.1"));
        assert!(!to_host.is_group_addressed());
        assert_eq!(reply_source(&to_host), Some("10.0.0.1".parse().unwrap()));
        // A transport that reports only the destination.
        let unknown = meta("10.0.0.255", None);
        assert_eq!(reply_source(&unknown), Some("10.0.0.255".parse().unwrap()));
        let limited = meta("255.255.255.255", None);
        assert!(limited.is_group_addressed());
        assert_eq!(reply_source(&limited), None);
        let multicast = meta("ff02::fb", None);
        assert_eq!(reply_source(&multicast), None);
    }
}

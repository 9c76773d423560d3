//! Two Abyss hosts behind a Linux L4 balancer, in network namespaces: a
//! client's datagrams keep reaching the host that holds its session.
//!
//! ```text
//!   client 10.232.1.2 --- 10.232.1.1  lb  10.232.2.1 --- 10.232.2.2 host1
//!                         VIP 10.232.0.100  10.232.3.1 --- 10.232.3.2 host2
//! ```
//!
//! The balancer is IPVS (`ipvsadm`, masquerade mode, round robin) where
//! the kernel has it, else nftables (`nft`: DNAT to `numgen inc mod 2`);
//! either keeps one entry per UDP flow, so a client socket stays on the
//! host its first datagram went to. Needs root, iproute2 and one of the
//! two tools; skips, saying so, otherwise.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use abyss::session::{SessionStats, Sessions, Step};
use abyss::{Request, Server, Stats};
use abyss_tests::{Netns, PATIENCE, assert_accounted, veth};

/// The balancer's virtual address, on its loopback device.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 100);
/// The port of the virtual service and of both hosts' servers.
const PORT: u16 = 4000;
/// The client's address on its link to the balancer.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 232, 1, 2);
/// Client sockets: each is a peer of its own, a flow of its own.
const SOCKETS: usize = 16;
/// Datagrams each client socket sends, one in flight at a time.
const EACH: u64 = 20;

/// Counts one peer's datagrams and answers "<host> <count>".
struct Tally {
    host: &'static str,
    count: u64,
}

impl abyss::session::Session for Tally {
    async fn handle(&mut self, _request: Request) -> Step {
        self.count += 1;
        Step::keep().reply(format!("{} {}", self.host, self.count))
    }
}

/// The four namespaces, joined by veth pairs with MTU 1500.
struct Topology {
    client: Netns,
    lb: Netns,
    hosts: [(&'static str, Netns, Ipv4Addr); 2],
}

impl Topology {
    /// Builds the namespaces, links, addresses and routes, or `None` (said
    /// on stderr) where namespaces cannot be made.
    fn new() -> Option<Self> {
        let client = Netns::new("lbc")?;
        let lb = Netns::new("lb")?;
        let host1 = Netns::new("lbh1")?;
        let host2 = Netns::new("lbh2")?;
        let tag = std::process::id() % 100_000;
        let link = |a: &Netns, a_if: &str, a_ip: &str, b: &Netns, b_if: &str, b_ip: &str| {
            veth(a, a_if, b, b_if);
            for (netns, name, address) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
                netns.run(&["ip", "link", "set", "dev", name, "mtu", "1500"]);
                netns.run(&["ip", "addr", "add", address, "dev", name]);
            }
        };
        let client_ip = format!("{CLIENT_IP}/24");
        link(
            &client,
            &format!("bc{tag}"),
            &client_ip,
            &lb,
            &format!("bl0{tag}"),
            "10.232.1.1/24",
        );
        link(
            &lb,
            &format!("bl1{tag}"),
            "10.232.2.1/24",
            &host1,
            &format!("bh1{tag}"),
            "10.232.2.2/24",
        );
        link(
            &lb,
            &format!("bl2{tag}"),
            "10.232.3.1/24",
            &host2,
            &format!("bh2{tag}"),
            "10.232.3.2/24",
        );
        client.run(&["ip", "route", "add", "default", "via", "10.232.1.1"]);
        // Replies go back through the balancer, which undoes its NAT.
        host1.run(&["ip", "route", "add", "default", "via", "10.232.2.1"]);
        host2.run(&["ip", "route", "add", "default", "via", "10.232.3.1"]);
        lb.run(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
        // A thread inside the namespace sees its own /proc/sys/net.
        lb.spawn(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
            .join()
            .expect("a thread in the balancer's namespace")
            .expect("turn on IP forwarding in the balancer");
        Some(Self {
            client,
            lb,
            hosts: [
                ("host1", host1, Ipv4Addr::new(10, 232, 2, 2)),
                ("host2", host2, Ipv4Addr::new(10, 232, 3, 2)),
            ],
        })
    }

    /// Schedules `VIP:PORT` over both hosts, with IPVS if it works here,
    /// else nftables. Returns what it used, or `None` (said on stderr)
    /// when neither can.
    fn balance(&self) -> Option<String> {
        let vip = format!("{VIP}:{PORT}");
        let mut why_not_ipvs = "`ipvsadm` is not installed (Debian package ipvsadm)".to_owned();
        if installed("ipvsadm") {
            // Round robin over new UDP flows, masquerade (NAT) mode. No
            // persistence (`-p`): it keys by client address alone and all
            // the client sockets share one; IPVS's connection entries (one
            // per flow, 300 s for UDP by default) keep each socket on its
            // host.
            let added = self
                .lb
                .command(&["ipvsadm", "-A", "-u", &vip, "-s", "rr"])
                .output()
                .expect("run ipvsadm");
            if added.status.success() {
                for (_, _, ip) in &self.hosts {
                    let real = format!("{ip}:{PORT}");
                    self.lb
                        .run(&["ipvsadm", "-a", "-u", &vip, "-r", &real, "-m"]);
                }
                return Some("IPVS (ipvsadm -s rr -m)".to_owned());
            }
            why_not_ipvs = format!(
                "IPVS does not work here ({})",
                String::from_utf8_lossy(&added.stderr)
                    .trim()
                    .replace('\n', " ")
            );
        }
        if !installed("nft") {
            eprintln!(
                "skipped: {why_not_ipvs}, and `nft` is not installed either (Debian package nftables)"
            );
            return None;
        }
        // A NAT rule is evaluated only for the first packet of a conntrack
        // flow; later datagrams of the flow follow the entry (30 s while
        // unanswered, 120 s once answered), so each socket keeps its host.
        let [(_, _, ip1), (_, _, ip2)] = &self.hosts;
        let ruleset = format!(
            "table ip abyss_lb {{
                chain prerouting {{
                    type nat hook prerouting priority dstnat; policy accept;
                    ip daddr {VIP} udp dport {PORT} dnat to numgen inc mod 2 map {{ 0 : {ip1}, 1 : {ip2} }}
                }}
            }}"
        );
        let ruleset_file =
            std::env::temp_dir().join(format!("abyss-lb-{}.nft", std::process::id()));
        std::fs::write(&ruleset_file, ruleset).expect("write the nftables ruleset");
        let loaded = self
            .lb
            .command(&["nft", "-f", ruleset_file.to_str().expect("a UTF-8 path")])
            .output()
            .expect("run nft");
        let _ = std::fs::remove_file(&ruleset_file);
        assert!(
            loaded.status.success(),
            "nft -f failed: {}",
            String::from_utf8_lossy(&loaded.stderr)
        );
        eprintln!("{why_not_ipvs}: balancing with nftables");
        Some("nftables (dnat to numgen inc mod 2)".to_owned())
    }
}

/// Whether `program` is on the PATH (or in /usr/sbin, where root's tools are).
fn installed(program: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(program).is_file())
}

/// An Abyss server with a `Tally` session per peer, serving on a thread
/// inside a host's namespace with a runtime of its own.
struct Host {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    report: mpsc::Receiver<(Stats, SessionStats)>,
    thread: Option<JoinHandle<()>>,
}

impl Host {
    /// Serves on `ip:PORT` in `netns`; returns once it is bound.
    fn start(name: &'static str, netns: &Netns, ip: Ipv4Addr) -> Self {
        let (ready, started) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (send_report, report) = mpsc::channel();
        let thread = netns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the host");
            runtime.block_on(async move {
                let sessions = Sessions::builder(move |_peer| Tally {
                    host: name,
                    count: 0,
                })
                .name(name)
                .build()
                .expect("sessions");
                let handle = Server::bind(SocketAddr::from((ip, PORT)))
                    .name(name)
                    .on_shutdown({
                        let sessions = sessions.clone();
                        move || sessions.shutdown()
                    })
                    .serve(sessions.service())
                    .await
                    .expect("serve in the host's namespace");
                let _ = ready.send(());
                let _ = stopped.await;
                let before = sessions.stats();
                tokio::time::timeout(PATIENCE, handle.shutdown())
                    .await
                    .expect("the host shuts down within PATIENCE");
                let _ = send_report.send((handle.stats(), before));
            });
        });
        if started.recv_timeout(PATIENCE).is_err() {
            // It ended (with the reason it panicked) or hangs.
            match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => panic!("{name} did not start"),
            }
        }
        Self {
            stop: Some(stop),
            report,
            thread: Some(thread),
        }
    }

    /// Shuts the server down; its counters and its sessions' counters
    /// (taken just before shutting down).
    fn stop(mut self) -> (Stats, SessionStats) {
        let _ = self.stop.take().expect("stopped once").send(());
        let thread = self.thread.take().expect("stopped once");
        match self.report.recv_timeout(PATIENCE + PATIENCE / 2) {
            Ok(report) => {
                // Bounded: it has sent its report and only ends now.
                if let Err(panic) = thread.join() {
                    std::panic::resume_unwind(panic);
                }
                report
            }
            Err(error) => match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => panic!("no report from a host: {error}"),
            },
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends `count` datagrams from `socket` to the virtual service, one in
/// flight at a time, and returns the replies; fails the test when one does
/// not come within [`PATIENCE`] or comes from elsewhere.
fn exchange(socket: &UdpSocket, count: u64) -> Vec<String> {
    let vip = SocketAddr::from((VIP, PORT));
    let mut buf = [0u8; 64];
    (0..count)
        .map(|_| {
            socket.send_to(b"count me", vip).expect("send_to the VIP");
            let (n, from) = socket.recv_from(&mut buf).unwrap_or_else(|error| {
                panic!(
                    "no reply on {:?} within {PATIENCE:?}: {error}",
                    socket.local_addr()
                )
            });
            assert_eq!(from, vip, "the balancer answers from the virtual address");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .collect()
}

/// Runs `exchange(socket, count)` on every socket at once.
fn exchange_all(sockets: &[UdpSocket], count: u64) -> Vec<Vec<String>> {
    std::thread::scope(|scope| {
        let workers: Vec<_> = sockets
            .iter()
            .map(|socket| scope.spawn(move || exchange(socket, count)))
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
            .collect()
    })
}

/// The host named in each reply, if all of them name the same one, and
/// the counts the replies carry.
fn host_and_counts(replies: &[String]) -> (Option<String>, Vec<u64>) {
    let mut host = None;
    let mut counts = Vec::new();
    for reply in replies {
        let (name, count) = reply.split_once(' ').expect("\"<host> <count>\"");
        match &host {
            None => host = Some(name.to_owned()),
            Some(first) if first != name => return (None, counts),
            Some(_) => {}
        }
        counts.push(count.parse().expect("a count"));
    }
    (host, counts)
}

#[test]
fn a_clients_datagrams_keep_reaching_the_host_that_holds_its_session() {
    let Some(net) = Topology::new() else {
        return;
    };
    let Some(balancer) = net.balance() else {
        return;
    };
    let [(name1, netns1, ip1), (name2, netns2, ip2)] = &net.hosts;
    let host1 = Host::start(name1, netns1, *ip1);
    let host2 = Host::start(name2, netns2, *ip2);

    // The client's sockets live in its namespace; used from here, they
    // send from there.
    let sockets: Vec<UdpSocket> = net
        .client
        .spawn(|| {
            (0..SOCKETS)
                .map(|_| {
                    let socket = UdpSocket::bind((CLIENT_IP, 0)).expect("bind a client socket");
                    socket
                        .set_read_timeout(Some(PATIENCE))
                        .expect("a read timeout");
                    socket
                })
                .collect()
        })
        .join()
        .expect("client sockets");

    let began = Instant::now();
    let replies = exchange_all(&sockets, EACH);
    let took = began.elapsed();

    // Every socket's datagrams went to one host, which counted them 1, 2,
    // 3, ...: its session lived there the whole time.
    let expected: Vec<u64> = (1..=EACH).collect();
    let mut placed = Vec::new();
    for (socket, replies) in sockets.iter().zip(&replies) {
        let (host, counts) = host_and_counts(replies);
        let host = host.unwrap_or_else(|| {
            panic!(
                "{:?} was answered by both hosts: {replies:?}",
                socket.local_addr()
            )
        });
        assert_eq!(
            counts,
            expected,
            "{:?} on {host}: its session's counts",
            socket.local_addr()
        );
        placed.push(host);
    }
    let on = |name: &str| placed.iter().filter(|host| *host == name).count();
    let (sockets1, sockets2) = (on(name1), on(name2));
    assert_eq!(sockets1 + sockets2, SOCKETS, "hosts named: {placed:?}");
    // Round robin over flows: half each; at least a quarter each is spread.
    assert!(
        sockets1 >= SOCKETS / 4 && sockets2 >= SOCKETS / 4,
        "the balancer spread {SOCKETS} sockets as {sockets1} + {sockets2}"
    );

    // A host's sessions are its own: restarted, host1 has forgotten its
    // peers, and their next datagram starts a fresh session there, while
    // host2's peers go on.
    let (stats1, sessions1) = host1.stop();
    let host1 = Host::start(name1, netns1, *ip1);
    let after = exchange_all(&sockets, 1);
    for (host, reply) in placed.iter().zip(&after) {
        let expected = if host == name1 {
            format!("{name1} 1")
        } else {
            format!("{name2} {}", EACH + 1)
        };
        assert_eq!(
            reply[0], expected,
            "after host1's restart, a peer of {host}"
        );
    }
    let (restarted1, _) = host1.stop();
    let (stats2, sessions2) = host2.stop();

    // Each server received exactly what its sockets sent, answered all of
    // it, and made one session per socket.
    let each = EACH as usize;
    for (name, stats, sessions, sockets, extra) in [
        (name1, &stats1, &sessions1, sockets1, 0),
        (name2, &stats2, &sessions2, sockets2, sockets2),
    ] {
        let datagrams = (sockets * each + extra) as u64;
        assert_eq!(stats.received, datagrams, "{name}: {stats:?}");
        assert_eq!(stats.replied, datagrams, "{name}: {stats:?}");
        assert_eq!(sessions.created, sockets as u64, "{name}: {sessions:?}");
        assert_accounted(stats);
    }
    assert_eq!(restarted1.replied, sockets1 as u64, "{restarted1:?}");

    println!(
        "reliability: balancer | {SOCKETS} client sockets x {EACH} datagrams, one in flight each, in {took:?} | {balancer} over 2 hosts, MTU 1500 veths | {name1}: sockets={sockets1} datagrams={} sessions={}; {name2}: sockets={sockets2} datagrams={} sessions={} | every socket stayed on one host, counts 1..{EACH} | {name1} restarted: its {sockets1} peers started afresh at 1, {name2}'s went on at {}",
        stats1.replied,
        sessions1.created,
        stats2.replied - sockets2 as u64,
        sessions2.created,
        EACH + 1,
    );
}

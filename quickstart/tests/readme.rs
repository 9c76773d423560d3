//! The README's first example is this crate's program, it depends on abyss
//! and tokio alone, and it serves, answers and stops as the README says.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

const README: &str = include_str!("../../README.md");

/// The body of the first fenced block in the README whose info string
/// starts with `lang`.
fn first_block(lang: &str) -> String {
    let start = README
        .find(&format!("```{lang}"))
        .unwrap_or_else(|| panic!("no {lang} block in the README"));
    let body = &README[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_owned()
}

#[test]
fn the_readmes_first_example_is_this_program() {
    assert_eq!(
        first_block("rust"),
        include_str!("../src/main.rs"),
        "README.md's first Rust block and quickstart/src/main.rs differ"
    );
}

#[test]
fn the_program_needs_only_abyss_and_tokio_as_the_readme_says() {
    let manifest = include_str!("../Cargo.toml");
    let dependencies = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    let names = |section: &str| -> Vec<String> {
        section
            .lines()
            .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim().to_owned()))
            .collect()
    };
    assert_eq!(names(dependencies), ["abyss", "tokio"]);
    let readme = first_block("toml");
    assert_eq!(
        names(readme.trim_start_matches("[dependencies]")),
        ["abyss", "tokio"]
    );
    let features = |section: &str| {
        section
            .lines()
            .find(|line| line.starts_with("tokio"))
            .and_then(|line| line.split_once("features"))
            .map(|(_, features)| features.trim().to_owned())
    };
    assert_eq!(
        features(dependencies),
        features(&readme),
        "tokio's features"
    );
}

#[test]
fn the_program_answers_and_stops_gracefully_on_sigint() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the quickstart program");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first line").unwrap();
    let addr: SocketAddr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .parse()
        .unwrap();

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.send_to(b"hello", addr).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = client.recv_from(&mut buf).expect("an answer within 10 s");
    assert_eq!((&buf[..n], from), (&b"hello"[..], addr));

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let last = lines.next().expect("a last line").unwrap();
    assert_eq!(last, "drained 0, aborted 0");
    assert!(child.wait().unwrap().success());
}

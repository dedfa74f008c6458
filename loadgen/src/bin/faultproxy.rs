//! `faultproxy LISTEN_PORT UPSTREAM_PORT CONTROL_PORT`: a pausable TCP proxy on loopback for
//! fault campaigns (`scripts/chaos.sh`): forwards `127.0.0.1:LISTEN_PORT` to
//! `127.0.0.1:UPSTREAM_PORT`; a line `partition` or `heal` sent to `127.0.0.1:CONTROL_PORT`
//! cuts every connection and swallows new ones, or forwards again (answered `ok`). Stopped by
//! a signal; the same proxy as the tests' (`tests/common/proxy.rs`).

#[path = "../../../tests/common/proxy.rs"]
mod proxy;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

fn main() {
    let ports: Vec<u16> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("ports are numbers"))
        .collect();
    let [listen, upstream, control] = ports[..] else {
        eprintln!("usage: faultproxy LISTEN_PORT UPSTREAM_PORT CONTROL_PORT");
        std::process::exit(2);
    };
    let p = proxy::Proxy::start_on(listen, upstream);
    let ctl = TcpListener::bind(("127.0.0.1", control)).expect("control port");
    for c in ctl.incoming().flatten() {
        let mut line = String::new();
        let mut w = c.try_clone().expect("clone");
        if BufReader::new(c).read_line(&mut line).is_err() {
            continue;
        }
        let answer = match line.trim() {
            "partition" => {
                p.partition();
                "ok"
            }
            "heal" => {
                p.heal();
                "ok"
            }
            _ => "unknown command (partition, heal)",
        };
        let _ = writeln!(w, "{answer}");
    }
}

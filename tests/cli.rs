//! The `wsengine` command as a newcomer runs it: `serve` on a free port, a signal drains the
//! connections with 4300 (clients reconnect) and the process exits cleanly; bad arguments exit 2.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wsengine::client::Client;

/// A running `wsengine serve`, killed if a test fails before it exits.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(extra_env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wsengine"));
        command.args(["serve", "--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).stderr(Stdio::null());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let mut server = Server { child: command.spawn().expect("wsengine starts"), url: String::new() };
        let mut stdout = BufReader::new(server.child.stdout.take().unwrap()).lines();
        // "wsengine listening on ws://127.0.0.1:PORT/wse (HTTP API on http://…)", after any logs.
        server.url = stdout
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| line.split_whitespace().find(|w| w.starts_with("ws://")).map(str::to_owned))
            .expect("the ws:// address");
        // Keep reading, so the server never blocks on a full pipe.
        std::thread::spawn(move || stdout.for_each(drop));
        server
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
        assert!(status.expect("kill runs").success());
    }

    /// The exit status, waiting at most `limit`.
    fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_drains_connections_with_4300_and_exits() {
    let mut server = Server::start(&[]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = Client::connect(&server.url).await.expect("connects");
        client.subscribe(&["news"]).await.unwrap();
        clients.push(client);
    }
    server.signal("TERM");
    for client in &mut clients {
        let error = tokio::time::timeout(Duration::from_secs(5), client.recv())
            .await
            .expect("closed promptly")
            .expect_err("the drain closes the connection");
        assert_eq!(error.close_code(), Some(4300), "{error}");
    }
    drop(clients);
    let status = server.exit_within(Duration::from_secs(10)).expect("exits once its connections are gone");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_second_signal_stops_a_drain_that_waits_on_a_client() {
    // A raw socket that never answers the close keeps the drain waiting for its 60 s timeout.
    let mut server = Server::start(&[("WSENGINE_DRAIN_TIMEOUT", "60s")]);
    let address = server.url.trim_start_matches("ws://").split('/').next().unwrap().to_owned();
    let mut stuck = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!(
        "GET /wse HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut stuck, request.as_bytes()).await.unwrap();
    let mut response = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut stuck, &mut response).await.unwrap();
    assert_eq!(&response, b"HTTP/1.1 101");

    server.signal("TERM");
    assert!(server.exit_within(Duration::from_millis(500)).is_none(), "the drain waits for the stuck client");
    server.signal("INT");
    let status = server.exit_within(Duration::from_secs(10)).expect("the second signal stops it");
    assert!(status.success(), "{status}");
}

#[test]
fn bad_arguments_exit_with_2_and_print_config_shows_the_defaults() {
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_wsengine")).args(args).output().unwrap();
    for args in [&["serve", "--nope"][..], &["frobnicate"], &["serve", "--listen", "not-an-address"]] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!output.stderr.is_empty(), "{args:?} explains itself");
    }
    let output = run(&["serve", "--print-config"]);
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("drain_close_code = 4300"), "{printed}");
}

//! A bare WebSocket echo server on hyper 1 + hyper-tungstenite, the baseline for Autobahn
//! conformance and performance comparisons.
//!
//! Run it with `cargo run --example echo -- 127.0.0.1:9001` (the default address; port `0` picks a
//! free port). It upgrades every request, echoes every text and binary message, and prints
//! `listening on ADDR` with the bound address once it accepts connections.

use std::io::Write as _;

use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_tungstenite::tungstenite::Message;
use hyper_tungstenite::tungstenite::protocol::WebSocketConfig;
use hyper_tungstenite::{HyperWebsocket, tungstenite};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Large enough for every Autobahn case in groups 1-10 (group 9 sends up to 16 MiB messages).
const MAX_SIZE: usize = 64 << 20;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), hyper::service::service_fn(upgrade)).with_upgrades();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("http connection error: {e}");
            }
        });
    }
}

/// Upgrades any request to a WebSocket and spawns the echo task; answers 400 if it is no valid
/// WebSocket handshake.
async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Error> {
    let config = WebSocketConfig::default().max_message_size(Some(MAX_SIZE)).max_frame_size(Some(MAX_SIZE));
    match hyper_tungstenite::upgrade(&mut req, Some(config)) {
        Ok((response, websocket)) => {
            tokio::spawn(async move {
                if let Err(e) = echo(websocket).await {
                    eprintln!("websocket error: {e}");
                }
            });
            Ok(response)
        }
        Err(e) => {
            let mut response = Response::new(Full::from(e.to_string()));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            Ok(response)
        }
    }
}

/// Echoes text and binary messages until the connection closes.
///
/// Pings are answered and a received close is acknowledged by tungstenite itself while the stream
/// is polled; the stream ends once the closing handshake is complete.
async fn echo(websocket: HyperWebsocket) -> Result<(), tungstenite::Error> {
    let mut ws = websocket.await?;
    while let Some(msg) = ws.next().await {
        match msg? {
            msg @ (Message::Text(_) | Message::Binary(_)) => ws.send(msg).await?,
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
    Ok(())
}

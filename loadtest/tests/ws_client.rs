//! The WebSocket client against a hand-written server over a real socket: handshake check,
//! automatic pong, fragmented messages, masked client frames, close codes, refused upgrades.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use kefu_loadtest::conn::{self, Conn};
use kefu_loadtest::stats::ErrorKind;
use kefu_loadtest::ws::{Incoming, WsClient, accept_for};

fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        buf.push(b[0]);
    }
    String::from_utf8(buf).unwrap()
}

/// Read one masked client frame: (opcode, unmasked payload).
fn read_client_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[1] & 0x80, 0x80, "client frames are masked");
    let len = (h[1] & 0x7F) as usize;
    assert!(len < 126, "test frames are short");
    let mut mask = [0u8; 4];
    s.read_exact(&mut mask).unwrap();
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    for (i, b) in p.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    (h[0] & 0x0F, p)
}

fn server(accept: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let head = read_head(&mut s);
        assert!(
            head.starts_with("GET /v1/ws?token=t HTTP/1.1\r\n"),
            "{head}"
        );
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap()
            .trim()
            .to_string();
        if !accept {
            s.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            return;
        }
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_for(&key)
        );
        s.write_all(answer.as_bytes()).unwrap();
        // A ping, then "hello" in two fragments, in one write so the client parses across them.
        s.write_all(&[
            0x89, 2, b'h', b'i', 0x01, 3, b'h', b'e', b'l', 0x80, 2, b'l', b'o',
        ])
        .unwrap();
        assert_eq!(
            read_client_frame(&mut s),
            (0xA, b"hi".to_vec()),
            "pong echoes the ping"
        );
        assert_eq!(read_client_frame(&mut s), (0x1, b"ok".to_vec()));
        // Close with 1001 (going away).
        s.write_all(&[0x88, 2, 0x03, 0xE9]).unwrap();
    });
    addr
}

#[test]
fn handshake_pong_fragments_and_close() {
    let addr = server(true);
    let mut rt = conn::runtime(256).unwrap();
    rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        let c = Conn::connect(addr, None, 16 * 1024, deadline)
            .await
            .unwrap();
        let mut ws = WsClient::handshake(c, &addr.to_string(), "/v1/ws?token=t", 1, 1024, deadline)
            .await
            .unwrap();
        assert_eq!(ws.read(deadline).await, Ok(Incoming::Message));
        assert_eq!(ws.message, b"hello");
        ws.send_text("ok", deadline).await.unwrap();
        assert_eq!(ws.read(deadline).await, Err(ErrorKind::Closed));
        assert_eq!(ws.close_code, Some(1001));
    });
}

#[test]
fn refused_upgrade_is_a_status_error() {
    let addr = server(false);
    let mut rt = conn::runtime(256).unwrap();
    rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        let c = Conn::connect(addr, None, 16 * 1024, deadline)
            .await
            .unwrap();
        let r =
            WsClient::handshake(c, &addr.to_string(), "/v1/ws?token=t", 1, 1024, deadline).await;
        assert!(matches!(r, Err(ErrorKind::Status4xx)));
    });
}

#[test]
fn connect_from_another_loopback_source() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut rt = conn::runtime(256).unwrap();
    let local = rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        let src = "127.0.0.7".parse().unwrap();
        let c = Conn::connect(addr, Some(src), 4096 + 16 * 1024, deadline)
            .await
            .unwrap();
        c.local_addr().unwrap()
    });
    assert_eq!(local.ip().to_string(), "127.0.0.7");
    let (_, peer) = l.accept().unwrap();
    assert_eq!(peer, local);
}

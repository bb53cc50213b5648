//! Device-side services for tests: echo, digest and seeded sources.

use super::*;

/// An echo service on 127.0.0.1:0; returns its port.
pub async fn echo_server() -> u16 {
    echo_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// [`echo_server`] on `listener` (e.g. one in the rig's device namespace).
pub fn echo_on(listener: tokio::net::TcpListener) -> u16 {
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// A service that reads until EOF and only then answers `got N bytes, sha256 H`.
pub async fn digest_server() -> u16 {
    digest_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// [`digest_server`] on `listener` (e.g. one in the rig's device namespace).
pub fn digest_on(listener: tokio::net::TcpListener) -> u16 {
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                use sha2::Digest;
                let mut hasher = sha2::Sha256::new();
                let mut n = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            hasher.update(&buf[..k]);
                            n += k as u64;
                        }
                    }
                }
                let answer = format!("got {n} bytes, sha256 {}", hex::encode(hasher.finalize()));
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// A service that sends `len` pseudo-random bytes from `seed`, then closes.
pub async fn source_server(len: usize, seed: u64) -> u16 {
    paced_source(len, seed, None).await
}

/// Like [`source_server`], but with `pause` after each 64 KiB when given, so a transfer
/// is still running when a test acts on it.
pub async fn paced_source(len: usize, seed: u64, pause: Option<Duration>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    paced_source_on(listener, len, seed, pause)
}

/// [`paced_source`] on `listener` (e.g. one in the rig's device namespace).
pub fn paced_source_on(
    listener: tokio::net::TcpListener,
    len: usize,
    seed: u64,
    pause: Option<Duration>,
) -> u16 {
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let data = random_bytes(len, seed);
                let chunk = if pause.is_some() {
                    64 * 1024
                } else {
                    data.len().max(1)
                };
                for piece in data.chunks(chunk) {
                    if s.write_all(piece).await.is_err() {
                        return;
                    }
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for 64 MiB in a debug build.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Writes `data` in 64 KiB pieces `pause` apart, then half-closes.
pub async fn paced_write(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    data: &[u8],
    pause: Duration,
) {
    use tokio::io::AsyncWriteExt;
    for piece in data.chunks(64 * 1024) {
        w.write_all(piece).await.unwrap();
        tokio::time::sleep(pause).await;
    }
    w.shutdown().await.unwrap();
}

/// Writes `msg` and reads it back from an echo service, or says why it could not.
pub async fn try_echo(s: &mut tokio::net::TcpStream, msg: &[u8]) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .map_err(|_| "no echo within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    if back != msg {
        return Err(format!("echoed {back:?}"));
    }
    Ok(())
}

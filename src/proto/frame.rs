//! Frames: a `u32` big-endian length, then that many bytes of UTF-8 JSON.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ProtoError;

/// The default (and protocol) maximum frame size.
pub const MAX_FRAME: usize = 64 * 1024;

/// Encodes a message as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Our message types serialize infallibly (strings, integers, enums).
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Writes one frame.
pub async fn write<W, T>(w: &mut W, msg: &T) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    w.write_all(&encode(msg)).await?;
    Ok(())
}

/// Reads one frame of at most `max` bytes and decodes it; `Ok(None)` on a clean end of
/// stream before any byte of a frame.
pub async fn read<R, T>(r: &mut R, max: usize) -> Result<Option<T>, ProtoError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtoError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtoError::Truncated,
        _ => ProtoError::Io(e),
    })?;
    Ok(Some(serde_json::from_slice(&body)?))
}

/// Like [`read`], but the end of the stream is an error too.
pub async fn read_required<R, T>(r: &mut R, max: usize) -> Result<T, ProtoError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read(r, max).await?.ok_or(ProtoError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::messages::{OpenReply, TunnelOpen};

    #[tokio::test]
    async fn round_trip_and_limits() {
        let open = TunnelOpen {
            port: 22222,
            tunnel: "t".into(),
            user: "u".into(),
            credit: Some(1),
            resume: false,
        };
        let bytes = encode(&open);
        assert_eq!(&bytes[..4], &((bytes.len() - 4) as u32).to_be_bytes());
        let back: TunnelOpen = read_required(&mut &bytes[..], MAX_FRAME).await.unwrap();
        assert_eq!(back, open);

        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        let err = read::<_, TunnelOpen>(&mut &huge[..], MAX_FRAME)
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::FrameTooLarge { .. }));

        let truncated = [0u8, 0, 0, 10, b'{'];
        let err = read::<_, TunnelOpen>(&mut &truncated[..], MAX_FRAME)
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::Truncated));

        let junk = [0u8, 0, 0, 2, b'h', b'i'];
        let err = read::<_, OpenReply>(&mut &junk[..], MAX_FRAME)
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::Malformed(_)));

        let empty: &[u8] = &[];
        assert!(read::<_, OpenReply>(&mut &empty[..], MAX_FRAME)
            .await
            .unwrap()
            .is_none());
    }

    /// A seeded fuzz of the frame decoder: random streams and mutated real frames never
    /// panic, never allocate past the limit, and decode only to well-typed messages.
    #[tokio::test]
    async fn fuzz_frames() {
        use crate::proto::messages::{Hello, RelayControl};
        let seeds = [
            encode(&Hello {
                version: 1,
                uuid: "0123456789abcdef0123456789abcdef".into(),
                key: "k".into(),
                agent: "a".into(),
                ssh_login: None,
                features: Vec::new(),
                keep_alive_ms: None,
            }),
            encode(&RelayControl::Drain { reconnect_ms: 5 }),
            encode(&OpenReply::Opened),
        ];
        let mut rng = crate::proto::fuzz::Rng::new(0x00f4_a3e5);
        for i in 0..crate::proto::fuzz::iterations() {
            let input = if i % 4 == 0 {
                {
                    let len = rng.below(64);
                    rng.bytes(len)
                }
            } else {
                rng.mutate(&seeds[i % seeds.len()])
            };
            let mut r = &input[..];
            match read::<_, RelayControl>(&mut r, 1024).await {
                Ok(_) | Err(ProtoError::Truncated | ProtoError::Malformed(_)) => {}
                Err(ProtoError::FrameTooLarge { len, max }) => assert!(len > max),
                Err(e) => panic!("unexpected error {e} for {input:?}"),
            }
            let mut r = &input[..];
            let _ = read::<_, Hello>(&mut r, 1024).await;
        }
    }
}

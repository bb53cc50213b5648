//! The QUIC link's tunnel streams (PROTOCOL.md §2) as the hot path drives them.

use bytes::Bytes;
use quinn::{ReadError, RecvStream, SendStream};

use super::chunks::{ChunkRecv, ChunkSend, End};

impl ChunkSend for SendStream {
    async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), End> {
        SendStream::write_chunk(self, chunk)
            .await
            .map_err(|e| match e {
                quinn::WriteError::ConnectionLost(e) => End::ConnectionLost(e.to_string()),
                _ => End::LinkReset,
            })
    }

    fn finish(&mut self) {
        // A stream the peer already stopped cannot be finished; that shows up on the other
        // direction, so nothing is lost by ignoring it here.
        let _ = SendStream::finish(self);
    }
}

impl ChunkRecv for RecvStream {
    async fn read_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, End> {
        match RecvStream::read_chunks(self, bufs).await {
            Ok(n) => Ok(n),
            Err(ReadError::ConnectionLost(e)) => Err(End::ConnectionLost(e.to_string())),
            Err(_) => Err(End::LinkReset),
        }
    }
}

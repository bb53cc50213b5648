//! One tunnel stream on the device: read `open`, connect locally, answer, forward.

use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::AgentConfig;
use crate::forward::{self, Counters};
use crate::proto::frame::{self, MAX_FRAME};
use crate::proto::messages::{codes, OpenReply, RefuseCode, TunnelOpen};

/// How long the relay has to send `open`, and the local port to accept.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one stream the relay opened.
pub async fn serve(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    config: Arc<AgentConfig>,
) {
    let open: TunnelOpen = match tokio::time::timeout(
        OPEN_TIMEOUT,
        frame::read_required(&mut recv, MAX_FRAME),
    )
    .await
    {
        Ok(Ok(open)) => open,
        Ok(Err(e)) => {
            tracing::warn!(error = %crate::logsafe::Peer(&e.to_string()), "bad tunnel request from the relay");
            let _ = send.reset(VarInt::from_u32(codes::PROTOCOL));
            return;
        }
        Err(_) => {
            let _ = send.reset(VarInt::from_u32(codes::PROTOCOL));
            return;
        }
    };
    let span = tracing::info_span!(
        "tunnel",
        id = %crate::logsafe::Peer(&open.tunnel),
        user = %crate::logsafe::Peer(&open.user),
        port = open.port
    );
    connect_and_forward(open.port, send, recv, &config)
        .instrument(span)
        .await;
}

async fn connect_and_forward(
    port: u16,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    config: &AgentConfig,
) {
    if !config.allows(port) {
        tracing::info!("refused: port not in the allowlist");
        refuse(
            &mut send,
            RefuseCode::Forbidden,
            "port not allowed on this device",
        )
        .await;
        return;
    }
    let local =
        match tokio::time::timeout(OPEN_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "refused: cannot connect locally");
                refuse(&mut send, RefuseCode::Connect, &e.to_string()).await;
                return;
            }
            Err(_) => {
                refuse(&mut send, RefuseCode::Connect, "local connect timed out").await;
                return;
            }
        };
    let _ = local.set_nodelay(true);
    if frame::write(&mut send, &OpenReply::Opened).await.is_err() {
        return;
    }
    tracing::debug!("tunnel open");
    let counters = Counters::default();
    // A crash of this agent resets the service's connection instead of ending it cleanly.
    forward::arm_reset(&local);
    let (mut r, mut w) = local.into_split();
    let end = forward::join(
        send,
        recv,
        &mut r,
        &mut w,
        &counters,
        &CancellationToken::new(),
        None,
    )
    .await;
    if end.resets_socket() {
        forward::reset_tcp(r, w);
    } else {
        forward::disarm_reset(r.as_ref());
    }
    tracing::debug!(
        reason = %end.reason(),
        up = counters.from_quic.load(std::sync::atomic::Ordering::Relaxed),
        down = counters.to_quic.load(std::sync::atomic::Ordering::Relaxed),
        "tunnel ended"
    );
}

async fn refuse(send: &mut quinn::SendStream, code: RefuseCode, message: &str) {
    let reply = OpenReply::Refused {
        code,
        message: message.to_owned(),
    };
    if frame::write(send, &reply).await.is_ok() {
        let _ = send.finish();
    }
}

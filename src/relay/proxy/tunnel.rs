//! One admitted tunnel: the 200, the joined streams, and the audit row of how it ended.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::admit::Admitted;
use super::ClientConn;
use crate::auth::Principal;
use crate::forward::{self, Counters, End};
use crate::proto::connect;
use crate::relay::registry::TunnelEntry;
use crate::relay::state::Shared;
use crate::store::{now_ms, TunnelSession};

/// Answers 200, forwards pipelined bytes, joins the streams, and records how it ended.
pub async fn run<C: ClientConn>(
    mut client: C,
    leftover: BytesMut,
    t: Admitted,
    state: &Arc<Shared>,
) {
    let Admitted {
        version,
        principal,
        device,
        port,
        entry,
        mut send,
        recv,
    } = t;
    let counters = Counters::default();
    // The 200 goes out alone and flushed before any device byte (PROTOCOL.md §1).
    let answered = client
        .write_all(&connect::established(version))
        .await
        .is_ok()
        && client.flush().await.is_ok();
    state
        .metrics
        .proxy_responses
        .with_label_values(&["200", "none"])
        .inc();
    let audit = audit_row(&entry, &principal, &device, port, state);
    let store = state.store.clone();
    let audit_id = audit.id.clone();
    let opened = tokio::spawn(async move { store.open_tunnel(&audit).await });
    state.metrics.tunnels_open.inc();
    tracing::info!(tunnel = %entry.id, user = %principal.user.username, %device, port, "tunnel open");

    let end = if !answered {
        End::SocketReset
    } else {
        let mut early_failed = false;
        if !leftover.is_empty() {
            counters
                .to_quic
                .fetch_add(leftover.len() as u64, std::sync::atomic::Ordering::Relaxed);
            early_failed = send.write_chunk(leftover.freeze()).await.is_err();
        }
        // From here until an orderly close, a crash of this process resets the client's
        // connection instead of ending it with a FIN that reads like a complete transfer.
        forward::arm_reset(client.tcp());
        let (mut r, mut w) = client.halves();
        let idle = match state.config.limits.tunnel_idle_timeout_secs {
            0 => None,
            s => Some(Duration::from_secs(s)),
        };
        let end = if early_failed {
            End::QuicReset
        } else {
            forward::join(send, recv, &mut r, &mut w, &counters, &entry.cancel, idle).await
        };
        C::close(r, w, end.resets_socket());
        end
    };
    finish(state, &entry, &counters, &end, audit_id, opened).await;
}

fn audit_row(
    entry: &TunnelEntry,
    principal: &Principal,
    device: &str,
    port: u16,
    state: &Shared,
) -> TunnelSession {
    TunnelSession {
        id: entry.id.clone(),
        user_id: principal.user.id,
        username: principal.user.username.clone(),
        device_uuid: device.to_owned(),
        port: port.into(),
        relay_id: state.relay_id.clone(),
        opened_at: now_ms(),
        closed_at: None,
        bytes_up: 0,
        bytes_down: 0,
        close_reason: None,
    }
}

async fn finish(
    state: &Arc<Shared>,
    entry: &TunnelEntry,
    counters: &Counters,
    end: &End,
    audit_id: String,
    opened: tokio::task::JoinHandle<crate::store::Result<()>>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    state.registry.remove_tunnel(&entry.id);
    state.metrics.tunnels_open.dec();
    let reason = match end {
        End::Cancelled => entry.reason.get().copied().unwrap_or("shutdown").to_owned(),
        other => other.reason(),
    };
    let up = counters.to_quic.load(Relaxed);
    let down = counters.from_quic.load(Relaxed);
    state
        .metrics
        .tunnels_closed
        .with_label_values(&[&reason])
        .inc();
    state
        .metrics
        .tunnel_bytes
        .with_label_values(&["up"])
        .inc_by(up);
    state
        .metrics
        .tunnel_bytes
        .with_label_values(&["down"])
        .inc_by(down);
    match end {
        End::Closed => tracing::info!(tunnel = %entry.id, up, down, "tunnel closed"),
        End::ConnectionLost(e) => {
            tracing::warn!(tunnel = %entry.id, up, down, error = %e, "tunnel ended: device connection lost")
        }
        _ => tracing::info!(tunnel = %entry.id, up, down, reason = %reason, "tunnel ended"),
    }
    // The open row was written off the set-up path; the close waits for it. This runs in
    // the connection's tracked task, so a graceful shutdown completes every audit row.
    match opened.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(tunnel = %audit_id, error = %e, "audit row not written");
            state
                .metrics
                .store_write_failures
                .with_label_values(&["audit"])
                .inc();
            return;
        }
        Err(_) => return,
    }
    if let Err(e) = state
        .store
        .close_tunnel(&audit_id, up as i64, down as i64, &reason)
        .await
    {
        tracing::warn!(tunnel = %audit_id, error = %e, "audit row not completed");
        state
            .metrics
            .store_write_failures
            .with_label_values(&["audit"])
            .inc();
    }
}

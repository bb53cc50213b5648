//! Asking the relay that holds a device (the *owner*, PROTOCOL.md §3) for a tunnel: the
//! peer CONNECT and its answer, and a framed hop's resume (§2e, "Through another relay");
//! and where a tunnel's device stream runs, here or over such a hop.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::admit::Forward;
use crate::auth::peer::PeerKeys;
use crate::credit::Grant;
use crate::link::{End, LinkRecv, LinkSend};
use crate::peerhop::{self, HopHandle, Inbound, PeerRecv, PeerSend, Start};
use crate::proto::connect::{self, HeadError, PeerResume};
use crate::relay::presence::SessionTunnel;
use crate::relay::registry::TunnelEntry;
use crate::relay::state::Shared;
use crate::resume::Carried;
use crate::store::Presence;

/// How long dialing the owner may take before the user gets a 503.
pub const PEER_DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest answer head (and error body) read from the owner.
const MAX_ANSWER: usize = 16 * 1024;

/// Where a tunnel's device stream runs now.
pub enum Leg {
    /// On this relay's session with the device.
    Here {
        /// The stream's sending half.
        send: LinkSend,
        /// Its receiving half.
        recv: LinkRecv,
        /// The tunnel's place on the session.
        place: SessionTunnel,
    },
    /// Over a framed peer hop to the relay that holds the device (PROTOCOL.md §2e).
    Hop {
        /// The hop's sending half.
        send: PeerSend,
        /// Its receiving half.
        recv: PeerRecv,
        /// Its acks, credit and end.
        hop: HopHandle,
        /// The device's session there, as presence named it.
        session: String,
    },
}

impl Leg {
    /// The session the leg runs on: when it is lost, the tunnel waits for another.
    pub fn session(&self) -> String {
        match self {
            Leg::Here { place, .. } => place.session().session.clone(),
            Leg::Hop { session, .. } => session.clone(),
        }
    }
}

/// How one attempt to resume went, when it did not.
pub enum Attempt {
    /// The tunnel ends: this end, for this failure reason.
    Failed(End, &'static str),
    /// The session went before answering: wait for the next.
    Retry,
}

/// A resume over the peer hop (PROTOCOL.md §2e): the tunnel, who it is for, and the relay
/// that now holds its device.
pub struct Resumed<'a> {
    /// Where the device is now.
    pub owner: &'a Presence,
    /// The user's id.
    pub user_id: crate::store::Id,
    /// Their name.
    pub username: &'a str,
    /// The tunnel.
    pub entry: &'a TunnelEntry,
}

impl Resumed<'_> {
    /// Asks the owner to resume the tunnel: on its `200` the new framed leg and the agent's
    /// offsets, the grant now posting to it. A refusal of `410` (or an owner that cannot
    /// resume) ends the tunnel; one the owner could not answer waits for the device's next
    /// session.
    pub async fn resume(
        &self,
        state: &Shared,
        carried: &mut Carried,
        grant: &mut Grant,
    ) -> Result<(Leg, (u64, bool)), Attempt> {
        let Some(keys) = &state.peer_keys else {
            return Err(Attempt::Retry);
        };
        let written = carried.written.written();
        let ask = PeerAsk {
            addr: &self.owner.peer_addr,
            user_id: self.user_id,
            username: self.username,
            device: &self.entry.device,
            port: self.entry.port,
            tunnel: &self.entry.id,
            resume: Some(PeerResume::Resume {
                tunnel: self.entry.id.clone(),
                written,
                fin: carried.written.fin(),
                credit: grant.limit(),
            }),
        };
        let owner = &self.owner.relay_id;
        let (peer, status, answer, early) = match ask_owner(&ask, keys, state).await {
            Ok(found) => found,
            Err(why) => {
                tracing::info!(owner = %owner, "cannot resume through the device's relay: {why}");
                return Err(Attempt::Retry);
            }
        };
        let unsupported = || {
            let end = End::ConnectionLost("the device's relay cannot resume the tunnel".into());
            Attempt::Failed(end, "unsupported")
        };
        match status {
            200 => {}
            410 => {
                tracing::info!(owner = %owner, "the agent no longer holds the tunnel; it ends with a reset");
                return Err(Attempt::Failed(End::LinkReset, "gone"));
            }
            502 => {
                tracing::info!(owner = %owner, "the device's relay cannot resume the tunnel");
                return Err(unsupported());
            }
            _ => {
                tracing::info!(status, owner = %owner, "the device's relay did not take the resume; waiting for the device");
                return Err(Attempt::Retry);
            }
        }
        let Some(Framing {
            written: Some(agent),
        }) = framing(&answer)
        else {
            return Err(unsupported());
        };
        let framed = peerhop::framed(
            peer,
            early,
            Start {
                send: agent.0,
                recv: written,
                grant: grant.limit(),
            },
            Inbound {
                acks: carried.acked.clone(),
                credit: None,
            },
        );
        grant.move_to(framed.hop.credit());
        carried.written.set_sink(framed.hop.acks());
        state.metrics.peer_tunnels_out.inc();
        tracing::info!(owner = %owner, "resuming through the device's relay");
        let leg = Leg::Hop {
            send: framed.send,
            recv: framed.recv,
            hop: framed.hop,
            session: self.owner.session.clone(),
        };
        Ok((leg, agent))
    }
}

/// What an owner's `200` says about the hop (PROTOCOL.md §2e): framed, and after a resume
/// the agent's offsets.
pub struct Framing {
    written: Option<(u64, bool)>,
}

/// The framing headers of an answer head; `None` for a raw hop (or an unreadable head).
pub fn framing(head: &[u8]) -> Option<Framing> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    response.parse(head).ok()?;
    let value = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    if value(connect::RESUME_HEADER) != Some("1") {
        return None;
    }
    let written = match value(connect::WRITTEN_HEADER) {
        Some(v) => Some(connect::parse_written(v)?),
        None => None,
    };
    Some(Framing { written })
}

/// The parts of a peer CONNECT.
pub struct PeerAsk<'a> {
    addr: &'a str,
    user_id: crate::store::Id,
    username: &'a str,
    device: &'a str,
    port: u16,
    tunnel: &'a str,
    resume: Option<PeerResume>,
}

impl<'a> PeerAsk<'a> {
    /// The CONNECT for a forwarded tunnel, asking to resume as `resume` says.
    pub fn of(f: &'a Forward, resume: Option<PeerResume>) -> PeerAsk<'a> {
        PeerAsk {
            addr: &f.owner.peer_addr,
            user_id: f.user_id,
            username: &f.username,
            device: &f.device,
            port: f.port,
            tunnel: &f.entry.id,
            resume,
        }
    }
}

/// Dials the owner and sends the CONNECT with a peer token; returns the connection, the
/// status, the whole answer (head and any error body) and device bytes that came with a
/// 200.
pub async fn ask_owner(
    f: &PeerAsk<'_>,
    keys: &PeerKeys,
    state: &Shared,
) -> Result<(TcpStream, u16, Vec<u8>, BytesMut), String> {
    let mut peer = tokio::time::timeout(PEER_DIAL_TIMEOUT, TcpStream::connect(f.addr))
        .await
        .map_err(|_| "dial timed out".to_owned())?
        .map_err(|e| format!("dial failed: {e}"))?;
    let _ = peer.set_nodelay(true);
    let resume = match &f.resume {
        Some(ask) => format!("{}: {}\r\n", connect::RESUME_HEADER, ask.to_value()),
        None => String::new(),
    };
    let request = format!(
        "CONNECT {}:{} HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\n{resume}\r\n",
        f.device,
        f.port,
        keys.mint(f.user_id, f.username, f.device, f.port, f.tunnel)
    );
    peer.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    // The owner answers within its own open timeout; a little more for the hop.
    let wait = state.config.limits.open_timeout() + PEER_DIAL_TIMEOUT;
    // An answer head reads like a request head: up to the blank line, bounded, in time.
    let (head, rest) = match connect::read_head(&mut peer, MAX_ANSWER, wait).await {
        Ok((head, rest)) => (head.0.to_vec(), rest),
        Err(HeadError::Timeout) => return Err("no answer in time".to_owned()),
        Err(HeadError::TooLarge) => return Err("oversized answer".to_owned()),
        Err(_) => return Err("closed before answering".to_owned()),
    };
    let status: u16 = std::str::from_utf8(&head)
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "answer is not HTTP".to_owned())?;
    if status == 200 {
        return Ok((peer, status, head, rest));
    }
    // An error answer: its one-sentence body follows (bounded); keep it all.
    let mut answer = head;
    answer.extend_from_slice(&rest);
    let mut body = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        (&mut peer).take(MAX_ANSWER as u64).read_to_end(&mut body),
    )
    .await;
    answer.extend_from_slice(&body);
    Ok((peer, status, answer, BytesMut::new()))
}

//! The impaired-path rig: the device side of a test in a network namespace of its own,
//! reached from this (the relay's and the user's) namespace through a middle namespace that
//! shapes the path the way a cellular, hotel or factory network does.
//!
//! ```text
//!  this namespace (relay, user)        middle namespace                   device namespace
//!  ────────────────────────────        ──────────────────────────────     ─────────────────
//!  {id}r  10.a.b.6/30  ◀── veth ──▶  {id}m1 ─┐                 ┌─ {id}m0  ◀── veth ──▶ {id}d 10.a.b.2/30
//!                                              └─▶ {id}t (TUN) ─┘                          agent, services
//!                                      delay: a thread holds each packet RTT/2 (both ways)
//!                                      loss, blackout, UDP block: nftables, forward chain
//!                                      rate: tbf on the egress of {id}m0 and {id}m1
//! ```
//!
//! This kernel has no netem and no fq qdisc, so latency is added in user space: policy
//! routing in the middle namespace sends everything that arrives from either veth into a
//! TUN device, and [`delay_line`] writes each packet back RTT/2 after it arrived, in order;
//! the kernel then routes it on by the main table. Loss is judged once per packet and
//! direction, on its way out of the TUN device. Byte and packet counters sit there too,
//! before any drop: they count what the device and the relay put on the wire (IP headers
//! included, link framing not), one packet per wire packet (a sender's TSO batches have
//! been cut into packets by then, on their way into the TUN device).
//!
//! Every name, address and namespace belongs to this rig and is removed when it is dropped.
//! The rig needs root, `ip`, `tc` and `nft`; without them it fails, never skips.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a path is shaped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Round-trip time added (half each way).
    pub rtt: Duration,
    /// Probability that a packet is lost, judged once per packet in each direction.
    pub loss: f64,
    /// Rate each way, Mbit/s; 0 = unlimited.
    pub rate_mbit: u32,
}

impl Shape {
    /// A device on a mobile network: 40 Mbit/s each way, `rtt_ms`, `loss_pct` % loss.
    pub fn field(rtt_ms: u64, loss_pct: f64) -> Shape {
        Shape {
            rtt: Duration::from_millis(rtt_ms),
            loss: loss_pct / 100.0,
            rate_mbit: 40,
        }
    }
}

/// What the rig's counters saw, per direction (up = device to relay).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Packets the device sent towards the relay.
    pub up_packets: u64,
    /// Their bytes (IP headers included).
    pub up_bytes: u64,
    /// Packets the relay side sent towards the device.
    pub down_packets: u64,
    /// Their bytes.
    pub down_bytes: u64,
    /// Up packets dropped by the loss rule.
    pub up_lost: u64,
    /// Down packets dropped by the loss rule.
    pub down_lost: u64,
    /// Packets dropped by a blackout or a UDP block, both ways.
    pub blocked: u64,
    /// UDP packets up whose IP length is over 100 bytes (a QUIC handshake, not a probe).
    pub up_udp_large: u64,
    /// UDP packets up.
    pub up_udp: u64,
    /// Packets the bottleneck's queue (tbf) dropped because it was full, up.
    pub up_queue_drops: u64,
    /// The same, down.
    pub down_queue_drops: u64,
}

impl Counts {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            up_packets: self.up_packets - earlier.up_packets,
            up_bytes: self.up_bytes - earlier.up_bytes,
            down_packets: self.down_packets - earlier.down_packets,
            down_bytes: self.down_bytes - earlier.down_bytes,
            up_lost: self.up_lost - earlier.up_lost,
            down_lost: self.down_lost - earlier.down_lost,
            blocked: self.blocked - earlier.blocked,
            up_udp_large: self.up_udp_large - earlier.up_udp_large,
            up_udp: self.up_udp - earlier.up_udp,
            up_queue_drops: self.up_queue_drops.saturating_sub(earlier.up_queue_drops),
            down_queue_drops: self
                .down_queue_drops
                .saturating_sub(earlier.down_queue_drops),
        }
    }

    /// The loss measured each way, as fractions (up, down).
    pub fn loss(&self) -> (f64, f64) {
        let frac = |lost: u64, all: u64| {
            if all == 0 {
                0.0
            } else {
                lost as f64 / all as f64
            }
        };
        (
            frac(self.up_lost, self.up_packets),
            frac(self.down_lost, self.down_packets),
        )
    }
}

/// An impaired path between this namespace and a device namespace.
pub struct Rig {
    id: String,
    /// The device's namespace.
    pub device_ns: String,
    mid_ns: String,
    /// The device's address (in its namespace).
    pub device_ip: Ipv4Addr,
    /// This namespace's address on the rig: where the device reaches the relay.
    pub relay_ip: Ipv4Addr,
    /// The rig's /28: `10.a.b.c`.
    subnet: (u8, u8, u8),
    shape: std::sync::Mutex<Shape>,
    blocked: std::sync::Mutex<(bool, bool)>,
    delay_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub(crate) static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs a command, failing the test with its output if it fails.
pub(crate) fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("rig: cannot run {args:?}: {e} (the rig needs iproute2 and nftables)")
        });
    assert!(
        out.status.success(),
        "rig: {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command and returns its stdout.
fn output(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("rig: cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "rig: {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `nft -f -` in `ns` with `script` on stdin.
fn nft(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rig: cannot run nft (apt-get install nftables)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "rig: nft failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread of its own inside network namespace `ns`; sockets made there stay
/// in `ns` wherever they are used afterwards.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("rig: {path}: {e}"));
            // SAFETY: setns(2) with a namespace file we hold open; it moves only this
            // (scoped, short-lived) thread into the namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "rig: setns into {ns}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .expect("rig: namespace thread panicked")
    })
}

/// The TUN ioctl and flags (linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the union's first use).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens TUN device `name` (in the calling thread's namespace), non-blocking.
fn open_tun(name: &str) -> File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .expect("rig: /dev/net/tun");
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a `struct ifreq`, which `IfReq` lays out (40 bytes), from a
    // pointer valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    assert_eq!(
        rc,
        0,
        "rig: TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// Waits until `file` is readable or `timeout` passes.
fn wait_readable(file: &File, timeout: Duration) {
    let mut fds = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd and a valid timespec, both alive for the call; no signal
    // mask is changed.
    unsafe {
        libc::ppoll(&mut fds, 1, &ts, std::ptr::null());
    }
}

/// The delay line: every packet read from the TUN device is written back to it
/// `delay_us` after it arrived, in arrival order (a constant delay keeps order, as a
/// real path mostly does).
fn delay_line(mut tun: File, delay_us: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    /// Packets held at most; past it new ones are dropped (a bound on the rig's memory
    /// far above what 40 Mbit/s × 300 ms holds).
    const HELD_MAX: usize = 200_000;
    let mut held: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, packet) = held.pop_front().expect("front exists");
            // The kernel takes a packet whole or drops it (its backlog is full): a loss,
            // as on a real path.
            let _ = tun.write(&packet);
            pool.push(packet);
        }
        let wait = held
            .front()
            .map_or(Duration::from_millis(20), |(due, _)| {
                due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(20));
        wait_readable(&tun, wait);
        loop {
            match tun.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if held.len() >= HELD_MAX {
                        continue;
                    }
                    let due =
                        Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
                    let mut packet = pool.pop().unwrap_or_default();
                    packet.clear();
                    packet.extend_from_slice(&buf[..n]);
                    held.push_back((due, packet));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("rig: reading the TUN device: {e}"),
            }
        }
    }
}

/// Whether the rig can run here: root, `ip`, `tc`, `nft` and `/dev/net/tun`. The rig's
/// tests need all of them and fail without them (scripts/test installs the tools).
pub fn check_requirements() {
    assert!(
        super::is_root(),
        "the impaired-path rig needs root (network namespaces, TUN, nftables)"
    );
    for tool in ["ip", "tc", "nft"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "the impaired-path rig needs {tool} (scripts/test installs iproute2 and nftables)"
        );
    }
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "the impaired-path rig needs /dev/net/tun"
    );
}

/// A /28 in 10.64.0.0/10 that nothing in this namespace uses: two /30 links of the rig.
/// `n` is this rig's number in this process, so that rigs made at once differ.
pub(crate) fn free_subnet(n: usize) -> (u8, u8, u8) {
    let routes = output(&["ip", "-4", "-o", "route", "show", "table", "all"]);
    let addrs = output(&["ip", "-4", "-o", "addr", "show"]);
    for attempt in 0..1000u32 {
        let seed = std::process::id()
            .wrapping_mul(2_654_435_761)
            .wrapping_add(attempt.wrapping_mul(40_503))
            .wrapping_add(n as u32 * 7919);
        let a = 64 + (seed % 64) as u8;
        let b = ((seed >> 8) % 256) as u8;
        let c = (((seed >> 16) % 16) * 16) as u8;
        let prefix = format!("10.{a}.{b}.");
        let taken = |text: &str| {
            text.lines().any(|l| {
                l.split_whitespace().any(|w| {
                    w.strip_prefix(&prefix)
                        .and_then(|rest| rest.split('/').next()?.parse::<u8>().ok())
                        .is_some_and(|d| d / 16 == c / 16)
                })
            })
        };
        if !taken(&routes) && !taken(&addrs) {
            return (a, b, c);
        }
    }
    panic!("rig: no free subnet in 10.64.0.0/10");
}

impl Rig {
    /// Builds the namespaces, links, delay line and rules; the path starts unshaped.
    pub fn new() -> Rig {
        check_requirements();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("cl{:x}{n}", std::process::id() & 0xffff);
        assert!(id.len() <= 12, "rig: interface names too long ({id})");
        // Choosing a subnet and taking it happen under one lock, so rigs made at once in
        // this process cannot pick the same one.
        static CHOOSING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let choosing = CHOOSING.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b, c) = free_subnet(n);
        let ip = |d: u8| format!("10.{a}.{b}.{}", c + d);
        let device_ns = format!("{id}-dev");
        let mid_ns = format!("{id}-mid");
        let (d, m0, m1, r, t) = (
            format!("{id}d"),
            format!("{id}m0"),
            format!("{id}m1"),
            format!("{id}r"),
            format!("{id}t"),
        );
        let mut rig = Rig {
            id: id.clone(),
            device_ns: device_ns.clone(),
            mid_ns: mid_ns.clone(),
            device_ip: ip(2).parse().unwrap(),
            relay_ip: ip(6).parse().unwrap(),
            subnet: (a, b, c),
            shape: std::sync::Mutex::new(Shape {
                rtt: Duration::ZERO,
                loss: 0.0,
                rate_mbit: 0,
            }),
            blocked: std::sync::Mutex::new((false, false)),
            delay_us: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        // From here on, Drop removes whatever was made.
        run(&["ip", "netns", "add", &device_ns]);
        run(&["ip", "netns", "add", &mid_ns]);
        for ns in [&device_ns, &mid_ns] {
            let sysctl = |kv: &str| run(&["ip", "netns", "exec", ns, "sysctl", "-qw", kv]);
            sysctl("net.ipv6.conf.all.disable_ipv6=1");
            sysctl("net.ipv6.conf.default.disable_ipv6=1");
            sysctl("net.ipv4.conf.all.rp_filter=0");
            sysctl("net.ipv4.conf.default.rp_filter=0");
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let mid_sysctl = |kv: &str| run(&["ip", "netns", "exec", &mid_ns, "sysctl", "-qw", kv]);
        mid_sysctl("net.ipv4.ip_forward=1");
        mid_sysctl("net.ipv4.conf.all.send_redirects=0");
        mid_sysctl("net.ipv4.conf.default.send_redirects=0");
        run(&[
            "ip", "link", "add", &d, "netns", &device_ns, "type", "veth", "peer", "name", &m0,
            "netns", &mid_ns,
        ]);
        run(&[
            "ip", "link", "add", &r, "type", "veth", "peer", "name", &m1, "netns", &mid_ns,
        ]);
        run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{r}.disable_ipv6=1"),
        ]);
        // Each end of the two /30 links: its namespace (`None`: this one), device, host.
        for (ns, dev, host) in [
            (Some(&device_ns), &d, 2),
            (Some(&mid_ns), &m0, 1),
            (Some(&mid_ns), &m1, 5),
            (None, &r, 6),
        ] {
            let ip_cmd = |args: &[&str]| {
                let mut all = vec!["ip"];
                if let Some(ns) = ns {
                    all.extend(["-n", ns.as_str()]);
                }
                all.extend(args);
                run(&all);
            };
            ip_cmd(&["addr", "add", &format!("{}/30", ip(host)), "dev", dev]);
            ip_cmd(&["link", "set", dev, "up"]);
        }
        run(&[
            "ip",
            "-n",
            &device_ns,
            "route",
            "add",
            "default",
            "via",
            &ip(1),
        ]);
        run(&[
            "ip",
            "route",
            "add",
            &format!("{}/30", ip(0)),
            "via",
            &ip(5),
            "dev",
            &r,
        ]);
        drop(choosing);

        // The delay line's TUN device, made from a thread inside the middle namespace.
        let tun = in_ns(&mid_ns, || open_tun(&t));
        run(&[
            "ip",
            "-n",
            &mid_ns,
            "link",
            "set",
            &t,
            "txqueuelen",
            "10000",
            "up",
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            &mid_ns,
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{t}.rp_filter=0"),
        ]);
        run(&[
            "ip", "-n", &mid_ns, "route", "add", "default", "dev", &t, "table", "100",
        ]);
        run(&[
            "ip", "-n", &mid_ns, "rule", "add", "iif", &m0, "lookup", "100",
        ]);
        run(&[
            "ip", "-n", &mid_ns, "rule", "add", "iif", &m1, "lookup", "100",
        ]);
        {
            let (delay, stop) = (rig.delay_us.clone(), rig.stop.clone());
            rig.thread = Some(
                std::thread::Builder::new()
                    .name(format!("{id}-delay"))
                    .spawn(move || delay_line(tun, delay, stop))
                    .unwrap(),
            );
        }
        nft(
            &mid_ns,
            &format!(
                "table inet rig {{
                   counter up {{ }}
                   counter down {{ }}
                   counter up_lost {{ }}
                   counter down_lost {{ }}
                   counter blocked {{ }}
                   counter up_udp {{ }}
                   counter up_udp_large {{ }}
                   chain forward {{
                     type filter hook forward priority 0; policy accept;
                     iifname \"{t}\" oifname \"{m1}\" counter name up
                     iifname \"{t}\" oifname \"{m1}\" meta l4proto udp counter name up_udp
                     iifname \"{t}\" oifname \"{m1}\" meta l4proto udp ip length > 100 counter name up_udp_large
                     iifname \"{t}\" oifname \"{m0}\" counter name down
                     iifname \"{t}\" jump block
                     iifname \"{t}\" jump impair
                   }}
                   chain block {{ }}
                   chain impair {{ }}
                 }}"
            ),
        );
        rig
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.id)
    }

    /// Shapes the path: delay at once for new packets, loss and rate from the next packet.
    pub fn shape(&self, shape: Shape) {
        self.delay_us
            .store(shape.rtt.as_micros() as u64 / 2, Ordering::Relaxed);
        let (m0, m1) = (self.name("m0"), self.name("m1"));
        let mut rules = String::from("flush chain inet rig impair\n");
        if shape.loss > 0.0 {
            let per_million = (shape.loss * 1e6).round() as u64;
            for (out, counter) in [(&m1, "up_lost"), (&m0, "down_lost")] {
                rules.push_str(&format!(
                    "add rule inet rig impair oifname \"{out}\" numgen random mod 1000000 < {per_million} counter name {counter} drop\n"
                ));
            }
        }
        nft(&self.mid_ns, &rules);
        for dev in [&m0, &m1] {
            if shape.rate_mbit == 0 {
                // Nothing to delete on the first call; the error says so and is fine.
                let _ = Command::new("tc")
                    .args(["-n", &self.mid_ns, "qdisc", "del", "dev", dev, "root"])
                    .stderr(Stdio::null())
                    .status();
            } else {
                // The bottleneck's queue holds one bandwidth-delay product (at least
                // 64 KiB), as a well-sized router buffer does.
                let bdp = shape.rate_mbit as f64 * 1e6 / 8.0 * shape.rtt.as_secs_f64();
                let limit = (bdp as u64).max(64 * 1024);
                run(&[
                    "tc",
                    "-n",
                    &self.mid_ns,
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{}mbit", shape.rate_mbit),
                    "burst",
                    "16kb",
                    "limit",
                    &limit.to_string(),
                ]);
            }
        }
        *self.shape.lock().unwrap() = shape;
    }

    /// The shape last set.
    pub fn current(&self) -> Shape {
        *self.shape.lock().unwrap()
    }

    fn set_blocks(&self, udp: bool, everything: bool) {
        *self.blocked.lock().unwrap() = (udp, everything);
        let mut rules = String::from("flush chain inet rig block\n");
        if everything {
            rules.push_str("add rule inet rig block counter name blocked drop\n");
        } else if udp {
            rules.push_str("add rule inet rig block meta l4proto udp counter name blocked drop\n");
        }
        nft(&self.mid_ns, &rules);
    }

    /// Drops every UDP packet both ways (a firewall that blocks UDP), or stops doing so.
    pub fn block_udp(&self, on: bool) {
        let everything = self.blocked.lock().unwrap().1;
        self.set_blocks(on, everything);
    }

    /// Drops every packet both ways (the network is gone), or stops doing so.
    pub fn blackout(&self, on: bool) {
        let udp = self.blocked.lock().unwrap().0;
        self.set_blocks(udp, on);
    }

    /// Moves the device to a new address, as a cellular device that changes cells does:
    /// a new address on a new /30 (the third of the rig's /28) and the default route
    /// through it, then the old address deleted. Connections from the old address can
    /// reach nothing any more; the path itself (delay, loss, blocks) stays. Returns the
    /// new address. Once only.
    pub fn move_device(&self) -> Ipv4Addr {
        let (a, b, c) = self.subnet;
        let ip = |d: u8| format!("10.{a}.{b}.{}", c + d);
        let (d, m0, r) = (self.name("d"), self.name("m0"), self.name("r"));
        let dev = &self.device_ns;
        run(&[
            "ip",
            "-n",
            &self.mid_ns,
            "addr",
            "add",
            &format!("{}/30", ip(9)),
            "dev",
            &m0,
        ]);
        run(&[
            "ip",
            "-n",
            dev,
            "addr",
            "add",
            &format!("{}/30", ip(10)),
            "dev",
            &d,
        ]);
        run(&[
            "ip",
            "route",
            "add",
            &format!("{}/30", ip(8)),
            "via",
            &ip(5),
            "dev",
            &r,
        ]);
        run(&[
            "ip",
            "-n",
            dev,
            "addr",
            "del",
            &format!("{}/30", ip(2)),
            "dev",
            &d,
        ]);
        // Deleting the address took the default route through its subnet with it.
        run(&[
            "ip",
            "-n",
            dev,
            "route",
            "replace",
            "default",
            "via",
            &ip(9),
        ]);
        ip(10).parse().unwrap()
    }

    /// The counters now.
    pub fn counts(&self) -> Counts {
        let json = output(&[
            "ip",
            "netns",
            "exec",
            &self.mid_ns,
            "nft",
            "-j",
            "list",
            "counters",
            "table",
            "inet",
            "rig",
        ]);
        let value: serde_json::Value = serde_json::from_str(&json).expect("nft -j is JSON");
        let mut c = Counts::default();
        for item in value["nftables"].as_array().into_iter().flatten() {
            let Some(counter) = item.get("counter") else {
                continue;
            };
            let packets = counter["packets"].as_u64().unwrap_or(0);
            let bytes = counter["bytes"].as_u64().unwrap_or(0);
            match counter["name"].as_str().unwrap_or("") {
                "up" => (c.up_packets, c.up_bytes) = (packets, bytes),
                "down" => (c.down_packets, c.down_bytes) = (packets, bytes),
                "up_lost" => c.up_lost = packets,
                "down_lost" => c.down_lost = packets,
                "blocked" => c.blocked = packets,
                "up_udp" => c.up_udp = packets,
                "up_udp_large" => c.up_udp_large = packets,
                _ => {}
            }
        }
        // The rate limiter's own drops (a full queue: congestion, not random loss).
        for (dev, slot) in [
            ("m1", &mut c.up_queue_drops),
            ("m0", &mut c.down_queue_drops),
        ] {
            let json = output(&[
                "tc",
                "-s",
                "-j",
                "-n",
                &self.mid_ns,
                "qdisc",
                "show",
                "dev",
                &self.name(dev),
            ]);
            let qdiscs: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
            *slot = qdiscs
                .as_array()
                .into_iter()
                .flatten()
                .filter(|q| q["kind"] == "tbf")
                .filter_map(|q| q["drops"].as_u64())
                .sum();
        }
        c
    }

    /// The command prefix that runs a program in the device's namespace.
    pub fn device_wrapper(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.device_ns]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// A TCP listener in the device's namespace at `addr` (port 0: any).
    pub fn device_listener(&self, addr: SocketAddr) -> tokio::net::TcpListener {
        let std = in_ns(&self.device_ns, || std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("rig: binding {addr} in the device namespace: {e}"));
        std.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(std).unwrap()
    }

    /// A TCP socket in the device's namespace, not yet connected (for a device-side
    /// client).
    pub fn device_socket(&self) -> tokio::net::TcpSocket {
        let socket = in_ns(&self.device_ns, || {
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        })
        .expect("rig: a socket in the device namespace");
        socket.set_nonblocking(true).unwrap();
        tokio::net::TcpSocket::from_std_stream(socket.into())
    }

    /// The round trip measured now: the median of 20 small UDP echoes to the device,
    /// 20 ms apart (lost ones are left out); `None` if all were lost.
    pub fn measure_rtt(&self) -> Option<Duration> {
        let echo = in_ns(&self.device_ns, || UdpSocket::bind((self.device_ip, 0)))
            .expect("rig: a UDP socket in the device namespace");
        echo.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let echoing = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = echo.recv_from(&mut buf) {
                        let _ = echo.send_to(&buf[..n], from);
                    }
                }
            })
        };
        let client = UdpSocket::bind((self.relay_ip, 0)).unwrap();
        let timeout = self.current().rtt * 2 + Duration::from_millis(500);
        client.set_read_timeout(Some(timeout)).unwrap();
        let mut rtts = Vec::new();
        for i in 0u32..20 {
            let sent = Instant::now();
            client.send_to(&i.to_be_bytes(), echo_addr).unwrap();
            let mut buf = [0u8; 64];
            let deadline = sent + timeout;
            // Late answers to earlier echoes are skipped by their sequence number.
            while Instant::now() < deadline {
                match client.recv_from(&mut buf) {
                    Ok((4, _)) if buf[..4] == i.to_be_bytes() => {
                        rtts.push(sent.elapsed());
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        echoing.join().unwrap();
        rtts.sort();
        rtts.get(rtts.len() / 2).copied()
    }

    /// The rate measured now each way, Mbit/s (up, down): 600 datagrams of 1,200 bytes
    /// sent as fast as this machine can, timed at the receiver from the 50th to the last.
    pub fn measure_rate(&self) -> (f64, f64) {
        let device = in_ns(&self.device_ns, || UdpSocket::bind((self.device_ip, 0))).unwrap();
        let here = UdpSocket::bind((self.relay_ip, 0)).unwrap();
        let up = blast(&device, &here, self.current().rtt);
        let down = blast(&here, &device, self.current().rtt);
        (up, down)
    }
}

/// Sends 600 × 1,200 bytes from `from` to `to` and returns the rate `to` received them
/// at, Mbit/s (0 when fewer than 100 arrived).
fn blast(from: &UdpSocket, to: &UdpSocket, rtt: Duration) -> f64 {
    const COUNT: usize = 600;
    const SIZE: usize = 1200;
    let to_addr = to.local_addr().unwrap();
    to.set_read_timeout(Some(rtt + Duration::from_millis(300)))
        .unwrap();
    let receiver = {
        let to = to.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut stamps = Vec::new();
            while let Ok(n) = to.recv(&mut buf) {
                if n == SIZE {
                    stamps.push(Instant::now());
                }
            }
            stamps
        })
    };
    let payload = [0x5au8; SIZE];
    for _ in 0..COUNT {
        // A full socket buffer drops here, as the bottleneck would drop there.
        let _ = from.send_to(&payload, to_addr);
    }
    let stamps = receiver.join().unwrap();
    if stamps.len() < 100 {
        return 0.0;
    }
    let (first, last) = (stamps[49], stamps[stamps.len() - 1]);
    let bits = ((stamps.len() - 50) * SIZE * 8) as f64;
    bits / (last - first).as_secs_f64() / 1e6
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Deleting the namespaces deletes the veths in them, and with them their peers
        // here; the route through them goes too.
        for ns in [&self.mid_ns, &self.device_ns] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

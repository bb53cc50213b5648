//! A user's machine in a network namespace of its own, for clients whose ports are fixed
//! (the balena CLI dials its gateway on 22 and its tunnel proxy on 443): one veth /30 to
//! this namespace, where the relay listens on `host_ip`, and in the client's namespace
//! nftables sends its 22 and 443 to whichever ports the relay bound. Names resolve
//! through `/etc/netns/<ns>/hosts`, which `ip netns exec` puts over `/etc/hosts` for the
//! commands it runs. Everything made here is removed on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::Ordering;

use super::rig::{free_subnet, run, NEXT};

/// The client's namespace.
pub struct ClientNs {
    /// The namespace's name.
    pub ns: String,
    /// This namespace's end of the link: where the relay listens for the client.
    pub host_ip: Ipv4Addr,
    /// The client's end.
    pub client_ip: Ipv4Addr,
    hosts_dir: std::path::PathBuf,
}

impl ClientNs {
    /// The namespace and its link; `hosts` names resolve to [`ClientNs::host_ip`] in it.
    pub fn new(hosts: &[&str]) -> ClientNs {
        super::rig::check_requirements();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("cc{:x}{n}", std::process::id() & 0xffff);
        static CHOOSING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let choosing = CHOOSING.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b, c) = free_subnet(n);
        let ip = |d: u8| Ipv4Addr::new(10, a, b, c + d);
        let ns = format!("{id}-user");
        let (here, there) = (format!("{id}h"), format!("{id}c"));
        let client = ClientNs {
            ns: ns.clone(),
            host_ip: ip(1),
            client_ip: ip(2),
            hosts_dir: std::path::PathBuf::from(format!("/etc/netns/{ns}")),
        };
        // From here on, Drop removes whatever was made.
        run(&["ip", "netns", "add", &ns]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        run(&[
            "ip", "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", &ns,
        ]);
        run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{here}.disable_ipv6=1"),
        ]);
        run(&["ip", "addr", "add", &format!("{}/30", ip(1)), "dev", &here]);
        run(&["ip", "link", "set", &here, "up"]);
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/30", ip(2)),
            "dev",
            &there,
        ]);
        run(&["ip", "-n", &ns, "link", "set", &there, "up"]);
        drop(choosing);
        std::fs::create_dir_all(&client.hosts_dir).unwrap();
        let mut text = format!("127.0.0.1 localhost\n{}", ip(1));
        for name in hosts {
            text.push(' ');
            text.push_str(name);
        }
        text.push('\n');
        std::fs::write(client.hosts_dir.join("hosts"), text).unwrap();
        client
    }

    /// In the client's namespace, connections to `host_ip:port` go to `to` instead (a
    /// fixed port the client dials, to the port the relay bound).
    pub fn forward(&self, port: u16, to: SocketAddr) {
        let nft = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", self.ns.as_str(), "nft"];
            all.extend(args);
            run(&all);
        };
        nft(&["add", "table", "ip", "client"]);
        nft(&[
            "add", "chain", "ip", "client", "out", "{", "type", "nat", "hook", "output",
            "priority", "-100", ";", "}",
        ]);
        let (ip, port, to) = (self.host_ip.to_string(), port.to_string(), to.to_string());
        nft(&[
            "add", "rule", "ip", "client", "out", "ip", "daddr", &ip, "tcp", "dport", &port,
            "dnat", "to", &to,
        ]);
    }

    /// `program` run in the client's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }
}

impl Drop for ClientNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the peer here.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.hosts_dir);
    }
}

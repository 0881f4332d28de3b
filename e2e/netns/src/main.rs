//! `planproxy-netns`: manual companion to the test library.
//!
//! * `up`: build a [`Topology`], print its namespaces and addresses, keep it
//!   until stdin closes or Enter is pressed, then delete it.
//! * `echo`: run an echo server in the current namespace (use with
//!   `ip netns exec`).
//! * `connect`: one TCP or UDP attempt from the current namespace.
//! * `cleanup`: delete namespaces left behind by killed test runs.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Parser, Subcommand};
use planproxy_netns::{ConnectOpts, EchoConfig, Topology, TopologySpec, here};

#[derive(Parser)]
#[command(about = "Isolated network-namespace topologies for planproxy tests")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a topology and keep it until Enter is pressed.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        #[arg(long, default_value_t = 2)]
        pods_per_node: u8,
        #[arg(long, default_value_t = 1)]
        clients: u8,
    },
    /// Serve echo in the current namespace until interrupted.
    Echo {
        #[arg(long)]
        name: String,
        #[arg(long = "tcp")]
        tcp_ports: Vec<u16>,
        #[arg(long = "udp")]
        udp_ports: Vec<u16>,
        #[arg(long)]
        bind: Vec<IpAddr>,
    },
    /// One attempt against ADDR from the current namespace.
    Connect {
        addr: SocketAddr,
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long)]
        source: Option<IpAddr>,
    },
    /// Delete namespaces of planproxy test runs that no longer exist.
    Cleanup,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Cli::parse().command {
        Cmd::Up {
            nodes,
            pods_per_node,
            clients,
        } => {
            let topology = Topology::new(TopologySpec {
                nodes,
                pods_per_node,
                clients,
            })?;
            println!("router  {}", topology.router.name());
            for node in &topology.nodes {
                println!(
                    "node{}   {}  {} {}  pods {} {}",
                    node.index,
                    node.ns.name(),
                    node.ipv4,
                    node.ipv6,
                    node.pod_cidr_v4,
                    node.pod_cidr_v6
                );
                for pod in &node.pods {
                    println!("  pod   {}  {} {}", pod.ns.name(), pod.ipv4, pod.ipv6);
                }
            }
            for client in &topology.clients {
                println!(
                    "client  {}  {} {}",
                    client.ns.name(),
                    client.ipv4,
                    client.ipv6
                );
            }
            println!("press Enter to delete the topology");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
        }
        Cmd::Echo {
            name,
            tcp_ports,
            udp_ports,
            bind,
        } => {
            let _guard = here::serve_echo(
                &name,
                EchoConfig {
                    tcp_ports,
                    udp_ports,
                    bind,
                },
            )?;
            loop {
                std::thread::park();
            }
        }
        Cmd::Connect {
            addr,
            udp,
            timeout_ms,
            source,
        } => {
            let opts = ConnectOpts {
                timeout: Duration::from_millis(timeout_ms),
                source,
            };
            let attempt = if udp {
                here::connect_udp(addr, &opts)
            } else {
                here::connect_tcp(addr, &opts)
            };
            println!("{attempt:?}");
            if !attempt.is_ok() {
                std::process::exit(1);
            }
        }
        Cmd::Cleanup => {
            for name in planproxy_netns::remove_stale_namespaces()? {
                println!("deleted {name}");
            }
        }
    }
    Ok(())
}

//! The underlay's neighbour table for the xdp data plane, which writes outer Ethernet
//! headers itself: one persistent rtnetlink socket subscribed to neighbour events;
//! after each burst of events the table of the underlay interface is read again and
//! sent to every packet worker. (A frame whose next hop is not resolved yet goes out
//! through the kernel, which resolves it; the event that follows brings it here.)

use crate::datapath::worker::{Command, Workers};
use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use rtnetlink::MulticastGroup;
use std::time::Duration;
use tracing::warn;
use violin_common::wire::EthernetAddress;

/// Events closer together than this are read as one burst.
const SETTLE: Duration = Duration::from_millis(2);

/// Watches neighbours of `iface` until the worker is gone.
pub async fn watch(iface: String, workers: Workers) {
    loop {
        match watch_once(&iface, &workers).await {
            Ok(()) => return, // the worker is gone
            Err(e) => {
                warn!("watching the neighbour table of {iface}: {e:#}; again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn watch_once(iface: &str, workers: &Workers) -> Result<()> {
    let (conn, handle, mut events) = rtnetlink::new_multicast_connection(&[MulticastGroup::Neigh])
        .context("opening a netlink socket for neighbour events")?;
    let task = tokio::spawn(conn);
    let r = async {
        loop {
            let table = crate::host::netlink::neighbours(&handle, iface).await?;
            let table: Vec<(std::net::Ipv4Addr, EthernetAddress)> = table
                .into_iter()
                .map(|(ip, mac)| (ip, EthernetAddress(mac)))
                .collect();
            if workers
                .send_all(|| Command::Neighbours(table.clone()))
                .is_err()
            {
                return Ok(());
            }
            events
                .next()
                .await
                .ok_or_else(|| anyhow!("the netlink socket closed"))?;
            while let Ok(Some(_)) = tokio::time::timeout(SETTLE, events.next()).await {}
        }
    }
    .await;
    task.abort();
    r
}

//! Finding the coordinator on the LAN. `swarm up` advertises itself by mDNS (DNS-SD service
//! `_swarm._tcp.local.`) with its addresses, its port and, in a TXT record, the sha256 pin of
//! its cluster CA. A worker or client whose token's addresses do not answer (the coordinator's
//! machine got another address, or the token was printed with none reachable) browses for a
//! coordinator with its token's pin and connects there. The pin decides which coordinator is
//! ours; the TLS handshake against that pin still decides whether it is genuine, so a forged
//! advertisement only costs a failed connection.

use crate::trust::{self, Pin, TrustError};
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The DNS-SD service type of a Swarm coordinator.
pub const SERVICE_TYPE: &str = "_swarm._tcp.local.";
/// How long a connection browses the LAN before it gives up.
pub const BROWSE_FOR: Duration = Duration::from_secs(3);

/// The advertisement, withdrawn when dropped.
pub struct Advertisement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Drop for Advertisement {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

fn pin_hex(pin: &Pin) -> String {
    pin.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// Advertises a coordinator with CA `pin` listening on `port` at `ips`.
pub fn advertise(pin: &Pin, ips: &[IpAddr], port: u16) -> Result<Advertisement, String> {
    let daemon = ServiceDaemon::new().map_err(|e| format!("starting mDNS: {e}"))?;
    let hex = pin_hex(pin);
    let instance = format!("swarm-{}", &hex[..12]);
    let host = format!("{instance}.local.");
    let props = [("pin", hex.as_str()), ("v", "1")];
    let info = ServiceInfo::new(SERVICE_TYPE, &instance, &host, ips, port, &props[..])
        .map_err(|e| format!("the mDNS record: {e}"))?;
    let fullname = info.get_fullname().to_string();
    daemon.register(info).map_err(|e| format!("advertising by mDNS: {e}"))?;
    Ok(Advertisement { daemon, fullname })
}

/// `host:port` of every coordinator with CA `pin` that answers on the LAN within `within`.
pub fn discover(pin: &Pin, within: Duration) -> Vec<String> {
    let Ok(daemon) = ServiceDaemon::new() else { return Vec::new() };
    let Ok(events) = daemon.browse(SERVICE_TYPE) else { return Vec::new() };
    let want = pin_hex(pin);
    let deadline = Instant::now() + within;
    let mut found = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(s)) if s.get_property_val_str("pin") == Some(want.as_str()) => {
                let mut ips: Vec<_> = s.get_addresses_v4().into_iter().collect();
                ips.sort();
                found.extend(ips.into_iter().map(|ip| format!("{ip}:{}", s.get_port())));
                if !found.is_empty() {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = daemon.shutdown();
    found.dedup();
    found
}

/// A channel to the coordinator: at the first of `addrs` that answers, else at one found on
/// the LAN with the same pin. Returns the address used.
pub async fn connect(addrs: &[String], pin: Pin) -> Result<(Channel, String), TrustError> {
    let first = match trust::connect_channel(addrs, pin).await {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    let found = tokio::task::spawn_blocking(move || discover(&pin, BROWSE_FOR)).await.unwrap_or_default();
    let found: Vec<String> = found.into_iter().filter(|a| !addrs.contains(a)).collect();
    if found.is_empty() {
        return Err(TrustError::Unreachable(format!(
            "{}; and no coordinator of this cluster answered on the LAN (mDNS, {SERVICE_TYPE})",
            match first {
                TrustError::Unreachable(m) => m,
                other => other.to_string(),
            }
        )));
    }
    trust::connect_channel(&found, pin).await
}

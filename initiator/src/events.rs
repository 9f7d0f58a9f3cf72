//! Routes a device's events to the queues they concern. A device has one event stream; each queue subscribes
//! by connection id and queue pair number, and device-wide events (link, address, removal) go to everyone.
//! Events for a connection nobody subscribed to yet are kept until it does (the CM may answer before
//! `connect` returns).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use transport::{ConnId, Device, DeviceEvent};

#[derive(Default)]
struct Routes {
    by_conn: HashMap<ConnId, mpsc::UnboundedSender<DeviceEvent>>,
    by_qpn: HashMap<u32, mpsc::UnboundedSender<DeviceEvent>>,
    unclaimed: HashMap<ConnId, Vec<DeviceEvent>>,
    device_wide: Vec<mpsc::UnboundedSender<DeviceEvent>>,
}

/// The router; its task ends when the device closes.
#[derive(Clone)]
pub struct EventRouter {
    routes: Arc<Mutex<Routes>>,
}

const UNCLAIMED_LIMIT: usize = 64;

impl EventRouter {
    pub fn start(device: Arc<Device>) -> EventRouter {
        let routes = Arc::new(Mutex::new(Routes::default()));
        let weak = Arc::downgrade(&device);
        drop(device);
        let task_routes = routes.clone();
        tokio::spawn(async move {
            loop {
                // Hold the device only while waiting, so dropping the controller closes it.
                let Some(device) = weak.upgrade() else { break };
                let event = tokio::select! {
                    e = device.next_event() => e,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => continue,
                };
                drop(device);
                let Some(event) = event else { break };
                let mut r = task_routes.lock().unwrap_or_else(|p| p.into_inner());
                let conn = match &event {
                    DeviceEvent::ConnectRequest { conn, .. }
                    | DeviceEvent::Established { conn, .. }
                    | DeviceEvent::Rejected { conn, .. }
                    | DeviceEvent::Unreachable { conn }
                    | DeviceEvent::Disconnected { conn }
                    | DeviceEvent::TimewaitExit { conn } => Some(*conn),
                    _ => None,
                };
                match (conn, &event) {
                    (Some(c), _) => match r.by_conn.get(&c) {
                        Some(tx) => {
                            let _ = tx.send(event);
                        }
                        None => {
                            if r.unclaimed.len() < UNCLAIMED_LIMIT {
                                r.unclaimed.entry(c).or_default().push(event);
                            }
                        }
                    },
                    (None, DeviceEvent::QpFatal { qpn, .. }) => {
                        if let Some(tx) = r.by_qpn.get(qpn) {
                            let _ = tx.send(event.clone());
                        }
                    }
                    (None, _) => {
                        r.device_wide.retain(|tx| tx.send(event.clone()).is_ok());
                    }
                }
            }
        });
        EventRouter { routes }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events of one connection and queue pair, and every device-wide event.
    pub fn subscribe(&self, conn: ConnId, qpn: u32) -> mpsc::UnboundedReceiver<DeviceEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut r = self.routes();
        for e in r.unclaimed.remove(&conn).unwrap_or_default() {
            let _ = tx.send(e);
        }
        r.by_conn.insert(conn, tx.clone());
        r.by_qpn.insert(qpn, tx.clone());
        r.device_wide.push(tx);
        rx
    }

    pub fn unsubscribe(&self, conn: ConnId, qpn: u32) {
        let mut r = self.routes();
        r.by_conn.remove(&conn);
        r.by_qpn.remove(&qpn);
        r.device_wide.retain(|tx| !tx.is_closed());
    }
}

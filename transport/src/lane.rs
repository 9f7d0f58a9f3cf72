//! A lane: the part of a device's data path that runs on the thread of whoever runs it — a target's poll
//! group, a host queue's thread — so that its queue pairs are posted on, completed and torn down there, with no
//! hop to the device's worker. The worker keeps the connection manager and the device's lifecycle and tells
//! the lane by message what they decided. Each provider has its own: the soft provider's (`soft::lane`: an RC
//! engine and a socket the kernel steers the lane's datagrams to) and the verbs provider's (`verbs::lane`: a
//! device context of the lane's own, with its completion channel, queue pairs and shared receive queues).

/// A lane before it runs: hand it to the thread that is to own its queue pairs and run it there
/// ([`Lane::run`]); create queue pairs on it with `Device::create_qp_on_lane`.
#[derive(Debug)]
pub struct Lane(Kind);

#[derive(Debug)]
enum Kind {
    Soft(crate::soft::lane::Lane),
    #[cfg(feature = "verbs")]
    Verbs(crate::verbs::lane::Lane),
}

impl Lane {
    pub(crate) fn soft(lane: crate::soft::lane::Lane) -> Lane {
        Lane(Kind::Soft(lane))
    }

    #[cfg(feature = "verbs")]
    pub(crate) fn verbs(lane: crate::verbs::lane::Lane) -> Lane {
        Lane(Kind::Verbs(lane))
    }

    /// Which lane of its device this is (for `Device::create_qp_on_lane`).
    pub fn id(&self) -> usize {
        match &self.0 {
            Kind::Soft(l) => l.id(),
            #[cfg(feature = "verbs")]
            Kind::Verbs(l) => l.id(),
        }
    }

    /// Serves the lane's queue pairs until the device closes. Run it on the thread that uses them (a tokio
    /// runtime with I/O and time enabled).
    pub async fn run(self) {
        match self.0 {
            Kind::Soft(l) => l.run().await,
            #[cfg(feature = "verbs")]
            Kind::Verbs(l) => l.run().await,
        }
    }
}

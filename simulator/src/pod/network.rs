//! Moving bytes over a slice's links. A transfer is a route (links, in order) and a byte
//! count, cut into chunks that pipeline hop by hop: a chunk holds a link for its bytes over the
//! link's bandwidth, then reaches the next chip one hop latency later (the wire's latency does
//! not hold the link). Transfers that share a link queue on it in the order they are sent —
//! contention — each link keeping the time it is next free (no back-filling of earlier gaps).
//! Every link counts its bytes and busy time. Deterministic: the same sends in the same order
//! give the same times, bit for bit.

use crate::pod::topology::Topology;

/// What one link carried.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkStats {
    pub bytes: f64,
    pub busy_seconds: f64,
}

/// The links of a slice as transfers book them.
pub struct Network<'t> {
    pub topology: &'t Topology,
    /// Bytes of a chunk: large transfers stream, a chunk per hop at a time.
    pub chunk_bytes: f64,
    free: Vec<f64>,
    pub stats: Vec<LinkStats>,
    /// With [`Network::keep_intervals`]: each link's busy intervals (seconds), back-to-back
    /// chunks merged — for traces.
    pub intervals: Option<Vec<Vec<(f64, f64)>>>,
}

impl<'t> Network<'t> {
    pub fn new(topology: &'t Topology, chunk_bytes: f64) -> Network<'t> {
        let links = topology.links.len();
        Network {
            topology,
            chunk_bytes: chunk_bytes.max(1.0),
            free: vec![0.0; links],
            stats: vec![LinkStats::default(); links],
            intervals: None,
        }
    }

    /// Keeps every link's busy intervals from now on.
    pub fn keep_intervals(&mut self) {
        self.intervals = Some(vec![Vec::new(); self.stats.len()]);
    }

    /// Sends `bytes` along `route`, all of them ready at the source at `ready` (seconds);
    /// returns when the last byte reaches the end of the route.
    pub fn send(&mut self, route: &[usize], bytes: f64, ready: f64) -> f64 {
        if route.is_empty() || bytes <= 0.0 {
            return ready;
        }
        let chunks = (bytes / self.chunk_bytes).ceil().max(1.0) as usize;
        let mut arrival = ready;
        for k in 0..chunks {
            // (k · chunk written out so that one infinite chunk is the whole transfer.)
            let sent = if k == 0 { 0.0 } else { k as f64 * self.chunk_bytes };
            let size = self.chunk_bytes.min(bytes - sent);
            let mut at = ready;
            for &l in route {
                let link = &self.topology.links[l];
                let start = at.max(self.free[l]);
                let end = start + size / link.bytes_per_second;
                self.free[l] = end;
                self.stats[l].bytes += size;
                self.stats[l].busy_seconds += end - start;
                if let Some(intervals) = self.intervals.as_mut() {
                    match intervals[l].last_mut() {
                        Some(last) if start <= last.1 => last.1 = end,
                        _ => intervals[l].push((start, end)),
                    }
                }
                at = end + link.latency_seconds;
            }
            arrival = at;
        }
        arrival
    }

    /// The links by busy time, busiest first (ties by link number).
    pub fn busiest(&self) -> Vec<usize> {
        let mut links: Vec<usize> = (0..self.stats.len()).collect();
        links.sort_by(|&a, &b| self.stats[b].busy_seconds.total_cmp(&self.stats[a].busy_seconds).then(a.cmp(&b)));
        links
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    #[test]
    fn chunks_pipeline_over_hops_and_transfers_queue_on_shared_links() {
        let t = Topology::of(&presets::preset("v3-32").unwrap()).unwrap();
        let (bw, hop) = (t.links[0].bytes_per_second, t.links[0].latency_seconds);
        let route = t.route(t.chip_at(&[0, 0]), t.chip_at(&[0, 3]));
        let mut net = Network::new(&t, 1e6);
        // 8 MB over 3 hops in 1 MB chunks: the bytes once, plus two more chunks to fill the
        // pipeline, plus three hop latencies.
        let end = net.send(&route, 8e6, 0.0);
        assert!((end - (8e6 / bw + 2.0 * 1e6 / bw + 3.0 * hop)).abs() < 1e-12, "{end}");
        assert_eq!(net.stats[route[1]].bytes, 8e6);
        // A second transfer over the first link waits for it to be free.
        let again = net.send(&route[..1], 1e6, 0.0);
        assert!((again - (9e6 / bw + hop)).abs() < 1e-12, "{again}");
        assert_eq!(net.busiest()[0], route[0]);
    }
}

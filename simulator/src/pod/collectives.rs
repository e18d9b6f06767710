//! Collectives between the chips of a slice, timed on the [`Network`]: reduce-scatter,
//! all-gather and all-reduce (the two in turn), axis by axis as rings — every ring of an axis
//! at once, each bidirectional (half the bytes go up the ring, half down, on separate links).
//! An all-reduce reduce-scatters along the axes in order, each axis on what the previous left
//! per chip, then all-gathers back in reverse, as TPU pods reduce gradients over the 2-D torus
//! (rows, then columns; docs/architecture.md). A ring of `n` chips takes `n − 1` steps; in each,
//! every chip sends its neighbour `1/n` of its half and the next step waits for what arrived.
//! On a mesh axis (no wraparound) the ring closes through the line back, sharing the links of
//! the other direction, hence slower. (Between the cores of a chip, and the values, come next.)

use crate::pod::network::Network;
use crate::pod::topology::Topology;

/// Which collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    AllReduce,
    ReduceScatter,
    AllGather,
}

/// One ring pass along `axis`: `n − 1` steps of every ring of the axis, each chip sending
/// `bytes / (2n)` each way per step. `ready[chip]` is when each chip may start; on return,
/// when each has what the pass delivers.
fn ring_pass(net: &mut Network, axis: usize, bytes: f64, ready: &mut [f64]) {
    let topo = net.topology;
    let n = topo.dims[axis];
    if n < 2 {
        return;
    }
    let rings: Vec<Vec<usize>> =
        (0..topo.chips()).filter(|&c| topo.coords(c)[axis] == 0).map(|c| topo.ring(c, axis)).collect();
    let share = bytes / (2 * n) as f64;
    // Per direction (up the ring, down the ring): when each chip has what it sends next.
    let mut at = [ready.to_vec(), ready.to_vec()];
    for _step in 1..n {
        let mut next = at.clone();
        for ring in &rings {
            for (d, hop) in [(0, 1), (1, n - 1)] {
                for i in 0..n {
                    let (from, to) = (ring[i], ring[(i + hop) % n]);
                    let route = topo.route(from, to);
                    next[d][to] = net.send(&route, share, at[d][from]);
                }
            }
        }
        at = next;
    }
    for ring in &rings {
        for &chip in ring {
            ready[chip] = at[0][chip].max(at[1][chip]);
        }
    }
}

/// Runs `collective` over every chip of the slice, `bytes` per chip (what each holds before an
/// all-reduce or reduce-scatter, after an all-gather), all ready at `start`; returns when each
/// chip is done.
pub fn run(net: &mut Network, collective: Collective, bytes: f64, start: f64) -> Vec<f64> {
    let topo = net.topology;
    let mut ready = vec![start; topo.chips()];
    let axes: Vec<usize> = (0..topo.dims.len()).filter(|&a| topo.dims[a] > 1).collect();
    // What each chip holds entering each axis's reduce-scatter.
    let mut sizes = Vec::new();
    let mut size = bytes;
    for &a in &axes {
        sizes.push(size);
        size /= topo.dims[a] as f64;
    }
    if matches!(collective, Collective::AllReduce | Collective::ReduceScatter) {
        for (&a, &s) in axes.iter().zip(&sizes) {
            ring_pass(net, a, s, &mut ready);
        }
    }
    if matches!(collective, Collective::AllReduce | Collective::AllGather) {
        for (&a, &s) in axes.iter().zip(&sizes).rev() {
            ring_pass(net, a, s, &mut ready);
        }
    }
    ready
}

/// The closed form on unloaded rings with wraparound: per axis of `n` chips holding `b`
/// bytes, a pass is `(n − 1) · (b / (2n) / bandwidth + hop latency)`; an all-reduce is a
/// reduce-scatter and an all-gather.
pub fn closed_form(topo: &Topology, collective: Collective, bytes: f64) -> f64 {
    let Some(link) = topo.links.first() else { return 0.0 };
    let (bw, hop) = (link.bytes_per_second, link.latency_seconds);
    let mut size = bytes;
    let mut pass = 0.0;
    for &n in topo.dims.iter().filter(|&&n| n > 1) {
        pass += (n - 1) as f64 * (size / (2 * n) as f64 / bw + hop);
        size /= n as f64;
    }
    match collective {
        Collective::AllReduce => 2.0 * pass,
        Collective::ReduceScatter | Collective::AllGather => pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    fn slowest(times: &[f64]) -> f64 {
        times.iter().copied().fold(0.0, f64::max)
    }

    #[test]
    fn unloaded_tori_take_the_closed_form() {
        // A 32x32 torus (v3-2048), a 4x4x4 cube (v4-128), a 4x4x8 torus (v4-256): every
        // collective, large and small, equals its closed form.
        for name in ["v3-2048", "v4-128", "v4-256"] {
            let t = Topology::of(&presets::preset(name).unwrap()).unwrap();
            for collective in [Collective::AllReduce, Collective::ReduceScatter, Collective::AllGather] {
                for bytes in [1e3, 1e8] {
                    let mut net = Network::new(&t, f64::INFINITY);
                    let got = slowest(&run(&mut net, collective, bytes, 0.0));
                    let want = closed_form(&t, collective, bytes);
                    assert!((got - want).abs() <= 1e-9 * want, "{name} {collective:?} {bytes}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn meshes_are_slower_and_shared_links_queue() {
        // A 4x4 mesh (v3-32): each ring closes through the line back, over the links the other
        // direction uses — slower than the torus's closed form, at most about twice it.
        let t = Topology::of(&presets::preset("v3-32").unwrap()).unwrap();
        let mut net = Network::new(&t, 1e6);
        let mesh = slowest(&run(&mut net, Collective::AllReduce, 1e8, 0.0));
        let torus = closed_form(&t, Collective::AllReduce, 1e8);
        assert!(mesh > 1.3 * torus && mesh < 2.2 * torus, "{mesh} vs {torus}");
        // Two all-reduces at once on a torus share every link: the second finishes about
        // when two back to back would.
        let t = Topology::of(&presets::preset("v3-2048").unwrap()).unwrap();
        let one = closed_form(&t, Collective::AllReduce, 1e8);
        let mut net = Network::new(&t, 1e6);
        run(&mut net, Collective::AllReduce, 1e8, 0.0);
        let second = slowest(&run(&mut net, Collective::AllReduce, 1e8, 0.0));
        assert!(second > 1.9 * one && second < 2.1 * one, "{second} vs {one}");
        // The busiest links are on the first axis: per all-reduce, 2 · 31 steps of 1e8 / 64 B.
        let busiest = net.stats[net.busiest()[0]];
        assert_eq!(t.links[net.busiest()[0]].axis, 0);
        assert!((busiest.bytes - 2.0 * 2.0 * 31.0 * 1e8 / 64.0).abs() < 1e-3, "{busiest:?}");
    }
}

//! Collectives between the chips of a slice, timed on the [`Network`]: reduce-scatter,
//! all-gather and all-reduce (the two in turn), axis by axis as rings — every ring of an axis
//! at once, each bidirectional (half the bytes go up the ring, half down, on separate links).
//! An all-reduce reduce-scatters along the axes in order, each axis on what the previous left
//! per chip, then all-gathers back in reverse, as TPU pods reduce gradients over the 2-D torus
//! (rows, then columns; docs/architecture.md). A ring of `n` chips takes `n − 1` steps; in each,
//! every chip sends its neighbour `1/n` of its half and the next step waits for what arrived.
//! On a mesh axis (no wraparound) the ring closes through the line back, sharing the links of
//! the other direction, hence slower. [`all_reduce_values`] computes what an all-reduce leaves,
//! summed in the algorithm's order. (The time between the cores of a chip, and the values of
//! reduce-scatter and all-gather with their shard layout, come next.)

use crate::error::{Error, Result};
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
fn ring_pass(net: &mut Network, axis: usize, bytes: f64, ready: &mut [f64]) -> Result<()> {
    let topo = net.topology;
    let n = topo.dims[axis];
    if n < 2 {
        return Ok(());
    }
    let rings: Vec<Vec<usize>> =
        (0..topo.chips()).filter(|&c| topo.coords(c)[axis] == 0).map(|c| topo.ring(c, axis)).collect();
    let share = bytes / (2 * n) as f64;
    // Every step sends over the same routes: (direction, from, to, route), found once.
    let mut sends = Vec::with_capacity(rings.len() * 2 * n);
    for ring in &rings {
        for (d, hop) in [(0, 1), (1, n - 1)] {
            for i in 0..n {
                let (from, to) = (ring[i], ring[(i + hop) % n]);
                let route = topo.route(from, to);
                if route.is_empty() {
                    return Err(Error::Config {
                        field: "slice.links".into(),
                        reason: format!(
                            "chip {:?} cannot reach chip {:?}: failed links cut the slice",
                            topo.coords(from),
                            topo.coords(to)
                        ),
                    });
                }
                sends.push((d, from, to, route));
            }
        }
    }
    // Per direction (up the ring, down the ring): when each chip has what it sends next.
    let mut at = [ready.to_vec(), ready.to_vec()];
    for _step in 1..n {
        let mut next = at.clone();
        for (d, from, to, route) in &sends {
            next[*d][*to] = net.send(route, share, at[*d][*from]);
        }
        at = next;
    }
    for ring in &rings {
        for &chip in ring {
            ready[chip] = at[0][chip].max(at[1][chip]);
        }
    }
    Ok(())
}

/// Runs `collective` over every chip of the slice, `bytes` per chip (what each holds before an
/// all-reduce or reduce-scatter, after an all-gather), all ready at `start`; returns when each
/// chip is done — or an error when failed links leave a ring's chips unable to reach each other.
pub fn run(net: &mut Network, collective: Collective, bytes: f64, start: f64) -> Result<Vec<f64>> {
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
            ring_pass(net, a, s, &mut ready)?;
        }
    }
    if matches!(collective, Collective::AllReduce | Collective::AllGather) {
        for (&a, &s) in axes.iter().zip(&sizes).rev() {
            ring_pass(net, a, s, &mut ready)?;
        }
    }
    Ok(ready)
}

/// How an all-reduce combines the replicas' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Sum,
    /// The sum divided by the number of cores (TensorFlow's `CrossShardOptimizer` default).
    Mean,
}

/// The values an all-reduce leaves on every core, `values[core]` being each core's (equal
/// lengths): summed as the algorithm sums them, so every run and thread count gives the same
/// bits. The cores of a chip first (in core order); then per axis, every ring reduce-scatters
/// what its chips hold, half the elements up the ring and half down, each half cut into
/// `n` chunks; chunk `c` of the up half is summed from the chip after its owner (ring
/// position `c`) round to the owner, the down half the other way; the next axis works on what
/// each chip owns. The all-gather copies the owners' sums back to every core.
pub fn all_reduce_values(topo: &Topology, values: &[Vec<f32>], reduction: Reduction) -> Vec<Vec<f32>> {
    let len = values.first().map_or(0, Vec::len);
    assert!(
        values.len() == topo.cores() && values.iter().all(|v| v.len() == len),
        "one vector per core, equal lengths"
    );
    // Each chip's cores, summed in core order.
    let mut chips: Vec<Vec<f32>> = (0..topo.chips())
        .map(|chip| {
            let mut acc = values[chip * topo.cores_per_chip].clone();
            for core in 1..topo.cores_per_chip {
                for (a, &v) in acc.iter_mut().zip(&values[chip * topo.cores_per_chip + core]) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    // The elements each chip owns (the same along every ring of the next axis).
    let mut owned: Vec<Vec<usize>> = vec![(0..len).collect(); topo.chips()];
    for axis in (0..topo.dims.len()).filter(|&a| topo.dims[a] > 1) {
        let n = topo.dims[axis];
        let mut next_owned = owned.clone();
        for ring in (0..topo.chips()).filter(|&c| topo.coords(c)[axis] == 0).map(|c| topo.ring(c, axis)) {
            let elements = owned[ring[0]].clone();
            let (up, down) = elements.split_at(elements.len().div_ceil(2));
            for p in 0..n {
                next_owned[ring[p]].clear();
            }
            for (half, step) in [(up, 1), (down, n - 1)] {
                for (c, chunk) in chunks(half, n).into_iter().enumerate() {
                    // From the chip after the owner, round to the owner.
                    for &e in chunk {
                        let mut acc = chips[ring[(c + step) % n]][e];
                        for k in 2..=n {
                            acc += chips[ring[(c + k * step) % n]][e];
                        }
                        chips[ring[c]][e] = acc;
                    }
                    next_owned[ring[c]].extend_from_slice(chunk);
                }
            }
        }
        owned = next_owned;
    }
    // The all-gather: every element from its owner.
    let mut total = vec![0f32; len];
    for (chip, elements) in owned.iter().enumerate() {
        for &e in elements {
            total[e] = chips[chip][e];
        }
    }
    if reduction == Reduction::Mean {
        let n = topo.cores() as f32;
        total.iter_mut().for_each(|v| *v /= n);
    }
    vec![total; topo.cores()]
}

/// `items` cut into `n` chunks as even as can be, the first ones one longer.
fn chunks<T>(items: &[T], n: usize) -> Vec<&[T]> {
    let (base, extra) = (items.len() / n, items.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for c in 0..n {
        let size = base + usize::from(c < extra);
        out.push(&items[at..at + size]);
        at += size;
    }
    out
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
    use crate::pod::topology::Direction;

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
                    let got = slowest(&run(&mut net, collective, bytes, 0.0).unwrap());
                    let want = closed_form(&t, collective, bytes);
                    assert!((got - want).abs() <= 1e-9 * want, "{name} {collective:?} {bytes}: {got} vs {want}");
                }
            }
        }
    }

    /// Every core's vector: integers, so that sums in any order are exact.
    fn integers(topo: &Topology, len: usize) -> Vec<Vec<f32>> {
        (0..topo.cores()).map(|core| (0..len).map(|e| ((core * 7 + e * 3) % 11) as f32 - 5.0).collect()).collect()
    }

    #[test]
    fn all_reduce_values_are_the_sums_on_boards_tori_and_cubes() {
        // v2-8 (a 2x2 board), a 4x4 torus (v3-32 with wraparound), a 4x4x4 cube (v4-128).
        let mut torus = presets::preset("v3-32").unwrap();
        torus.slice.wraparound = vec![true, true];
        for m in [presets::preset("v2-8").unwrap(), torus, presets::preset("v4-128").unwrap()] {
            let t = Topology::of(&m).unwrap();
            for len in [1, 7, 100] {
                let values = integers(&t, len);
                let sum: Vec<f32> = (0..len).map(|e| values.iter().map(|v| v[e]).sum()).collect();
                let got = all_reduce_values(&t, &values, Reduction::Sum);
                assert!(got.iter().all(|v| *v == sum), "{} {len}", m.name);
                let mean: Vec<f32> = sum.iter().map(|s| s / t.cores() as f32).collect();
                assert!(all_reduce_values(&t, &values, Reduction::Mean).iter().all(|v| *v == mean), "{}", m.name);
            }
        }
    }

    #[test]
    fn all_reduce_values_keep_their_order() {
        // Values whose sum depends on the order: the same bits every run, on every core, and
        // the order is the rings' (v3-32, 4x4 chips, checked for the first element: chunk 0 of
        // the up half on both axes, summed from position 1 round to 0).
        let t = Topology::of(&presets::preset("v3-32").unwrap()).unwrap();
        let values: Vec<Vec<f32>> =
            (0..t.cores()).map(|c| (0..64).map(|e| 1.0 + (c * 64 + e) as f32 * 1e-3).collect()).collect();
        let a = all_reduce_values(&t, &values, Reduction::Sum);
        let b = all_reduce_values(&t, &values, Reduction::Sum);
        assert!(a.iter().zip(&b).all(|(x, y)| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())));
        assert!(a.iter().all(|v| v == &a[0]));
        // Element 0: each chip's two cores, then along axis 0 from position 1 round to 0,
        // then the same along axis 1, in f32.
        let chip = |x: usize, y: usize| {
            let c = t.chip_at(&[x, y]);
            values[2 * c][0] + values[2 * c + 1][0]
        };
        let order = [1, 2, 3, 0];
        let column = |y: usize| order[1..].iter().fold(chip(order[0], y), |acc, &x| acc + chip(x, y));
        let want = order[1..].iter().fold(column(order[0]), |acc, &y| acc + column(y));
        assert_eq!(a[0][0].to_bits(), want.to_bits(), "{} vs {want}", a[0][0]);
    }

    #[test]
    fn degraded_and_failed_links_slow_the_collective() {
        let m = presets::preset("v3-2048").unwrap();
        let healthy = Topology::of(&m).unwrap();
        let want = closed_form(&healthy, Collective::AllReduce, 1e8);
        let time = |t: &Topology| slowest(&run(&mut Network::new(t, 1e6), Collective::AllReduce, 1e8, 0.0).unwrap());
        // One link at half bandwidth: its ring waits for it at every step of the first axis.
        let mut t = healthy.clone();
        t.degrade(t.link(t.chip_at(&[3, 3]), 0, Direction::Up).unwrap(), 41e9);
        let degraded = time(&t);
        assert!(degraded > 1.5 * want, "{degraded} vs {want}");
        // One failed link: its traffic detours through a neighbouring ring and queues there.
        let mut t = healthy.clone();
        t.fail(t.link(t.chip_at(&[3, 3]), 0, Direction::Up).unwrap());
        let failed = time(&t);
        assert!(failed > 1.1 * want, "{failed} vs {want}");
        // Links cut in every way across an axis: the collective cannot run, and says why.
        let mut t = Topology::of(&presets::preset("v3-32").unwrap()).unwrap();
        for chip in 0..t.chips() {
            for d in [Direction::Up, Direction::Down] {
                if let Some(l) = t.link(chip, 0, d) {
                    t.fail(l);
                }
            }
        }
        let e = run(&mut Network::new(&t, 1e6), Collective::AllReduce, 1e6, 0.0).unwrap_err();
        assert!(e.to_string().contains("failed links cut the slice"), "{e}");
    }

    #[test]
    fn meshes_are_slower_and_shared_links_queue() {
        // A 4x4 mesh (v3-32): each ring closes through the line back, over the links the other
        // direction uses — slower than the torus's closed form, at most about twice it.
        let t = Topology::of(&presets::preset("v3-32").unwrap()).unwrap();
        let mut net = Network::new(&t, 1e6);
        let mesh = slowest(&run(&mut net, Collective::AllReduce, 1e8, 0.0).unwrap());
        let torus = closed_form(&t, Collective::AllReduce, 1e8);
        assert!(mesh > 1.3 * torus && mesh < 2.2 * torus, "{mesh} vs {torus}");
        // Two all-reduces at once on a torus share every link: the second finishes about
        // when two back to back would.
        let t = Topology::of(&presets::preset("v3-2048").unwrap()).unwrap();
        let one = closed_form(&t, Collective::AllReduce, 1e8);
        let mut net = Network::new(&t, 1e6);
        run(&mut net, Collective::AllReduce, 1e8, 0.0).unwrap();
        let second = slowest(&run(&mut net, Collective::AllReduce, 1e8, 0.0).unwrap());
        assert!(second > 1.9 * one && second < 2.1 * one, "{second} vs {one}");
        // The busiest links are on the first axis: per all-reduce, 2 · 31 steps of 1e8 / 64 B.
        let busiest = net.stats[net.busiest()[0]];
        assert_eq!(t.links[net.busiest()[0]].axis, 0);
        assert!((busiest.bytes - 2.0 * 2.0 * 31.0 * 1e8 / 64.0).abs() < 1e-3, "{busiest:?}");
    }
}

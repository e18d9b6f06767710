//! Collectives over a group of a slice's cores: reduce-scatter, all-gather and all-reduce
//! (the two in turn) first between the cores of each chip, then axis by axis as rings over
//! the group's box of chips — every ring of an axis at once, each bidirectional (half the
//! bytes go up the ring, half down, on separate links) — as TPU pods reduce gradients over the
//! 2-D torus (rows, then columns; docs/architecture.md); broadcast as chunked chains from the
//! group's first chip, axis by axis. A ring of `n` chips takes `n − 1` steps; in each, every
//! chip sends its neighbour `1/n` of its half and the next step waits for what arrived. On a
//! mesh axis (no wraparound), or a box shorter than its axis, the ring is folded over the line
//! (out over every other chip, back over the rest: `Group::rings`), so a step is at most two
//! hops but both rings share each link — about twice the torus's time, bandwidth and latency
//! alike. [`values`] computes what each collective leaves on every member, summed in the
//! algorithm's order.

use crate::error::{Error, Result};
pub use crate::isa::{CollectiveKind as Collective, Reduction};
use crate::pod::network::Network;
use crate::pod::topology::{Group, Topology};

/// One ring pass over `rings` (chips of the slice): `n − 1` steps of every ring at once, each
/// chip sending `bytes / (2n)` each way per step. `ready[chip]` is when each chip may start;
/// on return, when each has what the pass delivers.
fn ring_pass(net: &mut Network, rings: &[Vec<usize>], bytes: f64, ready: &mut [f64]) -> Result<()> {
    let topo = net.topology;
    let n = rings.first().map_or(0, Vec::len);
    if n < 2 {
        return Ok(());
    }
    let share = bytes / (2 * n) as f64;
    // Every step sends over the same routes: (direction, from, to, route), found once.
    let mut sends = Vec::with_capacity(rings.len() * 2 * n);
    for ring in rings {
        for (d, hop) in [(0, 1), (1, n - 1)] {
            for i in 0..n {
                let (from, to) = (ring[i], ring[(i + hop) % n]);
                sends.push((d, from, to, reach(topo, from, to)?));
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
    for ring in rings {
        for &chip in ring {
            ready[chip] = at[0][chip].max(at[1][chip]);
        }
    }
    Ok(())
}

/// The route from `from` to `to`, or the error of a slice cut by failed links.
fn reach(topo: &Topology, from: usize, to: usize) -> Result<Vec<usize>> {
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
    Ok(route)
}

/// The group's rings along `axis` (`Group::rings`), as chips of the slice.
fn rings(topo: &Topology, group: &Group, axis: usize, keep: impl Fn(&[usize]) -> bool) -> Vec<Vec<usize>> {
    let chips = |line: Vec<usize>| line.into_iter().map(|l| group.chip(topo, l)).collect();
    group.rings(axis, keep).into_iter().map(chips).collect()
}

/// Runs `collective` over `group`, `bytes` per core (what each holds before an all-reduce,
/// reduce-scatter or broadcast, after an all-gather). `ready[chip]` (indexed by the slice's
/// chips; only the group's are read and written) is when each chip's cores may start; on
/// return, when each has its result. An error when failed links leave chips unable to reach
/// each other.
pub fn run(net: &mut Network, group: &Group, collective: Collective, bytes: f64, ready: &mut [f64]) -> Result<()> {
    let topo = net.topology;
    let chips: Vec<usize> = (0..group.chips()).map(|l| group.chip(topo, l)).collect();
    // Between the cores of a chip: a ring over the chip's shared path, (k − 1)/k of the bytes.
    let k = group.cores_per_chip as f64;
    let on_chip = (k - 1.0) / k * bytes / topo.core_bytes_per_second;
    let axes: Vec<usize> = (0..group.dims.len()).filter(|&a| group.dims[a] > 1).collect();
    if collective == Collective::Shard {
        // Each core copies its own shard within its HBM: read and written once, no traffic.
        let copy = 2.0 * bytes / group.cores() as f64 / topo.core_bytes_per_second;
        chips.iter().for_each(|&c| ready[c] += copy);
        return Ok(());
    }
    if collective == Collective::Broadcast {
        broadcast(net, group, &axes, bytes, ready)?;
        if group.cores_per_chip > 1 {
            chips.iter().for_each(|&c| ready[c] += bytes / topo.core_bytes_per_second);
        }
        return Ok(());
    }
    // What each chip holds entering each axis's reduce-scatter.
    let mut sizes = Vec::new();
    let mut size = bytes;
    for &a in &axes {
        sizes.push(size);
        size /= group.dims[a] as f64;
    }
    if collective.reduces() {
        chips.iter().for_each(|&c| ready[c] += on_chip);
        for (&a, &s) in axes.iter().zip(&sizes) {
            ring_pass(net, &rings(topo, group, a, |_| true), s, ready)?;
        }
    }
    if matches!(collective, Collective::AllReduce | Collective::AllGather) {
        for (&a, &s) in axes.iter().zip(&sizes).rev() {
            ring_pass(net, &rings(topo, group, a, |_| true), s, ready)?;
        }
        chips.iter().for_each(|&c| ready[c] += on_chip);
    }
    Ok(())
}

/// A broadcast from the group's first chip: axis by axis, every chip holding the bytes sends
/// them along its line in chunks, chip to chip (both ways round on a full ring), so the
/// chunks pipeline over the hops.
fn broadcast(net: &mut Network, group: &Group, axes: &[usize], bytes: f64, ready: &mut [f64]) -> Result<()> {
    let topo = net.topology;
    let chunks = (bytes / net.chunk_bytes).ceil().max(1.0) as usize;
    for &a in axes {
        let n = group.dims[a];
        // The lines through the chips that hold the bytes: coordinate 0 on every later axis.
        let holders = group.lines(a, |c| c[a + 1..].iter().all(|&x| x == 0));
        for line in holders.into_iter().map(|l| l.into_iter().map(|c| group.chip(topo, c)).collect::<Vec<_>>()) {
            let chains: Vec<Vec<usize>> = if group.wraps[a] {
                // Half the ring up from the root, the rest down from it.
                let up = n / 2;
                let down = std::iter::once(line[0]).chain(line[up + 1..].iter().rev().copied()).collect();
                vec![line[..=up].to_vec(), down]
            } else {
                vec![line]
            };
            for chain in chains {
                let routes: Vec<Vec<usize>> =
                    chain.windows(2).map(|w| reach(topo, w[0], w[1])).collect::<Result<_>>()?;
                let start = ready[chain[0]];
                let mut arrival = vec![start; chain.len()];
                for c in 0..chunks {
                    let size = (bytes - c as f64 * net.chunk_bytes).min(net.chunk_bytes);
                    let mut at = start;
                    for (h, route) in routes.iter().enumerate() {
                        at = net.send(route, size, at);
                        arrival[h + 1] = at;
                    }
                }
                for (i, &chip) in chain.iter().enumerate().skip(1) {
                    ready[chip] = arrival[i];
                }
            }
        }
    }
    Ok(())
}

/// What each member of `group` holds after `collective`: `members[r]` is the operand of the
/// group's member `r` (equal lengths), replaced by its result. Sums follow the algorithm: the
/// cores of a chip first (in core order); then per axis, every ring reduce-scatters what its
/// chips hold, half the elements up the ring and half down, each half cut into `n` chunks;
/// chunk `c` of the up half is summed from the chip after its owner (ring position `c`)
/// round to the owner, the down half the other way; the next axis works on what each chip
/// owns. So every run and thread count gives the same bits, and a reduce-scatter's shard has
/// the bits the all-reduce gives there. Shards are [`shards`] of the operand.
pub fn values(group: &Group, collective: Collective, reduction: Reduction, members: &mut [Vec<f32>]) {
    let len = members.first().map_or(0, Vec::len);
    assert!(
        members.len() == group.cores() && members.iter().all(|v| v.len() == len),
        "one vector per member, equal lengths"
    );
    let n = members.len();
    let shard = shards(len, n);
    match collective {
        // Each member's own shard, where the caller puts it: the operands stay.
        Collective::Shard => {}
        Collective::Broadcast => {
            let root = members[0].clone();
            members.iter_mut().for_each(|m| m.clone_from(&root));
        }
        Collective::AllGather => {
            let mut all = vec![0f32; len];
            for (r, range) in shard.iter().enumerate() {
                all[range.clone()].copy_from_slice(&members[r][range.clone()]);
            }
            members.iter_mut().for_each(|m| m.clone_from(&all));
        }
        Collective::AllReduce | Collective::ReduceScatter => {
            let mut total = reduced(group, members);
            if reduction == Reduction::Mean {
                total.iter_mut().for_each(|v| *v /= n as f32);
            }
            if collective == Collective::AllReduce {
                members.iter_mut().for_each(|m| m.clone_from(&total));
            } else {
                for (m, range) in members.iter_mut().zip(&shard) {
                    m[range.clone()].copy_from_slice(&total[range.clone()]);
                }
            }
        }
    }
}

/// The element ranges of `n` shards of `len` elements, as even as can be, the first ones one
/// longer.
pub fn shards(len: usize, n: usize) -> Vec<std::ops::Range<usize>> {
    let (base, extra) = (len / n, len % n);
    let mut at = 0;
    (0..n)
        .map(|c| {
            let size = base + usize::from(c < extra);
            at += size;
            at - size..at
        })
        .collect()
}

/// The sum over the members, in the all-reduce's order.
fn reduced(group: &Group, members: &[Vec<f32>]) -> Vec<f32> {
    let len = members[0].len();
    let k = group.cores_per_chip;
    // Each chip's cores, summed in core order (local chip indices).
    let mut chips: Vec<Vec<f32>> = (0..group.chips())
        .map(|chip| {
            let mut acc = members[chip * k].clone();
            for core in 1..k {
                for (a, &v) in acc.iter_mut().zip(&members[chip * k + core]) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    // The elements each chip owns (the same along every ring of the next axis).
    let mut owned: Vec<Vec<usize>> = vec![(0..len).collect(); group.chips()];
    for axis in (0..group.dims.len()).filter(|&a| group.dims[a] > 1) {
        let n = group.dims[axis];
        let mut next_owned = owned.clone();
        for ring in group.rings(axis, |_| true) {
            let elements = owned[ring[0]].clone();
            let (up, down) = elements.split_at(elements.len().div_ceil(2));
            for p in 0..n {
                next_owned[ring[p]].clear();
            }
            for (half, step) in [(up, 1), (down, n - 1)] {
                for (c, range) in shards(half.len(), n).into_iter().enumerate() {
                    // From the chip after the owner, round to the owner.
                    for &e in &half[range.clone()] {
                        let mut acc = chips[ring[(c + step) % n]][e];
                        for k in 2..=n {
                            acc += chips[ring[(c + k * step) % n]][e];
                        }
                        chips[ring[c]][e] = acc;
                    }
                    next_owned[ring[c]].extend_from_slice(&half[range]);
                }
            }
        }
        owned = next_owned;
    }
    let mut total = vec![0f32; len];
    for (chip, elements) in owned.iter().enumerate() {
        for &e in elements {
            total[e] = chips[chip][e];
        }
    }
    total
}

/// The closed form on unloaded rings: between a chip's `k` cores, `(k − 1)/k · bytes` over the
/// on-chip bandwidth; per axis of `n` chips holding `b` bytes, a pass is
/// `(n − 1) · (b / (2n) / bandwidth + hop latency)` where the axis wraps, twice that where the
/// ring is folded over a line (both rings on every link, two hops a step) — there a lower
/// bound: chunks pipelining over the two hops and the rings queueing on shared links add up to
/// 5%; an all-reduce is a reduce-scatter
/// and an all-gather; a shard is a local copy of `bytes / members` (read and written). (Broadcast
/// has no closed form here.)
pub fn closed_form(topo: &Topology, group: &Group, collective: Collective, bytes: f64) -> f64 {
    if collective == Collective::Shard {
        return 2.0 * bytes / group.cores() as f64 / topo.core_bytes_per_second;
    }
    let k = group.cores_per_chip as f64;
    let on_chip = (k - 1.0) / k * bytes / topo.core_bytes_per_second;
    let Some(link) = topo.links.first() else { return on_chip };
    let (bw, hop) = (link.bytes_per_second, link.latency_seconds);
    let mut size = bytes;
    let mut pass = 0.0;
    for (&n, &wraps) in group.dims.iter().zip(&group.wraps).filter(|(n, _)| **n > 1) {
        // Folded: both rings on every link (twice the bytes), two hops a step beyond two chips.
        let (bytes, hops) = match (wraps, n) {
            (true, _) => (1.0, 1.0),
            (false, 2) => (2.0, 1.0),
            (false, _) => (2.0, 2.0),
        };
        pass += (n - 1) as f64 * (bytes * size / (2 * n) as f64 / bw + hops * hop);
        size /= n as f64;
    }
    match collective {
        Collective::AllReduce => 2.0 * (pass + on_chip),
        Collective::ReduceScatter | Collective::AllGather | Collective::Broadcast => pass + on_chip,
        Collective::Shard => unreachable!("returned above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;
    use crate::pod::topology::Direction;

    /// When the last chip of the whole slice is done with `collective` from time 0.
    fn time(net: &mut Network, collective: Collective, bytes: f64) -> Result<f64> {
        let topo = net.topology;
        let mut ready = vec![0.0; topo.chips()];
        run(net, &topo.whole(), collective, bytes, &mut ready)?;
        Ok(ready.into_iter().fold(0.0, f64::max))
    }

    #[test]
    fn unloaded_tori_take_the_closed_form() {
        // A 32x32 torus (v3-2048), a 4x4x4 cube (v4-128), a 4x4x8 torus (v4-256): every
        // collective, large and small, equals its closed form; so do the groups of a row of
        // 32 chips and of one chip's two cores.
        for name in ["v3-2048", "v4-128", "v4-256"] {
            let t = Topology::of(&presets::preset(name).unwrap()).unwrap();
            for collective in [Collective::AllReduce, Collective::ReduceScatter, Collective::AllGather] {
                for bytes in [1e3, 1e8] {
                    let mut net = Network::new(&t, f64::INFINITY);
                    let got = time(&mut net, collective, bytes).unwrap();
                    let want = closed_form(&t, &t.whole(), collective, bytes);
                    assert!((got - want).abs() <= 1e-9 * want, "{name} {collective:?} {bytes}: {got} vs {want}");
                }
            }
        }
        let t = Topology::of(&presets::preset("v3-2048").unwrap()).unwrap();
        for size in [2, 64] {
            let group = &t.groups(size).unwrap()[3];
            let mut ready = vec![0.0; t.chips()];
            run(&mut Network::new(&t, f64::INFINITY), group, Collective::AllReduce, 1e8, &mut ready).unwrap();
            let got = ready.iter().copied().fold(0.0, f64::max);
            let want = closed_form(&t, group, Collective::AllReduce, 1e8);
            assert!((got - want).abs() <= 1e-9 * want, "group of {size}: {got} vs {want}");
            // Only the group's chips took part.
            assert_eq!(ready.iter().filter(|&&r| r > 0.0).count(), group.chips());
        }
    }

    /// Every core's vector: integers, so that sums in any order are exact.
    fn integers(cores: usize, len: usize) -> Vec<Vec<f32>> {
        (0..cores).map(|core| (0..len).map(|e| ((core * 7 + e * 3) % 11) as f32 - 5.0).collect()).collect()
    }

    #[test]
    fn collective_values_are_exact_on_boards_tori_and_cubes() {
        // v2-8 (a 2x2 board), a 4x4 torus (v3-32 with wraparound), a 4x4x4 cube (v4-128),
        // and groups of 8 within the torus: sums and means, shards and gathers, broadcasts.
        let mut torus = presets::preset("v3-32").unwrap();
        torus.slice.wraparound = vec![true, true];
        let t = Topology::of(&torus).unwrap();
        let mut groups: Vec<Group> =
            ["v2-8", "v4-128"].iter().map(|n| Topology::of(&presets::preset(n).unwrap()).unwrap().whole()).collect();
        groups.push(t.whole());
        groups.push(t.groups(8).unwrap()[2].clone());
        for group in &groups {
            let n = group.cores();
            for len in [1, 7, 100] {
                let operands = integers(n, len);
                let sum: Vec<f32> = (0..len).map(|e| operands.iter().map(|v| v[e]).sum()).collect();
                let mean: Vec<f32> = sum.iter().map(|s| s / n as f32).collect();
                for (reduction, want) in [(Reduction::Sum, &sum), (Reduction::Mean, &mean)] {
                    let mut m = operands.clone();
                    values(group, Collective::AllReduce, reduction, &mut m);
                    assert!(m.iter().all(|v| v == want), "{group:?} {len} {reduction:?}");
                    let mut m = operands.clone();
                    values(group, Collective::ReduceScatter, reduction, &mut m);
                    for (r, range) in shards(len, n).into_iter().enumerate() {
                        assert_eq!(m[r][range.clone()], want[range.clone()], "{group:?} {len} shard {r}");
                        // Outside its shard, a member's operand is left as it was.
                        assert_eq!(m[r][range.end..], operands[r][range.end..]);
                    }
                    // All-gathering the shards gives every member the whole reduction.
                    values(group, Collective::AllGather, Reduction::Sum, &mut m);
                    assert!(m.iter().all(|v| v == want), "{group:?} {len} gather");
                }
                let mut m = operands.clone();
                values(group, Collective::Broadcast, Reduction::Sum, &mut m);
                assert!(m.iter().all(|v| *v == operands[0]));
            }
        }
    }

    #[test]
    fn all_reduce_values_keep_their_order() {
        // Values whose sum depends on the order: the same bits every run, on every core, and
        // the order is the rings' (v3-32, 4x4 chips, checked for the first element: chunk 0 of
        // the up half on both axes, summed from ring position 1 round to 0); a reduce-scatter's
        // shard has the all-reduce's bits.
        let t = Topology::of(&presets::preset("v3-32").unwrap()).unwrap();
        let operands: Vec<Vec<f32>> =
            (0..t.cores()).map(|c| (0..64).map(|e| 1.0 + (c * 64 + e) as f32 * 1e-3).collect()).collect();
        let all_reduce = || {
            let mut m = operands.clone();
            values(&t.whole(), Collective::AllReduce, Reduction::Sum, &mut m);
            m
        };
        let (a, b) = (all_reduce(), all_reduce());
        assert!(a.iter().zip(&b).all(|(x, y)| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())));
        assert!(a.iter().all(|v| v == &a[0]));
        let mut rs = operands.clone();
        values(&t.whole(), Collective::ReduceScatter, Reduction::Sum, &mut rs);
        for (r, range) in shards(64, t.cores()).into_iter().enumerate() {
            assert!(rs[r][range.clone()].iter().zip(&a[0][range]).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
        // Element 0: each chip's two cores, then along axis 0 from ring position 1 round to 0,
        // then the same along axis 1, in f32. v3-32 is a mesh: the ring is folded over the
        // line (chips 0, 2, 3, 1), so position 1 round to 0 is chips 2, 3, 1, 0.
        let chip = |x: usize, y: usize| {
            let c = t.chip_at(&[x, y]);
            operands[2 * c][0] + operands[2 * c + 1][0]
        };
        let order = [2, 3, 1, 0];
        let column = |y: usize| order[1..].iter().fold(chip(order[0], y), |acc, &x| acc + chip(x, y));
        let want = order[1..].iter().fold(column(order[0]), |acc, &y| acc + column(y));
        assert_eq!(a[0][0].to_bits(), want.to_bits(), "{} vs {want}", a[0][0]);
    }

    #[test]
    fn broadcasts_stream_down_lines() {
        // A 4-chip line of v3-32's first row (a group of 8): 100 MB in 1 MB chunks reach the
        // far end after the bytes once plus two more chunks and three hop latencies, plus the
        // copy to each chip's second core.
        let t = Topology::of(&presets::preset("v3-32").unwrap()).unwrap();
        let (bw, hop) = (t.links[0].bytes_per_second, t.links[0].latency_seconds);
        let group = &t.groups(8).unwrap()[0];
        let mut ready = vec![0.0; t.chips()];
        run(&mut Network::new(&t, 1e6), group, Collective::Broadcast, 1e8, &mut ready).unwrap();
        let want = 1e8 / bw + 2.0 * 1e6 / bw + 3.0 * hop + 1e8 / t.core_bytes_per_second;
        let got = ready[t.chip_at(&[0, 3])];
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn degraded_and_failed_links_slow_the_collective() {
        let m = presets::preset("v3-2048").unwrap();
        let healthy = Topology::of(&m).unwrap();
        let want = closed_form(&healthy, &healthy.whole(), Collective::AllReduce, 1e8);
        let slowest = |t: &Topology| time(&mut Network::new(t, 1e6), Collective::AllReduce, 1e8).unwrap();
        // One link at half bandwidth: its ring waits for it at every step of the first axis.
        let mut t = healthy.clone();
        t.degrade(t.link(t.chip_at(&[3, 3]), 0, Direction::Up).unwrap(), 41e9);
        let degraded = slowest(&t);
        assert!(degraded > 1.5 * want, "{degraded} vs {want}");
        // One failed link: its traffic detours through a neighbouring ring and queues there.
        let mut t = healthy.clone();
        t.fail(t.link(t.chip_at(&[3, 3]), 0, Direction::Up).unwrap());
        let failed = slowest(&t);
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
        let e = time(&mut Network::new(&t, 1e6), Collective::AllReduce, 1e6).unwrap_err();
        assert!(e.to_string().contains("failed links cut the slice"), "{e}");
    }

    #[test]
    fn meshes_are_slower_and_shared_links_queue() {
        // Meshes: each ring folded over its line shares the links with the other direction's
        // — bandwidth-bound (100 MB on v3-32, on v4-64's 4x4x2) and latency-bound (6 kB on a
        // 16x16 mesh: two hops a step, not the fifteen of a ring closed through the line
        // back): at the folded closed form or up to 6% over it (chunks pipelining over two
        // hops, the rings queueing), about twice the torus's.
        for (slice, bytes) in [("v3-32", 1e8), ("v3-512", 6e3), ("v4-64", 1e8)] {
            let t = Topology::of(&presets::preset(slice).unwrap()).unwrap();
            for collective in [Collective::AllReduce, Collective::ReduceScatter, Collective::AllGather] {
                let mesh = time(&mut Network::new(&t, 1e6), collective, bytes).unwrap();
                let folded = closed_form(&t, &t.whole(), collective, bytes);
                let over = mesh / folded - 1.0;
                assert!((-1e-9..0.06).contains(&over), "{slice} {collective:?}: {mesh} vs {folded}");
                let torus = Group { wraps: vec![true; t.dims.len()], ..t.whole() };
                assert!(mesh > 1.6 * closed_form(&t, &torus, collective, bytes), "{slice} {collective:?}");
            }
        }
        // Two all-reduces at once on a torus share every link: the second finishes about
        // when its links would have carried both (its steps between a chip's cores overlap).
        let t = Topology::of(&presets::preset("v3-2048").unwrap()).unwrap();
        let one = closed_form(&t, &t.whole(), Collective::AllReduce, 1e8);
        let links_only = closed_form(&t, &Group { cores_per_chip: 1, ..t.whole() }, Collective::AllReduce, 1e8);
        let mut net = Network::new(&t, 1e6);
        time(&mut net, Collective::AllReduce, 1e8).unwrap();
        let second = time(&mut net, Collective::AllReduce, 1e8).unwrap();
        let want = one + links_only;
        assert!((second - want).abs() < 0.05 * want, "{second} vs {want}");
        // The busiest links are on the first axis: per all-reduce, 2 · 31 steps of 1e8 / 64 B.
        let busiest = net.stats[net.busiest()[0]];
        assert_eq!(t.links[net.busiest()[0]].axis, 0);
        assert!((busiest.bytes - 2.0 * 2.0 * 31.0 * 1e8 / 64.0).abs() < 1e-3, "{busiest:?}");
    }
}

//! A slice as a network: its chips at torus coordinates, the cores of each chip, the hosts
//! that feed them, and the directed ICI links between neighbouring chips — along every axis
//! longer than one chip, in both directions, with wraparound only where the slice has it
//! (`slice.wraparound`: small slices are meshes). Link figures come from `chip.ici`; a link
//! can be degraded (less bandwidth) or failed, and routes then go around it.

pub use crate::config::Direction;
use crate::config::Machine;
use crate::error::{Error, Result};

/// The most chips a slice may have in the pod model.
pub const MAX_CHIPS: usize = 1 << 16;

/// One direction of one ICI link between neighbouring chips.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub from: usize,
    pub to: usize,
    pub axis: usize,
    pub direction: Direction,
    /// Bandwidth one way, bytes per second (lower than the chip's for a degraded link).
    pub bytes_per_second: f64,
    /// Latency of one hop, seconds.
    pub latency_seconds: f64,
    /// A failed link carries nothing: routes go around it.
    pub failed: bool,
}

/// The chips, cores, hosts and links of a slice.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Chips along each axis.
    pub dims: Vec<usize>,
    pub wraparound: Vec<bool>,
    pub cores_per_chip: usize,
    pub chips_per_host: usize,
    pub links: Vec<Link>,
    /// Bytes per second between two cores of a chip. Assumption (no public figure): a core
    /// reads its neighbour's HBM at its own HBM bandwidth.
    pub core_bytes_per_second: f64,
    /// Per chip, axis and direction (`Up` first): the link leaving the chip that way, if any.
    out: Vec<Option<usize>>,
}

impl Topology {
    /// The topology of `machine`'s slice.
    pub fn of(machine: &Machine) -> Result<Topology> {
        let (dims, wraparound) = (machine.slice.torus.clone(), machine.slice.wraparound.clone());
        if dims.is_empty() || dims.len() != wraparound.len() || dims.contains(&0) {
            return Err(Error::Config {
                field: "slice.torus".into(),
                reason: format!(
                    "{dims:?} with wraparound {wraparound:?}: give one positive chip count and one wraparound flag per axis"
                ),
            });
        }
        // Beyond the largest pods by far (a v4 pod has 4,096 chips): a bound, so that a typo in
        // a machine file is an error rather than an allocation the host cannot make.
        let chips: usize = dims.iter().product();
        if chips > MAX_CHIPS {
            return Err(Error::Config {
                field: "slice.torus".into(),
                reason: format!("{dims:?} is {chips} chips; the pod model takes at most {MAX_CHIPS}"),
            });
        }
        let mut topo = Topology {
            dims,
            wraparound,
            cores_per_chip: machine.chip.cores,
            chips_per_host: machine.host.chips.max(1),
            links: Vec::new(),
            core_bytes_per_second: machine.hbm_bytes_per_second(),
            out: Vec::new(),
        };
        let axes = topo.dims.len();
        topo.out = vec![None; topo.chips() * axes * 2];
        for chip in 0..topo.chips() {
            for axis in 0..axes {
                for direction in [Direction::Up, Direction::Down] {
                    if let Some(to) = topo.neighbour(chip, axis, direction) {
                        topo.out[(chip * axes + axis) * 2 + direction as usize] = Some(topo.links.len());
                        topo.links.push(Link {
                            from: chip,
                            to,
                            axis,
                            direction,
                            bytes_per_second: machine.chip.ici.bytes_per_second,
                            latency_seconds: machine.chip.ici.latency_seconds,
                            failed: false,
                        });
                    }
                }
            }
        }
        // The machine's degraded and failed links (validated with the machine).
        for o in &machine.slice.links {
            let chip = topo.chip_at(&o.chip);
            let Some(l) = topo.link(chip, o.axis, o.direction) else {
                return Err(Error::Config {
                    field: "slice.links".into(),
                    reason: format!("chip {:?} has no link {:?} along axis {}", o.chip, o.direction, o.axis),
                });
            };
            if let Some(b) = o.bytes_per_second {
                topo.degrade(l, b);
            }
            if o.failed {
                topo.fail(l);
            }
        }
        Ok(topo)
    }

    pub fn chips(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn cores(&self) -> usize {
        self.chips() * self.cores_per_chip
    }

    /// The chip holding `core` (cores are numbered chip by chip).
    pub fn chip_of(&self, core: usize) -> usize {
        core / self.cores_per_chip
    }

    /// The host feeding `chip` (hosts take consecutive chips).
    pub fn host_of(&self, chip: usize) -> usize {
        chip / self.chips_per_host
    }

    /// A chip's coordinates, the last axis varying fastest.
    pub fn coords(&self, chip: usize) -> Vec<usize> {
        unravel(&self.dims, chip)
    }

    /// How many hosts feed the slice.
    pub fn hosts(&self) -> usize {
        self.chips().div_ceil(self.chips_per_host)
    }

    /// The chip at `coords`.
    pub fn chip_at(&self, coords: &[usize]) -> usize {
        coords.iter().zip(&self.dims).fold(0, |chip, (&c, &d)| chip * d + c)
    }

    /// The chip one step from `chip` along `axis`, if the slice has a link there.
    fn neighbour(&self, chip: usize, axis: usize, direction: Direction) -> Option<usize> {
        let (n, mut c) = (self.dims[axis], self.coords(chip));
        if n < 2 {
            return None;
        }
        c[axis] = match direction {
            Direction::Up if c[axis] + 1 < n => c[axis] + 1,
            Direction::Up if self.wraparound[axis] => 0,
            Direction::Down if c[axis] > 0 => c[axis] - 1,
            Direction::Down if self.wraparound[axis] => n - 1,
            _ => return None,
        };
        Some(self.chip_at(&c))
    }

    /// The link leaving `chip` along `axis` in `direction`, if any.
    pub fn link(&self, chip: usize, axis: usize, direction: Direction) -> Option<usize> {
        self.out[(chip * self.dims.len() + axis) * 2 + direction as usize]
    }

    /// The whole slice as one group.
    pub fn whole(&self) -> Group {
        Group {
            origin: vec![0; self.dims.len()],
            dims: self.dims.clone(),
            wraps: self.wraparound.clone(),
            cores_per_chip: self.cores_per_chip,
            first_core: 0,
        }
    }

    /// The groups of `replicas` consecutive cores (cores numbered chip by chip, chips with
    /// the last axis fastest): each must be part of one chip (a divisor of its cores) or a box
    /// of whole chips — which the sizes [`Topology::group_sizes`] lists are.
    pub fn groups(&self, replicas: usize) -> Result<Vec<Group>> {
        let fail = || Error::Config {
            field: "replica group".into(),
            reason: format!(
                "a group of {replicas} replicas does not exist on this slice of {} cores ({} per chip, chips {:?}): groups take consecutive cores and must fill part of a chip or a box of chips; use one of {:?}",
                self.cores(),
                self.cores_per_chip,
                self.dims,
                self.group_sizes()
            ),
        };
        let cpc = self.cores_per_chip;
        if replicas == 0 || replicas > self.cores() {
            return Err(fail());
        }
        if replicas <= cpc {
            if !cpc.is_multiple_of(replicas) {
                return Err(fail());
            }
            let unit = vec![1; self.dims.len()];
            return Ok((0..self.cores() / replicas)
                .map(|g| Group {
                    origin: self.coords(g * replicas / cpc),
                    dims: unit.clone(),
                    wraps: vec![false; self.dims.len()],
                    cores_per_chip: replicas,
                    first_core: g * replicas,
                })
                .collect());
        }
        if !replicas.is_multiple_of(cpc) {
            return Err(fail());
        }
        // Consecutive chips fill the last axis first: the box's extent, axis by axis from
        // the last, is all of an axis until what is left is smaller, which must divide it.
        let mut left = replicas / cpc;
        let mut dims = vec![1; self.dims.len()];
        for axis in (0..self.dims.len()).rev() {
            let n = self.dims[axis];
            if left >= n {
                if !left.is_multiple_of(n) {
                    return Err(fail());
                }
                dims[axis] = n;
                left /= n;
            } else {
                if !n.is_multiple_of(left) {
                    return Err(fail());
                }
                dims[axis] = left;
                left = 1;
            }
        }
        let chips: usize = dims.iter().product();
        let wraps: Vec<bool> = (0..dims.len()).map(|a| self.wraparound[a] && dims[a] == self.dims[a]).collect();
        Ok((0..self.chips() / chips)
            .map(|g| Group {
                origin: self.coords(g * chips),
                dims: dims.clone(),
                wraps: wraps.clone(),
                cores_per_chip: cpc,
                first_core: g * chips * cpc,
            })
            .collect())
    }

    /// Every group size the slice has, smallest first.
    pub fn group_sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> =
            (1..=self.cores_per_chip).filter(|&r| self.cores_per_chip.is_multiple_of(r)).collect();
        let mut chips = 1;
        for axis in (0..self.dims.len()).rev() {
            let n = self.dims[axis];
            sizes.extend((2..=n).filter(|&d| n.is_multiple_of(d)).map(|d| chips * d * self.cores_per_chip));
            chips *= n;
        }
        sizes
    }

    /// The chips along `axis` through `chip`, from coordinate 0 up.
    pub fn ring(&self, chip: usize, axis: usize) -> Vec<usize> {
        let mut c = self.coords(chip);
        (0..self.dims[axis])
            .map(|i| {
                c[axis] = i;
                self.chip_at(&c)
            })
            .collect()
    }

    /// Degrades link `link` to `bytes_per_second` one way.
    pub fn degrade(&mut self, link: usize, bytes_per_second: f64) {
        self.links[link].bytes_per_second = bytes_per_second;
    }

    /// Fails link `link` (one direction): routes that would take it go around.
    pub fn fail(&mut self, link: usize) {
        self.links[link].failed = true;
    }

    /// The links from `from` to `to`: axis by axis in order (dimension-order routing), each
    /// axis the shorter way round (up on a tie), along a mesh axis the only way; where that
    /// route meets a failed link, the shortest route over working links (ties to the lower
    /// link numbers, so the same every run). Empty when `to` cannot be reached.
    pub fn route(&self, from: usize, to: usize) -> Vec<usize> {
        let route = self.dimension_order(from, to);
        if route.iter().all(|&l| !self.links[l].failed) {
            return route;
        }
        self.detour(from, to)
    }

    /// The shortest route over working links (breadth first, links in number order).
    fn detour(&self, from: usize, to: usize) -> Vec<usize> {
        let mut came_by: Vec<Option<usize>> = vec![None; self.chips()];
        let mut seen = vec![false; self.chips()];
        let mut queue = std::collections::VecDeque::from([from]);
        seen[from] = true;
        let axes = self.dims.len();
        while let Some(chip) = queue.pop_front() {
            if chip == to {
                break;
            }
            for slot in 0..axes * 2 {
                let Some(l) = self.out[chip * axes * 2 + slot] else { continue };
                let next = self.links[l].to;
                if !self.links[l].failed && !seen[next] {
                    seen[next] = true;
                    came_by[next] = Some(l);
                    queue.push_back(next);
                }
            }
        }
        let mut links = Vec::new();
        let mut at = to;
        while at != from {
            let Some(l) = came_by[at] else { return Vec::new() };
            links.push(l);
            at = self.links[l].from;
        }
        links.reverse();
        links
    }

    fn dimension_order(&self, from: usize, to: usize) -> Vec<usize> {
        let (mut at, target) = (self.coords(from), self.coords(to));
        let mut links = Vec::new();
        for axis in 0..self.dims.len() {
            let n = self.dims[axis];
            let up = (target[axis] + n - at[axis]) % n;
            let direction = if self.wraparound[axis] {
                if up <= n - up { Direction::Up } else { Direction::Down }
            } else if target[axis] >= at[axis] {
                Direction::Up
            } else {
                Direction::Down
            };
            while at[axis] != target[axis] {
                let chip = self.chip_at(&at);
                let link = self.link(chip, axis, direction).expect("a route follows the slice's links");
                links.push(link);
                at = self.coords(self.links[link].to);
            }
        }
        links
    }
}

/// The coordinates of number `index` in a box of `dims`, the last axis varying fastest.
fn unravel(dims: &[usize], index: usize) -> Vec<usize> {
    let mut c = vec![0; dims.len()];
    let mut rest = index;
    for axis in (0..dims.len()).rev() {
        c[axis] = rest % dims[axis];
        rest /= dims[axis];
    }
    c
}

/// The members of one collective: a box of chips (all of each chip's cores, or some cores of
/// one chip), their cores consecutive from `first_core`.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// The coordinates of the box's first chip.
    pub origin: Vec<usize>,
    /// The box's extent along each axis.
    pub dims: Vec<usize>,
    /// Per axis: whether the box's lines close into rings of links (the slice wraps there
    /// and the box spans the whole axis).
    pub wraps: Vec<bool>,
    /// Cores of each chip in the group.
    pub cores_per_chip: usize,
    pub first_core: usize,
}

impl Group {
    pub fn chips(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn cores(&self) -> usize {
        self.chips() * self.cores_per_chip
    }

    /// The slice's chip at the group's local chip index `local` (last axis fastest).
    pub fn chip(&self, topo: &Topology, local: usize) -> usize {
        let mut c = self.local_coords(local);
        for (x, o) in c.iter_mut().zip(&self.origin) {
            *x += o;
        }
        topo.chip_at(&c)
    }

    /// Local coordinates of local chip `local`.
    pub fn local_coords(&self, local: usize) -> Vec<usize> {
        unravel(&self.dims, local)
    }

    /// The lines along `axis` (as [`Group::lines`]) in the order a ring visits them: along
    /// the line where it wraps; otherwise folded — out over the even positions, back over the
    /// odd ones (0, 2, 4, …, 5, 3, 1) — so each step of the ring is one or two hops, and each
    /// direction of every link carries one step of each of the two rings (up and down).
    pub fn rings(&self, axis: usize, keep: impl Fn(&[usize]) -> bool) -> Vec<Vec<usize>> {
        let n = self.dims[axis];
        let lines = self.lines(axis, keep);
        if self.wraps[axis] || n <= 2 {
            return lines;
        }
        let order: Vec<usize> = (0..n).step_by(2).chain((1..n).step_by(2).rev()).collect();
        lines.into_iter().map(|line| order.iter().map(|&p| line[p]).collect()).collect()
    }

    /// The lines of the box along `axis` (local chip indices, from local coordinate 0 up), for
    /// those of its chips whose local coordinates satisfy `keep`.
    pub fn lines(&self, axis: usize, keep: impl Fn(&[usize]) -> bool) -> Vec<Vec<usize>> {
        let stride: usize = self.dims[axis + 1..].iter().product();
        (0..self.chips())
            .filter(|&l| {
                let c = self.local_coords(l);
                c[axis] == 0 && keep(&c)
            })
            .map(|l| (0..self.dims[axis]).map(|i| l + i * stride).collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets;

    #[test]
    fn groups_are_parts_of_chips_or_boxes_of_chips() {
        // v3-32: 4x4 chips of 2 cores. Groups of 2 are chips; of 8, a row of 4 chips; of 16,
        // two rows; 6 is not a box.
        let t = Topology::of(&presets::preset("v3-32").unwrap()).unwrap();
        let g = t.groups(2).unwrap();
        assert_eq!((g.len(), g[5].chips(), g[5].first_core), (16, 1, 10));
        let g = t.groups(8).unwrap();
        assert_eq!((g.len(), g[1].origin.clone(), g[1].dims.clone()), (4, vec![1, 0], vec![1, 4]));
        assert_eq!(g[1].lines(1, |_| true), vec![vec![0, 1, 2, 3]]);
        assert_eq!(g[1].chip(&t, 3), t.chip_at(&[1, 3]));
        let g = t.groups(16).unwrap();
        assert_eq!((g.len(), g[1].dims.clone(), g[1].first_core), (2, vec![2, 4], 16));
        assert_eq!(t.groups(1).unwrap().len(), 32);
        assert_eq!(t.groups(32).unwrap()[0], t.whole());
        assert_eq!(t.group_sizes(), vec![1, 2, 4, 8, 16, 32]);
        for bad in [0, 3, 6, 12, 64] {
            let e = t.groups(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("a group of {bad} replicas does not exist")) && e.contains("[1, 2, 4, 8, 16, 32]"),
                "{e}"
            );
        }
    }

    #[test]
    fn small_slices_are_meshes_and_pods_are_tori() {
        // v2-8: one board of 2x2 chips, a mesh: every chip has one link each way per axis.
        let t = Topology::of(&presets::preset("v2-8").unwrap()).unwrap();
        assert_eq!((t.chips(), t.cores(), t.links.len()), (4, 8, 8));
        assert_eq!(t.host_of(3), 0);
        assert!(t.link(0, 0, Direction::Down).is_none(), "no wraparound on a small slice");
        // v3-2048: 32x32 chips, both axes wrap: four links out of every chip.
        let t = Topology::of(&presets::preset("v3-2048").unwrap()).unwrap();
        assert_eq!((t.chips(), t.links.len()), (1024, 4 * 1024));
        let corner = t.chip_at(&[0, 0]);
        assert_eq!(t.links[t.link(corner, 1, Direction::Down).unwrap()].to, t.chip_at(&[0, 31]));
        // v4-128: a 4x4x4 cube wraps on every axis: six links out of every chip, as the chip
        // has; v4-64 (2x4x4) is a mesh.
        let m = presets::preset("v4-128").unwrap();
        let t = Topology::of(&m).unwrap();
        assert!((0..t.chips()).all(|c| (0..3).all(|a| t.link(c, a, Direction::Up).is_some())));
        assert_eq!(t.links.len(), m.chip.ici.links * t.chips());
        let t = Topology::of(&presets::preset("v4-64").unwrap()).unwrap();
        assert!(t.link(t.chip_at(&[0, 0, 3]), 2, Direction::Up).is_none());
    }

    #[test]
    fn routes_go_around_failed_links() {
        let mut t = Topology::of(&presets::preset("v3-2048").unwrap()).unwrap();
        let (a, b) = (t.chip_at(&[5, 5]), t.chip_at(&[5, 7]));
        assert_eq!(t.route(a, b).len(), 2);
        // Fail the first hop (5,5) -> (5,6): the shortest way round is four hops, through a
        // neighbouring row.
        let first = t.link(a, 1, Direction::Up).unwrap();
        t.fail(first);
        let route = t.route(a, b);
        assert_eq!(route.len(), 4);
        assert!(!route.contains(&first));
        assert_eq!(t.links[*route.last().unwrap()].to, b);
        // A 2-chip mesh axis cut in one direction cannot be crossed that way.
        let mut t = Topology::of(&presets::preset("v4-16").unwrap()).unwrap();
        let (a, b) = (t.chip_at(&[0, 0, 0]), t.chip_at(&[1, 0, 0]));
        for chip in 0..t.chips() {
            if let Some(l) = t.link(chip, 0, Direction::Up) {
                t.fail(l);
            }
        }
        assert!(t.route(a, b).is_empty());
    }

    #[test]
    fn routes_go_axis_by_axis_the_short_way_round() {
        let t = Topology::of(&presets::preset("v3-2048").unwrap()).unwrap();
        let (from, to) = (t.chip_at(&[1, 30]), t.chip_at(&[3, 1]));
        let route = t.route(from, to);
        // Two hops up axis 0, then three up axis 1 through the wraparound (30 -> 31 -> 0 -> 1).
        assert_eq!(route.len(), 5);
        assert!(route[..2].iter().all(|&l| t.links[l].axis == 0 && t.links[l].direction == Direction::Up));
        assert!(route[2..].iter().all(|&l| t.links[l].axis == 1 && t.links[l].direction == Direction::Up));
        assert_eq!(t.links[route[4]].to, to);
        // On a mesh the only way: from the last chip of an axis back to the first.
        let t = Topology::of(&presets::preset("v3-32").unwrap()).unwrap();
        let route = t.route(t.chip_at(&[0, 3]), t.chip_at(&[0, 0]));
        assert_eq!(route.len(), 3);
        assert!(route.iter().all(|&l| t.links[l].direction == Direction::Down));
        assert_eq!(t.ring(t.chip_at(&[2, 1]), 1), (0..4).map(|i| t.chip_at(&[2, i])).collect::<Vec<_>>());
    }
}

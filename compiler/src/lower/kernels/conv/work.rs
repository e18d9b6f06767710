//! What the convolution driver hands a strategy for one block, and what it gets back.

use systolic_simulator::isa::Tile;
use systolic_simulator::numerics::Precision;

use crate::lower::blocks::conv_layout::ConvLayout;

/// One block of work for a strategy: output rows `m_blk` of channels `c0..c0+nbw`.
pub(crate) struct BlockWork<'g> {
    pub(crate) g: &'g ConvLayout,
    /// The work item's number (its buffers are `wi % BUFFERS`).
    pub(crate) wi: usize,
    /// The staged input, ready after `staged`.
    pub(crate) stage: Tile,
    pub(crate) staged: u32,
    /// The channel block's weights, loading in `wload`.
    pub(crate) weights: Tile,
    pub(crate) wload: u32,
    /// The accumulator, free after `acc_free`.
    pub(crate) acc: Tile,
    pub(crate) acc_free: Option<u32>,
    /// What the block's first instructions wait for: the staging, the weights, the accumulator.
    pub(crate) deps: Vec<u32>,
    pub(crate) m_blk: usize,
    pub(crate) c0: usize,
    pub(crate) nbw: usize,
    /// The group a grouped convolution's channel block belongs to.
    pub(crate) group: usize,
    /// Input channels per group.
    pub(crate) cg: usize,
    pub(crate) precision: Precision,
    /// The next work item, when its input is staged (for work issued ahead).
    pub(crate) next: Option<NextBlock>,
}

pub(crate) struct NextBlock {
    pub(crate) stage: Tile,
    pub(crate) staged: u32,
    pub(crate) m_blk: usize,
}

/// What a block's computation left for the driver: who reads the staged input and the
/// weights (`readers`), and the last writes of the accumulator (`producers`).
pub(crate) struct Computed {
    pub(crate) readers: Vec<u32>,
    pub(crate) producers: Vec<u32>,
}

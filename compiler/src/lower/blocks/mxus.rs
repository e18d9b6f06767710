//! Spreading a block's streamed rows over the core's MXUs.

use systolic_simulator::Machine;

/// Splits `rows` into at most `parts` near-equal ranges (for MXUs working side by side).
pub(crate) fn split_rows(rows: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.clamp(1, rows.max(1));
    let per = rows.div_ceil(parts).max(1);
    (0..rows).step_by(per).map(|r| (r, per.min(rows - r))).collect()
}

/// How many MXUs a block of `rows` streamed rows should use: each needs a weight tile's worth.
pub(crate) fn mxus_for(m: &Machine, rows: usize) -> usize {
    m.core.mxu.count.min(rows.div_ceil(m.core.mxu.rows)).max(1)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::lower::blocks::mxus::split_rows;

    proptest! {
        /// The parts cover the rows once, in order, at most `parts` of them, all but the last
        /// of one size (so MXUs working side by side finish together).
        #[test]
        fn split_rows_covers_every_row_once(rows in 0usize..5000, parts in 1usize..9) {
            let split = split_rows(rows, parts);
            prop_assert!(split.len() <= parts.max(1));
            let mut next = 0;
            for &(r0, rn) in &split {
                prop_assert_eq!(r0, next);
                prop_assert!(rn > 0);
                next += rn;
            }
            prop_assert_eq!(next, rows);
            if let Some((&(_, first), rest)) = split.split_first() {
                prop_assert!(rest.iter().all(|&(_, rn)| rn <= first));
                prop_assert!(rest.iter().rev().skip(1).all(|&(_, rn)| rn == first));
            }
        }
    }
}

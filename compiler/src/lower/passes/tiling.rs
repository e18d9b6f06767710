//! The `tiling` pass: each kernel, on its own, sized to VMEM and emitted as a fragment of
//! instructions — block sizes, buffer rings, loop order and strategy are chosen by the kernel's
//! family (through [`crate::lower::kernels::emit`], the dispatcher) as it emits, since each
//! follows from what the others leave of VMEM. Views emit nothing.

use crate::error::Result;
use crate::lower::emitter::{Context, Emitter, Fragment};
use crate::lower::kernel::{Kernel, Storage};
use crate::lower::kernels;
use crate::lower::passes::allocation::Plan;

/// The kernels' fragments, in kernel order, and the pass's dump (each kernel's strategy).
pub(crate) fn run(cx: &Context, kernels: &[Kernel], plan: &Plan) -> Result<(Vec<Fragment>, String)> {
    let mut fragments = Vec::new();
    let mut dump = String::new();
    for (k, kernel) in kernels.iter().enumerate() {
        if kernel.main.storage() == Storage::View {
            continue;
        }
        let mut e = Emitter::new(cx, &kernel.name, plan.scratch[k], plan.stats[k]);
        let emitted = kernels::emit(&mut e, kernel)?;
        let fragment = e.finish(kernel, emitted);
        let r = &fragment.report;
        dump += &format!("{:<28} {:<44} {}\n", r.name, r.strategy, r.padded);
        fragments.push(fragment);
    }
    Ok((fragments, dump))
}

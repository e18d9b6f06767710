//! The `scheduling` pass: the kernels' fragments joined into one program, in kernel order. Each
//! kernel's opening barrier waits for the previous kernel's closing one, so a kernel starts on
//! a quiet core and may reuse the VMEM and the dead HBM buffers of the kernels before it;
//! within a kernel, instructions keep the dependencies the kernel gave them. A gradient
//! bucket's all-reduce stands outside that chain: it waits for the kernel that made its last
//! gradient, and the first kernel that reads one of its gradients waits for it.

use systolic_simulator::isa::Program;

use crate::lower::emitter::Fragment;
use crate::lower::kernel::KernelReport;
use crate::lower::passes::collectives::Bucket;

/// The program named `name`, and each kernel's report with its instructions in the program.
/// The joined program, each kernel's report, and where each bucket's all-reduce went.
pub(crate) fn run(
    name: &str,
    fragments: Vec<Fragment>,
    buckets: &[Bucket],
) -> (Program, Vec<KernelReport>, Vec<usize>) {
    let mut program = Program::new(name);
    program.instrs.reserve_exact(fragments.iter().map(|f| f.program.len()).sum::<usize>() + buckets.len());
    let mut reports = Vec::with_capacity(fragments.len());
    let mut prev_end: Option<u32> = None;
    // Each issued bucket's instruction and the kernel that waits for it.
    let mut issued: Vec<(u32, usize)> = Vec::new();
    for (k, Fragment { program: fragment, mut report }) in fragments.into_iter().enumerate() {
        let offset = program.len() as u32;
        let mut instrs = fragment.instrs.into_iter();
        if let Some(mut open) = instrs.next() {
            open.deps = prev_end.into_iter().collect();
            open.deps.extend(issued.iter().filter(|&&(_, by)| by == k).map(|&(i, _)| i));
            program.instrs.push(open);
        }
        program.instrs.extend(instrs.map(|mut instr| {
            instr.deps.iter_mut().for_each(|d| *d += offset);
            instr
        }));
        prev_end = Some(program.len() as u32 - 1);
        for b in buckets.iter().filter(|b| b.fragment_after == k) {
            issued.push((program.len() as u32, b.fragment_needed_by));
            program.push(b.op.clone(), &prev_end.into_iter().collect::<Vec<_>>());
        }
        let r = &report.instructions;
        report.instructions = r.start + offset as usize..r.end + offset as usize;
        reports.push(report);
    }
    let bucket_instrs = issued.iter().map(|&(i, _)| i as usize).collect();
    (program, reports, bucket_instrs)
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use systolic_simulator::isa::{DType, Operation, Program, Space, Tile};

    use crate::lower::emitter::Fragment;
    use crate::lower::kernel::KernelReport;
    use crate::lower::passes::scheduling::run;

    /// A fragment as the emitter makes them: an opening barrier, `body` instructions each
    /// waiting for the one before, a closing barrier on the last.
    fn fragment(name: &str, body: usize) -> Fragment {
        let mut program = Program::new(name);
        let mut last = program.push(Operation::Barrier, &[]);
        for i in 0..body {
            let t = Tile::new(Space::Vmem, 512 * i as u64, 1, 1, DType::F32);
            last = program.push(Operation::Fill { dst: t, value: 0.0 }, &[last]);
        }
        program.push(Operation::Barrier, &[last]);
        let instructions: Range<usize> = 1..program.len();
        let report = KernelReport {
            name: name.into(),
            ops: String::new(),
            strategy: String::new(),
            padded: String::new(),
            mxu_passes: 0,
            flops: 0,
            useful_macs: 0,
            padded_macs: 0,
            padding_waste: 0.0,
            array_fill: 0.0,
            mxu_cycles: 0,
            hbm_bytes: 0,
            dma_cycles: 0,
            vpu_cycles: 0,
            estimate_cycles: 0,
            instructions,
        };
        Fragment { program, report }
    }

    #[test]
    fn fragments_join_behind_each_other() {
        let (program, reports, _) = run("joined", vec![fragment("a", 2), fragment("b", 3), fragment("c", 0)], &[]);
        assert_eq!(program.len(), 4 + 5 + 2);
        // Each kernel opens on the previous one's closing barrier; the first on nothing.
        assert!(program.instrs[0].deps.is_empty());
        assert_eq!(program.instrs[4].deps, vec![3]);
        assert_eq!(program.instrs[9].deps, vec![8]);
        // Dependencies inside a kernel move with it.
        assert_eq!(program.instrs[5].deps, vec![4]);
        assert_eq!(program.instrs[8].deps, vec![7]);
        // Reports name the kernel's instructions after its opening barrier, through its closing one.
        let ranges: Vec<Range<usize>> = reports.iter().map(|r| r.instructions.clone()).collect();
        assert_eq!(ranges, vec![1..4, 5..9, 10..11]);
        assert_eq!(program.name, "joined");
    }
}

//! Shapes and shape inference.
//!
//! A node's shape is either *batched* (its value has a leading batch dimension chosen at run
//! time: activations, inputs, gradients of activations) or *fixed* (parameters, parameter
//! gradients, the scalar loss). Shapes are inferred when a node is added, so a graph that exists
//! is a graph whose shapes fit.

use std::fmt;

use super::op::*;

/// The shape of a node's value. For batched shapes `dims` excludes the batch dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub dims: Vec<usize>,
    pub batched: bool,
}

impl Shape {
    pub fn batched(dims: impl Into<Vec<usize>>) -> Shape {
        Shape { dims: dims.into(), batched: true }
    }

    pub fn fixed(dims: impl Into<Vec<usize>>) -> Shape {
        Shape { dims: dims.into(), batched: false }
    }

    pub fn scalar() -> Shape {
        Shape::fixed(vec![])
    }

    /// Elements per example (or in total, for a fixed shape).
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The concrete dimensions for a batch of `batch` examples.
    pub fn concrete(&self, batch: usize) -> Vec<usize> {
        if self.batched { std::iter::once(batch).chain(self.dims.iter().copied()).collect() } else { self.dims.clone() }
    }

    /// The rank of the value, counting the batch dimension.
    pub fn rank(&self) -> usize {
        self.dims.len() + self.batched as usize
    }

    /// Formats with `batch` in place of the batch dimension (`N` when `None`).
    pub fn display_with_batch(&self, batch: Option<usize>) -> String {
        let mut parts: Vec<String> = Vec::with_capacity(self.rank());
        if self.batched {
            parts.push(batch.map_or("N".to_string(), |b| b.to_string()));
        }
        parts.extend(self.dims.iter().map(|d| d.to_string()));
        format!("[{}]", parts.join(", "))
    }

    fn last(&self) -> Option<usize> {
        self.dims.last().copied()
    }

    /// Treats a batched `[N, H, W, C]` shape as an image and returns `[H, W, C]`.
    fn image(&self, what: &str) -> Result<[usize; 3], String> {
        match (self.batched, self.dims.as_slice()) {
            (true, &[h, w, c]) => Ok([h, w, c]),
            _ => Err(format!("{what} must be a batched image [N, H, W, C], got {self}")),
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display_with_batch(None))
    }
}

/// The most elements one tensor (one example's, for batched shapes) may hold: 2^34, 64 GiB of
/// f32. Larger shapes are rejected when a node is added, so later arithmetic cannot overflow.
pub const MAX_ELEMENTS: u64 = 1 << 34;

/// The product of `dims`, or an error when it exceeds [`MAX_ELEMENTS`].
fn checked_numel(dims: &[usize]) -> Result<usize, String> {
    let mut n: u64 = 1;
    for &d in dims {
        n = n.checked_mul(d as u64).filter(|&n| n <= MAX_ELEMENTS).ok_or_else(|| {
            format!("shape {dims:?} holds more than 2^34 elements (64 GiB of f32), more than Systolic handles")
        })?;
    }
    Ok(n as usize)
}

/// Resolves a possibly negative `axis` of a batched tensor of `rank` to an index into the
/// per-example dims (so the batch axis is rejected).
pub fn per_example_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let full = if axis < 0 { rank as i64 + axis } else { axis };
    if full <= 0 || full >= rank as i64 {
        return Err(format!("axis {axis} is out of range for a rank-{rank} tensor (the batch axis 0 cannot be used)"));
    }
    Ok(full as usize - 1)
}

fn expect_same(a: &Shape, b: &Shape, what: &str) -> Result<(), String> {
    if a != b {
        return Err(format!("{what}: shapes {a} and {b} differ"));
    }
    Ok(())
}

fn expect_fixed(s: &Shape, dims: &[usize], what: &str) -> Result<(), String> {
    if s.batched || s.dims != dims {
        return Err(format!("{what} must have shape {}, got {s}", Shape::fixed(dims.to_vec())));
    }
    Ok(())
}

fn conv_shapes(conv: &Conv2d, x: &Shape, kernel: &Shape) -> Result<([usize; 3], [usize; 4]), String> {
    let [h, w, c] = x.image("conv input")?;
    let k: [usize; 4] = match (kernel.batched, kernel.dims.as_slice()) {
        (false, &[kh, kw, ci, co]) => [kh, kw, ci, co],
        _ => {
            return Err(format!("kernel must be a fixed HWIO tensor [kh, kw, cin/groups, cout], got {kernel}"));
        }
    };
    if conv.strides.contains(&0) || conv.dilation.contains(&0) || conv.groups == 0 {
        return Err(format!(
            "strides {:?}, dilation {:?} and groups {} must all be at least 1",
            conv.strides, conv.dilation, conv.groups
        ));
    }
    if k.contains(&0) {
        return Err(format!("kernel shape {kernel} has a zero dimension"));
    }
    // Gradient ops take these shapes from their attributes, unchecked until here.
    checked_numel(&x.dims)?;
    checked_numel(&kernel.dims)?;
    let g = conv.groups;
    if !c.is_multiple_of(g) || !k[3].is_multiple_of(g) {
        return Err(format!("groups {g} must divide the input channels ({c}) and the filters ({})", k[3]));
    }
    if k[2] * g != c {
        return Err(format!(
            "input has {c} channels but the kernel {kernel} expects {} (= {} per group x {g} groups); \
             change the kernel's third dimension to {} or the groups",
            k[2] * g,
            k[2],
            c / g
        ));
    }
    Ok(([h, w, c], k))
}

/// Refuses windows of more than [`MAX_ELEMENTS`] taps and explicit padding past it, so that
/// resolving them (sums and products of sizes) cannot overflow.
fn check_window(window: [usize; 2], padding: &Padding) -> Result<(), String> {
    checked_numel(&window)
        .map_err(|_| format!("window {window:?} spans more than 2^34 pixels, more than Systolic handles"))?;
    if let Padding::Explicit { top, bottom, left, right } = *padding
        && [top, bottom, left, right].iter().any(|&p| p as u64 > MAX_ELEMENTS)
    {
        return Err(format!("explicit padding {top},{bottom},{left},{right} is more than 2^34 pixels on a side"));
    }
    Ok(())
}

fn conv_output(conv: &Conv2d, x: &Shape, kernel: &Shape) -> Result<Shape, String> {
    let ([h, w, _], k) = conv_shapes(conv, x, kernel)?;
    // The dilated window, (k - 1) * dilation + 1, checked before `window` computes it.
    let dilated = |i: usize| (k[i] - 1).checked_mul(conv.dilation[i]).map_or(usize::MAX, |d| d.saturating_add(1));
    check_window([dilated(0), dilated(1)], &conv.padding)
        .map_err(|e| format!("kernel {kernel} with dilation {:?}: {e}", conv.dilation))?;
    let win = conv.window([h, w], [k[0], k[1]])?;
    Ok(Shape::batched(vec![win.out_h, win.out_w, k[3]]))
}

fn pool_output(pool: &Pool, x: &Shape) -> Result<Shape, String> {
    let [h, w, c] = x.image("pool input")?;
    checked_numel(&x.dims)?;
    if pool.window.contains(&0) || pool.strides.contains(&0) {
        return Err(format!("window {:?} and strides {:?} must be at least 1", pool.window, pool.strides));
    }
    check_window(pool.window, &pool.padding)?;
    let win = pool.resolve([h, w])?;
    Ok(Shape::batched(vec![win.out_h, win.out_w, c]))
}

fn bn_check(x: &Shape, params: &[&Shape], names: &[&str]) -> Result<usize, String> {
    if !x.batched || x.dims.is_empty() {
        return Err(format!("batch norm input must be batched with a channel axis, got {x}"));
    }
    let c = x.last().unwrap_or(0);
    for (p, name) in params.iter().zip(names) {
        expect_fixed(p, &[c], &format!("{name} (one per channel of {x})"))?;
    }
    Ok(c)
}

/// Checks the logits `[N, classes]`, the labels `[N]` and the smoothing of a cross-entropy (or
/// of its gradient).
fn cross_entropy_check(sce: &SoftmaxCrossEntropy, logits: &Shape, labels: &Shape) -> Result<(), String> {
    if !logits.batched || logits.dims.len() != 1 {
        return Err(format!("logits must be [N, classes], got {logits}"));
    }
    if !labels.batched || !labels.dims.is_empty() {
        return Err(format!("labels must be [N] integer class ids, got {labels}"));
    }
    if !(0.0..=1.0).contains(&sce.label_smoothing) {
        return Err(format!("label smoothing {} must be in [0, 1]", sce.label_smoothing));
    }
    Ok(())
}

impl Op {
    /// Infers the op's output shape from its input shapes. The error says what is wrong with
    /// which input; the graph adds the node's name.
    pub fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape, String> {
        // Shapes from attributes (a gradient's `input_hw`) and sums (concatenation) are held
        // to the same bound as inputs and parameters.
        let shape = self.infer_unbounded(inputs)?;
        checked_numel(&shape.dims)?;
        Ok(shape)
    }

    fn infer_unbounded(&self, inputs: &[&Shape]) -> Result<Shape, String> {
        let (lo, hi) = self.arity();
        if inputs.len() < lo || inputs.len() > hi {
            let expected = if lo == hi {
                format!("{lo}")
            } else if hi == usize::MAX {
                format!("at least {lo}")
            } else {
                format!("{lo} to {hi}")
            };
            return Err(format!("takes {expected} inputs, got {}", inputs.len()));
        }
        let x = inputs.first().copied();
        let x = || x.expect("arity checked above");
        match self {
            Op::Input(i) => {
                if i.shape.contains(&0) {
                    return Err(format!("input shape {:?} has a zero dimension", i.shape));
                }
                checked_numel(&i.shape)?;
                Ok(Shape::batched(i.shape.clone()))
            }
            Op::Parameter(p) => {
                if p.shape.contains(&0) {
                    return Err(format!("parameter shape {:?} has a zero dimension", p.shape));
                }
                checked_numel(&p.shape)?;
                Ok(Shape::fixed(p.shape.clone()))
            }
            Op::Conv2d(conv) => {
                let out = conv_output(conv, x(), inputs[1])?;
                if let Some(b) = inputs.get(2) {
                    expect_fixed(b, &[out.dims[2]], "bias")?;
                }
                Ok(out)
            }
            Op::MaxPool(p) | Op::AvgPool(p) => pool_output(p, x()),
            Op::GlobalAvgPool => {
                let [_, _, c] = x().image("global pool input")?;
                Ok(Shape::batched(vec![c]))
            }
            Op::Dense => {
                let (x, k) = (x(), inputs[1]);
                let Some(din) = x.last().filter(|_| x.batched) else {
                    return Err(format!("dense input must be batched with a feature axis, got {x}"));
                };
                let dout = match (k.batched, k.dims.as_slice()) {
                    (false, &[i, o]) if i == din => o,
                    _ => {
                        return Err(format!(
                            "kernel must be [{din}, units] for an input of {x}, got {k}; flatten the input first \
                             or change the kernel's first dimension to {din}"
                        ));
                    }
                };
                if let Some(b) = inputs.get(2) {
                    expect_fixed(b, &[dout], "bias")?;
                }
                let mut dims = x.dims.clone();
                *dims.last_mut().expect("non-empty") = dout;
                Ok(Shape::batched(dims))
            }
            Op::BiasAdd => {
                let x = x();
                let Some(c) = x.last() else {
                    return Err(format!("bias add input {x} has no channel axis"));
                };
                expect_fixed(inputs[1], &[c], "bias")?;
                Ok(x.clone())
            }
            Op::Add | Op::Mul => {
                expect_same(x(), inputs[1], "operands must have the same shape")?;
                Ok(x().clone())
            }
            Op::Relu | Op::Relu6 => Ok(x().clone()),
            Op::Softmax => {
                if x().dims.is_empty() {
                    return Err(format!("softmax needs an axis to normalise over, but {} has none per example", x()));
                }
                Ok(x().clone())
            }
            Op::Dropout(d) => {
                if !(0.0..1.0).contains(&d.rate) {
                    return Err(format!("dropout rate {} must be in [0, 1)", d.rate));
                }
                Ok(x().clone())
            }
            Op::BatchNorm(bn) => {
                if bn.epsilon.is_nan() || bn.epsilon <= 0.0 || !(0.0..=1.0).contains(&bn.momentum) {
                    return Err(format!("epsilon {} must be > 0 and momentum {} in [0, 1]", bn.epsilon, bn.momentum));
                }
                bn_check(x(), &inputs[1..], &["gamma", "beta", "moving_mean", "moving_variance"])?;
                Ok(x().clone())
            }
            Op::Flatten => {
                if !x().batched {
                    return Err(format!("flatten input must be batched, got {}", x()));
                }
                Ok(Shape::batched(vec![x().numel()]))
            }
            Op::Reshape(r) => {
                let x = x();
                if !x.batched {
                    return Err(format!("reshape input must be batched, got {x}"));
                }
                let wildcards = r.shape.iter().filter(|&&d| d == -1).count();
                if r.shape.iter().any(|&d| d == 0 || d < -1) || wildcards > 1 {
                    return Err(format!("target shape {:?} must hold positive sizes and at most one -1", r.shape));
                }
                let fixed: Vec<usize> = r.shape.iter().filter(|&&d| d != -1).map(|&d| d as usize).collect();
                let known = checked_numel(&fixed)? as i64;
                let total = x.numel() as i64;
                let dims: Vec<usize> = if wildcards == 1 {
                    if total % known != 0 {
                        return Err(format!("cannot reshape {x} ({total} elements per example) to {:?}", r.shape));
                    }
                    r.shape.iter().map(|&d| if d == -1 { (total / known) as usize } else { d as usize }).collect()
                } else {
                    if known != total {
                        return Err(format!("cannot reshape {x} ({total} elements per example) to {:?}", r.shape));
                    }
                    r.shape.iter().map(|&d| d as usize).collect()
                };
                Ok(Shape::batched(dims))
            }
            Op::Concat(c) => {
                let first = x();
                if !first.batched {
                    return Err(format!("concat inputs must be batched, got {first}"));
                }
                let axis = per_example_axis(c.axis, first.rank())?;
                let mut dims = first.dims.clone();
                dims[axis] = 0;
                for s in inputs {
                    let fits = s.batched
                        && s.dims.len() == first.dims.len()
                        && s.dims.iter().zip(&first.dims).enumerate().all(|(i, (a, b))| i == axis || a == b);
                    if !fits {
                        return Err(format!("inputs {first} and {s} must agree on every axis but {}", c.axis));
                    }
                    dims[axis] += s.dims[axis];
                }
                Ok(Shape::batched(dims))
            }
            Op::SoftmaxCrossEntropy(sce) => {
                cross_entropy_check(sce, x(), inputs[1])?;
                Ok(Shape::scalar())
            }
            Op::SoftmaxCrossEntropyGrad(sce) => {
                cross_entropy_check(sce, x(), inputs[1])?;
                Ok(x().clone())
            }
            Op::Conv2dBackpropInput(b) => {
                let (dy, kernel) = (x(), inputs[1]);
                let xs = Shape::batched(b.input_shape.to_vec());
                let out = conv_output(&b.conv, &xs, kernel)?;
                expect_same(dy, &out, "dy must have the convolution's output shape")?;
                Ok(xs)
            }
            Op::Conv2dBackpropFilter(b) => {
                let (xs, dy) = (x(), inputs[1]);
                let ks = Shape::fixed(b.kernel_shape.to_vec());
                let out = conv_output(&b.conv, xs, &ks)?;
                expect_same(dy, &out, "dy must have the convolution's output shape")?;
                Ok(ks)
            }
            Op::MaxPoolGrad(p) => {
                let out = pool_output(p, x())?;
                expect_same(inputs[1], &out, "dy must have the pool's output shape")?;
                Ok(x().clone())
            }
            Op::AvgPoolGrad(g) => {
                let xs = Shape::batched(g.input_shape.to_vec());
                let out = pool_output(&g.pool, &xs)?;
                expect_same(x(), &out, "dy must have the pool's output shape")?;
                Ok(xs)
            }
            Op::GlobalAvgPoolGrad(g) => {
                let dy = x();
                if !dy.batched || dy.dims.len() != 1 || g.input_hw.contains(&0) {
                    return Err(format!("dy must be [N, C] and the image non-empty, got {dy} and {:?}", g.input_hw));
                }
                Ok(Shape::batched(vec![g.input_hw[0], g.input_hw[1], dy.dims[0]]))
            }
            Op::DenseBackpropInput => {
                let (dy, k) = (x(), inputs[1]);
                match (k.batched, k.dims.as_slice()) {
                    (false, &[i, o]) if dy.batched && dy.last() == Some(o) => {
                        let mut dims = dy.dims.clone();
                        *dims.last_mut().expect("non-empty") = i;
                        Ok(Shape::batched(dims))
                    }
                    _ => Err(format!("dy {dy} does not fit kernel {k}")),
                }
            }
            Op::DenseBackpropKernel => {
                let (xs, dy) = (x(), inputs[1]);
                let fits = xs.batched
                    && dy.batched
                    && xs.dims.len() == dy.dims.len()
                    && !xs.dims.is_empty()
                    && xs.dims[..xs.dims.len() - 1] == dy.dims[..dy.dims.len() - 1];
                if !fits {
                    return Err(format!("x {xs} and dy {dy} must agree on every axis but the last"));
                }
                Ok(Shape::fixed(vec![xs.last().unwrap_or(0), dy.last().unwrap_or(0)]))
            }
            Op::BiasAddGrad => {
                let dy = x();
                match dy.last() {
                    Some(c) if dy.batched => Ok(Shape::fixed(vec![c])),
                    _ => Err(format!("dy must be batched with a channel axis, got {dy}")),
                }
            }
            Op::SoftmaxGrad if x().dims.is_empty() => {
                Err(format!("softmax needs an axis to normalise over, but {} has none per example", x()))
            }
            Op::ReluGrad | Op::Relu6Grad | Op::SoftmaxGrad => {
                expect_same(x(), inputs[1], "forward value and dy must have the same shape")?;
                Ok(x().clone())
            }
            Op::BatchNormGradInput(_) => {
                let dy = inputs[4];
                bn_check(x(), &inputs[1..4], &["gamma", "moving_mean", "moving_variance"])?;
                expect_same(x(), dy, "x and dy must have the same shape")?;
                Ok(x().clone())
            }
            Op::BatchNormGradGamma(_) => {
                let dy = inputs[3];
                let c = bn_check(x(), &inputs[1..3], &["moving_mean", "moving_variance"])?;
                expect_same(x(), dy, "x and dy must have the same shape")?;
                Ok(Shape::fixed(vec![c]))
            }
            Op::Slice(s) => {
                let x = x();
                if !x.batched {
                    return Err(format!("slice input must be batched, got {x}"));
                }
                let axis = per_example_axis(s.axis, x.rank())?;
                if s.len == 0 || s.start + s.len > x.dims[axis] {
                    return Err(format!(
                        "slice [{}, {}) is out of range for axis {} of {x}",
                        s.start,
                        s.start + s.len,
                        s.axis
                    ));
                }
                let mut dims = x.dims.clone();
                dims[axis] = s.len;
                Ok(Shape::batched(dims))
            }
        }
    }
}

//! Image augmentation at run time (issue 11): random flips, crops, zooms, colour changes and
//! small rotations, drawn afresh for every example in every step, and rescaling from [0, 1] to
//! [-1, 1].
//!
//! Every operation exists twice: as a pure function with explicit parameters
//! ([`flip_left_right`], [`adjust_contrast`], [`rotate`], ...), each following `tf.image`'s
//! definition where TensorFlow has one, and as a random [`Op`] that draws those parameters.
//! An [`Augment`] is a list of ops, parsed from the command line's
//! `flip,crop,brightness=0.3,...`. All randomness comes from the counter-based
//! [`rng`] keyed by the caller's key (derived from the seed, the epoch and the example index)
//! and each op's position in the list, so an example's augmented image is a pure function of
//! its key: the same on any thread, in any order, on any run.
//!
//! Geometry uses pixel-centre coordinates (pixel `i` sits at `i`, the image spans
//! `0..=H-1`), as `tf.image.crop_and_resize` and `tf.contrib.image.rotate` do, and bilinear
//! sampling in which a neighbour outside the image reads as 0 (`tf.contrib.image.transform`'s
//! constant fill): rotations and zooming out fill with zeros.
//!
//! Clipping: like `tf.image` in TensorFlow 1.x, nothing clips the values except inside the HSV
//! conversion, where saturation is clamped to [0, 1]. Brightness and contrast may leave [0, 1]
//! (the model sees what TensorFlow's would); [`write_png`] clamps to [0, 1] when it quantises.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rayon::prelude::*;
use systolic_compiler::Tensor;
use systolic_compiler::rng;

use crate::error::{Error, Result};

/// One example's image: height × width × channels, row-major (HWC), as one example of a
/// model's NHWC input holds it, so converting either way is a copy of the values. Values are
/// nominally in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl Image {
    /// An image from its values in HWC order, refusing values that do not fill the shape (so
    /// no operation indexes past them).
    pub fn new(height: usize, width: usize, channels: usize, data: Vec<f32>) -> Result<Self> {
        let image = Image { height, width, channels, data };
        image.validate()?;
        Ok(image)
    }

    /// An image from one example of an NHWC batch: `shape` is the example's `[H, W, C]`.
    pub fn from_example(shape: &[usize], data: &[f32]) -> Result<Self> {
        match *shape {
            [height, width, channels] => Image::new(height, width, channels, data.to_vec()),
            _ => Err(Error::Input(format!(
                "augmentation needs images of shape [height, width, channels]; the example has shape {shape:?}"
            ))),
        }
    }

    /// A black image of the given shape (what geometry fills with outside the source).
    pub fn zeros(height: usize, width: usize, channels: usize) -> Self {
        Image { height, width, channels, data: vec![0.0; height * width * channels] }
    }

    /// The value at row `y`, column `x`, channel `c`.
    pub fn get(&self, y: usize, x: usize, c: usize) -> f32 {
        self.data[self.index(y, x, c)]
    }

    /// The example's shape `[H, W, C]`, as a batch's trailing dimensions.
    pub fn shape(&self) -> [usize; 3] {
        [self.height, self.width, self.channels]
    }

    fn index(&self, y: usize, x: usize, c: usize) -> usize {
        (y * self.width + x) * self.channels + c
    }

    /// Refuses an image whose fields disagree (they are public, so one can be built by hand).
    fn validate(&self) -> Result<()> {
        let expected = self.height.checked_mul(self.width).and_then(|n| n.checked_mul(self.channels));
        if expected != Some(self.data.len()) {
            return Err(Error::Input(format!(
                "an image of {}x{}x{} needs {} values; it has {}",
                self.height,
                self.width,
                self.channels,
                expected.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string()),
                self.data.len()
            )));
        }
        Ok(())
    }

    /// The same image with every value mapped by `f` (the pointwise ops share it).
    fn map(&self, f: impl Fn(f32) -> f32) -> Image {
        Image { data: self.data.iter().map(|&v| f(v)).collect(), ..self.clone() }
    }

    /// The image with each pixel mapped by `f(pixel in, pixel out)` (the colour ops share it).
    fn map_pixels(&self, f: impl Fn(&[f32], &mut [f32])) -> Image {
        let mut out = self.clone();
        if self.channels > 0 {
            for (src, dst) in self.data.chunks_exact(self.channels).zip(out.data.chunks_exact_mut(self.channels)) {
                f(src, dst);
            }
        }
        out
    }

    /// The value at fractional pixel-centre coordinates `(y, x)` of channel `c` by bilinear
    /// interpolation, neighbours outside the image reading as 0 (as
    /// `tf.contrib.image.transform`'s bilinear interpolation with a constant fill of 0).
    /// Integer coordinates give the pixel exactly: the other neighbours weigh 0.
    fn bilinear(&self, y: f64, x: f64, out: &mut [f32]) {
        out.fill(0.0);
        if !(y > -1.0 && x > -1.0 && y < self.height as f64 && x < self.width as f64) {
            return; // No neighbour inside (and NaN coordinates land here too).
        }
        let (y0, x0) = (y.floor(), x.floor());
        let (wy, wx) = (y - y0, x - x0);
        let neighbours = [
            (y0, x0, (1.0 - wy) * (1.0 - wx)),
            (y0, x0 + 1.0, (1.0 - wy) * wx),
            (y0 + 1.0, x0, wy * (1.0 - wx)),
            (y0 + 1.0, x0 + 1.0, wy * wx),
        ];
        for (c, slot) in out.iter_mut().enumerate() {
            let mut sum = 0.0f64;
            for &(yy, xx, w) in &neighbours {
                if w != 0.0 && yy >= 0.0 && xx >= 0.0 && (yy as usize) < self.height && (xx as usize) < self.width {
                    sum += w * self.get(yy as usize, xx as usize, c) as f64;
                }
            }
            *slot = sum as f32;
        }
    }

    /// The image whose pixel `(i, j)` samples this one at `source(i, j)` (pixel-centre
    /// coordinates): crops, zooms and rotations are this with different maps.
    fn resample(&self, source: impl Fn(f64, f64) -> (f64, f64)) -> Image {
        let mut out = Image::zeros(self.height, self.width, self.channels);
        for i in 0..self.height {
            for j in 0..self.width {
                let (y, x) = source(i as f64, j as f64);
                let at = out.index(i, j, 0);
                self.bilinear(y, x, &mut out.data[at..at + self.channels]);
            }
        }
        out
    }

    /// The pixel-centre coordinates of the image's centre (rotations and zooms turn about it).
    fn centre(&self) -> (f64, f64) {
        ((self.height as f64 - 1.0) / 2.0, (self.width as f64 - 1.0) / 2.0)
    }

    /// The values quantised to bytes as an image file holds them: clamped to [0, 1], times
    /// 255, rounded (NaN becomes 0).
    fn to_bytes(&self) -> Vec<u8> {
        self.data.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect()
    }
}

/// Mirrors the image left to right (`tf.image.flip_left_right`): column `x` becomes `W-1-x`.
pub fn flip_left_right(img: &Image) -> Image {
    let mut out = img.clone();
    for y in 0..img.height {
        for x in 0..img.width {
            let (src, dst) = (img.index(y, img.width - 1 - x, 0), img.index(y, x, 0));
            out.data[dst..dst + img.channels].copy_from_slice(&img.data[src..src + img.channels]);
        }
    }
    out
}

/// Mirrors the image top to bottom (`tf.image.flip_up_down`): row `y` becomes `H-1-y`.
pub fn flip_up_down(img: &Image) -> Image {
    let row = img.width * img.channels;
    let mut out = img.clone();
    for y in 0..img.height {
        let (src, dst) = ((img.height - 1 - y) * row, y * row);
        out.data[dst..dst + row].copy_from_slice(&img.data[src..src + row]);
    }
    out
}

/// Adds `delta` to every value (`tf.image.adjust_brightness`; not clipped, as in TensorFlow).
pub fn adjust_brightness(img: &Image, delta: f32) -> Image {
    img.map(|v| v + delta)
}

/// Scales each channel's deviation from its mean over the image by `factor`: `(x - mean_c) *
/// factor + mean_c` (`tf.image.adjust_contrast`; not clipped, as in TensorFlow). The means are
/// summed in f64 so they do not depend on the image's size through rounding.
pub fn adjust_contrast(img: &Image, factor: f32) -> Image {
    let c = img.channels;
    let pixels = (img.height * img.width) as f64;
    let mut means = vec![0.0f64; c];
    for (i, &v) in img.data.iter().enumerate() {
        means[i % c] += v as f64;
    }
    means.iter_mut().for_each(|m| *m /= pixels);
    let mut out = img.clone();
    for (i, v) in out.data.iter_mut().enumerate() {
        let m = means[i % c];
        *v = ((*v as f64 - m) * factor as f64 + m) as f32;
    }
    out
}

/// Refuses the HSV ops on anything but RGB (TensorFlow: "input must have 3 channels").
fn needs_rgb(img: &Image, op: &str) -> Result<()> {
    if img.channels != 3 {
        return Err(Error::Input(format!(
            "{op} needs 3 channels (RGB); the image has {} (leave {op} out for greyscale input)",
            img.channels
        )));
    }
    Ok(())
}

/// Multiplies the HSV saturation by `factor`, clamping it to [0, 1], and converts back
/// (`tf.image.adjust_saturation`'s kernel, in f32 as there). Factor 0 gives grey at each
/// pixel's value (its largest channel); 1 leaves the image as it is up to rounding.
pub fn adjust_saturation(img: &Image, factor: f32) -> Result<Image> {
    needs_rgb(img, "saturation")?;
    Ok(img.map_pixels(|src, dst| {
        let (h, s, v) = rgb_to_hsv(src[0], src[1], src[2]);
        let (r, g, b) = hsv_to_rgb(h, (s * factor).clamp(0.0, 1.0), v);
        dst.copy_from_slice(&[r, g, b]);
    }))
}

/// Turns the HSV hue by `delta` of a full turn (wrapping into [0, 1)) and converts back
/// (`tf.image.adjust_hue`): 1/3 takes red to green. Saturation and value are kept.
pub fn adjust_hue(img: &Image, delta: f32) -> Result<Image> {
    needs_rgb(img, "hue")?;
    Ok(img.map_pixels(|src, dst| {
        let (h, s, v) = rgb_to_hsv(src[0], src[1], src[2]);
        let (r, g, b) = hsv_to_rgb((h + delta).rem_euclid(1.0), s, v);
        dst.copy_from_slice(&[r, g, b]);
    }))
}

/// RGB to HSV with hue in [0, 1) as TensorFlow's `rgb_to_hsv` kernel (adjust_saturation_op.cc):
/// value is the largest channel, saturation the range over it (0 where the value is not
/// positive), hue 0 for greys.
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let v = r.max(g).max(b);
    let range = v - r.min(g).min(b);
    let s = if v > 0.0 { range / v } else { 0.0 };
    if range <= 0.0 {
        return (0.0, s, v);
    }
    let norm = 1.0 / (6.0 * range);
    let h = if r == v {
        norm * (g - b)
    } else if g == v {
        norm * (b - r) + 2.0 / 6.0
    } else {
        norm * (r - g) + 4.0 / 6.0
    };
    (if h < 0.0 { h + 1.0 } else { h }, s, v)
}

/// HSV back to RGB, TensorFlow's `hsv_to_rgb` kernel: chroma `s*v` spread over the hue's sixth.
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let c = s * v;
    let m = v - c;
    let dh = h * 6.0;
    let x = c * (1.0 - (dh.rem_euclid(2.0) - 1.0).abs());
    // The sixth wraps: a hue that rounds up to 1 is red again, not black.
    let (r, g, b) = match (dh.floor() as i32).rem_euclid(6) {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    (r + m, g + m, b + m)
}

/// The window of `h` × `w` pixels whose top-left pixel centre is at `(top, left)`, resized back
/// to the image's size by bilinear sampling: `tf.image.crop_and_resize` with the box
/// `[top, left, top+h-1, left+w-1] / [H-1, W-1]` and the image's own size as the crop size.
/// Output row `i` samples row `top + i*(h-1)/(H-1)`, so the first and last rows sample the
/// window's first and last pixels; the full window is the identity. Fractional windows are
/// allowed, and samples outside the image read as 0.
pub fn crop_and_resize(img: &Image, top: f64, left: f64, h: f64, w: f64) -> Image {
    // A one-pixel output samples the window's centre (tf.image.crop_and_resize does too).
    let axis = |start: f64, size: f64, n: usize| {
        let scale = if n > 1 { (size - 1.0) / (n as f64 - 1.0) } else { 0.0 };
        let offset = if n > 1 { start } else { start + (size - 1.0) / 2.0 };
        move |i: f64| offset + i * scale
    };
    let (ys, xs) = (axis(top, h, img.height), axis(left, w, img.width));
    img.resample(|i, j| (ys(i), xs(j)))
}

/// Scales the image about its centre by `factor`: above 1 a centred crop resized back (zoom
/// in), below 1 the whole image shrunk with zeros around it (zoom out), as
/// [`crop_and_resize`]'s window of `(H-1)/factor + 1` rows and `(W-1)/factor + 1` columns.
/// A factor that is not positive and finite leaves the image as it is (the random op never
/// draws one).
pub fn zoom(img: &Image, factor: f64) -> Image {
    if !(factor > 0.0 && factor.is_finite()) {
        return img.clone();
    }
    let f = factor;
    let (cy, cx) = img.centre();
    img.resample(|i, j| (cy + (i - cy) / f, cx + (j - cx) / f))
}

/// Rotates the image counter-clockwise by `radians` about its centre with bilinear sampling,
/// zeros where the source lies outside (`tf.contrib.image.rotate`: output `(x, y)` samples
/// `(cos·(x-cx) - sin·(y-cy) + cx, sin·(x-cx) + cos·(y-cy) + cy)`). A half turn equals both
/// flips to within 1e-6 of the values (the sine of `std::f64::consts::PI` is 1e-16, not 0).
/// Angles, factors and windows are f64 so that coordinates are exact where they should be.
pub fn rotate(img: &Image, radians: f64) -> Image {
    let (sin, cos) = radians.sin_cos();
    let (cy, cx) = img.centre();
    img.resample(|i, j| {
        let (dy, dx) = (i - cy, j - cx);
        (sin * dx + cos * dy + cy, cos * dx - sin * dy + cx)
    })
}

/// Maps [0, 1] to [-1, 1]: `2x - 1` (what Inception-style models expect; not clipped).
pub fn rescale(img: &Image) -> Image {
    img.map(|v| 2.0 * v - 1.0)
}

/// Default largest brightness change: 32/255, `inception_preprocessing.distort_color` (TF-slim).
pub const DEFAULT_BRIGHTNESS: f32 = 32.0 / 255.0;
/// Default contrast factor range: [0.5, 1.5], `inception_preprocessing.distort_color`.
pub const DEFAULT_CONTRAST: (f32, f32) = (0.5, 1.5);
/// Default saturation factor range: [0.5, 1.5], `inception_preprocessing.distort_color`.
pub const DEFAULT_SATURATION: (f32, f32) = (0.5, 1.5);
/// Default largest hue turn: 0.2 of a turn, `inception_preprocessing.distort_color`.
pub const DEFAULT_HUE: f32 = 0.2;
/// Default largest rotation: 10°, small enough that digits stay digits (a 6 stays a 6).
pub const DEFAULT_ROTATE_DEGREES: f32 = 10.0;
/// Default smallest crop: 64% of the area (80% of each side), mild enough for small images
/// (Inception's 5% would cut a digit out of an 8×8 image).
pub const DEFAULT_CROP_MIN_AREA: f32 = 0.64;
/// Default zoom: factors between 1/1.2 and 1.2.
pub const DEFAULT_ZOOM: f32 = 1.2;
/// Random crops' aspect ratio (width over height) lies in [3/4, 4/3], Inception's
/// `aspect_ratio_range` for `sample_distorted_bounding_box`.
pub const CROP_ASPECT: (f32, f32) = (3.0 / 4.0, 4.0 / 3.0);

/// One random augmentation: its parameters' ranges, drawn afresh for every example.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// [`flip_left_right`] with probability 1/2 (`tf.image.random_flip_left_right`).
    FlipLeftRight,
    /// [`flip_up_down`] with probability 1/2 (`tf.image.random_flip_up_down`).
    FlipUpDown,
    /// A window of `min_area..1` of the image's area, aspect ratio in [`CROP_ASPECT`] (log-uniform)
    /// and position uniform, resized back by [`crop_and_resize`].
    Crop { min_area: f32 },
    /// [`zoom`] by a factor log-uniform in [1/max, max]: in and out equally often.
    Zoom { max: f32 },
    /// [`adjust_brightness`] by a delta uniform in [-max_delta, max_delta)
    /// (`tf.image.random_brightness`).
    Brightness { max_delta: f32 },
    /// [`adjust_contrast`] by a factor uniform in [lower, upper) (`tf.image.random_contrast`).
    Contrast { lower: f32, upper: f32 },
    /// [`adjust_saturation`] by a factor uniform in [lower, upper)
    /// (`tf.image.random_saturation`).
    Saturation { lower: f32, upper: f32 },
    /// [`adjust_hue`] by a delta uniform in [-max_delta, max_delta) (`tf.image.random_hue`).
    Hue { max_delta: f32 },
    /// [`rotate`] by an angle uniform in [-max_degrees, max_degrees).
    Rotate { max_degrees: f32 },
    /// [`rescale`] to [-1, 1] (not random; last, after the colour ops).
    Rescale,
}

/// Every op with its default parameters, in the order the help lists them.
pub const DEFAULTS: [Op; 10] = [
    Op::FlipLeftRight,
    Op::FlipUpDown,
    Op::Crop { min_area: DEFAULT_CROP_MIN_AREA },
    Op::Zoom { max: DEFAULT_ZOOM },
    Op::Brightness { max_delta: DEFAULT_BRIGHTNESS },
    Op::Contrast { lower: DEFAULT_CONTRAST.0, upper: DEFAULT_CONTRAST.1 },
    Op::Saturation { lower: DEFAULT_SATURATION.0, upper: DEFAULT_SATURATION.1 },
    Op::Hue { max_delta: DEFAULT_HUE },
    Op::Rotate { max_degrees: DEFAULT_ROTATE_DEGREES },
    Op::Rescale,
];

/// The names [`Augment::parse`] knows and their values, in [`DEFAULTS`]' order.
const NAMES: &str = "flip, flip_ud, crop[=min_area], zoom[=max], brightness[=max_delta], \
                     contrast[=lower:upper or =f for 1-f:1+f], saturation[=lower:upper or =f], hue[=max_delta], \
                     rotate[=max_degrees], rescale";

impl Op {
    /// The op's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Op::FlipLeftRight => "flip",
            Op::FlipUpDown => "flip_ud",
            Op::Crop { .. } => "crop",
            Op::Zoom { .. } => "zoom",
            Op::Brightness { .. } => "brightness",
            Op::Contrast { .. } => "contrast",
            Op::Saturation { .. } => "saturation",
            Op::Hue { .. } => "hue",
            Op::Rotate { .. } => "rotate",
            Op::Rescale => "rescale",
        }
    }

    /// The op called `name` with its default parameters, if there is one.
    pub fn named(name: &str) -> Option<Op> {
        DEFAULTS.iter().copied().find(|op| op.name() == name)
    }

    /// The op with its parameters read from `value` (the text after `name=`).
    fn with_value(self, value: &str) -> Result<Op> {
        let name = self.name();
        let number = |text: &str| -> Result<f32> {
            match text.trim().parse::<f32>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(config(format!("{name}={value}: '{text}' is not a finite number"))),
            }
        };
        // A range is `lower:upper`, or one number f for [1-f, 1+f] as Keras' RandomContrast.
        let range = || -> Result<(f32, f32)> {
            match value.split_once(':') {
                Some((lower, upper)) => Ok((number(lower)?, number(upper)?)),
                None => number(value).map(|f| (1.0 - f, 1.0 + f)),
            }
        };
        let op = match self {
            Op::FlipLeftRight | Op::FlipUpDown | Op::Rescale => {
                return Err(config(format!("{name}={value}: {name} takes no value")));
            }
            Op::Crop { .. } => Op::Crop { min_area: number(value)? },
            Op::Zoom { .. } => Op::Zoom { max: number(value)? },
            Op::Brightness { .. } => Op::Brightness { max_delta: number(value)? },
            Op::Contrast { .. } => range().map(|(lower, upper)| Op::Contrast { lower, upper })?,
            Op::Saturation { .. } => range().map(|(lower, upper)| Op::Saturation { lower, upper })?,
            Op::Hue { .. } => Op::Hue { max_delta: number(value)? },
            Op::Rotate { .. } => Op::Rotate { max_degrees: number(value)? },
        };
        op.validate()?;
        Ok(op)
    }

    /// Refuses parameters TensorFlow's random ops refuse (with their messages' sense), and
    /// those that would make no sense here (a crop of no area, a zoom below 1).
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &str| Err(config(format!("{self}: {reason}")));
        let finite = |values: &[f32]| values.iter().all(|v| v.is_finite());
        match *self {
            Op::Crop { min_area } if !(min_area > 0.0 && min_area <= 1.0) => {
                bad("the smallest area fraction must be in (0, 1]")
            }
            Op::Zoom { max } if !(max >= 1.0 && max.is_finite()) => bad("the largest zoom must be at least 1"),
            Op::Brightness { max_delta } | Op::Hue { max_delta } if !(max_delta >= 0.0 && finite(&[max_delta])) => {
                bad("max_delta must be non-negative")
            }
            Op::Hue { max_delta } if max_delta > 0.5 => bad("max_delta must be at most 0.5 (half a turn of hue)"),
            Op::Contrast { lower, upper } | Op::Saturation { lower, upper } if !finite(&[lower, upper]) => {
                bad("the factors must be finite")
            }
            Op::Contrast { lower, upper } | Op::Saturation { lower, upper } if lower < 0.0 => {
                bad(&format!("lower ({lower}) must be non-negative; upper is {upper}"))
            }
            Op::Contrast { lower, upper } | Op::Saturation { lower, upper } if upper <= lower => {
                bad(&format!("upper ({upper}) must be greater than lower ({lower})"))
            }
            Op::Rotate { max_degrees } if !(0.0..=180.0).contains(&max_degrees) => {
                bad("the largest rotation must be between 0 and 180 degrees")
            }
            _ => Ok(()),
        }
    }

    /// Whether the op works in HSV and so needs RGB values in [0, 1].
    fn is_hsv(&self) -> bool {
        matches!(self, Op::Saturation { .. } | Op::Hue { .. })
    }

    /// Applies the op with its parameters drawn from the stream `key` (counters 0, 1, ...).
    fn apply(&self, img: &Image, key: u64) -> Result<Image> {
        let u = |counter: u64| rng::uniform(key, counter);
        // Uniform in [lower, upper).
        let between = |counter: u64, lower: f32, upper: f32| lower + (upper - lower) * u(counter);
        Ok(match *self {
            Op::FlipLeftRight if u(0) < 0.5 => flip_left_right(img),
            Op::FlipUpDown if u(0) < 0.5 => flip_up_down(img),
            Op::FlipLeftRight | Op::FlipUpDown => img.clone(),
            Op::Crop { min_area } => {
                let area = between(0, min_area, 1.0) as f64;
                let (lo, hi) = (CROP_ASPECT.0.ln(), CROP_ASPECT.1.ln());
                let aspect = between(1, lo, hi).exp() as f64;
                let (height, width) = (img.height as f64, img.width as f64);
                let h = (height * (area / aspect).sqrt()).clamp(1.0, height.max(1.0));
                let w = (width * (area * aspect).sqrt()).clamp(1.0, width.max(1.0));
                let top = u(2) as f64 * (height - h).max(0.0);
                let left = u(3) as f64 * (width - w).max(0.0);
                crop_and_resize(img, top, left, h, w)
            }
            Op::Zoom { max } => zoom(img, (between(0, -max.ln(), max.ln()) as f64).exp()),
            Op::Brightness { max_delta } => adjust_brightness(img, between(0, -max_delta, max_delta)),
            Op::Contrast { lower, upper } => adjust_contrast(img, between(0, lower, upper)),
            Op::Saturation { lower, upper } => adjust_saturation(img, between(0, lower, upper))?,
            Op::Hue { max_delta } => adjust_hue(img, between(0, -max_delta, max_delta))?,
            Op::Rotate { max_degrees } => rotate(img, (between(0, -max_degrees, max_degrees) as f64).to_radians()),
            Op::Rescale => rescale(img),
        })
    }
}

/// The op as [`Augment::parse`] reads it, with every parameter spelled out.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match *self {
            Op::FlipLeftRight | Op::FlipUpDown | Op::Rescale => write!(f, "{name}"),
            Op::Crop { min_area: v }
            | Op::Zoom { max: v }
            | Op::Brightness { max_delta: v }
            | Op::Hue { max_delta: v }
            | Op::Rotate { max_degrees: v } => write!(f, "{name}={v}"),
            Op::Contrast { lower, upper } | Op::Saturation { lower, upper } => write!(f, "{name}={lower}:{upper}"),
        }
    }
}

fn config(reason: String) -> Error {
    Error::Config { field: "augment".into(), reason }
}

/// A composition of random augmentations, applied in order to each example.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Augment {
    ops: Vec<Op>,
}

impl Augment {
    /// The composition of `ops`, each validated (so hand-built ops are held to parse's rules).
    pub fn new(ops: Vec<Op>) -> Result<Self> {
        ops.iter().try_for_each(Op::validate)?;
        Ok(Augment { ops })
    }

    /// Reads `flip,crop,brightness=0.3,...` (the command line's `--augment`): names separated
    /// by commas, each optionally `=value`; an empty text is no augmentation.
    pub fn parse(text: &str) -> Result<Self> {
        if text.trim().is_empty() {
            return Ok(Augment::default());
        }
        let ops = text
            .split(',')
            .map(|item| {
                let (name, value) = match item.split_once('=') {
                    Some((name, value)) => (name.trim(), Some(value.trim())),
                    None => (item.trim(), None),
                };
                let op = Op::named(name).ok_or_else(|| {
                    config(format!("unknown augmentation '{name}' in '{text}'; the augmentations are {NAMES}"))
                })?;
                value.map_or(Ok(op), |value| op.with_value(value))
            })
            .collect::<Result<Vec<_>>>()?;
        Augment::new(ops)
    }

    /// The ops, in the order they apply.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Whether there is nothing to do (the pipeline can skip copying examples).
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Refuses, before any data is read, what would fail on images with `channels` channels:
    /// saturation and hue need RGB, and they need values in [0, 1], so not after rescale.
    pub fn check(&self, channels: usize) -> Result<()> {
        if let Some(op) = self.ops.iter().find(|op| op.is_hsv() && channels != 3) {
            return Err(config(format!(
                "{} needs 3 channels (RGB); the input has {channels} (leave it out for greyscale input)",
                op.name()
            )));
        }
        if let Some(at) = self.ops.iter().position(|op| *op == Op::Rescale)
            && let Some(op) = self.ops[at..].iter().find(|op| op.is_hsv())
        {
            return Err(config(format!(
                "{} after rescale would convert values in [-1, 1] to HSV; put rescale last",
                op.name()
            )));
        }
        Ok(())
    }

    /// The augmented image: every op in order, op `p` drawing its parameters from the stream
    /// `rng::derive(key, p)`. The caller derives `key` from the seed, the epoch and the
    /// example's index, so the result depends on nothing else (not the thread, not the order).
    pub fn apply(&self, img: &Image, key: u64) -> Result<Image> {
        img.validate()?;
        let mut out = img.clone();
        for (position, op) in self.ops.iter().enumerate() {
            out = op.apply(&out, rng::derive(key, position as u64))?;
        }
        Ok(out)
    }

    /// Augments every example of an NHWC batch, example `n` with the key `keys(n)`, in parallel
    /// over examples; the result does not depend on the number of threads.
    pub fn apply_batch(&self, images: &Tensor, keys: impl Fn(usize) -> u64 + Sync) -> Result<Tensor> {
        let shape = images.shape().to_vec();
        let [_, example @ ..] = shape.as_slice() else {
            return Err(Error::Input("augmentation needs a batch of shape [N, H, W, C]; it has no dimensions".into()));
        };
        let values = images.as_standard_layout();
        let values = values.as_slice().expect("standard layout is contiguous");
        let size: usize = example.iter().product();
        let augmented = values
            .par_chunks(size.max(1))
            .enumerate()
            .map(|(n, data)| self.apply(&Image::from_example(example, data)?, keys(n)).map(|img| img.data))
            .collect::<Result<Vec<_>>>()?;
        Tensor::from_shape_vec(shape, augmented.concat()).map_err(|e| Error::Input(e.to_string()))
    }
}

/// The list [`Augment::parse`] reads back into the same ops.
impl fmt::Display for Augment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, op) in self.ops.iter().enumerate() {
            write!(f, "{}{op}", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
}

impl FromStr for Augment {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Augment::parse(text)
    }
}

/// The value between a grid's cells: white, so cells stay apart on the black backgrounds of
/// digits and zero-filled borders.
pub const GRID_BACKGROUND: f32 = 1.0;

/// The images in rows of `columns` (at least 1) with `pad` pixels between cells and around
/// them, as torchvision's `make_grid`: cells take the largest height and width, the grid the
/// most channels, and a greyscale image is repeated over an RGB grid's channels.
pub fn grid(images: &[Image], columns: usize, pad: usize) -> Image {
    if images.is_empty() {
        return Image::zeros(0, 0, 1);
    }
    let columns = columns.clamp(1, images.len());
    let rows = images.len().div_ceil(columns);
    let cell_h = images.iter().map(|img| img.height).max().unwrap_or(0);
    let cell_w = images.iter().map(|img| img.width).max().unwrap_or(0);
    let channels = images.iter().map(|img| img.channels).max().unwrap_or(1).max(1);
    let (height, width) = (rows * (cell_h + pad) + pad, columns * (cell_w + pad) + pad);
    let mut out = Image { height, width, channels, data: vec![GRID_BACKGROUND; height * width * channels] };
    for (n, img) in images.iter().enumerate() {
        let (top, left) = (pad + (n / columns) * (cell_h + pad), pad + (n % columns) * (cell_w + pad));
        for y in 0..img.height {
            for x in 0..img.width {
                for c in 0..channels {
                    let at = out.index(top + y, left + x, c);
                    out.data[at] =
                        img.data.get(img.index(y, x, c.min(img.channels.max(1) - 1))).copied().unwrap_or(0.0);
                }
            }
        }
    }
    out
}

/// Writes the image as an 8-bit PNG (greyscale for 1 channel, RGB for 3), values clamped to
/// [0, 1] then scaled to 0..=255, atomically (encoded in memory, then renamed into place) so a
/// reader never sees half a file.
pub fn write_png(path: &Path, img: &Image) -> Result<()> {
    img.validate()?;
    let colour = match img.channels {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        c => return Err(Error::Input(format!("a PNG needs 1 or 3 channels; the image has {c}"))),
    };
    let too_big = || Error::Input(format!("{}x{} is too large for a PNG", img.height, img.width));
    let (width, height) =
        (u32::try_from(img.width).map_err(|_| too_big())?, u32::try_from(img.height).map_err(|_| too_big())?);
    let mut bytes = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut bytes),
        &img.to_bytes(),
        width,
        height,
        colour,
    )
    .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    systolic_compiler::tensors::write_atomically(path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3×4×3 with value `i/64` at flat index `i`: all distinct, exact in f32, in [0, 1).
    fn known() -> Image {
        Image::new(3, 4, 3, (0..36).map(|i| i as f32 / 64.0).collect()).unwrap()
    }

    /// `h`×`w`, one channel, value `w*y + x` (linear, so bilinear sampling is exact).
    fn ramp(h: usize, w: usize) -> Image {
        Image::new(h, w, 1, (0..h * w).map(|i| i as f32).collect()).unwrap()
    }

    fn assert_close(a: &Image, b: &Image, tolerance: f32) {
        assert_eq!(a.shape(), b.shape());
        for (i, (x, y)) in a.data.iter().zip(&b.data).enumerate() {
            assert!((x - y).abs() <= tolerance, "value {i}: {x} vs {y}\n{a:?}\n{b:?}");
        }
    }

    fn rgb(pixels: &[[f32; 3]]) -> Image {
        Image::new(1, pixels.len(), 3, pixels.concat()).unwrap()
    }

    fn config_reason(result: Result<impl fmt::Debug>) -> String {
        match result {
            Err(Error::Config { field, reason }) => {
                assert_eq!(field, "augment");
                reason
            }
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn images_refuse_values_that_do_not_fill_the_shape() {
        assert!(Image::new(2, 2, 3, vec![0.0; 11]).is_err());
        assert!(Image::from_example(&[4, 4], &[0.0; 16]).is_err());
        let img = Image::from_example(&[3, 4, 3], &known().data).unwrap();
        assert_eq!(img, known());
        assert_eq!(img.get(2, 1, 2), ((2 * 4 + 1) * 3 + 2) as f32 / 64.0);
    }

    #[test]
    fn flips_are_the_mirror_permutations_and_undo_themselves() {
        let img = known();
        let lr = flip_left_right(&img);
        let ud = flip_up_down(&img);
        for (y, x, c) in (0..3).flat_map(|y| (0..4).flat_map(move |x| (0..3).map(move |c| (y, x, c)))) {
            assert_eq!(lr.get(y, x, c), img.get(y, 3 - x, c));
            assert_eq!(ud.get(y, x, c), img.get(2 - y, x, c));
        }
        assert_eq!(&lr.data[..3], &[9.0 / 64.0, 10.0 / 64.0, 11.0 / 64.0]);
        assert_eq!(&ud.data[..3], &[24.0 / 64.0, 25.0 / 64.0, 26.0 / 64.0]);
        assert_eq!(flip_left_right(&lr), img);
        assert_eq!(flip_up_down(&ud), img);
    }

    #[test]
    fn brightness_adds_the_delta_without_clipping() {
        let out = adjust_brightness(&known(), 0.5);
        assert_eq!(out.data, (0..36).map(|i| i as f32 / 64.0 + 0.5).collect::<Vec<_>>());
        assert_eq!(out.get(2, 3, 2), 67.0 / 64.0); // past 1: TensorFlow does not clip either
    }

    #[test]
    fn contrast_scales_the_deviation_from_each_channels_mean() {
        // Channel c holds (3k + c)/64 for k = 0..12: its mean is (16.5 + c)/64.
        let means = [16.5 / 64.0, 17.5 / 64.0, 18.5 / 64.0];
        let out = adjust_contrast(&known(), 2.0);
        for (i, &v) in out.data.iter().enumerate() {
            assert_eq!(v, 2.0 * (i as f32 / 64.0) - means[i % 3], "value {i}");
        }
        assert_eq!(out.get(0, 0, 0), -0.2578125);
        assert_eq!(adjust_contrast(&known(), 1.0), known());
        // Factor 0 leaves each channel's mean everywhere.
        assert_eq!(&adjust_contrast(&known(), 0.0).data[..3], &means);
    }

    #[test]
    fn saturation_moves_towards_the_grey_of_each_pixels_value() {
        let img = rgb(&[[0.2, 0.5, 0.8], [1.0, 0.0, 0.0], [0.3, 0.3, 0.3]]);
        // Factor 0: grey at the value (the largest channel).
        assert_close(&adjust_saturation(&img, 0.0).unwrap(), &rgb(&[[0.8; 3], [1.0; 3], [0.3; 3]]), 1e-6);
        // (0.2, 0.5, 0.8) has v = 0.8, s = 0.75; s = 0.375 puts the smallest channel at
        // v(1 - s) = 0.5, and green stays halfway between: 0.65.
        let half = adjust_saturation(&img, 0.5).unwrap();
        assert_close(&half, &rgb(&[[0.5, 0.65, 0.8], [1.0, 0.5, 0.5], [0.3; 3]]), 1e-6);
        // Factor 3 clamps s to 1: the smallest channel reaches 0, green stays halfway.
        let clamped = adjust_saturation(&img, 3.0).unwrap();
        assert_close(&clamped, &rgb(&[[0.0, 0.4, 0.8], [1.0, 0.0, 0.0], [0.3; 3]]), 1e-6);
        assert_close(&adjust_saturation(&known(), 1.0).unwrap(), &known(), 1e-6);
    }

    #[test]
    fn hue_turns_the_colour_wheel() {
        let primaries = rgb(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
        let turned = adjust_hue(&primaries, 1.0 / 3.0).unwrap();
        assert_close(&turned, &rgb(&[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), 1e-6);
        let back = adjust_hue(&primaries, -1.0 / 3.0).unwrap();
        assert_close(&back, &rgb(&[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), 1e-6);
        // A sixth of a turn takes red to yellow; greys have no hue to turn.
        let grey_and_red = rgb(&[[0.4, 0.4, 0.4], [0.5, 0.0, 0.0]]);
        assert_close(&adjust_hue(&grey_and_red, 1.0 / 6.0).unwrap(), &rgb(&[[0.4; 3], [0.5, 0.5, 0.0]]), 1e-6);
        assert_close(&adjust_hue(&known(), 0.0).unwrap(), &known(), 1e-6);
        // A turn that wraps to a hue of 1.0 in f32 (-1e-9 mod 1) is still red.
        let red = rgb(&[[1.0, 0.0, 0.0]]);
        assert_close(&adjust_hue(&red, -1e-9).unwrap(), &red, 1e-6);
    }

    #[test]
    fn hsv_ops_refuse_anything_but_rgb() {
        let grey = ramp(2, 2);
        let message = adjust_saturation(&grey, 0.5).unwrap_err().to_string();
        assert!(message.contains("saturation needs 3 channels (RGB); the image has 1"), "{message}");
        assert!(adjust_hue(&grey, 0.1).is_err());
    }

    #[test]
    fn crop_and_resize_samples_the_window_bilinearly() {
        assert_eq!(crop_and_resize(&known(), 0.0, 0.0, 3.0, 4.0), known());
        // The 2×2 window at (1, 1) of a 4×4 ramp (value 4y + x): output row i samples row
        // 1 + i/3 and column j column 1 + j/3, so the value 4(1 + i/3) + (1 + j/3).
        let out = crop_and_resize(&ramp(4, 4), 1.0, 1.0, 2.0, 2.0);
        #[rustfmt::skip]
        let expected = [
            5.0, 5.0 + 1.0 / 3.0, 5.0 + 2.0 / 3.0, 6.0,
            5.0 + 4.0 / 3.0, 6.0 + 2.0 / 3.0, 7.0, 7.0 + 1.0 / 3.0,
            7.0 + 2.0 / 3.0, 8.0, 8.0 + 1.0 / 3.0, 8.0 + 2.0 / 3.0,
            9.0, 9.0 + 1.0 / 3.0, 9.0 + 2.0 / 3.0, 10.0,
        ];
        assert_close(&out, &Image::new(4, 4, 1, expected.to_vec()).unwrap(), 1e-5);
        // Corners land on pixels exactly; a one-pixel window repeats that pixel.
        assert_eq!([out.get(0, 0, 0), out.get(0, 3, 0), out.get(3, 0, 0), out.get(3, 3, 0)], [5.0, 6.0, 9.0, 10.0]);
        assert_eq!(crop_and_resize(&ramp(4, 4), 2.0, 1.0, 1.0, 1.0).data, vec![9.0; 16]);
    }

    #[test]
    fn zoom_scales_about_the_centre_with_zeros_outside() {
        let img = ramp(5, 5);
        // In by 2: output (i, j) samples 2 + (i - 2)/2, the centre 3×3 pixels spread out.
        let zoomed = zoom(&img, 2.0);
        assert_eq!([zoomed.get(0, 0, 0), zoomed.get(2, 2, 0), zoomed.get(4, 4, 0)], [6.0, 12.0, 18.0]);
        assert_eq!(zoomed.get(1, 0, 0), 5.0 * 1.5 + 1.0);
        let window = crop_and_resize(&img, 1.0, 1.0, 3.0, 3.0);
        assert_close(&zoomed, &window, 1e-6);
        // Out by 2: output (i, j) samples 2 + 2(i - 2); the border falls outside and reads 0.
        let out = zoom(&img, 0.5);
        assert_eq!([out.get(1, 1, 0), out.get(2, 2, 0), out.get(3, 1, 0)], [0.0, 12.0, 20.0]);
        assert_eq!([out.get(0, 0, 0), out.get(0, 2, 0), out.get(4, 4, 0)], [0.0, 0.0, 0.0]);
        assert_eq!(zoom(&img, 1.0), img);
    }

    #[test]
    fn rotation_turns_about_the_centre() {
        assert_eq!(rotate(&known(), 0.0), known());
        for img in [ramp(3, 5), ramp(4, 4), known()] {
            let half_turn = rotate(&img, std::f64::consts::PI);
            assert_close(&half_turn, &flip_up_down(&flip_left_right(&img)), 1e-6);
        }
        // A quarter turn counter-clockwise brings the right-hand column to the top row.
        let quarter = rotate(&ramp(3, 3), std::f64::consts::FRAC_PI_2);
        assert_close(&quarter, &Image::new(3, 3, 1, vec![2.0, 5.0, 8.0, 1.0, 4.0, 7.0, 0.0, 3.0, 6.0]).unwrap(), 1e-5);
        // An eighth turn of a 7×7 white square: the corner samples row 3 - 3·√2 = -1.24, outside
        // (zero); the top edge's middle samples (0.88, 5.12), inside; the corner's neighbour
        // samples row 3 - 5/√2 = -0.54, half a pixel out, and blends with the zero fill.
        let eighth = rotate(&Image::new(7, 7, 1, vec![1.0; 49]).unwrap(), std::f64::consts::FRAC_PI_4);
        assert_eq!((eighth.get(0, 0, 0), eighth.get(3, 3, 0), eighth.get(0, 3, 0)), (0.0, 1.0, 1.0));
        assert!((eighth.get(0, 1, 0) - (4.0 - 2.5 * std::f32::consts::SQRT_2)).abs() < 1e-6);
    }

    #[test]
    fn rescale_maps_the_unit_interval_to_plus_minus_one() {
        let out = rescale(&Image::new(1, 3, 1, vec![0.0, 0.25, 1.0]).unwrap());
        assert_eq!(out.data, vec![-1.0, -0.5, 1.0]);
    }

    #[test]
    fn the_same_key_gives_the_same_image_and_others_differ() {
        let augment =
            Augment::parse("flip,flip_ud,crop,zoom,brightness,contrast,saturation,hue,rotate,rescale").unwrap();
        let img = known();
        let images: Vec<Image> = (0..10).map(|key| augment.apply(&img, key).unwrap()).collect();
        for (key, image) in images.iter().enumerate() {
            assert_eq!(&augment.apply(&img, key as u64).unwrap(), image);
            assert!(images[..key].iter().all(|other| other != image), "key {key} repeats an image");
        }
    }

    #[test]
    fn flips_happen_about_half_the_time() {
        let img = known();
        for (text, flip) in [("flip", flip_left_right as fn(&Image) -> Image), ("flip_ud", flip_up_down)] {
            let augment = Augment::parse(text).unwrap();
            let flipped = flip(&img);
            let mut count = 0;
            for key in 0..1000 {
                let out = augment.apply(&img, key).unwrap();
                if out == flipped {
                    count += 1;
                } else {
                    assert_eq!(out, img);
                }
            }
            assert!((400..=600).contains(&count), "{text}: {count} of 1000");
        }
    }

    #[test]
    fn random_parameters_stay_in_their_ranges() {
        let img = known();
        let brightness = Augment::parse("brightness=0.3").unwrap();
        let deltas: Vec<f32> =
            (0..1000).map(|key| brightness.apply(&img, key).unwrap().data[0] - img.data[0]).collect();
        assert!(deltas.iter().all(|d| d.abs() <= 0.3), "{deltas:?}");
        assert!(deltas.iter().any(|&d| d < -0.25) && deltas.iter().any(|&d| d > 0.25));
        // Contrast's factor: value 0 of channel 0 becomes -mean·(f - 1), f in [0.8, 1.2).
        let contrast = Augment::parse("contrast=0.8:1.2").unwrap();
        let mean = 16.5 / 64.0;
        for key in 0..200 {
            let f = 1.0 - contrast.apply(&img, key).unwrap().data[0] / mean;
            assert!((0.8 - 1e-5..1.2 + 1e-5).contains(&f), "factor {f}");
        }
        // Crops and zooms keep the shape; values stay within the image's (bilinear, zeros).
        let geometry = Augment::parse("crop=0.5,zoom=1.5,rotate=30").unwrap();
        for key in 0..200 {
            let out = geometry.apply(&img, key).unwrap();
            assert_eq!(out.shape(), img.shape());
            assert!(out.data.iter().all(|v| (0.0..=35.0 / 64.0 + 1e-6).contains(v)));
        }
    }

    #[test]
    fn parse_and_display_round_trip() {
        let all = "flip,flip_ud,crop,zoom,brightness,contrast,saturation,hue,rotate,rescale";
        let augment = Augment::parse(all).unwrap();
        assert_eq!(augment.ops().len(), 10);
        assert_eq!(
            augment.to_string(),
            "flip,flip_ud,crop=0.64,zoom=1.2,brightness=0.1254902,contrast=0.5:1.5,saturation=0.5:1.5,hue=0.2,\
             rotate=10,rescale"
        );
        assert_eq!(Augment::parse(&augment.to_string()).unwrap(), augment);
        let custom = Augment::parse(" brightness=0.3, rotate = 15 ,contrast=0.25,saturation=0.8:1.2").unwrap();
        assert_eq!(
            custom.ops(),
            [
                Op::Brightness { max_delta: 0.3 },
                Op::Rotate { max_degrees: 15.0 },
                Op::Contrast { lower: 0.75, upper: 1.25 },
                Op::Saturation { lower: 0.8, upper: 1.2 },
            ]
        );
        assert_eq!(custom.to_string(), "brightness=0.3,rotate=15,contrast=0.75:1.25,saturation=0.8:1.2");
        assert_eq!(custom.to_string().parse::<Augment>().unwrap(), custom);
        assert!(Augment::parse("").unwrap().is_empty());
        assert_eq!(Augment::parse("").unwrap().to_string(), "");
    }

    #[test]
    fn bad_names_and_values_are_refused_with_the_reason() {
        let reason = config_reason(Augment::parse("flip,blur"));
        assert!(reason.starts_with("unknown augmentation 'blur' in 'flip,blur'; the augmentations are flip, flip_ud,"));
        assert!(reason.contains("rotate[=max_degrees], rescale"), "{reason}");
        assert!(config_reason(Augment::parse("flip,,crop")).contains("unknown augmentation ''"));
        for (text, expected) in [
            ("brightness=-1", "brightness=-1: max_delta must be non-negative"),
            ("hue=0.7", "hue=0.7: max_delta must be at most 0.5"),
            ("contrast=1.2:0.8", "contrast=1.2:0.8: upper (0.8) must be greater than lower (1.2)"),
            ("saturation=-0.5:1", "lower (-0.5) must be non-negative"),
            ("flip=1", "flip=1: flip takes no value"),
            ("rotate=abc", "rotate=abc: 'abc' is not a finite number"),
            ("brightness=nan", "'nan' is not a finite number"),
            ("crop=0", "crop=0: the smallest area fraction must be in (0, 1]"),
            ("zoom=0.5", "zoom=0.5: the largest zoom must be at least 1"),
            ("rotate=270", "the largest rotation must be between 0 and 180 degrees"),
        ] {
            let reason = config_reason(Augment::parse(text));
            assert!(reason.contains(expected), "{text}: {reason}");
        }
        assert!(Augment::new(vec![Op::Hue { max_delta: -0.1 }]).is_err());
    }

    #[test]
    fn check_refuses_colour_ops_the_input_cannot_take() {
        let colour = Augment::parse("flip,saturation").unwrap();
        assert!(colour.check(3).is_ok());
        let reason = config_reason(colour.check(1));
        assert_eq!(reason, "saturation needs 3 channels (RGB); the input has 1 (leave it out for greyscale input)");
        assert!(Augment::parse("flip,brightness,rescale").unwrap().check(1).is_ok());
        let reason = config_reason(Augment::parse("rescale,hue").unwrap().check(3));
        assert!(reason.starts_with("hue after rescale"), "{reason}");
        // Without the check, applying is an error, not a panic.
        assert!(colour.apply(&ramp(2, 2), 0).is_err());
    }

    #[test]
    fn batches_match_single_images_on_any_number_of_threads() {
        let augment = Augment::parse("flip,crop,brightness,contrast,saturation,hue,rotate,rescale").unwrap();
        let n = 7;
        let values: Vec<f32> = (0..n * 36).map(|i| (i % 37) as f32 / 37.0).collect();
        let batch = Tensor::from_shape_vec(vec![n, 3, 4, 3], values.clone()).unwrap();
        let keys = |i: usize| rng::derive(42, i as u64);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| augment.apply_batch(&batch, keys).unwrap())
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one.shape(), &[n, 3, 4, 3]);
        for i in 0..n {
            let img = Image::from_example(&[3, 4, 3], &values[i * 36..(i + 1) * 36]).unwrap();
            let expected = augment.apply(&img, keys(i)).unwrap();
            assert_eq!(one.as_slice().unwrap()[i * 36..(i + 1) * 36], expected.data[..], "example {i}");
        }
        let flat = Tensor::from_shape_vec(vec![36], known().data).unwrap();
        assert!(augment.apply_batch(&flat, keys).is_err());
    }

    #[test]
    fn grids_lay_images_out_and_write_pngs_that_read_back() {
        let images = [known(), adjust_brightness(&known(), 0.25), flip_left_right(&known())];
        let g = grid(&images, 2, 1);
        assert_eq!(g.shape(), [2 * (3 + 1) + 1, 2 * (4 + 1) + 1, 3]);
        assert_eq!(g.get(1, 1, 0), images[0].get(0, 0, 0));
        assert_eq!(g.get(3, 4, 2), images[0].get(2, 3, 2));
        assert_eq!(g.get(1, 6, 1), images[1].get(0, 0, 1));
        assert_eq!(g.get(5, 1, 0), images[2].get(0, 0, 0));
        // Padding and the empty fourth cell are the background.
        assert_eq!(
            (g.get(0, 0, 0), g.get(4, 5, 1), g.get(6, 7, 2)),
            (GRID_BACKGROUND, GRID_BACKGROUND, GRID_BACKGROUND)
        );
        // Greyscale images in an RGB grid repeat their one channel.
        let mixed = grid(&[ramp(2, 2), known()], 3, 0);
        assert_eq!(mixed.shape(), [3, 8, 3]);
        assert_eq!([mixed.get(1, 1, 0), mixed.get(1, 1, 1), mixed.get(1, 1, 2)], [3.0; 3]);

        let dir = std::env::temp_dir().join(format!("systolic-augment-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, img) in
            [("grid.png", &g), ("grey.png", &Image::new(2, 3, 1, vec![-1.0, 0.0, 0.5, 1.0, 2.0, 0.2]).unwrap())]
        {
            let path = dir.join(name);
            write_png(&path, img).unwrap();
            let read = image::open(&path).unwrap();
            assert_eq!((read.width() as usize, read.height() as usize), (img.width, img.height));
            let bytes = if img.channels == 3 { read.to_rgb8().into_raw() } else { read.to_luma8().into_raw() };
            assert_eq!(bytes, img.to_bytes(), "{name}");
        }
        assert_eq!(
            Image::new(2, 3, 1, vec![-1.0, 0.0, 0.5, 1.0, 2.0, 0.2]).unwrap().to_bytes(),
            [0, 0, 128, 255, 255, 51]
        );
        let two = Image::zeros(2, 2, 2);
        assert!(write_png(&dir.join("two.png"), &two).unwrap_err().to_string().contains("1 or 3 channels"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

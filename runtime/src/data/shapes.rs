//! `shapes`: a generated RGB data set of circles, squares and triangles for experiments that
//! need bigger, coloured images than the digits — any size, any number, seeded. Example `i` is
//! a pure function of (seed, i), drawn when it is read, so the set costs no memory and reads
//! the same on any thread.

use std::collections::BTreeMap;

use rayon::prelude::*;
use systolic_compiler::rng::{derive, uniform};
use systolic_compiler::{Tensor, TensorMap};

use super::pipeline::Source;
use crate::error::{Error, Result};

/// The classes, in label order.
pub const CLASSES: [&str; 3] = ["circle", "square", "triangle"];

/// `len` images of `size` × `size` × 3 in [0, 1] (`image`) with their class (`labels`): one
/// shape per image on a plain background, its colour, size (a radius of 20–40% of the
/// image), position (kept inside the image) and rotation varied.
#[derive(Clone, Debug)]
pub struct Shapes {
    len: usize,
    size: usize,
    seed: u64,
}

impl Shapes {
    pub fn new(len: usize, size: usize, seed: u64) -> Result<Shapes> {
        if len == 0 || size < 8 {
            return Err(Error::Input(format!(
                "shapes: {len} images of {size}x{size}: give at least one image of at least 8x8 pixels"
            )));
        }
        Ok(Shapes { len, size, seed })
    }

    /// Example `i`: its pixels (HWC) and class.
    pub fn draw(&self, i: usize) -> (Vec<f32>, usize) {
        let key = derive(self.seed, i as u64);
        let u = |k: u64| uniform(key, k);
        let class = ((u(0) * 3.0) as usize).min(2);
        let n = self.size as f32;
        let radius = n * (0.2 + 0.2 * u(1));
        let (cx, cy) = (radius + (n - 2.0 * radius) * u(2), radius + (n - 2.0 * radius) * u(3));
        let angle = std::f32::consts::TAU * u(4);
        let background = [u(5), u(6), u(7)].map(|v| 0.8 * v);
        // The shape in the upper half of each channel's range, the background in the lower
        // 80%: they can come close in a channel but the shape is the brighter on average.
        let colour = [u(8), u(9), u(10)].map(|v| 0.5 + 0.5 * v);
        let (sin, cos) = angle.sin_cos();
        let inside = |x: f32, y: f32| {
            // The point in the shape's frame, in units of the radius.
            let (dx, dy) = ((x - cx) / radius, (y - cy) / radius);
            let (lx, ly) = (cos * dx + sin * dy, -sin * dx + cos * dy);
            match class {
                0 => lx * lx + ly * ly <= 1.0,
                1 => lx.abs() <= 0.75 && ly.abs() <= 0.75,
                _ => {
                    // An equilateral triangle inscribed in the unit circle: three half-planes.
                    (0..3).all(|k| {
                        let a = std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::TAU / 3.0;
                        -(lx * a.cos() + ly * a.sin()) <= 0.5
                    })
                }
            }
        };
        let mut pixels = Vec::with_capacity(self.size * self.size * 3);
        for y in 0..self.size {
            for x in 0..self.size {
                // Coverage from 4 samples per pixel: smooth edges.
                let covered = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
                    .iter()
                    .filter(|(ox, oy)| inside(x as f32 + ox, y as f32 + oy))
                    .count() as f32
                    / 4.0;
                for c in 0..3 {
                    pixels.push(background[c] * (1.0 - covered) + colour[c] * covered);
                }
            }
        }
        (pixels, class)
    }
}

impl Source for Shapes {
    fn len(&self) -> usize {
        self.len
    }

    fn gather(&self, indices: &[usize]) -> Result<TensorMap> {
        if let Some(&i) = indices.iter().find(|&&i| i >= self.len) {
            return Err(Error::Input(format!("shapes: example {i} of {}", self.len)));
        }
        let drawn: Vec<(Vec<f32>, usize)> = indices.par_iter().map(|&i| self.draw(i)).collect();
        let s = self.size;
        let image: Vec<f32> = drawn.iter().flat_map(|(p, _)| p.iter().copied()).collect();
        let labels: Vec<f32> = drawn.iter().map(|(_, c)| *c as f32).collect();
        Ok(TensorMap::from([
            (
                "image".to_string(),
                Tensor::from_shape_vec(vec![indices.len(), s, s, 3], image).expect("s*s*3 per image"),
            ),
            ("labels".to_string(), Tensor::from_shape_vec(vec![indices.len()], labels).expect("one label each")),
        ]))
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        BTreeMap::from([("image".to_string(), vec![self.size, self.size, 3]), ("labels".to_string(), vec![])])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_seeded_balanced_and_drawn_inside() {
        let s = Shapes::new(300, 16, 5).unwrap();
        let b = s.gather(&[0, 1, 2]).unwrap();
        assert_eq!(b["image"].shape(), &[3, 16, 16, 3]);
        assert_eq!(s.gather(&[1]).unwrap()["image"], b["image"].slice(ndarray::s![1..2, .., .., ..]).into_dyn());
        assert!(b["image"].iter().all(|&v| (0.0..=1.0).contains(&v)));
        let all = s.gather(&(0..300).collect::<Vec<_>>()).unwrap();
        let mut counts = [0; 3];
        for &l in all["labels"].iter() {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (70..130).contains(&c)), "{counts:?}");
        for i in 0..30 {
            let (pixels, class) = s.draw(i);
            let other = Shapes::new(300, 16, 6).unwrap().draw(i).0;
            assert_ne!(pixels, other, "the seed changes the images");
            assert!(class < 3);
        }
        assert!(Shapes::new(0, 16, 1).is_err() && Shapes::new(10, 4, 1).is_err());
    }
}

//! Image folders: one sub-folder per class (`root/cat/*.png`, `root/dog/*.jpg`), the classes
//! in name order, each image decoded when it is read (PNG or JPEG, with the `image` crate)
//! and resized to the model's input — the layout of Keras's `image_dataset_from_directory`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use systolic_compiler::{Tensor, TensorMap};

use super::pipeline::Source;
use crate::error::{Error, Result};

/// The file extensions read (lower case).
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The images under a folder, by class.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    /// Every image and its class, classes in name order, files in name order within each.
    files: Vec<(PathBuf, usize)>,
    classes: Vec<String>,
    height: usize,
    width: usize,
}

impl ImageFolder {
    /// Lists `root`'s class folders and their images, to be read at `height` × `width` RGB.
    pub fn open(root: &Path, height: usize, width: usize) -> Result<ImageFolder> {
        let io = |path: &Path, e: std::io::Error| Error::Io { path: path.display().to_string(), source: e };
        let mut classes: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| io(root, e))? {
            let entry = entry.map_err(|e| io(root, e))?;
            // Hidden folders (`.ipynb_checkpoints`, `.git`) are not classes.
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if !hidden && entry.file_type().map_err(|e| io(&entry.path(), e))?.is_dir() {
                classes.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(Error::Input(format!(
                "{}: has no class folders; put each class's images in a sub-folder named after it",
                root.display()
            )));
        }
        let mut files = Vec::new();
        for (label, (name, dir)) in classes.iter().enumerate() {
            let mut images: Vec<PathBuf> = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
                let path = entry.map_err(|e| io(dir, e))?.path();
                let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase());
                if ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
                    images.push(path);
                }
            }
            if images.is_empty() {
                return Err(Error::Input(format!("{}: class '{name}' has no PNG or JPEG images", dir.display())));
            }
            images.sort();
            files.extend(images.into_iter().map(|p| (p, label)));
        }
        if height == 0 || width == 0 {
            return Err(Error::Input(format!("images of {height}x{width}: give a positive size")));
        }
        Ok(ImageFolder { files, classes: classes.into_iter().map(|c| c.0).collect(), height, width })
    }

    /// The class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// One image, decoded, resized (bilinear) and scaled to [0, 1], HWC RGB.
    fn read(&self, i: usize) -> Result<Vec<f32>> {
        let path = &self.files[i].0;
        let img = image::ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| Error::Input(format!("{}: cannot be opened ({e})", path.display())))?
            .decode()
            .map_err(|e| Error::Input(format!("{}: is not a readable PNG or JPEG image ({e})", path.display())))?;
        let rgb =
            img.resize_exact(self.width as u32, self.height as u32, image::imageops::FilterType::Triangle).to_rgb8();
        Ok(rgb.into_raw().into_iter().map(|v| v as f32 / 255.0).collect())
    }
}

impl Source for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn gather(&self, indices: &[usize]) -> Result<TensorMap> {
        if let Some(&i) = indices.iter().find(|&&i| i >= self.files.len()) {
            return Err(Error::Input(format!("image {i} of {}", self.files.len())));
        }
        let pixels: Vec<Vec<f32>> = indices.par_iter().map(|&i| self.read(i)).collect::<Result<_>>()?;
        let labels: Vec<f32> = indices.iter().map(|&i| self.files[i].1 as f32).collect();
        let (h, w) = (self.height, self.width);
        Ok(TensorMap::from([
            (
                "image".to_string(),
                Tensor::from_shape_vec(vec![indices.len(), h, w, 3], pixels.concat()).expect("h*w*3 per image"),
            ),
            ("labels".to_string(), Tensor::from_shape_vec(vec![indices.len()], labels).expect("one label each")),
        ]))
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        BTreeMap::from([("image".to_string(), vec![self.height, self.width, 3]), ("labels".to_string(), vec![])])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("systolic-folder-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn reads_classes_resizes_and_names_bad_files() {
        let root = folder("ok");
        for (class, colour) in [("blue", [0u8, 0, 255]), ("red", [255, 0, 0])] {
            std::fs::create_dir_all(root.join(class)).unwrap();
            let img = image::RgbImage::from_pixel(6, 4, image::Rgb(colour));
            img.save(root.join(class).join("a.png")).unwrap();
        }
        let f = ImageFolder::open(&root, 2, 3).unwrap();
        assert_eq!(f.classes(), ["blue", "red"]);
        let b = f.gather(&[1, 0]).unwrap();
        assert_eq!(b["image"].shape(), &[2, 2, 3, 3]);
        assert_eq!(b["labels"].iter().copied().collect::<Vec<_>>(), vec![1.0, 0.0]);
        // A plain red image stays plain red when resized.
        assert_eq!(b["image"].slice(ndarray::s![0, 1, 2, ..]).to_vec(), vec![1.0, 0.0, 0.0]);

        std::fs::write(root.join("red").join("broken.png"), b"not a png").unwrap();
        let f = ImageFolder::open(&root, 2, 3).unwrap();
        let e = f.gather(&[2]).unwrap_err().to_string();
        assert!(e.contains("broken.png") && e.contains("not a readable"), "{e}");
        std::fs::create_dir_all(root.join("empty")).unwrap();
        let e = ImageFolder::open(&root, 2, 3).unwrap_err().to_string();
        assert!(e.contains("class 'empty' has no PNG or JPEG images"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
        let e = ImageFolder::open(&root, 2, 3).unwrap_err().to_string();
        assert!(e.contains(&root.display().to_string()), "{e}");
    }
}

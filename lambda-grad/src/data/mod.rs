//! Data sets: readers for IDX (MNIST, Fashion-MNIST) and CIFAR-10 binary files,
//! preprocessing, and the deterministic partition of a training set into peer shards.

mod cifar;
mod idx;
mod partition;

pub use idx::encode as encode_idx;
pub use partition::{Partition, PartitionError};

use p2pml_proto::{DatasetKind, Normalization};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Where the Debian package `dataset-fashion-mnist` installs its files.
pub const FASHION_MNIST_DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Errors while locating or reading a data set. Each message names the file and
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{dataset} not found: no {missing} in {dir}; {hint}")]
    Missing { dataset: DatasetKind, dir: PathBuf, missing: String, hint: String },
    #[error("{dataset} not found: {dir} is not a directory; {hint}")]
    NoDir { dataset: DatasetKind, dir: PathBuf, hint: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{images} has {n_images} images but {labels} has {n_labels} labels")]
    CountMismatch { images: PathBuf, n_images: usize, labels: PathBuf, n_labels: usize },
    #[error("{path}: label {label} at index {index} is out of range for {classes} classes (0-{}); the file is damaged or belongs to another data set", .classes.saturating_sub(1))]
    Label { path: PathBuf, label: u8, index: usize, classes: usize },
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), source }
    }
    pub(crate) fn format(path: &Path, msg: impl Into<String>) -> Self {
        DataError::Format { path: path.to_path_buf(), msg: msg.into() }
    }
}

/// Raw images (u8, N×C×H×W) and labels of one split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub shape: [usize; 3],
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }
    /// The first `n` samples (or all of them).
    pub fn truncate(mut self, n: usize) -> Split {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.images.truncate(n * self.sample_len());
        self
    }
    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Split {
        let sl = self.sample_len();
        let mut images = Vec::with_capacity(indices.len() * sl);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(&self.images[i * sl..(i + 1) * sl]);
            labels.push(self.labels[i]);
        }
        Split { images, labels, shape: self.shape }
    }
}

/// A data set: its kind, a training split and a test split.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub train: Split,
    pub test: Split,
}

/// Facts about a data set that do not depend on its files.
pub fn info(kind: DatasetKind) -> DatasetInfo {
    match kind {
        DatasetKind::Mnist => DatasetInfo {
            shape: [1, 28, 28],
            mean: vec![0.1307],
            std: vec![0.3081],
            classes: (0..10).map(|d| d.to_string()).collect(),
        },
        DatasetKind::FashionMnist => DatasetInfo {
            shape: [1, 28, 28],
            mean: vec![0.2860],
            std: vec![0.3530],
            classes: [
                "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                "Sneaker", "Bag", "Ankle boot",
            ]
            .map(String::from)
            .to_vec(),
        },
        DatasetKind::Cifar10 => DatasetInfo {
            shape: [3, 32, 32],
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2470, 0.2435, 0.2616],
            classes: [
                "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck",
            ]
            .map(String::from)
            .to_vec(),
        },
    }
}

/// Input shape, per-channel statistics of the training set, class names.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetInfo {
    pub shape: [usize; 3],
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub classes: Vec<String>,
}

/// The directory a data set is read from when no `--data-dir` is given.
pub fn default_dir(kind: DatasetKind) -> PathBuf {
    match kind {
        DatasetKind::FashionMnist => PathBuf::from(FASHION_MNIST_DEBIAN_DIR),
        DatasetKind::Mnist => PathBuf::from("/usr/share/datasets/mnist"),
        DatasetKind::Cifar10 => PathBuf::from("/usr/share/datasets/cifar10"),
    }
}

fn hint(kind: DatasetKind) -> String {
    match kind {
        DatasetKind::FashionMnist => "install the Debian package dataset-fashion-mnist \
            (apt-get install dataset-fashion-mnist) or pass --data-dir DIR with the IDX files"
            .into(),
        DatasetKind::Mnist => "pass --data-dir DIR holding train-images-idx3-ubyte[.gz], \
            train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
            .into(),
        DatasetKind::Cifar10 => "pass --data-dir DIR holding data_batch_1.bin … data_batch_5.bin \
            and test_batch.bin (the CIFAR-10 binary version)"
            .into(),
    }
}

/// Finds `name` or `name.gz` in `dir`.
fn find(kind: DatasetKind, dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(DataError::Missing {
        dataset: kind,
        dir: dir.to_path_buf(),
        missing: format!("{name}[.gz]"),
        hint: hint(kind),
    })
}

fn load_idx_split(kind: DatasetKind, dir: &Path, prefix: &str) -> Result<Split, DataError> {
    let ip = find(kind, dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lp = find(kind, dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = idx::parse(&ip, &idx::read_maybe_gz(&ip)?, 3)?;
    let labels = idx::parse(&lp, &idx::read_maybe_gz(&lp)?, 1)?;
    if images.dims[0] != labels.dims[0] {
        return Err(DataError::CountMismatch {
            images: ip,
            n_images: images.dims[0],
            labels: lp,
            n_labels: labels.dims[0],
        });
    }
    let expected = info(kind).shape;
    if images.dims[1..] != expected[1..] {
        return Err(DataError::format(
            &ip,
            format!("images are {}×{}, {kind} images are {}×{}", images.dims[1], images.dims[2], expected[1], expected[2]),
        ));
    }
    check_labels(&lp, &labels.data, 10)?;
    Ok(Split { images: images.data, labels: labels.data, shape: expected })
}

fn check_labels(path: &Path, labels: &[u8], classes: usize) -> Result<(), DataError> {
    match labels.iter().position(|&l| l as usize >= classes) {
        Some(index) => Err(DataError::Label { path: path.to_path_buf(), label: labels[index], index, classes }),
        None => Ok(()),
    }
}

fn load_cifar_split(dir: &Path, files: &[&str]) -> Result<Split, DataError> {
    let kind = DatasetKind::Cifar10;
    // Accept both the extracted archive's sub-directory and the files themselves.
    let nested = dir.join("cifar-10-batches-bin");
    let dir = if nested.is_dir() { nested } else { dir.to_path_buf() };
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for f in files {
        let p = find(kind, &dir, f)?;
        cifar::parse_into(&p, &idx::read_maybe_gz(&p)?, &mut images, &mut labels)?;
    }
    Ok(Split { images, labels, shape: [3, 32, 32] })
}

/// Loads both splits of `kind` from `dir` (or the default directory).
pub fn load(kind: DatasetKind, dir: Option<&Path>) -> Result<Dataset, DataError> {
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| default_dir(kind));
    if !dir.is_dir() {
        return Err(DataError::NoDir { dataset: kind, dir: dir.clone(), hint: hint(kind) });
    }
    let (train, test) = match kind {
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            (load_idx_split(kind, &dir, "train")?, load_idx_split(kind, &dir, "t10k")?)
        }
        DatasetKind::Cifar10 => (
            load_cifar_split(
                &dir,
                &["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"],
            )?,
            load_cifar_split(&dir, &["test_batch.bin"])?,
        ),
    };
    Ok(Dataset { kind, train, test })
}

/// Turns raw pixels into a float tensor `[N, C, H, W]` on `device`.
pub fn to_tensor(split: &Split, kind: DatasetKind, norm: Normalization, device: Device) -> (Tensor, Tensor) {
    let [c, h, w] = split.shape.map(|d| d as i64);
    let n = split.len() as i64;
    let x = Tensor::from_slice(&split.images)
        .view([n, c, h, w])
        .to_kind(Kind::Float)
        / 255.0;
    let x = match norm {
        Normalization::MinMax => x,
        Normalization::MeanStd => {
            let i = info(kind);
            let mean = Tensor::from_slice(&i.mean).view([1, c, 1, 1]);
            let std = Tensor::from_slice(&i.std).view([1, c, 1, 1]);
            (x - mean) / std
        }
        Normalization::Standardize => {
            let flat = x.view([n, -1]);
            let mean = flat.mean_dim(Some(&[1i64][..]), true, Kind::Float);
            let std = flat.std_dim(Some(&[1i64][..]), false, true);
            ((flat - mean) / (std + 1e-6)).view([n, c, h, w])
        }
    };
    let y = Tensor::from_slice(&split.labels).to_kind(Kind::Int64);
    (x.to_device(device), y.to_device(device))
}

#[cfg(test)]
mod tests;
